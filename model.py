"""Stable Diffusion 1.5 from scratch: UNet, VAE (AutoencoderKL), CLIP ViT-L/14 text encoder and its BPE tokenizer;
SD, the bundle of a checkpoint's networks with how the recipe uses the frozen ones (encode_prompts, encode, decode);
safetensors loading (with the EMA init, take_ema_weights), saving, describing and converting checkpoints, and the train
state's file.

The checkpoint is the spec: every module attribute path equals the single-file (LDM) key minus its prefix
(UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX), so loading is a rename-free strict load and saving writes the same names.
Numbers follow CompVis/stable-diffusion (ldm/modules/diffusionmodules/openaimodel.py, model.py, attention.py @
21f890f9da3cfbeaba8e2ac3c425ee9e998d5229) and openai/CLIP (clip/model.py, simple_tokenizer.py @ a1d0717).
"""
import gzip
import hashlib
import html
import json
import math
import os
import re
import struct
import sys
import unicodedata
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BPETokenizer
from torch.utils.checkpoint import checkpoint

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
VAE_SCALE = 0.18215  # latent = VAE_SCALE · z, ≈ unit variance (scale_factor of SD's v1-inference.yaml)
VOCAB = Path(__file__).parent / "clip" / "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = 49406, 49407  # <|startoftext|>, <|endoftext|>; SD1.5 pads with EOS, not 0


def attention(q, k, v, heads, causal=False):
    """softmax(q·kᵀ/√d)·v per head (Vaswani et al. 2017, eq. 1); q [B, N, C], k and v [B, M, C] → [B, N, C]."""
    B, N, C = q.shape
    q, k, v = (a.unflatten(-1, (heads, -1)).transpose(1, 2) for a in (q, k, v))  # [B, heads, N, C/heads]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(B, N, C)


# ---------------------------------------------------------------------------------------------------------------------
# UNet (openaimodel.py UNetModel with SpatialTransformer, use_checkpoint/legacy branches dropped)

@dataclass
class UNetConfig:
    in_channels: int = 4                   # 9 for inpainting: [x_t (4), mask (1), masked-image latent (4)]
    out_channels: int = 4
    model_channels: int = 320              # level widths are model_channels · channel_mult; time embedding is 4×
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2                # per level going down; the up path has one more per level
    attention_levels: tuple = (0, 1, 2)    # levels with a SpatialTransformer after each ResBlock (not the 8× level)
    num_heads: int = 8                     # a head count, not a head dim: dims are 40/80/160 in SD1.5
    context_dim: int = 768                 # CLIP width
    norm_groups: int = 32

    @classmethod
    def tiny(cls, **kw):
        """SD1.5's 4-level layout at widths [32, 64, 64, 64], for tests and the demo."""
        return cls(**{"model_channels": 32, "channel_mult": (1, 2, 2, 2), "context_dim": 64, **kw})


def timestep_embedding(t, dim):
    """Sinusoidal embedding (Vaswani et al. 2017, §3.5) as SD lays it out: cos half first, then sin."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim, groups):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, cout), nn.SiLU(),
                                        nn.Identity(),  # LDM's dropout slot: keeps the conv at index 3
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb, context):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))  # LDM's to_out.1 is dropout

    def forward(self, x, context=None):
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    """Linear → value · GELU(gate), value the first half (Shazeer 2020, eq. 6); exact erf GELU."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class TransformerBlock(nn.Module):
    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))  # [1]: dropout slot
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff.net(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, dim, heads, context_dim, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)  # 1e-6 here, 1e-5 in ResBlocks
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, heads, context_dim)])
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x, emb, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(B, H * W, C)  # a view when x is channels_last
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h.reshape(B, H, W, C).permute(0, 3, 1, 2))


class Downsample(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.op = nn.Conv2d(dim, dim, 3, stride=2, padding=1)  # symmetric padding, unlike the VAE's

    def forward(self, x, emb, context):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x, emb, context):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """ε/v-prediction UNet of LDM (Rombach et al. 2022): unet(x [B, Cin, H, W], t [B] or 0-d, context [B, 77, D])."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        C, E, G = cfg.model_channels, 4 * cfg.model_channels, cfg.norm_groups
        res = lambda cin, cout: ResBlock(cin, cout, E, G)
        attn = lambda dim: SpatialTransformer(dim, cfg.num_heads, cfg.context_dim, G)

        self.time_embed = nn.Sequential(nn.Linear(C, E), nn.SiLU(), nn.Linear(E, E))
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(cfg.in_channels, C, 3, padding=1))])
        skips, ch = [C], C  # widths of the activations the up path concatenates back, in push order
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                block = [res(ch, mult * C)] + ([attn(mult * C)] if level in cfg.attention_levels else [])
                self.input_blocks.append(nn.Sequential(*block))
                ch = mult * C
                skips.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.input_blocks.append(nn.Sequential(Downsample(ch)))
                skips.append(ch)
        self.middle_block = nn.Sequential(res(ch, ch), attn(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                block = [res(ch + skips.pop(), mult * C)] + ([attn(mult * C)] if level in cfg.attention_levels else [])
                ch = mult * C
                if level > 0 and i == cfg.num_res_blocks:
                    block.append(Upsample(ch))
                self.output_blocks.append(nn.Sequential(*block))
        self.out = nn.Sequential(nn.GroupNorm(G, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def run(self, block, h, emb, context):
        """Every layer of a block takes (h, emb, context); checkpointed one layer at a time when asked."""
        for layer in block:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, emb, context, use_reentrant=False)
            else:
                h = layer(h, emb, context)
        return h

    def forward(self, x, t, context):
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(self.time_embed[0].weight.dtype))
        hs = [self.input_blocks[0](x)]
        for block in self.input_blocks[1:]:
            hs.append(self.run(block, hs[-1], emb, context))
        h = self.run(self.middle_block, hs[-1], emb, context)
        for block in self.output_blocks:
            h = self.run(block, torch.cat([h, hs.pop()], dim=1), emb, context)  # h first, then the skip
        return self.out(h)


# ---------------------------------------------------------------------------------------------------------------------
# VAE (ldm/modules/diffusionmodules/model.py Encoder/Decoder + ldm/models/autoencoder.py AutoencoderKL)

@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2                # encoder; the decoder has one more per level
    z_channels: int = 4
    norm_groups: int = 32                  # every VAE GroupNorm uses eps 1e-6

    @classmethod
    def tiny(cls, **kw):
        """SD1.5's 4-level layout at widths [32, 64, 64, 64]."""
        return cls(**{"ch": 32, "ch_mult": (1, 2, 2, 2), **kw})


class VAEResBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class VAEAttention(nn.Module):
    """Single-head self-attention over pixels; q, k, v, proj_out are 1×1 convs in the LDM checkpoint."""
    def __init__(self, dim, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(dim, dim, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)                 # [B, H·W, C]
        # a 1×1 conv is a linear map over channels: applied to rows of h, q, k, v come out with unit stride in C, which
        # SDPA's flash kernel needs (permuted conv outputs send it to the slower path that materialises q·kᵀ)
        q, k, v = (F.linear(h, conv.weight.flatten(1), conv.bias) for conv in (self.q, self.k, self.v))
        out = F.linear(attention(q, k, v, 1), self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class VAEDownsample(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # right/bottom only: a symmetric pad shifts the latents


class VAEUpsample(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def vae_mid(dim, groups):
    return nn.ModuleDict(dict(block_1=VAEResBlock(dim, dim, groups), attn_1=VAEAttention(dim, groups),
                              block_2=VAEResBlock(dim, dim, groups)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, G = [cfg.ch * m for m in cfg.ch_mult], cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.ch
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(VAEResBlock(ch, width, G))
                ch = width
            down = nn.ModuleDict(dict(block=blocks))
            if level < len(widths) - 1:
                down.downsample = VAEDownsample(ch)
            self.down.append(down)
        self.mid = vae_mid(ch, G)
        self.norm_out = nn.GroupNorm(G, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        h = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                h = block(h)
            if "downsample" in down:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, G = [cfg.ch * m for m in cfg.ch_mult], cfg.norm_groups
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = vae_mid(ch, G)
        ups = []  # built deepest first, stored (and named) by level: up.3 runs first
        for level in reversed(range(len(widths))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(VAEResBlock(ch, widths[level], G))
                ch = widths[level]
            up = nn.ModuleDict(dict(block=blocks))
            if level > 0:
                up.upsample = VAEUpsample(ch)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = nn.GroupNorm(G, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if "upsample" in up:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    """AutoencoderKL (Rombach et al. 2022, §3): images in [-1, 1] ↔ posterior N(mean, exp(logvar)) over z."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, images):
        """images [B, 3, H, W] in [-1, 1] → (mean, logvar), each [B, 4, H/8, W/8]; z = mean + exp(logvar/2)·ε."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """z (unscaled: latent / VAE_SCALE) → images in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


# ---------------------------------------------------------------------------------------------------------------------
# CLIP text encoder (openai/CLIP clip/model.py Transformer, under the transformers names SD checkpoints use)

@dataclass
class CLIPConfig:
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12                        # 64-dim heads
    mlp_dim: int = 3072
    positions: int = 77

    @classmethod
    def tiny(cls, **kw):
        """Width 64 (one 64-dim head), 2 layers, the full vocabulary."""
        return cls(**{"width": 64, "layers": 2, "heads": 1, "mlp_dim": 256, **kw})


class CLIPAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True))


class CLIPLayer(nn.Module):
    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        self.self_attn = CLIPAttention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, mlp_dim), fc2=nn.Linear(mlp_dim, dim)))
        self.layer_norm2 = nn.LayerNorm(dim)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        h = self.mlp.fc1(self.layer_norm2(x))
        return x + self.mlp.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu (Radford et al. 2021 code)


class CLIPTextModel(nn.Module):
    """text_encoder(ids [B, 77]) → final_layer_norm of the last layer at every position, [B, 77, width]."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.ModuleDict(dict(token_embedding=nn.Embedding(cfg.vocab_size, cfg.width),
                                             position_embedding=nn.Embedding(cfg.positions, cfg.width)))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([CLIPLayer(cfg.width, cfg.heads, cfg.mlp_dim) for _ in range(cfg.layers)])
        self.final_layer_norm = nn.LayerNorm(cfg.width)

    def forward(self, ids):
        # positions are always 0..T-1: checkpoints' stored position_ids are sometimes float or corrupted
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding.weight[: ids.shape[1]]
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)


# ---------------------------------------------------------------------------------------------------------------------
# CLIP BPE tokenizer (openai/CLIP simple_tokenizer.py, rebuilt with `tokenizers`)

def bytes_to_unicode():
    """GPT-2's reversible byte → printable character table (openai/gpt-2 encoder.py); '!' is byte 33 → id 0."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab(path=VOCAB):
    """The vocabulary and merges of openai/CLIP's bpe_simple_vocab_16e6.txt.gz: ids are the 256 byte characters,
    the same with '</w>', one per merge, then <|startoftext|>, <|endoftext|>."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:48895]]  # line 0 is a header; 512 + 48894 + 2 = 49408
    chars = list(bytes_to_unicode().values())
    words = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {w: i for i, w in enumerate(words)}, merges


_CLEAN = str.maketrans({"‘": "'", "’": "'", "‚": "'", "‛": "'", "′": "'", "“": '"', "”": '"', "„": '"',
                        "‟": '"', "″": '"', "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "st",
                        "ﬆ": "st", "Ĳ": "IJ", "ĳ": "ij", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj",
                        "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz"})


def clean(text):
    """The parts of CLIP's ftfy.fix_text + html.unescape pre-clean that change its tokens, with the stdlib:
    entities, curly quotes, Latin ligatures, full-width forms, control characters."""
    text = html.unescape(html.unescape(text)).translate(_CLEAN)
    text = re.sub(r"[\u3000\uff01-\uff5e]", lambda m: unicodedata.normalize("NFKC", m.group()), text)
    return "".join(c for c in text if c in "\t\n\r" or unicodedata.category(c) != "Cc")


class Tokenizer:
    """tokenizer(prompts) → LongTensor [B, 77]: BOS, the first 75 BPE tokens, EOS, padded with EOS (SD1.5)."""

    def __init__(self, vocab, merges, length=77):
        self.length = length
        self.bpe = BPETokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                                          unk_token="<|endoftext|>"))
        self.bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                    normalizers.Strip(), normalizers.Lowercase()])
        # openai/CLIP's word regex, keeping the matches; ByteLevel then only maps bytes to characters
        self.bpe.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                                 behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        self.bpe.decoder = decoders.ByteLevel()

    @classmethod
    def from_files(cls, vocab_json, merges_txt):
        """A diffusers/transformers tokenizer folder's vocab.json and merges.txt."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        return cls(vocab, [tuple(l.split()) for l in lines if l.strip() and not l.startswith("#version")])

    @classmethod
    def default(cls):
        """The vocabulary shipped in clip/."""
        return cls(*clip_vocab())

    def tokens(self, prompts):
        return [e.ids for e in self.bpe.encode_batch([clean(p) for p in prompts], add_special_tokens=False)]

    def count(self, prompt):
        """Number of BPE tokens of a prompt; more than length − 2 (75) are cut off."""
        return len(self.tokens([prompt])[0])

    def __call__(self, prompts):
        rows = [[BOS] + ids[: self.length - 2] + [EOS] for ids in self.tokens(prompts)]
        return torch.tensor([r + [EOS] * (self.length - len(r)) for r in rows], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: reading any SD1.5-family layout into LDM names, inferring sizes, strict loading, marked saving

def read_safetensors(path, device="cpu"):
    """(tensors, header metadata) of a .safetensors file; on device "meta" only the header is read (shapes, dtypes).
    The header's length and every tensor's byte range are checked against the file's size before anything else is
    read, so a pickled .ckpt, a text file or a truncated download is refused in constant memory."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if not 2 <= n <= min(size - 8, 100 * 2 ** 20):        # a safetensors header is JSON of at most 100 MB
            raise ValueError(not_safetensors(path, head))
        try:
            header = json.loads(f.read(n))
            end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ValueError(not_safetensors(path, head)) from None
    if 8 + n + end > size:
        raise ValueError(f"{path} is cut short: its header describes {8 + n + end:,} bytes, the file has {size:,}; "
                         "download or copy it again")
    metadata = header.pop("__metadata__", None) or {}
    if device != "meta":
        return load_file(path), metadata
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    return {k: torch.empty(v["shape"], dtype=dtypes.get(v["dtype"], torch.uint8), device="meta")
            for k, v in header.items()}, metadata


def not_safetensors(path, head):
    """Why a file is refused, with what to do: a pickle is never loaded (it can run code), whatever it holds."""
    if head.startswith((b"PK\x03\x04", b"\x80")):      # a zip (torch.save) or a bare pickle: a .ckpt
        return (f"{path} is a pickled checkpoint (.ckpt or torch.save), which zd never loads because unpickling can "
                "run code: convert it to .safetensors with a tool you trust, or use the .safetensors release")
    return f"{path} is not a safetensors file (its first bytes are no safetensors header)"


RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP_NAMES = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_from_diffusers(sd):
    """diffusers UNet2DConditionModel names → LDM names; n res blocks per level, n + 1 going up."""
    n = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("down_blocks.0.resnets."))
    up_attn = {int(k.split(".")[1]) for k in sd if re.match(r"up_blocks\.\d+\.attentions\.", k)}

    def rename(k):
        for old, new in UNET_TOP_NAMES.items():
            if k.startswith(old + "."):
                return new + k[len(old):]
        if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", k):
            return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
        if m := re.match(r"mid_block\.attentions\.0\.(.*)", k):
            return f"middle_block.1.{m[1]}"
        if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k):
            return f"input_blocks.{(n + 1) * int(m[1]) + n + 1}.0.op.{m[2]}"
        if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k):
            i = int(m[1])
            return f"output_blocks.{(n + 1) * i + n}.{2 if i in up_attn else 1}.conv.{m[2]}"
        if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k):
            i, j = int(m[2]), int(m[4])
            block = f"input_blocks.{(n + 1) * i + j + 1}" if m[1] == "down" else f"output_blocks.{(n + 1) * i + j}"
            return f"{block}.0.{resnet(m[5])}" if m[3] == "resnets" else f"{block}.1.{m[5]}"
        return k  # unknown: left as is, so it is reported as ignored

    def resnet(rest):
        first, _, tail = rest.partition(".")
        return f"{RESNET_NAMES.get(first, first)}.{tail}"

    return {rename(k): v for k, v in sd.items()}


def vae_from_diffusers(sd):
    """diffusers AutoencoderKL names → LDM names: decoder levels reversed, mid attention as 1×1 convs."""
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
            "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
    out = {}
    for k, v in sd.items():
        k = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", k):
            k = f"{m[1]}.mid.attn_1.{attn.get(m[2], m[2])}.{m[3]}"
            if v.ndim == 2:  # linear [C, C] in diffusers, 1×1 conv [C, C, 1, 1] in LDM
                v = v[:, :, None, None]
        out[k] = v
    return out


def read_diffusers(folder, device="cpu"):
    """A diffusers pipeline folder's unet, vae and text_encoder weights under single-file (LDM) names."""
    folder = Path(folder)
    if not (folder / "unet").is_dir():
        if (folder / "model_ema.safetensors").exists():
            raise ValueError(f"{folder} is a zd run folder, not a model: give {folder / 'model_ema.safetensors'} "
                             "(the EMA weights, to sample and ship) or model.safetensors (the raw ones)")
        raise ValueError(f"{folder} is a folder but no diffusers pipeline (it has no unet/): give a .safetensors file, "
                         "or a folder with unet/, vae/ and text_encoder/")

    def weights(sub, name):
        for f in (folder / sub / f"{name}.safetensors", folder / sub / f"{name}.fp16.safetensors"):
            if f.exists():
                return read_safetensors(f, device)[0]
        return {}

    unet = weights("unet", "diffusion_pytorch_model")
    if not unet:
        raise ValueError(f"{folder / 'unet'} holds no diffusion_pytorch_model.safetensors (zd reads safetensors only: "
                         ".bin files are pickles)")
    sd = {UNET_PREFIX + k: v for k, v in unet_from_diffusers(unet).items()}
    vae = weights("vae", "diffusion_pytorch_model")
    sd.update({VAE_PREFIX + k: v for k, v in (vae_from_diffusers(vae) if vae else {}).items()})
    sd.update({"cond_stage_model.transformer." + k: v for k, v in weights("text_encoder", "model").items()})
    return sd


def ema_key(key):
    """LDM's EMA name of a UNet key: 'model_ema.' + the path below 'model.' with every dot removed."""
    return "model_ema." + key[len("model."):].replace(".", "")


def infer_unet(sd):
    """UNetConfig from LDM-named UNet tensors; 8 heads per attention block (SD1.5's convention)."""
    levels = 1 + sum(1 for k in sd if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    n = len({k.split(".")[1] for k in sd if k.startswith("input_blocks.")}) // levels - 1
    C = sd["input_blocks.0.0.weight"].shape[0]
    first = [f"input_blocks.{1 + level * (n + 1)}" for level in range(levels)]  # first block of each level
    ctx = [v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")]
    return UNetConfig(in_channels=sd["input_blocks.0.0.weight"].shape[1], out_channels=sd["out.2.weight"].shape[0],
                      model_channels=C, num_res_blocks=n,
                      channel_mult=tuple(sd[f"{b}.0.out_layers.3.weight"].shape[0] // C for b in first),
                      attention_levels=tuple(i for i, b in enumerate(first) if f"{b}.1.proj_in.weight" in sd),
                      context_dim=ctx[0] if ctx else UNetConfig.context_dim)


def infer_vae(sd):
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.down.")})
    return VAEConfig(in_channels=sd["encoder.conv_in.weight"].shape[1],
                     out_channels=sd["decoder.conv_out.weight"].shape[0], ch=ch,
                     ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)),
                     num_res_blocks=len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")}),
                     z_channels=sd["post_quant_conv.weight"].shape[0])


def infer_clip(sd):
    """CLIPConfig from tensors; 64-dim heads (CLIP's convention)."""
    vocab, width = sd["embeddings.token_embedding.weight"].shape
    return CLIPConfig(vocab_size=vocab, width=width, heads=width // 64,
                      layers=len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")}),
                      mlp_dim=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
                      positions=sd["embeddings.position_embedding.weight"].shape[0])


NETS = {"unet": (UNET_PREFIX, UNet, UNetConfig, infer_unet), "vae": (VAE_PREFIX, VAE, VAEConfig, infer_vae),
        "text_encoder": (CLIP_PREFIX, CLIPTextModel, CLIPConfig, infer_clip)}


def listing(keys, limit=8):
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def build(cls, cfg, sd, prefix="", dtype=torch.float32, device="cpu"):
    """cls(cfg) holding sd's tensors; an error names the missing and mis-shaped keys (as prefix + key).
    Returns (model, the keys of sd it did not use)."""
    with torch.device("meta"):
        model = cls(cfg)
    want = model.state_dict()
    missing = [prefix + k for k in want if k not in sd]
    shaped = [f"{prefix}{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in want.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or shaped:
        raise ValueError(f"{cls.__name__} ({cfg}): {len(missing)} missing keys [{listing(missing)}]; "
                         f"{len(shaped)} mis-shaped [{listing(shaped)}]")
    model.load_state_dict({k: sd[k].to(device, dtype) for k in want}, strict=True, assign=True)
    return model, set(sd) - set(want)


def to_net(module, x):
    """x on a network's device and in its dtype (fp16/bf16 weights); the sampler's own state stays float32."""
    p = next(module.parameters())
    return x.to(p.device, p.dtype)


def posterior_sample(mean, std, posterior_noise):
    """latent = VAE_SCALE·(mean + std·posterior_noise): a sample of the VAE posterior (Rombach et al. 2022, §3), scaled
    to unit variance. Training from the latent cache calls this with the stored moments, so its floats are those of
    SD.encode."""
    return VAE_SCALE * (mean + std * posterior_noise.to(mean.device))


@dataclass
class SD:
    """A checkpoint's networks, with the three ways the recipe uses the frozen ones; `meta` holds what `load` read."""
    unet: UNet
    vae: VAE | None  # None for zd's pixel-space demo models
    text_encoder: CLIPTextModel
    tokenizer: Tokenizer
    meta: dict = field(default_factory=dict)

    @torch.no_grad()
    def encode_prompts(self, prompts, device):
        """CLIP embeddings [B, 77, C] of the prompts, float32 on `device`, warning (once per prompt) when a prompt is
        cut to its first 75 tokens."""
        for p in dict.fromkeys(prompts):
            if (n := self.tokenizer.count(p)) > 75:
                print(f"warning: prompt truncated to 75 CLIP tokens (it has {n}): {p[:60]!r}…", file=sys.stderr)
        ids = self.tokenizer(prompts).to(next(self.text_encoder.parameters()).device)
        return self.text_encoder(ids).float().to(device)

    @torch.no_grad()
    def moments(self, pixels):
        """The VAE posterior N(mean, std²) of each image (Rombach et al. 2022, §3): (mean, std) float32 [B, 4, H/8, W/8]
        on the VAE's device, whatever its dtype. A batch of one is encoded as two copies: PyTorch's CPU convolution
        takes another algorithm for one image with 3 input channels, whose rounding differs, and a sample's moments
        must not depend on its batch (the latent cache encodes in other batches than training does)."""
        x = to_net(self.vae, pixels)
        mean, logvar = self.vae.encode(x if len(x) > 1 else x.expand(2, -1, -1, -1))
        return mean[:len(x)].float(), (0.5 * logvar[:len(x)].float()).exp()

    @torch.no_grad()
    def encode(self, pixels, posterior_noise):
        """latent = VAE_SCALE·z, z = mean + std·posterior_noise a posterior *sample* (posterior_sample), float32 on the
        pixels' device. Pixel-space models (the demo) take the pixels as they are."""
        if self.vae is None:
            return pixels
        return posterior_sample(*self.moments(pixels), posterior_noise).to(pixels.device)

    @torch.no_grad()
    def decode(self, latents):
        """Latents → uint8 [N, H, W, 3] on the CPU, one image at a time (bounded memory), rounded like diffusers' image
        processor: round(clamp(x/2 + 1/2, 0, 1)·255)."""
        images = []
        for z in latents.split(1):
            if self.vae is not None:
                z = self.vae.decode(to_net(self.vae, z / VAE_SCALE))
            images.append(((z.float().cpu() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8))
        return torch.cat(images).permute(0, 2, 3, 1).contiguous()


def markers(path, keys, metadata):
    """(prediction, ztsnr) a checkpoint declares: 'v'/'eps'/None and True/False/None, from any of the three markers
    `save` writes (pitfall 10)."""
    path, prediction, ztsnr = Path(path), None, None
    if path.is_dir():
        sched = path / "scheduler" / "scheduler_config.json"
        if sched.exists():
            cfg = json.loads(sched.read_text())
            prediction = {"v_prediction": "v", "epsilon": "eps"}.get(cfg.get("prediction_type"))
            ztsnr = cfg.get("rescale_betas_zero_snr")
        return prediction, ztsnr
    prediction = (metadata.get("zd.prediction")
                  or {"v": "v", "epsilon": "eps"}.get(metadata.get("modelspec.prediction_type")))
    if prediction is None and "v_pred" in keys:
        prediction = "v"
    if prediction is None and path.with_suffix(".yaml").exists():
        m = re.search(r"parameterization:\s*[\"']?(\w+)", path.with_suffix(".yaml").read_text())
        prediction = "v" if m and m[1] == "v" else "eps"  # LDM's default parameterization is eps
    if "zd.ztsnr" in metadata:
        ztsnr = metadata["zd.ztsnr"] == "true"
    elif "ztsnr" in keys:
        ztsnr = True
    return prediction, ztsnr


def take_ema_weights(sd, path, ema=None):
    """The EMA init: which UNet weights a checkpoint gives. A full SD1.5 file holds its EMA (`model_ema.*`, the weights
    SD1.5 ships to sample from) beside the raw UNet; with ema=None (the default, and the recipe's: UNet and EMA start
    from SD1.5's EMA weights) they replace the raw ones in sd, in place. An -emaonly file's UNet is its EMA already.
    ema=True requires them, False keeps the raw UNet. Returns (EMA taken, EMA present, the raw keys now ignored)."""
    has_ema = any(k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates") for k in sd)
    if ema and not has_ema:
        raise ValueError(f"{path} has no model_ema.* weights: an -emaonly file's UNet is its EMA already")
    if not (has_ema if ema is None else ema):
        return False, has_ema, set()
    raw = [k for k in sd if k.startswith(UNET_PREFIX)]
    absent = [ema_key(k) for k in raw if ema_key(k) not in sd]
    if absent:
        raise ValueError(f"{path}: {len(absent)} EMA tensors missing [{listing(absent)}]")
    sd.update({k: sd.pop(ema_key(k)) for k in raw})
    return True, has_ema, set(raw)


def load(path, vae_path=None, ema=None, *, dtype=torch.float32, device="cpu", verbose=True):
    """Load an SD1.5-family checkpoint: an LDM single .safetensors file (emaonly, full with model_ema.*, fp16,
    CLIP with or without text_model.) or a diffusers folder; vae_path replaces the VAE with a separate file.
    ema: None takes model_ema.* when present, True requires it, False takes the raw UNet.
    device="meta" reads only headers: sizes, keys and markers without the weights."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        sd, metadata, layout = read_diffusers(path, device), {}, "diffusers"
    else:
        (sd, metadata), layout = read_safetensors(path, device), "single"
    if any(k.startswith("opt.") for k in sd) and not any(k.startswith(UNET_PREFIX) for k in sd):
        raise ValueError(f"{path} is zd's train state (UNet, EMA and optimiser moments, for --resume), not a model: "
                         f"give {path.with_name('model_ema.safetensors')} (the EMA weights, to sample and ship)")
    total = len(sd)
    prediction, ztsnr = markers(path, sd, metadata)
    for k in [k for k in sd if k.startswith("cond_stage_model.transformer.") and not k.startswith(CLIP_PREFIX)]:
        sd[CLIP_PREFIX + k[len("cond_stage_model.transformer."):]] = sd.pop(k)  # CLIP saved without text_model.

    take_ema, has_ema, ignored_raw = take_ema_weights(sd, path, ema)
    parts = {p: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
             for p in (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)}
    ignored = {k for k in sd if not k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX))} - {"v_pred", "ztsnr"}
    ignored |= ignored_raw
    if vae_path is not None:
        ignored |= {VAE_PREFIX + k for k in parts[VAE_PREFIX]}
        vae_sd, _ = read_safetensors(vae_path, device)
        vae_sd = {k[len(VAE_PREFIX):] if k.startswith(VAE_PREFIX) else k: v for k, v in vae_sd.items()}
        parts[VAE_PREFIX] = vae_from_diffusers(vae_sd) if any(".down_blocks." in k for k in vae_sd) else vae_sd
    pixel_space = metadata.get("zd.pixel_space") == "true"
    nets, dtypes = {}, set()
    for name, (prefix, cls, config, infer) in NETS.items():
        if name == "vae" and pixel_space:
            nets[name] = None
            continue
        if not parts[prefix]:
            with torch.device("meta"):
                want = [prefix + k for k in cls(config()).state_dict()]
            hint = " (pass vae_path)" if name == "vae" else ""
            raise ValueError(f"{path}: no {name} tensors{hint}; missing {len(want)} keys [{listing(want)}]")
        try:
            cfg = infer(parts[prefix])
        except KeyError as e:
            raise ValueError(f"{path}: cannot infer the {name} sizes, key {prefix}{e.args[0]} is missing") from None
        nets[name], unused = build(cls, cfg, parts[prefix], prefix, dtype, device)
        ignored |= {prefix + k for k in unused}
        dtypes |= {str(v.dtype).removeprefix("torch.") for k, v in parts[prefix].items() if k not in unused}

    tok_dir = path / "tokenizer"
    tokenizer = (Tokenizer.from_files(tok_dir / "vocab.json", tok_dir / "merges.txt")
                 if (tok_dir / "vocab.json").exists() else Tokenizer.default())
    counts = {name: len(net.state_dict()) if net is not None else 0 for name, net in nets.items()}
    meta = dict(layout=layout, prediction=prediction, ztsnr=ztsnr, inpaint=nets["unet"].cfg.in_channels == 9,
                ema="ema" if take_ema else ("raw" if has_ema else None), ema_present=has_ema,
                pixel_space=pixel_space, loaded=sum(counts.values()), counts=counts, total=total,
                ignored=sorted(ignored), metadata=metadata,
                dtypes=sorted(dtypes),
                configs={name: asdict(net.cfg) for name, net in nets.items() if net is not None})
    if verbose:
        print(f"loaded {path}: {meta['loaded']} tensors (unet {counts['unet']}, vae {counts['vae']}, "
              f"text encoder {counts['text_encoder']}), ignored {len(ignored)}; layout {layout}, "
              f"weights {meta['ema'] or 'as stored'}, prediction {prediction}, ztsnr {ztsnr}")
    return SD(nets["unet"], nets["vae"], nets["text_encoder"], tokenizer, meta)


def describe(nets):
    """(label, text) rows of what a checkpoint `load`ed is: layout, variant, EMA, markers, dtypes, sizes, the keys it
    ignored and its header metadata (`zd.py inspect`)."""
    m = nets.meta
    unmarked = " (unmarked: SD front-ends will sample it as ε-prediction)" if m["prediction"] is None else ""
    rows = [("layout", f"{m['layout']}, {'inpainting (9-channel UNet)' if m['inpaint'] else 'base'}"
                       f"{', pixel space (no VAE)' if m['pixel_space'] else ''}"),
            ("EMA", "model_ema.* present, loaded by default" if m["ema_present"] else "no model_ema.* (one UNet)"),
            ("markers", f"prediction {m['prediction']}, ztsnr {m['ztsnr']}{unmarked}"),
            ("dtypes", ", ".join(m["dtypes"]))]
    for name in ("unet", "vae", "text_encoder"):
        if (net := getattr(nets, name)) is not None:
            params = sum(p.numel() for p in net.parameters())
            rows.append((name, f"{m['counts'][name]} tensors, {params:,} parameters, {net.cfg}"))
    rows.append(("ignored", f"{len(m['ignored'])} keys" + (": " + listing(m["ignored"]) if m["ignored"] else "")))
    return rows + [("metadata", f"{k} = {v if len(v) <= 100 else v[:100] + '…'}")
                   for k, v in sorted(m["metadata"].items())]


def v1_yaml(unet_cfg: UNetConfig, vae_cfg: VAEConfig, prediction):
    """CompVis configs/stable-diffusion/v1-inference.yaml (v1-inpainting-inference.yaml for 9 input channels) with
    this model's sizes and parameterization: the sidecar SD front-ends read to know how to sample a file."""
    inpaint = unet_cfg.in_channels == 9
    return f"""model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.{"LatentInpaintDiffusion" if inpaint else "LatentDiffusion"}
  params:
    parameterization: "{prediction}"
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: {"hybrid" if inpaint else "crossattn"}
    monitor: val/loss_simple_ema
    scale_factor: {VAE_SCALE}
    use_ema: False{chr(10) + "    finetune_keys: null" if inpaint else ""}

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: {unet_cfg.in_channels}
        out_channels: {unet_cfg.out_channels}
        model_channels: {unet_cfg.model_channels}
        attention_resolutions: {sorted([2 ** i for i in unet_cfg.attention_levels], reverse=True)}
        num_res_blocks: {unet_cfg.num_res_blocks}
        channel_mult: {list(unet_cfg.channel_mult)}
        num_heads: {unet_cfg.num_heads}
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: {unet_cfg.context_dim}
        use_checkpoint: True
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: {vae_cfg.z_channels}
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: {vae_cfg.z_channels}
          resolution: 256
          in_channels: {vae_cfg.in_channels}
          out_ch: {vae_cfg.out_channels}
          ch: {vae_cfg.ch}
          ch_mult: {list(vae_cfg.ch_mult)}
          num_res_blocks: {vae_cfg.num_res_blocks}
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""


def save(path, unet, text_encoder, vae=None, *, half=False, prediction="v", ztsnr=True, extra_metadata=None):
    """Write an LDM single file that SD front-ends load, marked three ways (pitfall 10): header metadata, empty
    `v_pred`/`ztsnr` tensors, and a sidecar <name>.yaml. vae=None only for zd's pixel-space demo models."""
    assert prediction in ("v", "eps"), prediction
    path = Path(path)
    dtype = torch.float16 if half else torch.float32
    sd = {}
    for prefix, net in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (CLIP_PREFIX, text_encoder)):
        if net is not None:  # contiguous: channels_last parameters cannot be serialised as they are
            sd.update({prefix + k: v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()})
    if prediction == "v":
        sd["v_pred"] = torch.zeros(0)
    if ztsnr:
        sd["ztsnr"] = torch.zeros(0)
    metadata = {"modelspec.sai_model_spec": "1.0.0", "modelspec.title": path.stem,
                "modelspec.architecture": "stable-diffusion-v1",
                "modelspec.prediction_type": {"v": "v", "eps": "epsilon"}[prediction],
                "zd.prediction": prediction, "zd.ztsnr": str(bool(ztsnr)).lower(),
                "zd.config": json.dumps({"unet": asdict(unet.cfg), "vae": asdict(vae.cfg) if vae else None,
                                         "text_encoder": asdict(text_encoder.cfg)}),
                **({"zd.pixel_space": "true"} if vae is None else {}), **(extra_metadata or {})}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata))
    if vae is not None:  # a pixel-space model has no LDM config
        yaml = v1_yaml(unet.cfg, vae.cfg, prediction)
        atomic_write(path.with_suffix(".yaml"), lambda tmp: Path(tmp).write_text(yaml))


def weights_hash(module):
    """SHA-256 of a network's weights (names, shapes and float32 values in name order), whatever file or dtype they came
    from: what the latent cache records of the VAE that made it."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def atomic_write(path, write):
    """write(tmp) then rename over path: readers never see a half-written checkpoint, and a failed write leaves the
    previous file as it was. A failed write raises OSError, safetensors' own I/O errors (a full disk) included."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        write(str(tmp))
    except BaseException as e:             # a full disk, an interrupt: the previous file stays, the partial one goes
        tmp.unlink(missing_ok=True)
        # safetensors raises its I/O errors as SafetensorError("... I/O error: TEXT (os error N) ..."), not OSError
        io = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(e)) if isinstance(e, SafetensorError) else None
        if io:
            raise OSError(int(io[2]), io[1], str(path)) from e
        raise
    os.chmod(tmp, new_file_mode())         # safetensors writes 0600 temporary files, and the mode survives the rename
    os.replace(tmp, path)


def new_file_mode():
    """The mode open() gives a new file, 0o666 less the umask: files others on a shared machine may read (reading the
    umask sets it, so it is set straight back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def save_train_state(folder, meta, unet, ema, opt):
    """What `zd.py train --resume` needs, never pickled: train_state.safetensors holds the UNet, the EMA and the AdamW
    state flattened by parameter index (opt.{i}.exp_avg, opt.{i}.exp_avg_sq, opt.{i}.step), marked with meta["step"];
    train_state.json holds `meta`. Each file is replaced atomically."""
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for i, state in opt.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in state.items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    path = Path(folder, "train_state.safetensors")
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"step": str(meta["step"])}))
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))


def load_train_state(folder, unet, ema, opt):
    """Restore what save_train_state wrote into the UNet, EMA and optimiser; returns its meta. ValueError when the two
    files are from different steps (a run killed between writing them)."""
    meta = json.loads(Path(folder, "train_state.json").read_text())
    tensors, header = read_safetensors(Path(folder, "train_state.safetensors"))
    if header["step"] != str(meta["step"]):
        raise ValueError(f"{folder}/train_state.safetensors is from step {header['step']} but train_state.json from "
                         f"step {meta['step']}: the run was killed while saving; its model files are whole, start anew")
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    unet.load_state_dict(part("unet."))
    ema.load_state_dict(part("ema."))
    opt_state = opt.state_dict()
    opt_state["state"] = {}
    for k, v in part("opt.").items():
        i, name = k.split(".")
        opt_state["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(opt_state)
    for p, state in opt.state.items():   # moments in the parameter's memory format (channels-last on GPUs): fused
        for k in ("exp_avg", "exp_avg_sq"):     # AdamW needs the same strides, and the file holds them contiguous
            state[k] = torch.empty_like(p).copy_(state[k])
    return meta


def expand_to_inpaint(unet: UNet) -> UNet:
    """The 9-channel inpainting UNet of a 4-channel one: the mask and masked-image input channels start at zero,
    so it computes exactly what the base does until trained."""
    sd = dict(unet.state_dict())
    w = sd["input_blocks.0.0.weight"]
    sd["input_blocks.0.0.weight"] = torch.cat([w, w.new_zeros(w.shape[0], 5, *w.shape[2:])], dim=1)
    return build(UNet, replace(unet.cfg, in_channels=9), sd, dtype=w.dtype, device=w.device)[0]


def add_difference(a, b, c, alpha=1.0):
    """a + α·(b − c) over every tensor of a (A1111's "add difference"): e.g. inpaint + (tuned − base). Where a has
    more input channels (the 9-channel conv_in) the difference lands on the first ones; a's other tensors stay."""
    out = {}
    for k, v in a.items():
        if k in b and k in c and v.is_floating_point() and b[k].shape == c[k].shape:
            d = (b[k].float() - c[k].float()) * alpha
            if d.shape != v.shape:
                if not (v.ndim == 4 and d.shape[1] < v.shape[1] and d[:, :1].shape == v[:, :1].shape):
                    raise ValueError(f"{k}: cannot add a {tuple(d.shape)} difference to {tuple(v.shape)}")
                d = F.pad(d, (0, 0, 0, 0, 0, v.shape[1] - d.shape[1]))  # conv weight [O, I, kh, kw]: pad I
            v = (v.float() + d).to(v.dtype)
        out[k] = v
    return out
