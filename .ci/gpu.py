"""The parts of the GPU proof, one per process: `python3 .ci/gpu.py PART` (`.ci/gpu` runs them in order, each under its
own time cap). Each part adds its results to $OUT/gpu.json as it goes, so a part killed at its cap keeps what it
finished; `.ci/gpu.py --status PART RC` records how a part ended and rewrites the readable $OUT/gpu.md.

All on random weights with SD1.5's exact shapes: nothing is downloaded. ZD_GPU_DRYRUN=1 runs the same parts on the CPU
with tiny configs, so the script is exercised by the test suite while no GPU is around.
"""
import argparse
import contextlib
import copy
import functools
import gc
import json
import math
import os
import shutil
import signal
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
import schedule as S  # noqa: E402
import zd  # noqa: E402

DRY = os.environ.get("ZD_GPU_DRYRUN") == "1"
OUT = os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu")
WORK = os.environ.get("ZD_GPU_WORK") or os.path.join(tempfile.gettempdir(), "zd-gpu")
DEVICE = torch.device("cpu" if DRY else "cuda")
# in the order of what they answer: the step measured to the kernel (a plain `bash .ci/gpu`, ≈ 9 min), then the proof
# of correctness (`bash .ci/gpu all` adds it, as the budget allows; or name the parts)
STEP_PARTS = ("env", "step", "batch", "levers", "train_cache", "sampling_fp16")
PARTS = STEP_PARTS + ("speed", "correctness", "train", "nan", "torchrun", "train_gc")
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
    times = bench.alternate({"matmul": lambda: a @ b}, 10, 3, sync)
    record("env", peak_bf16_tflops=card_peak(),
           matmul_bf16_tflops=2 * n ** 3 / bench.spread(times["matmul"])["median"] / 1e12,
           copy_tb_s=copy_bandwidth() / 1e12)
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
    """The fp16 sampling question: zd's and diffusers' pipelines in fp16 and in fp32 on the same networks and the same
    initial noise (zd.generate's fp32 draw of seed 0, handed to diffusers as `latents=` in the pipeline's dtype), each
    pair's difference in uint8; and diffusers' own fp16 draw, which is another noise than the fp32 draw of that seed."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False     # fp32 means fp32
    nets32 = networks()
    nets16 = [copy.deepcopy(n).half() for n in nets32]
    px, steps = (64, 2) if DRY else (512, 25)
    noise = torch.randn((1, 4, px // 8, px // 8), generator=torch.Generator("cpu").manual_seed(0))
    images, nans = {}, {}
    for name, (unet, vae, clip) in (("fp32", nets32), ("fp16", nets16)):
        sd = model.SD(unet, vae, clip, model.Tokenizer.default(), dict(prediction="v", ztsnr=True))
        images[f"zd {name}"] = zd.generate(sd, [PROMPT], steps=steps, seed=0, width=px, height=px, progress=False)
        pipe = bench.zt_pipeline(unet, vae, clip, os.path.join(WORK, "tokenizer"))
        draws = {f"diffusers {name}": noise.to(DEVICE, unet.time_embed[0].weight.dtype)}
        if name == "fp16":
            draws["diffusers fp16, its own noise draw"] = None
        for label, latents in draws.items():
            out = bench.diffusers_sample(pipe, [PROMPT], steps, px, latents)
            nans[label] = int(np.isnan(out).sum())
            images[label] = torch.from_numpy((np.nan_to_num(out) * 255).round().astype(np.uint8))
    pairs = {}
    for a, b in (("zd fp16", "diffusers fp16"), ("zd fp16", "zd fp32"), ("diffusers fp16", "diffusers fp32"),
                 ("zd fp32", "diffusers fp32"), ("zd fp16", "diffusers fp16, its own noise draw")):
        diff = (images[a].int() - images[b].int()).abs().float()
        pairs[f"{a} vs {b}"] = dict(mean=diff.mean().item(), max=diff.max().item())
    record("sampling_fp16", size=px, steps=steps, pairs=pairs, diffusers_nan_values=nans,
           image_means={k: v.float().mean().item() for k, v in images.items()})
    own = pairs["zd fp16 vs zd fp32"]
    check("sampling_fp16", "zd fp16 within 2 (mean, uint8) of zd fp32", own["mean"] < 2, **own)
    same = pairs["zd fp32 vs diffusers fp32"]
    check("sampling_fp16", "zd fp32 = diffusers fp32 to 2 in uint8", same["max"] <= 2, **same)


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


TRAIN_BATCH = 2 if DRY else 8


def train_flags(batch=None):
    """The `zd.py train` flags of the end-to-end runs: batch 8 (default) at the recipe's 512² buckets."""
    flags = ["--batch-size", str(batch or TRAIN_BATCH)]
    if DRY:
        return flags + ["--workers", "0", "--min-side", "64", "--bucket-area", str(64 * 64), "--bucket-min", "64",
                        "--bucket-max", "64", "--bucket-step", "64"]
    return flags + ["--workers", "8"]


def zd_train(part, out, *flags):
    """`python zd.py train` in a fresh process (its output into this part's log); (seconds, metrics lines)."""
    t0 = time.time()
    cmd = [sys.executable, "zd.py", "train", "--out", out, "--sample-every", "0", "--save-every", "100000",
           "--log-every", "1" if DRY else "10", *train_flags(), *flags]
    print(f"{part}: $ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return time.time() - t0, [json.loads(line) for line in f]


def prepare_training_inputs(part):
    """A full-size random SD1.5 single file (fp16, unmarked: what v1-5-pruned-emaonly is) and 64 captioned JPEGs,
    written once to local disk by the first part that needs them (which records how long that took)."""
    ckpt, jpegs = os.path.join(WORK, "sd15.safetensors"), os.path.join(WORK, "jpegs")
    if not os.path.exists(ckpt):
        t0 = time.time()
        unet, vae, clip = networks()
        model.save(ckpt, unet, clip, vae, half=True, prediction="eps", ztsnr=False)
        del unet, vae, clip
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()                       # the training process needs the memory
        record(part, checkpoint=dict(seconds=time.time() - t0, gb=os.path.getsize(ckpt) / 2 ** 30))
    if not os.path.isdir(jpegs):
        t0 = time.time()
        write_jpegs(jpegs, 64 if not DRY else 8)
        record(part, jpegs=dict(n=64 if not DRY else 8, seconds=time.time() - t0))
    return ckpt, jpegs


def interval(metrics):
    """The last logged interval: its samples/s and peak GPU memory (the first interval includes start-up)."""
    m = metrics[-1]
    return dict(samples_s=m["samples_s"], it_s=m["it_s"], gpu_peak_gb=m.get("gpu_mem_gb"), loss=m["loss"])


def part_train():
    """`zd.py train` end to end: 30 steps at batch 8 in bf16, then --resume to 40 (ZD_GPU_TRAIN_STEPS=30,40); both
    files load and are marked."""
    ckpt, jpegs = prepare_training_inputs("train")
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
    ckpt, jpegs = prepare_training_inputs("train_gc")
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


# ---- the training step, measured to the kernel ------------------------------------------------------------------------

LAYOUT = torch.channels_last if DEVICE.type == "cuda" else torch.contiguous_format    # zd.train's, on each device
STEP_BATCH, STEP_PX = (2, 64) if DRY else (8, 512)
STEP_BATCHES = (1, 2) if DRY else (8, 16, 32, 64)


def autocast():
    """zd.train's autocast: bf16 on a GPU, off on the CPU."""
    return torch.autocast(DEVICE.type, torch.bfloat16, enabled=DEVICE.type == "cuda")


def training_nets():
    """zd's UNet (channels-last on a GPU, as zd.train lays it out) and the frozen fp32 VAE, CLIP and tokenizer, with
    TF32 allowed for the frozen networks as zd.train allows it."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    unet, vae, clip = networks()
    return unet.to(memory_format=LAYOUT), vae, clip, model.Tokenizer.default()


def step_inputs(batch, px=STEP_PX, clip=None, tokenizer=None):
    """One batch as the loader hands it to zd.train (pixels in [−1, 1], pinned on a GPU machine; captions; global
    indices), and as a latent cache would: the VAE posterior's mean and std (random: the step's cost does not depend
    on their values) and, given CLIP, the captions' embeddings."""
    g = torch.Generator().manual_seed(batch)
    lat = px // 8
    pin = (lambda x: x.pin_memory()) if DEVICE.type == "cuda" else (lambda x: x)
    inputs = dict(pixels=pin(torch.rand(batch, 3, px, px, generator=g) * 2 - 1),
                  mean=pin(torch.randn(batch, 4, lat, lat, generator=g)),
                  std=pin(torch.rand(batch, 4, lat, lat, generator=g) * 0.1),
                  captions=[f"{PROMPT}, number {i}" for i in range(batch)], index=torch.arange(batch))
    if clip is not None:
        with torch.no_grad():
            inputs["context"] = clip(tokenizer(inputs["captions"]).to(DEVICE))
    return inputs


def train_step(trainer, frozen, inputs, step, given=(), host_sync=True, layout=LAYOUT, mark=lambda phase: None):
    """One step of `zd.py train` (no gradient accumulation), made of the loop's own pieces in its order: the CPU
    noise draw, the inputs' copies, the frozen VAE and CLIP, the recipe's inputs, forward, backward, clip-grad-norm, the
    host reading the norm (to skip a non-finite step), AdamW, EMA. `trainer` is bench.trainer's (network, call, AdamW,
    EMA tensors), `frozen` (VAE, CLIP, tokenizer). `given` names what a cache hands in instead of a network: "latents"
    (the posterior's mean and std, so x0 = mean + std·posterior noise without the VAE), "text" (the CLIP embeddings).
    `mark(phase)` is called as each phase has been issued. Returns the loss, on the device."""
    net, call, opt, ema = trainer
    vae, clip, tokenizer = frozen
    params = opt.param_groups[0]["params"]
    shape = (4, *inputs["mean"].shape[-2:])
    t, noise, ip_noise, posterior_noise = zd.sample_noise(0, step, inputs["index"], shape)[:4]
    mark("noise draw (CPU)")
    t, noise, ip_noise, posterior_noise = (zd.to_device(a, DEVICE) for a in (t, noise, ip_noise, posterior_noise))
    if "latents" in given:
        mean, std = zd.to_device(inputs["mean"], DEVICE), zd.to_device(inputs["std"], DEVICE)
    else:
        pixels = zd.to_device(inputs["pixels"], DEVICE)
    mark("input copies")
    with torch.no_grad():
        if "latents" not in given:
            mean, logvar = vae.encode(pixels)
            std = (0.5 * logvar).exp()
            mark("VAE encode")
        x0 = model.VAE_SCALE * (mean + std * posterior_noise)     # a posterior sample, as model.SD.encode draws it
        if "text" in given:
            context = inputs["context"]
        else:
            context = clip(zd.to_device(tokenizer(inputs["captions"]), DEVICE))
            mark("text encoder (CLIP)")
    x_t, target, weight = zd.recipe_inputs(x0, noise, ip_noise, t, *zt_schedule())
    x_t = x_t.contiguous(memory_format=layout)
    mark("recipe inputs")
    with autocast():
        loss, _ = S.weighted_mse(call(net, x_t, t, context), target, weight)
        mark("forward")
        loss.backward()
    mark("backward")
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    mark("clip grad norm")
    good = bool(torch.isfinite(norm)) if host_sync else True
    mark("host sync (reading the norm)")
    if good:
        opt.step()
    opt.zero_grad(set_to_none=True)
    mark("AdamW")
    S.ema_update(ema, params, 0.9999)
    mark("EMA")
    return loss.detach()


@functools.cache
def zt_schedule():
    """ᾱ and the SNR of the zero-terminal-SNR schedule on the device, float64 as zd.train holds them (pitfall 8); moved
    once, as zd.train moves them, not at import (the report's processes need no GPU)."""
    return bench.ZT_ABAR.to(DEVICE), bench.ZT_SNR.to(DEVICE)


def timed(fns, steps_per_call=1, repeats=None):
    """{name: spread of seconds per step} of each fn(step) called steps_per_call times a round, alternating (ABBA)
    after a warm-up round."""
    counter = iter(range(10 ** 6))
    calls = {k: (lambda fn=fn: [fn(next(counter)) for _ in range(steps_per_call)]) for k, fn in fns.items()}
    times = bench.alternate(calls, repeats or (1 if DRY else 5), 1, sync)
    return {k: bench.spread([s / steps_per_call for s in v]) for k, v in times.items()}


def unet_flops(trainer, frozen, inputs):
    """The FLOPs of one step's UNet forward and backward (torch.utils.flop_counter, as bench.py counts them): a step
    with latents and text embeddings given, so the frozen encoders' FLOPs are not counted."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        train_step(trainer, frozen, inputs, 0, given=("latents", "text"))
    return counter.get_total_flops()


def speed(seconds, batch, flops, peak):
    """samples/s, TFLOP/s and the fraction of the card's dense bf16 peak of a step taking `seconds`."""
    tflops = flops / seconds / 1e12
    return dict(ms=seconds * 1e3, samples_s=batch / seconds, tflops=tflops, peak_fraction=peak and tflops / peak)


def card_peak():
    """The card's dense bf16 peak in TFLOP/s from bench's table by device name (None on the CPU or an unknown card)."""
    return bench.peak_bf16_tflops(torch.cuda.get_device_name()) if DEVICE.type == "cuda" else None


def copy_bandwidth():
    """Bytes read plus written per second by a device-to-device copy of 1 GiB (4 MiB in the dry run)."""
    src = torch.randn(2 ** (20 if DRY else 28), device=DEVICE)
    dst = torch.empty_like(src)
    times = bench.alternate({"copy": lambda: dst.copy_(src)}, 10, 3, sync)["copy"]
    return 2 * src.numel() * 4 / bench.spread(times)["median"]


# Bytes per fp32 parameter that the per-parameter phases of a step must move at the least: fused AdamW reads the
# parameter, its gradient and both moments and writes the parameter and the moments (Loshchilov & Hutter 2019, Alg. 2);
# the EMA's lerp reads the average and the parameter and writes the average; clip_grad_norm_ reads every gradient for
# the norm, then reads and writes it scaled (torch scales by min(1, max_norm/norm) whether or not it clips).
FLOOR_BYTES = {"AdamW": 7 * 4, "EMA": 3 * 4, "clip grad norm": 3 * 4}


def part_step():
    """Where a training step's time goes: zd.train's step (VAE and CLIP in the loop, batch 8 at 512², bf16,
    channels-last) phase by phase between device syncs, in ms and %, zd's UNet and diffusers' side by side; the step
    as the loop runs it (one host sync); the GPU kernels by kind (torch.profiler) and how much of the step the GPU is
    idle; and the memory-traffic floor of AdamW, EMA and clip-grad-norm at the card's measured copy bandwidth."""
    from torch.profiler import ProfilerActivity, profile
    bandwidth = copy_bandwidth()                           # first: its many short calls collect garbage each time
    unet, vae, clip, tokenizer = training_nets()
    frozen = (vae, clip, tokenizer)
    inputs = step_inputs(STEP_BATCH, clip=clip, tokenizer=tokenizer)
    sides = {"zd": bench.trainer(unet, bench.OURS_CALL),
             "diffusers": bench.trainer(bench.diffusers_twin(unet, "unet", unet.cfg).train(), bench.DIFFUSERS_CALL)}
    peak = card_peak()
    flops = unet_flops(sides["zd"], frozen, inputs)
    whole = timed({k: (lambda i, s=s: train_step(s, frozen, inputs, i)) for k, s in sides.items()}, 1 if DRY else 3)
    record("step", batch=STEP_BATCH, size=STEP_PX, peak_bf16_tflops=peak, unet_gflops_per_step=flops / 1e9,
           step={k: dict(seconds=v, **speed(v["median"], STEP_BATCH, flops, peak)) for k, v in whole.items()},
           zd_speed_over_diffusers=whole["diffusers"]["median"] / whole["zd"]["median"])

    phases = {k: {} for k in sides}
    for i in range(1 if DRY else 5):
        for name, state in sides.items():
            sync()
            t0 = [time.perf_counter()]

            def mark(phase, name=name):
                sync()
                now = time.perf_counter()
                phases[name].setdefault(phase, []).append(now - t0[0])
                t0[0] = now
            train_step(state, frozen, inputs, 100 + i, mark=mark)
    median = {k: {p: bench.spread(v)["median"] * 1e3 for p, v in ph.items()} for k, ph in phases.items()}
    total = {k: sum(v.values()) for k, v in median.items()}
    record("step", phases={p: {k: dict(ms=median[k][p], share=median[k][p] / total[k]) for k in sides}
                           for p in median["zd"]}, phases_total_ms={k: total[k] for k in sides})

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    profiled = 1 if DRY else 2                             # on the CPU the profiler records every aten call: slow
    with profile(activities=activities) as prof:
        for i in range(profiled):
            train_step(sides["zd"], frozen, inputs, 200 + i)
        sync()
    kinds = {"matmul/conv": ("gemm", "conv", "cutlass", "sm90", "xmma", "cudnn", "implicit", "dgrad", "wgrad", "nchw",
                             "nhwc", "mm", "addmm"),
             "attention": ("flash", "fmha", "attention", "efficient", "sdpa"),
             "normalisation": ("norm", "welford"), "optimizer/EMA": ("adam", "lerp", "foreach", "multi_tensor"),
             "copies/layout": ("copy", "cat", "transpose", "contiguous", "permute")}
    by_kind, busy, top = {}, 0.0, []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) if DEVICE.type == "cuda" else e.self_cpu_time_total
        if not t or (DEVICE.type == "cuda" and e.device_type.name != "CUDA"):
            continue
        busy += t
        name = e.key.lower()
        kind = next((k for k, words in kinds.items() if any(w in name for w in words)), "elementwise/other")
        by_kind[kind] = by_kind.get(kind, 0) + t
        top.append((t, e.key[:90], e.count))
    top.sort(reverse=True)
    busy_ms = busy / profiled / 1e3                        # µs over the profiled steps
    record("step", kernels=dict(busy_ms_per_step=busy_ms, idle_share=1 - busy_ms / whole["zd"]["median"] / 1e3,
                                share={k: v / busy for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
                                top=[dict(share=t / busy, calls=c // profiled, name=n) for t, n, c in top[:12]]))
    del prof

    n = sum(p.numel() for p in unet.parameters())
    floor = {p: dict(gb=n * b / 1e9, floor_ms=n * b / bandwidth * 1e3, measured_ms=median["zd"][p])
             for p, b in FLOOR_BYTES.items()}
    record("step", memory_floor=dict(parameters=n, copy_tb_s=bandwidth / 1e12, phases=floor))
    check("step", "phases measured", all(v > 0 for v in total.values()) and math.isfinite(busy_ms),
          zd_ms=total["zd"], diffusers_ms=total["diffusers"])


def state_bytes(trainer):
    """The memory a trainer holds apart from the weights it may share: AdamW's moments and the EMA copy."""
    _, _, opt, ema = trainer
    tensors = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)] + list(ema)
    return sum(t.numel() * t.element_size() for t in tensors)


def part_batch():
    """samples/s, TFLOP/s and peak memory of the step at batch 8, 16, 32, 64 (up to the largest that fits), with
    latents given (as from a cache) and CLIP in the loop, zd's UNet and diffusers' side by side on the same weights;
    where both no longer fit, diffusers' side is dropped and zd's goes on alone."""
    unet, vae, clip, tokenizer = training_nets()
    del vae                                                # not kept on the GPU while training from a cache
    frozen = (None, clip, tokenizer)
    sides = {"zd": bench.trainer(unet, bench.OURS_CALL),
             "diffusers": bench.trainer(bench.diffusers_twin(unet, "unet", unet.cfg).train(), bench.DIFFUSERS_CALL)}
    peak, cuda = card_peak(), DEVICE.type == "cuda"
    rows = {}
    for batch in STEP_BATCHES:
        inputs = step_inputs(batch, clip=clip, tokenizer=tokenizer)
        step = lambda state, i: train_step(state, frozen, inputs, i, given=("latents",))
        row = None
        while row is None and sides:
            try:
                memory = {}
                for name, state in sides.items():         # the first step at this batch, also its peak memory
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    step(state, 0)
                    if cuda:                               # what this side alone would hold at its peak
                        others = sum(state_bytes(s) for k, s in sides.items() if k != name)
                        memory[name] = (torch.cuda.max_memory_allocated() - others) / 2 ** 30
                flops = unet_flops(sides["zd"], frozen, inputs)
                times = timed({k: (lambda i, s=s: step(s, i)) for k, s in sides.items()}, 1, 1 if DRY else 3)
                row = {k: dict(seconds=v, peak_gb=memory.get(k), **speed(v["median"], batch, flops, peak))
                       for k, v in times.items()}
            except torch.OutOfMemoryError:
                pass
            if row is None:                                # out of memory: free the failed step, drop a side
                for state in sides.values():
                    state[2].zero_grad(set_to_none=True)
                gc.collect()
                torch.cuda.empty_cache()
                sides.pop("diffusers" if "diffusers" in sides else "zd")
                gc.collect()
                print(f"batch: out of memory at batch {batch}; going on with {list(sides) or 'nothing'}", flush=True)
        rows[batch] = row or "out of memory"
        if row and "diffusers" in row:
            row["zd_speed_over_diffusers"] = row["diffusers"]["seconds"]["median"] / row["zd"]["seconds"]["median"]
        record("batch", peak_bf16_tflops=peak, rows=rows)
        if row is None:
            break
    fitted = [b for b, r in rows.items() if isinstance(r, dict)]
    check("batch", "batch sweep", bool(fitted), largest_batch=max(fitted, default=None),
          best_samples_s=max((rows[b]["zd"]["samples_s"] for b in fitted), default=None))


@contextlib.contextmanager
def cudnn_benchmark():
    """cuDNN picks each convolution's fastest algorithm by timing them at a shape's first call."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def part_levers():
    """What each lever buys, against the same baseline in one process, alternating: zd.train's step today (VAE and
    CLIP in the loop, channels-last, eager, a host sync per step, batch 8 at 512²) and one change at a time — latents
    given (a latent cache), text embeddings given too, the other memory layout, no host sync, cudnn.benchmark; then,
    in a second round against the baseline again (so a compile that runs past the part's cap keeps the first),
    torch.compile with its compile time, and the cache with compile and cudnn.benchmark together. diffusers' UNet in
    the same step in both rounds. The dry run compiles with the 'eager' backend (no code generation)."""
    unet, vae, clip, tokenizer = training_nets()
    frozen = (vae, clip, tokenizer)
    inputs = step_inputs(STEP_BATCH, clip=clip, tokenizer=tokenizer)
    ours = bench.trainer(unet, bench.OURS_CALL)
    theirs = bench.trainer(bench.diffusers_twin(unet, "unet", unet.cfg).train(), bench.DIFFUSERS_CALL)
    other = torch.contiguous_format if LAYOUT == torch.channels_last else torch.channels_last
    relaid = bench.trainer(copy.deepcopy(unet).to(memory_format=other), bench.OURS_CALL)
    layout_name = "channels-first (NCHW)" if other == torch.contiguous_format else "channels-last (NHWC)"
    flops, peak = unet_flops(ours, frozen, inputs), card_peak()
    cache = ("latents", "text")

    def with_cudnn_benchmark(state, i, **kw):
        with cudnn_benchmark():
            return train_step(state, frozen, inputs, i, **kw)
    baseline = {"zd.py train today (baseline)": lambda i: train_step(ours, frozen, inputs, i),
                "diffusers' UNet, same step": lambda i: train_step(theirs, frozen, inputs, i)}
    rows = {}

    def measure(variants, round_):
        times = timed({**baseline, **variants}, 1 if DRY else 2)
        base, ref = (times[k]["median"] for k in baseline)
        rows.update({k: dict(seconds=v, speedup=base / v["median"], over_diffusers=ref / v["median"], round=round_,
                             **speed(v["median"], STEP_BATCH, flops, peak))
                     for k, v in times.items() if round_ == 1 or k not in baseline})
        record("levers", batch=STEP_BATCH, size=STEP_PX, peak_bf16_tflops=peak, rows=rows,
               **{f"round_{round_}_baseline_ms": base * 1e3})
    measure({"latents given (a latent cache)": lambda i: train_step(ours, frozen, inputs, i, given=("latents",)),
             "latents and text embeddings given": lambda i: train_step(ours, frozen, inputs, i, given=cache),
             f"UNet {layout_name}": lambda i: train_step(relaid, frozen, inputs, i, layout=other),
             "no host sync per step": lambda i: train_step(ours, frozen, inputs, i, host_sync=False),
             "cudnn.benchmark": lambda i: with_cudnn_benchmark(ours, i)}, 1)
    del relaid                                             # its weights, moments and EMA: room for the compiled graphs
    gc.collect()
    compiled = (torch.compile(unet, backend="eager" if DRY else "inductor"), *ours[1:])
    t0 = time.time()
    train_step(compiled, frozen, inputs, 0).item()
    record("levers", compile_seconds=time.time() - t0)
    measure({"torch.compile (UNet)": lambda i: train_step(compiled, frozen, inputs, i),
             "latents and text given + compile + cudnn.benchmark":
                 lambda i: with_cudnn_benchmark(compiled, i, given=cache)}, 2)
    check("levers", "levers measured", all(math.isfinite(r["speedup"]) for r in rows.values()), levers=len(rows))


def zd_train_until(part, out, steps, *flags):
    """`zd.py train` for `steps` steps, stopped (killed) once it has logged its last step: the end-to-end speed is in
    metrics.jsonl by then, and the 22 GB it would go on to save are not what is measured. (seconds to that line,
    metrics lines)."""
    cmd = [sys.executable, "zd.py", "train", "--out", out, "--steps", str(steps), "--sample-every", "0",
           "--save-every", "100000", "--log-every", "1" if DRY else "10", *flags]
    print(f"{part}: $ {' '.join(cmd)}", flush=True)
    metrics_file, t0 = os.path.join(out, "metrics.jsonl"), time.time()

    def logged():                                          # the complete lines written so far
        if not os.path.exists(metrics_file):
            return []
        with open(metrics_file) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)     # its own group: its loader's workers too
    metrics = []
    while proc.poll() is None and not (metrics and metrics[-1]["step"] >= steps):
        time.sleep(0.2)
        metrics = logged()
    seconds = time.time() - t0
    metrics = logged()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.wait() not in (0, -9) or not metrics or metrics[-1]["step"] < steps:
        raise RuntimeError(f"{part}: zd.py train ended with exit {proc.returncode} at "
                           f"step {metrics[-1]['step'] if metrics else 0} of {steps}")
    return seconds, metrics


def part_train_cache():
    """`zd.py train` end to end from a latent cache against from the JPEGs (batch 8, and from the cache at batch 32),
    after `zd.py cache` has built the cache from the same JPEGs with the same data flags: samples/s, peak GPU memory,
    the cache's build time and size."""
    ckpt, jpegs = prepare_training_inputs("train_cache")
    # one 512² bucket, so that 64 images fill batch 32 (in the five aspect buckets none would hold 32)
    data_flags = lambda batch=None: train_flags(batch) + ([] if DRY else ["--bucket-min", "512", "--bucket-max", "512"])
    cache = os.path.join(WORK, "latent_cache")
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, "zd.py", "cache", "--model", ckpt, "--data", jpegs, "--out", cache, *data_flags()]
    print(f"train_cache: $ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(cache) for f in files)
    n = len([f for f in os.listdir(jpegs) if f.endswith(".jpg")])
    record("train_cache", cache=dict(seconds=time.time() - t0, images=n, mb=size / 2 ** 20,
                                     kb_per_image=size / n / 1024))
    steps, larger = (3, 4) if DRY else (20, 32)            # logged every 10: steps 11–20 are measured
    rows = {}
    for label, source, batch in (("from images", jpegs, None), ("from the cache", cache, None),
                                 (f"from the cache, batch {larger}", cache, larger)):
        out = os.path.join(WORK, "e2e")
        shutil.rmtree(out, ignore_errors=True)
        seconds, metrics = zd_train_until("train_cache", out, steps, "--model", ckpt, "--data", source,
                                          *data_flags(batch))
        rows[label] = dict(seconds=seconds, batch=batch or TRAIN_BATCH, **interval(metrics))
        shutil.rmtree(out, ignore_errors=True)
        record("train_cache", rows=rows)
    base = rows["from images"]["samples_s"]
    for r in rows.values():
        r["over_images"] = r["samples_s"] / base
    record("train_cache", rows=rows)
    check("train_cache", "trained from the cache", all(math.isfinite(r["loss"]) for r in rows.values()),
          speedup=rows["from the cache"]["over_images"])


# ---- the report -------------------------------------------------------------------------------------------------------

def num(x, spec=".1f", unit=""):
    return "—" if x is None else f"{x:{spec}}{unit}"


def table(header, rows):
    """A markdown table: the header's cells, then one row of cells per entry."""
    return ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def throughput(s):
    """ms/step, samples/s, TFLOP/s (fraction of peak) of a speed() dict."""
    peak = f" ({s['peak_fraction']:.0%} of peak)" if s.get("peak_fraction") else ""
    return [num(s["ms"]), num(s["samples_s"]), num(s["tflops"], ".1f") + peak]


def render_step(r):
    lines = [f"Batch {r['batch']} at {r['size']}², the loop's own step (VAE and CLIP in it); UNet "
             f"{r['unet_gflops_per_step']:,.0f} GFLOP per step; dense bf16 peak {num(r['peak_bf16_tflops'], '.0f')} "
             "TFLOP/s. The step as the loop runs it (one host sync):"]
    lines += table(["UNet", "ms/step", "samples/s", "TFLOP/s"],
                   [[k, *throughput(v)] for k, v in r["step"].items()])
    lines.append(f"zd's speed ÷ diffusers': {r['zd_speed_over_diffusers']:.3f}. Phase by phase, each between two "
                 "device syncs (so their sum exceeds the step, which overlaps the host's work with the GPU's):")
    if "phases" in r:
        sides = list(r["phases_total_ms"])
        lines += table(["phase"] + [f"{s} {u}" for s in sides for u in ("ms", "%")],
                       [[p] + [c for s in sides for c in (num(v[s]["ms"], ".2f"), num(100 * v[s]["share"], ".1f"))]
                        for p, v in r["phases"].items()]
                       + [["**sum**"] + [c for s in sides for c in (num(r["phases_total_ms"][s], ".1f"), "100")]])
        lines += ["Between two syncs the host sync costs nothing by construction: its cost is part levers' "
                  "\"no host sync per step\".", ""]
    if "kernels" in r:
        k = r["kernels"]
        lines.append(f"GPU kernels (torch.profiler, zd): busy {k['busy_ms_per_step']:.1f} ms per step, idle "
                     f"{k['idle_share']:.0%} of the step.")
        lines += table(["kind of kernel", "share of busy time"], [[n, f"{v:.1%}"] for n, v in k["share"].items()])
        lines += table(["top kernel", "calls/step", "share"], [[t["name"], t["calls"], f"{t['share']:.1%}"]
                                                                for t in k["top"]])
    if "memory_floor" in r:
        m = r["memory_floor"]
        lines.append(f"Memory-traffic floor over {m['parameters']:,} fp32 parameters at the measured copy bandwidth "
                     f"{m['copy_tb_s']:.2f} TB/s (read + written):")
        lines += table(["phase", "GB moved", "floor ms", "measured ms", "measured/floor"],
                       [[p, num(v["gb"], ".2f"), num(v["floor_ms"], ".2f"), num(v["measured_ms"], ".2f"),
                         num(v["measured_ms"] / v["floor_ms"], ".1f")] for p, v in m["phases"].items()])
    return lines, {"batch", "size", "unet_gflops_per_step", "peak_bf16_tflops", "step", "zd_speed_over_diffusers",
                   "phases", "phases_total_ms", "kernels", "memory_floor"}


def render_batch(r):
    rows = []
    for b, row in r["rows"].items():
        if not isinstance(row, dict):
            rows.append([b, row] + [""] * 7)
            continue
        d = row.get("diffusers")
        rows.append([b, *throughput(row["zd"]), num(row["zd"]["peak_gb"], ".1f"),
                     *(throughput(d)[1:2] if d else ["dropped to fit"]), num(d and d["peak_gb"], ".1f"),
                     num(row.get("zd_speed_over_diffusers"), ".3f")])
    lines = ["Latents given (as from a cache), CLIP in the loop, bf16; peak memory as each side alone would hold it:"]
    return lines + table(["batch", "zd ms/step", "zd samples/s", "zd TFLOP/s", "zd peak GB", "diffusers samples/s",
                          "diffusers peak GB", "zd ÷ diffusers (speed)"], rows), {"rows", "peak_bf16_tflops"}


def render_levers(r):
    compiled = f"; torch.compile took {r['compile_seconds']:.0f} s to compile" if "compile_seconds" in r else ""
    lines = [f"Batch {r['batch']} at {r['size']}², one change at a time against zd.py train's step today, alternating "
             f"in one process; × = speed against the baseline and against diffusers' UNet in the same round (round 2 "
             f"re-measures both: baseline {num(r.get('round_2_baseline_ms'))} ms against "
             f"{num(r.get('round_1_baseline_ms'))} ms in round 1){compiled}. The targets (README, On a GPU): 30% of "
             "peak, 1.1× diffusers:"]
    return lines + table(["lever", "ms/step", "samples/s", "TFLOP/s", "× baseline", "× diffusers"],
                         [[k, *throughput(v), num(v["speedup"], ".2f"), num(v["over_diffusers"], ".2f")]
                          for k, v in r["rows"].items()]), {"rows", "batch", "size", "peak_bf16_tflops",
                                                            "compile_seconds", "round_1_baseline_ms",
                                                            "round_2_baseline_ms"}


def render_train_cache(r):
    lines = []
    if "cache" in r:
        c = r["cache"]
        lines.append(f"`zd.py cache`: {c['images']} images in {c['seconds']:.0f} s, {c['mb']:.1f} MB "
                     f"({c['kb_per_image']:.0f} KB per image).\n")
    if "rows" in r:
        lines.append("The target (README, On a GPU): from a cache at the best batch, twice the 36.1 samples/s that "
                     "zd.py train reached from images at batch 8 on an H200.")
        lines += table(["zd.py train", "batch", "samples/s", "it/s", "peak GPU GB", "× from images"],
                       [[k, v["batch"], num(v["samples_s"]), num(v["it_s"], ".2f"), num(v["gpu_peak_gb"]),
                         num(v.get("over_images"), ".2f")] for k, v in r["rows"].items()])
    return lines, {"cache", "rows"}


def render_sampling_fp16(r):
    if "pairs" not in r:
        return [], set()
    lines = [f"{r['steps']} steps at {r['size']}², the same initial noise on every side (but the last row); "
             f"difference in uint8; diffusers' NaN values: {r['diffusers_nan_values']}"]
    rows = [[k, num(v["mean"], ".2f"), num(v["max"], ".0f")] for k, v in r["pairs"].items()]
    return lines + table(["images", "mean abs. difference", "max abs. difference"], rows), {"pairs", "size", "steps"}


def render_speed(r):
    if "rows" not in r:
        return [], set()
    lines = table(["what", "zd (s)", "diffusers (s)", "zd/diffusers", "notes"], [])[:-1]
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
        lines.append(f"| {row['name']} | {cell(row['ours'])} | {cell(row.get('diffusers'))} | {ratio} | {notes} |")
    return lines + [""], {"rows", "info"}


RENDER = {"step": render_step, "batch": render_batch, "levers": render_levers, "train_cache": render_train_cache,
          "sampling_fp16": render_sampling_fp16, "speed": render_speed}


def report():
    """gpu.md from gpu.json: one section per part, its status, its tables and its checks."""
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
        shown = {"status"}
        if part in RENDER:
            try:
                rendered, keys = RENDER[part](r)
                lines += rendered
                shown |= keys
            except KeyError as e:                           # a part killed half-way: its raw values below
                lines.append(f"(partial results, not tabulated: no {e})")
        for k, v in r.items():
            if k not in shown:
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
        print(" ".join(PARTS if sys.argv[2:] == ["all"] else STEP_PARTS))
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
