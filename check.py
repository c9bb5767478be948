"""check — zd's conformance engine: the recipe's math as formulas, right and under each known mistake, their golden
vectors and tolerances, and the comparison of another trainer's values with them, quantity by quantity.

    python zd.py vectors           the vectors as a file (safetensors or JSON)
    python zd.py check mytrainer.py:Adapter
    python zd.py check --template  an adapter to fill in

A known mistake is a change to the recipe's formulas (FORMULAS), so mistakes compose: two at once are the recipe with
both changes. It imports only schedule.py (and torch, safetensors), so a trainer author reads it alone and imports it in
a test suite without the rest of zd. What an adapter provides, and how to read a verdict: README, "Check your trainer".
"""
import contextlib
import itertools
import json
import math
import textwrap
import traceback

import torch
from safetensors.torch import save_file

import schedule as S

MISTAKES = {  # id: the mistake, its pitfall in the README's list, and what it does to training or sampling
    "snr_before_rescale": "min-SNR weights from SD1.5's SNR, taken before the zero-terminal-SNR rescale (pitfall 1): "
    "every t is weighted by another schedule's SNR, and t = 999, pure noise after the rescale, as if it still held "
    "√ᾱ = 6.8% of the image (v weight 0.0047 instead of 0).",
    "min_snr_plus_one": "the v weight written min(SNR + 1, γ)/(SNR + 1), not min(SNR, γ)/(SNR + 1) (pitfall 3; Hang et "
    "al. 2023): every t with SNR ≤ γ − 1, t = 999 included, weighs 1 instead of SNR/(SNR + 1), so the noisiest steps, "
    "which min-SNR weighs least, get the largest weight.",
    "eps_weight_on_v": "the ε form min(SNR, γ)/SNR applied to a v loss (pitfall 3): it is 1/ᾱ times the v weight "
    "min(SNR, γ)/(SNR + 1) (Hang et al. 2023), so the noisiest steps are over-weighted without bound, and at SNR = 0 "
    "it is 0/0 = NaN, which makes the batch's loss and gradients NaN (a guard that replaces it hides the NaN, not the "
    "over-weighting).",
    "eps_weight_nan_at_zero_snr": "the ε weight min(SNR, γ)/SNR evaluated at SNR = 0 (pitfall 2): 0/0 = NaN at "
    "t = 999 on a zero-terminal-SNR schedule, so one such sample makes the batch's loss and all gradients NaN. The "
    "weight's limit there is 1.",
    "ip_noise_in_target": "input-perturbation noise added to the target as well as the input (pitfall 4): Ning et al. "
    "(2023) build the target from the clean ε; perturbing both is plain noise augmentation and undoes the "
    "exposure-bias correction IP is for.",
    "abar_in_bf16": "ᾱ cast to bf16 before √ᾱ and √(1−ᾱ) are taken (pitfall 8): ᾱ_0 = 0.99915 and ᾱ_1 = 0.99830 round "
    "to 1.0, so at t = 0 and 1 the noise vanishes from x_t and the x0 term from the v target, and every t up to about "
    "50 gets one of a few quantised noise levels. Take the coefficients in float32 or float64 and cast them, not ᾱ.",
    "no_zt_rescale": "SD1.5's schedule without the zero-terminal-SNR rescale (Lin et al. 2023, Alg. 1) in a trainer "
    "meant to be zero-terminal-SNR: ᾱ_999 = 0.0047, so the model never sees pure noise in training and the sampler "
    "starts from an x_999 that still holds √ᾱ = 6.8% of the image — the bias the rescale removes (images cannot be "
    "very dark or very bright).",
    "prev_t_stride": "DDIM steps from t to t − 1000//N, not to the next timestep of the list (pitfall 6): when N does "
    "not divide 1000 steps land one off (N = 13: 999 → 923, not 922) and the last can land on t = 0 (N = 13: 76 → 0) "
    "instead of returning x̂0 (ᾱ_prev = 1), so the sampler leaves the trailing schedule it was given.",
    "last_step_to_abar0": "the last DDIM step goes to ᾱ_0 = 0.99915 instead of ᾱ = 1 (set_alpha_to_one=False, as "
    "SD1.5's scheduler config ships it; pitfall 6): the sample keeps √(1−ᾱ_0) = 2.9% of the predicted noise instead "
    "of being x̂0.",
    "leading_spacing_on_zt": "leading spacing i·(1000//N) + 1, SD1.5's default, on a zero-terminal-SNR model (pitfall "
    "6; Lin et al. 2023, §3.3 and Table 2): sampling never starts at t = 999, so the model is handed pure noise at a "
    "timestep where it expects some signal, which gives up what the rescale is for.",
    "steps_offset_0": "leading spacing without SD1.5's steps_offset = 1, i·(1000//N) (pitfall 6): every sampling "
    "timestep is one lower than SD1.5's scheduler config gives, and the last is t = 0.",
    "sd15_abar_in_zt_sampler": "the sampler uses SD1.5's ᾱ instead of the trained, rescaled one (pitfall 9): at "
    "t = 999 it reads pure noise as holding √ᾱ = 6.8% of the image, and at every t it mixes x̂0 and ε̂ with the "
    "coefficients of a schedule the model was not trained on.",
    "cfg_rescale_missing": "CFG rescale (Lin et al. 2023, Alg. 2) not applied although asked for: the guided output "
    "keeps the inflated standard deviation of x_u + w·(x_c − x_u), which on a zero-terminal-SNR model over-exposes "
    "images at usual guidance scales.",
    "ema_warmup": "EMA warm-up, decay 0 at the first update and (1 + s)/(10 + s) at the s-th after it (pitfall 5): the "
    "first update replaces whatever the EMA was initialised from (for a fine-tune, usually the base model's EMA "
    "weights) by the current weights, and the decay stays below 0.9999 for 90,000 updates, so the EMA averages far "
    "fewer steps than the decay says.",
    "ema_in_bf16": "the EMA kept in bf16 (pitfall 8): at decay 0.9999 an update moves a weight by 1e-4 of its distance "
    "to the model's, below half a bf16 ulp (2^-9 of the weight) unless the weight is near 0, so it rounds back: in "
    "the check's case 98% of the EMA's elements never move in 1000 updates. Keep the EMA in float32.",
}
FORMULAS = {  # id: (the prediction type it applies to, or None: any; the recipe's settings it changes, see `recipe`)
    "snr_before_rescale": (None, {"snr": "sd15"}),
    "min_snr_plus_one": ("v", {"weight": "min(SNR + 1, γ)/(SNR + 1)"}),
    "eps_weight_on_v": ("v", {"weight": "min(SNR, γ)/SNR"}),
    "eps_weight_nan_at_zero_snr": ("eps", {"weight": "min(SNR, γ)/SNR"}),
    "ip_noise_in_target": (None, {"ip_in_target": True}),
    "abar_in_bf16": (None, {"abar_dtype": torch.bfloat16}),
    "prev_t_stride": (None, {"prev": "t − 1000//N"}),
    "last_step_to_abar0": (None, {"final_abar": "ᾱ_0"}),
    "leading_spacing_on_zt": (None, {"spacing": "leading"}),
    "steps_offset_0": (None, {"offset": 0}),
    "sd15_abar_in_zt_sampler": (None, {"sampler_abar": "sd15"}),
    "no_zt_rescale": (None, {"abar": "sd15", "snr": "sd15", "sampler_abar": "sd15"}),
    "cfg_rescale_missing": (None, {"cfg_rescale": False}),
    "ema_warmup": (None, {"ema": "warm-up"}),
    "ema_in_bf16": (None, {"ema": "bf16"}),
}
N_STEPS = (10, 13, 25, 50)        # sampling step counts of the vectors: 13 does not divide 1000, the others do
PROTOCOL = ("prediction", "alphas_cumprod", "loss_weight", "noisy_input", "target", "loss", "sampling_timesteps",
            "sampler_step", "cfg", "ema_update")      # what `check` asks of a trainer, each member optional (README)
ABSENT = {  # member = value that declares a feature absent: the quantities it removes
    "ip_noise_gamma": (0, ["noisy_input"]), "min_snr_gamma": (0, ["loss_weight"]),
    "cfg_rescale": (0, ["cfg(7.5, rescale 0.7)"]), "ema": (None, ["ema_update", "ema_update × 1000"])}
SCHEDULES = {"zt": S.alphas_cumprod(S.betas()), "sd15": S.alphas_cumprod(S.sd15_betas())}
ZT_WOULD_CHANGE = ("the zero-terminal-SNR recipe would rescale this ᾱ so that ᾱ_999 = 0 (Lin et al. 2023, Alg. 1), "
                   "train v with its min-SNR weight, sample trailing timesteps from t = 999 and rescale CFG (φ = 0.7)")
ULP = {"float64": 2 ** -52, "float32": 2 ** -23, "bfloat16": 2 ** -7, "float16": 2 ** -10}    # 1 ulp at 1.0


def recipe(schedule="zt", pred="v"):
    """The recipe's formulas as settings, on `schedule` (zt: SD1.5's rescaled to zero terminal SNR; sd15: SD1.5's as
    shipped, with its leading spacing and steps_offset 1): a known mistake is a change to some of them (FORMULAS)."""
    return dict(schedule=schedule, pred=pred, abar=schedule, abar_dtype=torch.float64, ip_in_target=False,
                snr=schedule, weight="min-SNR", guard={}, spacing="trailing" if schedule == "zt" else "leading",
                offset=1, prev="list", sampler_abar=schedule, final_abar=1.0, cfg_rescale=True, ema="constant")


def inputs(seed=0):
    """The seeded inputs of every case: float64 values that bf16 holds exactly, and so float32 and (but for the few
    below 6e-5) fp16: casting them adds no error."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64).bfloat16().double()
    inp = {"forward.x0": rand(6, 4, 8, 8), "forward.noise": rand(6, 4, 8, 8), "forward.ip_noise": rand(6, 4, 8, 8),
           "forward.t": torch.tensor([0, 1, 139, 500, 998, 999])}
    scale = torch.arange(1.0, 7.0, dtype=torch.float64).view(-1, 1, 1, 1)
    for p in ("v", "eps"):                   # s·ξ off the target: weight mistakes cannot cancel across the batch
        tgt = value("target", recipe("zt", p), inp)
        inp[f"loss.model_output.{p}"] = (tgt - scale * inp["forward.ip_noise"]).bfloat16().double()
    inp.update({"cfg.uncond": rand(2, 4, 8, 8), "cfg.cond": rand(2, 4, 8, 8)})
    rows = [(n, i) for n in N_STEPS for i in (0, 1, n - 1)]     # each N's first step, second and last
    inp.update({"ddim.n": torch.tensor([n for n, _ in rows]), "ddim.i": torch.tensor([i for _, i in rows]),
                "ddim.x_t": rand(len(rows), 4, 8, 8), "ddim.model_output": rand(len(rows), 4, 8, 8)})
    inp.update({"ema.ema": rand(2, 64), "ema.param": rand(2, 64), "ema.step": torch.tensor([1, 10])})
    return inp


def weight(c):
    """The per-t loss weight [1000] under settings c, with c's guard values at the t where the formula is 0/0."""
    snr, pred = S.snr(SCHEDULES[c["snr"]]), c["pred"]
    w = {"min-SNR": lambda: S.min_snr_weight(snr, 5.0, pred), "one": lambda: torch.ones_like(snr),
         "min(SNR + 1, γ)/(SNR + 1)": lambda: (snr + 1).clamp(max=5.0) / (snr + 1),
         "min(SNR, γ)/SNR": lambda: snr.clamp(max=5.0) / snr}[c["weight"]]()
    for t, g in c["guard"].items():
        w[t] = g
    return w


def ddim_rows(c, inp):
    """(t, x_prev) of the DDIM rows [12]: from the first, second and last t of each N's list (the schedule's own
    spacing), one step η = 0 under settings c (Song et al. 2021, eq. 12); NaN for ε at ᾱ_t = 0 (pitfall 7)."""
    ref = recipe(c["schedule"])
    ts = {n: S.timesteps(n, ref["spacing"], ref["offset"]) for n in N_STEPS}
    abar = SCHEDULES[c["sampler_abar"]]
    final = abar.new_tensor(1.0) if c["final_abar"] == 1.0 else abar[0]
    t, x = [], torch.full_like(inp["ddim.x_t"], math.nan)
    for r, (n, i) in enumerate(zip(inp["ddim.n"].tolist(), inp["ddim.i"].tolist())):
        t.append(int(ts[n][i]))
        prev = S.prev_timestep(ts[n], i) if c["prev"] == "list" else max(t[-1] - S.T // n, -1)
        if c["pred"] == "v" or SCHEDULES[c["schedule"]][t[-1]] > 0:
            x[r] = S.ddim_step(inp["ddim.x_t"][r], inp["ddim.model_output"][r], abar[t[-1]],
                               final if prev < 0 else abar[prev], c["pred"])
    return torch.tensor(t), x


def ema(c, e, p, steps):
    """The EMA after updates at optimiser steps `steps` (1 = the first), decay 0.9999, under settings c."""
    if c["ema"] == "bf16":
        e, p = e.bfloat16(), p.bfloat16()
    for s in steps:
        d = (0.0 if s == 1 else min(0.9999, s / (s + 9))) if c["ema"] == "warm-up" else 0.9999
        e = torch.lerp(e, p, 1 - d)                            # e + (1 − d)·(p − e)
    return e.double()


def value(q, c, inp, arg=None):
    """Quantity q of the recipe under settings c on the inputs: the formula that each check row compares with."""
    t, x0, eps, xi = inp["forward.t"], inp["forward.x0"], inp["forward.noise"], inp["forward.ip_noise"]
    abar = SCHEDULES[c["abar"]].to(c["abar_dtype"]).double()         # ᾱ as the trainer holds it where it noises
    if q == "alphas_cumprod":
        return SCHEDULES[c["abar"]]
    if q == "loss_weight":
        return weight(c)
    if q == "noisy_input":
        return S.add_noise(x0, eps, abar[t], xi * arg, 0.1)
    if q == "target":
        return S.target(x0, eps + 0.1 * xi if c["ip_in_target"] else eps, abar[t], c["pred"])
    if q == "loss":                          # per-sample MSE over C, H, W → weight → mean over the batch
        mse = (inp[f"loss.model_output.{c['pred']}"] - value("target", c, inp)).pow(2).mean(dim=(1, 2, 3))
        return (weight(c)[t] * mse).mean()
    if q == "sampling_timesteps":
        return S.timesteps(arg, c["spacing"], c["offset"])
    if q == "sampler_step":
        return ddim_rows(c, inp)[1]
    if q == "cfg":
        return S.guidance(inp["cfg.uncond"], inp["cfg.cond"], 7.5, arg if c["cfg_rescale"] else 0.0)
    if q == "ema_update":
        e, p, step = inp["ema.ema"], inp["ema.param"], inp["ema.step"].tolist()
        return torch.stack([ema(c, e[i], p[i], [s]) for i, s in enumerate(step)])
    if q == "ema_update × 1000":
        return ema(c, inp["ema.ema"], inp["ema.param"], range(1, 1001))
    raise ValueError(q)


class Case:
    """One row of `check`: the quantity, the member it calls, the vector it is compared with and its description, the
    formula (a function of the settings), the call, the label of its first dimension, the settings it depends on, the
    draws `drawn` serves during the call, the vector's rows it compares."""

    def __init__(self, quantity, member, name, text, formula, call, label=None, keys=(), draws=None, rows=None):
        self.quantity, self.member, self.name, self.text, self.call = quantity, member, name, text, call
        self.label, self.keys, self.draws = label, set(keys), draws
        self.formula = formula if rows is None else lambda c: formula(c)[rows]


def check_cases(inp, schedule="zt", pred="v", rows_only=True):
    """The rows `check` compares, for a trainer of prediction `pred` on `schedule` (rows_only=False: each sampler
    vector whole, as the vectors file stores it)."""
    x = lambda k: inp[k].clone()
    on, s = ("", "zt") if schedule == "zt" else ("sd15.", "sd15")
    fwd = lambda ip=1: (x("forward.x0"), x("forward.noise"), x("forward.ip_noise") * ip, x("forward.t"))
    draws = lambda ip=1: {"randn": [inp["forward.noise"], inp["forward.ip_noise"] * ip], "randint": [inp["forward.t"]]}
    t, every = ("t", inp["forward.t"]), ("t", torch.arange(S.T))
    f = lambda q, arg=None: lambda c: value(q, c, inp, arg)
    yield Case("alphas_cumprod", "alphas_cumprod", f"{s}.alphas_cumprod", f"ᾱ_t, t = 0..999, of the {s} schedule",
               f("alphas_cumprod"), lambda o: o.alphas_cumprod(), every, {"abar"})
    yield Case("loss_weight", "loss_weight", f"{s}.min_snr_weight.{pred}", f"min-SNR-γ weight, γ = 5, {pred} "
               f"prediction, on {s}.snr (Hang et al. 2023)" + "; 1 (the limit) at SNR = 0" * (pred == "eps"),
               f("loss_weight"), lambda o: o.loss_weight(every[1].clone()), every, {"snr", "weight"})
    for quantity, ip, suffix, what in (("noisy_input", 1, "x_t", "(ε + 0.1·ξ)"),
                                       ("noisy_input, ξ = 0", 0, "x_t_no_ip", "ε (ξ = 0)")):
        yield Case(quantity, "noisy_input", f"forward.{on}{suffix}", f"x_t = √ᾱ·x0 + √(1−ᾱ)·{what} at forward.t on "
                   f"{s}.alphas_cumprod", f("noisy_input", ip), lambda o, ip=ip: o.noisy_input(*fwd(ip)), t,
                   {"abar", "abar_dtype"}, draws(ip))
    yield Case("target", "target", "forward.eps_target" if pred == "eps" else f"forward.{on}v_target",
               "the ε target: the clean ε" if pred == "eps" else f"v = √ᾱ·ε − √(1−ᾱ)·x0 on {s}.alphas_cumprod, clean "
               "ε (Salimans & Ho 2022)", f("target"), lambda o: o.target(*fwd()), t,
               {"abar", "abar_dtype", "ip_in_target"}, draws())
    yield Case("loss", "loss", f"loss.{on}{pred}", f"mean_b w_b·mean_CHW(loss.model_output.{pred} − target)², "
               f"w = {s}.min_snr_weight.{pred} at forward.t", f("loss"),
               lambda o: o.loss(x(f"loss.model_output.{pred}"), *fwd()), None,
               {"abar", "abar_dtype", "ip_in_target", "snr", "weight"}, draws())
    spacing = recipe(schedule)["spacing"]
    for n in N_STEPS:
        yield Case(f"sampling_timesteps({n})", "sampling_timesteps", f"timesteps.{spacing}.{n}", f"the {n} {spacing} "
                   "timesteps" + (" (Lin et al. 2023, Table 2)" if spacing == "trailing" else
                                  ", steps_offset 1 (SD1.5's scheduler config)"),
                   f("sampling_timesteps", n), lambda o, n=n: o.sampling_timesteps(n), None, {"spacing", "offset"})
    dn, dt = inp["ddim.n"], ddim_rows(recipe(schedule, pred), inp)[0]
    step = lambda o, r: torch.as_tensor(o.sampler_step(x("ddim.x_t")[r:r + 1], x("ddim.model_output")[r:r + 1],
                                                       int(dt[r]), int(dn[r])))
    text = (f"DDIM, η = 0, {pred} model on {s}.alphas_cumprod (Song et al. 2021, eq. 12): x_prev = √ᾱ_prev·x̂0 + "
            f"√(1−ᾱ_prev)·ε̂ from ddim.{on}t to the next t of its list, ᾱ_prev = 1 after the last" +
            "; NaN where ᾱ_t = 0 (pitfall 7)" * (pred == "eps"))
    for n in (N_STEPS if rows_only else [None]):    # ε at ᾱ = 0 cannot be sampled (pitfall 7): those rows left out
        rows = [r for r in range(len(dn)) if (n is None or dn[r] == n) and (pred == "v" or SCHEDULES[s][dt[r]] > 0)]
        yield Case(f"sampler_step(N = {n})", "sampler_step", f"ddim.{on}x_prev.{pred}", text, f("sampler_step"),
                   lambda o, rows=rows: torch.cat([step(o, r) for r in rows]), ("t", dt[rows]),
                   {"prev", "sampler_abar", "final_abar"}, rows=rows if rows_only else None)
    for phi in (0.7, 0.0):
        yield Case(f"cfg(7.5, rescale {phi:g})", "cfg", "cfg.out" if phi else "cfg.out_no_rescale",
                   "x_u + 7.5·(x_c − x_u)" + " rescaled with φ = 0.7 (Lin et al. 2023, Alg. 2): std per sample over "
                   "C,H,W, unbiased" * bool(phi), f("cfg", phi),
                   lambda o, phi=phi: o.cfg(x("cfg.uncond"), x("cfg.cond"), 7.5, phi), None,
                   {"cfg_rescale"} if phi else ())
    steps = inp["ema.step"]
    yield Case("ema_update", "ema_update", "ema.out", "e + (1 − d)·(p − e), d = 0.9999 constant from step 1, one "
               "update per row at ema.step", f("ema_update"), lambda o: torch.stack([torch.as_tensor(o.ema_update(
                   x("ema.ema")[i], x("ema.param")[i], 0.9999, int(steps[i]))) for i in range(len(steps))]),
               ("step", steps), {"ema"})

    def thousand(o):                         # what ema_update returns is fed back: the EMA as the trainer stores it
        e = x("ema.ema")
        for k in range(1, 1001):
            e = torch.as_tensor(o.ema_update(e, x("ema.param"), 0.9999, k))
        return e
    yield Case("ema_update × 1000", "ema_update", "ema.out_1000", "ema.ema after 1000 updates towards ema.param at "
               "steps 1 … 1000, d = 0.9999: p + (e − p)·d^1000", f("ema_update × 1000"), thousand, None, {"ema"})


def golden(seed=0):
    """The golden vectors, float64 and seeded: ({name: tensor}, {name: description}). `mistake.<id>.<name>` is the
    value of `name` under known mistake `id`, computed by the same formulas on the same inputs."""
    inp, v, desc = inputs(seed), {}, {}

    def put(name, x, text):
        v[name], desc[name] = torch.as_tensor(x).clone(memory_format=torch.contiguous_format), text

    for s, what in (("sd15", "SD1.5's scaled-linear schedule"),
                    ("zt", "SD1.5's schedule rescaled to zero terminal SNR (Lin et al. 2023, Alg. 1)")):
        put(f"{s}.betas", S.betas(s == "zt"), f"β_t, t = 0..999, of {what}")
        put(f"{s}.snr", S.snr(SCHEDULES[s]), f"SNR_t = ᾱ/(1−ᾱ) of {what}")
        put(f"{s}.min_snr_weight.x0", S.min_snr_weight(S.snr(SCHEDULES[s]), 5.0, "x0"), f"min(SNR, 5) on {s}.snr")
    for n in N_STEPS:
        ts = S.timesteps(n)
        put(f"timesteps.trailing_prev.{n}", torch.tensor([S.prev_timestep(ts, i) for i in range(n)]), "the t_prev of "
            f"each of timesteps.trailing.{n}: the next in the list, −1 (ᾱ_prev = 1) after the last")
        put(f"mistake.prev_t_stride.timesteps.trailing_prev.{n}", (ts - S.T // n).clamp(min=-1),
            f"timesteps.trailing_prev.{n} with mistake prev_t_stride: {MISTAKES['prev_t_stride']}")
    for s, p in itertools.product(("zt", "sd15"), ("v", "eps")):
        correct = recipe(s, p)
        for case in check_cases(inp, s, p, rows_only=False):
            ref = case.formula(correct)
            put(case.name, ref, case.text)
            for id, c in mistakes(p):
                m = case.formula({**correct, **c})
                if not same(m, ref):
                    put(f"mistake.{id}.{case.name}", m, f"{case.name} with mistake {id}: {MISTAKES[id]}")
        put(f"ddim.{'' if s == 'zt' else 'sd15.'}t", ddim_rows(correct, inp)[0], "t of each DDIM row: the first, "
            f"second and last of the N {recipe(s)['spacing']} timesteps")
    for k, x in inp.items():
        put(k, x, {"forward.x0": "clean latents x0 [6, 4, 8, 8]", "forward.noise": "ε ~ N(0, I)", "forward.ip_noise":
                   "ξ ~ N(0, I), the input-perturbation noise (Ning et al. 2023), γ = 0.1", "forward.t": "timestep of "
                   "each sample: 0, 1, 139 (the v weight's peak), 500, 998, 999"}.get(k, f"input {k} of its case"))
    zt, dt = SCHEDULES["zt"], v["ddim.t"]
    dprev = torch.tensor([S.prev_timestep(S.timesteps(n), i) for n, i in zip(inp["ddim.n"].tolist(),
                                                                             inp["ddim.i"].tolist())])
    put("ddim.t_prev", dprev, "the next timestep of that list; −1: ᾱ_prev = 1, the step returns x̂0")
    put("ddim.abar_t", zt[dt], "ᾱ_t, from zt.alphas_cumprod")
    put("ddim.abar_prev", torch.stack([S.abar_at(zt, int(q)) for q in dprev]), "ᾱ_prev, 1 at t_prev = −1")
    put("ddim.x0_hat", S.x0_from_v(inp["ddim.x_t"], inp["ddim.model_output"], zt[dt]), "v model: x̂0 = √ᾱ·x_t − "
        "√(1−ᾱ)·v (Salimans & Ho 2022)")
    put("ddim.eps_hat", S.eps_from_v(inp["ddim.x_t"], inp["ddim.model_output"], zt[dt]), "v model: ε̂ = √(1−ᾱ)·x_t + "
        "√ᾱ·v (Salimans & Ho 2022)")
    return v, desc


def mistakes(pred, k=1):
    """(ids joined by " + ", their settings) of each known mistake, k = 1, or each pair of them, k = 2, that applies
    to `pred`; two compose only if they change different settings."""
    ids = [i for i, (p, _) in FORMULAS.items() if p in (None, pred)]
    for combo in itertools.combinations(ids, k):
        changes = [FORMULAS[i][1] for i in combo]
        if sum(len(c) for c in changes) == len({key for c in changes for key in c}):
            yield " + ".join(combo), {key: x for c in changes for key, x in c.items()}


def same(a, b):
    """Equal, NaN equal to NaN."""
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def tolerances(name, x):
    """{dtype: [rtol, atol]} for comparing a trainer's value of tensor `name` with x: |theirs − x| ≤ atol + rtol·|x|,
    for float64, float32, bfloat16 and float16. Each passes correct code in that dtype and fails every known mistake
    that shows in it (README, Tolerances)."""
    if not x.is_floating_point():
        return {d: [0, 0] for d in ULP}
    f32 = {"betas": [1e-4, 1e-5], "alphas_cumprod": [1e-5, 1e-6], "snr": [1e-4, 1e-6]}   # β: float32 cancellation
    last = name.split(".")[-1]
    # bf16 and fp16: 4 ulps (at 1.0) of the value and absolute; ᾱ and weights 2 ulps of the value, and 1e-7 absolute
    # (fp16 holds ᾱ_998 = 1.97e-7 only as a subnormal, in steps of 6e-8)
    low = {"alphas_cumprod": (2, 0), "min_snr_weight": (2, 0)}.get(last, (4, 4))
    return {"float64": [1e-10, 1e-12], "float32": f32.get(last, [1e-5, 1e-5]),
            **{d: [low[0] * ULP[d], low[1] * ULP[d] or 1e-7] for d in ("bfloat16", "float16")}}


def write_vectors(out, fmt="safetensors", seed=0):
    """Write the golden vectors (float64, seeded) with each tensor's description and tolerances and the known
    mistakes' values, as safetensors or as JSON that any standard library reads. Returns the number of tensors."""
    v, desc = golden(seed)
    meta = {"zd.description": {k: {"dtype": str(x.dtype).removeprefix("torch."), "shape": list(x.shape),
                                   "description": desc[k]} for k, x in v.items()},
            "zd.tolerances": {k: tolerances(k, x) for k, x in v.items()}, "zd.mistakes": MISTAKES, "zd.seed": seed}
    if fmt == "json":                        # tensors as nested lists; NaN (a 0/0 kept on purpose) as null
        tensors = {k: json.loads(json.dumps(x.tolist()).replace("NaN", "null")) for k, x in v.items()}
        with open(out, "w") as f:
            json.dump({"tensors": tensors, **meta}, f, ensure_ascii=False)
    else:
        save_file(v, out, metadata={k: json.dumps(m, ensure_ascii=False) for k, m in meta.items()})
    return len(v)


def schedule_of(obj):
    """("zt" or "sd15", how it was chosen): the schedule a trainer is checked against, recognised from the ᾱ that its
    alphas_cumprod returns (SD1.5's as shipped: sd15; anything else: the recipe's, zt)."""
    if not callable(getattr(obj, "alphas_cumprod", None)):
        return "zt", "the recipe's (the adapter has no alphas_cumprod)"
    try:
        theirs = torch.as_tensor(obj.alphas_cumprod()).detach().cpu()
    except Exception:
        return "zt", "the recipe's (its alphas_cumprod raised)"
    tol = tolerances("sd15.alphas_cumprod", SCHEDULES["sd15"]).get(str(theirs.dtype).removeprefix("torch."))
    if tol and theirs.numel() == S.T and within(SCHEDULES["sd15"], theirs.reshape(-1).double(), tol).all():
        return "sd15", "recognised from its alphas_cumprod"
    return "zt", "the recipe's"


def within(ref, theirs, tol):
    """|theirs − ref| ≤ atol + rtol·|ref| elementwise, NaN equal to NaN only."""
    return ((theirs - ref).abs() <= tol[1] + tol[0] * ref.abs()) | (ref.isnan() & theirs.isnan())


def compare(ref, theirs, tol):
    """(all within tolerance, max |Δ|, max |Δ|/|ref|, flat index of the first element out of tolerance or None), NaN
    equal to NaN only; a NaN on one side only makes max |Δ| NaN."""
    d = (theirs - ref).abs()
    bad = ~within(ref, theirs, tol).flatten()
    d = torch.where(ref.isnan() & theirs.isnan(), 0.0, d)
    rel = (d / ref.abs())[ref != 0]
    first = int(bad.nonzero()[0]) if bad.any() else None
    return first is None, d.max().item(), rel.max().item() if rel.numel() else 0.0, first


def identify(case, correct, theirs, tol, guards):
    """([ids, …], guard) of the known mistakes whose formulas give `theirs` within `tol`, the closest first (several:
    at this tolerance theirs cannot tell them apart), or else of pairs of them; None if none does. Where a mistake's
    value is undefined (NaN) but the correct one is not, a finite value of theirs is a guard: the match holds
    elsewhere, and guard maps each such t to the value theirs put there."""
    ref, seen = case.formula(correct), []
    for k in (1, 2):
        found = []                           # (how close, ids, value, guard)
        for ids, changes in mistakes(correct["pred"], k):
            if not all(case.keys & FORMULAS[i][1].keys() for i in ids.split(" + ")):
                continue                     # a mistake in a setting this quantity does not use
            m = case.formula({**correct, **changes, "guard": guards.get(ids, {})})
            if same(m, ref) or (k == 2 and any(same(m, x) for x in seen)):
                continue                     # it (or the pair's second) does not show in this quantity
            seen.append(m)
            undefined = m.isnan() & ~ref.isnan()
            if within(m, theirs, tol).all():
                found.append((ratio(m, theirs, tol).max().item(), ids, m, {}))
            elif case.label and undefined.any() and theirs[undefined].isfinite().all() and within(
                    m[~undefined], theirs[~undefined], tol).all():
                at = undefined.reshape(len(m), -1).any(1).nonzero().flatten()
                guard = {int(case.label[1][i]): theirs.reshape(len(m), -1)[i][0].item() for i in at}
                found.append((ratio(m[~undefined], theirs[~undefined], tol).max().item(), ids, m, guard))
        if found:
            found.sort(key=lambda f: f[0])
            if found[0][3]:
                guards[found[0][1]] = found[0][3]
            return [f[1] for f in found], found[0][3]
    return None


def ratio(ref, theirs, tol):
    """|theirs − ref| over the tolerance, elementwise: ≤ 1 within it; NaN on one side only: inf."""
    d = torch.where(ref.isnan() & theirs.isnan(), 0.0, (theirs - ref).abs()).nan_to_num(math.inf)
    return torch.where(d == 0, 0.0, d / (tol[1] + tol[0] * ref.abs().nan_to_num(0.0)))


def located(case, index, ref, theirs, tol):
    """The element at flat `index`: its index, its label (t or step), zd's value, theirs, and |Δ| over the tolerance."""
    i = [int(j) for j in torch.unravel_index(torch.tensor(index), ref.shape)]
    z, y = ref[tuple(i)].item(), theirs[tuple(i)].item()
    over = ratio(torch.tensor(z), torch.tensor(y), tol).item()
    return {"index": i, **({case.label[0]: int(case.label[1][i[0]])} if case.label and i else {}), "zd": z,
            "theirs": y, "over_tolerance": over}


def check(obj, seed=0, schedule=None, debug=False):
    """Compare each quantity that `obj` provides of the trainer protocol (README) with the recipe's formulas on
    `schedule` ("zt", "sd15"; None: recognised by `schedule_of`), at the tolerance of the dtype it returns: one row
    each, verdict ok, differs, mistake (a known mistake's formula, alone or with another, maybe guarded), absent (the
    adapter declares the feature absent) or error (debug=True: with the traceback)."""
    inp, schedule = inputs(seed), schedule or schedule_of(obj)[0]
    rows, pred, guards = [], "v", {}
    if hasattr(obj, "prediction"):
        try:
            theirs = obj.prediction() if callable(obj.prediction) else obj.prediction
            assert theirs in ("v", "eps"), f"{theirs!r} is neither 'v' nor 'eps'"
            pred = theirs
            ok = pred == "v" or schedule == "sd15"
            rows.append({"quantity": "prediction", "verdict": "ok" if ok else "differs", "theirs": pred})
        except Exception as e:
            rows.append({"quantity": "prediction", "verdict": "error",
                         "note": f"{type(e).__name__}: {e}; rows below: v"})
            if debug:
                rows[-1]["traceback"] = traceback.format_exc()
        if pred == "eps" and schedule == "zt":
            rows[0]["note"] = "the recipe is v; ε cannot be sampled from t = 999 (pitfall 7). Rows below: ε's formulas"
    absent = {q for m, (off, qs) in ABSENT.items() if hasattr(obj, m) and (getattr(obj, m) is None if off is None else
                                                                          getattr(obj, m) == off) for q in qs}
    correct = recipe(schedule, pred)
    if hasattr(obj, "min_snr_gamma") and obj.min_snr_gamma == 0:
        correct["weight"] = "one"                                   # no min-SNR: every sample weighs 1
    dtypes = {}                              # of each member's last result
    for case in check_cases(inp, schedule, pred):
        if not callable(getattr(obj, case.member, None)):
            continue
        r = {"quantity": case.quantity, "verdict": "differs"}
        rows.append(r)
        if case.quantity in absent:
            r.update(verdict="absent", note="not in this trainer")
            continue
        ref = case.formula(correct)
        try:
            with serving(case.draws):
                theirs = torch.as_tensor(case.call(obj)).detach().cpu()
        except Exception as e:
            r.update(verdict="error", note=f"raised {type(e).__name__}: {e}".splitlines()[0])
            if debug:
                r["traceback"] = traceback.format_exc()
            continue
        r["dtype"] = dtype = dtypes[case.member] = str(theirs.dtype).removeprefix("torch.")
        if case.member == "loss" and ULP.get(dtypes.get("target"), 0) > ULP.get(dtype, 0):
            dtype = dtypes["target"]         # a loss on a bf16 target carries the target's rounding
            r["note"] = f"held to {dtype} tolerances: its target is {dtype}"
        if theirs.numel() != ref.numel():
            r["note"] = f"shape {list(theirs.shape)}; zd's is {list(ref.shape)}"
            continue
        theirs = theirs.reshape(ref.shape).double()
        r["tolerance"] = tol = tolerances(case.name, ref).get(dtype, [0, 0])
        ok, r["max_abs"], r["max_rel"], first = compare(ref, theirs, tol)
        if ok:
            r["verdict"] = "ok"
            continue
        r["worst"] = located(case, int(ratio(ref, theirs, tol).flatten().argmax()), ref, theirs, tol)
        r["first"] = located(case, first, ref, theirs, tol)
        one_sided = ref.isnan() ^ theirs.isnan()
        by_row = lambda x: x.reshape(len(ref), -1).any(1) if ref.dim() else x.reshape(1)   # of the first dimension
        if one_sided.any():
            theirs_nan = by_row(one_sided & theirs.isnan())
            r["nan"] = [{"index": [int(i)], **({case.label[0]: int(case.label[1][i])} if case.label else {}),
                         "side": "theirs" if theirs_nan[i] else "zd"}
                        for i in by_row(one_sided).nonzero().flatten()[:10]]
        found = identify(case, correct, theirs, tol, guards)
        if found:
            r.update(verdict="mistake", mistake=found[0][0], mistakes=found[0][0].split(" + "))
            if found[0][1:]:                 # other mistakes that theirs matches as closely at this tolerance
                r["alternatives"] = found[0][1:]
            if found[1]:
                r["guard"] = [{case.label[0]: t, "theirs": g} for t, g in found[1].items()]
    return rows


_served = []        # the draws of the check call in progress, innermost last (`check` sets them, `drawn` serves them)


@contextlib.contextmanager
def serving(draws):
    """During `check`'s call of a member: what `drawn` hands out (the inputs of that call), instead of the vectors'."""
    _served.append(draws)
    try:
        yield
    finally:
        _served.pop()


@contextlib.contextmanager
def drawn(seed=0):
    """Inside the block a training step's own draws get the case's inputs: torch.randint returns t, and torch.randn
    and torch.randn_like return ε, then ξ (zeros in the "ξ = 0" case): one call each, shapes checked, in the dtype and
    on the device asked for (torch.randn's default dtype: float32). Within a `check` call these are the inputs of that
    call; elsewhere the vectors' forward.t, forward.noise and forward.ip_noise. The draws it cannot serve raise:
    torch.rand, rand_like, randint_like, randperm, normal, multinomial (e.g. indices into a trainer's own timestep
    table), a randint whose range does not hold the t, and a call beyond those three. Yields the vectors' inputs."""
    inp = inputs(seed)
    draws = _served[-1] if _served and _served[-1] else {
        "randn": [inp["forward.noise"], inp["forward.ip_noise"]], "randint": [inp["forward.t"]]}
    queue = {k: list(x) for k, x in draws.items()}
    names = "randint: t; randn, randn_like: ε, then ξ"
    saved = {k: getattr(torch, k) for k in ("randint", "randn", "randn_like", "rand", "rand_like", "randint_like",
                                            "randperm", "normal", "multinomial")}

    def take(kind, shape, dtype, device, default, low=None, high=None):
        held = list(queue[kind][0].shape) if queue[kind] else "nothing more"
        if held != list(shape):
            raise RuntimeError(f"zd.drawn: torch.{kind} asked for shape {list(shape)}; the case holds {held} ({names})")
        x = queue[kind].pop(0)
        if high is not None and not (low <= x.min() and x.max() < high):
            raise RuntimeError(f"zd.drawn: torch.randint({low}, {high}) cannot return the case's t = {x.tolist()}: "
                               "draw t itself as randint(0, 1000, (B,)), or return it as given (the t argument)")
        return x.to(dtype=dtype or default, device=device)

    def refuse(name):
        def refused(*a, **k):
            raise RuntimeError(f"zd.drawn: torch.{name} is a draw zd cannot serve ({names}); return the inputs given "
                               "to the member instead of drawing them")
        return refused

    def randint(*a, dtype=None, device=None, **k):
        bounds = a if "size" in k else a[:-1]                  # randint(high, size) or randint(low, high, size)
        low, high = (0, *bounds) if len(bounds) == 1 else bounds
        return take("randint", k.get("size", a[-1]), dtype, device, torch.int64, low, high)

    size = lambda a, k: k.get("size", a[0] if len(a) == 1 and not isinstance(a[0], int) else a)
    torch.randint = randint
    torch.randn = lambda *a, dtype=None, device=None, **k: take("randn", size(a, k), dtype, device,
                                                                torch.get_default_dtype())
    torch.randn_like = lambda x, dtype=None, device=None, **k: take("randn", x.shape, dtype, device or x.device,
                                                                    x.dtype)
    for name in ("rand", "rand_like", "randint_like", "randperm", "normal", "multinomial"):
        setattr(torch, name, refuse(name))
    try:
        yield inp
    finally:
        for name, f in saved.items():
            setattr(torch, name, f)


TEMPLATE = '''"""An adapter for `python zd.py check my_adapter.py:ZdAdapter`: fill in what your trainer has, delete
the rest.

Every member is optional: `check` runs each one present and skips the others. Inputs arrive as float64 tensors: cast
them to what your trainer computes in and return its own dtype (float32, bfloat16, float16 or float64 results are held
to that dtype's tolerances). Call your trainer's own functions; do not re-derive the math here. A step that draws its
own noise and timesteps runs inside `with check.drawn():` (README, "A trainer that draws its own noise").
"""
import torch

import check  # zd's check.py, for check.drawn(); needs only schedule.py beside it


class ZdAdapter:
    prediction = "v"            # "v" or "eps": which target, weight and sampler formulas apply
    # Declare a feature your trainer does not have (its rows then read "not in this trainer"):
    # ip_noise_gamma = 0        # no input perturbation
    # min_snr_gamma = 0         # no min-SNR weighting: every sample weighs 1
    # cfg_rescale = 0           # the sampler has no CFG rescale
    # ema = None                # no EMA

    def alphas_cumprod(self):
        """The ᾱ your trainer trains with: [1000]. SD1.5's as shipped selects the SD1.5 check (--schedule)."""
        raise NotImplementedError

    def loss_weight(self, t):
        """t: int64 [1000] = 0 … 999. Return the per-sample loss weight [1000] (min-SNR γ = 5)."""
        raise NotImplementedError

    def noisy_input(self, x0, noise, ip_noise, t):
        """x0, noise (ε), ip_noise (ξ): [6, 4, 8, 8]; t: int64 [6] = 0, 1, 139, 500, 998, 999. Return the model input
        x_t [6, 4, 8, 8] with input perturbation γ = 0.1 on ξ (ξ is zeros in the "ξ = 0" case)."""
        raise NotImplementedError

    def target(self, x0, noise, ip_noise, t):
        """As noisy_input. Return the training target [6, 4, 8, 8]."""
        raise NotImplementedError

    def loss(self, model_output, x0, noise, ip_noise, t):
        """model_output [6, 4, 8, 8], the rest as noisy_input. Return the scalar loss as your step reduces it."""
        raise NotImplementedError

    def sampling_timesteps(self, n):
        """n: 10, 13, 25 or 50. Return the n timesteps at which your sampler calls the model, int [n]."""
        raise NotImplementedError

    def sampler_step(self, x_t, model_output, t, n):
        """x_t, model_output: [1, 4, 8, 8]; t: int, one of sampling_timesteps(n). Return x_prev [1, 4, 8, 8] after one
        deterministic (η = 0) step; your sampler picks the next timestep."""
        raise NotImplementedError

    def cfg(self, uncond, cond, scale, rescale):
        """uncond, cond: [2, 4, 8, 8] model outputs; scale 7.5; rescale 0.7 or 0. Return the guided output."""
        raise NotImplementedError

    def ema_update(self, ema, param, decay, step):
        """ema, param: one weight tensor each (what this returns is passed back as ema); decay 0.9999; step: the
        optimiser step, 1 = the first. Return the EMA after one update, in the dtype your trainer stores it."""
        raise NotImplementedError
'''


def table(spec, obj, rows, schedule, how):
    """check()'s rows as the table `zd.py check` prints for the adapter `obj` given as `spec`: a header with the
    schedule and how it was chosen, a line per row (verdict, largest errors, tolerance) and under it the worst and first
    differences, guard values, one-sided NaNs, notes and tracebacks; then the members not provided and what each named
    mistake does."""
    lines = []
    say = lines.append
    what = "zero terminal SNR (the recipe)" if schedule == "zt" else "SD1.5's own, as shipped"
    say(f"{spec}: {sum(r['verdict'] in ('ok', 'absent') for r in rows)} of {len(rows)} quantities ok; schedule "
        f"{what}: {how}")
    if schedule == "sd15":
        say(textwrap.fill(ZT_WOULD_CHANGE, 120, initial_indent="  ", subsequent_indent="    "))
    say(f"  {'quantity':<23} {'dtype':<8} {'max |Δ|':>8} {'max rel':>8}  {'rtol, atol':<14} verdict")
    for r in rows:
        num = lambda k: f"{r[k]:8.1e}" if k in r else " " * 8
        over = lambda x: f"{x:.2f}" if x < 10 else f"{x:.3g}"
        tol = "{:.2g}, {:.2g}".format(*r["tolerance"]) if "tolerance" in r else ""
        verdict = {"mistake": f"matches known mistake{'s' * (len(r.get('mistakes', [])) > 1)} {r.get('mistake')}",
                   "absent": "not in this trainer"}.get(r["verdict"], r["verdict"])
        verdict += "".join(f" (or {a})" for a in r.get("alternatives", []))
        say(f"  {r['quantity']:<23} {r.get('dtype', ''):<8} {num('max_abs')} {num('max_rel')}  {tol:<14} "
            + verdict + (f" ({r['theirs']})" if "theirs" in r else ""))
        for g in r.get("guard", []):
            label = next(f"{k} = {x}" for k, x in g.items() if k != "theirs")
            say(f"  {'':<23} guarded: theirs {g['theirs']:.7g} at {label}, where the mistake's formula is 0/0")
        for key in ("worst", "first") if r.get("first") else ():
            f = r[key]
            at = (f" at {f['index']}" if f["index"] else "") + "".join(f", {k} = {f[k]}" for k in ("t", "step")
                                                                       if k in f)
            say(f"  {'':<23} {key} difference{at}: zd {f['zd']:.7g}, theirs {f['theirs']:.7g}"
                + (f" ({over(f['over_tolerance'])}× the tolerance)" if any(r["tolerance"]) else ""))
            if r["worst"]["index"] == r["first"]["index"]:
                break
        if r.get("nan"):
            say(f"  {'':<23} NaN on one side only: " + ", ".join(
                f"{n['side']} at " + next((f"{k} = {n[k]}" for k in ("t", "step") if k in n), str(n["index"]))
                for n in r["nan"]))
        if r.get("note"):
            say(f"  {'':<23} {r['note']}")
        if r.get("traceback"):
            say(textwrap.indent(r["traceback"].rstrip(), "  " + " " * 24))
    say("  not provided: " + (", ".join(m for m in PROTOCOL if not hasattr(obj, m)) or "—"))
    for id in dict.fromkeys(i for r in rows for i in r.get("mistakes", [])):
        say(textwrap.fill(f"{id}: {MISTAKES[id]}", 120, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(lines)


def finite(x):
    """x with every NaN and infinity replaced by None, so that json.dumps writes strict JSON (null)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(y) for k, y in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(y) for y in x]
    return x
