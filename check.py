"""check — zd's conformance engine: the golden vectors of the recipe's math (right, and under each known mistake),
their tolerances, and the comparison of another trainer's values with them, quantity by quantity.

    python zd.py vectors           the vectors as a file (safetensors or JSON)
    python zd.py check mytrainer.py:Adapter

It imports only schedule.py (and torch, safetensors), so a trainer author reads it alone and imports it in a test suite
without the rest of zd. What a trainer's adapter provides, and how to read a verdict: README, "Check your trainer".
"""
import contextlib
import json
import math

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
    "it is 0/0 = NaN, which makes the batch's loss and gradients NaN.",
    "eps_weight_nan_at_zero_snr": "the ε weight min(SNR, γ)/SNR evaluated at SNR = 0 (pitfall 2): 0/0 = NaN at "
    "t = 999 on a zero-terminal-SNR schedule, so one such sample makes the batch's loss and all gradients NaN. The "
    "weight's limit there is 1.",
    "ip_noise_in_target": "input-perturbation noise added to the target as well as the input (pitfall 4): Ning et al. "
    "(2023) build the target from the clean ε; perturbing both is plain noise augmentation and undoes the "
    "exposure-bias correction IP is for.",
    "prev_t_stride": "DDIM steps from t to t − 1000//N, not to the next timestep of the list (pitfall 6): when N does "
    "not divide 1000 steps land one off (N = 13: 999 → 923, not 922) and the last can land on t = 0 (N = 13: 76 → 0) "
    "instead of returning x̂0 (ᾱ_prev = 1), so the sampler leaves the trailing schedule it was given.",
    "leading_spacing_on_zt": "leading spacing i·(1000//N) + 1, SD1.5's default, on a zero-terminal-SNR model (pitfall "
    "6; Lin et al. 2023, §3.3 and Table 2): sampling never starts at t = 999, so the model is handed pure noise at a "
    "timestep where it expects some signal, which gives up what the rescale is for.",
    "sd15_abar_in_zt_sampler": "the sampler uses SD1.5's ᾱ instead of the trained, rescaled one (pitfall 9): at "
    "t = 999 it reads pure noise as holding √ᾱ = 6.8% of the image, and at every t it mixes x̂0 and ε̂ with the "
    "coefficients of a schedule the model was not trained on.",
    "ema_warmup": "EMA warm-up, decay 0 at the first update and (1 + s)/(10 + s) at the s-th after it (pitfall 5): the "
    "first update replaces the EMA's initialisation (SD1.5's EMA weights) by the current weights, and the decay stays "
    "below 0.9999 for 90,000 updates, so the EMA averages far fewer steps than the recipe's.",
}
N_STEPS = (10, 13, 25, 50)        # sampling step counts of the vectors: 13 does not divide 1000, the others do
PROTOCOL = ("prediction", "alphas_cumprod", "loss_weight", "noisy_input", "target", "loss", "sampling_timesteps",
            "sampler_step", "cfg", "ema_update")      # what `check` asks of a trainer, each member optional (README)


def golden(seed=0):
    """The golden vectors, float64 and seeded: ({name: tensor}, {name: description}). `mistake.<id>.<name>` is the
    value of `name` under known mistake `id`, computed on the same inputs."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64)
    v, desc = {}, {}

    def put(name, x, text):
        v[name], desc[name] = torch.as_tensor(x).clone(memory_format=torch.contiguous_format), text

    bad = lambda id, name, x: put(f"mistake.{id}.{name}", x, f"{name} with mistake {id}: {MISTAKES[id]}")

    sched = {"sd15": S.alphas_cumprod(S.sd15_betas()), "zt": S.alphas_cumprod(S.betas())}
    for s, what in (("sd15", "SD1.5's scaled-linear schedule"),
                    ("zt", "SD1.5's schedule rescaled to zero terminal SNR (Lin et al. 2023, Alg. 1)")):
        put(f"{s}.betas", S.betas(s == "zt"), f"β_t, t = 0..999, of {what}")
        put(f"{s}.alphas_cumprod", sched[s], f"ᾱ_t of {what}")
        put(f"{s}.snr", S.snr(sched[s]), f"SNR_t = ᾱ/(1−ᾱ) of {what}")
        for p in ("v", "eps", "x0"):
            put(f"{s}.min_snr_weight.{p}", S.min_snr_weight(S.snr(sched[s]), 5.0, p), f"min-SNR-γ weight, γ = 5, {p} "
                f"prediction, on {s}.snr (Hang et al. 2023)" + "; 1 (the limit) at SNR = 0" * (p == "eps"))
    zt, snr = sched["zt"], S.snr(sched["zt"])
    for p in ("v", "eps"):
        bad("snr_before_rescale", f"zt.min_snr_weight.{p}", S.min_snr_weight(S.snr(sched["sd15"]), 5.0, p))
    bad("min_snr_plus_one", "zt.min_snr_weight.v", (snr + 1).clamp(max=5.0) / (snr + 1))
    bad("eps_weight_on_v", "zt.min_snr_weight.v", snr.clamp(max=5.0) / snr)                  # 0/0 = NaN at t = 999
    bad("eps_weight_nan_at_zero_snr", "zt.min_snr_weight.eps", snr.clamp(max=5.0) / snr)
    for n in N_STEPS:
        ts = S.timesteps(n)
        put(f"timesteps.trailing.{n}", ts, f"the {n} trailing timesteps (Lin et al. 2023, Table 2)")
        put(f"timesteps.trailing_prev.{n}", torch.tensor([S.prev_timestep(ts, i) for i in range(n)]), "the t_prev of "
            f"each of timesteps.trailing.{n}: the next in the list, −1 (ᾱ_prev = 1) after the last")
        bad("leading_spacing_on_zt", f"timesteps.trailing.{n}", S.timesteps(n, "leading"))    # offset 1
        bad("prev_t_stride", f"timesteps.trailing_prev.{n}", (ts - S.T // n).clamp(min=-1))

    t, x0, eps, xi = torch.tensor([0, 1, 139, 500, 998, 999]), rand(6, 4, 8, 8), rand(6, 4, 8, 8), rand(6, 4, 8, 8)
    put("forward.x0", x0, "clean latents x0 [6, 4, 8, 8]")
    put("forward.noise", eps, "ε ~ N(0, I)")
    put("forward.eps_target", eps, "the ε-prediction target: the clean ε")
    put("forward.ip_noise", xi, "ξ ~ N(0, I), the input-perturbation noise (Ning et al. 2023), γ = 0.1")
    put("forward.t", t, "timestep of each sample: 0, 1, 139 (the v weight's peak), 500, 998, 999")
    for s, pre in (("zt", "forward."), ("sd15", "forward.sd15.")):
        a = sched[s][t]
        put(pre + "x_t", S.add_noise(x0, eps, a, xi, 0.1), f"x_t = √ᾱ·x0 + √(1−ᾱ)·(ε + 0.1·ξ) on {s}.alphas_cumprod")
        put(pre + "x_t_no_ip", S.add_noise(x0, eps, a), f"x_t = √ᾱ·x0 + √(1−ᾱ)·ε on {s}.alphas_cumprod (ξ = 0)")
        put(pre + "v_target", S.v_target(x0, eps, a), f"v = √ᾱ·ε − √(1−ᾱ)·x0 on {s}.alphas_cumprod, clean ε "
            "(Salimans & Ho 2022)")
    bad("ip_noise_in_target", "forward.v_target", S.v_target(x0, eps + 0.1 * xi, zt[t]))
    bad("ip_noise_in_target", "forward.eps_target", eps + 0.1 * xi)

    s = torch.arange(1.0, 7.0, dtype=torch.float64).view(-1, 1, 1, 1)
    for p in ("v", "eps"):
        tgt, w = v[f"forward.{p}_target"], v[f"zt.min_snr_weight.{p}"]
        out = tgt - s * xi
        loss = lambda tgt, w: (w[t] * (out - tgt).pow(2).mean(dim=(1, 2, 3))).mean()   # MSE → weight → batch mean
        put(f"loss.model_output.{p}", out, f"{p} model output of the loss case: forward.{p}_target − s·ξ, "
            "s = 1..6 by sample, so that weight mistakes cannot cancel across the batch and ξ in a target always shows")
        put(f"loss.{p}", loss(tgt, w), f"mean_b w_b·mean_CHW(loss.model_output.{p} − "
            f"forward.{p}_target)², w = zt.min_snr_weight.{p} at forward.t")
        for k in [k for k in v if k.startswith("mistake.") and k.endswith((f".{p}_target", f"min_snr_weight.{p}"))]:
            bad(k.split(".")[1], f"loss.{p}", loss(v[k], w) if "target" in k else loss(tgt, v[k]))

    uncond, cond = rand(2, 4, 8, 8), rand(2, 4, 8, 8)
    put("cfg.uncond", uncond, "unconditional model output (v)")
    put("cfg.cond", cond, "conditional model output (v)")
    put("cfg.out", S.guidance(uncond, cond, 7.5, 0.7), "x_u + 7.5·(x_c − x_u) rescaled with φ = 0.7 (Lin et al. 2023, "
        "Alg. 2): std per sample over C,H,W, unbiased")
    put("cfg.out_no_rescale", S.guidance(uncond, cond, 7.5), "x_u + 7.5·(x_c − x_u)")

    rows = [(n, i) for n in N_STEPS for i in (0, 1, n - 1)]     # each N's first step (t = 999), second and last
    dn, dt = torch.tensor([n for n, _ in rows]), torch.tensor([S.timesteps(n)[i] for n, i in rows])
    dprev = torch.tensor([S.prev_timestep(S.timesteps(n), i) for n, i in rows])
    x_t, m = rand(len(rows), 4, 8, 8), rand(len(rows), 4, 8, 8)
    put("ddim.n", dn, "N, the number of sampling steps, of each row")
    put("ddim.t", dt, "t of each row: the first, second and last of timesteps.trailing.N")
    put("ddim.t_prev", dprev, "the next timestep of that list; −1: ᾱ_prev = 1, the step returns x̂0")
    put("ddim.abar_t", zt[dt], "ᾱ_t, from zt.alphas_cumprod")
    put("ddim.abar_prev", torch.stack([S.abar_at(zt, int(q)) for q in dprev]), "ᾱ_prev, 1 at t_prev = −1")
    put("ddim.x_t", x_t, "x_t of each row")
    put("ddim.model_output", m, "model output of each row: v for a v model, ε for an ε model")
    put("ddim.x0_hat", S.x0_from_v(x_t, m, zt[dt]), "v model: x̂0 = √ᾱ·x_t − √(1−ᾱ)·v (Salimans & Ho 2022)")
    put("ddim.eps_hat", S.eps_from_v(x_t, m, zt[dt]), "v model: ε̂ = √(1−ᾱ)·x_t + √ᾱ·v (Salimans & Ho 2022)")

    def ddim(abar, prev, p):            # rows at t = 999 stay NaN for ε: it cannot be sampled at ᾱ = 0 (pitfall 7)
        k, x = (dt >= 0) if p == "v" else (dt < S.T - 1), torch.full_like(x_t, math.nan)
        x[k] = S.ddim_step(x_t[k], m[k], abar[dt[k]], torch.stack([S.abar_at(abar, int(q)) for q in prev[k]]), p)
        return x

    for p in ("v", "eps"):
        put(f"ddim.x_prev.{p}", ddim(zt, dprev, p), f"DDIM, η = 0, {p} model on zt.alphas_cumprod (Song et al. 2021, "
            "eq. 12): x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂" + "; NaN at t = 999 (pitfall 7)" * (p == "eps"))
        bad("prev_t_stride", f"ddim.x_prev.{p}", ddim(zt, dt - S.T // dn, p))
        bad("sd15_abar_in_zt_sampler", f"ddim.x_prev.{p}", ddim(sched["sd15"], dprev, p))

    e, prm, step = rand(2, 64), rand(2, 64), torch.tensor([1, 10])
    put("ema.ema", e, "the EMA before the update, one per row")
    put("ema.param", prm, "the weights after the optimiser step, one per row")
    put("ema.step", step, "the optimiser step of each row's update, 1 = the first; decay 0.9999")
    put("ema.out", e + (1 - 0.9999) * (prm - e), "e + (1 − d)·(p − e), d = 0.9999 constant from step 1")
    d = torch.where(step == 1, 0.0, (step / (step + 9.0)).clamp(max=0.9999)).double()[:, None]
    bad("ema_warmup", "ema.out", e + (1 - d) * (prm - e))
    return v, desc


def tolerances(name, x):
    """{"float64": [rtol, atol], "float32": [rtol, atol]} for comparing a trainer's value of tensor `name` with x:
    |theirs − x| ≤ atol + rtol·|x|. float32's pass correct float32 code and fail every known mistake (README)."""
    if not x.is_floating_point():
        return {"float64": [0, 0], "float32": [0, 0]}
    f32 = {"betas": [1e-4, 1e-5], "alphas_cumprod": [1e-5, 1e-6], "snr": [1e-4, 1e-6]}   # β: float32 cancellation
    return {"float64": [1e-10, 1e-12], "float32": f32.get(name.split(".")[-1], [1e-5, 1e-5])}


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


def check_cases(v, pred):
    """(row, member, reference name, its rows or None, call, (label, value per row) or None): what `check` asks."""
    x = lambda k: v[k].clone()
    fwd = lambda ip=1: (x("forward.x0"), x("forward.noise"), x("forward.ip_noise") * ip, x("forward.t"))
    t, every = ("t", v["forward.t"]), ("t", torch.arange(S.T))
    yield "alphas_cumprod", "alphas_cumprod", "zt.alphas_cumprod", None, lambda o: o.alphas_cumprod(), every
    yield "loss_weight", "loss_weight", f"zt.min_snr_weight.{pred}", None, lambda o: o.loss_weight(every[1]), every
    yield "noisy_input", "noisy_input", "forward.x_t", None, lambda o: o.noisy_input(*fwd()), t
    yield "noisy_input, ξ = 0", "noisy_input", "forward.x_t_no_ip", None, lambda o: o.noisy_input(*fwd(0)), t
    yield "target", "target", f"forward.{pred}_target", None, lambda o: o.target(*fwd()), t
    yield "loss", "loss", f"loss.{pred}", None, lambda o: o.loss(x(f"loss.model_output.{pred}"), *fwd()), None
    for n in N_STEPS:
        yield (f"sampling_timesteps({n})", "sampling_timesteps", f"timesteps.trailing.{n}", None,
               lambda o, n=n: o.sampling_timesteps(n), None)
    dn, dt = v["ddim.n"], v["ddim.t"]
    step = lambda o, r: torch.as_tensor(o.sampler_step(x("ddim.x_t")[r:r + 1], x("ddim.model_output")[r:r + 1],
                                                       int(dt[r]), int(dn[r])))
    for n in N_STEPS:
        rows = [r for r in range(len(dn)) if dn[r] == n and (pred == "v" or dt[r] < S.T - 1)]   # ε at ᾱ = 0: pitfall 7
        yield (f"sampler_step(N = {n})", "sampler_step", f"ddim.x_prev.{pred}", rows,
               lambda o, rows=rows: torch.cat([step(o, r) for r in rows]), ("t", dt[rows]))
    for phi in (0.7, 0.0):
        yield (f"cfg(7.5, rescale {phi:g})", "cfg", "cfg.out" if phi else "cfg.out_no_rescale", None,
               lambda o, phi=phi: o.cfg(x("cfg.uncond"), x("cfg.cond"), 7.5, phi), None)
    s = v["ema.step"]
    yield "ema_update", "ema_update", "ema.out", None, lambda o: torch.stack([torch.as_tensor(o.ema_update(
        x("ema.ema")[i], x("ema.param")[i], 0.9999, int(s[i]))) for i in range(len(s))]), ("step", s)


def compare(ref, theirs, tol):
    """(all within tolerance, max |Δ|, max |Δ|/|ref|, flat index of the first element out of tolerance or None), for
    |theirs − ref| ≤ atol + rtol·|ref| elementwise, NaN equal to NaN only."""
    d = (theirs - ref).abs()
    both_nan = ref.isnan() & theirs.isnan()
    bad = (~((d <= tol[1] + tol[0] * ref.abs()) | both_nan)).flatten()
    d = torch.where(both_nan, 0.0, d)
    rel = (d / ref.abs())[ref != 0]
    first = int(bad.nonzero()[0]) if bad.any() else None
    return first is None, d.max().item(), rel.max().item() if rel.numel() else 0.0, first


def check(obj, seed=0):
    """Compare each quantity that `obj` provides of the trainer protocol (README) with the golden vectors, at the
    tolerance of the dtype it returns: one row each, verdict ok, differs, mistake (a known mistake's value) or error."""
    v, _ = golden(seed)
    rows, pred = [], "v"
    if hasattr(obj, "prediction"):
        try:
            theirs = obj.prediction() if callable(obj.prediction) else obj.prediction
            assert theirs in ("v", "eps"), f"{theirs!r} is neither 'v' nor 'eps'"
            pred = theirs
            rows.append({"quantity": "prediction", "verdict": "ok" if pred == "v" else "differs", "theirs": pred})
        except Exception as e:
            rows.append({"quantity": "prediction", "verdict": "error", "note": f"{type(e).__name__}: {e}; rows below: v"})
        if pred == "eps":
            rows[0]["note"] = "the recipe is v; ε cannot be sampled from t = 999 (pitfall 7). Rows below: ε's formulas"
    for quantity, member, name, sel, call, labels in check_cases(v, pred):
        if not callable(getattr(obj, member, None)):
            continue
        r = {"quantity": quantity, "verdict": "differs"}
        rows.append(r)
        ref = (v[name] if sel is None else v[name][sel]).double()
        try:
            theirs = torch.as_tensor(call(obj)).detach().cpu()
        except Exception as e:
            r.update(verdict="error", note=f"raised {type(e).__name__}: {e}".splitlines()[0])
            continue
        r["dtype"] = str(theirs.dtype).removeprefix("torch.")
        if theirs.numel() != ref.numel():
            r["note"] = f"shape {list(theirs.shape)}; zd's is {list(ref.shape)}"
            continue
        theirs = theirs.reshape(ref.shape).double()
        r["tolerance"] = tol = tolerances(name, v[name])["float64" if r["dtype"] == "float64" else "float32"]
        ok, r["max_abs"], r["max_rel"], first = compare(ref, theirs, tol)
        if ok:
            r["verdict"] = "ok"
            continue
        i = [int(j) for j in torch.unravel_index(torch.tensor(first), ref.shape)]
        r["first"] = {"index": i, **({labels[0]: int(labels[1][i[0]])} if labels else {}), "zd": ref[tuple(i)].item(),
                      "theirs": theirs[tuple(i)].item()}
        for k in [k for k in v if k.startswith("mistake.") and k.endswith("." + name)]:
            m = (v[k] if sel is None else v[k][sel]).double()   # a known mistake: differs from zd, theirs matches it
            if not compare(ref, m, [0, 0])[0] and compare(m, theirs, tol)[0]:
                r.update(verdict="mistake", mistake=k.split(".")[1])
                break
    return rows


@contextlib.contextmanager
def drawn(seed=0):
    """Inside the block torch.randint returns the vectors' forward.t, and torch.randn and torch.randn_like return
    forward.noise (ε), then forward.ip_noise (ξ): one call each, shapes checked, in the dtype and on the device asked
    for (torch.randn's default dtype: float32). Yields the vectors."""
    v, _ = golden(seed)
    queue = {"randint": [v["forward.t"]], "randn": [v["forward.noise"], v["forward.ip_noise"]]}
    saved = torch.randint, torch.randn, torch.randn_like

    def take(kind, shape, dtype, device, default):
        held = list(queue[kind][0].shape) if queue[kind] else "nothing more"
        if held != list(shape):
            raise RuntimeError(f"zd.drawn: torch.{kind} asked for shape {list(shape)}; the vectors hold {held} "
                               "(randint: forward.t; randn, randn_like: forward.noise, then forward.ip_noise)")
        return queue[kind].pop(0).to(dtype=dtype or default, device=device)

    size = lambda a, k: k.get("size", a[0] if len(a) == 1 and not isinstance(a[0], int) else a)
    torch.randint = lambda *a, dtype=None, device=None, **k: take("randint", k.get("size", a[-1]), dtype, device,
                                                                  torch.int64)
    torch.randn = lambda *a, dtype=None, device=None, **k: take("randn", size(a, k), dtype, device,
                                                                torch.get_default_dtype())
    torch.randn_like = lambda x, dtype=None, device=None, **k: take("randn", x.shape, dtype, device or x.device,
                                                                    x.dtype)
    try:
        yield v
    finally:
        torch.randint, torch.randn, torch.randn_like = saved
