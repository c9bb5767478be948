"""zd — a from-scratch reference implementation of the ZeroDiffusion recipe: Stable Diffusion 1.5 fine-tuned into a
v-prediction, zero-terminal-SNR model.

    python zd.py --help            the subcommands, one line each
    python zd.py COMMAND --help    the flags of one

Each subcommand is a plain function taking the parsed arguments, so a notebook can call it too.
"""
import argparse

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
