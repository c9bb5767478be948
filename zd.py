"""zd — a from-scratch reference implementation of the ZeroDiffusion recipe: Stable Diffusion 1.5 fine-tuned into a
v-prediction, zero-terminal-SNR model.

    python zd.py --help            the subcommands, one line each
    python zd.py COMMAND --help    the flags of one

This file, top down: the train settings and `train` (the recipe as one loop; its math is schedule.py's, its data
data.py's, its networks model.py's), then sampling, then the verification commands (schedule, vectors, check), then
the checkpoint tools, then the command line. Each subcommand is a plain function of the parsed arguments, so a
notebook can call it too.
"""
import argparse
import contextlib
import copy
import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# OpenMP threads that busy-wait at every barrier collapse when the cores are shared (measured on a 2-core host with one
# other busy process: 9.7 s per demo training step with the default policy, 0.5 s with PASSIVE). It must be set before
# torch loads OpenMP; an OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import check  # noqa: E402
import data  # noqa: E402
import model  # noqa: E402
import schedule as S  # noqa: E402


class UserError(Exception):
    """A mistake of the user's (a path, a flag, a file): main() prints it as one line with the fix, no traceback."""


def at_least(low, kind=int):
    """An argparse type: a number ≥ low."""
    def parse(text):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is below {low}")
        return value
    parse.__name__ = kind.__name__
    return parse


def probability(text):
    """An argparse type: a probability in [0, 1]."""
    if not 0 <= float(text) <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a probability in [0, 1]")
    return float(text)


def side(text):
    """An argparse type: an image side in pixels, a multiple of 8 (the UNet halves it three times)."""
    if int(text) < 8 or int(text) % 8:
        raise argparse.ArgumentTypeError(f"{text} is not a positive multiple of 8")
    return int(text)


# ---------------------------------------------------------------------------------------------------------------------
# zd.py train: the ZeroDiffusion recipe as one flat loop, nanoGPT-style

def setting(default, help, **argparse_kw):
    return dataclasses.field(default=default, metadata=dict(help=help, **argparse_kw))


@dataclasses.dataclass
class Settings:
    """Every setting of `zd.py train`, each a flag (min_side is --min-side). The defaults are the ZeroDiffusion model
    card's recipe where it gives one; DEMO holds what the from-scratch demo changes."""
    # -- model and data
    model: str = setting(None, "SD1.5 checkpoint to fine-tune: single file (full or EMA-only) or diffusers folder; "
                         "the UNet and the EMA start from its EMA weights. Without it: the demo")
    from_scratch: bool = setting(False, "without --model, train the demo's small pixel-space model from scratch on "
                                 "--data other than 'demo' (else refused: it would see your images at 16×16 px)")
    vae: str = setting(None, "a separate VAE file for the checkpoint")
    ema_init: str = setting(None, "take the initial UNet/EMA weights from this file instead", metavar="PATH")
    data: tuple = setting((), "image folder, tar shard path or glob, or 'demo'; repeatable", action="append",
                          metavar="SRC")
    val_data: tuple = setting((), "validation images, not trained on: image folder or tar shards, filtered and "
                              "bucketed as --data; repeatable", action="append", metavar="SRC")
    val_fraction: float = setting(0.0, "or hold out this seeded share of --data's folder images for validation, not "
                                  "trained on", metavar="F", type=probability)
    out: str = setting("runs/zd", "output folder")
    min_side: int = setting(1024, "keep images whose original shortest side is ≥ this (the recipe's data)",
                           type=at_least(0))
    min_aesthetic: float = setting(None, "keep samples whose json AESTHETIC_SCORE or aesthetic is ≥ X (off: the "
                                   "recipe's data, LAION Aesthetics v2 5+, was selected by aesthetic ≥ 5)", metavar="X",
                                   type=float)
    max_watermark: float = setting(None, "keep samples whose json pwatermark is ≤ P (off: the recipe did not filter "
                                   "watermarks)", metavar="P", type=probability)
    max_unsafe: float = setting(None, "keep samples whose json punsafe is ≤ P (off: the recipe did not filter unsafe "
                                "images)", metavar="P", type=probability)
    drop_unscored: bool = setting(False, "drop samples that lack a score an active filter reads (else kept, counted)")
    bucket_area: int = setting(512 * 512, "aspect buckets of this area in pixels: the five ZD buckets of ≈512²",
                               type=at_least(64))
    bucket_min: int = setting(384, "shortest bucket side", type=side)
    bucket_max: int = setting(640, "longest bucket side", type=side)
    bucket_step: int = setting(64, "bucket side step", type=side)
    flip: bool = setting(False, "random horizontal flips")
    random_crop: bool = setting(False, "random instead of centre crops")
    inpaint: bool = setting(False, "train the 9-channel inpainting UNet on synthetic masks (a 4-channel checkpoint is "
                            "expanded with zero-initialised channels)")
    workers: int = setting(2, "data loader processes per rank", type=at_least(0))
    # -- the recipe
    prediction: str = setting("v", "what the UNet predicts", choices=("v", "eps"))
    schedule: str = setting("zt", "zt: SD1.5's betas rescaled to zero terminal SNR (Lin et al. 2023, Alg. 1); sd15: as "
                            "shipped", choices=("zt", "sd15"))
    min_snr_gamma: float = setting(5.0, "min-SNR-γ loss weight (Hang et al. 2023) from the rescaled schedule's SNR; "
                                   "0: plain MSE", type=at_least(0, float))
    ip_noise_gamma: float = setting(0.1, "input perturbation γ (Ning et al. 2023), on the input only",
                                    type=at_least(0, float))
    caption_dropout: float = setting(0.1, 'probability of training on the empty caption ""', type=probability)
    ema_decay: float = setting(0.9999, "EMA decay, constant from step 1", type=probability)
    # -- optimisation (the model card gives no optimiser numbers: these are common SD1.5 fine-tuning choices)
    steps: int = setting(10000, "optimiser steps", type=at_least(1))
    batch_size: int = setting(4, "images per rank per micro-step", type=at_least(1))
    grad_accum: int = setting(1, "micro-steps accumulated per optimiser step", type=at_least(1))
    lr: float = setting(1e-5, "AdamW learning rate", type=at_least(0, float))
    lr_schedule: str = setting("constant", "after the warm-up", choices=("constant", "cosine"))
    warmup: int = setting(500, "linear warm-up steps", type=at_least(0))
    weight_decay: float = setting(0.01, "AdamW weight decay", type=at_least(0, float))
    max_grad_norm: float = setting(1.0, "gradient clipping", type=at_least(0, float))
    seed: int = setting(0, "seed of the data order, dropout and all noise", type=at_least(0))
    # -- run
    resume: bool = setting(False, "continue the run in --out: weights, EMA, optimiser, step, data position; its "
                           "settings are kept, except --steps, the intervals, sample prompts and hardware")
    overwrite: bool = setting(False, "start a new run in an --out that holds an earlier one, replacing its "
                              "checkpoints, train state and metrics (without it zd refuses)")
    save_every: int = setting(1000, "write the checkpoints and the train state every N steps", type=at_least(1))
    sample_every: int = setting(500, "write a grid of EMA samples every N steps, after saving; 0: never",
                                type=at_least(0))
    sample_prompts: tuple = setting(("a photograph of an astronaut riding a horse", "a plain black image",
                                     "a plain white image", "a red apple on a wooden table"),
                                    "prompt of the sample grids; repeatable", action="append", metavar="TEXT",
                                    flag="--sample-prompt")
    sample_size: tuple = setting((512, 512), "sample grid size", nargs=2, metavar=("W", "H"), type=side)
    val_every: int = setting(None, "validation loss per timestep bin, of the UNet and the EMA, every N steps and at "
                             "the end (default: with --save-every)", type=at_least(1))
    tensorboard: bool = setting(False, "also write metrics.jsonl's numbers and the sample grids to OUT/tensorboard for "
                                "TensorBoard (pip install tensorboard)")
    log_every: int = setting(10, "progress line and metrics.jsonl every N steps (and a line at least every 30 s)",
                             type=at_least(1))
    max_bad_steps: int = setting(5, "stop after this many non-finite steps in a row", type=at_least(1))
    text_cache: int = setting(0, "keep the CLIP embeddings of up to N distinct captions", type=at_least(0))
    half: bool = setting(False, "write fp16 checkpoints (the train state stays fp32)")
    # -- hardware
    device: str = setting(None, "cuda, cuda:1, cpu (default: the rank's GPU if there is one)")
    precision: str = setting("bf16", "UNet autocast on GPUs (CPUs: fp32)", choices=("bf16", "fp32"))
    grad_checkpointing: bool = setting(False, "recompute activations in the backward pass: 20% less memory, 45% "
                                       "slower (H200, batch 8)")
    compile: bool = setting(False, "torch.compile the UNet: compiles once per bucket shape before it pays off")


# The demo trains from scratch, in pixel space (DEMO_UNET, no VAE): a larger LR, and an EMA whose horizon 1/(1 − d) = 50
# steps is short next to the run (at 0.9999 the EMA of a few thousand steps would still be mostly random init). A
# caption decides an image's colours only at the noisiest timesteps, where the min-SNR v weight is ≈ ᾱ (< 0.003 for
# t > 900): the demo's images are 16×16 px, whose colours stay hidden in the noise down to lower t than at 24×24, and
# whose steps cost less than half as much; in equal time, 2000 steps at 16² left about half the colour error of 1000
# steps at 24² (16×32, 24×24, 32×16). The demo's images (aspects 2:3 to 3:2) all go to the one bucket, resized to cover
# it and centre-cropped. 1500 steps of batch 32 draw every prompt below right (README, The demo). The vocabulary, as its
# sample grid shows it and demo_score measures it: the six plain colours, and six shapes on backgrounds in which every
# colour is once the shape's and once the background's. One grid, at the end: each costs ≈ 4.5% of the 1500 steps'
# time on a CPU (demo_score ≈ 6%), and the intermediate two took the run past the README's time.
DEMO_PROMPTS = ("a plain black image", "a plain white image", "a plain red image", "a plain green image",
                "a plain blue image", "a plain yellow image", "a red circle on a black background",
                "a blue square on a white background", "a yellow circle on a blue background",
                "a white square on a green background", "a green circle on a red background",
                "a black square on a yellow background")
DEMO = dict(data=("demo",), out="runs/demo", steps=1500, batch_size=32, lr=1e-3, warmup=20, ema_decay=0.98,
            log_every=10, save_every=500, sample_every=1500, text_cache=1024, sample_size=(16, 16),
            bucket_area=16 * 16, bucket_min=16, bucket_max=16, bucket_step=8, sample_prompts=DEMO_PROMPTS)
DEMO_CFG = 3.0  # the demo's guidance: at 7.5 the small model's colours overshoot (green at 200 where the data has 160)
DEMO_UNET = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(2,), context_dim=64)
SETTINGS = {f.name for f in dataclasses.fields(Settings)}
# What a resumed run may change (out, model, vae: the run and its base at a new place); the rest comes from its
# train_state.json.
RESUME_MAY_CHANGE = ("out", "model", "vae", "steps", "save_every", "sample_every", "sample_prompts", "sample_size",
                     "log_every", "workers", "device", "max_bad_steps", "resume", "overwrite", "compile", "val_every",
                     "tensorboard")
T_BINS = 10  # the loss is also logged per timestep bin of 100 (as minRF does), to see where the model is still wrong


def train(args):
    """Fine-tune SD1.5's UNet with the ZeroDiffusion recipe: v-prediction on the zero-terminal-SNR schedule, min-SNR-γ
    weights, IP noise, caption dropout, AdamW, EMA, with CLIP and the VAE frozen. Without --model: the demo, a small
    pixel-space model from scratch on procedural images. `args`: parsed flags or Settings. Returns (UNet, EMA), or
    (None, None) when a resumed run has no step left to do."""
    s = args if isinstance(args, Settings) else settings(args)
    rank, world, device = init_distributed(s.device)
    ddp, cuda = torch.distributed.is_initialized(), device.type == "cuda"
    log = print if rank == 0 else (lambda *a, **k: None)
    if nothing_to_do(s, log):
        return None, None
    interrupts = Interrupts(log)   # in start-up a signal stops at once: nothing of this run is saved yet
    check_writable(s.out)
    board = Board(s.out) if rank == 0 and s.tensorboard else None

    # ---- networks: the UNet trains, CLIP and the VAE are frozen; UNet and EMA start from the same (EMA) weights
    nets = starting_model(s, log)
    cached = any(map(data.is_cache, s.data))   # latents from `zd.py cache`: the VAE stays on the CPU, unused
    unet = nets.unet.to(device).train().requires_grad_(True)
    unet.gradient_checkpointing = s.grad_checkpointing
    for frozen in (nets.text_encoder, nets.vae):
        if frozen is not None:
            frozen.to("cpu" if cached and frozen is nets.vae else device).eval().requires_grad_(False)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # the frozen fp32 VAE/CLIP
        unet.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(unet).eval()
    net = unet   # what the loop calls: DDP averages gradients over ranks in backward; `unet` is what we step and save
    if ddp:
        net = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[device.index] if cuda else None)
    if s.compile:
        net = torch.compile(net)
    opt = torch.optim.AdamW(unet.parameters(), lr=s.lr, weight_decay=s.weight_decay, fused=True)

    # ---- fresh, or the saved run's weights, EMA, optimiser, step and data position
    step, position, skipped = 0, -1, 0
    if s.resume:
        step, position, skipped = load_state(s.out, unet, ema, opt)
        log(f"train: resumed {s.out} at step {step}, data position {position + 1}")
    elif rank == 0 and os.path.exists(os.path.join(s.out, "train_state.json")):
        log(f"train: --overwrite: starting over in {s.out}, replacing its earlier run")
        Path(s.out, "metrics.jsonl").unlink(missing_ok=True)
    if board:
        board.start(step)

    abar = S.alphas_cumprod(S.betas(s.schedule == "zt")).to(device)   # float64, never fp16 (pitfall 8)
    snr = S.snr(abar)                                                 # of the *rescaled* schedule (pitfall 1)
    loader = make_loader(s, rank, world, cuda)
    validation = Validation(make_loader(s, 0, 1, cuda, True)) if rank == 0 and (s.val_data or s.val_fraction) else None
    batches = loader.batches(start=position + 1)
    text_cache = {}
    global_batch = s.batch_size * world * s.grad_accum
    log(f"train: {sum(p.numel() for p in unet.parameters()):,} UNet parameters; {world} rank(s) on {device}"
        f"{f' (DDP, {torch.distributed.get_backend()})' if ddp else ''}; global batch {global_batch} = "
        f"{s.batch_size} per rank × {world} × {s.grad_accum} accumulated")
    log(f"train: {s.prediction}-prediction, {s.schedule} schedule, min-SNR γ {s.min_snr_gamma:g}, IP noise γ "
        f"{s.ip_noise_gamma:g}, caption dropout {s.caption_dropout:g}, EMA {s.ema_decay:g}, lr {s.lr:g} ({s.warmup} "
        f"warm-up steps, then {s.lr_schedule}), {s.steps} steps → {s.out}")
    if s.warmup > s.steps:
        log(f"train: warning: --warmup {s.warmup} is longer than --steps {s.steps}: the lr ends at "
            f"{get_lr(s.steps - 1, s.lr, s.warmup, s.steps):.3g}, never reaching --lr {s.lr:g}; lower --warmup")
    if rank == 0 and s.sample_every and not cuda and nets.vae is not None:
        log(f"train: each sample grid takes ≈ {grid_seconds(unet, s) / 60:.0f} min on this CPU "
            f"({4 * len(s.sample_prompts)} images, 25 steps, {s.sample_size[0]}×{s.sample_size[1]}); "
            "--sample-every 0 skips them")
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=cuda and s.precision == "bf16")
    window, progress, saved, started, bad_run = Window(), Progress(s, step, log), step, step, 0
    interrupts.where = "a training step"
    try:
        while step < s.steps and not interrupts.agreed(ddp, device):
            interrupts.unsaved = True
            lr = get_lr(step, s.lr, s.warmup, s.steps, s.lr_schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, per_t = 0.0, []
            for micro in range(s.grad_accum):
                batch = next(batches)
                position = batch["position"]
                t, noise, ip_noise, x0, known, context = encode_batch(s, nets, batch, step * s.grad_accum + micro,
                                                                      text_cache, device)
                x_t, target, weight = recipe_inputs(x0, noise, ip_noise, t, abar, snr, s.prediction, s.min_snr_gamma,
                                                    s.ip_noise_gamma)
                x_t = unet_input(x_t, known, cuda)
                last = micro == s.grad_accum - 1
                with autocast, (contextlib.nullcontext() if last or not ddp else net.no_sync()):
                    micro_loss, per_sample = S.weighted_mse(net(x_t, t, context), target, weight)   # in fp32
                    (micro_loss / s.grad_accum).backward()
                loss += micro_loss.detach() / s.grad_accum
                per_t.append((t, per_sample))
            norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), s.max_grad_norm)
            # A step whose gradient is not finite (a non-finite loss makes it so) is skipped: weights, Adam moments and
            # step count stay as they were. The norm is that of the gradient all ranks share, so they agree. This
            # reads the norm on the host each step, which costs nothing measurable on a GPU (README, On a GPU).
            good = bool(torch.isfinite(norm))
            if good:
                opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            # constant from step 1, so the EMA init is not wiped (pitfall 5); also after a skip, as diffusers' EMA does
            S.ema_update(ema.parameters(), unet.parameters(), S.ema_decay(step, s.ema_decay))
            skipped, bad_run = skipped + (not good), 0 if good else bad_run + 1
            window.add(good, loss, norm, per_t)

            if step % s.log_every == 0 or step == s.steps:
                metrics = window.metrics(step, lr, skipped, global_batch, ddp, world, device if cuda else None)
                if rank == 0:
                    record(s.out, metrics, board)
                progress.line(step, metrics)
                window = Window()
            else:
                progress.heartbeat(step)
            if bad_run >= s.max_bad_steps:
                if rank == 0:
                    save(s, step, position, skipped, unet, ema, opt, nets)
                raise UserError(f"train: stopped at step {step}: {bad_run} steps in a row had a non-finite loss or "
                                f"gradient and were skipped ({skipped} in all). The weights from before them are saved "
                                f"in {s.out}; lower --lr or check the data, then --resume.")
            if rank == 0 and (step % s.save_every == 0 or step == s.steps):   # saved before any sampling
                with interrupts.during("a save"):
                    saved = save(s, step, position, skipped, unet, ema, opt, nets)
                interrupts.unsaved = False
            if validation and (step % (s.val_every or s.save_every) == 0 or step == s.steps):
                with interrupts.during("the validation pass"):
                    validation(s, step, nets, unet, ema, abar, snr, autocast, log, board, interrupts.check)
            if rank == 0 and s.sample_every and not s.inpaint and (step % s.sample_every == 0 or step == s.steps):
                with interrupts.during("a sample grid"):
                    sample_grid(s, step, ema, nets, log, board, interrupts.check)
        if rank == 0 and saved != step:
            with interrupts.during("the last save"):
                save(s, step, position, skipped, unet, ema, opt, nets)
        if not interrupts.signal:
            log(f"train: step {step}: wrote {s.out}/model.safetensors, model_ema.safetensors and train_state.*")
            if rank == 0 and not s.model and not s.inpaint and s.sample_every:   # the demo: which captions it draws
                with interrupts.during("the demo's score"):
                    print_demo_score(demo_score(model.SD(ema, None, nets.text_encoder, nets.tokenizer, nets.meta),
                                                stop=interrupts.check))
        if interrupts.signal:
            where = (f"saved in {s.out}" + ("; --resume continues" if step < s.steps else "") if step > started else
                     "before training: nothing new to save")
            log(f"train: {signal.Signals(interrupts.signal).name}: stopped at step {step}, {where} (signalled during "
                f"{interrupts.at})")
    finally:
        batches.close()    # ends the loader's worker processes now: left to the exit, their join can hang for ever
        if board:
            board.writer.close()
        interrupts.restore()
        if ddp:
            torch.distributed.destroy_process_group()
    return unet, ema


def settings(args):
    """The run's Settings from parsed flags (None = not given): a flag given, else with --resume the run's own setting,
    else the demo's (without --model), else the recipe's. With --resume only RESUME_MAY_CHANGE may differ."""
    given = {k: v for k, v in vars(args).items() if k in SETTINGS and v is not None}
    values = dataclasses.asdict(Settings()) | ({} if given.get("model") else DEMO)
    if given.get("resume"):
        out = given.get("out", values["out"])
        try:
            with open(os.path.join(out, "train_state.json")) as f:
                state = json.load(f)
        except FileNotFoundError:
            raise UserError(f"train: --resume: no run in {out} (no train_state.json); point --out at the run's folder, "
                            "or start a new run without --resume") from None
        saved = {k: v for k, v in (state.get("settings") or state["args"]).items()   # "args": older runs
                 if k in SETTINGS and k != "overwrite"}   # how the run was started, not one of its settings
        if given.get("model") and not saved.get("model"):
            raise UserError(f"train: --resume: the run in {out} is the demo, trained from scratch: it takes no --model")
        ignored = {k: v for k, v in given.items() if k not in RESUME_MAY_CHANGE and k in saved and v != saved[k]}
        if ignored:
            kept = ", ".join(f"--{k.replace('_', '-')} {show(saved[k])} (not {show(v)})" for k, v in ignored.items())
            new = (f"--model {out}/model_ema.safetensors and a new --out" if saved.get("model") else
                   "--overwrite, or a new --out")
            print(f"train: --resume keeps the run's {kept}; to change them, start a new run: {new}")
        values |= saved
        given = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}
    values |= given
    for key in ("data", "val_data", "sample_prompts"):
        values[key] = tuple(values[key])
    values["sample_size"] = tuple(values["sample_size"])
    if not values["data"]:
        raise UserError("train: --model needs --data (an image folder or tar shards; repeatable)")
    if not values["model"] and (cache := next(filter(data.is_cache, values["data"]), None)):
        raise UserError(f"train: {cache} is a latent cache: train from it with --model, the checkpoint whose VAE made "
                        "it")
    if not values["model"] and not values["from_scratch"] and set(values["data"]) != {"demo"} and not given.get(
            "resume"):
        raise UserError("train: --data without --model would train the demo's small pixel-space model from scratch on "
                        "your images at 16×16 px: give --model SD1.5_CHECKPOINT to fine-tune SD1.5 (--from-scratch if "
                        "the demo's model is what you want)")
    return Settings(**values)


def nothing_to_do(s, log):
    """Whether a resumed run has no step left (it says so). A new run must not start over an earlier one by accident:
    forgetting --resume would replace its checkpoints and truncate its metrics. Refuse before anything is touched,
    unless --overwrite."""
    if s.resume and s.overwrite:
        raise UserError("train: --resume continues the run in --out and --overwrite replaces it: give one of them")
    state = os.path.join(s.out, "train_state.json")
    if not s.resume and not s.overwrite and os.path.exists(state):
        raise UserError(f"train: {s.out} holds an earlier run: --resume continues it, --overwrite starts over in it "
                        "(replacing it), or give a new --out")
    if s.resume and (done := json.loads(Path(state).read_text())["step"]) >= s.steps:
        log(f"train: the run in {s.out} is at step {done} of --steps {s.steps}: nothing to do (a larger --steps "
            "continues it)")
        return True
    return False


def check_writable(out, command="train"):
    """Fail now, not at the first save an hour in, when --out (a folder, made if need be) cannot be written."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out) as f:           # a name of its own: every rank checks at once
            f.write(b"ok")
    except OSError as e:
        raise UserError(f"{command}: cannot write to --out {out} ({e.strerror}); choose a folder you can "
                        "write") from None


class Stopped(BaseException):
    """A signal stopped the run where nothing is lost by stopping at once: start-up, a sample grid, the validation pass
    or the demo's score. A BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way swallows
    it."""


class Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM (what a scheduler sends) ask the run to stop within seconds, with exit status 0:
    during start-up at once (nothing is written yet); during a step after it, saved; during a save after it; during a
    sample grid, the validation pass or the demo's score at the next denoising step or network call (check), abandoning
    it (the step is saved first). A Ctrl-C after either signal exits at once; the files on disk are whole either way,
    as every save is atomic. `where` is what the run is doing, `at` where the signal came; `unsaved`, kept by the
    training loop, says whether the current step still has to be saved."""

    def __init__(self, log):
        self.signal, self.log, self.where, self.at, self.unsaved = None, log, "start-up", None, False
        self.saved = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        lost = ", without saving this step" if self.unsaved else ""
        if self.signal is not None and signum == signal.SIGINT:
            again = "second Ctrl-C" if self.signal == signal.SIGINT else f"Ctrl-C after {self.signal.name}"
            print(f"train: {again}: quitting now{lost}", file=sys.stderr, flush=True)
            os._exit(130)
        if self.signal is not None:            # a repeated SIGTERM: already stopping
            return
        self.signal, self.at = signal.Signals(signum), self.where
        if self.where == "start-up":
            self.restore()
            raise Stopped(f"train: {self.signal.name}: stopped before training: nothing new to save (signalled during "
                          "start-up)")
        doing = "after this step, saving it first" if self.unsaved else "with every finished step saved"
        print(f"train: {self.signal.name}: stopping {doing} (Ctrl-C quits at once{lost})", file=sys.stderr, flush=True)

    def check(self):
        """Raise Stopped once a signal came: called between the steps of work that may be abandoned."""
        if self.signal is not None:
            raise Stopped

    @contextlib.contextmanager
    def during(self, where):
        """Mark what the run does, for the last line; a Stopped inside abandons it, and the loop then stops."""
        self.where = where
        try:
            yield
        except Stopped:
            self.log(f"train: {where} abandoned", flush=True)
        finally:
            self.where = "a training step"

    def agreed(self, ddp, device):
        """Whether to stop: every rank stops at the same step when any one of them was signalled."""
        if ddp:
            flag = torch.tensor(float(self.signal is not None), device=device)
            torch.distributed.all_reduce(flag)
            if flag.item() and self.signal is None:
                self.signal, self.at = signal.SIGTERM, "another rank's step"
        return self.signal is not None

    def restore(self):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def starting_model(s, log):
    """The networks to start from: the checkpoint (--model, its EMA weights, or --ema-init's), or the demo's."""
    if not s.model:
        log("train: demo — a small pixel-space UNet (no VAE) trained from scratch on procedural images; a tiny frozen "
            "CLIP with random weights encodes the captions")
        return demo_model(s.seed, s.prediction, s.schedule == "zt", s.inpaint)
    if s.resume:
        nets = resumed_model(s, log)
    else:
        nets = load_model(s.model, "train", vae_path=s.vae)
        if s.ema_init:
            init = load_model(s.ema_init, "train")
            nets.unet.load_state_dict(init.unet.state_dict())
            nets.meta["ema"] = init.meta["ema"]
        source = {"ema": "model_ema.* weights", None: "weights (an EMA-only file holds the EMA)"}[nets.meta.get("ema")]
        log(f"train: UNet and EMA start from {s.ema_init or s.model}'s {source}")
    if nets.meta.get("inpaint") and not s.inpaint:
        log("train: the checkpoint is a 9-channel inpainting UNet: training it as one (--inpaint)")
        s.inpaint = True
    if s.inpaint and nets.unet.cfg.in_channels == 4:
        nets.unet = model.expand_to_inpaint(nets.unet)
    for cache in filter(data.is_cache, s.data):   # its moments must be this VAE's
        check_cache_vae(cache, nets.vae)
    return nets


def resumed_model(s, log):
    """The networks of a resumed run, whose UNet and EMA then come from its train state: the base model (--model, the
    run's or a new path), or, when that is gone, the run's own model.safetensors, which holds the frozen CLIP and VAE
    as they were (unless written fp16)."""
    if all(path is None or os.path.exists(path) for path in (s.model, s.vae)):
        nets = load_model(s.model, "train", vae_path=s.vae)
        log(f"train: frozen CLIP and VAE from {s.model}{f' and {s.vae}' if s.vae else ''}; UNet and EMA from the "
            "train state")
        return nets
    gone = s.model if not os.path.exists(s.model) else s.vae
    if s.half:
        raise UserError(f"train: --resume: {gone} is gone and {s.out}/model.safetensors holds its CLIP and VAE in fp16 "
                        "(--half): give the base model's new place with --model PATH (and --vae PATH)")
    own = os.path.join(s.out, "model.safetensors")
    log(f"train: --resume: {gone} is gone: frozen CLIP and VAE from the run's own {own} (--model PATH takes the base "
        "from its new place); UNet and EMA from the train state")
    return load_model(own, "train")


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


# The settings data.Loader takes, the same for `train` and `zd.py data`.
LOADER_SETTINGS = ("seed", "workers", "min_side", "min_aesthetic", "max_watermark", "max_unsafe", "drop_unscored",
                   "bucket_area", "bucket_min", "bucket_max", "bucket_step", "caption_dropout", "flip", "random_crop",
                   "val_fraction")


def make_loader(s, rank, world, cuda, validation=False):
    """data.Loader with the run's data settings, or its validation set (--val-data, or --val-fraction's share of
    --data); its errors (no such folder, no usable image) name what to change."""
    if s.val_data and s.val_fraction:
        raise UserError("train: give --val-data (held-out images) or --val-fraction (a share of --data), not both")
    if s.val_every and not (s.val_data or s.val_fraction):
        raise UserError("train: --val-every needs a validation set: --val-data or --val-fraction")
    sources = s.val_data if validation and s.val_data else s.data
    try:
        return data.Loader(list(sources), s.batch_size, rank=rank, world_size=world, pin_memory=cuda,
                           inpaint=s.inpaint, validation=validation, **{k: getattr(s, k) for k in LOADER_SETTINGS})
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"train: {e}") from None


def check_cache_vae(path, vae):
    """Refuse a latent cache that another VAE made (its moments would not be this checkpoint's), or an unfinished
    one."""
    if vae is None:   # (a cache without --model is refused with the settings)
        raise UserError(f"train: the checkpoint has no VAE to check the latent cache {path} against: give --vae, the "
                        "VAE that made it")
    try:
        made_by = data.read_cache(path)["made_by"]
    except ValueError as e:
        raise UserError(f"train: {e}") from None
    if (ours := model.weights_hash(vae)) != made_by["vae"]:
        raise UserError(f"train: {path} was made by another VAE (weights {made_by['vae'][:12]}, this checkpoint's "
                        f"{ours[:12]}): train with the checkpoint (or --vae) that made it, or make a cache with this "
                        "one")


def get_lr(step, lr, warmup, steps, lr_schedule="constant"):
    """Linear warm-up over `warmup` steps, then constant, or a cosine to 0 at `steps` (Loshchilov & Hutter 2017)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if lr_schedule == "constant":
        return lr
    done = min(1.0, (step - warmup) / max(1, steps - warmup))    # the decay's fraction gone by
    return lr * 0.5 * (1 + math.cos(math.pi * done))


def sample_noise(seed, micro_step, index, shape, inpaint=False):
    """Per-sample randomness: t ~ U{0..999}, ε, the IP noise ξ and the VAE posterior's noise (a second one for the
    masked image), from a CPU generator seeded by (seed, micro-step, the sample's global index). A sample gets the same
    draws whichever rank holds it and whatever batch surrounds it, so results do not depend on the number of ranks,
    and a resumed run needs no generator state. Returns (t, noise, ip_noise, posterior_noise, masked_posterior_noise),
    the last None without inpainting."""
    t, draws = [], []
    for i in index.tolist():
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, micro_step, i]).generate_state(1)[0]))
        t.append(torch.randint(0, S.T, (), generator=g))
        draws.append(torch.randn((4 if inpaint else 3, *shape), generator=g))
    draws = torch.stack(draws)                                   # [B, 3 or 4, *shape]
    return torch.stack(t), draws[:, 0], draws[:, 1], draws[:, 2], draws[:, 3] if inpaint else None


def encode_batch(s, nets, batch, micro_step, text_cache, device):
    """A batch's draws (sample_noise: t, ε, IP noise, the VAE posterior's noise) and what the frozen networks make of
    it: the clean latents x0 (VAE, the pixels in the demo, or from a latent cache its moments: the same floats as
    encoding the same crops), the inpainting UNet's extra input channels `known` ([mask, masked-image latent], the
    mask nearest-downsampled; None without --inpaint) and the CLIP embeddings of the captions."""
    cached = "mean" in batch
    if cached:
        mean, std = to_device(batch["mean"], device), to_device(batch["std"], device)
        shape = mean.shape[1:]
    else:
        pixels = to_device(batch["pixels"], device)
        shape = (3, *pixels.shape[-2:]) if nets.vae is None else (4, *(side // 8 for side in pixels.shape[-2:]))
    t, noise, ip_noise, posterior_noise, masked_posterior_noise = (None if a is None else to_device(a, device) for a in
                                                                   sample_noise(s.seed, micro_step, batch["index"],
                                                                                shape, s.inpaint))
    x0 = model.posterior_sample(mean, std, posterior_noise) if cached else nets.encode(pixels, posterior_noise)
    known = None
    if s.inpaint:   # the mask at image size and the masked image's latent, which inpaint_input puts after x_t
        known = to_device(batch["mask"], device), nets.encode(to_device(batch["masked_pixels"], device),
                                                              masked_posterior_noise)
    return t, noise, ip_noise, x0, known, encode_captions(nets, batch["captions"], text_cache, s.text_cache)


@contextlib.contextmanager
def on_device(module, device):
    """`module` (None: nothing) on `device` inside the block, back where it was after: training from a latent cache
    keeps the VAE on the CPU, and moves it to the GPU only to decode a sample grid or encode validation images."""
    home = None if module is None else next(module.parameters()).device
    if module is not None:
        module.to(device)
    try:
        yield
    finally:
        if module is not None:
            module.to(home)


def unet_input(x_t, known, cuda):
    """The UNet's input: x_t, with the inpainting channels after it (inpaint_input); channels-last on GPUs."""
    x_t = x_t if known is None else inpaint_input(x_t, *known)
    return x_t.contiguous(memory_format=torch.channels_last) if cuda else x_t


def recipe_inputs(x0, noise, ip_noise, t, abar, snr, prediction="v", min_snr_gamma=5.0, ip_noise_gamma=0.1):
    """The UNet input, target and loss weight of the recipe for clean latents x0 at timesteps t [B]:
    x_t with IP noise on the input alone (Ning et al. 2023, eq. 9), the target from the clean ε (pitfall 4), and
    min-SNR-γ weights from the SNR of the schedule trained on, rescaled for ZT (Hang et al. 2023; pitfall 1); γ = 0
    weighs every sample 1."""
    x_t = S.add_noise(x0, noise, abar[t], ip_noise, ip_noise_gamma)
    target = S.target(x0, noise, abar[t], prediction)
    weight = S.min_snr_weight(snr[t], min_snr_gamma, prediction) if min_snr_gamma else torch.ones_like(snr[t])
    return x_t, target, weight.float()


def inpaint_input(x_t, mask, masked):
    """The inpainting UNet's input, SD-inpainting's channel order: [x_t (4), mask (1, white = 1 = repaint), the masked
    image's latent (4)] — 3 + 1 + 3 in pixel space. The mask, at image size, is nearest-downsampled to x_t's; a mask
    and latent of batch 1 serve every row of x_t."""
    mask = F.interpolate(mask, size=x_t.shape[-2:], mode="nearest")
    return torch.cat([x_t, *(a.expand(len(x_t), -1, -1, -1) for a in (mask, masked))], dim=1)


def to_device(x, device):
    """A CPU tensor on the device without a host sync: a copy from pageable memory waits for the GPU, one from pinned
    memory does not."""
    if device.type == "cuda" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


@torch.no_grad()
def encode_captions(nets, captions, cache, limit):
    """CLIP embeddings [B, 77, C] from the frozen text encoder (fp32); dropped captions are "" and encoded too. With a
    cache (limit > 0) each new caption is encoded alone and kept, so an embedding never depends on the batch it first
    appeared in (which keeps resumed runs bit-identical)."""
    device = next(nets.text_encoder.parameters()).device
    if not limit:
        return nets.text_encoder(to_device(nets.tokenizer(captions), device))
    rows = []
    for c in captions:
        e = cache.get(c)
        if e is None:
            e = nets.text_encoder(to_device(nets.tokenizer([c]), device))[0]
            if len(cache) < limit:
                cache[c] = e
        rows.append(e)
    return torch.stack(rows)


def init_distributed(device=None):
    """(rank, world size, device) from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); under torchrun a process
    group is set up, NCCL on GPUs and gloo on CPUs, even for one process. A plain `python zd.py train` is rank 0 of 1
    without one."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    device = torch.device(device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local) if device.index is None else device     # --device cuda: the rank's GPU
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


class Window:
    """Running sums over the steps since the last log line: the loss and gradient norm of the good steps, the skipped
    steps, and the loss per timestep bin of 100 (as minRF logs it)."""

    def __init__(self):
        self.t0, self.steps, self.good, self.skipped = time.time(), 0, 0, 0
        self.loss = self.norm = 0.0
        self.bin_loss, self.bin_count = [0.0] * T_BINS, [0] * T_BINS

    def add(self, good, loss, norm, per_t):
        self.steps += 1
        if not good:
            self.skipped += 1
            return
        self.good += 1
        self.loss, self.norm = self.loss + loss.item(), self.norm + norm.item()
        for t, per_sample in per_t:
            for b, l in zip((t * T_BINS // S.T).tolist(), per_sample.tolist()):
                self.bin_loss[b] += l
                self.bin_count[b] += 1

    def metrics(self, step, lr, skipped, global_batch, ddp, world, device):
        """The window's metrics.jsonl line; under DDP the loss sums of all ranks (the same steps, their own samples)."""
        loss, bin_loss, bin_count = self.loss, self.bin_loss, self.bin_count
        if ddp:
            sums = torch.tensor([loss, *bin_loss, *bin_count], dtype=torch.float64, device=device or "cpu")
            torch.distributed.all_reduce(sums)
            loss, bin_loss, bin_count = sums[0].item() / world, sums[1:1 + T_BINS].tolist(), sums[1 + T_BINS:].tolist()
        dt, w = time.time() - self.t0, S.T // T_BINS
        metrics = dict(step=step, loss=loss / max(self.good, 1), lr=lr, grad_norm=self.norm / max(self.good, 1),
                       skipped=skipped, it_s=self.steps / dt, samples_s=self.steps * global_batch / dt,
                       loss_by_t={f"{w * b}-{w * (b + 1) - 1}": bin_loss[b] / bin_count[b] for b in range(T_BINS)
                                  if bin_count[b]})
        if device is not None:
            metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        return metrics


class Progress:
    """The progress lines, one line each (a piped log reads as it grows): one per log step, and one at least every
    30 s between them, so a slow run never looks hung."""

    def __init__(self, s, step, log):
        self.steps, self.log = s.steps, log
        self.t0, self.step0, self.last = time.time(), step, time.time()

    def say(self, step, text):
        rate = (step - self.step0) / max(time.time() - self.t0, 1e-9)
        eta = int((self.steps - step) / max(rate, 1e-9))
        self.log(f"step {step}/{self.steps}  {text}ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}", flush=True)
        self.last = time.time()

    def line(self, step, m):
        gpu = f"GPU peak {m['gpu_mem_gb']:.1f} GB  " if "gpu_mem_gb" in m else ""
        skipped = f"skipped {m['skipped']}  " if m["skipped"] else ""
        self.say(step, f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['it_s']:.2f} it/s  {m['samples_s']:.1f} samples/s  "
                       f"{gpu}{skipped}")

    def heartbeat(self, step):
        if time.time() - self.last >= 30:
            self.say(step, "")


def record(out, metrics, board):
    """A line of metrics.jsonl, the run's record; with --tensorboard the same numbers in TensorBoard."""
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(metrics) + "\n")
    if board:
        board.scalars(metrics)


class Board:
    """--tensorboard: each metrics.jsonl line's numbers as scalars of its step (a dict of them, such as loss_by_t, as
    KEY/NAME) and the sample grids as images, in OUT/tensorboard, so `tensorboard --logdir runs` shows runs side by
    side. Made before the networks load, so a missing package is said at once; start(step) opens the writer."""

    def __init__(self, out):
        try:
            from torch.utils.tensorboard import SummaryWriter   # optional: only --tensorboard needs the package
        except ImportError:
            raise UserError("train: --tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.folder, self.writer_class, self.writer = os.path.join(out, "tensorboard"), SummaryWriter, None

    def start(self, step):
        # purge_step: TensorBoard drops this folder's earlier points after `step`, the one the run starts from, so a
        # resumed run continues its curves with no step twice (an interrupted run may have logged past its last save)
        # and a run started over replaces them
        self.writer = self.writer_class(self.folder, purge_step=step + 1, flush_secs=10)

    def scalars(self, metrics):
        for key, value in metrics.items():
            for tag, v in (value.items() if isinstance(value, dict) else [(None, value)]):
                if key != "step":
                    self.writer.add_scalar(key if tag is None else f"{key}/{tag}", v, metrics["step"])

    def image(self, path, step):
        self.writer.add_image("samples", np.asarray(data.open_upright(path).convert("RGB")), step, dataformats="HWC")


# Validation (README, Watching a run): every image at one timestep per bin of 100, the bin's last, so the noisiest is
# t = 999, the pure-noise input that only the zero-terminal-SNR schedule trains on (Lin et al. 2023, §3).
VAL_T = tuple(range(S.T // T_BINS - 1, S.T, S.T // T_BINS))   # 99, 199, …, 999
VAL_STREAM = 2 ** 40   # sample_noise's micro-step of the validation draws: one no run reaches


class Validation:
    """The validation passes of a run on its validation set (make_loader(validation=True)); each says what share of
    the run's time since the one before it took."""

    def __init__(self, loader):
        self.loader, self.last = loader, time.time()

    def __call__(self, s, step, nets, unet, ema, abar, snr, autocast, log, board, stop):
        with on_device(nets.vae, abar.device):
            metrics = validate(s, step, nets, unet, ema, self.loader, abar, snr, autocast, board, stop)
        share, self.last = metrics["val_seconds"] / max(time.time() - self.last, 1e-9), time.time()
        log(f"validation at step {step}: loss {metrics['val_loss']:.4f}, EMA {metrics['val_ema_loss']:.4f}; at t = 999 "
            f"{metrics['val_loss_by_t']['999']:.4f}, EMA {metrics['val_ema_loss_by_t']['999']:.4f} "
            f"({metrics['val_images']} images, {metrics['val_seconds']:.1f} s, {share:.0%} of the time since the last)",
            flush=True)


@torch.no_grad()
def validate(s, step, nets, unet, ema, loader, abar, snr, autocast, board, stop):
    """The validation loss of the UNet and the EMA on loader.fixed_batches(): each image at every t of VAL_T, with the
    same ε, IP noise and VAE noise every time (sample_noise's draws for VAL_STREAM and the image's index), captions
    kept; so the same weights give the same numbers, across runs and --resume. Logged as one metrics.jsonl line: per
    t the plain MSE (as training's loss_by_t), and the min-SNR-weighted mean over the t's (a ten-point estimate of
    training's loss, whose t is uniform). stop() is called before each network call."""
    t0, device = time.time(), abar.device
    mse, weighted, n = {"val": [0.0] * T_BINS, "val_ema": [0.0] * T_BINS}, {"val": 0.0, "val_ema": 0.0}, 0
    for batch in loader.fixed_batches():
        _, noise, ip_noise, x0, known, context = encode_batch(s, nets, batch, VAL_STREAM, {}, device)
        for b, t in enumerate(VAL_T):
            t = torch.full((len(x0),), t, device=device)
            x_t, target, weight = recipe_inputs(x0, noise, ip_noise, t, abar, snr, s.prediction, s.min_snr_gamma,
                                                s.ip_noise_gamma)
            x_t = unet_input(x_t, known, device.type == "cuda")
            for name, net in (("val", unet), ("val_ema", ema)):
                stop()
                with autocast:
                    loss, per_sample = S.weighted_mse(net(x_t, t, context), target, weight)
                mse[name][b] += per_sample.sum().item()
                weighted[name] += loss.item() * len(x0)
        n += len(x0)
    metrics = dict(step=step, val_images=n, val_seconds=time.time() - t0)
    for name in mse:
        metrics[f"{name}_loss"] = weighted[name] / (n * T_BINS)
        metrics[f"{name}_loss_by_t"] = {str(t): m / n for t, m in zip(VAL_T, mse[name])}
    record(s.out, metrics, board)
    return metrics


def grid_seconds(unet, s):
    """How long one sample grid takes, from one timed UNet call on the grid's latent size (with CFG's pair)."""
    w, h = s.sample_size
    x = torch.zeros(2, unet.cfg.in_channels, h // 8, w // 8, device=unet.out[2].weight.device)
    context = torch.zeros(2, 77, unet.cfg.context_dim, device=x.device)
    with torch.no_grad():
        t0 = time.time()
        unet.eval()(x, torch.tensor([999, 999], device=x.device), context)
        unet.train()
    return (time.time() - t0) * 25 * 4 * len(s.sample_prompts)


def save(s, step, position, skipped, unet, ema, opt, nets):
    """model.safetensors and model_ema.safetensors (single files marked v/ZT with sidecar yamls, as SD1.5 tools load
    them), then the train state for --resume. Returns the step saved."""
    for name, net in (("model", unet), ("model_ema", ema)):
        path = os.path.join(s.out, f"{name}.safetensors")
        with writing(path):
            model.save(path, net, nets.text_encoder, nets.vae, half=s.half, prediction=s.prediction,
                       ztsnr=s.schedule == "zt",
                       extra_metadata={"zd.train.step": str(step), "zd.train.weights": "ema" if net is ema else "raw"})
    save_state(s, step, position, skipped, unet, ema, opt)
    return step


@contextlib.contextmanager
def writing(path):
    """Around a write that replaces `path` atomically (model.atomic_write): a full disk leaves the previous file whole
    and says so in one line."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); the previous file is intact: free space or choose "
                        "another folder, then --resume") from None


def save_state(s, step, position, skipped, unet, ema, opt):
    """The train state for --resume (model.save_train_state): the weights, EMA and AdamW moments, and the step, the
    data position, the skipped steps and the settings. No generator state is kept: every draw of the loop comes from
    generators seeded by (seed, step, sample index) (sample_noise here, data.sample_rng for dropout, crops and
    masks), so step and position are the whole of it."""
    meta = dict(step=step, position=position, counters=dict(skipped=skipped), settings=dataclasses.asdict(s))
    with writing(os.path.join(s.out, "train_state.*")):
        model.save_train_state(s.out, meta, unet, ema, opt)


def load_state(out, unet, ema, opt):
    """Restore what save_state wrote; returns (step, data position, skipped)."""
    try:
        meta = model.load_train_state(out, unet, ema, opt)
    except ValueError as e:
        raise UserError(f"train: {e}") from None
    return meta["step"], meta["position"], meta["counters"]["skipped"]


def sample_grid(s, step, ema, nets, log, board, stop):
    """EMA samples of the fixed prompts, a row of four per prompt from the same four noises (out/samples/
    step_NNNNNN/grid.png, and in TensorBoard with a board), saying how far it got; stop() is called before each
    denoising step, and may abandon the grid by raising (the step is saved already)."""
    w, h = s.sample_size
    ema_nets = model.SD(ema, nets.vae, nets.text_encoder, nets.tokenizer,
                      dict(nets.meta, prediction=s.prediction, ztsnr=s.schedule == "zt"))
    images = []
    with on_device(nets.vae, next(ema.parameters()).device):
        for i, prompt in enumerate(s.sample_prompts):
            images.append(generate(ema_nets, [prompt] * 4, steps=25, guidance=7.5 if nets.vae is not None else
                                   DEMO_CFG, seed=0, width=w, height=h, progress=False, stop=stop))
            log(f"train: sample grid at step {step}: {4 * (i + 1)}/{4 * len(s.sample_prompts)} images", flush=True)
    grid = data.save_png(torch.cat(images), os.path.join(s.out, "samples", f"step_{step:06d}"), cols=4)[-1]
    if board:
        board.image(grid, step)


def demo_score(nets, prompts=DEMO_PROMPTS, n=8, seed=0, stop=None):
    """How much of its vocabulary the demo model draws: data.demo_judge of the samples of `zd.py sample --prompt P
    --n 8 --seed 0` (16×16, 25 trailing DDIM steps, CFG 3, rescale 0.7) of each prompt. Rows (prompt, colours wanted,
    got, samples right, passed). stop: as generate's."""
    return [(p, *data.demo_judge(p, generate(nets, [p] * n, steps=25, guidance=DEMO_CFG, seed=seed, width=16,
                                             height=16, progress=False, stop=stop))) for p in prompts]


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
    same sampler and seeds and print their mean pixel value (0–255), and each model's demo_score. SD1.5's schedule
    leaves √ᾱ_999 = 0.068 of the image in its noisiest input, so a model trained on it learns that the mean brightness
    survives in the noise, and pure noise (mean 0) at sampling pulls it to mid-grey (Lin et al. 2023, §3.1)."""
    prompts = ("a plain black image", "a plain white image")
    rows, scores = [], []
    for name, schedule, prediction in (("demo", "zt", "v"), ("demo-sd15-eps", "sd15", "eps")):
        out = os.path.join(args.out, name)
        if not args.no_train:   # no sample grids: the score of each model is printed below
            train(parser().parse_args(["train", "--out", out, "--schedule", schedule, "--prediction", prediction,
                                       "--steps", str(args.steps), "--seed", str(args.seed), "--sample-every", "0"]
                                      + ["--overwrite"] * args.overwrite))
        nets = load_model(os.path.join(out, "model_ema.safetensors"), "demo")
        means = [generate(nets, [p] * args.n, steps=25, guidance=DEMO_CFG, seed=args.seed, width=16, height=16,
                          prediction=prediction, zero_terminal_snr=schedule == "zt",
                          progress=False).float().mean().item() for p in prompts]
        label = "zero terminal SNR" if schedule == "zt" else "SD1.5"
        rows.append((f"{label} schedule, {prediction}-prediction", means))
        scores.append(demo_score(nets, n=args.n, seed=args.seed))
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
# zd.py cache: the frozen VAE run once over the data, so that training reads posterior moments instead of images

def cache(args):
    """Run the frozen VAE once over every image that `zd.py train --data SRC` would keep, at its bucket's centre crop
    (and its mirror image with --flip), and store the posterior's mean and std, not a sample: training from the cache
    draws latent = VAE_SCALE·(mean + std·posterior_noise) with the same seeded noise, order, crops, flips and caption
    dropout as from the images, so in fp32 the runs are the same to the bit. Written in parts, each whole or absent,
    the manifest last: an interrupted cache continues where it stopped when the command is run again. Under torchrun
    each rank encodes its share of the parts."""
    if args.random_crop:
        raise UserError("cache: --random-crop draws a new crop every epoch, which a cache of fixed crops cannot give: "
                        "cache without it (training from the cache then uses centre crops)")
    rank, world, device = init_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        _cache(args, rank, world, device, log)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _cache(args, rank, world, device, log):
    if any(map(data.is_cache, args.data)):
        raise UserError("cache: --data is a latent cache already; give the images it was made of")
    vae = load_model(args.model, "cache", vae_path=args.vae).vae
    if vae is None:
        raise UserError(f"cache: {args.model} has no VAE: give an SD1.5 checkpoint, or --vae")
    nets = model.SD(None, vae.to(device).eval().requires_grad_(False), None, None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # as train encodes
    settings = {k: getattr(args, k) for k in data.CACHE_SETTINGS}
    made_by = dict(vae=model.weights_hash(vae), settings=settings, dtype=args.dtype, sources=list(args.data))
    try:
        loader = data.Loader(list(args.data), args.batch_size, rank=rank, world_size=world, seed=0, caption_dropout=0,
                             random_crop=False, **{k: getattr(args, k) for k in ("workers", *data.CACHE_SETTINGS)})
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"cache: {e}") from None
    layout = "folders" if loader.shards is None else "shards"
    n_parts = len(loader.shards) if loader.shards else -(-len(loader.dataset.items) // data.CACHE_PART_IMAGES)
    paths = [data.part_path(args.out, p) for p in range(n_parts)]
    check_writable(args.out, "cache")
    os.makedirs(os.path.join(args.out, data.CACHE_PARTS), exist_ok=True)
    foreign = [p for p in paths if os.path.exists(p) and data.read_part(p)["made_by"] != made_by]
    if foreign or os.path.exists(os.path.join(args.out, data.CACHE_MANIFEST)) and \
            data.read_cache(args.out)["made_by"] != made_by:
        raise UserError(f"cache: {args.out} holds a cache made by other settings, data or VAE: choose another --out, "
                        "or delete it")
    todo = [(p, path) for p, path in enumerate(paths) if p % world == rank and not os.path.exists(path)]
    log(f"cache: {data.plural(n_parts, 'part')} of {layout} → {args.out}, {sum(map(os.path.exists, paths))} written "
        f"before; VAE {made_by['vae'][:12]} on {device}, {args.dtype}")
    stop = CacheInterrupts()
    dtype = data.CACHE_DTYPES[args.dtype]
    pending, written, images, t0, last = {}, 0, 0, time.time(), time.time()
    build = data.CacheBuild(loader, todo, args.batch_size)
    try:
        for b in torch.utils.data.DataLoader(build, batch_size=None, num_workers=min(args.workers, len(todo)),
                                             worker_init_fn=data.leave_signals_to_parent):
            part = pending.setdefault(b["part"], dict(tensors={}, rows=[], error=Counter()))
            if b["pixels"] is not None:
                views = {"": b["pixels"]} | ({"_flip": b["pixels"].flip(-1)} if args.flip else {})
                good = [row[0] for row in b["rows"] if row[5] is None]
                for suffix, pixels in views.items():
                    for name, m in zip(("mean", "std"), nets.moments(pixels.to(device))):
                        stored = m.to(dtype).cpu()
                        measure_rounding(part["error"], name, m.cpu(), stored)
                        part["tensors"].update({f"{key}.{name}{suffix}": x for key, x in zip(good, stored)})
            part["rows"] += b["rows"]
            images += len(b["rows"])
            if b["last"]:
                del pending[b["part"]]
                try:
                    data.write_part(b["path"], part["tensors"], made_by, sorted(part["rows"]), b["counts"],
                                    dict(part["error"]))
                except OSError as e:
                    raise UserError(f"cache: cannot write {b['path']} ({e.strerror}); the {written} parts written "
                                    "before it are whole: free space, then run the same command again to continue") \
                        from None
                written += 1
            if time.time() - last >= 30 or b["last"] and written == len(todo):
                rate = images / max(time.time() - t0, 1e-9)
                log(f"cache: {images:,} images encoded, {written}/{len(todo)} parts written, {rate:.1f} images/s",
                    flush=True)
                last = time.time()
            if stop.signal:
                log(f"cache: {signal.Signals(stop.signal).name}: stopped after {written} of {len(todo)} parts; those "
                    "are whole: run the same command again to continue")
                return
    finally:
        stop.restore()
    finish_cache(args.out, paths, made_by, layout, loader, log)


def measure_rounding(error, name, exact, stored):
    """Accumulate what storing `exact` as `stored` costs: the largest |Δ| and the sums of Δ² and exact² (for RMS)."""
    delta = stored.float() - exact
    error[f"{name}_max"] = max(error[f"{name}_max"], delta.abs().max().item())
    error[f"{name}_sq_err"] += delta.double().square().sum().item()
    error[f"{name}_sq"] += exact.double().square().sum().item()


def finish_cache(out, paths, made_by, layout, loader, log):
    """Once every part exists (under torchrun, the rank that finishes last sees them all, and says so whatever its
    rank), write the manifest from the parts' headers, and say what storing in fp16/bf16 cost against fp32."""
    if not all(os.path.exists(p) for p in paths):
        log("cache: this rank's parts are written; the last rank to finish writes the manifest")
        return
    log = print
    images, counts, error = 0, data.new_stats(), Counter()
    for p in paths:
        part = data.read_part(p)
        images += len(part["samples"])
        data.merge_counts(counts, part["counts"] or {})
        for k, v in (part["error"] or {}).items():
            error[k] = max(error[k], v) if k.endswith("_max") else error[k] + v
    stats = loader.stats if layout == "folders" else counts
    dtype_error = None
    if made_by["dtype"] != "fp32":
        dtype_error = {m: dict(max_abs=error[f"{m}_max"], rms_rel=math.sqrt(error[f"{m}_sq_err"] / error[f"{m}_sq"]))
                       for m in ("mean", "std")}
        log(f"cache: {made_by['dtype']} storage against fp32 on the same {images:,} images: posterior mean max |Δ| "
            f"{dtype_error['mean']['max_abs']:.2e} (RMS Δ / RMS {dtype_error['mean']['rms_rel']:.2e}), std max |Δ| "
            f"{dtype_error['std']['max_abs']:.2e} (RMS Δ / RMS {dtype_error['std']['rms_rel']:.2e}); training from it "
            "is not bit-identical to training from the images")
    manifest = dict(zd_cache=1, made_by=made_by, layout=layout, parts=[os.path.basename(p) for p in paths],
                    images=images, stats=json.loads(json.dumps(stats)), dtype_error=dtype_error)
    try:
        data.write_manifest(out, manifest)
    except OSError as e:
        raise UserError(f"cache: cannot write {out}/{data.CACHE_MANIFEST} ({e.strerror}); the parts are whole: free "
                        "space, then run the same command again to finish") from None
    log(f"cache: {images:,} images in {out} ({sum(map(os.path.getsize, paths)) / 2 ** 20:.1f} MiB); train with "
        f"--data {out}")


class CacheInterrupts:
    """SIGINT and SIGTERM stop the cache between batches: the parts written are whole, the one in progress is
    dropped."""

    def __init__(self):
        self.signal = None
        self.saved = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.signal = signum

    def restore(self):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------------------
# zd.py sample: DDIM (η = 0) on trailing timesteps with CFG rescale — the sampler a zero-terminal-SNR v model needs

@torch.no_grad()
def ddim(denoise, x, timesteps, abar, prediction):
    """Deterministic DDIM, η = 0 (Song et al. 2021, eq. 12), from x at timesteps[0] down the list: at each t the model
    output denoise(x, t) (v or ε, as `prediction` says) steps x to the next t of the list, ᾱ_prev = 1 after the last,
    where the step returns x̂0 (trailing spacing starts at t = 999, Lin et al. 2023, Table 2). Guidance, the inpainting
    input and the network live in `denoise`, as in k-diffusion's samplers."""
    for i, t in enumerate(timesteps.tolist()):
        x = S.ddim_step(x, denoise(x, t), abar[t], S.abar_at(abar, S.prev_timestep(timesteps, i)), prediction)
    return x


@torch.no_grad()
def generate(nets, prompts, *, negative="", steps=25, guidance=7.5, rescale=0.7, seed=0, width=512, height=512,
             prediction=None, zero_terminal_snr=None, image=None, mask=None, strength=None,
             device=None, dtype=None, progress=True, stop=None):
    """Images for a list of prompts (one image each; repeat a prompt for several), uint8 [N, H, W, 3]: `ddim` on
    `steps` trailing timesteps with classifier-free guidance `guidance` rescaled by φ = `rescale`, on the schedule and
    parameterisation the checkpoint is marked with (`sampling_schedule`).
    The initial noise is the first draw of the seed's generator, exactly
        torch.randn((N, C, H/8, W/8), generator=torch.Generator("cpu").manual_seed(seed))   # float32, then moved
    (C = 4; pixel-space models: the UNet's output channels at H×W), as diffusers' fp32 pipelines draw it with the same
    generator.
    `image` (path, PIL or [1, 3, H, W] in [−1, 1]): img2img for a base model, starting `strength` (default 0.8) of the
    way up the step list as diffusers' img2img does; the inpainting input for a 9-channel model with `mask`
    (white = repaint; default strength 1.0). Posterior samples of the VAE are drawn from the same generator after
    the noise, as diffusers' inpainting pipeline does (its img2img pipeline draws the image's sample first, so img2img
    runs agree with it in the step list and the formula, not in the draw). `nets`' modules are used on their own
    device and dtype; `device`/`dtype` move them there first. `stop`: called before each UNet call, it may end the
    sampling by raising (train's sample grids, on a signal)."""
    pred, zt = sampling_schedule(nets.meta, prediction, zero_terminal_snr)
    if device is not None or dtype is not None:
        for m in (nets.unet, nets.vae, nets.text_encoder):
            if m is not None:
                m.to(device=device, dtype=dtype)
    device = next(nets.unet.parameters()).device
    inpaint = bool(nets.meta.get("inpaint"))
    f = 1 if nets.vae is None else 8
    if width % (8 * f) or height % (8 * f) or steps < 1:
        raise ValueError(f"width and height must be multiples of {8 * f} (the UNet halves the latent three times), "
                         "steps ≥ 1")
    if inpaint and (image is None or mask is None):
        raise ValueError("an inpainting model needs an image and a mask (white = repaint)")
    if mask is not None and not inpaint:
        raise ValueError("a mask needs an inpainting (9-channel UNet) model; a base model takes an image alone "
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
    channels = 4 if nets.vae is not None else nets.unet.cfg.out_channels    # pixel space: x_t is the image itself
    noise = torch.randn((n, channels, height // f, width // f), generator=generator).to(device)
    guided = guidance > 1                                 # as diffusers: guidance ≤ 1 runs the conditional pass alone
    context = nets.encode_prompts((negatives if guided else []) + prompts, device)    # [uncond; cond]
    x, known = noise, None                                # known: the inpainting input's (mask, masked latent)

    def latent(image):   # the VAE posterior's noise from the generator, after the initial noise, as diffusers draws it
        shape = (len(image), 4, *(side // 8 for side in image.shape[-2:]))
        posterior_noise = None if nets.vae is None else torch.randn(shape, generator=generator)
        return nets.encode(image, posterior_noise)

    if image is not None:
        image = data.image_tensor(image, width, height).to(device)
        if inpaint:
            m = data.mask_tensor(mask, width, height).to(device)
            known = m, latent(image * (m < 0.5))      # the SD-inpainting masked image
        if not inpaint or strength < 1:
            # the image noised to the first step's ᾱ, x_t = √ᾱ·x0 + √(1−ᾱ)·ε (Ho et al. 2020, eq. 4); an inpainting
            # model at strength 1 starts from pure noise, as diffusers' inpainting pipeline does
            x = S.add_noise(latent(image).expand_as(noise), noise, abar[ts[0]])
    tty = sys.stderr.isatty()
    start = last = time.time()
    listed = ts.tolist()

    def denoise(x, t):   # the UNet's output at t: on [uncond; cond], guided and rescaled (Lin et al. 2023, Alg. 2)
        nonlocal last
        if stop:
            stop()       # raises to abandon the sampling between two steps (train's Interrupts.check)
        x_in = x if known is None else inpaint_input(x, *known)
        x_in = torch.cat([x_in, x_in]) if guided else x_in
        out = nets.unet(model.to_net(nets.unet, x_in), torch.full((len(x_in),), t, device=x.device),
                        model.to_net(nets.unet, context)).float()
        i = listed.index(t)   # progress: a line rewritten at each step on a terminal; in a log, a line after the
        if progress and (tty or time.time() - last >= 10 or i in (0, len(listed) - 1)):   # first step, every 10 s, last
            print("\r" * tty + f"sampling: step {i + 1}/{len(listed)}  t={t:3d}  {time.time() - start:5.1f}s",
                  end="" if tty else "\n", file=sys.stderr, flush=True)
            last = time.time()
        return S.guidance(*out.chunk(2), guidance, rescale) if guided else out    # on the raw model output (v or ε)

    x = ddim(denoise, x, ts, abar, pred)
    if progress and tty:
        print(file=sys.stderr)
    return nets.decode(x)


def sampling_schedule(meta, prediction=None, zero_terminal_snr=None):
    """(prediction, zero_terminal_snr) to sample with: the arguments when given, else the checkpoint's markers, else
    SD1.5's own (ε on the scaled-linear schedule), saying so. ε on the zero-terminal-SNR schedule is refused: its
    first step would divide by √ᾱ_999 = 0 (pitfall 7)."""
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


def sample(args):
    """Sample PNGs from a checkpoint: trailing DDIM (η = 0) with CFG rescale, on the schedule and parameterisation the
    checkpoint is marked with (or --prediction/--schedule). --seed S draws the initial latent exactly as
    torch.randn((n, 4, H/8, W/8), generator=torch.Generator("cpu").manual_seed(S)) in float32, then moves it to the
    device, as diffusers does with generator=torch.Generator("cpu").manual_seed(S): a run reproduces the other's."""
    if args.mask and not args.image:
        raise UserError("sample: --mask needs --image, the picture to inpaint")
    sizes = {name: image_size(path) for name, path in (("--image", args.image), ("--mask", args.mask)) if path}
    if len(set(sizes.values())) > 1:
        raise UserError(f"sample: --image is {sizes['--image']} and --mask {sizes['--mask']}: give a mask of the "
                        "image's size")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype or (
        "fp16" if device.startswith("cuda") else "fp32")]
    nets = load_model(args.model, "sample", vae_path=args.vae, ema=False if args.raw else None, dtype=dtype,
                      device=device)
    width, height = args.width, args.height
    if args.image and not (width and height):
        w, h = sizes["--image"]
        width, height = width or w // 64 * 64, height or h // 64 * 64
    default = 512 if nets.vae is not None else DEMO["sample_size"][0]        # zd's pixel-space demo trains at 16²
    guidance = args.cfg if args.cfg is not None else 7.5 if nets.vae is not None else DEMO_CFG
    try:
        images = generate(nets, [args.prompt] * args.n, negative=args.negative, steps=args.steps, guidance=guidance,
                          rescale=args.rescale, seed=args.seed, width=width or default, height=height or default,
                          prediction=args.prediction,
                          zero_terminal_snr=None if args.schedule is None else args.schedule == "zt",
                          image=args.image, mask=args.mask, strength=args.strength)
        paths = data.save_png(images, args.out, cols=min(args.n, 4))
    except (ValueError, data.BadImage) as e:               # generate's checks of sizes, model, markers and images
        raise UserError(f"sample: {e}") from None
    except OSError as e:
        raise UserError(f"sample: cannot write {e.filename or args.out} ({e.strerror}); choose another --out") from None
    for path in paths:
        print(f"wrote {path}")


def image_size(path):
    """(w, h) of an image file as it is displayed and as the sampler reads it, its EXIF orientation applied."""
    try:
        with data.open_image(path) as img:
            return data.upright_size(img)
    except (OSError, data.BadImage) as e:
        raise UserError(f"sample: cannot read the image {path} ({e}); give a PNG or JPEG file") from None


# ---------------------------------------------------------------------------------------------------------------------
# zd.py schedule / vectors / check: the diffusion math as a table to read, as golden vectors, and checked in others

def schedule_table(args):
    """Print the noise schedule as a table to check against the papers (or all 1000 rows as CSV); --plot FILE draws
    it instead (plot_schedule)."""
    if args.plot:
        return plot_schedule(args.plot, args.gamma)
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


def plot_schedule(path, gamma=5.0):
    """Draw SD1.5's schedule and its zero-terminal-SNR rescale side by side: √ᾱ_t, log SNR_t, and the min-SNR-γ v
    weight with its cumulative share of the total weight (matplotlib, an optional extra)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("schedule: --plot needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    ax_a, ax_snr, ax_w = fig.subplots(1, 3)
    t = torch.arange(S.T)
    for zt, colour, name in ((False, "tab:gray", "SD1.5"), (True, "tab:blue", "rescaled to ZT")):
        abar = S.alphas_cumprod(S.betas(zt))
        snr, w = S.snr(abar), S.min_snr_weight(S.snr(abar), gamma, "v")
        ax_a.plot(t, abar.sqrt(), color=colour, label=f"{name}: √ᾱ_999 = {abar[-1].sqrt():.3g}")
        ax_snr.plot(t, snr.log(), color=colour, label=f"{name}: SNR_999 = {snr[-1]:.2g}" + " (log −∞)" * zt)
        share = w.cumsum(0) / w.sum()
        ax_w.plot(t, w, color=colour, label=f"{name}: {1 - share[899]:.2%} at t ≥ 900,\nw_999 = {w[-1]:.2g}")
        ax_w.plot(t, share, color=colour, linestyle="--")
    ax_snr.axhline(math.log(gamma), color="black", linewidth=0.8, linestyle=":", label=f"SNR = γ = {gamma:g}")
    ax_w.axvspan(900, S.T - 1, color="tab:orange", alpha=0.15, label="t ≥ 900")
    ax_a.set(title="√ᾱ_t, the signal kept in x_t", xlabel="t", ylabel="√ᾱ_t")
    ax_snr.set(title="log SNR_t, SNR = ᾱ/(1 − ᾱ)", xlabel="t", ylabel="ln SNR_t")
    ax_w.set(title=f"min-SNR-γ v weight min(SNR, γ)/(SNR + 1), γ = {gamma:g};\ndashed: its cumulative share of the "
             "total weight", xlabel="t", ylabel="weight, share")
    for ax in (ax_a, ax_snr, ax_w):
        ax.legend(fontsize=8, loc="center right" if ax is ax_w else "upper right")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def vectors(args):
    """Write the golden vectors (check.golden: float64, seeded) with each tensor's description and tolerances and the
    known mistakes' values, as safetensors or as JSON that any standard library reads."""
    fmt = args.format or ("json" if args.out and args.out.endswith(".json") else "safetensors")
    out = args.out or f"zd_vectors.{fmt}"
    n = check.write_vectors(out, fmt, args.seed)
    print(f"wrote {n} tensors to {out} (descriptions in zd.description, tolerances in zd.tolerances)")


def load_object(spec):
    """MODULE:OBJECT or path/to/file.py:OBJECT → the object; a class is instantiated with no arguments."""
    mod, _, name = spec.partition(":")
    if not mod or not name:
        raise UserError(f"check: {spec!r} is not MODULE:OBJECT; write e.g. mytrainer:ZdAdapter or file.py:ZdAdapter")
    try:
        if mod.endswith(".py"):
            loc = importlib.util.spec_from_file_location(Path(mod).stem, mod)
            m = sys.modules[loc.name] = importlib.util.module_from_spec(loc)
            loc.loader.exec_module(m)
        else:
            sys.path[:0] = [] if os.getcwd() in sys.path else [os.getcwd()]    # as `python -m` would
            m = importlib.import_module(mod)
        obj = functools.reduce(getattr, name.split("."), m)
    except Exception as e:
        raise UserError(f"check: cannot get {name} from {mod} ({type(e).__name__}: {e}); run from the folder that "
                         "holds the module, or give its path: path/to/file.py:OBJECT")
    try:
        return obj() if isinstance(obj, type) else obj
    except Exception as e:
        raise UserError(f"check: {name}() raised {type(e).__name__}: {e}; give a class that needs no arguments, or an "
                         "instance")


def check_command(args):
    """Check other trainers' math against zd's, quantity by quantity, with a verdict and the name of any known mistake.
    Exit status 0 only if every quantity of every object is ok (or declared absent). What each member takes and
    returns: README, "Check your trainer against zd"; `--template` prints an adapter to fill in."""
    if args.template:
        print(check.TEMPLATE, end="")
        return
    if not args.target:
        raise UserError("check: give the adapter as MODULE:OBJECT or path/to/file.py:OBJECT (--template prints one)")
    ok = True
    for spec in args.target:
        with contextlib.redirect_stdout(sys.stderr):      # what the adapter prints: stdout is the verdict's alone
            obj = load_object(spec)
            schedule, how = (args.schedule, "--schedule") if args.schedule else check.schedule_of(obj)
            rows = check.check(obj, args.seed, schedule, args.debug)
        passed = bool(rows) and all(r["verdict"] in ("ok", "absent") for r in rows)
        ok &= passed
        if args.json:
            print(json.dumps(check.finite({"object": spec, "ok": passed, "schedule": schedule, "rows": rows}),
                             ensure_ascii=False, allow_nan=False))
            continue
        print(check.table(spec, obj, rows, schedule, how))
    if not ok:
        raise SystemExit(1)


# ---------------------------------------------------------------------------------------------------------------------
# zd.py convert / merge / inspect: checkpoints between layouts, the add-difference merge, and what a file is

def load_model(path, command, **kw):
    """model.load, with its refusals (no such file, not safetensors, a pickled .ckpt, missing keys) as one line."""
    try:
        return model.load(path, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"{command}: {e}") from None


def markers_for(args, meta):
    """The prediction/ZTSNR markers to write: flags win, else what the input declared, else SD1.5's (ε, no ZT)."""
    prediction = args.prediction or meta["prediction"] or "eps"
    ztsnr = args.ztsnr if args.ztsnr is not None else bool(meta["ztsnr"])
    return prediction, ztsnr


def output_file(command, path):
    """Check before any loading that the output's folder exists: a run should not fail after minutes of work."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{command}: the folder {folder} of {path} does not exist; create it or choose another output")
    return path


def convert(args):
    """Any SD1.5-family checkpoint (single file or diffusers folder) → an LDM single file SD front-ends load."""
    output_file("convert", args.output)
    if args.ema and not load_model(args.input, "convert", device="meta", verbose=False).meta["ema_present"]:
        raise UserError(f"convert: {args.input} has no model_ema.* weights: an -emaonly file's UNet is its EMA "
                        "already; convert it without --ema")
    nets = load_model(args.input, "convert", vae_path=args.vae, ema=args.ema)
    unet = nets.unet
    if args.inpaint:
        if unet.cfg.in_channels != 4:
            raise UserError(f"convert: --inpaint needs a 4-channel UNet, {args.input} has {unet.cfg.in_channels}")
        unet = model.expand_to_inpaint(unet)
    prediction, ztsnr = markers_for(args, nets.meta)
    with writing(args.output):
        model.save(args.output, unet, nets.text_encoder, nets.vae, half=args.half, prediction=prediction, ztsnr=ztsnr)
    print(f"wrote {args.output} ({'fp16' if args.half else 'fp32'}, {unet.cfg.in_channels}-channel UNet, "
          f"prediction {prediction}, ztsnr {ztsnr})")


def merge(args):
    """Add difference: A + α·(B − C) on every tensor, e.g. inpaint + (tuned − base) to start a ZD inpainting model
    from a base finetune. Takes the markers of B (the finetune) unless flags say otherwise. Holds three models."""
    output_file("merge", args.output)
    a, b, c = (load_model(p, "merge") for p in (args.a, args.b, args.c))
    for name in ("unet", "vae", "text_encoder"):
        if getattr(a, name) is not None:
            weights = [getattr(m, name).state_dict() for m in (a, b, c)]
            try:
                getattr(a, name).load_state_dict(model.add_difference(*weights, alpha=args.alpha))
            except ValueError as e:
                raise UserError(f"merge: {e}; A, B and C must be SD1.5-family models of the same sizes") from None
    prediction, ztsnr = markers_for(args, b.meta)
    with writing(args.output):
        model.save(args.output, a.unet, a.text_encoder, a.vae, half=args.half, prediction=prediction, ztsnr=ztsnr,
                   extra_metadata={"zd.merge": f"{args.a} + {args.alpha} * ({args.b} - {args.c})"})
    print(f"wrote {args.output}: A + {args.alpha}·(B − C), prediction {prediction}, ztsnr {ztsnr}")


def inspect_checkpoint(args):
    """What a checkpoint is, from its header alone: layout, variant, EMA, markers, dtypes, sizes, ignored keys."""
    print(args.path)
    for label, text in model.describe(load_model(args.path, "inspect", device="meta", verbose=False)):
        print(f"  {label:<13}{text}")


def survey(args):
    """`zd.py data`: the data side of `zd.py train` without a model (data.survey): what is found, kept and
    dropped by reason, images per bucket, batches per epoch, caption statistics, scan speed; a contact sheet per
    bucket in --sheet, of training crops with their captions."""
    if any(map(data.is_cache, args.data)):
        return describe_cache(args)
    tokenizer = model.Tokenizer.default()
    refusal = None
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():  # keep stdout JSON
        try:
            try:
                loader = data.Loader(args.data, args.batch_size, world_size=args.world_size,
                                     **{k: getattr(args, k) for k in LOADER_SETTINGS})
            except data.NoFullBatch as e:       # refused, after the report: what was found, dropped and why
                loader, refusal = e.loader, str(e)
            report = data.survey(loader, args.sheet, args.per_bucket,
                                 lambda texts: map(len, tokenizer.tokens(texts)))
        except (FileNotFoundError, ValueError) as e:  # the Loader's errors name the setting to change
            raise UserError(f"data: {e}") from None
    if not report["kept"]:
        refusal = refusal or "no sample passes the filters: lower --min-side or the score filters"
    if args.json:
        print(json.dumps(report, indent=1))
    if refusal:
        raise UserError(f"data: {refusal}")
    return report


def describe_cache(args):
    """`zd.py data --data CACHE`: what a latent cache holds and what made it (data.describe_cache)."""
    try:
        report = data.describe_cache(args.data[0])
    except ValueError as e:
        raise UserError(f"data: {e}") from None
    if args.json:
        print(json.dumps(report, indent=1))
        return report
    made = report["made_by"]
    print(f"data: latent cache {report['cache']}: {report['images']:,} images ({report['layout']}), "
          f"{report['undecodable']} undecodable; {made['dtype']}, {report['bytes'] / 2 ** 20:.1f} MiB on disk, "
          f"{report['bytes_per_image'] / 1024:.1f} KiB per image")
    print("data: per bucket: " + ", ".join(f"{b.replace('x', '×')}: {n:,}" for b, n in report["buckets"].items()))
    print(f"data: made by VAE {made['vae']} from {', '.join(made['sources'])} with "
          + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in made["settings"].items()))
    if report["dtype_error"]:
        e = report["dtype_error"]
        print(f"data: {made['dtype']} against fp32: mean max |Δ| {e['mean']['max_abs']:.2e}, std max |Δ| "
              f"{e['std']['max_abs']:.2e}")
    return report


# ---------------------------------------------------------------------------------------------------------------------
# The command line

class Parser(argparse.ArgumentParser):
    """argparse, with a mistake in the flags said on one line (the usage is one --help away), and a flag that is not
    one answered by its subcommand with the nearest it has (difflib)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def add_subparsers(self, **kw):
        action = super().add_subparsers(**kw)
        self.commands = action.choices                     # name → its parser, whose flags a typo is matched against
        return action

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:      # said by the subcommand's parser, which knows the flags a typo was meant to be
            command = getattr(self, "commands", {}).get(getattr(parsed, "command", None), self)
            flags = [flag for action in command._actions for flag in action.option_strings]
            typed = [arg.split("=")[0] for arg in unknown if arg.startswith("--")]
            near = [m for arg in typed for m in difflib.get_close_matches(arg.replace("_", "-"), flags, 1, 0.6)]
            command.error(f"unrecognized arguments: {' '.join(unknown)}"
                          + (f"; did you mean {', '.join(dict.fromkeys(near))}?" if near else ""))
        return parsed


def show(value):
    """A setting's value as --help and messages show it."""
    return " | ".join(map(str, value)) if isinstance(value, (tuple, list)) else "off" if value is False else value


def add_settings(p):
    """One flag per Settings field, in its group; each defaults to None (not given), and its help shows the recipe's
    default and the demo's."""
    groups = {"model": "model and data", "prediction": "the recipe (ZeroDiffusion model card)",
              "steps": "optimisation", "resume": "run", "device": "hardware"}
    group = p
    for f in dataclasses.fields(Settings):
        group = p.add_argument_group(groups[f.name]) if f.name in groups else group
        flag, help, kw = setting_flag(f)
        shown = ([f"default {show(f.default)}"] if f.default not in (None, ()) else []) + (
            [f"demo {show(DEMO[f.name])}" if f.default not in (None, ()) else f"without --model: {show(DEMO[f.name])}"]
            if f.name in DEMO else [])
        shown = f" ({'; '.join(shown)})" if shown else ""
        group.add_argument(flag, dest=f.name, default=None, help=(help + shown).replace("%", "%%"), **kw)


def setting_flag(f):
    """(flag, help, argparse keywords) of a Settings field: its type, choices and metavar; a bool is a switch."""
    kw = dict(f.metadata)
    flag, help = kw.pop("flag", "--" + f.name.replace("_", "-")), kw.pop("help")
    if isinstance(f.default, bool):
        kw["action"] = "store_true"
    elif "action" not in kw:
        kw.setdefault("type", str if f.default is None else type(f.default))
    return flag, help, kw


def add_marker_flags(s):
    s.add_argument("--prediction", choices=["v", "eps"], help="mark the output as this (default: from the input)")
    s.add_argument("--ztsnr", action=argparse.BooleanOptionalAction, default=None,
                   help="mark the output as zero-terminal-SNR or not (default: from the input)")
    s.add_argument("--half", action="store_true", help="store fp16 tensors")


def add_data_command(sub):
    """The `data` subcommand: train's data settings, and what to print and draw."""
    s = sub.add_parser("data", help="see and filter the training data before training: counts, buckets, captions, "
                       "contact sheets of the crops", description=survey.__doc__)
    for f in dataclasses.fields(Settings):
        if f.name in LOADER_SETTINGS + ("batch_size",):
            flag, help, kw = setting_flag(f)
            shown = "" if f.default is None else f" (default {show(f.default)})"
            s.add_argument(flag, default=f.default, help=(help + shown).replace("%", "%%"), **kw)
        elif f.name == "data":
            s.add_argument("--data", action="append", required=True, metavar="SRC", help=f.metadata["help"])
    s.add_argument("--world-size", type=at_least(1), default=1, help="GPUs of the run, for its global batch "
                   "(default 1)")
    s.add_argument("--sheet", default="data_preview", metavar="DIR", help="contact sheets' folder ('' for none)")
    s.add_argument("--per-bucket", type=at_least(1), default=16, help="images per contact sheet (default 16)")
    s.add_argument("--json", action="store_true", help="print the report as JSON, also when refused (the log goes to "
                   "stderr)")
    s.set_defaults(func=survey)


def add_cache_command(sub):
    """The `cache` subcommand: train's model and data settings (those that decide the crops), and the cache's dtype."""
    s = sub.add_parser("cache", help="encode the training images once with the frozen VAE; train --data CACHE then "
                       "reads their posterior moments (same results, no VAE in the loop)", description=cache.__doc__)
    s.add_argument("--model", required=True, help="the checkpoint whose VAE encodes (train it with the same one)")
    s.add_argument("--vae", help="a separate VAE file for the checkpoint")
    s.add_argument("--data", action="append", required=True, metavar="SRC", help="as train's; repeatable")
    s.add_argument("--out", required=True, help="the cache's folder; an interrupted cache continues when the same "
                   "command runs again")
    for f in dataclasses.fields(Settings):
        if f.name in LOADER_SETTINGS + ("batch_size",) and f.name not in ("seed", "caption_dropout"):
            flag, _, kw = setting_flag(f)
            s.add_argument(flag, default=f.default, help=f"as train's (default {f.default})", **kw)
    s.add_argument("--dtype", choices=tuple(data.CACHE_DTYPES), default="fp32", help="stored moments: fp16/bf16 halve "
                   "the cache, and the rounding error against fp32 is measured and printed (default fp32: exact)")
    s.add_argument("--device", help="cuda, cuda:1, cpu (default: the rank's GPU if there is one)")
    s.set_defaults(func=cache)


TRAIN_HELP = """Fine-tune Stable Diffusion 1.5 with the ZeroDiffusion recipe: v-prediction on SD1.5's schedule rescaled
to zero terminal SNR, min-SNR-γ loss weights, input-perturbation noise, aspect buckets of ≈512², caption dropout to
"", a constant EMA initialised from the checkpoint's EMA, CLIP and the VAE frozen; AdamW, warm-up.

    python zd.py train --model v1-5-pruned-emaonly.safetensors --data /data/laion-1024 --out runs/zd
    torchrun --nproc_per_node 8 zd.py train --model ... --data '/data/shards/*.tar' ...
    python zd.py train --model ... --data /data/zd_cache ...     # a latent cache from `zd.py cache`: no VAE per step

With no --model it runs the built-in demo on the CPU in minutes: a small UNet trained from scratch in pixel space on
procedural images of plain colours and shapes, a tiny frozen random CLIP encoding the captions, through the same recipe
code. Ctrl-C or SIGTERM saves the last step and stops; --resume continues."""


def parser():
    """The command line: one subparser per subcommand, each calling a plain function of the parsed arguments."""
    p = Parser(prog="zd.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of a refused input (for bug reports)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("train", help="fine-tune SD1.5 with the ZeroDiffusion recipe (no arguments: a CPU demo)",
                       description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(s)
    s.set_defaults(func=train)

    s = sub.add_parser("demo", help="train the demo with ZT/v and with SD1.5's schedule/ε; compare black and white",
                       description=demo.__doc__)
    s.add_argument("--out", default="runs", help="parent folder: OUT/demo and OUT/demo-sd15-eps (default runs)")
    s.add_argument("--steps", type=at_least(1), default=DEMO["steps"], help=f"training steps of each (default "
                   f"{DEMO['steps']})")
    s.add_argument("--seed", type=at_least(0), default=0, help="training and sampling seed (default 0)")
    s.add_argument("--n", type=at_least(1), default=8, help="samples per prompt (default 8)")
    s.add_argument("--no-train", action="store_true", help="only sample the two models already in OUT")
    s.add_argument("--overwrite", action="store_true", help="train again over earlier runs in OUT")
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
    s.add_argument("--steps", type=at_least(1), default=25, help="DDIM steps, trailing spacing from t = 999 "
                   "(default 25)")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 7.5, pixel-space demo models 3; "
                   "≤ 1: none)")
    s.add_argument("--rescale", type=probability, default=0.7, help="CFG rescale φ, Lin et al. 2023 Alg. 2 "
                   "(default 0.7)")
    s.add_argument("--seed", type=at_least(0), default=0, help='initial latent = torch.randn((n, 4, H/8, W/8), '
                   'generator=torch.Generator("cpu").manual_seed(SEED)), float32, as diffusers draws it (default 0)')
    s.add_argument("--width", type=side, help="multiple of 64 (default 512, or --image's size rounded down; "
                                              "pixel-space demo models: multiple of 8, default 16)")
    s.add_argument("--height", type=side, help="as --width")
    s.add_argument("--n", type=at_least(1), default=1, help="images of the prompt, sampled as one batch (default 1)")
    s.add_argument("--out", default="sample.png", help="a .png path, or a folder for several images plus grid.png "
                                                       "(default sample.png)")
    s.add_argument("--prediction", choices=("v", "eps"), help="override the checkpoint's marker (unmarked: eps)")
    s.add_argument("--schedule", choices=("zt", "sd15"), help="override the checkpoint's marker: zero terminal SNR or "
                                                             "SD1.5's scaled-linear (unmarked: sd15)")
    s.add_argument("--image", help="init image: img2img for a base model, the image to inpaint for an inpainting model")
    s.add_argument("--mask", help="inpainting mask, white = repaint (inpainting models only; needs --image)")
    s.add_argument("--strength", type=probability, help="how far up the step list --image starts (default 0.8 "
                   "img2img, 1.0 inpainting)")
    s.add_argument("--device", help="default cuda if available, else cpu")
    s.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="weights' dtype (default fp16 on GPU, fp32 on "
                                                                     "CPU); the schedule math stays fp32/float64")
    s.set_defaults(func=sample)

    s = sub.add_parser("schedule", help="print the noise schedule (β, ᾱ, SNR, loss weights) and the sampling timesteps",
                       description=schedule_table.__doc__)
    s.add_argument("--steps", type=at_least(1), default=10, help="number of sampling steps (default 10)")
    s.add_argument("--spacing", choices=("trailing", "leading", "linspace"), default="trailing",
                   help="sampling timestep spacing (default trailing, Lin et al. 2023 Table 2)")
    s.add_argument("--offset", type=at_least(0), default=1, help="steps_offset of leading spacing (default 1, as "
                   "SD1.5)")
    s.add_argument("--no-zt", action="store_true", help="SD1.5's schedule as is, without the zero-terminal-SNR rescale")
    s.add_argument("--gamma", type=at_least(0, float), default=5.0, help="min-SNR γ for the weight column (default 5)")
    s.add_argument("--all", action="store_true", help="print all 1000 timesteps")
    s.add_argument("--csv", action="store_true", help="all 1000 rows as CSV, full precision")
    s.add_argument("--plot", metavar="FILE", help="draw √ᾱ, log SNR and the v weight of SD1.5's and the rescaled "
                   "schedule into FILE (.png, .svg, .pdf; needs matplotlib)")
    s.set_defaults(func=schedule_table)

    s = sub.add_parser("vectors", help="write golden test vectors to check another trainer's math against",
                       description=vectors.__doc__)
    s.add_argument("--out", help="output file (default zd_vectors.safetensors, or .json with --format json)")
    s.add_argument("--format", choices=("safetensors", "json"), help="json: tensors as nested lists, for trainers "
                   "outside PyTorch (default: from --out's extension, else safetensors)")
    s.add_argument("--seed", type=at_least(0), default=0, help="seed of the random cases (default 0)")
    s.set_defaults(func=vectors)

    s = sub.add_parser("check", help="check another trainer's math against zd's, quantity by quantity, naming known "
                       "mistakes", description=check_command.__doc__)
    s.add_argument("target", nargs="*", metavar="MODULE:OBJECT", help="an object (a class is instantiated with no "
                   "arguments) with any of: " + ", ".join(check.PROTOCOL) + "; MODULE may be a path/to/file.py")
    s.add_argument("--schedule", choices=("zt", "sd15"), help="check against the recipe's zero-terminal-SNR schedule "
                   "or SD1.5's own (default: recognised from the adapter's alphas_cumprod, else zt)")
    s.add_argument("--json", action="store_true", help="one strict JSON line per object instead of the table (NaN as "
                   "null); what the adapter prints goes to stderr")
    s.add_argument("--template", action="store_true", help="print a commented adapter to fill in, and exit")
    s.add_argument("--seed", type=at_least(0), default=0, help="seed of the random cases (default 0)")
    s.set_defaults(func=check_command)

    s = sub.add_parser("convert", help="any SD1.5-family checkpoint → an LDM single .safetensors file",
                       description=convert.__doc__)
    s.add_argument("input", help="single .safetensors file or diffusers folder")
    s.add_argument("output", help="output .safetensors (a sidecar .yaml is written beside it)")
    s.add_argument("--vae", help="take the VAE from this .safetensors file")
    ema = s.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None, help="require and take model_ema.*")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="take the raw UNet of a file with EMA")
    s.add_argument("--inpaint", action="store_true", help="make a 9-channel inpainting UNet (new channels zero)")
    add_marker_flags(s)
    s.set_defaults(func=convert)

    s = sub.add_parser("merge", help="add difference: A + α·(B − C), e.g. inpaint + (tuned − base)",
                       description=merge.__doc__)
    s.add_argument("a", help="model to add to (e.g. SD1.5 inpainting)")
    s.add_argument("b", help="finetuned model (e.g. a ZD finetune)")
    s.add_argument("c", help="what B was finetuned from (e.g. SD1.5)")
    s.add_argument("output", help="output .safetensors")
    s.add_argument("--alpha", type=float, default=1.0, help="scale of the difference (default 1)")
    add_marker_flags(s)
    s.set_defaults(func=merge)

    s = sub.add_parser("inspect", help="what a checkpoint is: layout, variant, EMA, markers, dtypes, sizes",
                       description=inspect_checkpoint.__doc__)
    s.add_argument("path", help="single .safetensors file or diffusers folder")
    s.set_defaults(func=inspect_checkpoint)

    add_data_command(sub)
    add_cache_command(sub)
    return p


def main(argv=None):
    """Run a subcommand. A UserError is printed as its one line (exit status 1); --debug or ZD_DEBUG=1 shows its
    traceback instead."""
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        if args.debug or os.environ.get("ZD_DEBUG"):
            raise
        print(e, file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:                             # `train` handles its own: it saves first
        print(f"zd.py {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Stopped as e:                                  # `train` signalled in start-up: nothing to save, status 0
        print(e, file=sys.stderr)
    except BrokenPipeError:   # `zd.py schedule --csv | head`: the reader has gone; say no more (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
