"""bench.py — zd's speed against diffusers/transformers, side by side on the same weights and inputs.

    python bench.py                 UNet, VAE, CLIP, the recipe's training step, sampling, the data pipeline
    python bench.py --quick         the tiny configs only (seconds)
    python bench.py --json          the same as JSON

A tool beside the reference, not part of it: it imports zd's modules, nothing imports it except the tests and
.ci/gpu (which share its oracle configs). diffusers and transformers are needed only for their columns.
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import data
import model
import schedule as S
import zd

# dense, no sparsity (vendor sheets); the first name found in the device's name wins, so variants precede their family
PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "A100": 312}


def peak_bf16_tflops(gpu_name):
    """The card's dense bf16 peak in TFLOP/s from PEAK_BF16_TFLOPS by its device name, or None for another card."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu_name), None)


# ---- the other libraries' networks on zd's tensors -------------------------------------------------------------------

def diffusers_unet_config(cfg: model.UNetConfig):
    """The UNet2DConditionModel config of a UNetConfig: attention_head_dim is diffusers' name for 8 heads;
    sample_size as SD1.5's (the pipelines' default size and a check in the inpainting pipeline read it)."""
    levels = range(len(cfg.channel_mult))
    down = ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels]
    return dict(sample_size=64, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                layers_per_block=cfg.num_res_blocks,
                block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult], down_block_types=down,
                up_block_types=[b.replace("Down", "Up") for b in reversed(down)], cross_attention_dim=cfg.context_dim,
                attention_head_dim=cfg.num_heads, norm_num_groups=cfg.norm_groups, flip_sin_to_cos=True, freq_shift=0)


def diffusers_vae_config(cfg: model.VAEConfig):
    n = len(cfg.ch_mult)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.z_channels,
                block_out_channels=[cfg.ch * m for m in cfg.ch_mult], layers_per_block=cfg.num_res_blocks,
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                norm_num_groups=cfg.norm_groups, sample_size=512)


def transformers_clip_config(cfg: model.CLIPConfig):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
                          num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_dim,
                          max_position_embeddings=cfg.positions, hidden_act="quick_gelu",
                          bos_token_id=model.BOS, eos_token_id=model.EOS, pad_token_id=1)


def hf_tokenizer(folder):
    """transformers' CLIPTokenizer on zd's shipped vocabulary, written to folder as vocab.json and merges.txt. The
    paths go in positionally: as vocab_file=/merges_file= keywords transformers 5 ignores them."""
    from transformers import CLIPTokenizer
    vocab, merges = model.clip_vocab()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77)


def diffusers_sample(pipe, prompts, steps, size, latents=None):
    """The pipeline's images (float [N, H, W, 3] in [0, 1]) with zd.generate's defaults: negative prompt "", CFG 7.5
    rescaled by 0.7, seed 0 on a CPU generator; `latents` replaces the pipeline's own draw of the noise."""
    return pipe(prompts, negative_prompt=[""] * len(prompts), num_inference_steps=steps, guidance_scale=7.5,
                guidance_rescale=0.7, width=size, height=size, output_type="np", latents=latents,
                generator=torch.Generator("cpu").manual_seed(0)).images


def zt_pipeline(unet, vae, text_encoder, tokenizer_folder):
    """diffusers' StableDiffusionPipeline on zd's networks (shared tensors) with the DDIM scheduler zd samples with:
    the zero-terminal-SNR schedule, trailing spacing, v-prediction, ᾱ_prev = 1 at the last step."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              rescale_betas_zero_snr=True, timestep_spacing="trailing",
                              prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=diffusers_twin(unet, "unet", unet.cfg), vae=diffusers_twin(vae, "vae", vae.cfg),
        text_encoder=diffusers_twin(text_encoder, "clip", text_encoder.cfg), tokenizer=hf_tokenizer(tokenizer_folder),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
        with torch.device("meta"):
            ref = AutoencoderKL(**diffusers_vae_config(cfg))
        names = model.vae_from_diffusers(ref.state_dict())
    else:
        from transformers import CLIPTextModel
        ref = CLIPTextModel(transformers_clip_config(cfg))
        names = {k.removeprefix("text_model."): None for k in ref.state_dict()}
    theirs, mine = ref.state_dict(), ours.state_dict()
    sd = {k: mine[ldm].view(theirs[k].shape) for k, ldm in zip(theirs, names) if ldm in mine}
    missing, _ = ref.load_state_dict(sd, strict=False, assign=True)
    assert len(sd) == len(mine) and all("position_ids" in k for k in missing), (kind, missing)
    return ref.to(next(ours.parameters()).device).eval()


def randomize(net, seed=0):
    """Every parameter random (diffusers zero-initialises some), at a scale that keeps activations O(1): parity checks
    on zeros would pass whatever the code does. Drawn on the network's own device."""
    device = next(net.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            r = torch.randn(p.shape, generator=g, device=device)
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") and "norm" in name else 0.0) + 0.1 * r)
            else:
                p.copy_(r / p[0].numel() ** 0.5)
    return net


# ---- timing ---------------------------------------------------------------------------------------------------------

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


def spread(ts):
    return dict(median=statistics.median(ts), min=min(ts), max=max(ts), runs=ts) if ts else None


def recipe_step(unet, latents, context, step, device, autocast):
    """One step of the recipe on the UNet alone (latents and text embeddings precomputed; VAE and CLIP are frozen):
    `recipe_inputs` (IP noise γ = 0.1, v target from the clean ε, min-SNR-5 weights), backward, AdamW, EMA 0.9999.
    `unet` is (network, call, optimizer, EMA tensors); inputs are seeded by `step` so both sides see the same ones,
    and reach the device as `zd.py train` moves them (pinned, no host sync). Returns the loss, on the device."""
    net, call, opt, ema = unet
    device = torch.device(device)
    g = torch.Generator().manual_seed(step)
    t = zd.to_device(torch.randint(0, S.T, (latents.shape[0],), generator=g), device)
    noise, xi = (zd.to_device(torch.randn(latents.shape, generator=g), device) for _ in range(2))
    x_t, target, weight = zd.recipe_inputs(latents, noise, xi, t, ZT_ABAR.to(device), ZT_SNR.to(device))
    with autocast():
        out = call(net, x_t, t, context)
    loss, _ = S.weighted_mse(out, target, weight)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    S.ema_update(ema, net.parameters(), 0.9999)
    return loss.detach()


ZT_ABAR = S.alphas_cumprod(S.betas())
ZT_SNR = S.snr(ZT_ABAR)


def trainer(net, call):
    """(network, call, AdamW, EMA copy): the state a training run holds besides the frozen encoders. Fused AdamW on
    both sides, as `zd.py train` steps it."""
    net.train()
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, fused=True)
    return net, call, opt, [p.detach().clone() for p in params]


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
    with torch.device(device):
        if side == "ours":
            net, call = model.UNet(cfg), OURS_CALL
        else:
            from diffusers import UNet2DConditionModel
            net, call = UNet2DConditionModel(**diffusers_unet_config(cfg)), DIFFUSERS_CALL
    net = net.to(memory_format=layout)
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


def bench_sampling(unet, vae, text_encoder, size, steps, repeats, has_diffusers, n=1):
    """25-step (or `steps`) trailing DDIM with CFG 7.5 and rescale 0.7 at size², n images as one batch: zd.generate vs
    diffusers' StableDiffusionPipeline with the zero-terminal-SNR DDIM scheduler, on the same networks."""
    sd = model.SD(unet, vae, text_encoder, model.Tokenizer.default(), meta=dict(prediction="v", ztsnr=True))
    prompt = ["a photograph of an astronaut riding a horse"] * n
    fns = {"ours": lambda: zd.generate(sd, prompt, negative="", steps=steps, guidance=7.5, rescale=0.7, seed=0,
                                       width=size, height=size, progress=False)}
    if has_diffusers:
        folder = tempfile.mkdtemp()
        pipe = zt_pipeline(unet, vae, text_encoder, folder)
        fns["diffusers"] = lambda: diffusers_sample(pipe, prompt, steps, size)
    sync = torch.cuda.synchronize if unet.time_embed[0].weight.is_cuda else (lambda: None)
    return alternate(fns, repeats, 2 if size < 256 else 1, sync)


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
        r = dict(name=name, unit="s", note=note, ours=spread(times["ours"]),
                 diffusers=spread(times.get("diffusers", [])))
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
        with device:  # weights initialised where they run: a full UNet's init takes seconds on a CPU
            unet = model.UNet(cfg).to(memory_format=layout).eval()
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
    with device:
        vae = model.VAE(vae_cfg).to(memory_format=layout).eval()
        text_encoder = model.CLIPTextModel(clip_cfg).eval()
    ref, ref_text = twin(vae, "vae", vae_cfg), twin(text_encoder, "clip", clip_cfg)
    vae_batch = batch if cuda else 1
    images = (torch.rand(vae_batch, 3, size, size, device=device) * 2 - 1).to(memory_format=layout)
    z = torch.randn(vae_batch, 4, size // 8, size // 8, device=device).to(memory_format=layout)
    ids = model.Tokenizer.default()(["a photograph of an astronaut riding a horse"] * batch).to(device)
    with torch.no_grad(), autocast():
        row(f"VAE {'tiny' if args.quick else 'SD1.5'} encode {vae_batch}×3×{size}²",
            alternate(pair(lambda: vae.encode(images), ref and (lambda: ref.encode(images))), args.repeats, warm, sync))
        row(f"VAE decode {vae_batch}×4×{size // 8}²",
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
    with device:
        net = model.UNet(cfg).to(memory_format=layout)
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
        peak = args.peak_tflops or peak_bf16_tflops(info["gpu"])
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
        code = f"import bench; bench.train_memory({name!r}, {cfg_json}, {batch}, {lat}, {device.type!r})"
        out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"train_memory({name!r}) failed:\n{out.stderr[-3000:]}")
        r["memory"][name] = json.loads(out.stdout.strip().splitlines()[-1])
    if not args.json:
        for name, m in r["memory"].items():
            line = f"  {name}: peak {'GPU memory' if cuda else 'RSS'} {m['peak_gb']:.2f} GB"
            line += f" ({m['before_gb']:.2f} GB before the steps)"
            line += f", {r[name]['tflops']:.1f} TFLOP/s" if cuda else ""
            line += f" = {r[name]['peak_fraction']:.0%} of bf16 peak" if cuda and r[name]["peak_fraction"] else ""
            print(line)

    # sampling: the full 25 steps at 512² costs ≈ 8 min per side on a 2-core CPU, so CPU runs a shorter one by default
    # in fp16 on GPU, as `zd.py sample` runs there
    size, steps = (64, 2) if args.quick else (512, 25) if cuda or args.sample_full else (256, 5)
    dtype, n = (torch.float16, 4) if cuda else (torch.float32, 1)
    with device:
        unet = model.UNet(model.UNetConfig.tiny() if args.quick else model.UNetConfig()).to(dtype=dtype).eval()
        vae = model.VAE(vae_cfg).to(dtype=dtype).eval()
        text_encoder = model.CLIPTextModel(clip_cfg).to(dtype=dtype).eval()   # tiny: width 64 = the tiny UNet's context
    row(f"sampling {steps} steps, CFG, {size}², {n} image{'s' * (n > 1)}",
        bench_sampling(unet, vae, text_encoder, size, steps, args.repeats, bool(versions["diffusers"]), n),
        note="trailing DDIM + CFG rescale, incl. text encoding and VAE decode")
    del unet, vae, text_encoder
    gc.collect()

    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):  # the loader's log lines
        n = 16 if args.quick else 96
        write_bench_jpegs(folder, n=n)
        ips = measure_throughput(folder, workers=2, n=n // 2, batch_size=4)
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


# ---- data pipeline ----------------------------------------------------------------------------------------------------

def write_bench_jpegs(folder, n=200, seed=0):
    """n photo-like JPEGs (smooth colour fields plus grain, quality 90) with sides 1024–1536, the input of
    measure_throughput. Pure noise would be the wrong test: it compresses and decodes unlike photographs."""
    os.makedirs(folder, exist_ok=True)
    with concurrent.futures.ProcessPoolExecutor() as pool:
        list(pool.map(_write_bench_jpeg, [folder] * n, range(n), [seed] * n))


def _write_bench_jpeg(folder, i, seed):
    rng = np.random.default_rng([seed, i])
    w, h = (int(s) for s in rng.integers(1024, 1537, 2))
    field = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    grain = rng.normal(0, 8, (h, w, 3))
    img = Image.fromarray(np.clip(np.asarray(field) + grain, 0, 255).astype(np.uint8))
    img.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    with open(os.path.join(folder, f"{i:05d}.txt"), "w") as f:
        f.write(f"benchmark image {i}")


def measure_throughput(folder, workers=2, n=200, batch_size=8, min_side=1024):
    """Images/s of decode + bucket + crop from a folder through Loader (default buckets), after the first batch (so
    worker start-up is excluded). Reproduces the README number."""
    loader = data.Loader([folder], batch_size, workers=workers, min_side=min_side, caption_dropout=0.0)
    it = loader.batches()
    next(it)
    count, t0 = 0, time.perf_counter()
    for batch in it:
        count += len(batch["captions"])
        if count >= n:
            break
    return count / (time.perf_counter() - t0)


def cache_speedup(folder, n=16, side=256, batch=2, steps=(2, 5), rounds=1):
    """`zd.py train` from JPEGs and from a latent cache of them (`zd.py cache`), alternating runs in this process, on
    SD1.5's structure at about a quarter width (UNet 96 channels, 0.09 of SD1.5's FLOPs and parameters; VAE 32, 1/16
    of its FLOPs: the VAE's share of a step is a little below SD1.5's, so the speed-up is too) at one side² bucket,
    from n photo-like JPEGs of 1024–1536 px, decoded in the trainer's process (--workers 0, so that its CPU time holds
    them). Each source trains `steps[0]` and `steps[1]` steps; the difference of the two runs' CPU seconds over the
    difference of steps is the CPU cost of a step, without start-up and saving. CPU time, not wall time: on a machine shared with other jobs a step's wall time
    swings several-fold with their load, its CPU time much less. Also the median wall samples/s of each run's steps
    after the first. Reproduces the README's ratio (python bench.py --cache DIR)."""
    images, ckpt, cache = (os.path.join(folder, f) for f in ("images", "sd.safetensors", "cache"))
    if not os.path.isdir(images):
        write_bench_jpegs(images, n)
    torch.manual_seed(0)
    model.save(ckpt, model.UNet(model.UNetConfig(model_channels=96, context_dim=64)),
               model.CLIPTextModel(model.CLIPConfig.tiny()), model.VAE(model.VAEConfig(ch=32)))
    shape = ["--min-side", "0", "--bucket-area", str(side * side), "--bucket-min", str(side), "--bucket-max",
             str(side), "--bucket-step", "64", "--workers", "0", "--batch-size", str(batch)]
    zd.main(["cache", "--model", ckpt, "--data", images, "--out", cache, *shape])

    def cpu_seconds():
        own = resource.getrusage(resource.RUSAGE_SELF)
        return own.ru_utime + own.ru_stime

    cpu, wall = {"jpeg": [], "cache": []}, {"jpeg": [], "cache": []}
    for r in range(rounds):
        for name, src in (("jpeg", images), ("cache", cache)):
            used = []
            for k in steps:
                out = os.path.join(folder, f"run_{name}_{r}_{k}")
                c0 = cpu_seconds()
                zd.main(["train", "--model", ckpt, "--data", src, "--out", out, *shape, "--steps", str(k),
                         "--sample-every", "0", "--log-every", "1", "--text-cache", "0"])
                used.append(cpu_seconds() - c0)
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    wall[name] += [json.loads(line)["samples_s"] for line in list(f)[1:]]
            cpu[name].append((used[1] - used[0]) / (steps[1] - steps[0]))
    per_step = {name: statistics.median(v) for name, v in cpu.items()}
    return dict(cpu_s_per_step=per_step, ratio=per_step["jpeg"] / per_step["cache"],
                wall_samples_s={name: statistics.median(v) for name, v in wall.items()},
                bytes_per_image=data.describe_cache(cache)["bytes_per_image"], side=side, batch=batch)


def write_scan_folder(folder, n=10000, seed=0, scale=1):
    """n demo images (data.demo_sample) enlarged `scale` times as JPEGs, 1000 to a sub-folder, each with its caption in a
    .txt and a .json as img2dataset writes it: the original size (16 times the demo's, 1024–1536 px) and LAION-style
    scores, AESTHETIC_SCORE or aesthetic, pwatermark, punsafe, one in ten without an aesthetic score. The input of
    the README's scan speeds (scale 1: small files, so the scan's cost per file is what is timed) and contact sheet."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        img, caption = data.demo_sample(seed, i)
        meta = {"caption": caption, "original_width": img.width * 16, "original_height": img.height * 16,
                "AESTHETIC_SCORE" if i % 2 else "aesthetic": round(rng.normal(5.5, 0.8), 2),
                "pwatermark": round(rng.beta(0.5, 2), 3), "punsafe": round(rng.beta(0.3, 5), 3)}
        if i % 10 == 0:
            meta.pop("AESTHETIC_SCORE" if i % 2 else "aesthetic")
        stem = os.path.join(folder, f"{i // 1000:03d}", f"{i:06d}")
        os.makedirs(os.path.dirname(stem), exist_ok=True)
        img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(stem + ".jpg", quality=90)
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.write(caption)
        with open(stem + ".json", "w", encoding="utf-8") as f:
            json.dump(meta, f)


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench.py", description=bench.__doc__)
    p.add_argument("--quick", action="store_true", help="tiny configs and cheap parts only (seconds)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side after the warm-up (default 3)")
    p.add_argument("--batch", type=int, help="UNet batch (default 1 on CPU, 8 on GPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default cuda if available")
    p.add_argument("--threads", type=int, help="torch CPU threads (default torch's: the cores); on a shared machine "
                   "fewer threads than cores avoids waits on a descheduled thread in every op")
    p.add_argument("--train-full", action="store_true", help="CPU: time the training step at full SD1.5 width "
                   "(≈ 25 GB RAM per side) instead of half width")
    p.add_argument("--sample-full", action="store_true", help="CPU: sample 25 steps at 512² (≈ 8 min per side) "
                   "instead of 5 steps at 256²; always on GPU")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for the fraction of peak "
                   "(default: looked up for H100/H200/A100)")
    p.add_argument("--cache", metavar="DIR", help="instead: zd.py train's samples/s from JPEGs vs from a latent cache "
                   "of them, side by side on the CPU (cache_speedup), working in DIR")
    args = p.parse_args(argv)
    if args.cache:
        print(json.dumps(cache_speedup(args.cache), indent=1))
        return
    bench(args)


if __name__ == "__main__":
    main()
