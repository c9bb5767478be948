"""zd — a from-scratch reference implementation of the ZeroDiffusion recipe: Stable Diffusion 1.5 fine-tuned into a
v-prediction, zero-terminal-SNR model.

    python zd.py --help            the subcommands, one line each
    python zd.py COMMAND --help    the flags of one

Each subcommand is a plain function taking the parsed arguments, so a notebook can call it too.
"""
import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# OpenMP threads that busy-wait at every barrier collapse when the cores are shared (measured on a 2-core host with one
# other busy process: 9.7 s per demo training step with the default policy, 0.5 s with PASSIVE). It must be set before
# torch loads OpenMP; an OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import data  # noqa: E402
import model  # noqa: E402
import schedule as S  # noqa: E402


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
    """Write golden test vectors (float64 schedule math, seeded cases) to a safetensors file, each tensor described
    in its metadata."""
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


# ---------------------------------------------------------------------------------------------------------------------
# zd.py sample: DDIM (η = 0) on trailing timesteps with CFG rescale — the sampler a zero-terminal-SNR v model needs

def sampling_schedule(meta, prediction=None, zero_terminal_snr=None):
    """(prediction, zero_terminal_snr) to sample with: the arguments when given, else the checkpoint's markers, else
    SD1.5's own (ε on the scaled-linear schedule), saying so. ε on the zero-terminal-SNR schedule is refused: its
    first step would divide by √ᾱ_999 = 0 (SPEC §7.7)."""
    pred = prediction or meta.get("prediction")
    zt = zero_terminal_snr if zero_terminal_snr is not None else meta.get("ztsnr")
    if pred is None or zt is None:                        # unmarked: what SD1.5 itself is
        pred, zt = pred or "eps", bool(zt)
        print(f"note: the checkpoint is not fully marked; assuming {'ε' if pred == 'eps' else 'v'} prediction on the "
              f"{'zero-terminal-SNR' if zt else 'SD1.5'} schedule. Override with --prediction v|eps, "
              "--schedule zt|sd15.")
    if pred not in ("v", "eps"):
        raise ValueError(f"unknown prediction type {pred!r}: use 'v' or 'eps'")
    if pred == "eps" and zt:
        raise ValueError("ε-prediction cannot be sampled on the zero-terminal-SNR schedule: x̂0 = (x_t − √(1−ᾱ)·ε)/√ᾱ "
                         "divides by √ᾱ_999 = 0. A model trained with ZT is a v model (--prediction v); a stock SD1.5 "
                         "checkpoint is ε on its own schedule (--schedule sd15).")
    return pred, zt


def load_image(image, width, height):
    """A path, PIL image or tensor → [1, 3, H, W] in [−1, 1]; PIL images resized with Lanczos, as diffusers does."""
    if isinstance(image, torch.Tensor):
        return image.reshape(-1, 3, *image.shape[-2:]).float()
    img = Image.open(image) if isinstance(image, (str, os.PathLike)) else image
    img = img.convert("RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1


def load_mask(mask, width, height):
    """A path, PIL image or tensor → [1, 1, H, W] of 0/1, 1 = repaint (white), binarised at 0.5 like diffusers."""
    if isinstance(mask, torch.Tensor):
        m = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    else:
        img = (Image.open(mask) if isinstance(mask, (str, os.PathLike)) else mask).convert("L")
        if img.size != (width, height):
            img = img.resize((width, height), Image.LANCZOS)
        m = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255)[None, None]
    return (m >= 0.5).float()


def on(module, x):
    """x on a network's device and in its dtype (fp16/bf16 weights); the sampler's own state stays float32."""
    p = next(module.parameters())
    return x.to(p.device, p.dtype)


def encode_prompts(sd, prompts, device):
    """CLIP embeddings [B, 77, C] of the prompts, warning when a prompt is cut to its first 75 tokens."""
    for p in prompts:
        n = sd.tokenizer.count(p)
        if n > 75:
            print(f"warning: prompt truncated to 75 CLIP tokens (it has {n}): {p[:60]!r}…", file=sys.stderr)
    ids = sd.tokenizer(prompts).to(next(sd.text_encoder.parameters()).device)
    return sd.text_encoder(ids).float().to(device)


@torch.no_grad()
def encode_pixels(sd, pixels, xi):
    """latent = VAE_SCALE·z, z = mean + exp(logvar/2)·ξ a posterior *sample* (Rombach et al. 2022, §3; SPEC §3),
    in float32 whatever the VAE's dtype. Pixel-space models (the demo) take the pixels as they are."""
    if sd.vae is None:
        return pixels
    mean, logvar = sd.vae.encode(pixels)
    return model.VAE_SCALE * (mean.float() + (0.5 * logvar.float()).exp() * xi)


def encode_image(sd, image, generator):
    """The latent of an image in [−1, 1] for sampling: `encode_pixels` with ξ drawn from the sampling generator, as
    diffusers' pipelines draw it (retrieve_latents, sample_mode="sample"). Pixel-space models: the image itself."""
    if sd.vae is None:
        return image
    xi = torch.randn((len(image), sd.vae.cfg.z_channels, *(s // 8 for s in image.shape[-2:])), generator=generator)
    vae_device = next(sd.vae.parameters()).device
    return encode_pixels(sd, on(sd.vae, image), xi.to(vae_device)).to(image.device)


def decode_latents(sd, latents):
    """Latents → uint8 [N, H, W, 3], one image at a time (bounded memory), rounded like diffusers' image processor:
    round(clamp(x/2 + 1/2, 0, 1)·255)."""
    images = []
    for z in latents.split(1):
        if sd.vae is not None:
            z = sd.vae.decode(on(sd.vae, z / model.VAE_SCALE))
        images.append(((z.float().cpu() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(images).permute(0, 2, 3, 1).contiguous()


@torch.no_grad()
def generate(sd, prompts, *, negative="", steps=25, cfg=7.5, rescale=0.7, seed=0, width=512, height=512,
             prediction=None, zero_terminal_snr=None, image=None, mask=None, strength=None,
             device=None, dtype=None, progress=True):
    """Images for a list of prompts (one image each; repeat a prompt for several), uint8 [N, H, W, 3].

    DDIM, η = 0 (Song et al. 2021), on N trailing timesteps starting at t = 999 (Lin et al. 2023, Table 2), with
    classifier-free guidance `cfg` rescaled by φ = `rescale` (Lin et al. 2023, Alg. 2), on the schedule and
    parameterisation the checkpoint is marked with (`sampling_schedule`).
    The initial noise is the first draw of the seed's generator, exactly
        torch.randn((N, C, H/8, W/8), generator=torch.Generator("cpu").manual_seed(seed))   # float32, then moved
    (C = 4; pixel-space models: the UNet's output channels at H×W), as diffusers' pipelines draw it with the same
    generator.
    `image` (path, PIL or [1, 3, H, W] in [−1, 1]): img2img for a base model, starting `strength` (default 0.8) of the
    way up the step list as diffusers' img2img does; the inpainting input for a 9-channel model with `mask`
    (white = repaint; default strength 1.0). Posterior samples of the VAE are drawn from the same generator after
    the noise, as diffusers' inpainting pipeline does (its img2img pipeline draws the image's sample first, so img2img
    runs agree with it in the step list and the formula, not in the draw). `sd`'s modules are used on their own
    device and dtype; `device`/`dtype` move them there first."""
    pred, zt = sampling_schedule(sd.meta, prediction, zero_terminal_snr)
    if device is not None or dtype is not None:
        for m in (sd.unet, sd.vae, sd.text_encoder):
            if m is not None:
                m.to(device=device, dtype=dtype)
    device = next(sd.unet.parameters()).device
    inpaint = bool(sd.meta.get("inpaint"))
    f = 1 if sd.vae is None else 8
    if width % (8 * f) or height % (8 * f):
        raise ValueError(f"width and height must be multiples of {8 * f} (the UNet halves the latent three times)")
    if inpaint and (image is None or mask is None):
        raise ValueError("an inpainting model needs an image and a mask (white = repaint)")
    if mask is not None and not inpaint:
        raise ValueError("a mask needs an inpainting (9-channel UNet) model; a base model takes --image alone "
                         "(img2img)")
    strength = (1.0 if inpaint else 0.8) if strength is None else strength
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    n = len(prompts)

    abar = S.alphas_cumprod(S.betas(zt))                  # float64; ᾱ is looked up per step, never held in fp16
    ts = S.timesteps(steps, "trailing")
    if image is not None:                                 # diffusers' img2img/inpaint get_timesteps: skip the first
        ts = ts[steps - min(int(steps * strength), steps):]   # N − ⌊N·strength⌋ steps of the list
        if len(ts) == 0:
            raise ValueError(f"strength {strength} leaves no step of {steps}")

    generator = torch.Generator("cpu").manual_seed(seed)
    channels = 4 if sd.vae is not None else sd.unet.cfg.out_channels    # pixel space: x_t is the image itself
    noise = torch.randn((n, channels, height // f, width // f), generator=generator).to(device)
    guided = cfg > 1                                      # as diffusers: guidance ≤ 1 runs the conditional pass alone
    context = encode_prompts(sd, (negatives if guided else []) + prompts, device)    # [uncond; cond]
    x = noise
    if image is not None:
        image = load_image(image, width, height).to(device)
        if inpaint:
            m = load_mask(mask, width, height).to(device)
            masked = encode_image(sd, image * (m < 0.5), generator)          # SPEC §3: image·(mask < 0.5)
            known = torch.cat([F.interpolate(m, size=noise.shape[-2:]), masked], dim=1).expand(n, -1, -1, -1)
        if not inpaint or strength < 1:
            # the image noised to the first step's ᾱ, x_t = √ᾱ·x0 + √(1−ᾱ)·ε (Ho et al. 2020, eq. 4); an inpainting
            # model at strength 1 starts from pure noise, as diffusers' inpainting pipeline does
            x = S.add_noise(encode_image(sd, image, generator).expand_as(noise), noise, abar[ts[0]])

    start = time.time()
    for i, t in enumerate(ts.tolist()):
        x_in = torch.cat([x, known], dim=1) if inpaint else x       # [x_t (4), mask (1), masked latent (4)]
        x_in = torch.cat([x_in, x_in]) if guided else x_in
        out = sd.unet(on(sd.unet, x_in), torch.full((len(x_in),), t, device=device), on(sd.unet, context)).float()
        if guided:
            out = S.cfg(*out.chunk(2), cfg, rescale)                     # on the raw model output (v or ε)
        x = S.ddim_step(x, out, abar[t], S.abar_at(abar, S.prev_timestep(ts, i)), pred)
        if progress:
            print(f"\rsampling: step {i + 1}/{len(ts)}  t={t:3d}  {time.time() - start:5.1f}s", end="", file=sys.stderr,
                  flush=True)
    if progress:
        print(file=sys.stderr)
    return decode_latents(sd, x)


def save_png(images, out, cols=None):
    """Write uint8 [N, H, W, 3] images: to `out` itself when it ends in .png and N = 1; otherwise one PNG per image
    (out/000.png … in a folder, or out-000.png … beside a .png path) plus a grid (out/grid.png or the .png path).
    Returns the paths written."""
    arrays = [im.cpu().numpy() for im in images]
    if out.lower().endswith(".png") and len(arrays) == 1:
        paths = [out]
    elif out.lower().endswith(".png"):
        paths = [f"{out[:-4]}-{i:03d}.png" for i in range(len(arrays))]
    else:
        paths = [os.path.join(out, f"{i:03d}.png") for i in range(len(arrays))]
    os.makedirs(os.path.dirname(paths[0]) or ".", exist_ok=True)
    for a, path in zip(arrays, paths):
        Image.fromarray(a).save(path)
    if len(arrays) > 1:
        cols = cols or math.ceil(math.sqrt(len(arrays)))
        rows = math.ceil(len(arrays) / cols)
        h, w = arrays[0].shape[:2]
        grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
        for i, a in enumerate(arrays):
            grid[i // cols * h:(i // cols + 1) * h, i % cols * w:(i % cols + 1) * w] = a
        paths.append(out if out.lower().endswith(".png") else os.path.join(out, "grid.png"))
        Image.fromarray(grid).save(paths[-1])
    return paths


def sample(args):
    """Sample PNGs from a checkpoint: trailing DDIM (η = 0) with CFG rescale, on the schedule and parameterisation the
    checkpoint is marked with (or --prediction/--schedule). --seed S draws the initial latent exactly as
    torch.randn((n, 4, H/8, W/8), generator=torch.Generator("cpu").manual_seed(S)) in float32, then moves it to the
    device, as diffusers does with generator=torch.Generator("cpu").manual_seed(S): a run reproduces the other's."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype or (
        "fp16" if device.startswith("cuda") else "fp32")]
    sd = model.load(args.model, vae_path=args.vae, ema=False if args.raw else None, dtype=dtype, device=device)
    width, height = args.width, args.height
    if args.image and not (width and height):
        w, h = Image.open(args.image).size
        width, height = width or w // 64 * 64, height or h // 64 * 64
    default = 512 if sd.vae is not None else DEMO["sample_size"][0]        # zd's pixel-space demo trains at 16²
    cfg = args.cfg if args.cfg is not None else 7.5 if sd.vae is not None else DEMO_CFG
    images = generate(sd, [args.prompt] * args.n, negative=args.negative, steps=args.steps, cfg=cfg,
                      rescale=args.rescale, seed=args.seed, width=width or default, height=height or default,
                      prediction=args.prediction,
                      zero_terminal_snr=None if args.schedule is None else args.schedule == "zt",
                      image=args.image, mask=args.mask, strength=args.strength)
    for path in save_png(images, args.out, cols=min(args.n, 4)):
        print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------------------------
# zd.py train: the ZeroDiffusion recipe (SPEC §1) as one flat loop, nanoGPT-style. The math is schedule.py's; this
# section decides what goes in (frozen CLIP and VAE encodings, per-sample noise) and keeps the optimiser, EMA and files.

# Every train setting, with the recipe's value where SPEC §1 gives one. RECIPE and DEMO fill what differs between a
# fine-tune of SD1.5 (--model) and the from-scratch demo (no --model).
TRAIN_DEFAULTS = dict(
    model=None, vae=None, ema_init=None, data=None, out=None, inpaint=False,
    prediction="v", schedule="zt", min_snr_gamma=5.0, ip_noise_gamma=0.1, caption_dropout=0.1, ema_decay=None,
    min_side=1024, bucket_area=None, bucket_min=None, bucket_max=None, bucket_step=None, flip=False,
    random_crop=False, steps=None, batch_size=None, grad_accum=1, lr=None, lr_schedule="constant", warmup=None,
    weight_decay=0.01, max_grad_norm=1.0, seed=0, save_every=None, sample_every=None, sample_prompts=None,
    sample_size=None, log_every=None, resume=False, max_bad_steps=5, text_cache=None, half=False, workers=2,
    device=None, precision="bf16", grad_checkpointing=False)
# SPEC §1 gives no optimiser numbers: lr 1e-5 with a 500-step warm-up is a common SD1.5 fine-tuning choice, not the
# model card's; set --lr, --batch-size and --grad-accum for your hardware.
RECIPE = dict(out="runs/zd", steps=10000, batch_size=4, lr=1e-5, warmup=500, ema_decay=0.9999, log_every=10,
              save_every=1000, sample_every=500, text_cache=0, sample_size=[512, 512], bucket_area=512 * 512,
              bucket_min=384, bucket_max=640, bucket_step=64,
              sample_prompts=["a photograph of an astronaut riding a horse", "a plain black image",
                              "a plain white image", "a red apple on a wooden table"])
# The demo trains from scratch: a larger LR, and an EMA whose horizon 1/(1 − d) = 50 steps is short next to the run
# (at 0.9999 the EMA of a few thousand steps would still be mostly random init). A caption decides an image's colours
# only at the noisiest timesteps, where the min-SNR v weight is ≈ ᾱ (< 0.003 for t > 900): the demo's images are
# 16×16 px, whose colours stay hidden in the noise down to lower t than at 24×24, and whose steps cost less than half
# as much; in equal time, 2000 steps at 16² left about half the colour error of 1000 steps at 24² (16×32, 24×24,
# 32×16). The demo's images (aspects 2:3 to 3:2) all go to the one bucket, resized to cover it and centre-cropped.
# 1500 steps of batch 32 take 4 minutes on two idle CPU cores and draw every prompt below right (README, The demo).
# The vocabulary, as its sample grid shows it and demo_score measures it: the six plain colours, and six shapes on
# backgrounds in which every colour is once the shape's and once the background's.
DEMO_PROMPTS = ["a plain black image", "a plain white image", "a plain red image", "a plain green image",
                "a plain blue image", "a plain yellow image", "a red circle on a black background",
                "a blue square on a white background", "a yellow circle on a blue background",
                "a white square on a green background", "a green circle on a red background",
                "a black square on a yellow background"]
DEMO = dict(data=["demo"], out="runs/demo", steps=1500, batch_size=32, lr=1e-3, warmup=20, ema_decay=0.98,
            log_every=10, save_every=500, sample_every=500, text_cache=1024, sample_size=[16, 16],
            bucket_area=16 * 16, bucket_min=16, bucket_max=16, bucket_step=8, sample_prompts=DEMO_PROMPTS)
# The demo samples with guidance 3: at 7.5 the small model's colours overshoot (green at 200 where the data has 160).
DEMO_CFG = 3.0
DEMO_UNET = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(2,), context_dim=64)
# What a resumed run may change; everything else comes from its train_state.json.
RESUME_MAY_CHANGE = ("steps", "save_every", "sample_every", "log_every", "workers", "device", "max_bad_steps", "resume")
TRAIN_HELP = """Fine-tune Stable Diffusion 1.5 with the ZeroDiffusion recipe (SPEC §1): v-prediction on SD1.5's
schedule rescaled to zero terminal SNR, min-SNR-γ loss weights, input-perturbation noise, aspect buckets of ≈512²,
caption dropout to "", a constant EMA initialised from the checkpoint's EMA, CLIP and the VAE frozen; AdamW, warm-up.

    python zd.py train --model v1-5-pruned-emaonly.safetensors --data /data/laion-1024 --out runs/zd
    torchrun --nproc_per_node 8 zd.py train --model ... --data '/data/shards/*.tar' ...

With no --model it runs the built-in demo on the CPU in minutes: a small UNet trained from scratch in *pixel space*
(no VAE; 16×16 px procedural images of plain colours and shapes), a tiny frozen random CLIP encoding the captions,
through the same recipe code. It writes runs/demo/model_ema.safetensors:
    python zd.py sample --model runs/demo/model_ema.safetensors --prompt "a plain white image"
At the end it prints how many of its captions it draws right (demo_score). `python zd.py demo` trains it again with
SD1.5's schedule and ε and compares how black and white each gets."""
T_BINS = 10  # the loss is also logged per timestep bin of 100 (as minRF does), to see where the model is still wrong


def demo_model(seed=0, prediction="v", ztsnr=True, inpaint=False):
    """A small model from scratch for the demo, in **pixel space**: no VAE, the UNet denoises 3-channel images
    (7 with inpainting: [x_t, mask, masked image]). A tiny CLIP with random weights, frozen, turns each caption into
    a distinct embedding; the UNet learns what they mean."""
    torch.manual_seed(seed)
    unet = model.UNet(model.UNetConfig(in_channels=7 if inpaint else 3, out_channels=3, **DEMO_UNET))
    text_encoder = model.CLIPTextModel(model.CLIPConfig.tiny())
    # Position embeddings at 0.3 of the token embeddings' scale (both N(0, 1) by default): a colour word then gets
    # nearly the same embedding wherever it stands (cosine 0.9 between "red" in "a plain red image" and in "a blue
    # circle on a red background"; 0.5 at equal scales) and two colours nearly orthogonal ones (cosine 0.0 between
    # "red" and "blue" in the same place; 0.4), so what the UNet learns of a colour in one caption serves the others;
    # the smaller position part still tells a shape's colour from its background's.
    with torch.no_grad():
        text_encoder.embeddings.position_embedding.weight.mul_(0.3)
    meta = dict(prediction=prediction, ztsnr=ztsnr, inpaint=inpaint, pixel_space=True, ema=False)
    return model.SD(unet, None, text_encoder, model.Tokenizer.default(), meta)


def get_lr(step, lr, warmup, steps, schedule="constant"):
    """Linear warm-up over `warmup` steps, then constant, or a cosine to 0 at `steps` (Loshchilov & Hutter 2017)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def sample_noise(seed, micro_step, index, shape, inpaint=False):
    """Per-sample randomness: t ~ U{0..999}, ε, the IP noise ξ and the VAE posterior's noise (a second one for the
    masked image), from a CPU generator seeded by (seed, micro-step, the sample's global index). A sample gets the same
    draws whichever rank holds it and whatever batch surrounds it, so results do not depend on the number of ranks."""
    t, draws = [], []
    for i in index.tolist():
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, micro_step, i]).generate_state(1)[0]))
        t.append(torch.randint(0, S.T, (), generator=g))
        draws.append(torch.randn((4 if inpaint else 3, *shape), generator=g))
    draws = torch.stack(draws)                                   # [B, 3 or 4, *shape]
    return torch.stack(t), draws[:, 0], draws[:, 1], draws[:, 2], draws[:, 3] if inpaint else None


def recipe_inputs(x0, noise, ip_noise, t, abar, snr, prediction="v", min_snr_gamma=5.0, ip_noise_gamma=0.1):
    """The UNet input, target and loss weight of the recipe for clean latents x0 at timesteps t [B]:
    x_t with IP noise on the input alone (Ning et al. 2023, eq. 9), the target from the clean ε (SPEC §7.4), and
    min-SNR-γ weights from the SNR of the schedule trained on, rescaled for ZT (Hang et al. 2023; SPEC §7.1); γ = 0
    weighs every sample 1. `zd.py bench` times the same step."""
    x_t = S.add_noise(x0, noise, abar[t], ip_noise, ip_noise_gamma)
    target = S.target(x0, noise, abar[t], prediction)
    weight = S.min_snr_weight(snr[t], min_snr_gamma, prediction) if min_snr_gamma else torch.ones_like(snr[t])
    return x_t, target, weight.float()


def to_device(x, device):
    """A CPU tensor on the device without a host sync: a copy from pageable memory waits for the GPU, one from pinned
    memory does not."""
    if device.type == "cuda" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


@torch.no_grad()
def encode_captions(sd, captions, cache, limit):
    """CLIP embeddings [B, 77, C] from the frozen text encoder (fp32); dropped captions are "" and encoded too. With a
    cache (limit > 0) each new caption is encoded alone and kept, so an embedding never depends on the batch it first
    appeared in (which keeps resumed runs bit-identical)."""
    device = next(sd.text_encoder.parameters()).device
    if not limit:
        return sd.text_encoder(to_device(sd.tokenizer(captions), device))
    rows = []
    for c in captions:
        e = cache.get(c)
        if e is None:
            e = sd.text_encoder(to_device(sd.tokenizer([c]), device))[0]
            if len(cache) < limit:
                cache[c] = e
        rows.append(e)
    return torch.stack(rows)


def init_distributed(device=None):
    """(rank, world size, device) from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on GPUs, gloo on
    CPUs. A plain `python zd.py train` is rank 0 of 1."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    device = torch.device(device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def save_state(out, step, position, unet, ema, opt, counters, args):
    """What a resume needs, as safetensors (tensors) + JSON (step, data position, counters, the run's settings); never
    pickle. Optimiser state is flattened by parameter index: opt.{i}.exp_avg, opt.{i}.exp_avg_sq, opt.{i}.step.
    There is no generator state to keep: every draw of the loop comes from generators seeded by (seed, step, sample
    index) (sample_noise here, data.sample_rng for dropout, crops and masks): step and position are the whole of it."""
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for i, s in opt.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in s.items()})
    settings = {k: v for k, v in vars(args).items() if k in TRAIN_DEFAULTS}
    model.atomic_write(Path(out, "train_state.safetensors"),
                 lambda p: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, p,
                                     metadata={"step": str(step)}))
    meta = dict(step=step, position=position, counters=counters, args=settings)
    model.atomic_write(Path(out, "train_state.json"), lambda p: Path(p).write_text(json.dumps(meta, indent=1)))


def load_state(out, unet, ema, opt):
    """Restore what save_state wrote into the UNet, EMA and optimiser; returns the JSON part."""
    meta = json.loads(open(os.path.join(out, "train_state.json")).read())
    path = os.path.join(out, "train_state.safetensors")
    with safe_open(path, "pt") as f:
        if f.metadata()["step"] != str(meta["step"]):
            raise RuntimeError(f"{path} is from step {f.metadata()['step']} but train_state.json from {meta['step']}: "
                               "the run stopped while saving")
    tensors = load_file(path)
    unet.load_state_dict({k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")})
    ema.load_state_dict({k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")})
    opt_state = opt.state_dict()
    opt_state["state"] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".")
            opt_state["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(opt_state)
    return meta


def save_models(out, step, unet, ema, sd, args):
    """model.safetensors (the trained weights) and model_ema.safetensors: single files marked with the prediction type
    and schedule, with sidecar yamls (model.save), as SD1.5 tools load them."""
    for name, net in (("model", unet), ("model_ema", ema)):
        model.save(os.path.join(out, f"{name}.safetensors"), net, sd.text_encoder, sd.vae, half=args.half,
                   prediction=args.prediction, ztsnr=args.schedule == "zt",
                   extra_metadata={"zd.train.step": str(step), "zd.train.weights": "ema" if net is ema else "raw"})


def sample_grid(out, step, ema, sd, args):
    """EMA samples of the fixed prompts, four seeds each (out/samples/step_NNNNNN/grid.png, one row per prompt)."""
    w, h = args.sample_size
    ema_sd = model.SD(ema, sd.vae, sd.text_encoder, sd.tokenizer,
                      dict(sd.meta, prediction=args.prediction, ztsnr=args.schedule == "zt"))
    images = generate(ema_sd, [p for p in args.sample_prompts for _ in range(4)], steps=25, seed=0, width=w,
                      height=h, cfg=7.5 if sd.vae is not None else DEMO_CFG, progress=False)
    save_png(images, os.path.join(out, "samples", f"step_{step:06d}"), cols=4)


def resolve_args(args):
    """Fill the unset settings: with --resume from the run's train_state.json, then the recipe's with --model or the
    demo's without. Any object with some of TRAIN_DEFAULTS' names as attributes will do (a notebook's Namespace)."""
    for k, v in TRAIN_DEFAULTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.resume:
        out = args.out or (RECIPE if args.model else DEMO)["out"]
        saved = json.loads(open(os.path.join(out, "train_state.json")).read())["args"]
        ignored = {k: getattr(args, k) for k, v in saved.items() if k not in RESUME_MAY_CHANGE
                   and getattr(args, k) not in (None, TRAIN_DEFAULTS[k], v)}
        if ignored:
            print(f"train: --resume continues the run's own settings; ignoring {ignored}")
        for k, v in saved.items():
            if k not in RESUME_MAY_CHANGE or getattr(args, k) is None:
                setattr(args, k, v)
    for k, v in (RECIPE if args.model else DEMO).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not args.data:
        raise SystemExit("train: --model needs --data (an image folder or tar shards; repeatable)")
    return args


def train(args):
    """Fine-tune SD1.5's UNet with the ZeroDiffusion recipe (SPEC §1): v-prediction on the zero-terminal-SNR schedule,
    min-SNR-γ weights, IP noise, caption dropout, AdamW, EMA, with CLIP and the VAE frozen. Without --model: the demo,
    a small pixel-space model from scratch on procedural images. Returns the trained UNet and its EMA."""
    args = resolve_args(args)
    rank, world, device = init_distributed(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # the frozen fp32 VAE/CLIP
    os.makedirs(args.out, exist_ok=True)
    log = print if rank == 0 else (lambda *a, **k: None)

    # ---- networks: the UNet trains, CLIP and the VAE are frozen; UNet and EMA start from the same (EMA) weights
    if args.model:
        sd = model.load(args.model, vae_path=args.vae)
        if args.ema_init:
            init = model.load(args.ema_init)
            sd.unet.load_state_dict(init.unet.state_dict())
            sd.meta["ema"] = init.meta["ema"]
        source = {"ema": "model_ema.* weights", None: "weights (an EMA-only file holds the EMA)"}[sd.meta.get("ema")]
        log(f"train: UNet and EMA start from {args.ema_init or args.model}'s {source}")
        if sd.meta.get("inpaint") and not args.inpaint:
            log("train: the checkpoint is a 9-channel inpainting UNet: training it as one (--inpaint)")
            args.inpaint = True
        if args.inpaint and sd.unet.cfg.in_channels == 4:
            sd.unet = model.expand_to_inpaint(sd.unet)
    else:
        sd = demo_model(args.seed, args.prediction, args.schedule == "zt", args.inpaint)
        log("train: demo — a small pixel-space UNet (no VAE) trained from scratch on procedural images; a tiny "
            "frozen CLIP with random weights encodes the captions")
    unet = sd.unet.to(device).train().requires_grad_(True)
    unet.gradient_checkpointing = args.grad_checkpointing
    for frozen in (sd.text_encoder, sd.vae):
        if frozen is not None:
            frozen.to(device).eval().requires_grad_(False)
    if cuda:
        unet.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(unet).eval()
    net = unet
    if world > 1:  # gradients averaged over ranks in backward (DDP); `unet` stays the module we step, save and EMA
        net = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)

    # ---- fresh, or the saved run's weights, EMA, optimiser, step and data position
    step, position, counters = 0, -1, dict(skipped=0)
    if args.resume:
        state = load_state(args.out, unet, ema, opt)
        step, position, counters = state["step"], state["position"], state["counters"]
        log(f"train: resumed {args.out} at step {step}, data position {position + 1}")
    elif rank == 0 and os.path.exists(os.path.join(args.out, "train_state.json")):
        log(f"train: {args.out} holds an earlier run: starting over (--resume continues it)")
        Path(args.out, "metrics.jsonl").unlink(missing_ok=True)

    abar = S.alphas_cumprod(S.betas(args.schedule == "zt")).to(device)   # float64, never fp16 (SPEC §7.8)
    snr = S.snr(abar)                                                    # of the *rescaled* schedule (SPEC §7.1)
    loader = data.Loader(args.data, args.batch_size, seed=args.seed, rank=rank, world_size=world,
                         workers=args.workers, min_side=args.min_side, bucket_area=args.bucket_area,
                         bucket_min=args.bucket_min, bucket_max=args.bucket_max, bucket_step=args.bucket_step,
                         caption_dropout=args.caption_dropout, flip=args.flip, random_crop=args.random_crop,
                         inpaint=args.inpaint, pin_memory=cuda)
    batches = loader.batches(start=position + 1)
    text_cache = {}
    global_batch = args.batch_size * world * args.grad_accum
    log(f"train: {sum(p.numel() for p in unet.parameters()):,} UNet parameters; {world} rank(s) on {device}; global "
        f"batch {global_batch} = {args.batch_size} per rank × {world} × {args.grad_accum} accumulated")
    log(f"train: {args.prediction}-prediction, {args.schedule} schedule, min-SNR γ {args.min_snr_gamma:g}, "
        f"IP noise γ {args.ip_noise_gamma:g}, caption dropout {args.caption_dropout:g}, EMA {args.ema_decay:g}, "
        f"lr {args.lr:g} ({args.warmup} warm-up steps, then {args.lr_schedule}), {args.steps} steps → {args.out}")

    # SIGINT/SIGTERM ask the loop to stop after the current step and save. With several ranks they must agree on that
    # step, which costs a sync: they agree at log steps.
    stop = []
    handlers = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=cuda and args.precision == "bf16")
    # Statistics stay on the device between log steps and are read with one sync there: loss sum, grad-norm sum, good
    # steps, skipped steps, the longest run of skipped steps, the current run; then per-timestep-bin loss sums, counts.
    stats = torch.zeros(6 + 2 * T_BINS, device=device, dtype=torch.float64)
    t0, last_step = time.time(), step
    try:
        while step < args.steps:
            lr = get_lr(step, args.lr, args.warmup, args.steps, args.lr_schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum, per_t = torch.zeros((), device=device), []
            for micro in range(args.grad_accum):
                batch = next(batches)
                position = batch["position"]
                pixels = to_device(batch["pixels"], device)
                H, W = pixels.shape[-2:]
                shape = (3, H, W) if sd.vae is None else (4, H // 8, W // 8)
                t, noise, ip_noise, xi, xi_masked = (None if a is None else to_device(a, device) for a in
                                                     sample_noise(args.seed, step * args.grad_accum + micro,
                                                                  batch["index"], shape, args.inpaint))
                x0 = encode_pixels(sd, pixels, xi)
                context = encode_captions(sd, batch["captions"], text_cache, args.text_cache)
                x_t, target, weight = recipe_inputs(x0, noise, ip_noise, t, abar, snr, args.prediction,
                                                    args.min_snr_gamma, args.ip_noise_gamma)
                if args.inpaint:  # [x_t, mask, masked-image latent] (SPEC §3), the mask nearest-downsampled
                    mask = F.interpolate(to_device(batch["mask"], device), size=x_t.shape[-2:], mode="nearest")
                    masked = encode_pixels(sd, to_device(batch["masked_pixels"], device), xi_masked)
                    x_t = torch.cat([x_t, mask, masked], dim=1)
                if cuda:
                    x_t = x_t.contiguous(memory_format=torch.channels_last)
                sync_grads = micro == args.grad_accum - 1 or world == 1
                with autocast, (contextlib.nullcontext() if sync_grads else net.no_sync()):
                    loss, per_sample = S.weighted_mse(net(x_t, t, context), target, weight)   # in fp32
                    (loss / args.grad_accum).backward()
                loss_sum += loss.detach() / args.grad_accum
                per_t.append((t, per_sample))
            norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
            # A non-finite loss or gradient skips the step without a host sync: fused AdamW leaves weights, moments and
            # its step count alone where found_inf = 1 (GradScaler's mechanism). The EMA still takes its step, toward
            # the unchanged weights, as it does when GradScaler skips a step in diffusers' trainers.
            bad = ~(torch.isfinite(loss_sum) & torch.isfinite(norm))
            opt.found_inf = bad.float()
            opt.step()
            opt.zero_grad(set_to_none=True)
            S.ema_update(ema.parameters(), unet.parameters(), args.ema_decay)
            step += 1

            run = (stats[5] + 1) * bad
            stats[0] += torch.where(bad, 0.0, loss_sum.double())
            stats[1] += torch.where(bad, 0.0, norm.double())
            stats[2] += ~bad
            stats[3] += bad
            stats[4], stats[5] = torch.maximum(stats[4], run), run
            for t, per_sample in per_t:
                bins = 6 + t * T_BINS // S.T
                stats.index_add_(0, bins, torch.where(bad, 0.0, per_sample.double()))
                stats.index_add_(0, bins + T_BINS, (~bad).double().expand(len(t)))

            log_now = step % args.log_every == 0 or step == args.steps
            if log_now:
                s = stats.clone()
                if world > 1:
                    torch.distributed.all_reduce(s)
                    s[:6] /= world       # the same on every rank but the loss, whose rank mean is the global mean
                s = s.tolist()
                counters["skipped"] += int(s[3])
                dt, n, w = time.time() - t0, step - last_step, S.T // T_BINS
                metrics = dict(step=step, loss=s[0] / max(s[2], 1), lr=lr, grad_norm=s[1] / max(s[2], 1),
                               skipped=counters["skipped"], it_s=n / dt, samples_s=n * global_batch / dt,
                               loss_by_t={f"{w * b}-{w * (b + 1) - 1}": s[6 + b] / s[6 + T_BINS + b]
                                          for b in range(T_BINS) if s[6 + T_BINS + b]})
                eta = int((args.steps - step) / max(metrics["it_s"], 1e-9))
                if rank == 0:
                    with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                        f.write(json.dumps(metrics) + "\n")
                    print(f"\rstep {step}/{args.steps}  loss {metrics['loss']:.4f}  lr {lr:.2e}  {metrics['it_s']:.2f} "
                          f"it/s  {metrics['samples_s']:.1f} samples/s  ETA {eta // 60}:{eta % 60:02d}"
                          + (f"  skipped {counters['skipped']}" if counters["skipped"] else "") + " ", end="",
                          flush=True)
                if s[4] >= args.max_bad_steps:
                    if rank == 0:
                        save_models(args.out, step, unet, ema, sd, args)
                        save_state(args.out, step, position, unet, ema, opt, counters, args)
                    raise SystemExit(f"\ntrain: stopped at step {step}: {int(s[4])} steps in a row had a non-finite "
                                     f"loss or gradient and were skipped ({counters['skipped']} in all). The weights "
                                     f"from before them are saved in {args.out}; lower --lr or check the data, then "
                                     "--resume.")
                stats[:5] = 0
                stats[6:] = 0
                t0, last_step = time.time(), step
                if world > 1:
                    flag = torch.tensor(float(bool(stop)), device=device)
                    torch.distributed.all_reduce(flag)
                    stop[:] = [signal.SIGTERM] if flag.item() else []
            if stop and (world == 1 or log_now):
                log(f"\ntrain: {signal.Signals(stop[0]).name} at step {step}: saving and stopping")
                break
            if rank == 0 and step % args.save_every == 0 and step < args.steps:
                save_models(args.out, step, unet, ema, sd, args)
                save_state(args.out, step, position, unet, ema, opt, counters, args)
            if rank == 0 and args.sample_every and not args.inpaint and (step % args.sample_every == 0
                                                                         or step == args.steps):
                sample_grid(args.out, step, ema, sd, args)
        if rank == 0:
            save_models(args.out, step, unet, ema, sd, args)
            save_state(args.out, step, position, unet, ema, opt, counters, args)
            log(f"\ntrain: step {step}: wrote {args.out}/model.safetensors, model_ema.safetensors and train_state.*")
            if not args.model and not args.inpaint and args.sample_every:    # the demo: which captions it draws right
                print_demo_score(demo_score(model.SD(ema, None, sd.text_encoder, sd.tokenizer, sd.meta)))
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
        if world > 1:
            torch.distributed.destroy_process_group()
    return unet, ema


# demo_score's regions at the demo's 16×16, from where data.demo_sample draws its shapes (centre within ±15% of the
# middle, radius 20–35% of the short side): the central 2×2 px, inside ≥ 95% of the training circles and squares, and
# the four 2×2-px corners, which ≤ 3% of them reach (test_demo_score_regions_match_the_training_shapes). Of the
# training images themselves, 96% have the shape's colour in the centre and 99.6% the background's in the corners,
# within 40. The whole 1-px border would be a weaker test: big training shapes touch it (2% of the training images
# fail there), and so do the model's faint halos.
DEMO_CENTRE = torch.zeros(16, 16, dtype=torch.bool)
DEMO_CENTRE[7:9, 7:9] = True
DEMO_CORNERS = torch.zeros(16, 16, dtype=torch.bool)
DEMO_CORNERS[:2, :2] = DEMO_CORNERS[:2, -2:] = DEMO_CORNERS[-2:, :2] = DEMO_CORNERS[-2:, -2:] = True


def demo_score(sd, prompts=DEMO_PROMPTS, n=8, seed=0):
    """How much of its vocabulary the demo model draws: the samples of `zd.py sample --prompt P --n 8 --seed 0` (16×16,
    25 trailing DDIM steps, CFG 3, rescale 0.7) for each prompt, against the caption's colours (data.DEMO_COLOURS,
    0–255). A plain colour is right when the image's mean is within 25 of it in every channel, and the prompt passes
    when the mean of its n samples is. A shape on a background is right when the mean of the central region is within
    40 of the shape's colour and the mean of the corners within 40 of the background's, in every channel, and the
    prompt passes when ≥ 7/8 of its samples are right. One row per prompt: the prompt, the colours wanted and got
    ([1, 3]: the samples' mean colour, or [2, 3]: their mean colour in the centre and in the corners), samples right,
    passed."""
    rows = []
    for p in prompts:
        x = generate(sd, [p] * n, steps=25, cfg=DEMO_CFG, seed=seed, width=16, height=16, progress=False).float()
        words = p.split()
        plain = words[1] == "plain"
        if plain:                                                       # [n, 1, 3]: the whole image
            want, got = torch.tensor([data.DEMO_COLOURS[words[2]]]), x.mean((1, 2))[:, None]
        else:                                                           # [n, 2, 3]: centre, corners
            want = torch.tensor([data.DEMO_COLOURS[words[1]], data.DEMO_COLOURS[words[-2]]])
            got = torch.stack([x[:, DEMO_CENTRE].mean(1), x[:, DEMO_CORNERS].mean(1)], dim=1)
        right = int(((got - want).abs() <= (25 if plain else 40)).flatten(1).all(1).sum())
        ok = bool(((got.mean(0) - want).abs() <= 25).all()) if plain else right >= 7 * n / 8
        rows.append((p, want, got.mean(0), right, ok))
    return rows


def print_demo_score(rows, n=8, label="the EMA model"):
    """demo_score's rows as a table; the last line counts the prompts that pass."""
    print(f"\ndemo score of {label}: {n} samples per prompt at 16×16, mean colour (0–255) wanted and got "
          "(shape / background):")
    rgb = lambda colours: " / ".join(" ".join(f"{v:3.0f}" for v in c.tolist()) for c in colours)
    for p, want, got, right, ok in rows:
        print(f"  {p:38s} {rgb(want):>23s}   {rgb(got):>23s}   {right}/{n} right   {'pass' if ok else 'FAIL'}")
    print(f"  {sum(r[-1] for r in rows)}/{len(rows)} prompts pass")


def demo(args):
    """Train the demo twice, with the recipe (zero-terminal-SNR schedule, v-prediction) and with SD1.5's (scaled-linear
    schedule, ε-prediction), then sample "a plain black image" and "a plain white image" from each EMA model with the
    same sampler and seeds and print their mean pixel value (0–255). SD1.5's schedule leaves √ᾱ_999 = 0.068 of the
    image in its noisiest input, so a model trained on it learns that the mean brightness survives in the noise, and
    pure noise (mean 0) at sampling pulls it to mid-grey (Lin et al. 2023, §3.1)."""
    prompts = ("a plain black image", "a plain white image")
    rows, scores = [], []
    for name, schedule, prediction in (("demo", "zt", "v"), ("demo-sd15-eps", "sd15", "eps")):
        out = os.path.join(args.out, name)
        if not args.no_train:   # no sample grids: the score of each model is printed below
            train(parser().parse_args(["train", "--out", out, "--schedule", schedule, "--prediction", prediction,
                                       "--steps", str(args.steps), "--seed", str(args.seed), "--sample-every", "0"]))
        sd = model.load(os.path.join(out, "model_ema.safetensors"))
        means = [generate(sd, [p] * args.n, steps=25, cfg=DEMO_CFG, seed=args.seed, width=16, height=16,
                          prediction=prediction, zero_terminal_snr=schedule == "zt", progress=False).float().mean().item()
                 for p in prompts]
        label = "zero terminal SNR" if schedule == "zt" else "SD1.5"
        rows.append((f"{label} schedule, {prediction}-prediction", means))
        scores.append(demo_score(sd, n=args.n, seed=args.seed))
    for (label, _), score in zip(rows, scores):
        print_demo_score(score, args.n, label)
    print(f"\nmean pixel value (0–255) of {args.n} EMA samples each, 25 trailing DDIM steps, CFG {DEMO_CFG:g}, "
          "rescale 0.7:")
    print(f"{'':40s}" + "".join(f"{repr(p):>24s}" for p in prompts))
    print(f"{'training images':40s}{0:24.1f}{255:24.1f}")
    for label, means in rows:
        print(f"{label:40s}" + "".join(f"{m:24.1f}" for m in means))
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# zd.py convert / merge / inspect: checkpoints between layouts, the add-difference merge, and what a file is

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


# ---------------------------------------------------------------------------------------------------------------------
# zd.py bench: zd's networks, training step and sampler against diffusers'/transformers' on the same weights and inputs

PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312}  # dense, no sparsity (vendor sheets)


def diffusers_unet_config(cfg: model.UNetConfig):
    """The UNet2DConditionModel config of a UNetConfig (SPEC §8): attention_head_dim is diffusers' name for 8 heads."""
    levels = range(len(cfg.channel_mult))
    down = ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels]
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, layers_per_block=cfg.num_res_blocks,
                block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult], down_block_types=down,
                up_block_types=[b.replace("Down", "Up") for b in reversed(down)], cross_attention_dim=cfg.context_dim,
                attention_head_dim=cfg.num_heads, norm_num_groups=cfg.norm_groups, flip_sin_to_cos=True, freq_shift=0)


def diffusers_twin(ours, kind, cfg):
    """diffusers' (or transformers') network holding *the same tensors* as ours (shared storage, no copy), found by
    running model.py's diffusers → LDM renaming over the other network's own keys (the renamers keep key order)."""
    if kind == "unet":
        from diffusers import UNet2DConditionModel
        with torch.device("meta"):
            ref = UNet2DConditionModel(**diffusers_unet_config(cfg))
        names = model.unet_from_diffusers(ref.state_dict())
    elif kind == "vae":
        from diffusers import AutoencoderKL
        n = len(cfg.ch_mult)
        with torch.device("meta"):
            ref = AutoencoderKL(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                                latent_channels=cfg.z_channels, block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
                                layers_per_block=cfg.num_res_blocks,
                                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                                norm_num_groups=cfg.norm_groups)
        names = model.vae_from_diffusers(ref.state_dict())
    else:
        from transformers import CLIPTextConfig, CLIPTextModel
        ref = CLIPTextModel(CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width,
                                           num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                                           intermediate_size=cfg.mlp_dim, max_position_embeddings=cfg.positions,
                                           hidden_act="quick_gelu"))
        names = {k.removeprefix("text_model."): None for k in ref.state_dict()}
    theirs, mine = ref.state_dict(), ours.state_dict()
    sd = {k: mine[ldm].view(theirs[k].shape) for k, ldm in zip(theirs, names) if ldm in mine}
    missing, _ = ref.load_state_dict(sd, strict=False, assign=True)
    assert len(sd) == len(mine) and all("position_ids" in k for k in missing), (kind, missing)
    return ref.to(next(ours.parameters()).device).eval()


def rss_gb(field="VmRSS"):
    """This process's resident set (VmRSS) or its high-water mark (VmHWM) in GB, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 2 ** 20


def alternate(fns, repeats, warmup=1, sync=lambda: None):
    """{name: [seconds]} of each fn called in turn, warm-up rounds dropped; the order flips every round (ABBA) so a
    drift in machine load falls on both sides alike. Graphs and garbage are freed between calls. Small models need
    two warm-ups on CPU: the first calls also pay for page faults until glibc's malloc raises its mmap threshold."""
    times = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            gc.collect()
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def stats(ts):
    return dict(median=statistics.median(ts), min=min(ts), max=max(ts), runs=ts) if ts else None


def recipe_step(unet, latents, context, step, device, autocast):
    """One step of the recipe on the UNet alone (latents and text embeddings precomputed; VAE and CLIP are frozen):
    `recipe_inputs` (IP noise γ = 0.1, v target from the clean ε, min-SNR-5 weights), backward, AdamW, EMA 0.9999.
    `unet` is (network, call, optimizer, EMA tensors); inputs are seeded by `step` so both sides see the same ones."""
    net, call, opt, ema = unet
    abar = S.alphas_cumprod(S.betas()).to(device)
    g = torch.Generator().manual_seed(step)
    t = torch.randint(0, S.T, (latents.shape[0],), generator=g).to(device)
    noise, xi = (torch.randn(latents.shape, generator=g).to(device) for _ in range(2))
    x_t, target, weight = recipe_inputs(latents, noise, xi, t, abar, S.snr(abar))
    with autocast():
        out = call(net, x_t, t, context)
    loss, _ = S.weighted_mse(out, target, weight)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    S.ema_update(ema, net.parameters(), 0.9999)
    return loss.item()


def trainer(net, call):
    """(network, call, AdamW, EMA copy): the state a training run holds besides the frozen encoders."""
    net.train()
    params = list(net.parameters())
    return net, call, torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2), [p.detach().clone() for p in params]


OURS_CALL = lambda net, x, t, ctx: net(x, t, ctx)
DIFFUSERS_CALL = lambda net, x, t, ctx: net(x, t, encoder_hidden_states=ctx).sample


def train_memory(side, cfg_json, batch, size, device="cpu"):
    """Peak memory of two recipe steps of one side, in a fresh process: `bench` runs this as a subprocess per side, as
    max RSS is a process-wide high-water mark and two sides in one process would also share allocator caches.
    Prints one JSON line, in GB: the memory in use before the steps (model, inputs) and its peak during them
    (RSS on CPU; torch.cuda.max_memory_allocated on GPU)."""
    cfg = model.UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(cfg_json).items()})
    cuda = device == "cuda"
    layout = torch.channels_last if cuda else torch.contiguous_format
    torch.manual_seed(0)
    if side == "ours":
        net, call = model.UNet(cfg), OURS_CALL
    else:
        from diffusers import UNet2DConditionModel
        net, call = UNet2DConditionModel(**diffusers_unet_config(cfg)), DIFFUSERS_CALL
    net = net.to(device, memory_format=layout)
    latents = torch.randn(batch, cfg.in_channels, size, size, device=device).to(memory_format=layout)
    context = torch.randn(batch, 77, cfg.context_dim, device=device)
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2 ** 30
    else:
        before = rss_gb()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                       # reset VmHWM to the current RSS (Linux ≥ 4.0)
    state = trainer(net, call)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    for step in range(2):
        recipe_step(state, latents, context, step, device, autocast)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else rss_gb("VmHWM")
    print(json.dumps(dict(before_gb=before, peak_gb=peak)))


def bench_sampling(unet, vae, text_encoder, size, steps, repeats, has_diffusers):
    """25-step (or `steps`) trailing DDIM with CFG 7.5 and rescale 0.7 at size², one image: zd.generate vs diffusers'
    StableDiffusionPipeline with the zero-terminal-SNR DDIM scheduler, on the same networks."""
    sd = model.SD(unet, vae, text_encoder, model.Tokenizer.default(), meta=dict(prediction="v", ztsnr=True))
    prompt = ["a photograph of an astronaut riding a horse"]
    fns = {"ours": lambda: generate(sd, prompt, negative="", steps=steps, cfg=7.5, rescale=0.7, seed=0, width=size,
                                    height=size, progress=False)}
    if has_diffusers:
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        from transformers import CLIPTokenizer
        vocab, merges = model.clip_vocab()
        with tempfile.TemporaryDirectory() as folder:  # transformers' tokenizer reads vocab.json and merges.txt
            with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
                json.dump(vocab, f, ensure_ascii=False)
            with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
                f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
            tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                                      model_max_length=77)   # positional paths: SPEC §8
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                  prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=True,
                                  steps_offset=1)
        pipe = StableDiffusionPipeline(
            unet=diffusers_twin(unet, "unet", unet.cfg), vae=diffusers_twin(vae, "vae", vae.cfg),
            text_encoder=diffusers_twin(text_encoder, "clip", text_encoder.cfg),
            tokenizer=tokenizer, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        fns["diffusers"] = lambda: pipe(prompt, negative_prompt=[""],
                                        num_inference_steps=steps, guidance_scale=7.5, guidance_rescale=0.7,
                                        width=size, height=size, output_type="np",
                                        generator=torch.Generator("cpu").manual_seed(0))
    return alternate(fns, repeats, 2 if size < 256 else 1)


def pair(ours, theirs):
    """The callables `alternate` times: zd's, and the reference's when there is one."""
    return {"ours": ours} | ({"diffusers": theirs} if theirs is not None else {})


def bench(args):
    """Time zd against diffusers/transformers on the same random weights and inputs, alternating runs, median and
    spread; peak memory of the training step; data-pipeline images/s. --quick: the tiny configs and cheap parts only."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    try:
        import diffusers
        import transformers
        versions = dict(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except ImportError:
        versions = dict(diffusers=None, transformers=None)
        print("diffusers not installed: zd's columns only", file=sys.stderr)
    twin = diffusers_twin if versions["diffusers"] else (lambda *a: None)
    batch = args.batch or (8 if cuda else 1)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    layout = torch.channels_last if cuda else torch.contiguous_format
    warm = 2 if args.quick else 1
    cpu_name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    info = dict(cpu=cpu_name, cores=os.cpu_count(), threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name() if cuda else None, torch=torch.__version__, **versions,
                dtype="bf16 autocast, channels_last" if cuda else "fp32", batch=batch, repeats=args.repeats,
                load=os.getloadavg()[0], quick=args.quick)
    rows = []

    def row(name, times, note=""):
        r = dict(name=name, unit="s", note=note, ours=stats(times["ours"]), diffusers=stats(times.get("diffusers", [])))
        r["ratio"] = r["ours"]["median"] / r["diffusers"]["median"] if r["diffusers"] else None
        rows.append(r)
        if not args.json:
            print(format_row(r), flush=True)
        return r

    if not args.json:
        print("  ".join(f"{k} {v}" for k, v in info.items()))
        print(f"{'what':<56} {'zd (min–max)':>24} {'diffusers (min–max)':>24} {'zd/diffusers':>12}")

    # UNet forward and forward+backward; gradients are dropped after each call, so one graph lives at a time
    torch.manual_seed(0)
    sizes = [("tiny", model.UNetConfig.tiny(), 16)] + [("SD1.5", model.UNetConfig(), 64)] * (not args.quick)
    for label, cfg, lat in sizes:
        unet = model.UNet(cfg).to(device, memory_format=layout).eval()
        ref = twin(unet, "unet", cfg)
        x = torch.randn(batch, 4, lat, lat, device=device).to(memory_format=layout)
        t, ctx = torch.full((batch,), 500, device=device), torch.randn(batch, 77, cfg.context_dim, device=device)

        def forward(net, call):
            with torch.no_grad(), autocast():
                call(net, x, t, ctx)

        def forward_backward(net, call):
            with autocast():
                out = call(net, x, t, ctx)
            out.float().square().mean().backward()
            net.zero_grad(set_to_none=True)

        for name, fn in ((f"UNet {label} forward, {batch}×4×{lat}×{lat}", forward),
                         (f"UNet {label} forward+backward", forward_backward)):
            row(name, alternate(pair(lambda: fn(unet, OURS_CALL), ref and (lambda: fn(ref, DIFFUSERS_CALL))),
                                args.repeats, 2 if label == "tiny" else 1, sync))
        del unet, ref
        gc.collect()

    # VAE and CLIP
    vae_cfg, clip_cfg, size = ((model.VAEConfig.tiny(), model.CLIPConfig.tiny(), 128) if args.quick else
                               (model.VAEConfig(), model.CLIPConfig(), 512))
    vae = model.VAE(vae_cfg).to(device, memory_format=layout).eval()
    text_encoder = model.CLIPTextModel(clip_cfg).to(device).eval()
    ref, ref_text = twin(vae, "vae", vae_cfg), twin(text_encoder, "clip", clip_cfg)
    images = (torch.rand(1, 3, size, size, device=device) * 2 - 1).to(memory_format=layout)
    z = torch.randn(1, 4, size // 8, size // 8, device=device).to(memory_format=layout)
    ids = model.Tokenizer.default()(["a photograph of an astronaut riding a horse"] * batch).to(device)
    with torch.no_grad(), autocast():
        row(f"VAE {'tiny' if args.quick else 'SD1.5'} encode 1×3×{size}²",
            alternate(pair(lambda: vae.encode(images), ref and (lambda: ref.encode(images))), args.repeats, warm, sync))
        row(f"VAE decode 1×4×{size // 8}²",
            alternate(pair(lambda: vae.decode(z), ref and (lambda: ref.decode(z))), args.repeats, warm, sync))
        row(f"CLIP text {'tiny' if args.quick else 'ViT-L'} forward {batch}×77",
            alternate(pair(lambda: text_encoder(ids), ref_text and (lambda: ref_text(ids))), args.repeats, warm, sync))
    del vae, text_encoder, ref, ref_text
    gc.collect()

    # the training step: full size on GPU; on CPU the SD1.5 layout at half width unless --train-full, because the
    # full step holds weights, gradients, two AdamW moments and the EMA (5 × 3.4 GB) plus the graph
    cfg = (model.UNetConfig.tiny() if args.quick else
           model.UNetConfig() if cuda or args.train_full else model.UNetConfig(model_channels=160))
    label = "tiny" if args.quick else "SD1.5" if cfg.model_channels == 320 else "SD1.5 layout, half width"
    lat = 16 if args.quick else 64
    torch.manual_seed(0)
    net = model.UNet(cfg).to(device, memory_format=layout)
    ref = twin(net, "unet", cfg)
    sides = pair(trainer(net, OURS_CALL), ref and trainer(ref.train(), DIFFUSERS_CALL))
    latents = torch.randn(batch, 4, lat, lat, device=device).to(memory_format=layout)
    context = torch.randn(batch, 77, cfg.context_dim, device=device)
    steps = iter(range(10 ** 6))
    r = row(f"training step, UNet {label}, {batch}×4×{lat}×{lat}",
            alternate({k: (lambda s=s: recipe_step(s, latents, context, next(steps), device, autocast))
                       for k, s in sides.items()}, args.repeats, warm, sync),
            note="IP noise, v target, min-SNR, AdamW, EMA; latents and text embeddings precomputed")
    train_ips = batch / r["ours"]["median"]
    if cuda:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            recipe_step(sides["ours"], latents, context, 0, device, autocast)
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in info["gpu"]), None)
        info["peak_bf16_tflops"] = peak
        if peak is None:
            print(f"unknown peak for {info['gpu']}: pass --peak-tflops for the fraction of peak", file=sys.stderr)
        for name in sides:
            r[name]["tflops"] = counter.get_total_flops() / r[name]["median"] / 1e12
            r[name]["peak_fraction"] = r[name]["tflops"] / peak if peak else None
    del sides, net, ref
    gc.collect()
    r["memory"] = {}
    for name in ["ours"] + ["diffusers"] * bool(versions["diffusers"]):   # a fresh process per side
        cfg_json = json.dumps(json.dumps(dataclasses.asdict(cfg)))
        code = f"import zd; zd.train_memory({name!r}, {cfg_json}, {batch}, {lat}, {device.type!r})"
        out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, check=True)
        r["memory"][name] = json.loads(out.stdout.strip().splitlines()[-1])
    if not args.json:
        for name, m in r["memory"].items():
            line = f"  {name}: peak {'GPU memory' if cuda else 'RSS'} {m['peak_gb']:.2f} GB"
            line += f" ({m['before_gb']:.2f} GB before the steps)"
            line += f", {r[name]['tflops']:.1f} TFLOP/s" if cuda else ""
            line += f" = {r[name]['peak_fraction']:.0%} of bf16 peak" if cuda and r[name]["peak_fraction"] else ""
            print(line)

    # sampling: the full 25 steps at 512² costs ≈ 8 min per side on a 2-core CPU, so CPU runs a shorter one by default
    size, steps = (64, 2) if args.quick else (512, 25) if cuda or args.sample_full else (256, 5)
    dtype = torch.bfloat16 if cuda else torch.float32
    unet = model.UNet(model.UNetConfig.tiny() if args.quick else model.UNetConfig()).to(device, dtype).eval()
    vae = model.VAE(vae_cfg).to(device, dtype).eval()
    text_encoder = model.CLIPTextModel(clip_cfg).to(device, dtype).eval()   # tiny: width 64 = the tiny UNet's context
    row(f"sampling {steps} steps, CFG, {size}², 1 image",
        bench_sampling(unet, vae, text_encoder, size, steps, args.repeats, bool(versions["diffusers"])),
        note="trailing DDIM + CFG rescale, incl. text encoding and VAE decode")
    del unet, vae, text_encoder
    gc.collect()

    import data
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):  # the loader's log lines
        n = 16 if args.quick else 96
        data.write_bench_jpegs(folder, n=n)
        ips = data.measure_throughput(folder, workers=2, n=n // 2, batch_size=4)
    rows.append(dict(name="data pipeline (2 workers, 1024–1536 px JPEGs)", unit="images/s", data_ips=ips,
                     train_ips=train_ips))
    if args.json:
        print(json.dumps(dict(info=info, rows=rows), indent=1))
    else:
        print(f"data pipeline: {ips:.1f} images/s (2 workers, 1024–1536 px JPEGs → 512² buckets); "
              f"training step: {train_ips:.2f} images/s")
    return dict(info=info, rows=rows)


def format_row(r):
    cell = lambda s: f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})" if s else "—"
    ratio = f"{r['ratio']:.2f}" if r["ratio"] else "—"
    return f"{r['name']:<56} {cell(r['ours']):>24} {cell(r['diffusers']):>24} {ratio:>12}"


def parser():
    """The command line: one subparser per subcommand, each calling a plain function of the parsed arguments."""
    p = argparse.ArgumentParser(prog="zd.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("train", help="fine-tune SD1.5 with the ZeroDiffusion recipe (no arguments: a CPU demo)",
                       description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = s.add_argument_group("model and data")
    g.add_argument("--model", help="SD1.5 checkpoint to fine-tune (single file, full or EMA-only, or a diffusers "
                   "folder); the UNet and the EMA start from its EMA weights. Without it: the demo")
    g.add_argument("--vae", help="a separate VAE file for the checkpoint")
    g.add_argument("--ema-init", metavar="PATH", help="take the initial UNet/EMA weights from this file instead")
    g.add_argument("--data", action="append", metavar="SRC", help="image folder, tar shard path or glob, or 'demo'; "
                   "repeatable (demo default: demo)")
    g.add_argument("--out", help="output folder (default runs/zd; demo runs/demo)")
    g.add_argument("--min-side", type=int, help="keep images whose original shortest side is ≥ this (default 1024)")
    g.add_argument("--bucket-area", type=int, help="bucket area in pixels (default 512·512; demo 16·16)")
    g.add_argument("--bucket-min", type=int, help="shortest bucket side (default 384; demo 16)")
    g.add_argument("--bucket-max", type=int, help="longest bucket side (default 640; demo 16)")
    g.add_argument("--bucket-step", type=int, help="bucket side step (default 64; demo 8)")
    g.add_argument("--flip", action="store_true", default=None, help="random horizontal flips (default off)")
    g.add_argument("--random-crop", action="store_true", default=None, help="random instead of centre crops")
    g.add_argument("--inpaint", action="store_true", default=None, help="train the 9-channel inpainting UNet on "
                   "synthetic masks (a 4-channel checkpoint is expanded with zero-initialised channels)")
    g.add_argument("--workers", type=int, help="data loader processes per rank (default 2)")
    g = s.add_argument_group("the recipe (SPEC §1)")
    g.add_argument("--prediction", choices=("v", "eps"), help="what the UNet predicts (default v)")
    g.add_argument("--schedule", choices=("zt", "sd15"), help="zt: SD1.5's betas rescaled to zero terminal SNR "
                   "(Lin et al. 2023, Alg. 1); sd15: as shipped (default zt)")
    g.add_argument("--min-snr-gamma", type=float, help="min-SNR-γ loss weight (Hang et al. 2023), from the rescaled "
                   "schedule; 0 = plain MSE (default 5)")
    g.add_argument("--ip-noise-gamma", type=float, help="input perturbation γ (Ning et al. 2023), on the input only "
                   "(default 0.1)")
    g.add_argument("--caption-dropout", type=float, help="probability of training on the empty caption \"\" "
                   "(default 0.1)")
    g.add_argument("--ema-decay", type=float, help="EMA decay, constant from step 1 (default 0.9999; demo 0.98)")
    g = s.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="optimiser steps (default 10000; demo 1500)")
    g.add_argument("--batch-size", type=int, help="images per rank per micro-step (default 4; demo 32)")
    g.add_argument("--grad-accum", type=int, help="micro-steps accumulated per optimiser step (default 1)")
    g.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-5; demo 1e-3)")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), help="after warm-up (default constant)")
    g.add_argument("--warmup", type=int, help="linear warm-up steps (default 500; demo 20)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping (default 1.0)")
    g.add_argument("--seed", type=int, help="seed of the data order, dropout and all noise (default 0)")
    g = s.add_argument_group("run")
    g.add_argument("--resume", action="store_true", default=None, help="continue the run in --out (weights, EMA, "
                   "optimiser, step, data position); its settings are kept, except --steps and the intervals")
    g.add_argument("--save-every", type=int, help="write the checkpoints and train state every N steps (default 1000; "
                   "demo 500)")
    g.add_argument("--sample-every", type=int, help="write a grid of EMA samples every N steps, 0 = never "
                   "(default 500)")
    g.add_argument("--sample-prompt", action="append", dest="sample_prompts", metavar="TEXT",
                   help="prompt of the sample grids; repeatable")
    g.add_argument("--sample-size", type=int, nargs=2, metavar=("W", "H"), help="sample grid size (default 512 512; "
                   "demo 16 16)")
    g.add_argument("--log-every", type=int, help="progress line and metrics.jsonl every N steps (default 10)")
    g.add_argument("--max-bad-steps", type=int, help="stop after this many non-finite steps in a row (default 5)")
    g.add_argument("--text-cache", type=int, help="keep the CLIP embeddings of up to N distinct captions "
                   "(default 0; demo 1024)")
    g.add_argument("--half", action="store_true", default=None,
                   help="write fp16 checkpoints (the train state stays fp32)")
    g = s.add_argument_group("hardware")
    g.add_argument("--device", help="cuda, cuda:1, cpu (default: the rank's GPU if there is one)")
    g.add_argument("--precision", choices=("bf16", "fp32"), help="UNet autocast on GPUs (default bf16; CPUs fp32)")
    g.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass: less memory, ~30%% slower")
    s.set_defaults(func=train)

    s = sub.add_parser("demo", help="train the demo with ZT/v and with SD1.5's schedule/ε; compare black and white",
                       description=demo.__doc__)
    s.add_argument("--out", default="runs", help="parent folder: OUT/demo and OUT/demo-sd15-eps (default runs)")
    s.add_argument("--steps", type=int, default=DEMO["steps"], help=f"training steps of each (default {DEMO['steps']})")
    s.add_argument("--seed", type=int, default=0, help="training and sampling seed (default 0)")
    s.add_argument("--n", type=int, default=8, help="samples per prompt (default 8)")
    s.add_argument("--no-train", action="store_true", help="only sample the two models already in OUT")
    s.set_defaults(func=demo)

    s = sub.add_parser("sample",
                       help="generate PNGs: trailing DDIM with CFG rescale, right for v/zero-terminal-SNR models",
                       description=sample.__doc__)
    s.add_argument("--model", required=True, help="checkpoint: single .safetensors file or diffusers folder")
    s.add_argument("--vae", help="a separate VAE .safetensors file to use instead of the checkpoint's")
    s.add_argument("--raw", action="store_true", help="use the raw UNet weights of a file that also has EMA weights "
                                                      "(default: the EMA weights)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--negative", default="", help='negative prompt (default "", SD1.5\'s unconditional input)')
    s.add_argument("--steps", type=int, default=25, help="DDIM steps, trailing spacing from t = 999 (default 25)")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 7.5, pixel-space demo models 3; "
                   "≤ 1: none)")
    s.add_argument("--rescale", type=float, default=0.7, help="CFG rescale φ, Lin et al. 2023 Alg. 2 (default 0.7)")
    s.add_argument("--seed", type=int, default=0, help='initial latent = torch.randn((n, 4, H/8, W/8), generator='
                   'torch.Generator("cpu").manual_seed(SEED)), float32, as diffusers draws it (default 0)')
    s.add_argument("--width", type=int, help="multiple of 64 (default 512, or --image's size rounded down; "
                                             "pixel-space demo models: multiple of 8, default 16)")
    s.add_argument("--height", type=int, help="as --width")
    s.add_argument("--n", type=int, default=1, help="images of the prompt, sampled as one batch (default 1)")
    s.add_argument("--out", default="sample.png", help="a .png path, or a folder for several images plus grid.png "
                                                       "(default sample.png)")
    s.add_argument("--prediction", choices=("v", "eps"), help="override the checkpoint's marker (unmarked: eps)")
    s.add_argument("--schedule", choices=("zt", "sd15"), help="override the checkpoint's marker: zero terminal SNR or "
                                                             "SD1.5's scaled-linear (unmarked: sd15)")
    s.add_argument("--image", help="init image: img2img for a base model, the image to inpaint for an inpainting model")
    s.add_argument("--mask", help="inpainting mask, white = repaint (inpainting models only)")
    s.add_argument("--strength", type=float, help="how far up the step list --image starts (default 0.8 img2img, "
                                                  "1.0 inpainting)")
    s.add_argument("--device", help="default cuda if available, else cpu")
    s.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="weights' dtype (default fp16 on GPU, fp32 on "
                                                                     "CPU); the schedule math stays fp32/float64")
    s.set_defaults(func=sample)

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

    s = sub.add_parser("bench",
                       help="time zd against diffusers/transformers: UNet, VAE, CLIP, training step, sampling, data",
                       description=bench.__doc__)
    s.add_argument("--quick", action="store_true", help="tiny configs and cheap parts only (seconds)")
    s.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    s.add_argument("--repeats", type=int, default=3, help="timed runs per side after one warm-up (default 3)")
    s.add_argument("--batch", type=int, help="UNet batch (default 1 on CPU, 8 on GPU)")
    s.add_argument("--device", choices=("cuda", "cpu"), help="default cuda if available")
    s.add_argument("--threads", type=int, help="torch CPU threads (default torch's: the cores); on a shared machine "
                   "fewer threads than cores avoids waits on a descheduled thread in every op")
    s.add_argument("--train-full", action="store_true", help="CPU: time the training step at full SD1.5 width "
                   "(≈ 25 GB RAM per side) instead of half width")
    s.add_argument("--sample-full", action="store_true", help="CPU: sample 25 steps at 512² (≈ 8 min per side) "
                   "instead of 5 steps at 256²; always on GPU")
    s.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for the fraction of peak "
                   "(default: looked up for H100/H200/A100)")
    s.set_defaults(func=bench)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except BrokenPipeError:   # `zd.py schedule --csv | head`: the reader has gone; say nothing more (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
