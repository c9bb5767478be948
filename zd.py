"""zd — a from-scratch reference implementation of the ZeroDiffusion recipe: Stable Diffusion 1.5 fine-tuned into a
v-prediction, zero-terminal-SNR model.

    python zd.py --help            the subcommands, one line each
    python zd.py COMMAND --help    the flags of one

Each subcommand is a plain function taking the parsed arguments, so a notebook can call it too.
"""
import argparse
import json

import torch

import schedule as S


# ---------------------------------------------------------------------------------------------------------------------
# zd.py schedule / zd.py vectors: the diffusion math, as a table to read and as golden vectors to compare against

def schedule(args):
    """Print the noise schedule as a table to check against the papers (or all 1000 rows as CSV)."""
    b = S.betas(zero_terminal_snr=not args.no_zt)
    abar = S.alphas_cumprod(b)
    snr = S.snr(abar)
    w = S.min_snr_weight(snr, args.gamma, "v")
    ts = S.timesteps(args.steps, args.spacing, args.offset)
    cols = ("t", "beta", "abar", "sqrt_abar", "sqrt_1m_abar", "snr", "min_snr_v_weight")
    rows = [(t, b[t].item(), abar[t].item(), abar[t].sqrt().item(), (1 - abar[t]).sqrt().item(), snr[t].item(),
             w[t].item()) for t in range(S.T)]
    if args.csv:
        print(",".join(cols + ("sampled",)))
        for r in rows:
            print(",".join([str(r[0])] + [repr(x) for x in r[1:]] + [str(int(r[0] in ts))]))
        return
    name = "SD1.5 scaled-linear" if args.no_zt else "SD1.5 scaled-linear, zero terminal SNR (Lin et al. 2023, Alg. 1)"
    print(f"schedule: {name}; min-SNR γ = {args.gamma:g} (v weight = min(SNR, γ)/(SNR + 1))")
    print(f"sampling: {args.steps} steps, {args.spacing} spacing: {ts.tolist()}")
    shown = range(S.T) if args.all else sorted({0, S.T - 1, *ts.tolist()})
    print(f"{'t':>4}  {'β':>11}  {'ᾱ':>11}  {'√ᾱ':>11}  {'√(1−ᾱ)':>11}  {'SNR':>11}  {'w_v':>11}")
    for t in shown:
        mark = " *" if t in ts else ""
        print(f"{rows[t][0]:>4}  " + "  ".join(f"{x:11.5g}" for x in rows[t][1:]) + mark)
    if not args.all:
        print("(* = a sampling step; --all prints every t, --csv all rows machine-readable)")


def vectors(args):
    """Write golden test vectors (float64 schedule math, seeded cases) to a safetensors file, described in its metadata."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(args.seed)
    sd15 = S.alphas_cumprod(S.sd15_betas())
    zt_b = S.betas()
    zt = S.alphas_cumprod(zt_b)
    snr = S.snr(zt)
    v, desc = {}, {}

    def put(name, tensor, text):
        v[name], desc[name] = tensor.contiguous(), text

    put("sd15.betas", S.sd15_betas(), "SD1.5 scaled-linear β_t, t = 0..999")
    put("sd15.alphas_cumprod", sd15, "SD1.5 ᾱ_t before the rescale")
    put("sd15.snr", S.snr(sd15), "SD1.5 SNR_t = ᾱ/(1−ᾱ) before the rescale (not for ZT loss weights)")
    put("zt.betas", zt_b, "β_t after the zero-terminal-SNR rescale (Lin et al. 2023, Alg. 1); β_999 = 1")
    put("zt.alphas_cumprod", zt, "ᾱ_t after the rescale; ᾱ_999 = 0 exactly")
    put("zt.snr", snr, "SNR_t of the rescaled schedule; SNR_999 = 0")
    for pred in ("v", "eps", "x0"):
        put(f"zt.min_snr_weight.{pred}", S.min_snr_weight(snr, 5.0, pred),
            f"min-SNR-γ weight, γ = 5, {pred} prediction, on zt.snr (Hang et al. 2023)"
            + ("; SNR = 0 gives the limit 1" if pred == "eps" else ""))
    for n in (10, 13, 25, 50):
        put(f"timesteps.trailing.{n}", S.timesteps(n, "trailing"), f"{n} trailing timesteps (Lin et al. 2023, Table 2)")
    for n in (25, 50):
        put(f"timesteps.leading.{n}", S.timesteps(n, "leading", 1), f"{n} leading timesteps, offset 1 (SD1.5 default)")
        put(f"timesteps.linspace.{n}", S.timesteps(n, "linspace"), f"{n} linspace timesteps")

    t = torch.tensor([0, 1, 139, 500, 998, 999])
    x0 = torch.randn(len(t), 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xi = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    put("forward.x0", x0, "clean latents, float64 [6,4,8,8]")
    put("forward.noise", noise, "ε ~ N(0, I)")
    put("forward.ip_noise", xi, "ξ ~ N(0, I), the input-perturbation noise (Ning et al. 2023)")
    put("forward.t", t, "timestep per sample (includes 0, 500, 998, 999)")
    put("forward.x_t", S.add_noise(x0, noise, zt[t], xi, 0.1),
        "x_t = √ᾱ·x0 + √(1−ᾱ)·(ε + 0.1·ξ) on zt.alphas_cumprod (IP γ = 0.1 on the input only)")
    put("forward.v_target", S.v_target(x0, noise, zt[t]), "v = √ᾱ·ε − √(1−ᾱ)·x0 from the clean ε (no ξ)")

    uncond = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(uncond.shape, generator=g, dtype=torch.float64)
    put("cfg.uncond", uncond, "unconditional model output (v)")
    put("cfg.cond", cond, "conditional model output (v)")
    put("cfg.out", S.cfg(uncond, cond, 7.5, 0.7),
        "CFG w = 7.5 with rescale φ = 0.7 (Lin et al. 2023, Alg. 2), std per sample over C,H,W (unbiased)")

    ts = S.timesteps(13)
    idx = [0, 1, 6, 12]
    dt = ts[idx]
    dprev = torch.tensor([S.prev_timestep(ts, i) for i in idx])
    x_t = torch.randn(len(idx), 4, 8, 8, generator=g, dtype=torch.float64)
    model_v = torch.randn(x_t.shape, generator=g, dtype=torch.float64)
    abar_prev = torch.stack([S.abar_at(zt, int(p)) for p in dprev])
    put("ddim.x_t", x_t, "DDIM inputs x_t, one per row")
    put("ddim.model_v", model_v, "v-prediction model output for each row")
    put("ddim.t", dt, "timestep of each row, from the 13-step trailing list (starts at 999)")
    put("ddim.t_prev", dprev, "the next timestep in that list; −1 means ᾱ_prev = 1 (the step returns x̂0)")
    put("ddim.x_prev", S.ddim_step(x_t, model_v, zt[dt], abar_prev, "v"),
        "DDIM η = 0 on zt.alphas_cumprod: x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂")

    meta = {"zd.description": json.dumps({k: {"dtype": str(x.dtype).removeprefix("torch."), "shape": list(x.shape),
                                              "description": desc[k]} for k, x in v.items()}, ensure_ascii=False),
            "zd.seed": str(args.seed)}
    save_file(v, args.out, metadata=meta)
    print(f"wrote {len(v)} tensors to {args.out} (descriptions in the header's zd.description)")


import model


def markers_for(args, meta):
    """The prediction/ZTSNR markers to write: flags win, else what the input declared, else SD1.5's (ε, no ZT)."""
    prediction = args.prediction or meta["prediction"] or "eps"
    ztsnr = args.ztsnr if args.ztsnr is not None else bool(meta["ztsnr"])
    return prediction, ztsnr


def convert(args):
    """Any SD1.5-family checkpoint (single file or diffusers folder) → an LDM single file SD front-ends load."""
    sd = model.load(args.input, vae_path=args.vae, ema=args.ema)
    unet = sd.unet
    if args.inpaint:
        if unet.cfg.in_channels != 4:
            raise SystemExit(f"--inpaint needs a 4-channel UNet, {args.input} has {unet.cfg.in_channels}")
        unet = model.expand_to_inpaint(unet)
    prediction, ztsnr = markers_for(args, sd.meta)
    model.save(args.output, unet, sd.text_encoder, sd.vae, half=args.half, prediction=prediction, ztsnr=ztsnr)
    print(f"wrote {args.output} ({'fp16' if args.half else 'fp32'}, {unet.cfg.in_channels}-channel UNet, "
          f"prediction {prediction}, ztsnr {ztsnr})")


def merge(args):
    """Add difference: A + α·(B − C) on every tensor, e.g. inpaint + (tuned − base) to start a ZD inpainting model
    from a base finetune. Takes the markers of B (the finetune) unless flags say otherwise. Holds three models."""
    a, b, c = (model.load(p) for p in (args.a, args.b, args.c))
    for name in ("unet", "vae", "text_encoder"):
        if getattr(a, name) is not None:
            nets = [getattr(m, name).state_dict() for m in (a, b, c)]
            getattr(a, name).load_state_dict(model.add_difference(*nets, alpha=args.alpha))
    prediction, ztsnr = markers_for(args, b.meta)
    model.save(args.output, a.unet, a.text_encoder, a.vae, half=args.half, prediction=prediction, ztsnr=ztsnr,
               extra_metadata={"zd.merge": f"{args.a} + {args.alpha} * ({args.b} - {args.c})"})
    print(f"wrote {args.output}: A + {args.alpha}·(B − C), prediction {prediction}, ztsnr {ztsnr}")


def inspect(args):
    """What a checkpoint is, from its header alone: layout, variant, EMA, markers, dtypes, sizes, ignored keys."""
    try:
        sd = model.load(args.path, device="meta", verbose=False)
    except ValueError as e:
        raise SystemExit(f"{args.path}: not an SD1.5-family checkpoint zd can load: {e}")
    m = sd.meta
    unmarked = " (unmarked: SD front-ends will sample it as ε-prediction)" if m["prediction"] is None else ""
    row = lambda label, text: print(f"  {label:<13}{text}")
    print(args.path)
    row("layout", f"{m['layout']}, {'inpainting (9-channel UNet)' if m['inpaint'] else 'base'}"
                  f"{', pixel space (no VAE)' if m['pixel_space'] else ''}")
    row("EMA", "model_ema.* present, loaded by default" if m["ema_present"] else "no model_ema.* (one UNet)")
    row("markers", f"prediction {m['prediction']}, ztsnr {m['ztsnr']}{unmarked}")
    row("dtypes", ", ".join(m["dtypes"]))
    for name in ("unet", "vae", "text_encoder"):
        net = getattr(sd, name)
        if net is not None:
            params = sum(p.numel() for p in net.parameters())
            row(name, f"{m['counts'][name]} tensors, {params:,} parameters, {net.cfg}")
    row("ignored", f"{len(m['ignored'])} keys" + (": " + model.listing(m["ignored"]) if m["ignored"] else ""))
    for k, v in sorted(m["metadata"].items()):
        row("metadata", f"{k} = {v if len(v) <= 100 else v[:100] + '…'}")

def add_marker_flags(s):
    s.add_argument("--prediction", choices=["v", "eps"], help="mark the output as this (default: from the input)")
    s.add_argument("--ztsnr", action=argparse.BooleanOptionalAction, default=None,
                   help="mark the output as zero-terminal-SNR or not (default: from the input)")
    s.add_argument("--half", action="store_true", help="store fp16 tensors")


def main(argv=None):
    p = argparse.ArgumentParser(prog="zd.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("schedule", help="print the noise schedule (β, ᾱ, SNR, loss weights) and the sampling timesteps",
                       description=schedule.__doc__)
    s.add_argument("--steps", type=int, default=10, help="number of sampling steps (default 10)")
    s.add_argument("--spacing", choices=("trailing", "leading", "linspace"), default="trailing",
                   help="sampling timestep spacing (default trailing, Lin et al. 2023 Table 2)")
    s.add_argument("--offset", type=int, default=1, help="steps_offset of leading spacing (default 1, as SD1.5)")
    s.add_argument("--no-zt", action="store_true", help="SD1.5's schedule as is, without the zero-terminal-SNR rescale")
    s.add_argument("--gamma", type=float, default=5.0, help="min-SNR γ for the weight column (default 5)")
    s.add_argument("--all", action="store_true", help="print all 1000 timesteps")
    s.add_argument("--csv", action="store_true", help="all 1000 rows as CSV, full precision")
    s.set_defaults(func=schedule)

    s = sub.add_parser("vectors", help="write golden test vectors to check another trainer's math against",
                       description=vectors.__doc__)
    s.add_argument("--out", default="zd_vectors.safetensors", help="output file (default zd_vectors.safetensors)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random cases (default 0)")
    s.set_defaults(func=vectors)

    s = sub.add_parser("convert", help="any SD1.5-family checkpoint → an LDM single .safetensors file")
    s.add_argument("input", help="single .safetensors file or diffusers folder")
    s.add_argument("output", help="output .safetensors (a sidecar .yaml is written beside it)")
    s.add_argument("--vae", help="take the VAE from this .safetensors file")
    ema = s.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None, help="require and take model_ema.*")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="take the raw UNet of a file with EMA")
    s.add_argument("--inpaint", action="store_true", help="make a 9-channel inpainting UNet (new channels zero)")
    add_marker_flags(s)
    s.set_defaults(func=convert)

    s = sub.add_parser("merge", help="add difference: A + α·(B − C), e.g. inpaint + (tuned − base)")
    s.add_argument("a", help="model to add to (e.g. SD1.5 inpainting)")
    s.add_argument("b", help="finetuned model (e.g. a ZD finetune)")
    s.add_argument("c", help="what B was finetuned from (e.g. SD1.5)")
    s.add_argument("output", help="output .safetensors")
    s.add_argument("--alpha", type=float, default=1.0, help="scale of the difference (default 1)")
    add_marker_flags(s)
    s.set_defaults(func=merge)

    s = sub.add_parser("inspect", help="what a checkpoint is: layout, variant, EMA, markers, dtypes, sizes")
    s.add_argument("path", help="single .safetensors file or diffusers folder")
    s.set_defaults(func=inspect)

    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
