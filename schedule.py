"""The diffusion math of the ZeroDiffusion recipe, as pure functions on tensors (torch only, no state).

Notation, used in every docstring below:
    t      integer timestep, 0 … 999; t = 999 is the noisiest. T = 1000 steps in all.
    abar   ᾱ_t = ∏_{s≤t} (1 − β_s), the fraction of x_t's variance that is signal.
    snr    SNR_t = ᾱ_t / (1 − ᾱ_t). Zero terminal SNR means ᾱ_999 = 0: x_999 is pure noise.
    x_t    = √ᾱ·x0 + √(1−ᾱ)·ε                the forward process       (Ho et al. 2020, eq. 4)
    v      = √ᾱ·ε − √(1−ᾱ)·x0                the velocity target       (Salimans & Ho 2022, §4)

Schedules are built and kept in float64 and cast where they are used: after the rescale ᾱ_998 = 1.97e-7, which fp16
cannot hold (pitfall 8). Functions taking `abar` accept a float, a 0-d tensor or a tensor [B] (one ᾱ per sample); the
coefficients √ᾱ and √(1−ᾱ) are taken in float64 and only then cast to the data's dtype.
"""
import torch

T = 1000


def sd15_betas(n=T, beta_start=0.00085, beta_end=0.012):
    """Stable Diffusion 1.5's "scaled linear" betas: β_t = (√β_start + (√β_end − √β_start)·t/(n−1))²."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2


def alphas_cumprod(betas):
    """ᾱ_t = ∏_{s≤t} (1 − β_s)."""
    return torch.cumprod(1 - betas.double(), dim=0)


def rescale_zero_terminal_snr(betas):
    """Implements Algorithm 1 of Lin et al. (2023): shift and scale √ᾱ so that ᾱ_T = 0 and ᾱ_0 is unchanged."""
    s = alphas_cumprod(betas).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * s0 / (s0 - sT)                          # s_T → 0, s_0 → s_0
    abar = s ** 2
    return torch.cat([1 - abar[:1], 1 - abar[1:] / abar[:-1]])    # β_0 = 1 − ᾱ_0, β_t = 1 − ᾱ_t/ᾱ_{t−1}; β_T = 1


def betas(zero_terminal_snr=True):
    """The recipe's betas: SD1.5's, rescaled to zero terminal SNR unless asked not to (float64 [1000])."""
    b = sd15_betas()
    return rescale_zero_terminal_snr(b) if zero_terminal_snr else b


def snr(abar):
    """SNR_t = ᾱ_t / (1 − ᾱ_t); 0 at the zero-terminal-SNR step. Compute it from the *rescaled* ᾱ (pitfall 1)."""
    return abar / (1 - abar)


def _coefs(abar, like):
    """(√ᾱ, √(1−ᾱ)) in float64, cast to like's dtype and device, shaped to broadcast over like's [B, C, H, W]."""
    a = torch.as_tensor(abar, dtype=torch.float64)
    a = a.reshape(a.shape + (1,) * (like.dim() - a.dim()))
    return a.sqrt().to(like), (1 - a).sqrt().to(like)


def add_noise(x0, noise, abar, ip_noise=None, ip_gamma=0.0):
    """The forward process x_t = √ᾱ·x0 + √(1−ᾱ)·ε', with input perturbation ε' = ε + γ·ξ
    (Ning et al. 2023, eq. 9). ξ ~ N(0, I) is drawn independently of ε; the *target* is built from the clean ε
    (`target`), so IP noise perturbs the input alone (pitfall 4)."""
    if ip_noise is not None and ip_gamma:
        noise = noise + ip_gamma * ip_noise
    a, s = _coefs(abar, x0)
    return a * x0 + s * noise


def v_target(x0, noise, abar):
    """v = √ᾱ·ε − √(1−ᾱ)·x0   (Salimans & Ho 2022, §4). At ᾱ = 0 it is −x0, at ᾱ = 1 it is ε."""
    a, s = _coefs(abar, x0)
    return a * noise - s * x0


def target(x0, noise, abar, prediction):
    """What a model of the given parameterisation ('v' or 'eps') is trained to output."""
    if prediction == "v":
        return v_target(x0, noise, abar)
    if prediction == "eps":
        return noise
    raise ValueError(f"unknown prediction type {prediction!r}: use 'v' or 'eps'")


def x0_from_v(x_t, v, abar):
    """x0 = √ᾱ·x_t − √(1−ᾱ)·v   (Salimans & Ho 2022, §4): finite for every ᾱ in [0, 1], no division."""
    a, s = _coefs(abar, x_t)
    return a * x_t - s * v


def eps_from_v(x_t, v, abar):
    """ε = √(1−ᾱ)·x_t + √ᾱ·v   (Salimans & Ho 2022, §4): finite for every ᾱ in [0, 1], no division."""
    a, s = _coefs(abar, x_t)
    return s * x_t + a * v


def x0_eps(x_t, out, abar, prediction):
    """(x̂0, ε̂) from a model output of the given parameterisation.
    An ε model must divide by √ᾱ, which is 0 at the zero-terminal-SNR step: refused, not turned into inf/NaN
    (pitfall 7)."""
    if prediction == "v":
        return x0_from_v(x_t, out, abar), eps_from_v(x_t, out, abar)
    a, s = _coefs(abar, x_t)
    if prediction == "eps":
        if (torch.as_tensor(abar) <= 0).any():
            raise ValueError("ε-prediction cannot be sampled at ᾱ = 0 (zero terminal SNR): x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ "
                             "divides by zero. Use a v-prediction model, or the SD1.5 schedule for an ε model.")
        return (x_t - s * out) / a, out
    raise ValueError(f"unknown prediction type {prediction!r}: use 'v' or 'eps'")


def min_snr_weight(snr_t, gamma=5.0, prediction="v"):
    """Min-SNR-γ loss weight (Hang et al. 2023, §3.4), for a per-sample MSE on the model's own output (x0, the paper's
    base form, for the golden vectors; zd trains v or ε):
        x0:  min(SNR, γ)
        ε:   min(SNR, γ)/SNR   = min(1, γ/SNR): at SNR = 0 the 0/0 is defined as its limit, 1 (pitfall 2)
        v:   min(SNR, γ)/(SNR + 1)   = min(ᾱ, γ(1−ᾱ)): 0 at SNR = 0 by the formula itself
    (not min(SNR + 1, γ)/(SNR + 1): that is a different, wrong weight; pitfall 3). On the rescaled schedule with γ = 5
    the v weight gives t ≥ 900 only 0.03% of the total weight and t = 999 none: the terminal step's prediction is
    learned from its neighbours (README, The schedule, and its figure)."""
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction == "v":
        return clipped / (snr_t + 1)
    if prediction == "eps":
        return torch.where(snr_t > 0, gamma / snr_t, torch.inf).clamp(max=1)
    if prediction == "x0":
        return clipped
    raise ValueError(f"unknown prediction type {prediction!r}: use 'v', 'eps' or 'x0'")


def weighted_mse(pred, tgt, weight):
    """Σ_b w_b·mean_{C,H,W}(pred − target)² / B, and the unweighted per-sample MSE (for logging by timestep)."""
    per_sample = (pred.float() - tgt.float()).pow(2).mean(dim=tuple(range(1, pred.dim())))
    return (weight * per_sample).mean(), per_sample.detach()


def timesteps(n, spacing="trailing", offset=1):
    """The N sampling timesteps of 1000, noisiest first (Lin et al. 2023, Table 2), int64 [N]:
        trailing  round(1000 − i·1000/N) − 1  → starts at t = 999, the step a zero-terminal-SNR model needs;
        leading   i·(1000 // N) + offset      → SD1.5's default (offset 1), never visits 999;
        linspace  round(linspace(0, 999, N))."""
    i = torch.arange(n, dtype=torch.float64)
    if spacing == "trailing":
        ts = torch.round(T - i * T / n) - 1
    elif spacing == "leading":
        ts = (i * (T // n)).flip(0) + offset
    elif spacing == "linspace":
        ts = torch.round(torch.linspace(0, T - 1, n, dtype=torch.float64)).flip(0)
    else:
        raise ValueError(f"unknown spacing {spacing!r}: use 'trailing', 'leading' or 'linspace'")
    return ts.long()


def prev_timestep(ts, i):
    """The timestep that follows ts[i] in the sampling list, or −1 (ᾱ = 1, a clean image) after the last.
    Looked up, never computed as t − 1000//N: that is off by one when N does not divide 1000 (pitfall 6)."""
    return int(ts[i + 1]) if i + 1 < len(ts) else -1


def abar_at(abar, t):
    """ᾱ_t looked up in the schedule, with ᾱ_{−1} = 1 (DDIM's "set_alpha_to_one": the last step returns x̂0)."""
    return abar.new_ones(()) if t < 0 else abar[t]


def ddim_step(x_t, out, abar_t, abar_prev, prediction="v"):
    """One deterministic DDIM step, η = 0 (Song et al. 2021, eq. 12), in ᾱ-space:
        x̂0, ε̂ from the model output (`x0_eps`);  x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂.
    ᾱ_prev = 1 returns x̂0. No σ = √((1−ᾱ)/ᾱ) appears, so ᾱ_t = 0 needs no clamp."""
    x0, eps = x0_eps(x_t, out, abar_t, prediction)
    a, s = _coefs(abar_prev, x_t)
    return a * x0 + s * eps


def guidance(uncond, cond, scale, rescale=0.0):
    """Classifier-free guidance (Ho & Salimans 2022) with the rescale of Lin et al. (2023), Algorithm 2, applied to
    the raw model output (here: v), as the widely used pipelines do:
        x_cfg = x_u + w·(x_c − x_u);  x_r = x_cfg·std(x_c)/std(x_cfg) (std per sample over C, H, W);
        out = φ·x_r + (1 − φ)·x_cfg."""
    x_cfg = uncond + scale * (cond - uncond)
    if not rescale:
        return x_cfg
    dims = tuple(range(1, cond.dim()))
    x_r = x_cfg * cond.std(dim=dims, keepdim=True) / x_cfg.std(dim=dims, keepdim=True)
    return rescale * x_r + (1 - rescale) * x_cfg


def ema_decay(step, decay=0.9999, warmup=False):
    """The EMA decay at optimiser step `step` (1, 2, …). The recipe keeps it constant from step 1 so that the EMA,
    initialised from SD1.5's EMA weights, is not wiped. warmup=True ramps it as min(d, (1+s)/(10+s)) for EMAs that
    start from scratch (never 0, so even then the first update keeps 2/11 of the init; pitfall 5)."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def ema_update(ema, params, decay):
    """e ← e + (1 − d)·(p − e) = lerp(e, p, 1 − d), in place on the list of EMA tensors.
    With constant d and p this gives e_n = p + (e_0 − p)·dⁿ."""
    ema, params = list(ema), [p.detach() for p in params]
    torch._foreach_lerp_(ema, params, 1 - decay)
