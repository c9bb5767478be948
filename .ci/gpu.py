"""The parts of the GPU proof, one per process: `python3 .ci/gpu.py PART` (`.ci/gpu` runs them in order, each under its
own time cap). Each part adds its results to $OUT/gpu.json as it goes, so a part killed at its cap keeps what it
finished; `.ci/gpu.py --status PART RC` records how a part ended and rewrites the readable $OUT/gpu.md.

All on random weights with SD1.5's exact shapes: nothing is downloaded. ZD_GPU_DRYRUN=1 runs the same parts on the CPU
with tiny configs, so the script is exercised by the test suite while no GPU is around.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import bench  # noqa: E402
import model  # noqa: E402
import zd  # noqa: E402

DRY = os.environ.get("ZD_GPU_DRYRUN") == "1"
OUT = os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu")
WORK = os.environ.get("ZD_GPU_WORK") or os.path.join(tempfile.gettempdir(), "zd-gpu")
DEVICE = torch.device("cpu" if DRY else "cuda")
PARTS = ("env", "correctness", "sampling_fp16", "train", "nan", "torchrun", "speed", "profile", "sync", "train_gc",
         "compile")
PROMPT = "a photograph of an astronaut riding a horse"


def configs():
    """(UNet, VAE, CLIP) configs: SD1.5's, or the tiny ones that keep its layout for the dry run."""
    if DRY:
        return model.UNetConfig.tiny(), model.VAEConfig.tiny(), model.CLIPConfig.tiny()
    return model.UNetConfig(), model.VAEConfig(), model.CLIPConfig()


def record(part, **values):
    """Merge values into gpu.json[part] and write it atomically."""
    path = os.path.join(OUT, "gpu.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    results.setdefault(part, {}).update(values)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1, default=float)
    os.replace(path + ".tmp", path)


def check(part, name, ok, **values):
    """A named check of a part: its values and whether it passed; printed as it happens."""
    print(f"{part}: {name}: {'ok' if ok else 'FAILED'} {values}", flush=True)
    record(part, **{name: dict(ok=bool(ok), **values)})


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def rel_err(a, b):
    """max |a − b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def networks(dtype=torch.float32):
    """zd's UNet, VAE and CLIP with random weights at O(1) activations, built on the device."""
    unet_cfg, vae_cfg, clip_cfg = configs()
    with DEVICE:
        nets = model.UNet(unet_cfg), model.VAE(vae_cfg), model.CLIPTextModel(clip_cfg)
    return [bench.randomize(n, seed).to(dtype=dtype).eval() for seed, n in enumerate(nets)]


# ---- parts ------------------------------------------------------------------------------------------------------------

def part_env():
    versions = {}
    for name in ("diffusers", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    smi = shutil.which("nvidia-smi") and subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
        capture_output=True, text=True)
    record("env", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), dry_run=DRY, python=sys.version.split()[0],
           torch=torch.__version__, cuda=torch.version.cuda, device=torch.cuda.get_device_name() if not DRY else "cpu",
           nvidia_smi=smi.stdout.strip() if smi else None, cpus=os.cpu_count(), **versions)
    # the card's two ceilings as measured here: a large bf16 matrix product and a device-to-device copy
    n = 1024 if DRY else 8192
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    src = torch.randn(2 ** (20 if DRY else 28), device=DEVICE)
    dst = torch.empty_like(src)
    times = bench.alternate({"matmul": lambda: a @ b, "copy": lambda: dst.copy_(src)}, 10, 3, sync)
    record("env", matmul_bf16_tflops=2 * n ** 3 / bench.spread(times["matmul"])["median"] / 1e12,
           copy_tb_s=2 * src.numel() * 4 / bench.spread(times["copy"])["median"] / 1e12)
    check("env", "diffusers importable", versions["diffusers"] is not None, version=versions["diffusers"])


def part_correctness():
    """zd vs diffusers/transformers on the same tensors: fp32 with TF32 off (a tolerance), bf16 autocast (each side's
    error against zd's fp32 output, reported), and 25-step ZT sampling against diffusers' pipeline."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    unet, vae, clip = networks()
    ref_unet, ref_vae = bench.diffusers_twin(unet, "unet", unet.cfg), bench.diffusers_twin(vae, "vae", vae.cfg)
    ref_clip = bench.diffusers_twin(clip, "clip", clip.cfg)
    g = torch.Generator(DEVICE).manual_seed(0)
    lat, px = (8, 64) if DRY else (64, 512)
    x = torch.randn(2, 4, lat, lat, generator=g, device=DEVICE)
    t, ctx = torch.tensor([999, 500], device=DEVICE), torch.randn(2, 77, unet.cfg.context_dim, generator=g,
                                                                 device=DEVICE)
    images = torch.rand(1, 3, px, px, generator=g, device=DEVICE) * 2 - 1
    ids = model.Tokenizer.default()([PROMPT, "a plain black image"]).to(DEVICE)
    cases = {
        "UNet": (lambda: unet(x, t, ctx), lambda: ref_unet(x, t, encoder_hidden_states=ctx).sample),
        "VAE encode (mean)": (lambda: vae.encode(images)[0], lambda: ref_vae.encode(images).latent_dist.mean),
        "VAE decode": (lambda: vae.decode(x[:1]), lambda: ref_vae.decode(x[:1]).sample),
        "CLIP text": (lambda: clip(ids), lambda: ref_clip(ids).last_hidden_state),
    }
    bf16 = torch.autocast(DEVICE.type, torch.bfloat16)
    with torch.no_grad():
        for name, (ours, theirs) in cases.items():
            o32, t32 = ours(), theirs()
            with bf16:
                o16, t16 = ours().float(), theirs().float()
            check("correctness", name, rel_err(o32, t32) < 1e-4 and math.isfinite(rel_err(o16, o32)),
                  fp32_rel_err=rel_err(o32, t32), bf16_rel_err_ours=rel_err(o16, o32),
                  bf16_rel_err_diffusers=rel_err(t16, o32))

    steps = 2 if DRY else 25
    sd = model.SD(unet, vae, clip, model.Tokenizer.default(), dict(prediction="v", ztsnr=True))
    ours = zd.generate(sd, [PROMPT], steps=steps, seed=0, width=px, height=px, progress=False)
    pipe = bench.zt_pipeline(unet, vae, clip, os.path.join(WORK, "tokenizer"))
    theirs = bench.diffusers_sample(pipe, [PROMPT], steps, px)
    theirs = torch.from_numpy((theirs * 255).round().astype(np.uint8))
    diff = (ours.int() - theirs.int()).abs()
    check("correctness", f"sampling fp32, {steps} steps, {px}²", diff.max() <= 2, max_pixel_diff=diff.max().item(),
          mean_pixel_diff=diff.float().mean().item(), image_std=ours.float().std().item())

def part_sampling_fp16():
    """Sampling as `zd.py sample` runs on a GPU, in fp16, against diffusers' pipeline in fp16 on the same networks,
    with diffusers' own draw of the noise and with zd's noise handed in as latents."""
    unet, vae, clip = networks(torch.float16)
    px, steps = (64, 2) if DRY else (512, 25)
    sd = model.SD(unet, vae, clip, model.Tokenizer.default(), dict(prediction="v", ztsnr=True))
    ours = zd.generate(sd, [PROMPT], steps=steps, seed=0, width=px, height=px, progress=False)
    pipe = bench.zt_pipeline(unet, vae, clip, os.path.join(WORK, "tokenizer"))
    noise = torch.randn((1, 4, px // 8, px // 8), generator=torch.Generator("cpu").manual_seed(0))
    for name, latents in (("diffusers' own noise draw", None), ("zd's noise as latents", noise.half().to(DEVICE))):
        theirs = bench.diffusers_sample(pipe, [PROMPT], steps, px, latents)
        nans = int(np.isnan(theirs).sum())
        theirs = torch.from_numpy((np.nan_to_num(theirs) * 255).round().astype(np.uint8))
        diff = (ours.int() - theirs.int()).abs()
        check("sampling_fp16", name, diff.float().mean() < 2 and not nans, max_pixel_diff=diff.max().item(),
              mean_pixel_diff=diff.float().mean().item(), diffusers_nan_values=nans,
              mean_ours=ours.float().mean().item(), mean_diffusers=theirs.float().mean().item())


def write_jpegs(folder, n):
    """n captioned JPEGs: 1024–1536 px photo-like ones (bench.write_bench_jpegs) on a GPU, 64–96 px for the dry run."""
    if not DRY:
        return bench.write_bench_jpegs(folder, n)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = (int(s) for s in rng.integers(64, 97, 2))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:03d}.jpg"))
        with open(os.path.join(folder, f"{i:03d}.txt"), "w") as f:
            f.write(f"test image {i}")


def train_flags():
    """The `zd.py train` flags of the end-to-end runs: batch 8 at the recipe's 512² buckets, no sample grids."""
    if DRY:
        return ["--batch-size", "2", "--workers", "0", "--min-side", "64", "--bucket-area", str(64 * 64),
                "--bucket-min", "64", "--bucket-max", "64", "--bucket-step", "64"]
    return ["--batch-size", "8", "--workers", "8"]


def zd_train(part, out, *flags):
    """`python zd.py train` in a fresh process (its output into this part's log); (seconds, metrics lines)."""
    t0 = time.time()
    cmd = [sys.executable, "zd.py", "train", "--out", out, "--sample-every", "0", "--save-every", "100000",
           "--log-every", "1" if DRY else "10", *train_flags(), *flags]
    print(f"{part}: $ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return time.time() - t0, [json.loads(line) for line in f]


def prepare_training_inputs():
    """A full-size random SD1.5 single file (fp16, unmarked: what v1-5-pruned-emaonly is) and 64 captioned JPEGs,
    written once to local disk."""
    ckpt, jpegs = os.path.join(WORK, "sd15.safetensors"), os.path.join(WORK, "jpegs")
    if not os.path.exists(ckpt):
        t0 = time.time()
        unet, vae, clip = networks()
        model.save(ckpt, unet, clip, vae, half=True, prediction="eps", ztsnr=False)
        del unet, vae, clip
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()                       # the training process needs the memory
        record("train", checkpoint=dict(seconds=time.time() - t0, gb=os.path.getsize(ckpt) / 2 ** 30))
    if not os.path.isdir(jpegs):
        t0 = time.time()
        write_jpegs(jpegs, 64 if not DRY else 8)
        record("train", jpegs=dict(n=64 if not DRY else 8, seconds=time.time() - t0))
    return ckpt, jpegs


def interval(metrics):
    """The last logged interval: its samples/s and peak GPU memory (the first interval includes start-up)."""
    m = metrics[-1]
    return dict(samples_s=m["samples_s"], it_s=m["it_s"], gpu_peak_gb=m.get("gpu_mem_gb"), loss=m["loss"])


def part_train():
    """`zd.py train` end to end: 30 steps at batch 8 in bf16, then --resume to 40 (ZD_GPU_TRAIN_STEPS=30,40); both
    files load and are marked."""
    ckpt, jpegs = prepare_training_inputs()
    out = os.path.join(WORK, "run")
    shutil.rmtree(out, ignore_errors=True)
    steps = (3, 4) if DRY else tuple(int(s) for s in os.environ.get("ZD_GPU_TRAIN_STEPS", "30,40").split(","))
    seconds, metrics = zd_train("train", out, "--model", ckpt, "--data", jpegs, "--steps", str(steps[0]))
    finite = all(math.isfinite(m["loss"]) for m in metrics)
    check("train", f"{steps[0]} steps", finite and metrics[-1]["step"] == steps[0], seconds=seconds,
          **interval(metrics))
    # the resumed run also renders the EMA sample grid in the training process at its last step
    seconds, metrics = zd_train("train", out, "--resume", "--steps", str(steps[1]), "--sample-every", str(steps[1]),
                                "--sample-prompt", PROMPT, *(["--sample-size", "64", "64"] if DRY else []))
    state = json.load(open(os.path.join(out, "train_state.json")))
    grid = os.path.join(out, "samples", f"step_{steps[1]:06d}", "grid.png")
    check("train", f"--resume to {steps[1]}", state["step"] == steps[1] and metrics[-1]["step"] == steps[1]
          and os.path.exists(grid), seconds=seconds, sample_grid=os.path.exists(grid), **interval(metrics))
    t0 = time.time()
    cmd = [sys.executable, "zd.py", "sample", "--model", os.path.join(out, "model_ema.safetensors"), "--prompt",
           PROMPT, "--steps", "5", "--n", "2", "--out", os.path.join(WORK, "sampled")]
    if DRY:
        cmd += ["--width", "64", "--height", "64"]
    print(f"train: $ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    pngs = sorted(os.listdir(os.path.join(WORK, "sampled")))
    check("train", "zd.py sample (fp16 on a GPU)", pngs == ["000.png", "001.png", "grid.png"], files=pngs,
          seconds=time.time() - t0)
    t0 = time.time()
    init = model.load(ckpt, verbose=False).unet.state_dict()
    for name in ("model", "model_ema"):
        sd = model.load(os.path.join(out, f"{name}.safetensors"), verbose=False)
        moved = any(not torch.equal(v.float(), init[k].float()) for k, v in sd.unet.state_dict().items())
        check("train", f"{name}.safetensors loads", sd.meta["prediction"] == "v" and sd.meta["ztsnr"] and moved,
              prediction=sd.meta["prediction"], ztsnr=sd.meta["ztsnr"], unet_moved=moved,
              gb=os.path.getsize(os.path.join(out, f"{name}.safetensors")) / 2 ** 30)
    record("train", load_seconds=time.time() - t0,
           train_state_gb=os.path.getsize(os.path.join(out, "train_state.safetensors")) / 2 ** 30)
    shutil.rmtree(out)                                     # 20+ GB: the disk is needed by the next parts


def part_train_gc():
    """The same run with --grad-checkpointing: peak memory and speed against part `train`'s."""
    ckpt, jpegs = prepare_training_inputs()
    out = os.path.join(WORK, "gc")
    shutil.rmtree(out, ignore_errors=True)
    seconds, metrics = zd_train("train_gc", out, "--model", ckpt, "--data", jpegs, "--steps", "2" if DRY else "20",
                                "--grad-checkpointing")
    check("train_gc", "--grad-checkpointing", all(math.isfinite(m["loss"]) for m in metrics), seconds=seconds,
          **interval(metrics))
    shutil.rmtree(out)


def part_nan():
    """A non-finite step on the device: fused AdamW leaves weights and its step count alone (the found_inf path), the
    run stops after --max-bad-steps in a row with the state of the last good step."""
    out = os.path.join(WORK, "nan")
    shutil.rmtree(out, ignore_errors=True)
    calls, before, forward = [], {}, model.UNet.forward

    def poisoned(self, x, t, context):
        calls.append(1)
        if len(calls) == 2:                                # the weights after step 1, before any poisoned step
            before.update({k: v.detach().clone() for k, v in self.state_dict().items()})
        out = forward(self, x, t, context)
        return out * float("nan") if len(calls) > 1 else out
    model.UNet.forward = poisoned
    try:
        zd.train(zd.parser().parse_args(["train", "--out", out, "--steps", "10", "--max-bad-steps", "3", "--device",
                                         DEVICE.type, "--batch-size", "4", "--workers", "0", "--sample-every", "0",
                                         "--log-every", "1"]))
        stopped = False
    except zd.UserError as e:
        stopped = "3 steps in a row" in str(e)
    finally:
        model.UNet.forward = forward
    state = json.load(open(os.path.join(out, "train_state.json")))
    saved = load_file(os.path.join(out, "train_state.safetensors"))
    same = all(torch.equal(saved["unet." + k].to(v.device), v) for k, v in before.items())
    steps = {v.item() for k, v in saved.items() if k.startswith("opt.") and k.endswith(".step")}
    check("nan", "non-finite steps skipped", stopped and same and steps == {1.0} and state["step"] == 4
          and state["counters"]["skipped"] == 3, stopped_with_message=stopped, weights_unchanged=same,
          adam_steps=sorted(steps), step=state["step"], skipped=state["counters"]["skipped"])


def part_torchrun():
    """One process under torchrun: the process group (NCCL on a GPU) and DDP train 5 demo steps."""
    out = os.path.join(WORK, "ddp")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "zd.py", "train",
           "--out", out, "--steps", "5", "--batch-size", "4", "--workers", "0", "--sample-every", "0",
           "--log-every", "1"]
    print(f"torchrun: $ {' '.join(cmd)}", flush=True)
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(run.stdout[-3000:], run.stderr[-3000:], flush=True)
    backend = "nccl" if DEVICE.type == "cuda" else "gloo"
    steps = json.load(open(os.path.join(out, "train_state.json")))["step"] if run.returncode == 0 else None
    check("torchrun", f"1 process, DDP over {backend}", run.returncode == 0 and f"(DDP, {backend})" in run.stdout
          and steps == 5, returncode=run.returncode, step=steps)


def part_speed():
    """bench.py on the device: UNet, VAE, CLIP, the recipe's training step (TFLOP/s, fraction of bf16 peak, peak
    memory per side), sampling 25 steps at 512² batch 4 in fp16, the data pipeline; zd against diffusers."""
    args = argparse.Namespace(quick=DRY, json=True, repeats=1 if DRY else 5, batch=None, device=DEVICE.type,
                              threads=1 if DRY else None, train_full=False, sample_full=False, peak_tflops=None)
    with contextlib.redirect_stdout(sys.stderr):
        result = bench.bench(args)
    record("speed", **result)
    step = next(r for r in result["rows"] if r["name"].startswith("training step"))
    check("speed", "bench ran", all(r.get("ours") or r.get("data_ips") for r in result["rows"]),
          train_ratio=step["ratio"], train_tflops=step["ours"].get("tflops"))


def training_state():
    """(trainer state, latents, context) for the recipe's step on zd's UNet at batch 8, 64² latents, channels-last."""
    unet_cfg = configs()[0]
    layout = torch.channels_last if DEVICE.type == "cuda" else torch.contiguous_format
    batch, lat = (2, 8) if DRY else (8, 64)
    with DEVICE:
        net = model.UNet(unet_cfg).to(memory_format=layout)
    latents = torch.randn(batch, 4, lat, lat, device=DEVICE).to(memory_format=layout)
    return net, latents, torch.randn(batch, 77, unet_cfg.context_dim, device=DEVICE)


def part_profile():
    """Where the training step's GPU time goes (torch.profiler, 3 steps of zd's UNet at batch 8), by kind of kernel,
    and how samples/s and TFLOP/s grow with the batch."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode
    net, latents, context = training_state()
    state = bench.trainer(net, bench.OURS_CALL)
    autocast = lambda: torch.autocast(DEVICE.type, torch.bfloat16, enabled=DEVICE.type == "cuda")
    for i in range(2):
        bench.recipe_step(state, latents, context, i, DEVICE, autocast)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(3):
            bench.recipe_step(state, latents, context, i, DEVICE, autocast)
        sync()
    kinds = {"matmul/conv": ("gemm", "conv", "cutlass", "sm90", "xmma", "cudnn", "implicit", "dgrad", "wgrad", "nchw",
                             "nhwc", "mm", "addmm"),
             "attention": ("flash", "fmha", "attention", "efficient", "sdpa"),
             "normalisation": ("norm", "welford"), "optimizer/EMA": ("adam", "lerp", "foreach", "multi_tensor"),
             "copies/layout": ("copy", "cat", "transpose", "contiguous", "permute")}
    by_kind, total, top = {}, 0.0, []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) if DEVICE.type == "cuda" else e.self_cpu_time_total
        if not t or (DEVICE.type == "cuda" and e.device_type.name != "CUDA"):
            continue
        total += t
        name = e.key.lower()
        kind = next((k for k, words in kinds.items() if any(w in name for w in words)), "elementwise/other")
        by_kind[kind] = by_kind.get(kind, 0) + t
        top.append((t, e.key[:90], e.count))
    top.sort(reverse=True)
    record("profile", gpu_ms_per_step=total / 3 / 1e3, share={k: v / total for k, v in sorted(by_kind.items())},
           top_kernels=[dict(share=t / total, calls=c, name=n) for t, n, c in top[:15]])
    scaling = {}
    unet_cfg = configs()[0]
    for batch in ((2, 4) if DRY else (8, 16, 32)):
        layout = torch.channels_last if DEVICE.type == "cuda" else torch.contiguous_format
        x = torch.randn(batch, *latents.shape[1:], device=DEVICE).to(memory_format=layout)
        ctx = torch.randn(batch, 77, unet_cfg.context_dim, device=DEVICE)
        with FlopCounterMode(display=False) as counter:
            bench.recipe_step(state, x, ctx, 0, DEVICE, autocast)
        times = bench.alternate({"step": lambda: bench.recipe_step(state, x, ctx, 1, DEVICE, autocast)},
                                1 if DRY else 5, 1, sync)["step"]
        s = bench.spread(times)["median"]
        scaling[batch] = dict(seconds=s, samples_s=batch / s, tflops=counter.get_total_flops() / s / 1e12)
    check("profile", "batch scaling", True, **{f"batch {b}": v for b, v in scaling.items()})


def part_sync():
    """What a host sync per training step costs: 10 recipe steps back to back, reading the loss (`.item()`) after
    each, or only after the last."""
    net, latents, context = training_state()
    state = bench.trainer(net, bench.OURS_CALL)
    autocast = lambda: torch.autocast(DEVICE.type, torch.bfloat16, enabled=DEVICE.type == "cuda")
    n = 10

    def steps(each):
        for i in range(n):
            loss = bench.recipe_step(state, latents, context, i, DEVICE, autocast)
            if each:
                loss.item()
        loss.item()
    times = bench.alternate({"sync_after_last": lambda: steps(False), "sync_every_step": lambda: steps(True)},
                            1 if DRY else 3, 1, sync)
    per_step = {k: bench.spread([s / n for s in v]) for k, v in times.items()}
    cost = per_step["sync_every_step"]["median"] / per_step["sync_after_last"]["median"] - 1
    check("sync", "host sync per step", True, per_step=per_step, relative_cost=cost)


def part_compile():
    """torch.compile on the recipe's training step (zd.py train --compile): compile time, then step time against eager.
    The dry run traces with the 'eager' backend (no code generation) to exercise the same path in seconds."""
    net, latents, context = training_state()
    autocast = lambda: torch.autocast(DEVICE.type, torch.bfloat16, enabled=DEVICE.type == "cuda")
    eager = bench.trainer(net, bench.OURS_CALL)
    compiled = bench.trainer(torch.compile(net, backend="eager" if DRY else "inductor"), bench.OURS_CALL)
    t0 = time.time()
    bench.recipe_step(compiled, latents, context, 0, DEVICE, autocast).item()
    record("compile", compile_seconds=time.time() - t0)
    steps = iter(range(1, 10 ** 6))
    times = bench.alternate({k: (lambda s=s: bench.recipe_step(s, latents, context, next(steps), DEVICE, autocast))
                             for k, s in (("eager", eager), ("compiled", compiled))}, 1 if DRY else 5, 2, sync)
    spread = {k: bench.spread(v) for k, v in times.items()}
    check("compile", "training step", True, compile_seconds=time.time() - t0, step=spread,
          speedup=spread["eager"]["median"] / spread["compiled"]["median"])


# ---- the report ---------------------------------------------------------------------------------------------------------

def report():
    """gpu.md from gpu.json: one section per part, its status and its checks."""
    results = json.load(open(os.path.join(OUT, "gpu.json")))
    env = results.get("env", {})
    lines = [f"# zd on a GPU — {env.get('device')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
             f"diffusers {env.get('diffusers')}, transformers {env.get('transformers')}, {env.get('date')}"
             + (" — DRY RUN on the CPU, tiny configs" if env.get("dry_run") else ""), ""]
    for part in PARTS:
        r = results.get(part)
        if r is None:
            continue
        lines.append(f"## {part}: {r.get('status', 'running')}")
        if part == "speed" and "rows" in r:
            lines += ["", "| what | zd (s) | diffusers (s) | zd/diffusers | notes |", "|---|---|---|---|---|"]
            for row in r["rows"]:
                if "data_ips" in row:
                    lines.append(f"| {row['name']} | {row['data_ips']:.1f} images/s | | | training step "
                                 f"{row['train_ips']:.2f} images/s |")
                    continue
                cell = lambda s: f"{s['median']:.4f} ({s['min']:.4f}–{s['max']:.4f})" if s else "—"
                notes = "; ".join(f"{side}: {row[side]['tflops']:.0f} TFLOP/s = {row[side]['peak_fraction']:.0%}"
                                  for side in ("ours", "diffusers") if row.get(side) and row[side].get("tflops")
                                  and row[side].get("peak_fraction"))
                notes += "; ".join(f" {side} peak {m['peak_gb']:.2f} GB" for side, m in row.get("memory", {}).items())
                ratio = f"{row['ratio']:.3f}" if row.get("ratio") else "—"
                lines.append(f"| {row['name']} | {cell(row['ours'])} | {cell(row.get('diffusers'))} | {ratio} | "
                             f"{notes} |")
        for k, v in r.items():
            if k in ("status", "rows", "info"):
                continue
            lines.append(f"- **{k}**: " + (json.dumps(v, default=float) if not isinstance(v, str) else v))
        lines.append("")
    with open(os.path.join(OUT, "gpu.md"), "w") as f:
        f.write("\n".join(lines))
    return "\n".join(lines)


def main():
    os.makedirs(OUT, exist_ok=True)
    os.makedirs(WORK, exist_ok=True)
    if sys.argv[1] == "--status":                         # .ci/gpu PART RC: how the part's process ended
        part, rc = sys.argv[2], int(sys.argv[3])
        path = os.path.join(OUT, "gpu.json")
        checks = json.load(open(path)).get(part, {}) if os.path.exists(path) else {}
        failed = [k for k, v in checks.items() if isinstance(v, dict) and v.get("ok") is False]
        status = ("timed out" if rc in (124, 137) else f"failed (exit {rc})" if rc else
                  f"failed: {', '.join(failed)}" if failed else "ok")
        record(part, status=status)
        report()
        print(f"== {part}: {status}", flush=True)
        return
    if sys.argv[1] == "--parts":
        print(" ".join(PARTS))
        return
    if sys.argv[1] == "--report":
        print(report())
        return
    if sys.argv[1] not in PARTS:
        raise SystemExit(f"gpu.py: unknown part {sys.argv[1]!r}: one of {', '.join(PARTS)}")
    record(sys.argv[1], status="running", started=time.strftime("%H:%M:%S"))
    globals()["part_" + sys.argv[1]]()


if __name__ == "__main__":
    main()
