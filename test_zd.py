"""zd's tests: each equation against an independent value, each SPEC §7 pitfall made impossible.

    pytest test_zd.py               the default suite (CPU, minutes)
    ZD_FULL=1 pytest test_zd.py     also the full-size SD1.5 parity checks
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ---- model.py: networks, tokenizer, checkpoints ----
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model

FULL = os.environ.get("ZD_FULL") == "1"


def randomize(net, seed=0):
    """Every parameter random (diffusers zero-initialises some), at a scale that keeps activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") and "norm" in name else 0.0) + 0.1 * r)
            else:
                p.copy_(r / p[0].numel() ** 0.5)
    return net


def diffusers_unet_config(cfg: model.UNetConfig):
    """The diffusers config of a model.UNetConfig (SPEC §8): attention_head_dim is diffusers' name for 8 heads."""
    levels = range(len(cfg.channel_mult))
    down = ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels]
    up = [b.replace("Down", "Up") for b in reversed(down)]
    return dict(sample_size=8, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
                layers_per_block=cfg.num_res_blocks,
                down_block_types=down, up_block_types=up, cross_attention_dim=cfg.context_dim,
                attention_head_dim=cfg.num_heads, norm_num_groups=cfg.norm_groups, flip_sin_to_cos=True, freq_shift=0)


def diffusers_vae_config(cfg: model.VAEConfig):
    n = len(cfg.ch_mult)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.z_channels,
                block_out_channels=[cfg.ch * m for m in cfg.ch_mult], layers_per_block=cfg.num_res_blocks,
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                norm_num_groups=cfg.norm_groups, sample_size=32)


def transformers_clip_config(cfg: model.CLIPConfig):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
                          num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_dim,
                          max_position_embeddings=cfg.positions, hidden_act="quick_gelu",
                          bos_token_id=model.BOS, eos_token_id=model.EOS, pad_token_id=1)


def write_vocab(folder):
    """vocab.json and merges.txt (the files a diffusers tokenizer/ folder holds) from the shipped vocabulary."""
    vocab, merges = model.clip_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def hf_tokenizer(folder):
    from transformers import CLIPTokenizer
    return CLIPTokenizer(*write_vocab(folder), model_max_length=77)  # positional: SPEC §8


_FOLDERS = {}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """make(variant) → a diffusers pipeline folder of tiny random oracles with SD1.5's layout ("base"/"inpaint")."""
    def make(variant="base"):
        if variant not in _FOLDERS:
            from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
            from transformers import CLIPTextModel
            folder = tmp_path_factory.mktemp(f"tiny_{variant}")
            unet_cfg = model.UNetConfig.tiny(in_channels=9 if variant == "inpaint" else 4)
            pipe = StableDiffusionPipeline(
                unet=randomize(UNet2DConditionModel(**diffusers_unet_config(unet_cfg)), 1),
                vae=randomize(AutoencoderKL(**diffusers_vae_config(model.VAEConfig.tiny())), 2),
                text_encoder=randomize(CLIPTextModel(transformers_clip_config(model.CLIPConfig.tiny())), 3),
                tokenizer=hf_tokenizer(folder / "vocab"),
                scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            pipe.save_pretrained(folder, safe_serialization=True)
            _FOLDERS[variant] = (folder, pipe)
        return _FOLDERS[variant]
    return make


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("variant", ["base", "inpaint"])
def test_unet_matches_diffusers(tiny_sd, variant):
    folder, pipe = tiny_sd(variant)
    sd = model.load(folder)
    assert sd.meta["layout"] == "diffusers" and sd.meta["inpaint"] == (variant == "inpaint")
    assert sd.unet.cfg == model.UNetConfig.tiny(in_channels=9 if variant == "inpaint" else 4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, sd.unet.cfg.in_channels, 16, 24, generator=g)
    t = torch.tensor([999, 17])
    ctx = torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        ours, ref = sd.unet(x, t, ctx), pipe.unet(x, t, encoder_hidden_states=ctx).sample
    assert ref.std() > 0.1
    assert rel_err(ours, ref) < 1e-4


def test_vae_matches_diffusers(tiny_sd):
    folder, pipe = tiny_sd()
    vae = model.load(folder).vae
    g = torch.Generator().manual_seed(0)
    images, z = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1, torch.randn(2, 4, 4, 6, generator=g)
    with torch.no_grad():
        mean, logvar = vae.encode(images)
        post = pipe.vae.encode(images).latent_dist
        decoded, ref = vae.decode(z), pipe.vae.decode(z).sample
    assert rel_err(mean, post.mean) < 1e-4 and rel_err(logvar, post.logvar) < 1e-4
    assert rel_err(decoded, ref) < 1e-4


def test_text_encoder_matches_transformers(tiny_sd):
    folder, pipe = tiny_sd()
    sd = model.load(folder)
    ids = sd.tokenizer(["a photograph of an astronaut riding a horse", "", "x " * 100])
    with torch.no_grad():
        ours, ref = sd.text_encoder(ids), pipe.text_encoder(ids).last_hidden_state
    assert ours.shape == (3, 77, 64)
    assert rel_err(ours, ref) < 1e-4


PROMPTS = ["a photograph of an astronaut riding a horse", "", "A CAT'S   hat, isn't it?! 1234.5 $9.99",
           "café naïve Ωmega 東京 🙂 d'arc they're we'll I'd", "  leading and trailing\tspaces\n",
           "under_score hy-phen e-mail@ex.com <tag> #hash", "word " * 90]


def test_tokenizer_matches_transformers(tmp_path):
    ours, ref = model.Tokenizer.default(), hf_tokenizer(tmp_path)
    expected = ref(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ours(PROMPTS), expected)


def test_tokenizer_golden_ids_and_padding():
    tok = model.Tokenizer.default()
    ids = tok(["a photograph of an astronaut riding a horse", ""])
    assert ids[0, :10].tolist() == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert ids[0, 10:].eq(49407).all()  # SPEC §7.11: padded with EOS 49407, not 0
    assert ids[1].tolist() == [49406] + [49407] * 76


def test_tokenizer_truncates_and_counts():
    tok = model.Tokenizer.default()
    prompt = " ".join(f"w{i}" for i in range(50))  # "w" and the digits: more than 75 tokens
    ids = tok([prompt])[0]
    assert tok.count(prompt) > 75 and tok.count("a horse") == 2
    assert ids[0] == model.BOS and ids[-1] == model.EOS and model.EOS not in ids[1:-1].tolist()


def test_tokenizer_preclean_like_ftfy():
    tok = model.Tokenizer.default()
    same = [("\u201chello\u201d it\u2019s", '"hello" it\'s'), ("fish &amp; chips", "fish & chips"),
            ("\ufb01sh \ufb02y", "fish fly"), ("\uff21\uff22\uff23\uff11", "abc1"), ("a\x00b\x07c", "abc")]
    for dirty, fixed in same:
        assert torch.equal(tok([dirty]), tok([fixed])), dirty
    assert tok.bpe.encode("\u201chello\u201d").ids != tok.bpe.encode('"hello"').ids  # the clean is what fixes it


def test_tokenizer_from_diffusers_folder(tiny_sd):
    folder, pipe = tiny_sd()
    assert torch.equal(model.load(folder).tokenizer(PROMPTS), model.Tokenizer.default()(PROMPTS))


def meta_nets(unet_cfg=None):
    with torch.device("meta"):
        return (model.UNet(unet_cfg or model.UNetConfig()), model.VAE(model.VAEConfig()),
                model.CLIPTextModel(model.CLIPConfig()))


def test_full_size_counts_on_meta():
    """SPEC §3: tensor and parameter counts of SD1.5, its inpainting UNet, the VAE and CLIP-L."""
    counts = lambda net: (len(net.state_dict()), sum(p.numel() for p in net.parameters()))
    unet, vae, clip = meta_nets()
    assert counts(unet) == (686, 859_520_964)
    assert counts(meta_nets(model.UNetConfig(in_channels=9))[0]) == (686, 859_535_364)
    assert counts(vae) == (248, 83_653_863)
    assert counts(clip) == (196, 123_060_480)
    assert unet.input_blocks[0][0].weight.shape == (320, 4, 3, 3)
    assert model.VAE_SCALE == 0.18215


def test_full_size_keys_and_shapes_match_diffusers_on_meta():
    """Every full-size LDM name and shape equals diffusers'/transformers' SD1.5 mapped through SPEC §4's table."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    unet, vae, clip = meta_nets()
    with torch.device("meta"):
        ref_unet = UNet2DConditionModel(**diffusers_unet_config(model.UNetConfig()))
        ref_vae = AutoencoderKL(**diffusers_vae_config(model.VAEConfig()))
        ref_clip = CLIPTextModel(transformers_clip_config(model.CLIPConfig()))
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes(model.unet_from_diffusers(ref_unet.state_dict())) == shapes(unet.state_dict())
    assert shapes(model.vae_from_diffusers(ref_vae.state_dict())) == shapes(vae.state_dict())
    ref = {k.removeprefix("text_model."): v for k, v in ref_clip.state_dict().items() if "position_ids" not in k}
    assert shapes(ref) == shapes(clip.state_dict())


def test_attention_head_dims_40_80_160():
    """SPEC §7.11: 8 heads per block, so head dims 40/80/160, not 64."""
    unet = meta_nets()[0]
    dims = {m.to_q.out_features // m.heads for m in unet.modules() if isinstance(m, model.CrossAttention)}
    assert dims == {40, 80, 160}
    calls = []
    real = model.attention
    def spy(q, k, v, heads, causal=False):
        calls.append(q.shape[-1] // heads)
        return real(q, k, v, heads, causal)
    model.attention = spy
    try:
        tiny = model.UNet(model.UNetConfig.tiny())
        tiny(torch.randn(1, 4, 8, 8), torch.tensor(1), torch.randn(1, 77, 64))
    finally:
        model.attention = real
    assert set(calls) == {32 // 8, 64 // 8}


def test_group_norm_eps():
    """SPEC §7.11: every VAE GroupNorm and the SpatialTransformer's use eps 1e-6; the UNet's ResBlocks 1e-5."""
    unet, vae, _ = meta_nets()
    assert {m.eps for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-6}
    assert {m.norm.eps for m in unet.modules() if isinstance(m, model.SpatialTransformer)} == {1e-6}
    assert {m.in_layers[0].eps for m in unet.modules() if isinstance(m, model.ResBlock)} == {1e-5}
    assert unet.out[0].eps == 1e-5


def test_vae_downsample_pad_probe():
    """SPEC §3 probe: all-ones 3×3 kernel on all-ones 8×8 → 9 top-left, 4 bottom-right (pad right/bottom only)."""
    down = model.VAEDownsample(1)
    with torch.no_grad():
        down.conv.weight.fill_(1.0), down.conv.bias.zero_()
        out = down(torch.ones(1, 1, 8, 8))[0, 0]
    assert out.shape == (4, 4) and out[0, 0] == 9 and out[-1, -1] == 4
    unet_down = model.Downsample(1)  # the UNet's is symmetric: the probe tells them apart
    with torch.no_grad():
        unet_down.op.weight.fill_(1.0), unet_down.op.bias.zero_()
        out = unet_down(torch.ones(1, 1, 8, 8), None, None)[0, 0]
    assert out[0, 0] == 4 and out[-1, -1] == 9


def test_timestep_embedding_cos_first():
    """SPEC §7.11: [cos(t·f_i), sin(t·f_i)], f_i = 10000^(−i/160), against a float64 evaluation."""
    t = torch.tensor([0, 1, 500, 999])
    emb = model.timestep_embedding(t, 320)
    f = 10000.0 ** (-torch.arange(160, dtype=torch.float64) / 160)
    args = t.double()[:, None] * f
    assert torch.allclose(emb.double(), torch.cat([args.cos(), args.sin()], 1), atol=2e-4)
    assert emb[0, :160].eq(1).all() and emb[0, 160:].eq(0).all()


def test_unet_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    unet = randomize(model.UNet(model.UNetConfig.tiny()))
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 64), torch.tensor([3, 900])
    grads = []
    for ckpt in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = ckpt
        unet(x, t, ctx).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_unet_scalar_t_bf16_autocast_channels_last():
    torch.manual_seed(0)
    unet = randomize(model.UNet(model.UNetConfig.tiny())).to(memory_format=torch.channels_last)
    x, ctx = torch.randn(2, 4, 16, 16).to(memory_format=torch.channels_last), torch.randn(2, 77, 64)
    with torch.no_grad():
        ref = unet(x, torch.tensor([7, 7]), ctx)
        assert torch.equal(unet(x, torch.tensor(7), ctx), ref)  # a 0-d t broadcasts over the batch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(x, torch.tensor(7), ctx)
    assert out.shape == ref.shape and rel_err(out.float(), ref) < 0.05
