"""data.py — files → buckets → batches of pixels (or cached latents), captions and inpainting masks for `zd.py train`;
also the images in and out of `zd.py sample` (image_tensor, mask_tensor, save_png) and the judge of the demo's samples
(demo_judge).

Sources
  folder   a directory, searched recursively for .jpg .jpeg .png .webp .bmp. The caption of a/b.jpg is a/b.txt,
           else a/b.caption, else the "caption" (or "text") field of a/b.json; no caption → "" (counted).
           The json may also carry original_width/original_height and the LAION scores below.
  shards   img2dataset / WebDataset tars (00000.tar holding key.jpg|png|webp, key.txt, key.json), given as paths or
           globs and read as a stream (tarfile "r|"), never unpacked.
  "demo"   DemoSource: plain colours and simple shapes drawn from a seed, for `zd.py train` with no data.
  cache    a latent cache that `zd.py cache` made of folders or shards: CACHE/zd_cache.json (the manifest, written
           last) and CACHE/parts/NNNNN.safetensors, each part holding the VAE posterior's mean and std of its images'
           bucket crops (KEY.mean, KEY.std; with flip also KEY.mean_flip, KEY.std_flip) and, in its header, their
           keys, names, captions and sizes. A cache of folders keeps the scan's index order, CACHE_PART_IMAGES images
           a part; a cache of shards has a part per shard with each sample's ordinal in it, so batches, indices and
           every seeded draw are those of the images (CacheStream). It stands alone, like shards.

Filters (folders and shards) are decided from a sample's image header and json, never by decoding pixels. A dropped
sample is counted once, under the first test it fails, in this order:
  min-side       its *original* shortest side < min_side (json original_width/height when present, else the header);
  min-aesthetic  json AESTHETIC_SCORE (or aesthetic) < min_aesthetic;
  max-watermark  json pwatermark > max_watermark;
  max-unsafe     json punsafe > max_unsafe;
  unscored       (with drop_unscored) it lacks a score that an active filter reads; without it, it is kept and counted.
The three score columns are those img2dataset copies from LAION's parquet into each json; keys match in any case, and
a score that is absent, null or not a finite number counts as missing. They are off by default. Files that cannot be
read (empty, not an image, unreadable, decompression bomb, truncated shard, a caption that is binary, not text) are
skipped, counted in Loader.stats["bad_files"] and named in a warning; nothing in a file can stop a run.

The folder scan reads headers and sidecars in the loader's worker processes and caches what it learns in
FOLDER/.zd_scan.json: an entry is reused while the file's size, mtime and ctime (which permissions change) and its
sidecars' mtimes and ctimes are unchanged, so the scans after the first (`zd.py data`, then `zd.py train`, then
every rank) open no image. survey(loader), beside Loader, is the data side of training without a model (`zd.py data`):
counts, buckets, batches per epoch, captions, contact sheets of the crops.

Buckets: `buckets()` makes kohya-style aspect buckets (defaults: the five ZD buckets of ≈512²). Each image goes to the
bucket nearest in aspect by |log(w/h) − log(bw/bh)| (symmetric under transpose, unlike |w/h − bw/bh|), is resized to
cover it with its aspect kept, and the excess is cropped (centre, or a seeded random offset). Pixels are in [−1, 1].

Batches: every batch comes from one bucket.
  Folder and demo sources: each epoch, the images of each bucket are shuffled by (seed, epoch) and cut into *global*
  batches of batch_size × world_size; **a bucket's last incomplete global batch is dropped for that epoch** (its images
  differ every epoch because the shuffle does; the count is printed at start). The global batches of all buckets are
  then shuffled together and rank r takes slice r of each, so the composition of a global batch does not depend on
  world_size. Global position p is batch p mod n of epoch p div n: resuming at p decodes nothing before it.
  Shards: shards are dealt to (rank, worker) readers, re-dealt every epoch, so each sample is read once per epoch.
  Each reader keeps one buffer per bucket and emits a batch when a buffer is full; buffers carry over into the next
  epoch, so nothing is dropped. Batch composition therefore depends on the number of ranks and workers. Positions
  count this rank's batches; resuming replays the readers' streams reading headers only.
Per-sample randomness (caption dropout, flip, crop offset, mask) comes from (seed, epoch, global sample index), never
from the rank or worker that happens to load the sample.

Validation: Loader(val_fraction=F) holds out a seeded share F of the folder and demo images, chosen by a hash of each
image's path in its folder (held_out), and trains on the rest; Loader(validation=True) is the validation set itself,
that share or all of its sources (--val-data), read by fixed_batches: every image once, in the same batches every
time.
"""
import glob
import hashlib
import heapq
import io
import itertools
import json
import math
import os
import re
import signal
import tarfile
import tempfile
import time
import unicodedata
import warnings
from collections import Counter, namedtuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's own bomb threshold (≈89 Mpx): larger headers are refused, never decoded
WARN_LIMIT = 20  # bad files named one by one; past this they are only counted (Loader.stats)
SIDECARS = (".txt", ".caption", ".json")
SCORE_KEYS = (("aesthetic_score", "aesthetic"), ("pwatermark",), ("punsafe",))  # json keys of the scores, lower case
DROP_REASONS = ("min-side", "min-aesthetic", "max-watermark", "max-unsafe", "unscored")  # the filters, in test order
SCAN_CACHE = ".zd_scan.json"  # in the folder's root; written atomically, so ranks scanning at once cannot corrupt it
SCAN_CHUNK = 512  # images per task of a parallel folder scan: a task's start-up is small next to 512 headers

# One image to load: `src` is a path (folder), the encoded bytes (shard) or ("demo", seed, i);
# (w, h) is its upright size.
Item = namedtuple("Item", "name src caption w h")
# What the scan learns of a sample without decoding pixels: upright header size w×h; orig, the original (w, h) the
# min-side filter reads; scores (aesthetic, pwatermark, punsafe), each a float or None; the caption and whether a
# caption file or field gave it; error, (reason, detail) of a file that cannot be used, else None.
Record = namedtuple("Record", "w h orig scores caption captioned error")
# The filters of the module docstring; None turns a score filter off.
Filters = namedtuple("Filters", "min_side min_aesthetic max_watermark max_unsafe drop_unscored",
                     defaults=(1024, None, None, None, False))


class BadImage(Exception):
    """A file that cannot be used; `reason` is the short key counted in Loader.stats["bad_files"]."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# ---- buckets -------------------------------------------------------------------------------------------------------

def buckets(area=512 * 512, min_side=384, max_side=640, step=64):
    """Kohya-style aspect buckets [(w, h)]: for each width w in min_side..max_side (by step), the largest height h, a
    multiple of step, with w·h ≤ area and h in range. Defaults → 384×640, 448×576, 512×512, 576×448, 640×384."""
    out = []
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            out.append((w, h))
    return out


def bucket_for(w, h, buckets):
    """The bucket nearest to w×h in aspect ratio by |log(w/h) − log(bw/bh)|: w×h and h×w land in transposed buckets."""
    a = math.log(w / h)
    return min(buckets, key=lambda b: abs(a - math.log(b[0] / b[1])))


# ---- images and captions -------------------------------------------------------------------------------------------

def open_image(src):
    """PIL image with only its header read. A header over MAX_PIXELS is a decompression bomb and refused here."""
    if isinstance(src, bytes):
        src = io.BytesIO(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(src)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImage("decompression bomb", str(e))
    except Exception as e:  # PIL signals unreadable input with many exception types
        if isinstance(e, OSError) and e.errno is not None:  # the file, not its content: permissions, a dangling link
            raise BadImage("unreadable", f"{type(e).__name__}: {e.strerror}")
        raise BadImage("empty file" if _is_empty(src) else "not an image", f"{type(e).__name__}: {e}")
    if img.width * img.height > MAX_PIXELS:
        raise BadImage("decompression bomb", f"{img.width}×{img.height}")
    return img


def _is_empty(src):
    return os.path.getsize(src) == 0 if isinstance(src, str) else src.getbuffer().nbytes == 0


def upright_size(img):
    """(w, h) as displayed: EXIF orientations 5–8 rotate by 90°, so the stored width is the displayed height."""
    try:
        turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # a broken EXIF block is not worth dropping the image: treat it as upright
        turned = False
    return (img.height, img.width) if turned else (img.width, img.height)


def to_rgb(img):
    """Any PIL mode → 8-bit RGB. 16-bit greys are scaled by 1/257 (convert() would clip them at 255); transparency is
    composited over white, as viewers show it (the RGB under alpha = 0 is often black or garbage)."""
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or a.max() > 255:
            a = a / 257
        img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy even an RGB image


def open_upright(src, cover=None):
    """The one way zd opens an image for its pixels, in training (load_image) and in the sampler (image_tensor,
    mask_tensor): open_image's checked header, then the pixels turned upright as the EXIF orientation tag says (a
    phone stores a portrait photo sideways and tags it so). With cover = (W, H), a JPEG is decoded at 1/2, 1/4 or 1/8
    in the DCT domain when that still covers W × H upright."""
    img = open_image(src)
    try:
        if cover and img.format == "JPEG":
            w, h = upright_size(img)
            scale = max(cover[0] / w, cover[1] / h)
            img.draft("RGB", (math.ceil(img.width * scale), math.ceil(img.height * scale)))
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as e:  # truncated or corrupt data surfaces only now, when the pixels are decoded
        raise BadImage("corrupt", f"{type(e).__name__}: {e}")
    return img


def load_image(src, size, u=0.5, v=0.5):
    """Decode `src` upright in RGB, resized to cover size = (W, H) with its aspect kept and the excess cropped at
    fraction (u, v) of the slack ((0.5, 0.5) = centre). Cropping in source coordinates before resampling (resize's
    `box`) gives the same pixels as resize-then-crop without the 768000×384 intermediate a 20000×10 image would need."""
    img = demo_sample(src[1], src[2])[0] if isinstance(src, tuple) else open_upright(src, cover=size)
    bw, bh = size
    try:
        img = to_rgb(img)
        w, h = img.size
        scale = max(bw / w, bh / h)
        cw, ch = min(w, bw / scale), min(h, bh / scale)  # bw / (bw / w) can round to w + 1 ulp: a negative offset
        x0, y0 = (w - cw) * u, (h - ch) * v
        return img.resize(size, Image.Resampling.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch), reducing_gap=3.0)
    except Exception as e:  # truncated or corrupt data surfaces only now, when the pixels are decoded
        raise BadImage("corrupt", f"{type(e).__name__}: {e}")


def decode_caption(raw):
    """Caption text from bytes: a BOM picks UTF-8 or UTF-16; else UTF-8, falling back to Windows-1252, then Latin-1
    (which never fails). NULs go (UTF-16 without a BOM), whitespace runs become one space. Long captions are kept whole:
    the tokenizer truncates to 77 tokens. BadImage("binary caption") when the bytes are not text: control characters
    (random bytes, an image's header) or nothing but NULs."""
    if raw.startswith(b"\xef\xbb\xbf"):
        text = raw[3:].decode("utf-8", errors="replace")
    elif raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = raw.decode("utf-16", errors="replace")
    else:
        for encoding in ("utf-8", "cp1252", "latin-1"):
            try:
                text = raw.decode(encoding)
                break
            except UnicodeDecodeError:
                continue
    kept = text.replace("\x00", "")
    controls = sum(c < " " and c not in "\t\n\r\v\f" or "\x7f" <= c <= "\x9f" for c in kept)
    if controls or (text and not kept):
        raise BadImage("binary caption", f"{controls} control characters in {len(text)}" if controls else "only NULs")
    return " ".join(kept.split())


def _parse_json(raw):
    """A sidecar json as a dict; {} when it is unreadable (it only adds a caption, the original size and scores)."""
    try:
        meta = json.loads(decode_caption(raw))
    except (ValueError, RecursionError, BadImage):  # RecursionError: thousands of nested brackets
        return {}
    return meta if isinstance(meta, dict) else {}


def _json_caption(meta):
    caption = meta.get("caption") or meta.get("text") or ""
    return " ".join(str(caption).split())


def _original_size(meta, w, h):
    """img2dataset stores a resized copy and records the original size in the json: filter on that."""
    try:
        return int(meta["original_width"]), int(meta["original_height"])
    except (KeyError, TypeError, ValueError):
        return w, h


# ---- images in and out of the sampler (`zd.py sample`) -------------------------------------------------------------

def image_tensor(image, width, height):
    """A path, PIL image or tensor → [1, 3, H, W] in [−1, 1]; PIL images resized with Lanczos, as diffusers does."""
    if isinstance(image, torch.Tensor):
        return image.reshape(-1, 3, *image.shape[-2:]).float()
    return _sampler_pixels(image, to_rgb, width, height).permute(2, 0, 1)[None] * 2 - 1


def mask_tensor(mask, width, height):
    """A path, PIL image or tensor → [1, 1, H, W] of 0/1, 1 = repaint (white), binarised at 0.5 like diffusers."""
    if isinstance(mask, torch.Tensor):
        m = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    else:
        m = _sampler_pixels(mask, lambda img: img.convert("L"), width, height)[None, None]
    return (m >= 0.5).float()


def _sampler_pixels(src, convert, width, height):
    """A path (opened upright, as training opens it) or PIL image, converted (RGB or L) and resized to width × height
    (Lanczos), as float32 in [0, 1]: [H, W, 3] or [H, W]."""
    img = convert(open_upright(src) if isinstance(src, (str, os.PathLike)) else src)
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255)


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


# ---- sources -------------------------------------------------------------------------------------------------------

class DemoSource:
    """Procedural demo set: n images, deterministic from seed, of plain colours (half the set; black and white are
    37% of all) and simple shapes on a background (the other half), 64–96 px at five aspect ratios, with captions like
    "a red circle on a black background". The demo's point is that a v/zero-terminal-SNR model reaches true black and
    white and an SD1.5-schedule ε model cannot; half the set is shapes so that a small model also learns every colour
    as a shape and as a background in a few minutes. Synthetic, so exempt from the min_side filter. The demo trains
    on them at 16×16 (zd.DEMO's one bucket), each resized to cover it and centre-cropped."""

    def __init__(self, n=2048, seed=0):
        self.n, self.seed = n, seed

    def items(self):
        out = []
        for i in range(self.n):
            img, caption = demo_sample(self.seed, i)
            out.append(Item(f"demo:{i}", ("demo", self.seed, i), caption, img.width, img.height))
        return out


DEMO_COLOURS = {"black": (0, 0, 0), "white": (255, 255, 255), "red": (220, 30, 30), "green": (30, 160, 60),
                "blue": (30, 60, 220), "yellow": (240, 210, 30)}
DEMO_SIZES = ((96, 64), (64, 96), (80, 80), (88, 72), (72, 88))


def demo_sample(seed, i):
    """Image i of the demo set and its caption."""
    rng = np.random.default_rng([seed, i])
    w, h = DEMO_SIZES[rng.integers(len(DEMO_SIZES))]
    kind, names = rng.random(), list(DEMO_COLOURS)
    if kind < 0.3:
        bg = "black" if kind < 0.15 else "white"
    else:
        bg = names[rng.integers(len(names))]
    img = Image.new("RGB", (w, h), DEMO_COLOURS[bg])
    if kind < 0.5:
        return img, f"a plain {bg} image"
    fg = [c for c in names if c != bg][rng.integers(len(names) - 1)]
    shape = ("circle", "square", "triangle")[rng.integers(3)]
    r = min(w, h) * rng.uniform(0.2, 0.35)
    cx, cy = w / 2 + rng.uniform(-0.15, 0.15) * w, h / 2 + rng.uniform(-0.15, 0.15) * h
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=DEMO_COLOURS[fg])
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=DEMO_COLOURS[fg])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=DEMO_COLOURS[fg])
    return img, f"a {fg} {shape} on a {bg} background"


# demo_judge's regions at the demo's 16×16, from where demo_sample draws its shapes (centre within ±15% of the middle,
# radius 20–35% of the short side): the central 2×2 px, inside ≥ 95% of the training circles and squares, and the four
# 2×2-px corners, which ≤ 3% of them reach (test_demo_judge_regions_match_the_training_shapes). Of the training images
# themselves, 96% have the shape's colour in the centre and 99.6% the background's in the corners, within 40. The
# whole 1-px border would be a weaker test: big training shapes touch it (2% of the training images fail there), and
# so do the model's faint halos.
DEMO_CENTRE = torch.zeros(16, 16, dtype=torch.bool)
DEMO_CENTRE[7:9, 7:9] = True
DEMO_CORNERS = torch.zeros(16, 16, dtype=torch.bool)
DEMO_CORNERS[:2, :2] = DEMO_CORNERS[:2, -2:] = DEMO_CORNERS[-2:, :2] = DEMO_CORNERS[-2:, -2:] = True


def demo_judge(prompt, images):
    """Whether 16×16 uint8 images [n, 16, 16, 3] drew a demo caption's colours (DEMO_COLOURS, 0–255). A plain colour
    is right when an image's mean is within 25 of it in every channel, and the prompt passes when the mean of the n
    images is. A shape on a background is right when the mean of the central region is within 40 of the shape's colour
    and the mean of the corners within 40 of the background's, in every channel, and the prompt passes when ≥ 7/8 of
    the images are right. Returns (colours wanted, got, images right, passed): [1, 3], the images' mean colour, or
    [2, 3], their mean colour in the centre and in the corners."""
    x, words = images.float(), prompt.split()
    plain = words[1] == "plain"
    if plain:                                                       # [n, 1, 3]: the whole image
        want, got = torch.tensor([DEMO_COLOURS[words[2]]]), x.mean((1, 2))[:, None]
    else:                                                           # [n, 2, 3]: centre, corners
        want = torch.tensor([DEMO_COLOURS[words[1]], DEMO_COLOURS[words[-2]]])
        got = torch.stack([x[:, DEMO_CENTRE].mean(1), x[:, DEMO_CORNERS].mean(1)], dim=1)
    right = int(((got - want).abs() <= (25 if plain else 40)).flatten(1).all(1).sum())
    ok = bool(((got.mean(0) - want).abs() <= 25).all()) if plain else right >= 7 * len(x) / 8
    return want, got.mean(0), right, ok


# ---- the scan: what a sample is, whether it is kept --------------------------------------------------------------

def read_scores(meta):
    """(aesthetic, pwatermark, punsafe) of a sample's json, the LAION columns img2dataset copies into it. Keys match in
    any case (LAION's parquet says AESTHETIC_SCORE, other tools aesthetic); a score that is absent, null or not a
    finite number (NaN, "n/a", true, a list) is None."""
    lower = {str(k).lower(): v for k, v in meta.items()}
    scores = []
    for keys in SCORE_KEYS:
        found = [_score(lower[k]) for k in keys if k in lower]
        scores.append(next((x for x in found if x is not None), None))
    return tuple(scores)


def _score(value):
    if isinstance(value, bool):  # json true would otherwise read as 1.0
        return None
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def verdict(record, f):
    """(reason, unscored) for a readable sample under Filters f: reason is the first of DROP_REASONS it fails, or None
    to keep it; unscored says it lacks a score that an active filter reads."""
    if min(record.orig) < f.min_side:
        return "min-side", False
    unscored = False
    limits = (f.min_aesthetic, f.max_watermark, f.max_unsafe)
    for reason, limit, score, sign in zip(DROP_REASONS[1:4], limits, record.scores, (1, -1, -1)):
        if limit is None:
            continue
        if score is None:
            unscored = True
        elif sign * (score - limit) < 0:  # min-aesthetic keeps score ≥ limit, the max- filters score ≤ limit
            return reason, False
    return ("unscored" if unscored and f.drop_unscored else None), unscored


def new_stats():
    """The counts of a scan: kept, unscored (kept without a score), missing_captions; dropped and bad_files by reason;
    ignored, a folder's files that are neither images nor sidecars, by extension."""
    return Counter(kept=0, unscored=0, missing_captions=0, dropped=Counter(), bad_files=Counter(), ignored=Counter())


def admit(name, record, f, stats, warn):
    """Count one scanned sample into stats (a bad file through warn(name, BadImage)); True when training uses it."""
    if record.error:
        warn(name, BadImage(*record.error))
        return False
    reason, unscored = verdict(record, f)
    if reason:
        stats["dropped"][reason] += 1
        return False
    stats["kept"] += 1
    stats["unscored"] += unscored
    stats["missing_captions"] += not record.captioned
    return True


def _record(meta, w, h, caption=None):
    """Record of a readable sample; caption None: no caption file, so the json's field (or "", counted as missing)."""
    text = _json_caption(meta) if caption is None else caption
    return Record(w, h, _original_size(meta, w, h), read_scores(meta), text, caption is not None or bool(text), None)


def _bad(reason, detail=""):
    return Record(0, 0, (0, 0), (None, None, None), "", False, (reason, detail))


def folder_record(path, sidecars):
    """Record of an image file from its header and the sidecars (of SIDECARS) that exist beside it."""
    stem = os.path.splitext(path)[0]
    try:
        meta = {}
        if ".json" in sidecars:
            with open(stem + ".json", "rb") as f:
                meta = _parse_json(f.read())
        with open_image(path) as img:  # millions of headers: close each file now, not when collected
            w, h = upright_size(img)
        caption = None
        for ext in (".txt", ".caption"):
            if ext in sidecars:
                with open(stem + ext, "rb") as f:
                    caption = decode_caption(f.read())
                break
    except BadImage as e:
        return _bad(e.reason, e.detail)
    except OSError as e:  # a sidecar that vanished or cannot be read, a dangling link
        return _bad("unreadable", f"{type(e).__name__}: {e}")
    return _record(meta, w, h, caption)


def shard_record(files):
    """(Record, image bytes) of a shard sample {ext: bytes}; the bytes are None for a bad sample."""
    ext = next((e for e in SHARD_IMAGE_EXTS if e in files), None)
    if ext is None:
        return _bad("no image in sample"), None
    meta = _parse_json(files["json"]) if "json" in files else {}
    try:
        w, h = upright_size(open_image(files[ext]))
        caption = decode_caption(files["txt"]) if "txt" in files else None
    except BadImage as e:
        return _bad(e.reason, e.detail), None
    return _record(meta, w, h, caption), files[ext]


class _Map(torch.utils.data.Dataset):
    """fn(*args[i]) as a Dataset, so that a DataLoader's worker processes share a scan out."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __len__(self):
        return len(self.args)

    def __getitem__(self, i):
        return self.fn(*self.args[i])


def _as_is(x):  # a DataLoader's collate_fn for results without tensors (the default would rebuild every tuple)
    return x


def _stamp(path, sidecars):
    """What invalidates a cached record: the file's mtime, ctime and size and its sidecars' mtimes and ctimes. The
    ctime changes with permissions and owner too (chmod keeps the mtime), and they decide whether a file is readable."""
    try:
        st = os.stat(path)
        stem = os.path.splitext(path)[0]
        return [st.st_mtime_ns, st.st_ctime_ns, st.st_size] + [t for ext in sidecars for t in (
            os.stat(stem + ext).st_mtime_ns, os.stat(stem + ext).st_ctime_ns)]
    except OSError:  # a dangling link: never cached; folder_record says why it is unreadable
        return None


def _folder_records(tasks):
    return [folder_record(path, sidecars) for path, sidecars in tasks]


def scan_folder(root, filters, stats, warn, workers=0):
    """(kept Items under root, scan info). Paths are sorted, so indices are stable. Counts go into stats (new_stats),
    with files that are neither images nor sidecars in stats["ignored"] by extension. A file's record comes from
    root/SCAN_CACHE when its stamp matches, else from folder_record, in `workers` processes when there are several
    tasks of SCAN_CHUNK; the cache is then rewritten. info: images, cached, seconds, workers, cache_error (why the
    cache could not be written, else None)."""
    t0 = time.perf_counter()
    found, skip = {}, len(os.path.join(root, ""))  # relative path → (path, sidecars)
    for folder, _, files in os.walk(root):
        names = set(files)
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTS:
                path = os.path.join(folder, name)
                found[path[skip:]] = path, [e for e in SIDECARS if stem + e in names]
            elif ext.lower() not in SIDECARS and not name.startswith(SCAN_CACHE):  # nor caches being written
                stats["ignored"][ext.lower() or name] += 1
    paths = sorted(found)
    cache_path = os.path.join(root, SCAN_CACHE)
    cache = _read_cache(cache_path)
    stamps, records, todo = {}, {}, []
    for rel in paths:
        stamps[rel] = stamp = _stamp(*found[rel])
        hit = cache.get(rel)
        if stamp is not None and isinstance(hit, list) and len(hit) == 2 and hit[0] == stamp:
            records[rel] = Record(*hit[1])
        else:
            todo.append(rel)
    tasks = [([found[rel] for rel in todo[k:k + SCAN_CHUNK]],) for k in range(0, len(todo), SCAN_CHUNK)]
    workers = min(workers, len(tasks)) if len(tasks) > 1 else 0  # for one task, starting processes costs more
    for k, chunk in enumerate(torch.utils.data.DataLoader(_Map(_folder_records, tasks), batch_size=None,
                                                          num_workers=workers, collate_fn=_as_is,
                                                          worker_init_fn=leave_signals_to_parent)):
        records.update(zip(todo[k * SCAN_CHUNK:(k + 1) * SCAN_CHUNK], chunk))
    error = None
    if todo or len(cache) != len(paths):
        error = _write_cache(cache_path, {rel: [stamps[rel], records[rel]] for rel in paths if stamps[rel]})
    items = []
    for rel in paths:
        path, r = found[rel][0], records[rel]
        if admit(path, r, filters, stats, warn):
            items.append(Item(path, path, r.caption, r.w, r.h))
    info = dict(images=len(paths), cached=len(paths) - len(todo), seconds=time.perf_counter() - t0, workers=workers,
                cache_error=error)
    return items, info


def _read_cache(path):
    """{relative path: [stamp, record]} of a scan cache; {} when there is none or it is not one this code wrote."""
    try:
        with open(path, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    ok = isinstance(cache, dict) and cache.get("zd_scan") == 1 and isinstance(cache.get("files"), dict)
    return cache["files"] if ok else {}


def _write_cache(path, files):
    """Write the scan cache whole (_write_whole). Returns the error's text when it cannot be written."""
    text = json.dumps({"zd_scan": 1, "files": files}, separators=(",", ":"))  # dumps: C, dump: Python

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    try:
        _write_whole(path, write)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def read_shard(path, warn):
    """Yield (key, {ext: bytes}) for each complete sample of a tar shard, read as a stream. WebDataset convention:
    a sample's files are consecutive and share the key (the name up to the first dot of the basename). A shard cut
    off mid-member keeps the samples before the cut; the sample being read is counted as bad."""
    key, files = None, {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                k, _, ext = base.partition(".")
                k = os.path.join(d, k)
                if k != key and key is not None:
                    yield key, files
                    files = {}
                key = k
                files[ext.lower()] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        warn(f"{path}:{key}", BadImage("truncated shard", f"{type(e).__name__}: {e}"))
        return
    if key is not None:
        yield key, files


def expand_shards(patterns):
    """Sorted, de-duplicated shard paths from paths and globs."""
    out = set()
    for p in patterns:
        found = glob.glob(p)
        if not found:
            raise FileNotFoundError(f"no shard matches {p}")
        out.update(found)
    return sorted(out)


# ---- per-sample work -----------------------------------------------------------------------------------------------

def sample_rng(seed, epoch, index, stream=0):
    """The random stream of one sample in one epoch, the same on any rank or worker (numpy SeedSequence)."""
    return np.random.default_rng([seed, epoch, index, stream])


def inpaint_mask(w, h, rng, p_full=0.25):
    """Synthetic inpainting mask [1, h, w] in {0, 1}, 1 = repaint: LaMa-style thick strokes and boxes, or the whole
    image with probability p_full (the recipe of the SD 1.5 inpainting model card)."""
    if rng.random() < p_full:
        return torch.ones(1, h, w)
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    side = max(w, h)
    for _ in range(rng.integers(1, 5)):  # strokes: random walks drawn with a thick round pen
        width = int(rng.integers(side // 40 + 1, side // 8 + 2))
        pts = [(rng.uniform(0, w), rng.uniform(0, h))]
        for _ in range(rng.integers(1, 6)):
            a, r = rng.uniform(0, 2 * math.pi), rng.uniform(0.05, 0.3) * side
            pts.append((pts[-1][0] + r * math.cos(a), pts[-1][1] + r * math.sin(a)))
        draw.line(pts, fill=255, width=width, joint="curve")
        for x, y in pts:
            draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=255)
    for _ in range(rng.integers(0, 3)):
        bw, bh = rng.uniform(0.1, 0.5) * w, rng.uniform(0.1, 0.5) * h
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        draw.rectangle((x, y, x + bw, y + bh), fill=255)
    return torch.from_numpy((np.asarray(img) > 127).astype(np.float32))[None]


def pixels_of(img):
    """An RGB PIL image as a float32 tensor [3, H, W] in [−1, 1]."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1


def make_batch(entries, size, epoch, position, opts):
    """Decode a batch of (index, Item) for one bucket: "pixels", or the "mean" and "std" of the VAE posterior when the
    Items are a cache's (Latent), with the same draws either way. A file that fails to decode is replaced by a copy of
    the batch's first good sample (so B stays batch_size) and named in "_bad"; a batch with no good sample comes back
    without tensors."""
    tensors, captions, dropped, index, masks, bad = [], [], [], [], [], []
    for i, item in entries:
        r = sample_rng(opts["seed"], epoch, i)
        drop, flip, u, v = r.random() < opts["caption_dropout"], r.random() < 0.5, r.random(), r.random()
        if not opts["random_crop"]:  # always drawn above, so switching an option never changes the other draws
            u = v = 0.5
        try:
            if isinstance(item.src, Latent):  # the moments of this crop (or of its mirror image), encoded before
                tensors.append(read_latent(item.src, opts["flip"] and flip))
            else:
                img = load_image(item.src, size, u, v)
                tensors.append(pixels_of(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if opts["flip"] and flip
                                        else img))
        except BadImage as e:
            bad.append((item.name, e.reason, str(e)))
            continue
        captions.append("" if drop else item.caption)
        dropped.append(drop)
        index.append(i)
        if opts["inpaint"]:
            masks.append(inpaint_mask(size[0], size[1], sample_rng(opts["seed"], epoch, i, stream=1)))
    batch = {"epoch": epoch, "position": position, "_bad": bad}
    if not tensors:
        return batch
    for _ in bad:
        for column in (tensors, captions, dropped, index, masks):
            column += column[:1]
    batch.update(captions=captions, dropped=torch.tensor(dropped), index=torch.tensor(index, dtype=torch.int64))
    if isinstance(entries[0][1].src, Latent):
        batch["mean"], batch["std"] = torch.stack(tensors).unbind(1)
    else:
        batch["pixels"] = torch.stack(tensors)
    if masks:
        batch["mask"] = torch.stack(masks)
        batch["masked_pixels"] = batch["pixels"] * (batch["mask"] < 0.5)  # SD-inpainting: masked = image·(mask < 0.5)
    return batch


# ---- batching ------------------------------------------------------------------------------------------------------

class PlannedBatches(torch.utils.data.Dataset):
    """Folder/demo batches: position p → this rank's slice of global batch p (module docstring). An epoch's plan is a
    pure function of (seed, epoch), so any worker computes the same one."""

    def __init__(self, items, bucket_of, batch_size, rank, world_size, opts):
        self.items, self.bucket_of, self.opts = items, bucket_of, opts
        self.b, self.rank, self.world = batch_size, rank, world_size
        self.members = {}
        for i, bkt in enumerate(bucket_of):
            self.members.setdefault(bkt, []).append(i)
        g = batch_size * world_size
        self.per_epoch = sum(len(m) // g for m in self.members.values())
        self._plan = (None, None)

    def plan(self, epoch):
        """[(bucket, global indices)] of one epoch: per-bucket shuffles cut into global batches, then all shuffled."""
        if self._plan[0] != epoch:
            rng, g = np.random.default_rng([self.opts["seed"], epoch]), self.b * self.world
            out = []
            for bkt in sorted(self.members):
                perm = rng.permutation(self.members[bkt])
                out += [(bkt, perm[k * g:(k + 1) * g]) for k in range(len(perm) // g)]
            self._plan = (epoch, [out[k] for k in rng.permutation(len(out))])
        return self._plan[1]

    def __len__(self):
        return self.per_epoch

    def __getitem__(self, position):
        epoch, k = divmod(position, self.per_epoch)
        bkt, idx = self.plan(epoch)[k]
        mine = idx[self.rank * self.b:(self.rank + 1) * self.b]
        return make_batch([(int(i), self.items[i]) for i in mine], bkt, epoch, position, self.opts)


class ShardStream(torch.utils.data.IterableDataset):
    """Shard batches for one rank, as an endless stream (module docstring). Each (rank, worker) reader takes every
    n-th shard of the epoch's shuffled shard list, n = world_size × workers; with fewer shards than readers every
    reader reads all shards and keeps every n-th sample of each. A sample's index is shard number · 2³² + its ordinal
    in the shard. The reader counts files only in its first epoch, so Loader.stats describes the data once."""

    def __init__(self, shards, buckets, batch_size, rank, world_size, filters, opts, start=0):
        self.shards, self.buckets, self.b = shards, buckets, batch_size
        self.rank, self.world, self.filters, self.opts, self.start = rank, world_size, filters, opts, start

    def assignment(self, epoch, slot, slots):
        """[(shard number, path)] this reader reads in this epoch, and whether it keeps every slots-th sample only."""
        order = np.random.default_rng([self.opts["seed"], epoch]).permutation(len(self.shards))
        if len(self.shards) >= slots:
            return [(int(s), self.shards[s]) for s in order[slot::slots]], False
        return [(int(s), self.shards[s]) for s in order], True

    def samples(self, epoch, slot, slots, stats, warn):
        """(global index, Item) of the samples this reader keeps in this epoch; headers read, pixels not decoded."""
        shards, stride = self.assignment(epoch, slot, slots)
        for s, path in shards:
            for n, (key, files) in enumerate(read_shard(path, warn)):
                if stride and n % slots != slot:
                    continue
                name = f"{path}:{key}"
                record, raw = shard_record(files)
                if admit(name, record, self.filters, stats, warn):
                    yield (s << 32) + n, Item(name, raw, record.caption, record.w, record.h)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info else 1
        # The DataLoader takes batches from its workers in turn, starting with worker 0. Reader w emits rank-local
        # positions w, w + workers, w + 2·workers, ...; so that the stream resumed at `start` comes out in order,
        # DataLoader worker 0 plays reader start mod workers. The reader skips its positions before `start`.
        worker = ((info.id if info else 0) + self.start) % workers
        slot, slots = self.rank * workers + worker, self.world * workers
        skip = max(0, -(-(self.start - worker) // workers))
        stats, bad, emitted = new_stats(), [], 0
        buffers = {bkt: [] for bkt in self.buckets}

        def warn(name, e):
            if epoch == 0:  # later epochs re-read the same files
                bad.append((name, e.reason, str(e)))

        for epoch in itertools.count():
            kept = 0
            for i, item in self.samples(epoch, slot, slots, stats if epoch == 0 else new_stats(), warn):
                kept += 1
                bkt = bucket_for(item.w, item.h, self.buckets)
                buffers[bkt].append((i, item))
                if len(buffers[bkt]) < self.b:
                    continue
                entries, buffers[bkt] = buffers[bkt], []
                position = worker + emitted * workers
                emitted += 1
                if emitted <= skip:
                    continue
                batch = make_batch(entries, bkt, epoch, position, self.opts)
                batch["_bad"] = bad + batch["_bad"]
                # plain dicts: the DataLoader's default_convert copies a mapping and update()s the copy, which for
                # a Counter adds the counts a second time
                batch["_counts"] = {k: dict(n) if isinstance(n, dict) else n for k, n in stats.items()}
                bad.clear()  # both were copied into the batch; samples() keeps counting into `stats`, so it is
                dict.update(stats, new_stats())  # zeroed in place (Counter.update would add)
                yield batch
            if not kept:
                raise RuntimeError(f"shard reader {slot} of {slots} found no usable sample in a whole epoch")


# ---- the latent cache ----------------------------------------------------------------------------------------------

CACHE_MANIFEST = "zd_cache.json"  # written last, once every part is: a folder without it is never read as a cache
CACHE_PARTS = "parts"             # CACHE/parts/00000.safetensors ...: each written whole (a temporary file renamed)
CACHE_PART_IMAGES = 256           # images per part of a cache of folders; a cache of shards has a part per shard
# The Loader settings that decide which images a cache holds and how they are cropped; training from it must use the
# same. (--random-crop draws a new crop every epoch: no cache of fixed crops gives it, so it is refused.)
CACHE_SETTINGS = ("min_side", "min_aesthetic", "max_watermark", "max_unsafe", "drop_unscored", "bucket_area",
                  "bucket_min", "bucket_max", "bucket_step", "flip")
CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# A cached image: tensors KEY.mean and KEY.std in the part file (and KEY.mean_flip, KEY.std_flip, the moments of the
# mirrored crop, in a cache made with flip); error is the (reason, detail) of an image that did not decode, which
# training skips where it would have skipped the image.
Latent = namedtuple("Latent", "part key error")


def is_cache(src):
    """Whether --data SRC is a latent cache, finished or not (a folder with CACHE_MANIFEST or CACHE_PARTS)."""
    return isinstance(src, str) and any(os.path.exists(os.path.join(src, f)) for f in (CACHE_MANIFEST, CACHE_PARTS))


def read_cache(root):
    """The manifest of a finished cache: made_by (the VAE's hash, CACHE_SETTINGS, dtype, sources), layout ("folders"
    or "shards"), parts (file names, in order), images, stats. ValueError for an unfinished one."""
    try:
        with open(os.path.join(root, CACHE_MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{root} is an unfinished latent cache (no {CACHE_MANIFEST}): rerun the `zd.py cache` command "
                         "that made it to finish it") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{root}/{CACHE_MANIFEST} cannot be read ({e}): make the cache again") from None
    if manifest.get("zd_cache") != 1:
        raise ValueError(f"{root}/{CACHE_MANIFEST} is not a zd latent cache: make the cache again with `zd.py cache`")
    return manifest


def cache_mismatch(made_by, settings):
    """'NAME: cache X, run Y' for the first of CACHE_SETTINGS that differs between a cache and a run; None if none."""
    for k in CACHE_SETTINGS:
        if made_by["settings"][k] != settings[k]:
            return f"--{k.replace('_', '-')}: cache {made_by['settings'][k]}, run {settings[k]}"
    return None


def part_path(root, p):
    return os.path.join(root, CACHE_PARTS, f"{p:05d}.safetensors")


def read_part(path):
    """A part's header: made_by; samples, [key, name, caption, w, h, error] rows in the order of the data (a folder's
    index order, a shard's member order); counts, a shard's scan counts (new_stats form); error, what storing in
    fp16/bf16 cost (zd.py's measure_rounding)."""
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["zd_cache_part"])


def write_part(path, tensors, made_by, samples, counts=None, error=None):
    """Write a part whole or not at all: a temporary file of its own name, renamed. An OSError (a full disk) leaves
    nothing behind and is raised."""
    meta = json.dumps(dict(made_by=made_by, samples=samples, counts=counts, error=error), separators=(",", ":"))
    _write_whole(path, lambda tmp: save_file(tensors, tmp, metadata={"zd_cache_part": meta}))


def write_manifest(root, manifest):
    """Write CACHE_MANIFEST whole or not at all, once every part is written: it makes the folder a cache."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:   # closed here, so a full disk fails here, not unseen later
            json.dump(manifest, f, indent=1)
    _write_whole(os.path.join(root, CACHE_MANIFEST), write)


def _write_whole(path, write):
    """write(tmp) to a temporary file of a name no other process (or node) has, then a rename over path: the file is
    whole or absent. It gets the umask's mode: mkstemp's 0600 would hide it from others who read the data."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, an interrupt: no partial file stays
        if os.path.exists(tmp):
            os.remove(tmp)
        # safetensors raises its I/O errors (a full disk) as SafetensorError("... I/O error: TEXT (os error N) ..."),
        # not OSError: raised as the OSError it is, so that the caller's one-line refusal catches it
        io = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(e)) if isinstance(e, SafetensorError) else None
        if io:
            raise OSError(int(io[2]), io[1], path) from e
        raise


_OPEN_PARTS = {}  # path → safe_open handle, per process (the loader's workers each keep their own)


def _open_part(path):
    """The part's safetensors file, opened once per process; at most 64 at a time (file handles)."""
    if path not in _OPEN_PARTS:
        if len(_OPEN_PARTS) >= 64:
            _OPEN_PARTS.clear()
        _OPEN_PARTS[path] = safe_open(path, "pt")
    return _OPEN_PARTS[path]


def read_latent(latent, flip=False):
    """The moments [2, 4, h, w] (mean, std) float32 of a cached image, of its mirrored crop with flip."""
    if latent.error:
        raise BadImage(*latent.error)
    f, suffix = _open_part(latent.part), "_flip" if flip else ""
    return torch.stack([f.get_tensor(f"{latent.key}.{m}{suffix}").float() for m in ("mean", "std")])


def cache_items(root, manifest):
    """The Items of a cache of folders, in the index order the folder scan gave them."""
    items = []
    for name in manifest["parts"]:
        path = os.path.join(root, CACHE_PARTS, name)
        items += [Item(name, Latent(path, str(key), err and tuple(err)), caption, w, h)
                  for key, name, caption, w, h, err in read_part(path)["samples"]]
    return items


def describe_cache(root):
    """What `zd.py data --data CACHE` prints: images, undecodable ones, images per bucket, dtype, size on disk, what
    made it."""
    manifest = read_cache(root)
    per_bucket, bad = Counter(), 0
    bkts = buckets(*(manifest["made_by"]["settings"][k] for k in ("bucket_area", "bucket_min", "bucket_max",
                                                                  "bucket_step")))
    for name in manifest["parts"]:
        for _, _, _, w, h, err in read_part(os.path.join(root, CACHE_PARTS, name))["samples"]:
            bad += err is not None
            per_bucket[bucket_for(w, h, bkts)] += err is None
    size = sum(os.path.getsize(os.path.join(root, CACHE_PARTS, n)) for n in manifest["parts"])
    images = sum(per_bucket.values())
    return dict(cache=root, layout=manifest["layout"], images=images, undecodable=bad,
                buckets={f"{w}x{h}": per_bucket[(w, h)] for w, h in bkts}, dtype=manifest["made_by"]["dtype"],
                bytes=size, bytes_per_image=round(size / max(images, 1)), made_by=manifest["made_by"],
                dtype_error=manifest.get("dtype_error"))


class CacheBuild(torch.utils.data.IterableDataset):
    """The crops a latent cache is made of, decoded in the loader's workers: for each part in `todo` [(p, path)],
    batches of one bucket of up to batch_size images at their bucket crop (centre, unflipped, as make_batch crops them),
    each a dict of part, path, rows ([key, name, caption, w, h, error], error None for the images in pixels), pixels
    [B, 3, H, W] or None, and last (the part's final batch, which also carries a shard's scan counts). Worker w takes
    the parts todo[w::workers]."""

    def __init__(self, loader, todo, batch_size):
        self.loader, self.todo, self.b = loader, todo, batch_size

    def entries(self, p, counts):
        """[(key, Item)] of part p: a folder's images p·CACHE_PART_IMAGES onwards, or shard p's kept samples, keyed by
        their ordinal in the shard (as ShardStream indexes them)."""
        if self.loader.shards is None:
            items = self.loader.dataset.items[p * CACHE_PART_IMAGES:(p + 1) * CACHE_PART_IMAGES]
            return list(enumerate(items, p * CACHE_PART_IMAGES))
        warn = lambda name, e: counts["bad_files"].update([e.reason])
        out = []
        for n, (key, files) in enumerate(read_shard(self.loader.shards[p], warn)):
            name = f"{self.loader.shards[p]}:{key}"
            record, raw = shard_record(files)
            if admit(name, record, self.loader.filters, counts, warn):
                out.append((n, Item(name, raw, record.caption, record.w, record.h)))
        return out

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for p, path in self.todo[info.id::info.num_workers] if info else self.todo:
            counts = new_stats()
            groups = {}
            for key, item in self.entries(p, counts):
                groups.setdefault(bucket_for(item.w, item.h, self.loader.buckets), []).append((key, item))
            chunks = [(bkt, g[k:k + self.b]) for bkt, g in groups.items() for k in range(0, len(g), self.b)]
            for c, (bkt, chunk) in enumerate(chunks or [(None, [])]):
                rows, pixels = [], []
                for key, item in chunk:
                    try:
                        pixels.append(pixels_of(load_image(item.src, bkt)))
                        rows.append([key, item.name, item.caption, item.w, item.h, None])
                    except BadImage as e:
                        rows.append([key, item.name, item.caption, item.w, item.h, [e.reason, e.detail]])
                last = c == len(chunks) - 1 or not chunks
                tally = {k: dict(n) if isinstance(n, dict) else n for k, n in counts.items()} if last else None
                yield dict(part=p, path=path, rows=rows, pixels=torch.stack(pixels) if pixels else None, last=last,
                           counts=tally)


class CacheStream(ShardStream):
    """ShardStream over a cache of shards: part s holds shard s's kept samples under their ordinals, so each reader
    reads the same samples in the same order, and the batches, indices and positions are those of the shards."""

    def samples(self, epoch, slot, slots, stats, warn):
        parts, stride = self.assignment(epoch, slot, slots)
        for s, path in parts:
            for n, name, caption, w, h, err in read_part(path)["samples"]:
                if stride and n % slots != slot:
                    continue
                stats["kept"] += 1
                yield (s << 32) + n, Item(name, Latent(path, str(n), err and tuple(err)), caption, w, h)


def leave_signals_to_parent(worker_id):
    """Loader workers ignore Ctrl-C and SIGTERM, which reach the terminal's whole process group: the training process
    decides (it stops after the current step and saves), and a worker killed by them would fail that step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class NoFullBatch(ValueError):
    """Raised by Loader when no bucket holds a full global batch: it cannot train, but `loader` can still survey."""

    def __init__(self, loader, message):
        super().__init__(message)
        self.loader = loader


class Loader:
    """Batches for the training loop: `for batch in Loader(...).batches(start)` is endless, one bucket per batch:
      pixels [B, 3, H, W] float32 in [−1, 1]; captions list[str] after dropout; dropped bool [B]; index int64 [B]
      (global sample index); epoch, position (ints; resume with start = position + 1); with inpaint=True also
      mask [B, 1, H, W] in {0, 1} (1 = repaint) and masked_pixels [B, 3, H, W].
    From a latent cache (`zd.py cache`) the batches hold mean and std [B, 4, H/8, W/8] float32 instead of pixels,
    with the same order, indices, dropout and flips as from the images the cache was made of.
    sources: folder paths, shard paths/globs (*.tar), "demo" or DemoSource objects, or one latent cache; folders and
    demo mix, shards and a cache stand alone. min_side and the score filters (min_aesthetic, max_watermark,
    max_unsafe, drop_unscored) are those of the module docstring. stats counts as new_stats() does and, for folders,
    dropped_incomplete_per_epoch; scan is the folder scan's info (scan_folder), batches_per_epoch the epoch length in
    global batches (None for shards); cache the cache's manifest (read_cache), else None."""

    def __init__(self, sources, batch_size, *, seed=0, rank=0, world_size=1, workers=2, min_side=1024,
                 min_aesthetic=None, max_watermark=None, max_unsafe=None, drop_unscored=False,
                 bucket_area=512 * 512, bucket_min=384, bucket_max=640, bucket_step=64, caption_dropout=0.1,
                 flip=False, random_crop=False, inpaint=False, pin_memory=False, val_fraction=0.0, validation=False):
        assert seed >= 0 and 0 <= rank < world_size and batch_size >= 1
        assert all(p is None or 0 <= p <= 1 for p in (max_watermark, max_unsafe)), "pwatermark, punsafe are in [0, 1]"
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.workers, self.pin_memory = workers, pin_memory
        self.filters = Filters(min_side, min_aesthetic, max_watermark, max_unsafe, drop_unscored)
        self.opts = dict(seed=seed, caption_dropout=caption_dropout, flip=flip, random_crop=random_crop,
                         inpaint=inpaint)
        self.buckets = buckets(bucket_area, bucket_min, bucket_max, bucket_step)
        self.stats = new_stats()
        self._warned = set()
        self._log(f"buckets (w×h): {', '.join(f'{w}×{h}' for w, h in self.buckets)}")

        self.cache, items = None, []
        if any(is_cache(s) for s in sources):
            if len(sources) > 1:
                raise ValueError("a latent cache stands alone: give it as the only --data")
            if val_fraction:
                raise ValueError("a validation share of a latent cache would differ from the images' share: give "
                                 "held-out images (or a cache of them) as --val-data instead of --val-fraction")
            items = self._open_cache(sources[0], dict(Filters(min_side, min_aesthetic, max_watermark, max_unsafe,
                                                              drop_unscored)._asdict(), bucket_area=bucket_area,
                                                         bucket_min=bucket_min, bucket_max=bucket_max,
                                                         bucket_step=bucket_step, flip=flip))
            if self.cache["layout"] == "shards":
                return
            sources = []
        sources = [DemoSource() if s == "demo" else s for s in sources]
        if any(isinstance(s, str) for s in sources):  # the demo's images are exempt
            self._log(f"filters: {filters_line(self.filters)}")
        shards = [s for s in sources if isinstance(s, str) and s.endswith(".tar")]
        if shards and len(shards) != len(sources):
            raise ValueError("tar shards cannot be mixed with folder or demo sources in one Loader")
        if shards and val_fraction:
            raise ValueError("a validation share of tar shards would need a pass over all of them: give held-out "
                             "images as --val-data instead of --val-fraction")
        if shards:
            self.shards = expand_shards(shards)
            self.batches_per_epoch = self.scan = None
            self._log(f"{plural(len(self.shards), 'shard')}, streamed by {plural(world_size, 'rank')} × "
                      f"{plural(max(workers, 1), 'reader')}; counted as they are read (Loader.stats), and logged "
                      "after the first epoch")
            return
        self.shards = None
        self.scan = Counter(images=len(items), cached=0, seconds=0.0, workers=0)
        keys = [it.name for it in items]  # each item's name in its source, which picks the validation share
        for s in sources:
            if isinstance(s, DemoSource):
                items += s.items()
                keys += [it.name for it in items[len(keys):]]
                self.stats["kept"] += s.n
                continue
            if not os.path.isdir(s):
                raise FileNotFoundError(f"no such folder: {s} (--data takes image folders, tar shards or 'demo')")
            # every rank scans the same folder: only rank 0 names its bad files
            kept, info = scan_folder(s, self.filters, self.stats, lambda name, e: self._warn(name, e, self.rank == 0),
                                     workers)
            if not info["images"]:
                raise FileNotFoundError(f"no image file ({' '.join(IMAGE_EXTS)}) in {s}")
            items += kept
            keys += [os.path.relpath(it.name, s) for it in kept]
            self.scan.update(images=info["images"], cached=info["cached"], seconds=info["seconds"])
            self.scan["workers"] = info["workers"]
            self._log(f"scanned {s}: {scan_line(info)}")
            if info["cache_error"]:
                self._log(f"could not write its scan cache ({info['cache_error']}): the next scan reads every header")
        if val_fraction:
            held = [held_out(seed, key, val_fraction) for key in keys]
            if not validation:
                self._log(f"validation share {val_fraction:g}: {plural(sum(held), 'image')} held out, not trained on")
            items = [it for it, h in zip(items, held) if h == validation]
        bucket_of = [bucket_for(it.w, it.h, self.buckets) for it in items]
        self.dataset = PlannedBatches(items, bucket_of, batch_size, rank, world_size, self.opts)
        self.batches_per_epoch = len(self.dataset)
        if validation:
            self._log(f"validation set: {plural(len(items), 'image')}")
            if not items:
                raise ValueError("the validation set is empty: raise --val-fraction, or give --val-data images that "
                                 "pass the filters")
            return
        g = batch_size * world_size
        per_bucket = Counter(bucket_of)
        tail = sum(n % g for n in per_bucket.values())
        self.stats["dropped_incomplete_per_epoch"] = tail
        self._log(count_line(self.stats))
        self._log("per bucket: " + ", ".join(f"{w}×{h}: {per_bucket[(w, h)]:,}" for w, h in self.buckets))
        self._log(f"epoch = {plural(self.batches_per_epoch, 'global batch', 'global batches')} of {g}; each epoch "
                  f"leaves out {plural(tail, 'image')}, a bucket's last incomplete global batch (different images "
                  "every epoch)")
        if not self.batches_per_epoch:
            raise NoFullBatch(self, f"no bucket holds a full global batch of {g} images: lower the batch size, or keep "
                              "more images (min-side, the score filters)")

    def _open_cache(self, root, settings):
        """Read the cache at root, refusing one made with other settings; its Items for a cache of folders; for one of
        shards, [] and self.shards its parts."""
        self.cache = read_cache(root)
        made_by = self.cache["made_by"]
        if self.opts["random_crop"]:
            raise ValueError("--random-crop draws a new crop every epoch, which a cache of fixed crops cannot give: "
                             "train from the images, or without --random-crop")
        if self.opts["inpaint"]:
            raise ValueError("inpainting draws a new mask every epoch, and the masked image's latent with it: train "
                             "--inpaint from the images")
        if mismatch := cache_mismatch(made_by, settings):
            raise ValueError(f"{root} was made with other settings ({mismatch}): train with the cache's settings, or "
                             "make a cache with these")
        parts = [os.path.join(root, CACHE_PARTS, name) for name in self.cache["parts"]]
        self._log(f"latent cache {root}: {plural(self.cache['images'], 'image')} of {', '.join(made_by['sources'])}, "
                  f"{made_by['dtype']}, VAE {made_by['vae'][:12]}")
        if self.cache["layout"] == "shards":
            self.shards, self.batches_per_epoch, self.scan = parts, None, None
            return []
        self.stats["kept"] = self.cache["images"]
        return cache_items(root, self.cache)

    def _log(self, msg):
        if self.rank == 0:
            _say(f"data: {msg}")

    def _warn(self, name, e, say=True, stats=None):
        """Count a bad file into stats (default: Loader.stats) and name it, up to WARN_LIMIT names."""
        (self.stats if stats is None else stats)["bad_files"][e.reason] += 1
        if say and len(self._warned) < WARN_LIMIT:
            _say(f"data: warning: skipped {name}: {e}")
        elif say and len(self._warned) == WARN_LIMIT:
            print("data: warning: further bad files are counted in Loader.stats without a line each", flush=True)
        self._warned.add(name)

    def batches(self, start=0):
        """Endless batches from global batch position `start` (see the class docstring)."""
        if self.shards is not None:
            stream = CacheStream if self.cache else ShardStream
            dataset = stream(self.shards, self.buckets, self.batch_size, self.rank, self.world_size, self.filters,
                             self.opts, start)
            sampler = None
        else:
            dataset, sampler = self.dataset, itertools.count(start)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=self.workers,
                                             pin_memory=self.pin_memory, worker_init_fn=leave_signals_to_parent)
        readers, done = max(self.workers, 1), set()  # shard readers that have finished their first epoch
        for batch in loader:
            merge_counts(self.stats, batch.pop("_counts", {}))
            for name, reason, detail in batch.pop("_bad"):
                if name not in self._warned:  # a folder's bad file fails again every epoch: count it once
                    self._warn(name, BadImage(reason, detail.partition(": ")[2]))
            if self.shards is not None and batch["epoch"] > 0 and len(done) < readers:
                done.add(batch["position"] % readers)  # a reader's positions are its number mod readers
                if len(done) == readers:  # its counts travel with its batches: all of epoch 0 has arrived
                    rank = " of rank 0" if self.world_size > 1 else ""
                    self._log(f"first epoch over the shards{rank}: {count_line(self.stats)}")
            if "index" not in batch:
                print(f"data: warning: batch {batch['position']} had no decodable image and was skipped", flush=True)
                continue
            yield batch

    def fixed_batches(self):
        """The validation set (validation=True), every image once in the same order and batches every time: up to
        batch_size images of one bucket each, cropped as in epoch 0 but centred and unflipped, captions kept. Shards
        are read once per call."""
        if self.shards is None:
            entries, bucket_of = list(enumerate(self.dataset.items)), self.dataset.bucket_of
        else:
            stream = (CacheStream if self.cache else ShardStream)(self.shards, self.buckets, self.batch_size, 0, 1,
                                                                   self.filters, self.opts)
            warn = lambda name, e: name in self._warned or self._warn(name, e)   # named once, not every pass
            entries = list(stream.samples(0, 0, 1, new_stats(), warn))
            bucket_of = [bucket_for(item.w, item.h, self.buckets) for _, item in entries]
        by_bucket, opts = {}, dict(self.opts, caption_dropout=0.0, flip=False, random_crop=False)
        for entry, bkt in zip(entries, bucket_of):
            by_bucket.setdefault(bkt, []).append(entry)
        for bkt, members in sorted(by_bucket.items()):
            for k in range(0, len(members), self.batch_size):
                batch = make_batch(members[k:k + self.batch_size], bkt, 0, k, opts)
                if "index" in batch:   # decoded: pixels, or a latent cache's moments
                    yield batch


def survey(loader, sheet=None, per_bucket=16, count_tokens=None):
    """What `loader` would train on, without a model (`zd.py data`): the counts (for shards, one pass over them reading
    headers), images per bucket, batches per epoch, caption statistics and scan speed, logged and returned as the
    dict `zd.py data --json` prints. With `sheet` a folder, one contact sheet per bucket of up to per_bucket of its
    images, a seeded uniform draw, as training crops them in epoch 0. count_tokens(captions) → their token counts
    (zd.py passes CLIP's tokenizer) counts the captions that the text encoder truncates."""
    seed, g = loader.opts["seed"], loader.batch_size * loader.world_size
    per_bkt, words, captions = Counter(), Counter(), Counter(empty=0, over_75_tokens=0)
    picks = {}  # bucket → the per_bucket (priority, index, Item) of lowest priority

    def tally(kept):  # [(bucket, caption)] of kept samples
        per_bkt.update(b for b, _ in kept)
        texts = [c for _, c in kept]
        captions["empty"] += texts.count("")
        for c in texts:  # words of letters; a "word" of 40 letters or more is not one
            words.update(w for w in re.findall(r"[^\W\d_]{2,}", c.lower()) if w not in STOPWORDS and len(w) < 40)
        if count_tokens and texts:
            captions["over_75_tokens"] += sum(n > 75 for n in count_tokens(texts))

    if loader.shards is None:
        stats, scan = loader.stats, dict(loader.scan)
        items, bucket_of = loader.dataset.items, loader.dataset.bucket_of
        for k in range(0, len(items), 4096):
            tally([(bucket_of[i], items[i].caption) for i in range(k, min(k + 4096, len(items)))])
        for bkt, members in loader.dataset.members.items():
            picks[bkt] = heapq.nsmallest(per_bucket, ((_priority(seed, i), i, items[i]) for i in members))
        per_epoch, left_out, trained = loader.batches_per_epoch, stats["dropped_incomplete_per_epoch"], None
    else:
        stats, t0 = new_stats(), time.perf_counter()
        workers = min(loader.workers, len(loader.shards))
        tasks = [(s, path, loader.filters, loader.buckets, seed, per_bucket) for s, path in enumerate(loader.shards)]
        for r in torch.utils.data.DataLoader(_Map(_survey_shard, tasks), batch_size=None, num_workers=workers,
                                             collate_fn=_as_is, worker_init_fn=leave_signals_to_parent):
            t1 = time.perf_counter()  # the time spent here on the statistics is not the scan's
            merge_counts(stats, r["stats"])
            for name, reason, detail in r["bad"]:
                loader._warn(name, BadImage(reason, detail), stats=stats)
            tally(r["kept"])
            for bkt, entries in r["picks"].items():
                picks[bkt] = heapq.nsmallest(per_bucket, picks.get(bkt, []) + entries)
            t0 += time.perf_counter() - t1
        n = stats["kept"] + sum(stats["dropped"].values()) + sum(stats["bad_files"].values())
        scan = dict(images=n, cached=0, seconds=time.perf_counter() - t0, workers=workers)
        loader._log(f"scanned {plural(len(loader.shards), 'shard')}: {scan_line(scan)}")
        loader._log(count_line(stats))
        loader._log("per bucket: " + ", ".join(f"{w}×{h}: {per_bkt[(w, h)]:,}" for w, h in loader.buckets))
        per_epoch, left_out, trained = stats["kept"] // g, 0, stats["kept"]
        loader._log(f"epoch ≈ {plural(per_epoch, 'global batch', 'global batches')} of {g}; nothing is left out: "
                  "a bucket's incomplete batch waits in its reader for the next epoch")
    trained = per_epoch * g if trained is None else trained
    dropout = round(loader.opts["caption_dropout"] * trained)
    loader._log(f"captions: empty {captions['empty']:,}; caption dropout {loader.opts['caption_dropout']:g} trains "
              f"≈ {dropout:,} of an epoch's {plural(trained, 'image')} on \"\"" +
              (f"; over 75 tokens {captions['over_75_tokens']:,} (truncated by CLIP)" if count_tokens else ""))
    loader._log("most frequent words: " + (", ".join(f"{w} {n:,}" for w, n in words.most_common(12)) or "none"))
    sheets = contact_sheets(loader, sheet, picks, per_bkt) if sheet else {}
    dropped = {r: stats["dropped"][r] for r in DROP_REASONS}
    dropped.update(sorted(stats["bad_files"].items()))
    scan.update(seconds=round(scan["seconds"], 3), images_per_s=round(scan["images"] / max(scan["seconds"], 1e-9)))
    return dict(found=stats["kept"] + sum(dropped.values()), kept=stats["kept"], dropped=dropped,
                unscored=stats["unscored"], missing_captions=stats["missing_captions"],
                ignored=dict(stats["ignored"]), buckets={f"{w}x{h}": per_bkt[(w, h)] for w, h in loader.buckets},
                batches=dict(global_batch=g, per_epoch=per_epoch, left_out_per_epoch=left_out,
                             exact=loader.shards is None),
                captions=dict(empty=captions["empty"], dropout_per_epoch=dropout,
                              over_75_tokens=captions["over_75_tokens"] if count_tokens else None,
                              words=words.most_common(12)),
                scan=scan, sheets=sheets)


def contact_sheets(loader, folder, picks, per_bkt):
    """survey's contact sheets: folder/WxH.png for each bucket with images (contact_sheet); {"WxH": {path, tiles}}
    with each tile's sample name, caption and box on the sheet."""
    os.makedirs(folder, exist_ok=True)
    opts = dict(loader.opts, caption_dropout=0.0, inpaint=False)  # epoch 0's crop and flip; captions not dropped
    sheets = {}
    for (w, h), entries in sorted(picks.items()):
        tiles = []
        for _, i, item in sorted(entries, key=lambda e: e[1]):
            batch = make_batch([(i, item)], (w, h), 0, 0, opts)
            if "pixels" not in batch:  # passed the header check, fails to decode: training skips it too
                loader._log(f"warning: not on the sheet: {batch['_bad'][0][2]} ({item.name})")
                continue
            pixels = ((batch["pixels"][0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
            tiles.append((item.name, item.caption, pixels))
        if not tiles:
            continue
        path = os.path.join(folder, f"{w}x{h}.png")
        title = f"{w}x{h}: {len(tiles)} of {plural(per_bkt[(w, h)], 'image')}, cropped as in epoch 0"
        boxes = contact_sheet([(c, px) for _, c, px in tiles], path, title)
        sheets[f"{w}x{h}"] = dict(path=path, tiles=[dict(name=name, caption=c, box=list(box))
                                                    for (name, c, _), box in zip(tiles, boxes)])
    loader._log("contact sheets: " + (", ".join(f"{s['path']} ({plural(len(s['tiles']), 'image')})"
                                              for s in sheets.values()) or "none (no image decodes)"))
    return sheets


# ---- survey helpers: counts in words, the shard pass, contact sheets -----------------------------------------------

STOPWORDS = set("a an and are as at be by for from in into is it its of on or that the this to with".split())
SHEET_MIN_TILE = 160  # crops narrower than this are enlarged by a whole factor, so that their captions stay legible
SHEET_LINES = 3  # caption lines under each crop


def _say(line):
    """print, escaping what UTF-8 cannot encode: os.walk hands over a file name that is not UTF-8 as surrogates."""
    print(line.encode("utf-8", "backslashreplace").decode("utf-8"), flush=True)


def plural(n, word, words=None):
    return f"{n:,} {word if n == 1 else words or word + 's'}"


def filters_line(f):
    """Filters in words, for the log."""
    parts = [f"original shortest side ≥ {f.min_side}"]
    for name, limit, op in (("aesthetic", f.min_aesthetic, "≥"), ("pwatermark", f.max_watermark, "≤"),
                            ("punsafe", f.max_unsafe, "≤")):
        parts += [f"{name} {op} {limit:g}"] if limit is not None else []
    scored = len(parts) > 1
    return ", ".join(parts) + ("; unscored images dropped" if f.drop_unscored and scored else
                               "; unscored images kept" if scored else "; no score filter")


def count_line(stats):
    """A scan's counts in one line, the same in the training log and in `zd.py data`."""
    dropped = [(r, stats["dropped"][r]) for r in DROP_REASONS] + sorted(stats["bad_files"].items())
    dropped = [(r, n) for r, n in dropped if n]
    found = stats["kept"] + sum(n for _, n in dropped)
    line = f"kept {stats['kept']:,} of {plural(found, 'image')}; dropped "
    line += ", ".join(f"{r} {n:,}" for r, n in dropped) if dropped else "none"
    if stats["unscored"]:
        line += f"; unscored but kept {stats['unscored']:,}"
    if stats["missing_captions"]:
        line += f"; without caption {stats['missing_captions']:,} (→ \"\")"
    if stats["ignored"]:
        line += "; ignored (not images) " + ", ".join(f"{e} {n:,}" for e, n in sorted(stats["ignored"].items()))
    return line


def scan_line(info):
    rate = info["images"] / max(info["seconds"], 1e-9)
    how = f"{plural(info['workers'], 'worker process', 'worker processes')}" if info["workers"] else "one process"
    cached = f", {info['cached']:,} from its scan cache" if info["cached"] else ""
    return f"{plural(info['images'], 'image')} in {info['seconds']:.1f} s ({rate:,.0f} images/s, {how}{cached})"


def merge_counts(stats, counts):
    """Add counts of new_stats() form into stats."""
    for key, n in counts.items():
        if isinstance(n, dict):
            stats[key].update(n)
        else:
            stats[key] += n


def held_out(seed, name, fraction):
    """Whether the sample `name` (its path in its folder) is in the validation share `fraction`: a seeded hash of the
    name, so the share stays the same across runs, resumes, ranks and moves of the folder, and adding images never
    moves one in or out."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2 ** 64


def _priority(seed, index):
    """A sample's rank in the contact sheets' seeded draw: the lowest of each bucket are shown. A hash of (seed, index),
    so the draw is uniform and does not depend on which worker scans the sample."""
    return hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()


def _survey_shard(s, path, filters, buckets, seed, k):
    """One shard of survey, in a worker process: its counts and bad files, the (bucket, caption) of each kept
    sample, and per bucket the k kept samples of lowest _priority with their bytes."""
    stats, bad, kept, picks = new_stats(), [], [], {}

    def warn(name, e):
        bad.append((name, e.reason, e.detail))

    for n, (key, files) in enumerate(read_shard(path, warn)):
        name = f"{path}:{key}"
        record, raw = shard_record(files)
        if not admit(name, record, filters, stats, warn):
            continue
        bkt, i = bucket_for(record.w, record.h, buckets), (s << 32) + n  # the index ShardStream gives it
        kept.append((bkt, record.caption))
        picks.setdefault(bkt, []).append((_priority(seed, i), i, Item(name, raw, record.caption, record.w, record.h)))
        if len(picks[bkt]) > 2 * k:  # hold at most 2k images' bytes per bucket
            picks[bkt] = heapq.nsmallest(k, picks[bkt])
    return dict(stats=stats, bad=bad, kept=kept, picks={b: heapq.nsmallest(k, e) for b, e in picks.items()})


def contact_sheet(tiles, path, title):
    """Write a PNG grid of crops [H, W, 3] uint8 of one bucket, each with its caption underneath in up to SHEET_LINES
    lines (cut with "…"; an empty caption shows as ""), under a title line. Crops narrower than SHEET_MIN_TILE are
    enlarged by a whole factor, by pixel copies. Returns each crop's box (x0, y0, x1, y1) on the sheet."""
    h, w = tiles[0][1].shape[:2]
    scale = max(1, -(-SHEET_MIN_TILE // w))
    tw, th = w * scale, h * scale
    font = _sheet_font(max(12, tw // 28))  # legible when a wide sheet is shown scaled down
    line_h, pad = font.getbbox("Ág")[3] + 3, 6
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = -(-len(tiles) // cols)
    top, cell_h = line_h + 2 * pad, th + SHEET_LINES * line_h + pad + 4
    sheet = Image.new("RGB", (pad + cols * (tw + pad), top + rows * cell_h), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, pad), _drawable(title, font), font=font, fill=(255, 255, 255))
    boxes = []
    for k, (caption, pixels) in enumerate(tiles):
        x, y = pad + (k % cols) * (tw + pad), top + (k // cols) * cell_h
        sheet.paste(Image.fromarray(pixels).resize((tw, th), Image.Resampling.NEAREST), (x, y))
        lines = _wrap(_drawable(caption, font), font, tw, SHEET_LINES) if caption else ['""']
        for j, line in enumerate(lines):
            draw.text((x, y + th + 2 + j * line_h), line, font=font, fill=(225, 225, 225) if caption else (130,) * 3)
        boxes.append((x, y, x + tw, y + th))
    sheet.save(path)
    return boxes


def _sheet_font(size):
    """DejaVu Sans where it is installed (most Linux systems; PIL finds it in the system's font folders): it has the
    glyphs of accented and most non-Latin captions. Else PIL's built-in font, which has ASCII's only."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def _drawable(text, font):
    """The caption as the font can draw it: DejaVu all of it; PIL's built-in fonts without accents (é → e, as they
    would draw a box), and its bitmap font (Pillow without FreeType) in Latin-1."""
    if getattr(font, "path", None) and str(font.path).endswith("DejaVuSans.ttf"):
        return text
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return text if isinstance(font, ImageFont.FreeTypeFont) else text.encode("latin-1", "replace").decode("latin-1")


def _wrap(text, font, width, lines):
    """text in at most `lines` lines of at most `width` px, broken at a space where there is one; "…" ends a cut."""
    rest, out = text[:100 * lines], []  # no more than this fits on the lines
    while rest and len(out) < lines:
        lo, hi = 1, len(rest)
        while lo < hi:  # the longest prefix that fits (one character at least)
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if font.getlength(rest[:mid]) <= width else (lo, mid - 1)
        cut = rest.rfind(" ", 0, lo + 1) if lo < len(rest) else lo
        cut = cut if cut > 0 else lo
        out.append(rest[:cut])
        rest = rest[cut:].lstrip()
    if rest or len(text) > 100 * lines:
        last = out[-1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        out[-1] = last.rstrip() + "…"
    return out
