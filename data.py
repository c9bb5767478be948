"""data.py — files → buckets → batches of pixels, captions and inpainting masks for `zd.py train`.

Sources (SPEC §6)
  folder   a directory, searched recursively for .jpg .jpeg .png .webp .bmp. The caption of a/b.jpg is a/b.txt,
           else a/b.caption, else the "caption" (or "text") field of a/b.json; no caption → "" (counted).
           The json may also carry original_width/original_height.
  shards   img2dataset / WebDataset tars (00000.tar holding key.jpg|png|webp, key.txt, key.json), given as paths or
           globs and read as a stream (tarfile "r|"), never unpacked.
  "demo"   DemoSource: plain colours and simple shapes drawn from a seed, for `zd.py train` with no data.
Folder and shard images are kept when their *original* shortest side ≥ min_side (json original_width/height when
present, else the image header; pixels are not decoded to decide). Unreadable files are skipped, counted in
Loader.stats and named in a warning; nothing in a file can stop a run.

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
"""
import glob
import io
import itertools
import json
import math
import os
import tarfile
import time
import warnings
from collections import Counter, namedtuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's own bomb threshold (≈89 Mpx): larger headers are refused, never decoded
DEMO_BUCKETS = dict(bucket_area=32 * 32, bucket_min=24, bucket_max=40, bucket_step=8)  # → 24×40, 32×32, 40×24
WARN_LIMIT = 20  # bad files named one by one; past this they are only counted (Loader.stats)

# One image to load: `src` is a path (folder), the encoded bytes (shard) or ("demo", seed, i);
# (w, h) is its upright size.
Item = namedtuple("Item", "name src caption w h")


class BadImage(Exception):
    """A file that cannot be used; `reason` is the short key counted in Loader.stats["bad_files"]."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


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


def load_image(src, size, u=0.5, v=0.5):
    """Decode `src` upright in RGB, resized to cover size = (W, H) with its aspect kept and the excess cropped at
    fraction (u, v) of the slack ((0.5, 0.5) = centre). Cropping in source coordinates before resampling (resize's
    `box`) gives the same pixels as resize-then-crop without the 768000×384 intermediate a 20000×10 image would need."""
    if isinstance(src, tuple):
        img = demo_sample(src[1], src[2])[0]
    else:
        img = open_image(src)
    bw, bh = size
    try:
        w, h = upright_size(img)
        scale = max(bw / w, bh / h)
        if img.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 in the DCT domain, never below the size needed
            img.draft("RGB", (math.ceil(img.width * scale), math.ceil(img.height * scale)))
        ImageOps.exif_transpose(img, in_place=True)
        img = to_rgb(img)
        w, h = img.size
        scale = max(bw / w, bh / h)
        cw, ch = bw / scale, bh / scale
        x0, y0 = (w - cw) * u, (h - ch) * v
        return img.resize(size, Image.Resampling.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch), reducing_gap=3.0)
    except Exception as e:  # truncated or corrupt data surfaces only now, when the pixels are decoded
        raise BadImage("corrupt", f"{type(e).__name__}: {e}")


def decode_caption(raw):
    """Caption text from bytes: a BOM picks UTF-8 or UTF-16; else UTF-8, falling back to Latin-1 (which never fails).
    Whitespace runs become one space. Long captions are kept whole: the tokenizer truncates to 77 tokens."""
    if raw.startswith(b"\xef\xbb\xbf"):
        text = raw[3:].decode("utf-8", errors="replace")
    elif raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = raw.decode("utf-16", errors="replace")
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    return " ".join(text.replace("\x00", "").split())


def _parse_json(raw):
    """A sidecar json as a dict; {} when it is unreadable (it only adds a caption or the original size)."""
    try:
        meta = json.loads(decode_caption(raw))
    except ValueError:
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


# ---- sources -------------------------------------------------------------------------------------------------------

class DemoSource:
    """Procedural demo set: n images, deterministic from seed, of plain colours (half the set; black and white are
    37% of all) and simple shapes on a background (the other half), 64–96 px at five aspect ratios, with captions like
    "a red circle on a black background". The demo's point is that a v/zero-terminal-SNR model reaches true black and
    white and an SD1.5-schedule ε model cannot; half the set is shapes so that a small model also learns every colour
    as a shape and as a background in a few minutes. Synthetic, so exempt from the min_side filter; use with
    Loader(..., **DEMO_BUCKETS)."""

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


def _read_caption(stem, stats):
    for ext in (".txt", ".caption"):
        if os.path.exists(stem + ext):
            with open(stem + ext, "rb") as f:
                return decode_caption(f.read())
    caption = _json_caption(_read_json(stem + ".json"))
    stats["missing_captions"] += not caption
    return caption


def _read_json(path):
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        return _parse_json(f.read())


def scan_folder(root, min_side, stats, warn):
    """Items of every image under root (sorted paths, so indices are stable), filtered on the original shortest side.
    Reads only headers and sidecars."""
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                   if f.lower().endswith(IMAGE_EXTS))
    out = []
    for path in paths:
        stem = os.path.splitext(path)[0]
        try:
            with open_image(path) as img:  # millions of headers: close each file now, not when collected
                w, h = upright_size(img)
        except BadImage as e:
            warn(path, e)
            continue
        if min(_original_size(_read_json(stem + ".json"), w, h)) < min_side:
            stats["dropped_small"] += 1
            continue
        out.append(Item(path, path, _read_caption(stem, stats), w, h))
        stats["kept"] += 1
    return out


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
    image with probability p_full (SD-inpainting recipe, SPEC §6)."""
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


def make_batch(entries, size, epoch, position, opts):
    """Decode a batch of (index, Item) for one bucket. A file that fails to decode is replaced by a copy of the batch's
    first good sample (so B stays batch_size) and named in "_bad"; a batch with no good sample comes back as None."""
    pixels, captions, dropped, index, masks, bad = [], [], [], [], [], []
    for i, item in entries:
        r = sample_rng(opts["seed"], epoch, i)
        drop, flip, u, v = r.random() < opts["caption_dropout"], r.random() < 0.5, r.random(), r.random()
        if not opts["random_crop"]:  # always drawn above, so switching an option never changes the other draws
            u = v = 0.5
        try:
            img = load_image(item.src, size, u, v)
        except BadImage as e:
            bad.append((item.name, e.reason, str(e)))
            continue
        if opts["flip"] and flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1)
        captions.append("" if drop else item.caption)
        dropped.append(drop)
        index.append(i)
        if opts["inpaint"]:
            masks.append(inpaint_mask(size[0], size[1], sample_rng(opts["seed"], epoch, i, stream=1)))
    batch = {"epoch": epoch, "position": position, "_bad": bad}
    if not pixels:
        return batch
    for _ in bad:
        for column in (pixels, captions, dropped, index, masks):
            column += column[:1]
    batch.update(pixels=torch.stack(pixels), captions=captions, dropped=torch.tensor(dropped),
                 index=torch.tensor(index, dtype=torch.int64))
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

    def __init__(self, shards, buckets, batch_size, rank, world_size, min_side, opts, start=0):
        self.shards, self.buckets, self.b = shards, buckets, batch_size
        self.rank, self.world, self.min_side, self.opts, self.start = rank, world_size, min_side, opts, start

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
                ext = next((e for e in SHARD_IMAGE_EXTS if e in files), None)
                if ext is None:
                    warn(name, BadImage("no image in sample"))
                    continue
                meta = _parse_json(files["json"]) if "json" in files else {}
                try:
                    w, h = upright_size(open_image(files[ext]))
                except BadImage as e:
                    warn(name, e)
                    continue
                if min(_original_size(meta, w, h)) < self.min_side:
                    stats["dropped_small"] += 1
                    continue
                if "txt" in files:
                    caption = decode_caption(files["txt"])
                else:
                    caption = _json_caption(meta)
                    stats["missing_captions"] += not caption
                stats["kept"] += 1
                yield (s << 32) + n, Item(name, files[ext], caption, w, h)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info else 1
        # The DataLoader takes batches from its workers in turn, starting with worker 0. Reader w emits rank-local
        # positions w, w + workers, w + 2·workers, ...; so that the stream resumed at `start` comes out in order,
        # DataLoader worker 0 plays reader start mod workers. The reader skips its positions before `start`.
        worker = ((info.id if info else 0) + self.start) % workers
        slot, slots = self.rank * workers + worker, self.world * workers
        skip = max(0, -(-(self.start - worker) // workers))
        stats, bad, emitted = Counter(), [], 0
        buffers = {bkt: [] for bkt in self.buckets}

        def warn(name, e):
            if epoch == 0:  # later epochs re-read the same files
                bad.append((name, e.reason, str(e)))

        for epoch in itertools.count():
            kept = 0
            for i, item in self.samples(epoch, slot, slots, stats if epoch == 0 else Counter(), warn):
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
                batch["_counts"] = dict(stats)
                bad.clear()  # both were copied into the batch; samples() keeps counting into `stats`
                stats.clear()
                yield batch
            if not kept:
                raise RuntimeError(f"shard reader {slot} of {slots} found no usable sample in a whole epoch")


class Loader:
    """Batches for the training loop: `for batch in Loader(...).batches(start)` is endless, one bucket per batch:
      pixels [B, 3, H, W] float32 in [−1, 1]; captions list[str] after dropout; dropped bool [B]; index int64 [B]
      (global sample index); epoch, position (ints; resume with start = position + 1); with inpaint=True also
      mask [B, 1, H, W] in {0, 1} (1 = repaint) and masked_pixels [B, 3, H, W].
    sources: folder paths, shard paths/globs (*.tar), "demo" or DemoSource objects; folders and demo mix, shards
    stand alone. stats counts kept, dropped_small, missing_captions, bad_files (a Counter by reason) and, for folders,
    dropped_incomplete_per_epoch; batches_per_epoch is the epoch length in global batches (None for shards)."""

    def __init__(self, sources, batch_size, *, seed=0, rank=0, world_size=1, workers=2, min_side=1024,
                 bucket_area=512 * 512, bucket_min=384, bucket_max=640, bucket_step=64, caption_dropout=0.1,
                 flip=False, random_crop=False, inpaint=False, pin_memory=False):
        assert seed >= 0 and 0 <= rank < world_size and batch_size >= 1
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.workers, self.pin_memory, self.min_side = workers, pin_memory, min_side
        self.opts = dict(seed=seed, caption_dropout=caption_dropout, flip=flip, random_crop=random_crop,
                         inpaint=inpaint)
        self.buckets = buckets(bucket_area, bucket_min, bucket_max, bucket_step)
        self.stats = Counter(kept=0, dropped_small=0, missing_captions=0)
        self.stats["bad_files"] = Counter()
        self._warned = set()
        self._log(f"buckets (w×h): {', '.join(f'{w}×{h}' for w, h in self.buckets)}")

        sources = [DemoSource() if s == "demo" else s for s in sources]
        shards = [s for s in sources if isinstance(s, str) and s.endswith(".tar")]
        if shards and len(shards) != len(sources):
            raise ValueError("tar shards cannot be mixed with folder or demo sources in one Loader")
        if shards:
            self.shards = expand_shards(shards)
            self.batches_per_epoch = None
            self._log(f"{len(self.shards)} shards, streamed by {world_size} rank(s) × {max(workers, 1)} worker(s); "
                      f"shortest original side ≥ {min_side}; counts in Loader.stats as they are read")
            return
        self.shards = None
        items = []
        for s in sources:
            if isinstance(s, DemoSource):
                items += s.items()
                self.stats["kept"] += s.n
            else:
                if not os.path.isdir(s):
                    raise FileNotFoundError(f"no such folder: {s}")
                # every rank scans the same folder: only rank 0 names its bad files
                items += scan_folder(s, min_side, self.stats, lambda name, e: self._warn(name, e, self.rank == 0))
        bucket_of = [bucket_for(it.w, it.h, self.buckets) for it in items]
        self.dataset = PlannedBatches(items, bucket_of, batch_size, rank, world_size, self.opts)
        self.batches_per_epoch = len(self.dataset)
        g = batch_size * world_size
        per_bucket = Counter(bucket_of)
        tail = sum(n % g for n in per_bucket.values())
        self.stats["dropped_incomplete_per_epoch"] = tail
        self._log(f"kept {self.stats['kept']} images, dropped {self.stats['dropped_small']} with shortest side "
                  f"< {min_side}, {sum(self.stats['bad_files'].values())} bad files "
                  f"{dict(self.stats['bad_files'])}, {self.stats['missing_captions']} without caption (→ \"\")")
        self._log("per bucket: " + ", ".join(f"{w}×{h}: {per_bucket[(w, h)]}" for w, h in self.buckets))
        self._log(f"epoch = {self.batches_per_epoch} global batches of {g}; each epoch leaves out {tail} images, "
                  f"a bucket's last incomplete global batch (different images every epoch)")
        if not self.batches_per_epoch:
            raise ValueError(f"no bucket holds a full global batch of {g} images")

    def _log(self, msg):
        if self.rank == 0:
            print(f"data: {msg}", flush=True)

    def _warn(self, name, e, say=True):
        self.stats["bad_files"][e.reason] += 1
        if say and len(self._warned) < WARN_LIMIT:
            print(f"data: warning: skipped {name}: {e}", flush=True)
        elif say and len(self._warned) == WARN_LIMIT:
            print("data: warning: further bad files are counted in Loader.stats without a line each", flush=True)
        self._warned.add(name)

    def batches(self, start=0):
        """Endless batches from global batch position `start` (see the class docstring)."""
        if self.shards is not None:
            dataset = ShardStream(self.shards, self.buckets, self.batch_size, self.rank, self.world_size,
                                  self.min_side, self.opts, start)
            sampler = None
        else:
            dataset, sampler = self.dataset, itertools.count(start)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=self.workers,
                                             pin_memory=self.pin_memory)
        for batch in loader:
            for key, n in batch.pop("_counts", {}).items():
                self.stats[key] += n
            for name, reason, detail in batch.pop("_bad"):
                if name not in self._warned:  # a folder's bad file fails again every epoch: count it once
                    self._warn(name, BadImage(reason, detail.partition(": ")[2]))
            if "pixels" not in batch:
                print(f"data: warning: batch {batch['position']} had no decodable image and was skipped", flush=True)
                continue
            yield batch


def write_bench_jpegs(folder, n=200, seed=0):
    """n photo-like JPEGs (smooth colour fields plus grain, quality 90) with sides 1024–1536, the input of
    measure_throughput. Pure noise would be the wrong test: it compresses and decodes unlike photographs."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
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
    loader = Loader([folder], batch_size, workers=workers, min_side=min_side, caption_dropout=0.0)
    it = loader.batches()
    next(it)
    count, t0 = 0, time.perf_counter()
    for batch in it:
        count += len(batch["captions"])
        if count >= n:
            break
    return count / (time.perf_counter() - t0)
