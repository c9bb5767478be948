"""zd's executable spec: every equation against an independent value (a second formula, a paper's number, diffusers or
transformers as oracles), and a test for each of the README's numbered pitfalls.

    python -m pytest -q test_zd.py               the default suite (CPU, minutes)
    ZD_FULL=1 python -m pytest -q test_zd.py     also the slow checks: full-size SD1.5 parity (≈ 10 GB RAM) and the
                                                 1500-step demo drawing its vocabulary (≈ 6 minutes in all)
"""
import argparse
import contextlib
import functools
import io
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import types
import zlib
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as zd.py sets it: spinning OpenMP threads stall on shared cores

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import bench
import check
import data
import model
import schedule as S
import zd

HERE = os.path.dirname(os.path.abspath(__file__))


def refused(capsys, *argv, status=1):
    """`zd.py ARGV` refuses: exit status `status` (argparse's is 2) and one line on stderr, no traceback; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        zd.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == status and err and "\n" not in err and "Traceback" not in err, err
    return err


# ---- schedule.py: the ZT math -----------------------------------------------------------------------------------------

from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg  # noqa: E402
from diffusers.training_utils import EMAModel, compute_snr  # noqa: E402

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ZT = S.alphas_cumprod(S.betas())
ZT_SNR = S.snr(ZT)


def test_paper_numbers():
    """The papers' reference values (float64; Lin et al. 2023, Table 1 and Fig. 2), recomputed independently of the
    code under test where cheap."""
    sd = S.alphas_cumprod(S.sd15_betas())
    assert sd[0].item() == pytest.approx(0.99915, abs=1e-12)
    assert sd[999].item() == pytest.approx(0.0046601, rel=1e-4)
    assert sd[999].sqrt().item() == pytest.approx(0.068265, rel=1e-5)
    assert S.snr(sd)[999].item() == pytest.approx(0.004682, rel=1e-3)
    assert ZT[499].item() == pytest.approx(0.24236, rel=1e-4)
    assert ZT[998].item() == pytest.approx(1.968e-7, rel=1e-3)
    assert ZT[999].item() == 0.0 and S.betas()[999].item() == 1.0
    assert ZT[0].item() == pytest.approx(sd[0].item(), abs=1e-15)
    w = S.min_snr_weight(ZT_SNR, 5.0, "v")
    assert w.argmax().item() == 139 == (ZT_SNR < 5).nonzero()[0].item()


def test_betas_closed_form():
    """β_t = (√0.00085 + (√0.012 − √0.00085)·t/999)², in plain Python floats."""
    b = S.sd15_betas()
    for t in (0, 1, 500, 998, 999):
        ref = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * t / 999) ** 2
        assert b[t].item() == pytest.approx(ref, rel=1e-13)


def test_zt_rescale_is_an_affine_map_of_sqrt_abar():
    """Lin Alg. 1 said differently: √ᾱ' = (√ᾱ − √ᾱ_T)/(√ᾱ_0 − √ᾱ_T)·√ᾱ_0, so √ᾱ' is affine in √ᾱ with
    √ᾱ'_0 = √ᾱ_0 and √ᾱ'_T = 0; second differences of the map are 0."""
    s, s_zt = S.alphas_cumprod(S.sd15_betas()).sqrt(), ZT.sqrt()
    slope = (s_zt[0] - s_zt[-1]) / (s[0] - s[-1])
    assert torch.allclose(s_zt, slope * (s - s[-1]), atol=1e-15, rtol=0)
    assert slope.item() == pytest.approx(s[0].item() / (s[0] - s[-1]).item(), rel=1e-13)


@pytest.mark.parametrize("zt", [True, False])
def test_schedule_matches_diffusers(zt):
    """diffusers works in float32: its rescaled β_t = 1 − ᾱ_t/ᾱ_{t−1} carries float32 cancellation (≈1e-7 absolute)."""
    ref = DDPMScheduler(**SD15, rescale_betas_zero_snr=zt)
    torch.testing.assert_close(S.betas(zt).float(), ref.betas, rtol=1e-3, atol=2e-7)
    torch.testing.assert_close(S.alphas_cumprod(S.betas(zt)).float(), ref.alphas_cumprod, rtol=1e-4, atol=1e-7)


def test_schedule_is_float64():
    """Pitfall 8: the schedule is never held in fp16. ᾱ_998 in fp16 is a subnormal 5% off; √ᾱ taken in float64 and
    then cast is exact to fp16 precision."""
    assert S.betas().dtype == S.alphas_cumprod(S.betas()).dtype == torch.float64
    x0 = torch.ones(1, 1, 1, 1, dtype=torch.float16)
    got = S.add_noise(x0, torch.zeros_like(x0), ZT[998]).item()
    assert got == pytest.approx(ZT[998].sqrt().item(), rel=1e-3)
    assert ZT[998].half().float().sqrt().item() != pytest.approx(ZT[998].sqrt().item(), rel=1e-2)


def test_snr_matches_diffusers_compute_snr():
    ref = DDPMScheduler(**SD15, rescale_betas_zero_snr=True)
    t = torch.arange(1000)
    torch.testing.assert_close(ZT_SNR.float(), compute_snr(ref, t), rtol=1e-4, atol=1e-6)


def test_min_snr_weights():
    """Hang et al.: against diffusers' train_text_to_image formula, the closed form min(ᾱ, γ(1−ᾱ)), finite at SNR = 0.
    Pitfall 1: weights from the *rescaled* SNR (t = 999 weighs 0, not SD1.5's 0.0047).
    Pitfall 2: ε weight at SNR = 0 is finite. Pitfall 3: not min(SNR + 1, γ)/(SNR + 1)."""
    g = 5.0
    ref = torch.stack([ZT_SNR, g * torch.ones_like(ZT_SNR)], dim=1).min(dim=1)[0]
    wv, we, wx = (S.min_snr_weight(ZT_SNR, g, p) for p in ("v", "eps", "x0"))
    torch.testing.assert_close(wv, ref / (ZT_SNR + 1), rtol=1e-12, atol=0)
    torch.testing.assert_close(wv, torch.minimum(ZT, g * (1 - ZT)), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(we[:999], (ref / ZT_SNR)[:999], rtol=1e-12, atol=0)
    torch.testing.assert_close(wx, ref, rtol=0, atol=0)
    assert torch.isfinite(wv).all() and torch.isfinite(we).all() and torch.isfinite(wx).all()
    assert wv[999].item() == 0.0 and we[999].item() == 1.0
    sd_snr = S.snr(S.alphas_cumprod(S.sd15_betas()))
    assert S.min_snr_weight(sd_snr, g, "v")[999].item() > 4e-3      # what the pre-rescale SNR would wrongly give
    wrong = torch.clamp(ZT_SNR + 1, max=g) / (ZT_SNR + 1)
    assert (wrong - wv).abs().max().item() > 0.1


def test_v_weight_leaves_the_terminal_steps_almost_nothing():
    """The fact beside schedule.min_snr_weight and in the README's figure: on the rescaled schedule the min-SNR-5 v
    weight, min(ᾱ, 5(1−ᾱ)) in closed form, gives t ≥ 900 about 0.03% of the total weight and t = 999 none (SD1.5's
    schedule: 0.29%, and 0.0047 at t = 999)."""
    for abar, share_900, w_999 in ((ZT, 3.2e-4, 0.0), (S.alphas_cumprod(S.sd15_betas()), 2.9e-3, 4.66e-3)):
        w = S.min_snr_weight(S.snr(abar), 5.0, "v")
        torch.testing.assert_close(w, torch.minimum(abar, 5 * (1 - abar)), rtol=1e-12, atol=1e-15)
        assert (w[900:].sum() / w.sum()).item() == pytest.approx(share_900, rel=0.03)
        assert w[999].item() == pytest.approx(w_999, rel=1e-3, abs=0)


def test_schedule_plot(tmp_path, monkeypatch, capsys):
    """`zd.py schedule --plot FILE` draws the figure the README shows; without matplotlib, one line naming the
    pip install."""
    zd.main(["schedule", "--plot", str(tmp_path / "s.png")])
    assert Image.open(tmp_path / "s.png").size == (1650, 462)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert "pip install matplotlib" in refused(capsys, "schedule", "--plot", str(tmp_path / "t.png"))


def test_weighted_mse_reduces_as_the_recipe_says():
    """The loss: per-sample MSE over C, H, W, times the sample's weight, mean over the batch — by hand on errors that
    are constant per sample (1, 2, 3 → MSE 1, 4, 9), and against diffusers' train_text_to_image reduction
    (F.mse_loss per element → mean over C, H, W → × weight → mean); computed in fp32 from fp16 inputs."""
    pred, tgt = torch.zeros(3, 4, 2, 2), torch.arange(1.0, 4.0).view(3, 1, 1, 1).expand(3, 4, 2, 2)
    loss, per_sample = S.weighted_mse(pred, tgt, torch.tensor([1.0, 0.5, 0.0]))
    assert loss.item() == (1 * 1 + 0.5 * 4 + 0 * 9) / 3 and per_sample.tolist() == [1, 4, 9]
    g = torch.Generator().manual_seed(0)
    pred, tgt, w = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g), torch.rand(5, generator=g)
    ref = (torch.nn.functional.mse_loss(pred, tgt, reduction="none").mean(dim=[1, 2, 3]) * w).mean()
    torch.testing.assert_close(S.weighted_mse(pred, tgt, w)[0], ref)
    loss16, _ = S.weighted_mse(pred.half(), tgt.half(), w)
    assert loss16.dtype == torch.float32 and loss16.item() == pytest.approx(ref.item(), rel=1e-3)


def test_forward_process_and_v_match_diffusers():
    ref = DDPMScheduler(**SD15, rescale_betas_zero_snr=True)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 139, 500, 998, 999])
    x0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    torch.testing.assert_close(S.add_noise(x0, eps, ZT[t]), ref.add_noise(x0, eps, t), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S.v_target(x0, eps, ZT[t]), ref.get_velocity(x0, eps, t), rtol=1e-4, atol=1e-5)
    # at the zero-terminal-SNR step x_t is pure noise and v = −x0, exactly
    assert torch.equal(S.add_noise(x0, eps, ZT[999]), eps) and torch.equal(S.v_target(x0, eps, ZT[999]), -x0)


def test_ip_noise_perturbs_the_input_only():
    """Ning et al. 2023: x_t uses ε + γξ, the v target uses the clean ε (pitfall 4)."""
    g = torch.Generator().manual_seed(1)
    x0, eps, xi = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    a = ZT[torch.tensor([10, 500, 990])]
    x_t = S.add_noise(x0, eps, a, xi, 0.1)
    torch.testing.assert_close(x_t, S.add_noise(x0, eps + 0.1 * xi, a))
    assert not torch.allclose(x_t, S.add_noise(x0, eps, a))
    tgt = S.target(x0, eps, a, "v")
    torch.testing.assert_close(tgt, S.v_target(x0, eps, a))
    assert not torch.allclose(tgt, S.v_target(x0, eps + 0.1 * xi, a))


@pytest.mark.parametrize("t", [0, 1, 500, 998, 999])
def test_v_eps_x0_conversions_round_trip_and_stay_finite(t):
    g = torch.Generator().manual_seed(t)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g,
                                                                                     dtype=torch.float64)
    for abar in (ZT[t], torch.tensor(1.0, dtype=torch.float64)):
        x_t, v = S.add_noise(x0, eps, abar), S.v_target(x0, eps, abar)
        x0_hat, eps_hat = S.x0_eps(x_t, v, abar, "v")
        assert torch.isfinite(x0_hat).all() and torch.isfinite(eps_hat).all()
        torch.testing.assert_close(x0_hat, x0)
        torch.testing.assert_close(eps_hat, eps)
    if t < 999:
        x_t = S.add_noise(x0, eps, ZT[t])
        torch.testing.assert_close(S.x0_eps(x_t, eps, ZT[t], "eps")[0], x0, rtol=1e-6, atol=1e-6 / ZT[t].sqrt().item())


def test_eps_prediction_refused_at_zero_terminal_snr():
    """Pitfall 7: an ε model on the ZT schedule would divide by √ᾱ_999 = 0; refused with a clear error."""
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        S.ddim_step(x, x, ZT[999], ZT[899], "eps")
    assert torch.isfinite(S.ddim_step(x, x, ZT[999], ZT[899], "v")).all()


@pytest.mark.parametrize("n", [1, 7, 10, 13, 25, 50, 100])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_timesteps_match_diffusers(n, spacing):
    ref = DDIMScheduler(**SD15, timestep_spacing=spacing, steps_offset=1)
    ref.set_timesteps(n)
    assert S.timesteps(n, spacing, offset=1).tolist() == ref.timesteps.tolist()


def test_trailing_timesteps_and_prev_lookup():
    """Lin Table 2 lists; pitfall 6: the first step is 999, and the previous step is looked up in the list
    (for N = 13, 999 → 922; computing t − 1000//N would give 923)."""
    assert S.timesteps(10).tolist() == list(range(999, 0, -100))
    ts = S.timesteps(13)
    assert ts[:4].tolist() == [999, 922, 845, 768] and ts[-1].item() == 76
    for n in (3, 7, 13, 25, 30, 50, 999):
        ts = S.timesteps(n)
        assert ts[0].item() == 999 and len(set(ts.tolist())) == n
        assert [S.prev_timestep(ts, i) for i in range(n)] == ts[1:].tolist() + [-1]
    assert S.prev_timestep(S.timesteps(13), 0) != 999 - 1000 // 13
    assert 999 not in S.timesteps(50, "leading").tolist()


def _fake_model(x, t):
    """A deterministic stand-in for a network: any smooth function of (x, t) exercises the sampler's algebra."""
    return 0.5 * torch.tanh(x) + 0.001 * float(t) * torch.ones_like(x)


@pytest.mark.parametrize("pred,zt,spacing,n", [("v", True, "trailing", 10), ("v", True, "trailing", 25),
                                               ("eps", False, "leading", 10), ("eps", False, "trailing", 20)])
def test_ddim_loop_matches_diffusers(pred, zt, spacing, n):
    """Full DDIM (η = 0) trajectories against DDIMScheduler (clip_sample off, set_alpha_to_one), for leading/trailing
    spacing with N dividing 1000: only there is diffusers' prev_t = t − 1000//N the next step of the list."""
    ref = DDIMScheduler(**SD15, rescale_betas_zero_snr=zt, timestep_spacing=spacing, steps_offset=1,
                        prediction_type="v_prediction" if pred == "v" else "epsilon", clip_sample=False,
                        set_alpha_to_one=True)
    ref.set_timesteps(n)
    abar = S.alphas_cumprod(S.betas(zt))
    ts = S.timesteps(n, spacing)
    assert ts.tolist() == ref.timesteps.tolist()
    x_ref = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = zd.ddim(_fake_model, x_ref.double(), ts, abar, pred)
    for t in ts.tolist():
        x_ref = ref.step(_fake_model(x_ref, t), t, x_ref).prev_sample
    torch.testing.assert_close(x.float(), x_ref, rtol=1e-4, atol=1e-4)


def test_ddim_steps_the_golden_rows():
    """zd.ddim, the loop `generate` runs, against check.golden's DDIM rows (the first, second and last step of N = 10,
    13, 25, 50 on the ZT schedule): started at a row's t with the row's x_t and model output, its first step lands on
    the row's x_prev — the model's input at the list's next t (922 after 999 for N = 13, pitfall 6), or x̂0 after the
    last. ε rows at t = 999 are the undefined step of pitfall 7."""
    v, _ = check.golden()
    for p in ("v", "eps"):
        for r, (n, t) in enumerate(zip(v["ddim.n"].tolist(), v["ddim.t"].tolist())):
            if p == "eps" and t == 999:
                continue
            ts = S.timesteps(n)
            inputs = []

            def denoise(x, t):
                inputs.append(x)
                return v["ddim.model_output"][r:r + 1] if len(inputs) == 1 else torch.zeros_like(x)

            out = zd.ddim(denoise, v["ddim.x_t"][r:r + 1], ts[ts.tolist().index(t):], ZT, p)
            x_prev = inputs[1] if len(inputs) > 1 else out
            torch.testing.assert_close(x_prev, v[f"ddim.x_prev.{p}"][r:r + 1], rtol=1e-12, atol=1e-12)


def test_ddim_last_step_returns_x0():
    x_t, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = S.ddim_step(x_t, v, ZT[99], S.abar_at(ZT, -1), "v")
    torch.testing.assert_close(out, S.x0_from_v(x_t, v, ZT[99]))


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_cfg_rescale_matches_diffusers(phi):
    g = torch.Generator().manual_seed(2)
    u, c = torch.randn(3, 4, 8, 8, generator=g), 2 * torch.randn(3, 4, 8, 8, generator=g)
    x_cfg = u + 7.5 * (c - u)
    ref = rescale_noise_cfg(x_cfg, c, guidance_rescale=phi) if phi else x_cfg
    torch.testing.assert_close(S.guidance(u, c, 7.5, phi), ref, rtol=1e-5, atol=1e-5)
    if phi == 1.0:   # Lin Alg. 2 with φ = 1: the guided output has the conditional output's std, per sample
        torch.testing.assert_close(S.guidance(u, c, 7.5, 1.0).std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)))


def test_ema_closed_form_and_no_warmup():
    """e_n = p + (e0 − p)·dⁿ for constant p; the default decay is constant from step 1, so one update moves the EMA by
    (1 − d) of the gap and does not wipe the init (pitfall 5)."""
    e0, p = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    e = e0.clone()
    for step in range(1, 301):
        S.ema_update([e], [p], S.ema_decay(step, 0.99))
    torch.testing.assert_close(e, p + (e0 - p) * 0.99 ** 300, rtol=1e-10, atol=1e-12)
    e = e0.clone()
    S.ema_update([e], [p], S.ema_decay(1))
    torch.testing.assert_close(e, e0 + 1e-4 * (p - e0), rtol=1e-12, atol=1e-15)
    assert S.ema_decay(1) == S.ema_decay(10 ** 6) == 0.9999
    assert 0 < S.ema_decay(1, warmup=True) < 0.9999


def _vectors_file(path):
    zd.main(["vectors", "--out", str(path)])
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, {k: json.loads(m) for k, m in f.metadata().items()}


def test_vectors_file(tmp_path):
    """The golden-vector file: every convention on its own case, every tensor described and given tolerances, and the
    values agree with an independent recomputation (a second formula, or diffusers)."""
    v, meta = _vectors_file(tmp_path / "v.safetensors")
    required = ["sd15.alphas_cumprod", "sd15.min_snr_weight.v", "sd15.min_snr_weight.eps", "zt.betas",
                "zt.alphas_cumprod", "zt.snr", "zt.min_snr_weight.v", "zt.min_snr_weight.eps", "forward.x0",
                "forward.noise", "forward.ip_noise", "forward.t", "forward.x_t", "forward.x_t_no_ip",
                "forward.v_target", "forward.eps_target", "forward.sd15.x_t", "forward.sd15.v_target", "loss.v",
                "loss.eps", "cfg.out", "cfg.out_no_rescale", "ddim.n", "ddim.t", "ddim.t_prev", "ddim.abar_t",
                "ddim.abar_prev", "ddim.x0_hat", "ddim.eps_hat", "ddim.x_prev.v", "ddim.x_prev.eps", "ema.out",
                "ema.out_1000", "loss.sd15.v", "loss.sd15.eps", "ddim.sd15.t", "ddim.sd15.x_prev.v",
                "ddim.sd15.x_prev.eps"]
    required += [f"timesteps.{s}.{n}" for n in (10, 13, 25, 50) for s in ("trailing", "leading")]
    assert set(required) <= set(v) and set(meta["zd.description"]) == set(meta["zd.tolerances"]) == set(v)
    assert {k.split(".")[1] for k in v if k.startswith("mistake.")} == set(meta["zd.mistakes"]) == {
        "snr_before_rescale", "min_snr_plus_one", "eps_weight_on_v", "eps_weight_nan_at_zero_snr", "ip_noise_in_target",
        "prev_t_stride", "leading_spacing_on_zt", "sd15_abar_in_zt_sampler", "ema_warmup", "abar_in_bf16",
        "ema_in_bf16", "no_zt_rescale", "last_step_to_abar0", "steps_offset_0", "cfg_rescale_missing"}
    for k, tol in meta["zd.tolerances"].items():
        assert set(tol) == {"float64", "float32", "bfloat16", "float16"}
        assert (tol["float32"] == [0, 0]) == (not v[k].is_floating_point())
        assert meta["zd.description"][k]["description"] and meta["zd.description"][k]["shape"] == list(v[k].shape)
    assert v["timesteps.trailing.13"].tolist()[:3] == [999, 922, 845] and v["ddim.t_prev"].tolist()[:2] == [899, 799]
    for n in (10, 13, 25, 50):
        ts = v[f"timesteps.trailing.{n}"].tolist()
        assert v[f"timesteps.trailing_prev.{n}"].tolist() == ts[1:] + [-1]
        stride = v[f"mistake.prev_t_stride.timesteps.trailing_prev.{n}"].tolist()
        assert stride[:2] == [999 - 1000 // n, ts[1] - 1000 // n]
    # independent recomputation
    for s in ("zt", "sd15"):
        a = DDPMScheduler(**SD15, rescale_betas_zero_snr=s == "zt").alphas_cumprod.double()
        torch.testing.assert_close(v[f"{s}.alphas_cumprod"], a, rtol=1e-5, atol=1e-6)
        w = torch.minimum(v[f"{s}.alphas_cumprod"], 5 * (1 - v[f"{s}.alphas_cumprod"]))
        torch.testing.assert_close(v[f"{s}.min_snr_weight.v"], w, rtol=1e-12, atol=1e-15)
    t, x0, eps, xi = v["forward.t"], v["forward.x0"], v["forward.noise"], v["forward.ip_noise"]
    a = v["zt.alphas_cumprod"][t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v["forward.x_t"], a.sqrt() * x0 + (1 - a).sqrt() * (eps + 0.1 * xi))
    torch.testing.assert_close(v["forward.x_t_no_ip"], a.sqrt() * x0 + (1 - a).sqrt() * eps)
    torch.testing.assert_close(v["forward.v_target"], a.sqrt() * eps - (1 - a).sqrt() * x0)
    for p in ("v", "eps"):
        mse = (v[f"loss.model_output.{p}"] - v[f"forward.{p}_target"]).pow(2).flatten(1).mean(1)
        torch.testing.assert_close(v[f"loss.{p}"], (v[f"zt.min_snr_weight.{p}"][t] * mse).sum() / len(t))
    u, c = v["cfg.uncond"], v["cfg.cond"]
    torch.testing.assert_close(v["cfg.out"], rescale_noise_cfg(u + 7.5 * (c - u), c, 0.7))
    at, ap = v["ddim.abar_t"].view(-1, 1, 1, 1), v["ddim.abar_prev"].view(-1, 1, 1, 1)
    assert torch.equal(at.flatten(), v["zt.alphas_cumprod"][v["ddim.t"]])
    assert ap.flatten()[v["ddim.t_prev"] < 0].eq(1).all()
    x_t, m = v["ddim.x_t"], v["ddim.model_output"]
    torch.testing.assert_close(v["ddim.x0_hat"], at.sqrt() * x_t - (1 - at).sqrt() * m)
    torch.testing.assert_close(v["ddim.eps_hat"], (1 - at).sqrt() * x_t + at.sqrt() * m)
    torch.testing.assert_close(v["ddim.x_prev.v"], ap.sqrt() * v["ddim.x0_hat"] + (1 - ap).sqrt() * v["ddim.eps_hat"])
    eps_nan = v["ddim.x_prev.eps"].isnan().flatten(1).all(1)
    assert torch.equal(eps_nan, v["ddim.t"] == 999)                      # ε cannot be sampled at ᾱ = 0
    e, p = v["ema.ema"], v["ema.param"]
    torch.testing.assert_close(v["ema.out"], 0.9999 * e + 1e-4 * p)
    torch.testing.assert_close(v["ema.out_1000"], p + (e - p) * 0.9999 ** 1000)
    stuck = v["mistake.ema_in_bf16.ema.out_1000"] == e.bfloat16().double()     # each update below half an ulp
    assert stuck.double().mean() > 0.95 and not stuck[e.abs() < 0.02].any()
    assert v["timesteps.leading.10"].tolist() == list(range(901, 0, -100)) and v["ddim.sd15.t"][:3].tolist() == [
        901, 801, 1]
    bf16 = v["mistake.abar_in_bf16.forward.x_t_no_ip"]
    assert torch.equal(bf16[:2], v["forward.x0"][:2])                    # ᾱ_0, ᾱ_1 round to 1: no noise at t = 0, 1


def test_vectors_json_has_the_same_content(tmp_path):
    """`--format json`: the same tensors as nested lists (NaN as null), descriptions and tolerances, read with the
    standard library alone."""
    v, meta = _vectors_file(tmp_path / "v.safetensors")
    zd.main(["vectors", "--format", "json", "--out", str(tmp_path / "v.json")])
    j = json.loads((tmp_path / "v.json").read_text())
    assert {k: j[k] for k in meta} == meta and set(j["tensors"]) == set(v)
    for k, x in v.items():
        got = torch.tensor(json.loads(json.dumps(j["tensors"][k]).replace("null", "NaN")), dtype=x.dtype)
        assert got.shape == x.shape and torch.equal(got.isnan(), x.isnan())
        assert torch.equal(got.nan_to_num(), x.nan_to_num())


# An adapter is what a trainer's author writes for `zd.py check`: any subset of the protocol in the README. These test
# it: diffusers as a trainer, the recipe written out again from the papers (float64 and float32), and one adapter per
# known mistake, each written from the README's pitfall list.

class Diffusers:
    """diffusers as a trainer: DDPMScheduler/DDIMScheduler on the zero-terminal-SNR schedule with the min-SNR weight,
    IP noise and loss of examples/text_to_image/train_text_to_image.py (--snr_gamma 5 --input_perturbation 0.1
    --use_ema) and the pipelines' CFG rescale; latents and model outputs in `dtype`, the EMA in float32."""
    prediction, dtype = "v", torch.float32

    def __init__(self):
        kind = "epsilon" if self.prediction == "eps" else "v_prediction"
        config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      rescale_betas_zero_snr=True, prediction_type=kind)
        self.train = DDPMScheduler(**config)
        self.sampler = DDIMScheduler(**config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)

    def alphas_cumprod(self):
        return self.train.alphas_cumprod

    def loss_weight(self, t):
        snr = compute_snr(self.train, t)
        w = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0]
        return w / snr if self.prediction == "eps" else w / (snr + 1)

    def noisy_input(self, x0, noise, ip_noise, t):
        return self.train.add_noise(x0.to(self.dtype), noise.to(self.dtype) + 0.1 * ip_noise.to(self.dtype), t)

    def target(self, x0, noise, ip_noise, t):
        x0, noise = x0.to(self.dtype), noise.to(self.dtype)
        return noise if self.prediction == "eps" else self.train.get_velocity(x0, noise, t)

    def loss(self, model_output, x0, noise, ip_noise, t):
        target = self.target(x0, noise, ip_noise, t)
        loss = torch.nn.functional.mse_loss(model_output.float(), target.float(), reduction="none")
        return (loss.mean(dim=list(range(1, len(loss.shape)))) * self.loss_weight(t)).mean()

    def sampling_timesteps(self, n):
        self.sampler.set_timesteps(n)
        return self.sampler.timesteps

    def sampler_step(self, x_t, model_output, t, n):
        self.sampler.set_timesteps(n)
        return self.sampler.step(model_output.to(self.dtype), t, x_t.to(self.dtype)).prev_sample

    def cfg(self, uncond, cond, scale, rescale):
        uncond, cond = uncond.to(self.dtype), cond.to(self.dtype)
        return rescale_noise_cfg(uncond + scale * (cond - uncond), cond, guidance_rescale=rescale)

    def ema_update(self, ema, param, decay, step):
        ema_model = EMAModel([torch.nn.Parameter(ema.float())], decay=decay)
        ema_model.optimization_step = step - 1
        ema_model.step([torch.nn.Parameter(param.float())])
        return ema_model.shadow_params[0]


class DiffusersEps(Diffusers):
    prediction = "eps"


class DiffusersBF16(Diffusers):
    dtype = torch.bfloat16


def _trailing(n):
    return [round(1000 - i * 1000 / n) - 1 for i in range(n)]         # Lin et al. 2023, Table 2


def _leading(n, offset=1):
    return [i * (1000 // n) + offset for i in reversed(range(n))]     # SD1.5's scheduler config: steps_offset 1


class Recipe:
    """The recipe written out again from the papers, sharing no code with schedule.py: data in `dtype`, and as a
    low-precision trainer keeps them, ᾱ, the weights and the loss in float32 (√ᾱ and √(1−ᾱ) taken there, then cast to
    the data's dtype) and the EMA in float32."""
    prediction, dtype, zero_terminal_snr = "v", torch.float64, True

    def __init__(self):
        self.table = torch.promote_types(self.dtype, torch.float32)
        s = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=self.table) ** 2, 0).sqrt()
        if self.zero_terminal_snr:
            s = (s - s[-1]) * s[0] / (s[0] - s[-1])                     # Lin et al. 2023, Alg. 1
        self.abar = s ** 2

    def _ab(self, t, like, abar=None):
        a = (self.abar if abar is None else abar)[torch.as_tensor(t)].reshape(-1, *[1] * (like.dim() - 1))
        return a.sqrt().to(self.dtype), (1 - a).sqrt().to(self.dtype)

    def alphas_cumprod(self):
        return self.abar

    def loss_weight(self, t):                                           # Hang et al. 2023, in ᾱ: SNR = ᾱ/(1 − ᾱ)
        a = self.abar[t]
        return torch.minimum(a, 5 * (1 - a)) if self.prediction == "v" else (5 * (1 - a) / a).clamp(max=1)

    def _train_ab(self, t, like):
        return self._ab(t, like)

    def noisy_input(self, x0, noise, ip_noise, t):
        a, s = self._train_ab(t, x0)
        return a * x0.to(self.dtype) + s * (noise.to(self.dtype) + 0.1 * ip_noise.to(self.dtype))

    def target(self, x0, noise, ip_noise, t):
        a, s = self._train_ab(t, x0)
        return a * noise.to(self.dtype) - s * x0.to(self.dtype) if self.prediction == "v" else noise.to(self.dtype)

    def loss(self, model_output, x0, noise, ip_noise, t):
        err = model_output.to(self.dtype).to(self.table) - self.target(x0, noise, ip_noise, t).to(self.table)
        return (self.loss_weight(t) * err.pow(2).flatten(1).mean(1)).mean()

    def timesteps(self, n):
        return _trailing(n) if self.zero_terminal_snr else _leading(n)

    def sampling_timesteps(self, n):
        return torch.tensor(self.timesteps(n))

    def prev(self, t, n):
        ts = self.timesteps(n)
        return ts[ts.index(t) + 1] if t != ts[-1] else -1

    def final(self, x, abar):                                           # ᾱ_prev = 1: the last step returns x̂0
        return 1.0, 0.0

    def sampler_step(self, x_t, model_output, t, n, abar=None):         # Song et al. 2021, eq. 12, η = 0
        x, out = x_t.to(self.dtype), model_output.to(self.dtype)
        a, s = self._ab(t, x, abar)
        x0, eps = (a * x - s * out, s * x + a * out) if self.prediction == "v" else ((x - s * out) / a, out)
        prev = self.prev(t, n)
        a, s = self._ab(prev, x, abar) if prev >= 0 else self.final(x, abar)
        return a * x0 + s * eps

    def cfg(self, uncond, cond, scale, rescale):                        # Lin et al. 2023, Alg. 2
        u, c = uncond.to(self.dtype), cond.to(self.dtype)
        x = u + scale * (c - u)
        return rescale * x * c.std(dim=(1, 2, 3), keepdim=True) / x.std(dim=(1, 2, 3), keepdim=True) + (1 - rescale) * x

    def ema_update(self, ema, param, decay, step):
        e = ema.to(self.table)
        return e + (1 - decay) * (param.to(self.dtype).to(self.table) - e)


class Recipe32(Recipe):
    dtype = torch.float32


class RecipeBF16(Recipe):
    dtype = torch.bfloat16


class RecipeFP16(Recipe):
    dtype = torch.float16


class RecipeSD15(Recipe32):
    """An ε trainer on SD1.5's schedule as shipped: leading timesteps with steps_offset 1."""
    prediction, zero_terminal_snr = "eps", False


class RecipeSD15V(RecipeSD15):
    prediction = "v"


class SnrBeforeRescale(Recipe32):                                       # pitfall 1
    def loss_weight(self, t):
        a = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)[t]
        return torch.minimum(a, 5 * (1 - a))


class MinSnrPlusOne(Recipe32):                                          # pitfall 3
    def loss_weight(self, t):
        snr = self.abar[t] / (1 - self.abar[t])
        return torch.clamp(snr + 1, max=5) / (snr + 1)


class EpsWeightOnV(Recipe32):                                           # pitfall 3: the ε form on a v loss
    def loss_weight(self, t):
        snr = self.abar[t] / (1 - self.abar[t])
        return torch.clamp(snr, max=5) / snr


class EpsWeightNanAtZeroSnr(EpsWeightOnV):                              # pitfall 2: the same formula, an ε model
    prediction = "eps"


class IpNoiseInTarget(Recipe32):                                        # pitfall 4
    def target(self, x0, noise, ip_noise, t):
        return super().target(x0, noise + 0.1 * ip_noise, ip_noise, t)


class PrevTStride(Recipe32):                                            # pitfall 6
    def prev(self, t, n):
        return t - 1000 // n


class LeadingSpacingOnZt(Recipe32):                                     # pitfall 6: SD1.5's leading spacing
    def sampling_timesteps(self, n):
        return torch.arange(n - 1, -1, -1) * (1000 // n) + 1


class Sd15AbarInZtSampler(Recipe32):                                    # pitfall 9
    def sampler_step(self, x_t, model_output, t, n, abar=None):
        return super().sampler_step(x_t, model_output, t, n, torch.cumprod(1 - torch.linspace(
            0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0))


class EmaWarmup(Recipe32):                                              # pitfall 5
    def ema_update(self, ema, param, decay, step):
        s = step - 1                                                    # updates before this one
        return super().ema_update(ema, param, 0.0 if s == 0 else min(decay, (1 + s) / (10 + s)), step)


class AbarInBF16(RecipeBF16):                                           # pitfall 8: ᾱ in the latents' dtype
    def _train_ab(self, t, like):
        return self._ab(t, like, self.abar.to(self.dtype))


class EmaInBF16(RecipeBF16):                                            # pitfall 8: the EMA stored in bf16
    def ema_update(self, ema, param, decay, step):
        return torch.lerp(ema.to(self.dtype), param.to(self.dtype), 1 - decay)


class NoZtRescale(Recipe32):                                            # SD1.5's schedule in a ZT trainer
    zero_terminal_snr = False

    def timesteps(self, n):
        return _trailing(n)


class LastStepToAbar0(Recipe32):                                        # set_alpha_to_one=False
    def final(self, x, abar):
        return self._ab(0, x, abar)


class StepsOffset0(RecipeSD15):                                         # leading spacing, steps_offset 0
    def sampling_timesteps(self, n):
        return torch.tensor(_leading(n, 0))


class CfgRescaleMissing(Recipe32):                                      # the rescale asked for, not applied
    def cfg(self, uncond, cond, scale, rescale):
        return super().cfg(uncond, cond, scale, 0.0)


class EpsWeightOnVGuarded(Recipe32):                                    # pitfall 3, its NaN replaced by 1
    def loss_weight(self, t):
        snr = self.abar[t] / (1 - self.abar[t])
        return torch.where(snr > 0, torch.clamp(snr, max=5) / snr, 1.0)


class EpsWeightGuardedWithZero(Recipe32):                               # pitfall 2, its NaN replaced by 0
    prediction = "eps"

    def loss_weight(self, t):
        snr = self.abar[t] / (1 - self.abar[t])
        return torch.where(snr > 0, torch.clamp(snr, max=5) / snr, 0.0)


class LeadingOffset0OnZt(Recipe32):                                     # two mistakes in one list
    def sampling_timesteps(self, n):
        return torch.tensor(_leading(n, 0))


class EpsWeightOnSd15Snr(Recipe32):                                     # two mistakes in one weight
    def loss_weight(self, t):
        a = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)[t]
        return torch.clamp(a / (1 - a), max=5) / (a / (1 - a))


MISTAKE_ADAPTERS = {"snr_before_rescale": SnrBeforeRescale, "min_snr_plus_one": MinSnrPlusOne,
                    "eps_weight_on_v": EpsWeightOnV, "eps_weight_nan_at_zero_snr": EpsWeightNanAtZeroSnr,
                    "ip_noise_in_target": IpNoiseInTarget, "prev_t_stride": PrevTStride,
                    "leading_spacing_on_zt": LeadingSpacingOnZt, "sd15_abar_in_zt_sampler": Sd15AbarInZtSampler,
                    "ema_warmup": EmaWarmup, "abar_in_bf16": AbarInBF16, "ema_in_bf16": EmaInBF16,
                    "no_zt_rescale": NoZtRescale, "last_step_to_abar0": LastStepToAbar0,
                    "steps_offset_0": StepsOffset0, "cfg_rescale_missing": CfgRescaleMissing}


def _strict(text):
    """json.loads that refuses NaN and Infinity, as JavaScript's JSON.parse does."""
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def _check_json(capsys, *names, flags=()):
    """`zd.py check --json test_zd:NAME …` in this process: (exit status, {object: {quantity: row}}); stdout must be
    strict JSON lines alone."""
    try:
        zd.main(["check", "--json", *flags, *[f"test_zd:{n}" for n in names]])
        status = 0
    except SystemExit as e:
        status = e.code
    out = [_strict(line) for line in capsys.readouterr().out.splitlines()]
    return status, {o["object"].split(":")[1]: {r["quantity"]: r for r in o["rows"]} for o in out}


QUANTITIES = ["prediction", "alphas_cumprod", "loss_weight", "noisy_input", "noisy_input, ξ = 0", "target", "loss",
              *[f"sampling_timesteps({n})" for n in (10, 13, 25, 50)],
              *[f"sampler_step(N = {n})" for n in (10, 13, 25, 50)],
              "cfg(7.5, rescale 0.7)", "cfg(7.5, rescale 0)", "ema_update", "ema_update × 1000"]


def _flagged(rows):
    """{quantity: the mistake a row names, or its verdict} of the rows that are not ok."""
    return {q: r.get("mistake", r["verdict"]) for q, r in rows.items() if r["verdict"] != "ok"}


def test_check_passes_a_correct_trainer(capsys):
    """The recipe written from the papers, in float64, float32, bf16 and fp16 (a low-precision trainer's data and
    model outputs in that dtype, ᾱ, weights, loss and EMA in float32), and on SD1.5's own schedule (ε and v, recognised
    from their ᾱ): every quantity ok at the tolerance of its dtype, exit status 0."""
    names = ("Recipe", "Recipe32", "RecipeBF16", "RecipeFP16", "RecipeSD15", "RecipeSD15V")
    status, rows = _check_json(capsys, *names)
    assert status == 0
    for name, dtype in zip(names, ("float64", "float32", "bfloat16", "float16", "float32", "float32")):
        assert list(rows[name]) == QUANTITIES and all(r["verdict"] == "ok" for r in rows[name].values())
        assert {r.get("dtype") for r in rows[name].values()} == {None, dtype, "int64"} | (
            {"float32"} if dtype in ("bfloat16", "float16") else set())


MISTAKE_ROWS = {"snr_before_rescale": ["loss_weight", "loss"], "min_snr_plus_one": ["loss_weight", "loss"],
                "eps_weight_on_v": ["loss_weight", "loss"], "eps_weight_nan_at_zero_snr": ["loss_weight", "loss"],
                "ip_noise_in_target": ["target", "loss"], "prev_t_stride": ["sampler_step(N = 13)"],
                "leading_spacing_on_zt": [f"sampling_timesteps({n})" for n in (10, 13, 25, 50)],
                "sd15_abar_in_zt_sampler": [f"sampler_step(N = {n})" for n in (10, 13, 25, 50)],
                "ema_warmup": ["ema_update", "ema_update × 1000"],
                "abar_in_bf16": ["noisy_input", "noisy_input, ξ = 0", "target"], "ema_in_bf16": ["ema_update × 1000"],
                "no_zt_rescale": ["alphas_cumprod", "loss_weight", "noisy_input", "noisy_input, ξ = 0", "target",
                                  "loss", *[f"sampler_step(N = {n})" for n in (10, 13, 25, 50)]],
                "last_step_to_abar0": [f"sampler_step(N = {n})" for n in (10, 13, 25, 50)],
                "steps_offset_0": [f"sampling_timesteps({n})" for n in (10, 13, 25, 50)],
                "cfg_rescale_missing": ["cfg(7.5, rescale 0.7)"]}


@pytest.mark.parametrize("mistake", sorted(MISTAKE_ROWS))
def test_check_names_each_known_mistake(mistake, capsys):
    """An adapter carrying one mistake, written from the pitfall list: exactly the rows it touches are flagged, each
    naming that mistake (or, where two mistakes give the same value, naming it as the alternative), and the exit status
    is 1. no_zt_rescale is checked with --schedule zt: alone, its SD1.5 ᾱ would select SD1.5's own check."""
    cls = MISTAKE_ADAPTERS[mistake]
    status, rows = _check_json(capsys, cls.__name__, flags=["--schedule", "zt"] * (mistake == "no_zt_rescale"))
    rows = rows[cls.__name__]
    named = {q: [r.get("mistake")] + r.get("alternatives", []) for q, r in rows.items() if r["verdict"] != "ok"}
    if cls.prediction == "eps" and cls.zero_terminal_snr:
        assert named.pop("prediction") == [None]                        # differs: the recipe is v
    assert status == 1 and list(named) == MISTAKE_ROWS[mistake] and all(mistake in n for n in named.values())


LOW_PRECISION_MISTAKES = {f"{MISTAKE_ADAPTERS[id].__name__}_{d}": (id, type(
    f"{MISTAKE_ADAPTERS[id].__name__}_{d}", (MISTAKE_ADAPTERS[id],), {"dtype": getattr(torch, d)}))
    for id in ("eps_weight_on_v", "ip_noise_in_target", "ema_warmup", "leading_spacing_on_zt", "last_step_to_abar0",
               "cfg_rescale_missing") for d in ("bfloat16", "float16")}
globals().update({name: cls for name, (_, cls) in LOW_PRECISION_MISTAKES.items()})


def test_check_names_mistakes_in_low_precision(capsys):
    """Known mistakes in a bf16 or fp16 trainer are still named at those dtypes' tolerances, and nothing else is
    flagged: rounding is not a difference. Where two mistakes are within a dtype's rounding of each other the row
    names both, the closer first."""
    status, rows = _check_json(capsys, *LOW_PRECISION_MISTAKES)
    assert status == 1
    for name, (id, _) in LOW_PRECISION_MISTAKES.items():
        named = {q: [r.get("mistake")] + r.get("alternatives", []) for q, r in rows[name].items()
                 if r["verdict"] != "ok"}
        assert named and all(id in n for n in named.values()), (name, named)


def test_check_names_guarded_mistakes_and_the_guard(capsys):
    """A mistake whose formula is 0/0 at SNR = 0, with the NaN replaced by a finite value, is still named, and the row
    says which value at which t: the ε weight on a v loss guarded with 1, the ε weight guarded with 0 (the limit is 1).
    The loss built on the guarded weight is named too."""
    status, rows = _check_json(capsys, "EpsWeightOnVGuarded", "EpsWeightGuardedWithZero")
    assert status == 1
    for name, id, value in (("EpsWeightOnVGuarded", "eps_weight_on_v", 1.0),
                            ("EpsWeightGuardedWithZero", "eps_weight_nan_at_zero_snr", 0.0)):
        r = rows[name]["loss_weight"]
        assert r["mistake"] == id and r["guard"] == [{"t": 999, "theirs": value}]
        assert rows[name]["loss"]["mistake"] == id


def test_check_names_two_mistakes_at_once(capsys):
    """Two mistakes in one quantity match the recipe with both formulas changed, and the row names both: leading
    spacing without its offset on a zero-terminal-SNR model; the ε weight on SD1.5's SNR in a v loss."""
    status, rows = _check_json(capsys, "LeadingOffset0OnZt", "EpsWeightOnSd15Snr")
    assert status == 1
    assert _flagged(rows["LeadingOffset0OnZt"]) == {f"sampling_timesteps({n})": "leading_spacing_on_zt + steps_offset_0"
                                                    for n in (10, 13, 25, 50)}
    assert _flagged(rows["EpsWeightOnSd15Snr"]) == {q: "snr_before_rescale + eps_weight_on_v"
                                                    for q in ("loss_weight", "loss")}
    assert rows["EpsWeightOnSd15Snr"]["loss"]["mistakes"] == ["snr_before_rescale", "eps_weight_on_v"]


def test_check_diffusers(capsys):
    """diffusers 0.42.1 passes every quantity except three: DDIM for N = 13 steps to t − 1000//N (prev_t_stride),
    EMAModel's warm-up (ema_warmup), and for an ε model the min-SNR weight is NaN at SNR = 0. In bf16 the same two
    differences, and one more that is not rounding: DDPMScheduler.add_noise and get_velocity cast ᾱ to the latents'
    dtype before the square roots (abar_in_bf16)."""
    status, rows = _check_json(capsys, "Diffusers", "DiffusersEps", "DiffusersBF16")
    assert status == 1
    flagged = {n: _flagged(rows[n]) for n in rows}
    ema = {"ema_update": "ema_warmup", "ema_update × 1000": "ema_warmup"}
    assert flagged == {"Diffusers": {"sampler_step(N = 13)": "prev_t_stride", **ema},
                       "DiffusersEps": {"prediction": "differs", "loss_weight": "eps_weight_nan_at_zero_snr",
                                        "loss": "eps_weight_nan_at_zero_snr", "sampler_step(N = 13)": "prev_t_stride",
                                        **ema},
                       "DiffusersBF16": {"noisy_input": "abar_in_bf16", "noisy_input, ξ = 0": "abar_in_bf16",
                                         "target": "abar_in_bf16", "sampler_step(N = 13)": "prev_t_stride", **ema}}
    assert rows["Diffusers"]["sampler_step(N = 13)"]["first"]["t"] == 999
    assert rows["Diffusers"]["sampler_step(N = 13)"]["worst"]["t"] == 76           # the last step lands on t = 0
    assert rows["DiffusersBF16"]["noisy_input"]["worst"]["t"] in (0, 1)
    assert {r.get("dtype") for r in rows["DiffusersBF16"].values()} == {None, "float32", "bfloat16", "int64"}


class DiffusersSD15(Diffusers):
    """diffusers on SD1.5's scheduler config as shipped: ε, no rescale, leading spacing with steps_offset 1,
    set_alpha_to_one=False."""
    prediction = "eps"

    def __init__(self):
        config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon")
        self.train = DDPMScheduler(**config)
        self.sampler = DDIMScheduler(**config, timestep_spacing="leading", steps_offset=1, clip_sample=False,
                                     set_alpha_to_one=False)


def test_check_sd15_trainers_on_their_own_terms(capsys):
    """SD1.5's schedule is recognised from the adapter's ᾱ and said in the header, with what the zero-terminal-SNR
    recipe would change; diffusers with SD1.5's scheduler config as shipped (leading, steps_offset 1,
    set_alpha_to_one=False) names last_step_to_abar0 and ema_warmup only. --schedule zt holds an SD1.5 trainer to the
    recipe: no_zt_rescale."""
    r = subprocess.run([sys.executable, "zd.py", "check", "test_zd:RecipeSD15"], cwd=HERE, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "test_zd:RecipeSD15: 19 of 19 quantities ok; schedule SD1.5's own" in r.stdout
    assert "recognised from its alphas_cumprod" in r.stdout and "zero-terminal-SNR recipe would rescale" in r.stdout
    status, rows = _check_json(capsys, "DiffusersSD15")
    assert status == 1 and _flagged(rows["DiffusersSD15"]) == {
        **{f"sampler_step(N = {n})": "last_step_to_abar0" for n in (10, 13, 25, 50)},
        "ema_update": "ema_warmup", "ema_update × 1000": "ema_warmup"}
    status, rows = _check_json(capsys, "RecipeSD15", flags=["--schedule", "zt"])
    assert status == 1 and rows["RecipeSD15"]["alphas_cumprod"]["mistake"] == "no_zt_rescale"


class ZdItself:
    """zd's own training and sampling functions, as `zd.py train` and `zd.py sample` call them (not the golden
    formulas): recipe_inputs, weighted_mse, timesteps/prev_timestep/abar_at/ddim_step, guidance,
    ema_update/ema_decay."""
    prediction = "v"

    def __init__(self):
        self.abar = S.alphas_cumprod(S.betas())
        self.snr = S.snr(self.abar)

    def _inputs(self, x0, noise, ip_noise, t):
        return zd.recipe_inputs(x0.float(), noise.float(), ip_noise.float(), t, self.abar, self.snr)

    def alphas_cumprod(self):
        return self.abar

    def loss_weight(self, t):
        zeros = torch.zeros(len(t), 1)
        return self._inputs(zeros, zeros, zeros, t)[2]

    def noisy_input(self, x0, noise, ip_noise, t):
        return self._inputs(x0, noise, ip_noise, t)[0]

    def target(self, x0, noise, ip_noise, t):
        return self._inputs(x0, noise, ip_noise, t)[1]

    def loss(self, model_output, x0, noise, ip_noise, t):
        _, target, weight = self._inputs(x0, noise, ip_noise, t)
        return S.weighted_mse(model_output.float(), target, weight)[0]

    def sampling_timesteps(self, n):
        return S.timesteps(n)

    def sampler_step(self, x_t, model_output, t, n):
        ts = S.timesteps(n)
        prev = S.prev_timestep(ts, ts.tolist().index(t))
        return S.ddim_step(x_t.float(), model_output.float(), self.abar[t], S.abar_at(self.abar, prev), "v")

    def cfg(self, uncond, cond, scale, rescale):
        return S.guidance(uncond.float(), cond.float(), scale, rescale)

    def ema_update(self, ema, param, decay, step):
        ema = [ema.float().clone()]
        S.ema_update(ema, [param.float()], S.ema_decay(step, decay))
        return ema[0]


def test_check_passes_zd_itself(capsys):
    """zd checks itself: its own training and sampling functions, in float32 as `zd.py train` and `sample` run them,
    pass every row."""
    status, rows = _check_json(capsys, "ZdItself")
    assert status == 0 and list(rows["ZdItself"]) == QUANTITIES
    assert all(r["verdict"] == "ok" for r in rows["ZdItself"].values())


DIFFUSERS_DIFFERS = {(d, p): {"sampler_step(N = 13)", "ema_update", "ema_update × 1000",
                             *["loss_weight", "loss"] * (p == "eps"),
                             *["noisy_input", "noisy_input, ξ = 0", "target"] * (d == "bfloat16")}
                     for d in ("float32", "bfloat16") for p in ("v", "eps")}   # test_check_diffusers


def test_tolerances_separate_rounding_from_mistakes():
    """Each dtype's tolerances: correct code in that dtype (the recipe written out again, and diffusers where it is
    right) stays within a fraction of them, and every known mistake exceeds them by a measured factor in a quantity
    where it shows, except where it is within a dtype's rounding (README, Tolerances, names it)."""
    inp = check.inputs()
    correct, shows = {}, {}
    adapters = {"float32": (Recipe32, Diffusers), "bfloat16": (RecipeBF16, DiffusersBF16), "float16": (RecipeFP16,)}
    for dtype, classes in adapters.items():
        for pred in ("v", "eps"):
            settings = check.recipe("zt", pred)
            objs = [type("Adapter", (cls,), {"prediction": pred})() for cls in classes]
            for case in check.check_cases(inp, "zt", pred):
                ref = case.formula(settings)
                tol = check.tolerances(case.name, ref)[dtype]
                if not any(tol):
                    continue
                for obj in objs:
                    if isinstance(obj, Diffusers) and case.quantity in DIFFUSERS_DIFFERS[dtype, pred]:
                        continue                                        # where diffusers is not right
                    with check.serving(case.draws):
                        got = torch.as_tensor(case.call(obj)).reshape(ref.shape).double()
                    correct[dtype] = max(correct.get(dtype, 0), check.ratio(ref, got, tol).max().item())
                for id, changes in check.mistakes(pred):
                    m = case.formula({**settings, **changes})
                    if not check.same(m, ref):
                        shows[dtype, id] = max(shows.get((dtype, id), 0), check.ratio(ref, m, tol).max().item())
    weakest = {d: min((x, id) for (dd, id), x in shows.items() if dd == d) for d in adapters}
    print(correct, weakest)                                 # the README's numbers: pytest -s -k separate
    assert correct["float32"] < 0.25 and correct["bfloat16"] < 0.7 and correct["float16"] < 0.55
    weakest = {d: x for d, (x, _) in weakest.items()}
    unseen = {(d, id) for (d, id), x in shows.items() if x <= 1}
    assert weakest["float32"] > 3000 and weakest["bfloat16"] > 1.2 and weakest["float16"] > 9
    assert not unseen
    assert set(check.MISTAKES) - {id for _, id in shows} == {"leading_spacing_on_zt", "steps_offset_0"}  # timesteps:
    # compared exactly


class _Broken(Recipe32):
    def loss_weight(self, t):
        raise RuntimeError("no weights here")

    def target(self, x0, noise, ip_noise, t):
        return super().target(x0, noise, ip_noise, t)[:3]


class _Partial:
    prediction = "x0"

    def alphas_cumprod(self):
        return Recipe32().abar


def test_check_reports_a_raising_method_in_its_row(capsys):
    """A method that raises, or returns the wrong shape, or a prediction type that is neither v nor ε, is reported in
    its row; the others are still checked, and members an object lacks are skipped."""
    status, rows = _check_json(capsys, "_Broken")
    assert status == 1 and rows["_Broken"]["loss_weight"]["verdict"] == "error"
    assert "RuntimeError: no weights here" in rows["_Broken"]["loss_weight"]["note"]
    assert rows["_Broken"]["target"]["verdict"] == "differs" and "shape" in rows["_Broken"]["target"]["note"]
    assert rows["_Broken"]["loss"]["verdict"] == "error" and rows["_Broken"]["noisy_input"]["verdict"] == "ok"
    status, rows = _check_json(capsys, "_Partial")
    assert status == 1 and rows["_Partial"]["prediction"]["verdict"] == "error"
    assert "'x0' is neither 'v' nor 'eps'" in rows["_Partial"]["prediction"]["note"]
    assert rows["_Partial"]["alphas_cumprod"]["verdict"] == "ok" and len(rows["_Partial"]) == 2


@pytest.mark.parametrize("spec,message", [("test_zd", "is not MODULE:OBJECT"), ("no_such_module:X", "cannot get X"),
                                          ("test_zd:NoSuchAdapter", "cannot get NoSuchAdapter"),
                                          ("missing/file.py:X", "give its path"),
                                          ("test_zd:_NeedsArguments", "no arguments")])
def test_check_user_errors_are_one_line(spec, message, capsys):
    """A mistyped target, an import that fails, a class that needs arguments: one line naming the problem and the
    fix, no traceback."""
    err = refused(capsys, "check", spec)
    assert err.startswith("check: ") and message in err


class _NeedsArguments:
    def __init__(self, scheduler):
        pass


def test_check_cli_exit_status_and_table(tmp_path):
    """The command line on a path/to/file.py:OBJECT: a table, the known mistake explained under it, exit status 1 and
    no traceback; the same adapter corrected exits 0."""
    (tmp_path / "my_adapter.py").write_text(
        "import torch\n\n\nclass Leading:\n    def sampling_timesteps(self, n):\n"
        "        return torch.arange(n - 1, -1, -1) * (1000 // n) + 1\n\n\n"
        "class Trailing:\n    def sampling_timesteps(self, n):\n"
        "        return torch.tensor([round(1000 - i * 1000 / n) - 1 for i in range(n)])\n")
    run = lambda name: subprocess.run([sys.executable, os.path.join(HERE, "zd.py"), "check", f"my_adapter.py:{name}"],
                                      cwd=tmp_path, capture_output=True, text=True)
    r = run("Leading")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "0 of 4 quantities ok" in r.stdout
    assert "sampling_timesteps(13)  int64" in r.stdout and "matches known mistake leading_spacing_on_zt" in r.stdout
    assert "worst difference at [0]: zd 999, theirs 913" in r.stdout and "leading_spacing_on_zt: leading" in r.stdout
    r = run("Trailing")
    assert r.returncode == 0 and "4 of 4 quantities ok" in r.stdout and "not provided: prediction, alphas" in r.stdout


def test_drawn_feeds_a_step_that_draws_its_own_noise():
    """check.drawn: torch.randn_like gives ε then ξ, torch.randint gives t, so a training step that draws its own noise
    (here diffusers' train_text_to_image with --input_perturbation 0.1) reproduces forward.x_t; torch is restored."""
    sched = DDPMScheduler(**SD15, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    with check.drawn() as v:
        latents = v["forward.x0"].float()
        noise = torch.randn_like(latents)
        new_noise = noise + 0.1 * torch.randn_like(noise)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
        x_t = sched.add_noise(latents, new_noise, timesteps)
        with pytest.raises(RuntimeError, match="nothing more"):
            torch.randn(6, 4, 8, 8)
    assert torch.equal(timesteps, v["forward.t"]) and noise.dtype == torch.float32
    torch.testing.assert_close(x_t.double(), check.golden()[0]["forward.x_t"], rtol=1e-5, atol=1e-5)
    with check.drawn(), pytest.raises(RuntimeError, match=r"shape \[2, 4, 8, 8\]; the case holds \[6, 4, 8, 8\]"):
        torch.randn((2, 4, 8, 8))
    assert torch.randn(3).shape == (3,) and torch.randint(0, 5, (2,)).shape == (2,)


@pytest.mark.parametrize("draw,message", [
    (lambda: torch.rand(6), "torch.rand is a draw zd cannot serve"),
    (lambda: torch.rand_like(torch.zeros(6)), "torch.rand_like is a draw"),
    (lambda: torch.randint_like(torch.zeros(6), 1000), "torch.randint_like is a draw"),
    (lambda: torch.randperm(6), "torch.randperm is a draw"),
    (lambda: torch.normal(0.0, 1.0, (6,)), "torch.normal is a draw"),
    (lambda: torch.multinomial(torch.ones(1000), 6), "torch.multinomial is a draw"),
    (lambda: torch.randint(0, 500, (6,)), r"randint\(0, 500\) cannot return the case's t = \[0, 1, 139, 500, 998")])
def test_drawn_refuses_a_draw_it_cannot_serve(draw, message):
    """check.drawn intercepts exactly torch.randint, randn and randn_like; the other draws a step might make, and a
    randint whose range cannot hold the t (indices into a trainer's own table of 500 timesteps), raise a clear error,
    and torch is restored after."""
    with check.drawn(), pytest.raises(RuntimeError, match=message):
        draw()
    assert torch.rand(2).shape == (2,) and torch.multinomial(torch.ones(3), 2).shape == (2,)


class DrawsItsOwnNoise:
    """The README's pattern: a training step that draws ε, ξ and t itself, run inside check.drawn()."""
    prediction = "v"

    def __init__(self):
        self.scheduler = DDPMScheduler(**SD15, rescale_betas_zero_snr=True, prediction_type="v_prediction")

    def _step(self, x0):                                                # the trainer's own step, verbatim
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, 1000, (x0.shape[0],))
        noisy = self.scheduler.add_noise(x0, noise + 0.1 * torch.randn_like(x0), timesteps)
        return noisy, self.scheduler.get_velocity(x0, noise, timesteps)

    def noisy_input(self, x0, noise, ip_noise, t):
        with check.drawn():
            return self._step(x0.float())[0]

    def target(self, x0, noise, ip_noise, t):
        with check.drawn():
            return self._step(x0.float())[1]


def test_check_an_adapter_that_draws_its_own_noise(capsys):
    """An adapter written as the README's "A trainer that draws its own noise" shows passes every row, the ξ = 0 one
    included: within a check call drawn() serves that call's inputs (ξ = 0 gets zeros)."""
    status, rows = _check_json(capsys, "DrawsItsOwnNoise")
    assert status == 0 and list(rows["DrawsItsOwnNoise"]) == ["prediction", "noisy_input", "noisy_input, ξ = 0",
                                                              "target"]


class WithoutIpNoiseOrEma(Recipe32):
    """A trainer that declares it has no input perturbation, no min-SNR weighting and no EMA."""
    ip_noise_gamma, min_snr_gamma, ema = 0, 0, None

    def noisy_input(self, x0, noise, ip_noise, t):
        return super().noisy_input(x0, noise, torch.zeros_like(ip_noise), t)

    def loss_weight(self, t):
        return torch.ones(len(t))


class _Chatty(Recipe32):
    def alphas_cumprod(self):
        print("loading the scheduler… NaN")
        return super().alphas_cumprod()


def test_check_reports_absent_features_strict_json_and_tracebacks(capsys, tmp_path):
    """Members such as ip_noise_gamma = 0, min_snr_gamma = 0 and ema = None declare a feature absent: its rows say "not
    in this trainer" and do not fail, and the loss is checked with every sample weighing 1. --json is strict JSON (NaN as null) alone on stdout, what the adapter prints goes to stderr;
    --debug shows the traceback of a member that raised."""
    status, rows = _check_json(capsys, "WithoutIpNoiseOrEma")
    verdicts = {q: r["verdict"] for q, r in rows["WithoutIpNoiseOrEma"].items() if r["verdict"] != "ok"}
    assert status == 0 and verdicts == {"noisy_input": "absent", "loss_weight": "absent", "ema_update": "absent",
                                        "ema_update × 1000": "absent"}
    assert rows["WithoutIpNoiseOrEma"]["noisy_input, ξ = 0"]["verdict"] == "ok"
    r = subprocess.run([sys.executable, "zd.py", "check", "--json", "test_zd:_Chatty", "test_zd:DiffusersEps"],
                       cwd=HERE, capture_output=True, text=True)
    lines = [_strict(x) for x in r.stdout.splitlines()]
    assert r.returncode == 1 and len(lines) == 2 and "loading the scheduler" in r.stderr
    eps = {row["quantity"]: row for row in lines[1]["rows"]}["loss_weight"]
    assert eps["max_abs"] is None and eps["worst"]["theirs"] is None and eps["nan"] == [
        {"index": [999], "t": 999, "side": "theirs"}]
    r = subprocess.run([sys.executable, "zd.py", "--debug", "check", "test_zd:_Broken"], cwd=HERE, capture_output=True,
                       text=True)
    assert "Traceback (most recent call last)" in r.stdout and 'raise RuntimeError("no weights here")' in r.stdout
    r = subprocess.run([sys.executable, "zd.py", "check", "test_zd:_Broken"], cwd=HERE, capture_output=True, text=True)
    assert "Traceback" not in r.stdout + r.stderr and "raised RuntimeError: no weights here" in r.stdout


def test_check_template_is_an_adapter(tmp_path):
    """`zd.py check --template` prints a commented adapter with every member of the protocol; saved as a file, it
    loads and is checked (each member raising NotImplementedError until filled in)."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "zd.py"), "check", "--template"], capture_output=True,
                       text=True, check=True)
    (tmp_path / "my_adapter.py").write_text(r.stdout)
    for member in check.PROTOCOL:
        assert re.search(rf"\n    (def {member}\(self|{member} = )", r.stdout), member
    r = subprocess.run([sys.executable, os.path.join(HERE, "zd.py"), "check", "my_adapter.py:ZdAdapter"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "1 of 19 quantities ok" in r.stdout and "raised NotImplementedError" in r.stdout


def _readme_block(after):
    """The first ```python block of README.md after the line that starts with `after`."""
    text = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    text = text[text.index(after):]
    return text[text.index("```python\n") + 10:text.index("```\n", text.index("```python\n") + 10)]


def test_readme_names_code_that_exists():
    """The reading path holds: every `module.name` the README points a reader to (its "Reading the code" section and
    the code columns of the recipe and sampling tables) is a function, class or constant of that file, and zd.py's
    `train` starts within its first 200 lines."""
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    reading = readme[readme.index("## Reading the code"):readme.index("\n## ", readme.index("## Reading the code"))]
    code_cells, column = [], None
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")] if line.startswith("|") else None
        column = None if cells is None else cells.index("code") if "code" in cells else column
        if cells and column is not None:
            code_cells.append(cells[column])
    modules = {"zd": zd, "schedule": S, "data": data, "model": model, "check": check}
    named = set(re.findall(r"`((?:zd|schedule|data|model|check)\.(?!py`)[\w.]+)`", " ".join(code_cells)))
    for item in re.split(r"\n\d\. ", reading)[1:]:   # "2. **`zd.py`, from the top:** … `sample_noise` …"
        file = re.match(r"\*\*`(\w+)\.py", item)[1]
        named |= {n if n.split(".")[0] in modules else f"{file}.{n}" for n in re.findall(r"`([A-Za-z_][\w.]*)`", item)
                  if not n.endswith(".py")}
    assert len(code_cells) > 12 and len(named) > 30
    for name in named:
        module, *path = name.split(".")
        assert functools.reduce(getattr, path, modules[module]) is not None, name
    assert zd.train.__code__.co_firstlineno <= 200


def test_readme_pitfalls_name_tests_that_exist():
    """Each of the README's numbered pitfalls names at least one test that guards it, and every test named there is a
    test of this file."""
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Pitfalls this implementation"):]
    items = re.split(r"\n(?=\d+\. )", section[:section.index("\n\n`ZD_FULL")])[1:]
    assert [int(item.split(".")[0]) for item in items] == list(range(1, 12))
    for item in items:
        tests = re.findall(r"`(test_\w+)`", item)
        assert tests, item
        assert all(callable(globals().get(name)) for name in tests), tests


def test_check_imports_only_schedule():
    """check.py stands alone for a trainer author's test suite: importing it loads schedule.py, torch and safetensors,
    and none of zd, model, data, PIL or tokenizers (nor zd's OMP_WAIT_POLICY)."""
    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); import check; "
            "print(sorted({'zd', 'model', 'data', 'bench', 'PIL', 'tokenizers'} & set(sys.modules)), "
            "'schedule' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True", "None"]


def test_readme_s_small_sd15_layout_model_trains_on_photos(tmp_path):
    """The README's two commands to try the real path without SD1.5's 4 GB, verbatim but for the photos' folder and a
    shorter run: they write a model of SD1.5's layout and train it on the photos, VAE and CLIP included."""
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    text = readme[readme.index("**Trying the real path without SD1.5's 4 GB.**"):]
    block = textwrap.dedent(text[text.index("\n    python") + 1:text.index("\n\n", text.index("\n    python"))])
    (tmp_path / "photos").mkdir()
    for i in range(2):
        Image.new("RGB", (200, 150), (40 * i, 90, 200)).save(tmp_path / "photos" / f"{i}.jpg")
    script = re.sub(r"^python ", f"{sys.executable} ", block, flags=re.M).replace("zd.py", os.path.join(HERE, "zd.py"))
    script = script.replace("/data/photos", "photos") + " --steps 1 --batch-size 2 --workers 0 --sample-every 0"
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": HERE},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and block.count("python ") == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "train: step 1: wrote runs/try/model.safetensors" in run.stdout
    assert model.load(tmp_path / "runs" / "try" / "model_ema.safetensors").vae.cfg == model.VAEConfig.tiny()


def test_readme_snippet_runs_verbatim(tmp_path, monkeypatch):
    """README's snippet for a trainer's own test passes, verbatim, on diffusers' float32 scheduler."""
    monkeypatch.chdir(tmp_path)
    zd.main(["vectors"])
    exec(compile(_readme_block("### The vectors in your own tests"), "README.md", "exec"), {})


def test_readme_shows_the_diffusers_adapter_and_its_table(capsys):
    """README shows the adapters above verbatim, and its table's verdicts are those `zd.py check` prints now."""
    import inspect
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    assert "\n\n".join(inspect.getsource(c) for c in (Diffusers, DiffusersEps, DiffusersBF16)) in readme
    with pytest.raises(SystemExit):
        zd.main(["check", "test_zd:Diffusers"])
    lines = readme[readme.index("    $ python zd.py check test_zd:Diffusers\n"):].splitlines()[1:]
    shown = "\n".join(x[4:] for x in lines[:next(i for i, x in enumerate(lines) if not x.startswith("    "))])
    rows = lambda text: [(x[2:25].strip(), x[69:]) for x in text.splitlines() if x[2:25].strip() in QUANTITIES]
    assert len(rows(shown)) == len(QUANTITIES) and rows(shown) == rows(capsys.readouterr().out)


def test_schedule_cli(capsys):
    zd.main(["schedule", "--steps", "13"])
    out = capsys.readouterr().out
    assert "[999, 922, 845" in out and "zero terminal SNR" in out
    zd.main(["schedule", "--csv", "--no-zt"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1001 and lines[0].startswith("t,beta,abar")
    assert float(lines[-1].split(",")[2]) == pytest.approx(0.0046601, rel=1e-4)


def test_cli_help_lists_every_subcommand(capsys):
    """`zd.py --help` lists the ten subcommands, each with a line saying what it does; `zd.py COMMAND --help` of each
    exits 0 with its usage and a description of what it does (the docstring of the function it runs, for train
    TRAIN_HELP)."""
    out = subprocess.run([sys.executable, "zd.py", "--help"], cwd=HERE, capture_output=True, text=True, check=True).stdout
    commands = ["train", "demo", "sample", "schedule", "vectors", "check", "convert", "merge", "inspect", "data", "cache"]
    assert re.findall(r"^    (\w+) +\w", out, re.M) == commands
    sub = next(a for a in zd.parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for c in commands:
        with pytest.raises(SystemExit) as e:
            zd.main([c, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        doc = zd.TRAIN_HELP if c == "train" else sub[c].get_default("func").__doc__
        assert e.value.code == 0 and text.startswith(f"usage: zd.py {c} ") and " ".join(doc.split())[:60] in text, c


# ---- data.py: sources, buckets, crops, dropout, masks ----

# Three buckets of ≈32² (24×40, 32×32, 40×24) for DemoSource's 64–96 px images: small enough that a test decodes
# thousands of images in seconds, and more than one, so that batches come from several buckets.
TINY = dict(bucket_area=32 * 32, bucket_min=24, bucket_max=40, bucket_step=8)


def _data_png(size=(8, 8), colour=(200, 30, 30)):
    b = io.BytesIO()
    Image.new("RGB", size, colour).save(b, "PNG")
    return b.getvalue()


def _data_noise_jpeg(size, seed=0):
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        b, "JPEG", quality=90)
    return b.getvalue()


def _data_shard(path, samples):
    """A tar shard in img2dataset layout: samples = [(key, {ext: bytes})]."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, raw in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    return str(path)


def _data_take(it, n):
    return [next(it) for _ in range(n)]


def test_buckets_are_the_five_zd_buckets():
    assert data.buckets() == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert len(data.buckets(**{"area": 32 * 32, "min_side": 24, "max_side": 40, "step": 8})) == 3  # the demo's


@pytest.mark.parametrize("w, h, bucket", [
    (1024, 1024, (512, 512)), (1130, 1000, (512, 512)), (1140, 1000, (576, 448)),  # log boundary: ratio 1.134
    (1280, 1024, (576, 448)), (1024, 1280, (448, 576)), (1920, 1080, (640, 384)), (1080, 1920, (384, 640)),
    (1500, 1000, (640, 384)), (1000, 1500, (384, 640)), (3000, 1000, (640, 384)), (1000, 3000, (384, 640)),
    (1200, 1000, (576, 448)), (1000, 1200, (448, 576)), (1, 1, (512, 512)), (20000, 10, (640, 384))])
def test_bucket_for_table_and_transpose_symmetry(w, h, bucket):
    bkts = data.buckets()
    assert data.bucket_for(w, h, bkts) == bucket
    assert data.bucket_for(h, w, bkts) == bucket[::-1]


def test_linear_aspect_metric_would_not_be_transpose_symmetric():
    """The README's counterexample (Buckets), as the reason for the log metric: |w/h − bw/bh| sends 1140×1000 to
    512×512 but 1000×1140 to 448×576."""
    def linear(w, h):
        return min(data.buckets(), key=lambda b: abs(w / h - b[0] / b[1]))
    assert linear(1140, 1000) == (512, 512) and linear(1000, 1140) == (448, 576)
    assert data.bucket_for(1140, 1000, data.buckets()) == data.bucket_for(1000, 1140, data.buckets())[::-1]


@pytest.mark.parametrize("w, h", [(1, 1), (20000, 10), (10, 20000), (1537, 1024), (700, 1300), (64, 64),
                                  (1207, 2009), (47, 79)])  # the last two: the crop width rounds to w + 1 ulp
def test_crops_keep_the_bucket_size_exactly(w, h):
    src = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(src, "PNG")
    size = data.bucket_for(w, h, data.buckets())
    for u, v in [(0.5, 0.5), (0.0, 1.0), (0.999, 0.001)]:
        img = data.load_image(src.getvalue(), size, u, v)
        assert img.size == size and img.mode == "RGB"
        assert np.abs(np.asarray(img, dtype=int) - (10, 200, 30)).max() <= 1


def test_crop_offset_selects_the_right_part():
    half = Image.new("RGB", (200, 100), (255, 0, 0))
    half.paste((0, 0, 255), (100, 0, 200, 100))  # left red, right blue; square bucket sees one half or the middle
    raw = io.BytesIO()
    half.save(raw, "PNG")
    left, right = (data.load_image(raw.getvalue(), (32, 32), u, 0.5) for u in (0.0, 1.0))
    # Lanczos reads a few pixels beyond the crop box, so the column next to the cut may ring
    assert np.asarray(left)[:, :-2, 0].min() > 250 and np.asarray(right)[:, 2:, 2].min() > 250


def test_demo_source_black_and_white_are_common_and_exact():
    items = data.DemoSource(n=400, seed=1).items()
    captions = Counter(it.caption for it in items)
    assert captions["a plain black image"] > 50 and captions["a plain white image"] > 50   # 18% each: 73 ± 8
    assert len({data.bucket_for(it.w, it.h, data.buckets(32 * 32, 24, 40, 8)) for it in items}) == 3
    loader = data.Loader([data.DemoSource(n=400, seed=1)], 16, workers=0, caption_dropout=0.0, **TINY)
    batch = next(loader.batches())
    for px, cap in zip(batch["pixels"], batch["captions"]):
        if cap == "a plain black image":
            assert (px == -1).all()
        if cap == "a plain white image":
            assert (px == 1).all()


def test_caption_dropout_rate_and_visibility():
    loader = data.Loader([data.DemoSource(n=3000)], 50, workers=0, caption_dropout=0.1, **TINY)
    dropped = total = 0
    for batch in _data_take(loader.batches(), loader.batches_per_epoch):
        d = batch["dropped"]
        assert all((c == "") == bool(x) for c, x in zip(batch["captions"], d))  # no demo caption is empty
        dropped, total = dropped + int(d.sum()), total + len(d)
    assert abs(dropped / total - 0.1) < 0.015  # binomial sd ≈ 0.0055 at n ≈ 3000


def test_batches_are_one_bucket_reproducible_and_seeded():
    def first(seed):
        loader = data.Loader([data.DemoSource(n=300)], 8, seed=seed, workers=0, **TINY)
        return _data_take(loader.batches(), 5)
    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["pixels"], y["pixels"])
        assert x["captions"] == y["captions"]
    assert any(not torch.equal(x["index"], z["index"]) for x, z in zip(a, c))


def test_global_batch_does_not_depend_on_world_size():
    src = data.DemoSource(n=300)
    kw = dict(seed=3, workers=0, flip=True, random_crop=True, inpaint=True, **TINY)
    one = _data_take(data.Loader([src], 8, **kw).batches(), 6)
    two = [_data_take(data.Loader([src], 4, rank=r, world_size=2, **kw).batches(), 6) for r in (0, 1)]
    for k, whole in enumerate(one):
        for key in ("index", "pixels", "dropped", "mask", "masked_pixels"):
            assert torch.equal(whole[key], torch.cat([two[0][k][key], two[1][k][key]])), key
        assert whole["captions"] == two[0][k]["captions"] + two[1][k]["captions"]


def test_epoch_drops_incomplete_batches_and_sees_each_image_once():
    loader = data.Loader([data.DemoSource(n=300)], 8, workers=0, **TINY)
    epoch = _data_take(loader.batches(), loader.batches_per_epoch)
    seen = torch.cat([b["index"] for b in epoch]).tolist()
    assert len(seen) == len(set(seen)) == 300 - loader.stats["dropped_incomplete_per_epoch"]
    assert {b["epoch"] for b in epoch} == {0} and [b["position"] for b in epoch] == list(range(len(epoch)))
    assert next(loader.batches(start=len(epoch)))["epoch"] == 1


def test_resume_skips_without_decoding(monkeypatch):
    loader = data.Loader([data.DemoSource(n=300)], 8, workers=0, **TINY)
    reference = _data_take(loader.batches(), 40)[37]
    calls = []
    decode = data.load_image
    monkeypatch.setattr(data, "load_image", lambda *a: calls.append(1) or decode(*a))
    resumed = next(loader.batches(start=37))
    assert len(calls) == 8 and resumed["position"] == 37
    assert torch.equal(resumed["pixels"], reference["pixels"]) and resumed["captions"] == reference["captions"]


def test_two_workers_give_the_same_batches_as_none():
    src = data.DemoSource(n=200)
    a = _data_take(data.Loader([src], 8, workers=0, **TINY).batches(start=5), 6)
    b = _data_take(data.Loader([src], 8, workers=2, **TINY).batches(start=5), 6)
    assert all(torch.equal(x["pixels"], y["pixels"]) and x["position"] == y["position"] for x, y in zip(a, b))


def test_inpaint_masks():
    loader = data.Loader([data.DemoSource(n=200)], 8, workers=0, inpaint=True, **TINY)
    batch = next(loader.batches())
    B, _, H, W = batch["pixels"].shape
    assert batch["mask"].shape == (B, 1, H, W) and set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(batch["masked_pixels"], batch["pixels"] * (batch["mask"] < 0.5))
    masks = [data.inpaint_mask(64, 48, np.random.default_rng(i)) for i in range(400)]
    full = sum(bool(m.all()) for m in masks) / len(masks)
    assert abs(full - 0.25) < 0.07 and all(m.shape == (1, 48, 64) for m in masks)
    partial = [m.mean().item() for m in masks if not m.all()]
    assert 0 < min(partial) and max(partial) < 1  # strokes and boxes: some, never all, of the image


def test_inpaint_input_is_sd_inpaintings_nine_channels():
    """zd.inpaint_input, which train and generate both call: [x_t, the mask nearest-downsampled (each 8×8 block's
    top-left pixel), the masked image's latent], SD-inpainting's order; one image's mask and latent serve a batch."""
    x_t, masked = torch.randn(3, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mask = (torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    out = zd.inpaint_input(x_t, mask, masked)
    assert out.shape == (3, 9, 8, 8) and torch.equal(out[:, :4], x_t)
    assert torch.equal(out[:, 4:5], mask[..., ::8, ::8].expand(3, -1, -1, -1))
    assert torch.equal(out[:, 5:], masked.expand(3, -1, -1, -1))


# Robustness: files the tests write themselves.

def _data_bomb_png(w, h):
    """A valid 1×1 PNG whose header claims w×h: PIL must refuse it from the header, before decoding."""
    raw = bytearray(_data_png((1, 1)))
    raw[16:24] = struct.pack(">II", w, h)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def _data_write_odd_files(folder):
    """One file per hazard of issue 4, each named by the hazard; returns the expected bad reasons."""
    folder.mkdir(exist_ok=True)
    (folder / "truncated.jpg").write_bytes(_data_noise_jpeg((64, 64))[:700])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notimage.png").write_bytes(b"<html>404 not found</html>")
    (folder / "bomb.png").write_bytes(_data_bomb_png(30000, 30000))
    (folder / "bomb2.png").write_bytes(_data_bomb_png(10000, 10000))  # over MAX_PIXELS, under PIL's hard error
    (folder / "good.png").write_bytes(_data_png((40, 40)))
    (folder / "tiny.png").write_bytes(_data_png((1, 1)))
    (folder / "long.png").write_bytes(_data_png((20000, 10)))
    return {"corrupt": 1, "empty file": 1, "not an image": 1, "decompression bomb": 2}


def test_bad_files_are_skipped_counted_and_the_run_goes_on(tmp_path, capsys):
    expected = _data_write_odd_files(tmp_path / "odd")
    loader = data.Loader([str(tmp_path / "odd")], 1, workers=0, min_side=1, **TINY)
    out = capsys.readouterr().out
    assert "bomb.png" in out and "zero.jpg" in out and "notimage.png" in out
    # the truncated JPEG passes the header check: it fails at decode, inside a batch, and is counted then
    assert loader.batches_per_epoch == 4  # truncated, good, tiny, long
    batches = _data_take(loader.batches(), 8)  # two epochs: the bad file is counted and named once
    assert all(b["pixels"].shape[0] == 1 for b in batches)
    assert dict(loader.stats["bad_files"]) == expected
    # with batch size 1 the truncated file's batch has nothing to stand in for it: skipped, and said so each time
    positions = [b["position"] for b in batches]
    skipped = sorted(set(range(positions[-1])) - set(positions))
    out = capsys.readouterr().out
    assert out.count("truncated.jpg") == 1 and out.count("no decodable image") == len(skipped) >= 2


def test_undecodable_file_is_replaced_in_its_batch(tmp_path):
    _data_write_odd_files(tmp_path / "odd")
    loader = data.Loader([str(tmp_path / "odd")], 4, workers=0, min_side=1, bucket_area=32 * 32, bucket_min=32,
                         bucket_max=32, bucket_step=8)  # one bucket: all four decodable-by-header files in a batch
    batch = next(loader.batches())
    assert batch["pixels"].shape[0] == 4 and len(set(batch["index"].tolist())) == 3
    assert loader.stats["bad_files"]["corrupt"] == 1


def test_min_side_filter_uses_original_size_from_json(tmp_path):
    (tmp_path / "small.png").write_bytes(_data_png((300, 200)))
    (tmp_path / "resized.png").write_bytes(_data_png((300, 200)))  # img2dataset-style copy of a 1536×1024 original
    (tmp_path / "resized.json").write_text(json.dumps({"original_width": 1536, "original_height": 1024}))
    (tmp_path / "big.jpg").write_bytes(_data_noise_jpeg((1100, 1024)))
    (tmp_path / "big.txt").write_text("a photo")
    loader = data.Loader([str(tmp_path)], 1, workers=0)
    assert (loader.stats["kept"], loader.stats["dropped"]["min-side"], loader.stats["missing_captions"]) == (2, 1, 1)
    assert sorted(b["captions"][0] for b in _data_take(loader.batches(), 2)) in (["", "a photo"],)


def _data_mode_images():
    """(name, PIL image, format, expected RGB of the result) for the PIL modes issue 4 names."""
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 250, 20, 20] + [0] * 762)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 1  # index 1 transparent → white
    grey16 = Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16))  # mid grey, not clipped white
    return [("palette", pal, "PNG", (250, 20, 20)), ("palette-transparent", pal_t, "PNG", (255, 255, 255)),
            ("LA", Image.new("LA", (16, 16), (0, 0)), "PNG", (255, 255, 255)),
            ("RGBA", Image.new("RGBA", (16, 16), (255, 0, 0, 128)), "PNG", (255, 127, 127)),
            ("16-bit", grey16, "PNG", (128, 128, 128)),
            ("CMYK", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", (255, 0, 0))]


@pytest.mark.parametrize("name, img, fmt, rgb", _data_mode_images(), ids=[m[0] for m in _data_mode_images()])
def test_image_modes_come_out_rgb(name, img, fmt, rgb):
    raw = io.BytesIO()
    img.save(raw, fmt, **({"transparency": 1} if name == "palette-transparent" else {}))
    out = data.load_image(raw.getvalue(), (8, 8))
    assert out.mode == "RGB" and np.abs(np.asarray(out, dtype=int) - rgb).max() <= 4


def test_exif_rotated_jpeg_comes_out_upright():
    stored = Image.new("RGB", (64, 32), (255, 0, 0))
    stored.paste((0, 0, 255), (32, 0, 64, 32))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90° clockwise: left → top
    raw = io.BytesIO()
    stored.save(raw, "JPEG", exif=exif, quality=95)
    assert data.upright_size(data.open_image(raw.getvalue())) == (32, 64)
    out = np.asarray(data.load_image(raw.getvalue(), (16, 32)), dtype=int)
    assert out[:12, :, 0].min() > 200 and out[-12:, :, 2].min() > 200


def test_captions_in_odd_encodings_and_long_captions(tmp_path):
    text = "café crème à la plage"
    (tmp_path / "a.png").write_bytes(_data_png())
    (tmp_path / "a.txt").write_bytes(text.encode("latin-1"))
    (tmp_path / "b.png").write_bytes(_data_png())
    (tmp_path / "b.txt").write_bytes(text.encode("utf-16"))  # with BOM
    (tmp_path / "c.png").write_bytes(_data_png())
    (tmp_path / "c.caption").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8") + b"\r\n")
    long = " ".join(["a very long caption"] * 40)  # ≈ 160 tokens: kept whole, the tokenizer truncates
    (tmp_path / "d.png").write_bytes(_data_png())
    (tmp_path / "d.json").write_text(json.dumps({"caption": long}))
    items, _ = data.scan_folder(str(tmp_path), data.Filters(1), data.new_stats(), None)
    assert [it.caption for it in items] == [text] * 3 + [long]


def test_binary_captions_are_counted_and_skipped(tmp_path, capsys):
    """Captions that are not text (random bytes, a JPEG's first 2 kB, NULs) are not trained on as Latin-1 mojibake:
    `zd.py data` counts and names them; Windows-1252 text still decodes."""
    captions = {"good": "“quoted” café".encode("cp1252"), "random": np.random.default_rng(0).bytes(200),
                "jpeg": _data_noise_jpeg((64, 64))[:2048], "nul": b"\x00" * 64}
    for name, raw in captions.items():
        (tmp_path / f"{name}.png").write_bytes(_data_png())
        (tmp_path / f"{name}.txt").write_bytes(raw)
    zd.main(["data", "--data", str(tmp_path), "--json", "--min-side", "1", "--batch-size", "1", "--sheet", "",
             *TINY_FLAGS])
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["kept"] == 1 and report["dropped"]["binary caption"] == 3, report
    assert re.search(r"skipped .*random\.png: binary caption: \d+ control characters", out.err)
    assert "nul.png: binary caption: only NULs" in out.err
    assert data.decode_caption(captions["good"]) == "“quoted” café"


def test_tar_shard_cut_mid_member_keeps_the_good_samples(tmp_path):
    samples = [(f"{k:05d}", {"jpg": _data_noise_jpeg((40, 40), k), "txt": f"sample {k}".encode()}) for k in range(4)]
    path = _data_shard(tmp_path / "00000.tar", samples)
    raw = open(path, "rb").read()
    cut = raw.index(b"00002.jpg") + 512 + 300  # 300 bytes into the third sample's image (after its 512-byte header)
    open(path, "wb").write(raw[:cut])
    warned = []
    got = list(data.read_shard(path, lambda name, e: warned.append(e.reason)))
    assert [k for k, _ in got] == ["00000", "00001"] and warned == ["truncated shard"]
    loader = data.Loader([path], 1, workers=0, min_side=1, caption_dropout=0, **TINY)
    batches = _data_take(loader.batches(), 4)
    assert sorted(b["captions"][0] for b in batches[:2]) == ["sample 0", "sample 1"]
    assert loader.stats["kept"] == 2 and loader.stats["bad_files"]["truncated shard"] == 1


def _data_shards(tmp_path, n_shards, per_shard):
    paths = []
    for s in range(n_shards):
        samples = []
        for k in range(per_shard):
            size = [(16, 16), (24, 40), (40, 24)][k % 3]
            meta = {"caption": f"s{s}k{k}", "original_width": 2000, "original_height": 1500}
            samples.append((f"{s:03d}{k:04d}", {"png": _data_png(size), "json": json.dumps(meta).encode()}))
        paths.append(_data_shard(tmp_path / f"{s:05d}.tar", samples))
    return paths


@pytest.mark.parametrize("n_shards", [7, 2])  # more shards than readers, and fewer (every reader strides samples)
def test_shard_split_over_2_ranks_x_2_workers_sees_each_sample_once(tmp_path, n_shards):
    _data_shards(tmp_path, n_shards, 6)
    shards = data.expand_shards([str(tmp_path / "*.tar")])
    opts = dict(seed=0, caption_dropout=0, flip=False, random_crop=False, inpaint=False)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            stream = data.ShardStream(shards, data.buckets(**{"area": 1024, "min_side": 24, "max_side": 40,
                                                               "step": 8}), 2, rank, 2, data.Filters(1024), opts)
            for worker in (0, 1):
                seen += [i for i, _ in stream.samples(epoch, rank * 2 + worker, 4, data.new_stats(), None)]
        assert sorted(seen) == sorted((s << 32) + k for s in range(n_shards) for k in range(6))


def test_shard_loader_with_two_workers_resumes_at_a_position(tmp_path):
    _data_shards(tmp_path, 4, 6)
    loader = data.Loader([str(tmp_path / "*.tar")], 2, workers=2, min_side=1024, **TINY)
    run = _data_take(loader.batches(), 8)
    assert [b["position"] for b in run] == list(range(8))
    assert all(len({data.bucket_for(*b["pixels"].shape[:1:-1], data.buckets(**{"area": 1024, "min_side": 24,
                                                                                "max_side": 40, "step": 8}))}) == 1
               for b in run)
    resumed = _data_take(loader.batches(start=5), 3)
    assert [b["index"].tolist() for b in resumed] == [b["index"].tolist() for b in run[5:]]
    assert loader.stats["kept"] >= 12 and loader.stats["missing_captions"] == 0


# Score filters, the scan and its cache, `zd.py data`.

# Samples whose json carries LAION's three scores, with the key cases and broken values met in the wild. Each json
# also gets an original size of 2000×1500 (h overrides it); i (no json) and j (a cut-off json, so read as none) have
# no original size, so their 1100×1100 headers are read instead. The rest are 16×16 PNGs.
_DATA_SCORED = {
    "a": '{"AESTHETIC_SCORE": 6.1, "pwatermark": 0.1, "punsafe": 0.01}',
    "b": '{"aesthetic": 4.2, "pwatermark": 0.05, "punsafe": 0.02}',
    "c": '{"Aesthetic_Score": 5.0, "PWATERMARK": 0.9, "punsafe": 0}',  # 5.0 passes ≥ 5
    "d": '{"aesthetic_score": 7, "pwatermark": 0.2, "PUNSAFE": 0.6}',
    "e": '{"pwatermark": 0.3, "punsafe": 0.1}',  # no aesthetic score
    "f": '{"aesthetic": "n/a", "pwatermark": null, "punsafe": "0.05"}',  # a number in a string is a number
    "g": '{"aesthetic": true, "pwatermark": [0.1], "punsafe": NaN}',
    "h": '{"aesthetic": 6.5, "pwatermark": 0.1, "punsafe": 0, "original_width": 800, "original_height": 600}',
    "i": None,
    "j": '{"aesthetic": 9, ',
    "k": '{"aesthetic": 3.0, "pwatermark": 0.95, "punsafe": 0.9}',  # fails all three: counted once, as min-aesthetic
    "m": '{"pwatermark": 0.7}',  # fails one filter, lacks the others' scores: counted as that filter's
}
# (min_aesthetic, max_watermark, max_unsafe, drop_unscored) → kept, kept without a score an active filter reads, and
# dropped by the score filters; h is dropped by min-side in every case, before its scores are read.
_DATA_FILTER_CASES = [
    ((None, None, None, False), 11, 0, {}),
    ((5, None, None, False), 9, 6, {"min-aesthetic": 2}),
    ((None, 0.5, None, False), 8, 4, {"max-watermark": 3}),
    ((None, None, 0.5, False), 9, 4, {"max-unsafe": 2}),
    ((5, 0.5, 0.5, False), 6, 5, {"min-aesthetic": 2, "max-watermark": 2, "max-unsafe": 1}),
    ((5, 0.5, 0.5, True), 1, 0, {"min-aesthetic": 2, "max-watermark": 2, "max-unsafe": 1, "unscored": 5}),
    ((5, None, None, True), 3, 0, {"min-aesthetic": 2, "unscored": 6}),
    ((None, None, None, True), 11, 0, {}),
]
TINY_FLAGS = ["--bucket-area", "1024", "--bucket-min", "24", "--bucket-max", "40", "--bucket-step", "8"]  # TINY


def _data_scored_files():
    """{key: {ext: bytes}} of the _DATA_SCORED samples, plus l, whose image is not one."""
    samples = {}
    for key, text in _DATA_SCORED.items():
        files = {"png": _data_png((1100, 1100) if key in "ij" else (16, 16)), "txt": f"caption of {key}".encode()}
        if text is not None:
            files["json"] = text.replace("{", '{"original_width": 2000, "original_height": 1500, ', 1).encode()
        samples[key] = files
    samples["l"] = {"jpg": b"<html>404 not found</html>", "txt": b"caption of l"}
    return samples


def _data_scored_folder(folder):
    folder.mkdir()
    for key, files in _data_scored_files().items():
        for ext, raw in files.items():
            (folder / f"{key}.{ext}").write_bytes(raw)
    return str(folder)


def _data_scored_shard(path):
    """The same samples as a shard, and n, a sample without an image."""
    return _data_shard(path, list(_data_scored_files().items()) + [("n", {"txt": b"caption of n"})])


@pytest.mark.parametrize("flags, kept, unscored, dropped", _DATA_FILTER_CASES)
def test_score_filters_count_each_sample_once_in_folders_and_shards(tmp_path, flags, kept, unscored, dropped):
    kw = dict(zip(("min_aesthetic", "max_watermark", "max_unsafe", "drop_unscored"), flags), workers=0, **TINY)
    loader = data.Loader([_data_scored_folder(tmp_path / "f")], 1, **kw)
    assert (loader.stats["kept"], loader.stats["unscored"]) == (kept, unscored)
    assert {r: n for r, n in loader.stats["dropped"].items() if n} == {"min-side": 1, **dropped}
    assert dict(loader.stats["bad_files"]) == {"not an image": 1}
    report = data.survey(data.Loader([_data_scored_shard(tmp_path / "s.tar")], 1, **kw))
    assert (report["found"], report["kept"], report["unscored"]) == (14, kept, unscored)
    assert {r: n for r, n in report["dropped"].items() if n} == {"min-side": 1, **dropped, "not an image": 1,
                                                                 "no image in sample": 1}


def test_read_scores_matches_keys_in_any_case_and_refuses_non_numbers():
    assert data.read_scores({"AESTHETIC_SCORE": None, "aesthetic": 6, "PWatermark": "0.25"}) == (6.0, 0.25, None)
    assert data.read_scores({"aesthetic_score": 5.5, "aesthetic": 1}) == (5.5, None, None)  # the LAION name first
    huge = json.loads('{"aesthetic": 1e999, "pwatermark": 1' + "0" * 400 + ', "punsafe": false}')  # inf; too big
    assert data.read_scores(huge) == (None, None, None) and data.read_scores({}) == (None, None, None)


def test_counts_in_words_use_singular_and_plural():
    stats = data.new_stats()
    stats["kept"], stats["dropped"]["min-side"] = 1, 1
    assert data.count_line(stats) == "kept 1 of 2 images; dropped min-side 1"
    stats["dropped"]["min-side"] = 0
    assert data.count_line(stats) == "kept 1 of 1 image; dropped none"
    info = dict(images=1, cached=0, seconds=0.5, workers=1)
    assert data.scan_line(info) == "1 image in 0.5 s (2 images/s, 1 worker process)"


def test_scan_cache_reads_no_header_twice_and_follows_changes(tmp_path, monkeypatch):
    folder = _data_scored_folder(tmp_path / "f")
    scan = lambda: data.scan_folder(folder, data.Filters(1), data.new_stats(), lambda name, e: None)
    first, info = scan()
    assert (info["images"], info["cached"], len(first)) == (13, 0, 12)
    opened, open_image = [], data.open_image
    monkeypatch.setattr(data, "open_image", lambda src: opened.append(os.path.basename(src)) or open_image(src))
    again, info = scan()
    assert again == first and info["cached"] == 13 and opened == []
    # an edited caption, a replaced image, a removed one; mtimes set a second on, as a later edit would have them
    later = time.time_ns() + 10 ** 9
    (tmp_path / "f" / "a.txt").write_text("a new caption")
    (tmp_path / "f" / "c.png").write_bytes(_data_png((24, 8)))
    for name in ("a.txt", "c.png"):
        os.utime(tmp_path / "f" / name, ns=(later, later))
    (tmp_path / "f" / "b.png").unlink()
    items, info = scan()
    assert sorted(opened) == ["a.png", "c.png"] and (info["images"], info["cached"]) == (12, 10)
    by_name = {os.path.basename(it.name): it for it in items}
    assert by_name["a.png"].caption == "a new caption" and (by_name["c.png"].w, by_name["c.png"].h) == (24, 8)
    # a cache that is not one, and one that cannot be written (a folder in its place): scanned again, no error
    (tmp_path / "f" / data.SCAN_CACHE).write_text('{"zd_scan": 1, "files": [')
    assert scan()[0] == items and len(opened) == 2 + 12
    os.remove(tmp_path / "f" / data.SCAN_CACHE)
    os.mkdir(tmp_path / "f" / data.SCAN_CACHE)
    items_again, info = scan()
    assert items_again == items and info["cache_error"].startswith("IsADirectoryError")


def test_an_unreadable_image_is_named_so_even_after_a_cached_scan(tmp_path, capsys, monkeypatch):
    """A file the user may not read is "unreadable (PermissionError)", not "not an image"; chmod keeps the mtime, but
    the cached scan notices it."""
    for name in ("a", "b"):
        (tmp_path / f"{name}.png").write_bytes(_data_png())
    open_image = data.Image.open

    def open_as_a_user(src, *a, **k):                      # root reads any file: refuse as for anyone else
        if isinstance(src, str) and not os.stat(src).st_mode & 0o444:
            raise PermissionError(13, "Permission denied", src)
        return open_image(src, *a, **k)
    monkeypatch.setattr(data.Image, "open", open_as_a_user)
    argv = ["data", "--data", str(tmp_path), "--json", "--min-side", "1", "--batch-size", "1", "--sheet", "",
            *TINY_FLAGS]
    zd.main(argv)
    assert json.loads(capsys.readouterr().out)["kept"] == 2
    os.chmod(tmp_path / "b.png", 0)
    zd.main(argv)
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["kept"] == 1 and report["dropped"]["unreadable"] == 1 and "not an image" not in report["dropped"]
    assert f"skipped {tmp_path / 'b.png'}: unreadable: PermissionError: Permission denied" in out.err


def test_parallel_scan_equals_the_scan_in_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SCAN_CHUNK", 3)  # 13 images: 5 tasks for 2 worker processes
    folder = _data_scored_folder(tmp_path / "f")
    runs = []
    for workers in (0, 2):
        stats, warned = data.new_stats(), []
        items, info = data.scan_folder(folder, data.Filters(1, 5), stats, lambda name, e: warned.append(name), workers)
        runs.append((items, stats, warned, info["workers"]))
        os.remove(os.path.join(folder, data.SCAN_CACHE))
    assert runs[0][:3] == runs[1][:3] and (runs[0][3], runs[1][3]) == (0, 2)


def test_write_scan_folder_writes_the_readme_example(tmp_path):
    """The README's synthetic folder: captions beside the images, one in ten without an aesthetic score, the two
    spellings of the aesthetic key, original sizes of 1024–1536 px."""
    bench.write_scan_folder(str(tmp_path), 30)
    report = data.survey(data.Loader([str(tmp_path)], 1, workers=0, min_aesthetic=0, **TINY))
    assert (report["found"], report["kept"], report["unscored"], report["missing_captions"]) == (30, 30, 3, 0)
    metas = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("000/*.json"))]
    assert {"aesthetic", "AESTHETIC_SCORE"} <= {k for m in metas for k in m}
    assert min(min(m["original_width"], m["original_height"]) for m in metas) >= 1024


def test_contact_sheet_captions_draw_accents_not_boxes():
    """Every character of an accented caption has a glyph in the sheet's font (not the box of a missing one); PIL's
    built-in font, without accented glyphs, gets the caption without accents."""
    font = data._sheet_font(20)
    glyph = lambda c: np.asarray(font.getmask(c)).tobytes()
    assert all(glyph(c) != glyph("\ue000") for c in data._drawable("crème brûlée, café", font))   # U+E000: none
    assert data._drawable("crème brûlée, café", ImageFont.load_default(20)) == "creme brulee, cafe"


def test_contact_sheets_are_the_training_crops_with_their_captions(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(10):  # 4 square images, 3 wide, 3 tall
        w, h = [(40, 40), (48, 30), (30, 48)][k % 3]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{k:02d}.png")
        (folder / f"{k:02d}.txt").write_text(f"caption  {k} " + "long " * (80 if k == 3 else 0))
    loader = data.Loader([str(folder)], 1, workers=0, min_side=1, flip=True, random_crop=True, caption_dropout=0.5,
                         seed=5, **TINY)
    tokens = model.Tokenizer.default()
    report = data.survey(loader, str(tmp_path / "sheets"), 2,
                         lambda texts: [len(t) for t in tokens.tokens(texts)])
    assert report["captions"]["over_75_tokens"] == 1 and report["captions"]["dropout_per_epoch"] == 5
    crops = {int(b["index"][0]): b["pixels"][0] for b in _data_take(loader.batches(), 10)}  # epoch 0, batch size 1
    names = [it.name for it in loader.dataset.items]
    assert sorted(report["sheets"]) == ["24x40", "32x32", "40x24"]
    for bucket, sheet in report["sheets"].items():
        bw, bh = map(int, bucket.split("x"))
        img = np.asarray(Image.open(sheet["path"]).convert("RGB"))
        assert len(sheet["tiles"]) == 2 and sheet["path"] == str(tmp_path / "sheets" / f"{bucket}.png")
        for tile in sheet["tiles"]:
            x0, y0, x1, y1 = tile["box"]
            scale = (x1 - x0) // bw
            assert (x1 - x0, y1 - y0) == (bw * scale, bh * scale)  # the bucket's aspect, enlarged by a whole factor
            crop = crops[names.index(tile["name"])]
            assert np.array_equal(img[y0:y1:scale, x0:x1:scale],
                                  ((crop + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
            assert tile["caption"] == " ".join(open(tile["name"][:-4] + ".txt").read().split())
            assert img[y1 + 2:y1 + 16, x0:x1].max() > 200  # light caption text under the tile


def test_sheet_captions_wrap_to_their_lines_and_width():
    font = data.ImageFont.load_default(15)
    for text in ["a b " * 300, "x" * 100000, "short"]:
        lines = data._wrap(text, font, 160, 3)
        assert 1 <= len(lines) <= 3 and all(font.getlength(line) <= 160 for line in lines)
        assert lines[-1].endswith("…") == (text != "short")
    assert data._wrap("one two three", font, 1000, 3) == ["one two three"]


def test_zd_data_json_report(tmp_path, capsys):
    folder = _data_scored_folder(tmp_path / "f")
    zd.main(["data", "--data", folder, "--json", "--min-aesthetic", "5", "--batch-size", "1", "--per-bucket", "2",
             "--sheet", str(tmp_path / "sheets"), *TINY_FLAGS])
    out = capsys.readouterr()
    report = json.loads(out.out)  # the log went to stderr
    assert set(report) == {"found", "kept", "dropped", "unscored", "missing_captions", "ignored", "buckets", "batches",
                           "captions", "scan", "sheets"}
    assert (report["found"], report["kept"], report["unscored"], report["missing_captions"]) == (13, 9, 6, 0)
    assert report["dropped"] == {"min-side": 1, "min-aesthetic": 2, "max-watermark": 0, "max-unsafe": 0,
                                 "unscored": 0, "not an image": 1}
    assert report["buckets"] == {"24x40": 0, "32x32": 9, "40x24": 0}
    assert report["batches"] == dict(global_batch=1, per_epoch=9, left_out_per_epoch=0, exact=True)
    assert report["captions"] == dict(empty=0, dropout_per_epoch=1, over_75_tokens=0, words=[["caption", 9]])
    assert set(report["scan"]) == {"images", "cached", "seconds", "images_per_s", "workers"}
    assert list(report["sheets"]) == ["32x32"] and len(report["sheets"]["32x32"]["tiles"]) == 2
    assert "data: kept 9 of 13 images; dropped min-side 1, min-aesthetic 2, not an image 1" in out.err


def test_zd_data_user_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    folder = _data_scored_folder(tmp_path / "f")
    for flags, message in [(["--data", str(tmp_path / "nope")], "data: no such folder: .*nope"),
                           (["--data", str(tmp_path / "empty")], "data: no image file .* in .*empty"),
                           (["--data", str(tmp_path / "*.tar")], "data: no shard matches"),
                           (["--data", folder, "--min-aesthetic", "9", "--drop-unscored"], "data: no bucket holds")]:
        assert re.search(message, refused(capsys, "data", *flags, "--sheet", ""))
    shard = _data_shard(tmp_path / "00000.tar", [("a", {"jpg": _data_noise_jpeg((40, 40)), "txt": b"small"})])
    assert "data: no sample passes the filters: lower --min-side" in refused(capsys, "data", "--data", shard, "--sheet",
                                                                             "")
    with pytest.raises(SystemExit) as e:     # refused with --json: the report still comes, so a script sees why
        zd.main(["data", "--data", folder, "--min-aesthetic", "9", "--drop-unscored", "--sheet", "", "--json"])
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert e.value.code == 1 and report["kept"] == 0 and report["dropped"]["min-aesthetic"] == 5, report
    assert out.err.splitlines()[-1].startswith("data: no bucket holds a full global batch")
    assert "--batch-size: 0 is below 1" in refused(capsys, "data", "--data", folder, "--batch-size", "0", status=2)
    with pytest.raises(SystemExit) as e:
        zd.main(["data", "--data", folder, "--max-watermark", "1.5"])
    assert e.value.code == 2 and "1.5 is not a probability in [0, 1]" in capsys.readouterr().err


def test_zd_data_on_a_hostile_folder_never_crashes(tmp_path, capsys):
    """The loader tests' odd files, plus: a caption in UTF-16, a json nested 100000 deep, scores too big for a float,
    a dangling link, a folder named like an image, a name that is not UTF-8, a GIF, a broken scan cache. Run twice,
    the second time from the cache, in a fresh process printing to a pipe, as in a script."""
    folder = tmp_path / "odd"
    _data_write_odd_files(folder)
    for name, raw in [("utf16.png", _data_png()), ("utf16.txt", "légende".encode("utf-16")), ("deep.png", _data_png()),
                      ("deep.json", b"[" * 100000), ("scores.png", _data_png()), ("anim.gif", b"GIF89a"),
                      ("scores.json", b'{"punsafe": 1' + b"0" * 400 + b', "aesthetic": 1e999}'),
                      ("long.txt", b"word " * 5000 + b"x" * 10000), (data.SCAN_CACHE, b'{"zd_scan": 1, "files": 7}')]:
        (folder / name).write_bytes(raw)
    (folder / "dangling.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / "folder.jpg").mkdir()
    with open(os.path.join(os.fsencode(folder), b"name\xff.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n broken")
    args = ["data", "--data", str(folder), "--min-side", "1", "--max-unsafe", "0.5", "--batch-size", "1",
            "--sheet", str(tmp_path / "sheets"), *TINY_FLAGS]
    report = zd.survey(zd.parser().parse_args(args))
    assert (report["found"], report["kept"], report["unscored"], report["ignored"]) == (13, 7, 7, {".gif": 1})
    assert {r: n for r, n in report["dropped"].items() if n} == {"empty file": 1, "not an image": 2,
                                                                 "decompression bomb": 2, "unreadable": 1}
    assert report["captions"]["over_75_tokens"] == 1 and report["captions"]["words"][0] == ("word", 5000)
    lines = capsys.readouterr().out.splitlines()
    # PYTHONIOENCODING=utf-8 makes printing a surrogate an error, as in most desktop locales
    run = subprocess.run([sys.executable, "zd.py", *args], cwd=HERE, capture_output=True, timeout=300,
                         env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    again = run.stdout.decode().splitlines()
    assert "name\\udcff.png: not an image" in run.stdout.decode()
    assert "12 from its scan cache" in next(line for line in again if line.startswith("data: scanned"))  # no link
    kept = [line for line in lines if line.startswith("data: kept")]
    assert kept == [line for line in again if line.startswith("data: kept")] == [
        'data: kept 7 of 13 images; dropped decompression bomb 2, empty file 1, not an image 2, unreadable 1; '
        'unscored but kept 7; without caption 5 (→ ""); ignored (not images) .gif 1']


# ---- model.py: networks, tokenizer, checkpoints ----
FULL = os.environ.get("ZD_FULL") == "1"


# The oracles' configs of zd's config objects and random weights, shared with bench.py
randomize = bench.randomize
diffusers_unet_config, diffusers_vae_config = bench.diffusers_unet_config, bench.diffusers_vae_config
transformers_clip_config = bench.transformers_clip_config
hf_tokenizer = lambda folder: bench.hf_tokenizer(str(folder))


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
    assert ids[0, 10:].eq(49407).all()  # pitfall 11: padded with EOS 49407, not 0
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
    """Tensor and parameter counts of SD1.5, its inpainting UNet, the VAE and CLIP-L."""
    counts = lambda net: (len(net.state_dict()), sum(p.numel() for p in net.parameters()))
    unet, vae, clip = meta_nets()
    assert counts(unet) == (686, 859_520_964)
    assert counts(meta_nets(model.UNetConfig(in_channels=9))[0]) == (686, 859_535_364)
    assert counts(vae) == (248, 83_653_863)
    assert counts(clip) == (196, 123_060_480)
    assert unet.input_blocks[0][0].weight.shape == (320, 4, 3, 3)
    assert model.VAE_SCALE == 0.18215


def test_full_size_keys_and_shapes_match_diffusers_on_meta():
    """Every full-size LDM name and shape equals diffusers'/transformers' SD1.5 mapped through model.py's renaming."""
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
    """Pitfall 11: 8 heads per block, so head dims 40/80/160, not 64."""
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
    """Pitfall 11: every VAE GroupNorm and the SpatialTransformer's use eps 1e-6; the UNet's ResBlocks 1e-5."""
    unet, vae, _ = meta_nets()
    assert {m.eps for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-6}
    assert {m.norm.eps for m in unet.modules() if isinstance(m, model.SpatialTransformer)} == {1e-6}
    assert {m.in_layers[0].eps for m in unet.modules() if isinstance(m, model.ResBlock)} == {1e-5}
    assert unet.out[0].eps == 1e-5


def test_vae_downsample_pad_probe():
    """Pitfall 11, the VAE's asymmetric pad, by a probe: all-ones 3×3 kernel on all-ones 8×8 → 9 top-left,
    4 bottom-right (pad right/bottom only)."""
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
    """Pitfall 11: [cos(t·f_i), sin(t·f_i)], f_i = 10000^(−i/160), against a float64 evaluation."""
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


def flat(sd):
    """Every tensor of an model.SD under its LDM name."""
    nets = ((model.UNET_PREFIX, sd.unet), (model.VAE_PREFIX, sd.vae), (model.CLIP_PREFIX, sd.text_encoder))
    return {p + k: v for p, net in nets if net is not None for k, v in net.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def tiny_file(tiny_sd, tmp_path_factory):
    """The tiny base pipeline as our single file, and its loaded tensors."""
    folder, _ = tiny_sd()
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    sd = model.load(folder)
    model.save(path, sd.unet, sd.text_encoder, sd.vae)
    return path, flat(sd)


@pytest.mark.parametrize("variant", ["base", "inpaint"])
def test_diffusers_loads_our_single_file_bit_identical(tiny_sd, tmp_path, variant):
    """diffusers folder → model.load → model.save → diffusers' own from_single_file: every tensor unchanged."""
    from diffusers import StableDiffusionPipeline
    folder, ref = tiny_sd(variant)
    sd = model.load(folder)
    model.save(tmp_path / "m.safetensors", sd.unet, sd.text_encoder, sd.vae)
    config = tmp_path / "config"
    shutil.copytree(folder, config, ignore=shutil.ignore_patterns("*.safetensors"))
    pipe = StableDiffusionPipeline.from_single_file(str(tmp_path / "m.safetensors"), config=str(config),
                                                    local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        want = {k: v for k, v in want.items() if "position_ids" not in k}
        assert_same({k: v for k, v in got.items() if "position_ids" not in k}, want)


SCHEDULE_BUFFERS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2"]


def test_single_file_variants_load_the_same_tensors(tiny_file, tmp_path):
    """Variants met in the wild: schedule buffers, float position_ids, junk keys, CLIP without text_model.,
    fp16; each loads the same tensors, counts what it ignored, and load → save → load is bit-identical."""
    path, want = tiny_file
    base = load_file(path)
    junk = {k: torch.rand(1000) for k in SCHEDULE_BUFFERS}
    junk.update({"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77.0)[None] + 0.3,
                 "lora_unet_foo.alpha": torch.tensor(1.0), "first_stage_model.loss.logvar": torch.zeros(())})
    no_text_model = {k.replace("transformer.text_model.", "transformer."): v for k, v in base.items()}
    variants = {"junk": ({**base, **junk}, len(junk), want), "no_text_model": (no_text_model, 0, want),
                "fp16": ({k: v.half() for k, v in base.items()}, 0, {k: v.half().float() for k, v in want.items()})}
    for name, (tensors, n_ignored, expected) in variants.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        sd = model.load(tmp_path / f"{name}.safetensors")
        assert_same(flat(sd), expected)
        assert len(sd.meta["ignored"]) == n_ignored and sd.meta["loaded"] == len(want), name
        model.save(tmp_path / f"{name}_again.safetensors", sd.unet, sd.text_encoder, sd.vae, half=name == "fp16")
        assert_same(flat(model.load(tmp_path / f"{name}_again.safetensors")), expected)
        if name == "fp16":
            assert sd.meta["dtypes"] == ["float16"]
            markers = {"v_pred": base["v_pred"], "ztsnr": base["ztsnr"]}  # empty, so their dtype is moot
            assert_same(load_file(tmp_path / "fp16_again.safetensors"), {**tensors, **markers})


def test_ema_weights_chosen_explicitly(tiny_file, tmp_path):
    """v1-5-pruned layout: raw UNet under model.diffusion_model.*, EMA under model_ema.<path without dots>."""
    path, want = tiny_file
    base = load_file(path)
    ema = {k: v + 1.0 for k, v in base.items() if k.startswith(model.UNET_PREFIX)}
    assert model.ema_key("model.diffusion_model.input_blocks.0.0.weight") == \
        "model_ema.diffusion_modelinput_blocks00weight"
    full = {**base, **{model.ema_key(k): v for k, v in ema.items()},
            "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(100, dtype=torch.int32)}
    save_file(full, tmp_path / "full.safetensors")
    unet = lambda sd: {model.UNET_PREFIX + k: v for k, v in sd.unet.state_dict().items()}
    for choice, expected, label in ((None, ema, "ema"), (True, ema, "ema"), (False, None, "raw")):
        sd = model.load(tmp_path / "full.safetensors", ema=choice)
        assert_same(unet(sd), expected or {k: base[k] for k in ema})
        assert sd.meta["ema"] == label and sd.meta["ema_present"]
        assert len(sd.meta["ignored"]) == len(ema) + 2  # the other UNet copy, decay, num_updates
    assert model.load(path).meta["ema"] is None  # an emaonly file: one UNet, stored as is
    with pytest.raises(ValueError, match="no model_ema"):
        model.load(path, ema=True)
    del full[model.ema_key(model.UNET_PREFIX + "out.2.bias")]
    save_file(full, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="model_ema.diffusion_modelout2bias"):
        model.load(tmp_path / "partial.safetensors")


def test_missing_and_misshaped_keys_are_named(tiny_file, tmp_path):
    path, _ = tiny_file
    cases = {"missing": lambda sd: sd.pop(model.UNET_PREFIX + "middle_block.1.proj_out.bias"),
             "shape": lambda sd: sd.update({model.VAE_PREFIX + "decoder.conv_out.bias": torch.zeros(4)}),
             "many": lambda sd: [sd.pop(k) for k in list(sd) if ".attn2." in k]}
    errors = {"missing": r"1 missing keys \[model\.diffusion_model\.middle_block\.1\.proj_out\.bias\]",
              "shape": r"1 mis-shaped \[first_stage_model\.decoder\.conv_out\.bias \(4,\) \(expected \(3,\)\)\]",
              "many": r"80 missing keys \[model\.diffusion_model\.input_blocks\.1\.1\.transformer_blocks\.0\."
                      r"attn2\.to_k\.weight, .*, … \(72 more\)\]"}
    for name, damage in cases.items():
        broken = load_file(path)
        damage(broken)
        save_file(broken, tmp_path / "broken.safetensors")
        with pytest.raises(ValueError, match=errors[name]):
            model.load(tmp_path / "broken.safetensors")


def test_separate_vae_file_and_missing_vae(tiny_sd, tiny_file, tmp_path):
    folder, _ = tiny_sd()
    path, want = tiny_file
    no_vae = {k: v for k, v in load_file(path).items() if not k.startswith(model.VAE_PREFIX)}
    save_file(no_vae, tmp_path / "no_vae.safetensors")
    with pytest.raises(ValueError, match=r"no vae tensors \(pass vae_path\).*first_stage_model\."):
        model.load(tmp_path / "no_vae.safetensors")
    vae = {k.removeprefix(model.VAE_PREFIX): v for k, v in want.items() if k.startswith(model.VAE_PREFIX)}
    save_file(vae, tmp_path / "vae.safetensors")
    for vae_file in (tmp_path / "vae.safetensors", folder / "vae" / "diffusion_pytorch_model.safetensors"):
        assert_same(flat(model.load(tmp_path / "no_vae.safetensors", vae_path=vae_file)), want)
    sd = model.load(path, vae_path=tmp_path / "vae.safetensors")
    assert len(sd.meta["ignored"]) == len(vae)  # the file's own VAE, replaced


def test_pixel_space_model_has_no_vae(tmp_path):
    unet = model.UNet(model.UNetConfig.tiny(in_channels=3, out_channels=3))  # works on pixels directly
    te = model.CLIPTextModel(model.CLIPConfig.tiny())
    model.save(tmp_path / "px.safetensors", unet, te)
    sd = model.load(tmp_path / "px.safetensors")
    assert sd.vae is None and sd.meta["pixel_space"] and sd.unet.cfg.in_channels == 3
    assert not (tmp_path / "px.yaml").exists()


def test_markers_written_and_read(tiny_sd, tiny_file, tmp_path):
    """Pitfall 10: v-prediction / ZTSNR declared by header metadata, empty v_pred/ztsnr tensors and a sidecar yaml."""
    path, want = tiny_file
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["modelspec.prediction_type"] == "v" and meta["zd.prediction"] == "v" and meta["zd.ztsnr"] == "true"
    assert json.loads(meta["zd.config"])["unet"]["model_channels"] == 32
    assert {"v_pred", "ztsnr"} <= keys
    yaml = path.with_suffix(".yaml").read_text()
    assert 'parameterization: "v"' in yaml and "LatentDiffusion" in yaml and "in_channels: 4" in yaml
    assert (model.load(path).meta["prediction"], model.load(path).meta["ztsnr"]) == ("v", True)

    sd = model.load(path)
    model.save(tmp_path / "eps.safetensors", sd.unet, sd.text_encoder, sd.vae, prediction="eps", ztsnr=False)
    assert "v_pred" not in load_file(tmp_path / "eps.safetensors")
    assert (model.load(tmp_path / "eps.safetensors").meta["prediction"],
            model.load(tmp_path / "eps.safetensors").meta["ztsnr"]) == ("eps", False)

    bare = {k: v for k, v in load_file(path).items() if k not in ("v_pred", "ztsnr")}
    save_file(bare, tmp_path / "bare.safetensors")
    assert (model.load(tmp_path / "bare.safetensors").meta["prediction"],
            model.load(tmp_path / "bare.safetensors").meta["ztsnr"]) == (None, None)
    save_file({**bare, "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, tmp_path / "keys.safetensors")
    assert (model.load(tmp_path / "keys.safetensors").meta["prediction"],
            model.load(tmp_path / "keys.safetensors").meta["ztsnr"]) == ("v", True)
    shutil.copy(path.with_suffix(".yaml"), tmp_path / "bare.yaml")
    assert model.load(tmp_path / "bare.safetensors").meta["prediction"] == "v"

    inpaint = model.load(tiny_sd("inpaint")[0])
    assert inpaint.meta["inpaint"] and inpaint.meta["prediction"] == "eps"  # the folder's DDIM scheduler config
    model.save(tmp_path / "inp.safetensors", inpaint.unet, inpaint.text_encoder, inpaint.vae)
    yaml = (tmp_path / "inp.yaml").read_text()
    assert "LatentInpaintDiffusion" in yaml and "in_channels: 9" in yaml and "conditioning_key: hybrid" in yaml
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_meta_device_reads_only_the_header(tiny_file):
    path, want = tiny_file
    sd = model.load(path, device="meta")
    assert sd.unet.input_blocks[0][0].weight.is_meta and sd.meta["loaded"] == len(want)
    assert sd.unet.cfg == model.UNetConfig.tiny() and sd.vae.cfg == model.VAEConfig.tiny()
    assert sd.text_encoder.cfg == model.CLIPConfig.tiny()


def test_expand_to_inpaint_starts_as_the_base():
    torch.manual_seed(0)
    base = randomize(model.UNet(model.UNetConfig.tiny()))
    inpaint = model.expand_to_inpaint(base)
    assert inpaint.cfg.in_channels == 9 and inpaint.input_blocks[0][0].weight[:, 4:].eq(0).all()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    extra = torch.randn(1, 5, 8, 8)
    with torch.no_grad():
        assert torch.equal(inpaint(torch.cat([x, extra], 1), torch.tensor(5), ctx), base(x, torch.tensor(5), ctx))


def test_add_difference():
    """inpaint + α·(tuned − base); the 9-channel conv_in gets the difference on its first 4 input channels."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    a = {"w": r(3, 2), "input_blocks.0.0.weight": r(5, 9, 3, 3), "only_a": r(2)}
    b = {"w": r(3, 2), "input_blocks.0.0.weight": r(5, 4, 3, 3)}
    c = {"w": r(3, 2), "input_blocks.0.0.weight": r(5, 4, 3, 3)}
    out = model.add_difference(a, b, c, alpha=0.5)
    assert torch.allclose(out["w"], a["w"] + 0.5 * (b["w"] - c["w"]))
    conv = "input_blocks.0.0.weight"
    assert torch.allclose(out[conv][:, :4], a[conv][:, :4] + 0.5 * (b[conv] - c[conv]))
    assert torch.equal(out[conv][:, 4:], a[conv][:, 4:]) and torch.equal(out["only_a"], a["only_a"])
    with pytest.raises(ValueError, match="cannot add"):
        model.add_difference({"w": r(3, 3)}, {"w": r(3, 2)}, {"w": r(3, 2)})


@pytest.mark.skipif(not FULL, reason="ZD_FULL=1: full-size SD1.5 networks on random weights (≈ 1 min, 8 GB)")
def test_full_size_matches_diffusers_and_transformers():
    """SD1.5's real sizes: UNet at 64×64 latents, VAE at 256², CLIP-L; printed with pytest -s."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 4, 64, 64, generator=g), torch.randn(1, 77, 768, generator=g), torch.tensor([500])
    ref = randomize(UNet2DConditionModel(**diffusers_unet_config(model.UNetConfig())))
    ours = model.build(model.UNet, model.UNetConfig(), model.unet_from_diffusers(ref.state_dict()))[0]
    with torch.no_grad():
        t0 = time.perf_counter()
        a = ours(x, t, ctx)
        t1 = time.perf_counter()
        b = ref(x, t, encoder_hidden_states=ctx).sample
        t2 = time.perf_counter()
    print(f"\nUNet 64×64: max |Δ| {(a - b).abs().max():.3g} (output max {b.abs().max():.3g}); "
          f"zd {t1 - t0:.1f} s, diffusers {t2 - t1:.1f} s")
    assert rel_err(a, b) < 1e-4
    del ref, ours
    ref = randomize(AutoencoderKL(**diffusers_vae_config(model.VAEConfig())))
    ours = model.build(model.VAE, model.VAEConfig(), model.vae_from_diffusers(ref.state_dict()))[0]
    images = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1
    with torch.no_grad():
        mean, _ = ours.encode(images)
        ref_mean = ref.encode(images).latent_dist.mean
        decoded, ref_decoded = ours.decode(mean), ref.decode(ref_mean).sample
    print(f"VAE 256²: encode max |Δ| {(mean - ref_mean).abs().max():.3g}, "
          f"decode max |Δ| {(decoded - ref_decoded).abs().max():.3g}")
    assert rel_err(mean, ref_mean) < 1e-4 and rel_err(decoded, ref_decoded) < 1e-4
    ref = randomize(CLIPTextModel(transformers_clip_config(model.CLIPConfig())))
    ours = model.build(model.CLIPTextModel, model.CLIPConfig(),
                       {k.removeprefix("text_model."): v for k, v in ref.state_dict().items()})[0]
    ids = model.Tokenizer.default()(["a photograph of an astronaut riding a horse"])
    with torch.no_grad():
        a, b = ours(ids), ref(ids).last_hidden_state
    print(f"CLIP-L: max |Δ| {(a - b).abs().max():.3g}")
    assert rel_err(a, b) < 1e-4


def test_cli_convert(tiny_sd, tiny_file, tmp_path, capsys):
    folder, _ = tiny_sd()
    path, want = tiny_file
    zd.main(["convert", str(folder), str(tmp_path / "half.safetensors"), "--half"])
    sd = model.load(tmp_path / "half.safetensors")
    assert sd.meta["dtypes"] == ["float16"] and (sd.meta["prediction"], sd.meta["ztsnr"]) == ("eps", False)
    assert_same(flat(sd), {k: v.half().float() for k, v in want.items()})

    zd.main(["convert", str(path), str(tmp_path / "inp.safetensors"), "--inpaint", "--prediction", "eps"])
    sd = model.load(tmp_path / "inp.safetensors")
    assert sd.meta["inpaint"] and (sd.meta["prediction"], sd.meta["ztsnr"]) == ("eps", True)
    assert "LatentInpaintDiffusion" in (tmp_path / "inp.yaml").read_text()
    assert "needs a 4-channel UNet" in refused(capsys, "convert", str(tmp_path / "inp.safetensors"),
                                               str(tmp_path / "x.safetensors"), "--inpaint")

    tensors = load_file(path)
    full = {**tensors, **{model.ema_key(k): v + 1 for k, v in tensors.items() if k.startswith(model.UNET_PREFIX)}}
    save_file(full, tmp_path / "full.safetensors")
    for flag, shift in (("--ema", 1), ("--no-ema", 0)):
        zd.main(["convert", str(tmp_path / "full.safetensors"), str(tmp_path / "out.safetensors"), flag])
        got = load_file(tmp_path / "out.safetensors")
        assert torch.equal(got[model.UNET_PREFIX + "out.2.bias"], tensors[model.UNET_PREFIX + "out.2.bias"] + shift)
        assert not any(k.startswith("model_ema.") for k in got)


def test_cli_merge_add_difference(tiny_sd, tiny_file, tmp_path):
    base_path, base = tiny_file
    tuned = {k: v + 0.01 * torch.randn_like(v) if k.startswith(model.UNET_PREFIX) else v
             for k, v in load_file(base_path).items()}
    save_file(tuned, tmp_path / "tuned.safetensors", metadata={"zd.prediction": "v", "zd.ztsnr": "true"})
    inpaint_folder, _ = tiny_sd("inpaint")
    zd.main(["merge", str(inpaint_folder), str(tmp_path / "tuned.safetensors"), str(base_path),
             str(tmp_path / "merged.safetensors")])
    merged, inpaint = model.load(tmp_path / "merged.safetensors"), flat(model.load(inpaint_folder))
    assert merged.meta["inpaint"] and (merged.meta["prediction"], merged.meta["ztsnr"]) == ("v", True)
    got = flat(merged)
    for k in (model.UNET_PREFIX + "out.2.weight", model.UNET_PREFIX + "middle_block.1.proj_in.weight"):
        assert torch.allclose(got[k], inpaint[k] + tuned[k] - base[k], atol=1e-6)
    conv = model.UNET_PREFIX + "input_blocks.0.0.weight"
    assert torch.allclose(got[conv][:, :4], inpaint[conv][:, :4] + tuned[conv] - base[conv], atol=1e-6)
    assert torch.equal(got[conv][:, 4:], inpaint[conv][:, 4:])
    vae = model.VAE_PREFIX + "decoder.conv_out.weight"
    assert torch.equal(got[vae], inpaint[vae])  # tuned and base share their VAE: zero difference


def test_cli_inspect(tiny_file, tmp_path, capsys):
    path, _ = tiny_file
    tensors = {**load_file(path), **{k: torch.rand(1000) for k in SCHEDULE_BUFFERS}}
    save_file({k: v.half() for k, v in tensors.items()}, tmp_path / "x.safetensors", metadata={"note": "hi"})
    zd.main(["inspect", str(tmp_path / "x.safetensors")])
    out = capsys.readouterr().out
    for line in ("layout       single, base", "no model_ema.*", "prediction v, ztsnr True", "dtypes       float16",
                 "unet         684 tensors", "model_channels=32", "ignored      12 keys: alphas_cumprod",
                 "metadata     note = hi"):
        assert line in out, line
    save_file({"foo": torch.zeros(1)}, tmp_path / "junk.safetensors")
    assert "no unet tensors" in refused(capsys, "inspect", str(tmp_path / "junk.safetensors"))


# ---- zd.py sample -----------------------------------------------------------------------------------------------------

ZT_DDIM = dict(**SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction",
               clip_sample=False, set_alpha_to_one=True, steps_offset=1)
_ZT_FOLDERS = {}


@pytest.fixture(scope="module")
def zt_sd(tmp_path_factory):
    """make(variant) → (folder, diffusers components) of a tiny random SD1.5-layout pipeline ("base"/"inpaint"), saved
    as a diffusers folder marked v/ZT by its scheduler config (the DDIMScheduler the parity tests run)."""
    def make(variant="base"):
        if variant not in _ZT_FOLDERS:
            from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
            from transformers import CLIPTextModel
            folder = tmp_path_factory.mktemp(f"zt_{variant}")
            unet_cfg = model.UNetConfig.tiny(in_channels=9 if variant == "inpaint" else 4)
            seed = 10 if variant == "base" else 20
            parts = dict(unet=randomize(UNet2DConditionModel(**diffusers_unet_config(unet_cfg)), seed).eval(),
                         vae=randomize(AutoencoderKL(**diffusers_vae_config(model.VAEConfig.tiny())), seed + 1).eval(),
                         text_encoder=randomize(CLIPTextModel(transformers_clip_config(model.CLIPConfig.tiny())),
                                                seed + 2).eval(),
                         tokenizer=hf_tokenizer(folder / "vocab"), scheduler=DDIMScheduler(**ZT_DDIM),
                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            StableDiffusionPipeline(**parts).save_pretrained(folder, safe_serialization=True)
            _ZT_FOLDERS[variant] = folder, parts
        return _ZT_FOLDERS[variant]
    return make


def _uint8(images_np):
    """diffusers' output_type="np" floats → uint8 the way its numpy_to_pil does: round(x·255)."""
    return torch.from_numpy((images_np * 255).round().astype("uint8"))


def _assert_images_close(ours, ref):
    diff = (ours.int() - ref.int()).abs()
    assert ours.shape == ref.shape and diff.max().item() <= 1, f"max uint8 diff {diff.max().item()}"
    # a random model can saturate: make sure the comparison was about real, unclamped pixel values
    assert ((ref > 0) & (ref < 255)).float().mean().item() > 0.5 and ref.float().std().item() > 5


@pytest.mark.parametrize("steps", [10, 25])
def test_sample_matches_diffusers_pipeline(zt_sd, steps):
    """End-to-end parity: generate() on the loaded folder == diffusers' StableDiffusionPipeline with
    DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction",
    clip_sample=False, set_alpha_to_one=True) and guidance_rescale=0.7, same seed, prompt, negative prompt, size,
    two images per prompt: identical uint8 up to ±1. Steps divide 1000: diffusers' step() takes prev_t = t − 1000//N,
    which is the next trailing step only then (pitfall 6); other N are tested against the list itself below."""
    from diffusers import StableDiffusionPipeline
    folder, parts = zt_sd("base")
    sd = model.load(folder)
    assert (sd.meta["prediction"], sd.meta["ztsnr"]) == ("v", True)
    kw = dict(negative_prompt="blurry, low quality", num_inference_steps=steps, guidance_scale=7.5,
              guidance_rescale=0.7, height=64, width=64)
    pipe = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red fox in the snow", num_images_per_prompt=2, output_type="np",
               generator=torch.Generator("cpu").manual_seed(3), **kw).images
    ours = zd.generate(sd, ["a red fox in the snow"] * 2, negative="blurry, low quality", steps=steps, guidance=7.5,
                       rescale=0.7, seed=3, width=64, height=64, progress=False)
    _assert_images_close(ours, _uint8(ref))


def test_inpainting_matches_diffusers_pipeline(zt_sd, tmp_path):
    """A 9-channel ZT/v inpainting model == diffusers' StableDiffusionInpaintPipeline at strength 1: UNet input
    [x_t (4), mask (1, nearest-downsampled), masked-image latent (4)], masked image = image·(mask < 0.5), its latent a
    VAE posterior sample drawn after the initial noise from the same generator. That pipeline has no guidance_rescale,
    so φ = 0 here; the rescale is covered by the text-to-image parity test."""
    from diffusers import StableDiffusionInpaintPipeline
    folder, parts = zt_sd("inpaint")
    sd = model.load(folder)
    assert sd.meta["inpaint"]
    g = np.random.default_rng(0)
    image = Image.fromarray(g.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    m = np.zeros((64, 64), dtype=np.uint8)
    m[8:40, 16:56] = 255                                  # white = repaint
    mask = Image.fromarray(m)
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    pipe = StableDiffusionInpaintPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a stone wall", image=image, mask_image=mask, strength=1.0, num_inference_steps=10, guidance_scale=5.0,
               height=64, width=64, output_type="np", generator=torch.Generator("cpu").manual_seed(4)).images
    ours = zd.generate(sd, ["a stone wall"], steps=10, guidance=5.0, rescale=0.0, seed=4, width=64, height=64,
                       image=str(tmp_path / "in.png"), mask=str(tmp_path / "mask.png"), progress=False)
    _assert_images_close(ours, _uint8(ref))


class _Recorder(torch.nn.Module):
    """Wraps a UNet (or stands in for one) and records the (x, t) of every call."""

    def __init__(self, unet=None):
        super().__init__()
        self.inner = unet
        self.w = torch.nn.Parameter(torch.ones(()))
        self.cfg = unet.cfg if unet is not None else model.UNetConfig.tiny()
        self.calls = []

    def forward(self, x, t, context):
        self.calls.append((x.clone(), int(t[0])))
        if self.inner is not None:
            return self.inner(x, t, context)
        return _fake_model(x[:, :4], int(t[0]))        # a smooth stand-in, as in the DDIM tests


def _stub_sd(meta, unet=None, vae=True):
    """A tiny SD whose UNet records its calls (a smooth stand-in unless a network is given), for tests of the loop."""
    return model.SD(unet=_Recorder(unet), tokenizer=model.Tokenizer.default(), meta=meta,
                    text_encoder=model.CLIPTextModel(model.CLIPConfig.tiny(layers=1)),
                    vae=model.VAE(model.VAEConfig.tiny()) if vae else None)


@pytest.mark.parametrize("n", [13, 7])
def test_sample_steps_follow_the_trailing_list(n):
    """N ∤ 1000: the UNet is called at exactly the trailing list (Lin et al. 2023, Table 2), first t = 999; for N = 13
    the second step is 922, not 999 − 1000//13 = 923 (pitfall 6)."""
    sd = _stub_sd(dict(prediction="v", ztsnr=True))
    zd.generate(sd, ["x"], steps=n, width=64, height=64, progress=False)
    ts = [t for _, t in sd.unet.calls]
    assert ts == S.timesteps(n).tolist() and ts[0] == 999
    if n == 13:
        assert ts[1] == 922 != 999 - 1000 // 13


def _check_ddim_transitions(calls, scheduler_kw):
    """Each recorded UNet input x_{i+1} is diffusers' DDIMScheduler.step from x_i with the stand-in's output."""
    ref = DDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=1,
                        **scheduler_kw)
    ref.set_timesteps(len(calls))
    assert [t for _, t in calls] == ref.timesteps.tolist()
    for (x, t), (x_next, _) in zip(calls, calls[1:]):
        torch.testing.assert_close(x_next, ref.step(_fake_model(x, t), t, x).prev_sample, rtol=1e-4, atol=1e-4)


def test_sampler_uses_the_trained_zt_schedule():
    """Pitfall 9: a model marked v/ZT is sampled on the rescaled schedule it was trained on — the trajectory is
    diffusers' DDIMScheduler(rescale_betas_zero_snr=True, v_prediction), and not the unrescaled one's."""
    sd = _stub_sd(dict(prediction="v", ztsnr=True))
    zd.generate(sd, ["x"], steps=10, guidance=1.0, width=64, height=64, progress=False)
    _check_ddim_transitions(sd.unet.calls, dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"))
    with pytest.raises(AssertionError):
        _check_ddim_transitions(sd.unet.calls, dict(prediction_type="v_prediction"))


def test_unmarked_model_samples_as_sd15_eps(capsys):
    """A checkpoint without markers (stock SD1.5) is sampled as ε on SD1.5's own schedule, and the sampler says so."""
    sd = _stub_sd({})
    zd.generate(sd, ["x"], steps=10, guidance=1.0, width=64, height=64, progress=False)
    assert "assuming ε prediction on the SD1.5 schedule" in capsys.readouterr().out
    _check_ddim_transitions(sd.unet.calls, dict(prediction_type="epsilon"))
    assert zd.sampling_schedule({"prediction": "v", "ztsnr": True}, prediction="eps", zero_terminal_snr=False) == \
        ("eps", False)                                    # overrides win over markers


@pytest.mark.parametrize("meta,kw", [(dict(prediction="eps", ztsnr=True), {}),
                                     (dict(prediction="v", ztsnr=True), dict(prediction="eps")),
                                     ({}, dict(zero_terminal_snr=True))])
def test_eps_on_zt_schedule_is_refused(meta, kw):
    """Pitfall 7: ε prediction on the ZT schedule would divide by √ᾱ_999 = 0 — refused before any step runs."""
    sd = _stub_sd(meta)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        zd.generate(sd, ["x"], steps=10, width=64, height=64, progress=False, **kw)
    assert sd.unet.calls == []


def test_seed_reproducible_and_initial_latent_documented():
    """Same seed → identical images; the initial latent is exactly the documented
    torch.randn((n, 4, H/8, W/8), generator=torch.Generator("cpu").manual_seed(seed)), float32."""
    sd = _stub_sd(dict(prediction="v", ztsnr=True))
    a = zd.generate(sd, ["x", "y"], steps=3, width=128, height=64, seed=7, progress=False)
    x_first = sd.unet.calls[0][0]
    b = zd.generate(sd, ["x", "y"], steps=3, width=128, height=64, seed=7, progress=False)
    c = zd.generate(sd, ["x", "y"], steps=3, width=128, height=64, seed=8, progress=False)
    assert a.dtype == torch.uint8 and a.shape == (2, 64, 128, 3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    expected = torch.randn((2, 4, 8, 16), generator=torch.Generator("cpu").manual_seed(7))
    assert torch.equal(x_first, torch.cat([expected, expected]))      # [uncond; cond] halves, t = 999: x_T = noise


def test_pixel_space_model(tmp_path, capsys):
    """zd's demo models have no VAE: x_t is the image (3 channels at H×W, no /8) in [−1, 1]; the initial noise is
    torch.randn((n, 3, H, W), generator=...) and the output is the last x̂0 as uint8. Also through save → `zd.py sample`,
    whose guidance for a pixel-space model is the demo's unless --cfg says otherwise."""
    unet = model.UNet(model.UNetConfig.tiny(in_channels=3, out_channels=3))
    sd = _stub_sd(dict(prediction="v", ztsnr=True, pixel_space=True), unet=unet, vae=False)
    images = zd.generate(sd, ["a white square"] * 2, steps=2, guidance=zd.DEMO_CFG, width=32, height=32, seed=1,
                         progress=False)
    assert images.shape == (2, 32, 32, 3) and images.dtype == torch.uint8
    expected = torch.randn((2, 3, 32, 32), generator=torch.Generator("cpu").manual_seed(1))
    assert torch.equal(sd.unet.calls[0][0][:2], expected)
    model.save(tmp_path / "px.safetensors", unet, sd.text_encoder)
    zd.main(["sample", "--model", str(tmp_path / "px.safetensors"), "--prompt", "a white square", "--steps", "2",
             "--seed", "1", "--width", "32", "--height", "32", "--device", "cpu", "--out", str(tmp_path / "px.png")])
    assert np.abs(np.array(Image.open(tmp_path / "px.png")).astype(int) - images[0].numpy()).max() <= 1
    err = capsys.readouterr().err                             # not a terminal: whole lines, not a silent wait
    assert re.search(r"^sampling: step 1/2  t=999 .*\nsampling: step 2/2  t=499 ", err, re.M), err


def test_a_long_prompt_is_warned_about_once(capsys):
    nets = model.SD(None, None, model.CLIPTextModel(model.CLIPConfig.tiny()), model.Tokenizer.default(), {})
    nets.encode_prompts(["a long prompt " * 30] * 4 + ["short"], "cpu")
    assert capsys.readouterr().err.count("warning: prompt truncated to 75 CLIP tokens") == 1


@pytest.mark.parametrize("steps,strength", [(10, 0.6), (25, 0.8), (13, 0.5)])
def test_img2img_matches_diffusers_truncation_and_start(zt_sd, steps, strength):
    """Base model with an image: the steps are diffusers' StableDiffusionImg2ImgPipeline.get_timesteps (the last
    ⌊N·strength⌋ of the trailing list) and x at the first step is DDIMScheduler.add_noise(VAE_SCALE·z, noise, t_0),
    z a posterior sample of diffusers' VAE drawn from the generator right after the noise."""
    from diffusers import StableDiffusionImg2ImgPipeline
    folder, parts = zt_sd("base")
    sd = model.load(folder, verbose=False)
    sd.unet = _Recorder(sd.unet)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    zd.generate(sd, ["a hill"], steps=steps, strength=strength, seed=2, width=64, height=64, image=image,
                progress=False)
    sched = DDIMScheduler(**ZT_DDIM)
    sched.set_timesteps(steps)
    ts, _ = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=sched), steps, strength, "cpu")
    assert [t for _, t in sd.unet.calls] == ts.tolist()
    g = torch.Generator("cpu").manual_seed(2)
    noise = torch.randn((1, 4, 8, 8), generator=g)
    with torch.no_grad():
        z = parts["vae"].encode(image).latent_dist.sample(g) * parts["vae"].config.scaling_factor
    torch.testing.assert_close(sd.unet.calls[0][0][:1], sched.add_noise(z, noise, ts[:1]), rtol=1e-4, atol=1e-4)


def test_sample_cli_writes_pngs(zt_sd, tmp_path, capsys):
    """`zd.py sample` = generate() + data.save_png: one .png, or a folder with one PNG per image and grid.png; a
    prompt over 75 tokens is truncated with a warning."""
    folder, _ = zt_sd("base")
    long_prompt = "a red fox " * 30
    args = ["sample", "--model", str(folder), "--prompt", long_prompt, "--steps", "2", "--width", "64", "--height",
            "64", "--device", "cpu", "--seed", "5"]
    zd.main(args + ["--out", str(tmp_path / "one.png")])
    assert "truncated" in capsys.readouterr().err
    zd.main(args + ["--n", "2", "--out", str(tmp_path / "many")])
    ref = zd.generate(model.load(folder, verbose=False), [long_prompt] * 2, steps=2, width=64, height=64, seed=5,
                      progress=False)
    got = [np.array(Image.open(tmp_path / "many" / f"00{i}.png")) for i in range(2)]
    assert torch.equal(torch.from_numpy(np.stack(got)), ref)
    one = torch.from_numpy(np.array(Image.open(tmp_path / "one.png")))
    assert (one.int() - torch.from_numpy(got[0]).int()).abs().max() <= 1   # n = 1 is the first row of n = 2's noise
    assert np.asarray(Image.open(tmp_path / "many" / "grid.png")).shape == (64, 128, 3)


def test_sample_image_honours_exif_orientation_as_training_does(zt_sd, tmp_path, monkeypatch):
    """`zd.py sample --image` opens a phone photo as training does (data.open_upright): a JPEG stored 128×64 with EXIF
    orientation 6 is the 64×128 picture it displays as, in the output's size and in the pixels the sampler encodes,
    which are training's load_image of it."""
    stored = Image.new("RGB", (128, 64), (255, 0, 0))
    stored.paste((0, 0, 255), (64, 0, 128, 64))                   # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6                                              # displayed rotated 90° clockwise: red on top
    path = str(tmp_path / "phone.jpg")
    stored.save(path, "JPEG", exif=exif, quality=95)
    seen, image_tensor = [], data.image_tensor
    monkeypatch.setattr(data, "image_tensor", lambda *a: seen.append(image_tensor(*a)) or seen[-1])
    folder, _ = zt_sd("base")
    zd.main(["sample", "--model", str(folder), "--image", path, "--prompt", "x", "--steps", "5", "--device", "cpu",
             "--out", str(tmp_path / "out.png")])
    assert np.asarray(Image.open(tmp_path / "out.png")).shape == (128, 64, 3)
    pixels = seen[0][0]                                           # [3, H, W] in [−1, 1]
    assert pixels.shape == (3, 128, 64) and pixels[0, :56].min() > 0.6 and pixels[2, -56:].min() > 0.6
    trained = torch.from_numpy(np.asarray(data.load_image(path, (64, 128)), dtype=np.float32)).permute(2, 0, 1)
    torch.testing.assert_close(pixels, trained / 255 * 2 - 1)


# ---- zd.py train -------------------------------------------------------------------------------------------------------

# A few tiny demo steps: batch 4 of 16–32 px images, no data workers, no sample grids.
TINY_TRAIN = ["--batch-size", "4", "--workers", "0", "--sample-every", "0", "--log-every", "1", "--save-every", "1000"]


def _train(out, *flags):
    """Run `zd.py train` in this process; returns (unet, ema)."""
    return zd.train(zd.parser().parse_args(["train", "--out", str(out), *TINY_TRAIN, *flags]))


def _state(out):
    return load_file(os.path.join(out, "train_state.safetensors"))


def test_get_lr_warmup_constant_cosine():
    lr = [zd.get_lr(s, 1e-4, 10, 110, "constant") for s in range(200)]
    assert lr[0] == pytest.approx(1e-5) and lr[9] == pytest.approx(1e-4) and set(lr[10:]) == {1e-4}
    cos = [zd.get_lr(s, 1e-4, 10, 110, "cosine") for s in range(111)]
    assert cos[10] == pytest.approx(1e-4) and cos[60] == pytest.approx(5e-5) and cos[110] == pytest.approx(0, abs=1e-12)
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))


def test_sample_noise_depends_on_seed_step_and_index_only():
    """A sample's t, ε, ξ and posterior noise do not depend on its batch (so not on the number of ranks)."""
    t, eps, xi, post, none = zd.sample_noise(0, 7, torch.tensor([3, 5]), (4, 8, 8))
    t1, eps1, xi1, post1, _ = zd.sample_noise(0, 7, torch.tensor([5]), (4, 8, 8))
    assert none is None and torch.equal(t[1:], t1) and torch.equal(eps[1:], eps1) and torch.equal(xi[1:], xi1)
    assert torch.equal(post[1:], post1) and not torch.equal(eps[0], eps[1]) and not torch.equal(eps[1], xi[1])
    assert not torch.equal(zd.sample_noise(0, 8, torch.tensor([5]), (4, 8, 8))[1], eps1)
    assert not torch.equal(zd.sample_noise(1, 7, torch.tensor([5]), (4, 8, 8))[1], eps1)
    ts = zd.sample_noise(0, 0, torch.arange(2000), (1, 1, 1))[0]
    assert ts.min() == 0 and ts.max() == 999 and 400 < ts.float().mean() < 600
    assert zd.sample_noise(0, 0, torch.tensor([1]), (4, 8, 8), inpaint=True)[4].shape == (1, 4, 8, 8)


def test_training_step_feeds_the_recipe(tmp_path, monkeypatch):
    """The UNet's input is √ᾱ·x0 + √(1−ᾱ)·(ε + 0.1·ξ) on the ZT schedule with the sample's own draws, and dropped
    captions reach it as CLIP's encoding of ""; the loss is the min-SNR-weighted v MSE of the rescaled schedule."""
    calls, forward = [], model.UNet.forward

    def spy(self, x, t, context):
        out = forward(self, x, t, context)
        calls.append((x.detach().clone(), t.clone(), context.clone(), out.detach().clone()))
        return out
    monkeypatch.setattr(model.UNet, "forward", spy)
    _train(tmp_path, "--steps", "1", "--caption-dropout", "0.5")
    x_t, t, context, out = calls[0]
    batch = next(data.Loader(["demo"], 4, workers=0, caption_dropout=0.5,
                             **{k: zd.DEMO[k] for k in ("bucket_area", "bucket_min", "bucket_max", "bucket_step")}
                             ).batches())
    t0, eps, xi, _, _ = zd.sample_noise(0, 0, batch["index"], x_t.shape[1:])
    abar = S.alphas_cumprod(S.betas(True))
    assert torch.equal(t, t0)
    torch.testing.assert_close(x_t, S.add_noise(batch["pixels"], eps, abar[t], xi, 0.1))
    sd = zd.demo_model()
    empty = sd.text_encoder(sd.tokenizer([""]))[0]
    assert batch["dropped"].any()
    for i, dropped in enumerate(batch["dropped"].tolist()):
        assert torch.allclose(context[i], empty) == dropped
    loss = S.weighted_mse(out, S.v_target(batch["pixels"], eps, abar[t]), S.min_snr_weight(S.snr(abar[t]), 5, "v"))[0]
    logged = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_training_logs_the_filter_counts_that_zd_data_prints(tmp_path, capsys):
    """The score flags reach the loader of `zd.py train`: its log line of counts is `zd.py data`'s."""
    folder = _data_scored_folder(tmp_path / "f")
    flags = ["--min-aesthetic", "5", "--max-watermark", "0.5", "--max-unsafe", "0.5"]
    zd.main(["data", "--data", folder, *flags, "--sheet", ""])
    surveyed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: kept")]
    _train(tmp_path / "run", "--steps", "1", "--data", folder, "--from-scratch", *flags)
    trained = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: kept")]
    assert surveyed == trained == ["data: kept 6 of 13 images; dropped min-side 1, min-aesthetic 2, max-watermark 2, "
                                   "max-unsafe 1, not an image 1; unscored but kept 5"]
    _train(tmp_path / "run", "--steps", "2", "--resume")  # the filters are settings of the run
    assert "data: kept 6 of 13 images;" in capsys.readouterr().out


def test_shard_training_logs_its_first_epoch_counts_as_zd_data_does(tmp_path, capsys):
    shard = _data_scored_shard(tmp_path / "s.tar")
    kw = dict(min_aesthetic=5, max_watermark=0.5, max_unsafe=0.5, **TINY)
    data.survey(data.Loader([shard], 1, workers=0, **kw))
    surveyed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: kept")]
    assert surveyed == ["data: kept 6 of 14 images; dropped min-side 1, min-aesthetic 2, max-watermark 2, "
                        "max-unsafe 1, no image in sample 1, not an image 1; unscored but kept 5"]
    loader, out = data.Loader([shard], 1, workers=2, **kw), ""  # two readers, each reading every other sample
    for batch in loader.batches():
        out += capsys.readouterr().out
        if "first epoch over" in out or batch["epoch"] > 2:
            break
    assert surveyed[0].replace("data: ", "data: first epoch over the shards: ") in out.splitlines()


def test_resume_is_bit_identical(tmp_path):
    """4 steps in one go == 2 steps, stop, --resume to 4: weights, EMA and optimiser state identical to the bit."""
    _train(tmp_path / "a", "--steps", "4")
    _train(tmp_path / "b", "--steps", "2")
    _train(tmp_path / "b", "--steps", "4", "--resume")
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a.keys() == b.keys() and any(k.startswith("opt.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state = json.loads(open(tmp_path / "b" / "train_state.json").read())
    assert state["step"] == 4 and state["position"] == 3
    assert model.load(tmp_path / "b" / "model_ema.safetensors").meta["prediction"] == "v"


def test_non_finite_loss_skips_the_step_and_stops_after_a_run(tmp_path, monkeypatch):
    """NaN outputs from the 2nd forward on: steps 2.. are skipped (weights, Adam moments and step count untouched; the
    EMA steps toward the unchanged weights) and after --max-bad-steps in a row the run stops with a message and a
    saved state: the one after step 1."""
    _train(tmp_path / "one", "--steps", "1")
    calls, forward = [], model.UNet.forward

    def poisoned(self, x, t, context):
        calls.append(1)
        out = forward(self, x, t, context)
        return out * float("nan") if len(calls) > 1 else out
    monkeypatch.setattr(model.UNet, "forward", poisoned)
    with pytest.raises(zd.UserError, match="3 steps in a row had a non-finite loss"):
        _train(tmp_path / "nan", "--steps", "10", "--max-bad-steps", "3")
    state = json.loads(open(tmp_path / "nan" / "train_state.json").read())
    assert state["step"] == 4 and state["counters"]["skipped"] == 3
    one, nan = _state(tmp_path / "one"), _state(tmp_path / "nan")
    ema = [one[k] for k in one if k.startswith("ema.")]
    for _ in range(3):
        S.ema_update(ema, [one["unet." + k[len("ema."):]] for k in one if k.startswith("ema.")], 0.98)
    for k in one:
        assert torch.equal(one[k], nan[k]), k          # opt.*.step included: still 1


def _checkpoint(path):
    """A tiny SD1.5-layout full checkpoint (ε, unmarked): raw UNet + a different EMA under model_ema.*."""
    torch.manual_seed(0)
    unet, vae, clip = model.UNet(model.UNetConfig.tiny()), model.VAE(model.VAEConfig.tiny()), \
        model.CLIPTextModel(model.CLIPConfig.tiny())
    model.save(path, unet, clip, vae, prediction="eps", ztsnr=False)
    sd = load_file(path)
    ema = {k: v + 0.01 for k, v in sd.items() if k.startswith(model.UNET_PREFIX)}
    save_file({**{k: v for k, v in sd.items() if k not in ("v_pred", "ztsnr")},
               **{model.ema_key(k): v for k, v in ema.items()}}, path)
    return {k[len(model.UNET_PREFIX):]: v for k, v in ema.items()}


@pytest.mark.parametrize("inpaint", [False, True])
def test_fine_tune_a_checkpoint_starts_from_its_ema_and_writes_v_zt_files(tmp_path, inpaint):
    """The real path (VAE latents, CLIP, a checkpoint): with lr 0 the trained UNet and its EMA stay at the checkpoint's
    EMA weights (not its raw ones, and not wiped by an EMA warm-up); the outputs are marked v/ZT with yamls; --inpaint
    expands a 4-channel UNet to 9 channels with zero-initialised new inputs."""
    ema_init = _checkpoint(tmp_path / "sd.safetensors")
    flags = ["--model", str(tmp_path / "sd.safetensors"), "--data", "demo", "--steps", "2", "--lr", "0",
             "--bucket-area", str(64 * 64), "--bucket-min", "64", "--bucket-max", "64", "--text-cache", "0"]
    unet, ema = _train(tmp_path / "out", *flags, *(["--inpaint"] if inpaint else []))
    for name in ("model", "model_ema"):
        sd = model.load(tmp_path / "out" / f"{name}.safetensors")
        assert sd.meta["prediction"] == "v" and sd.meta["ztsnr"] is True and sd.meta["inpaint"] == inpaint
        assert (tmp_path / "out" / f"{name}.yaml").exists()
        for k, v in sd.unet.state_dict().items():
            if inpaint and k == "input_blocks.0.0.weight":
                assert v.shape[1] == 9 and torch.equal(v[:, :4], ema_init[k]) and not v[:, 4:].any()
            else:
                assert torch.equal(v, ema_init[k]), k


def test_resume_without_its_base_model_takes_the_run_s_own_file_or_a_new_model(tmp_path, capsys):
    """--resume after the base model has moved: the run's own model.safetensors holds the frozen CLIP and VAE, so it
    continues exactly as with the base in place; --model gives the base's new place."""
    base, moved = tmp_path / "sd.safetensors", tmp_path / "moved.safetensors"
    _checkpoint(base)
    _train(tmp_path / "a", "--model", str(base), "--data", "demo", "--steps", "1", "--bucket-area", str(64 * 64),
           "--bucket-min", "64", "--bucket-max", "64")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _train(tmp_path / "a", "--resume", "--steps", "2")                            # the base where it was
    base.rename(moved)
    capsys.readouterr()
    zd.main(["train", "--out", str(tmp_path / "b"), *TINY_TRAIN, "--resume", "--steps", "2"])
    assert f"{base} is gone: frozen CLIP and VAE from the run's own {tmp_path / 'b' / 'model.safetensors'}" in \
        capsys.readouterr().out
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    zd.main(["train", "--out", str(tmp_path / "b"), *TINY_TRAIN, "--resume", "--steps", "3", "--model", str(moved)])
    assert f"frozen CLIP and VAE from {moved}; UNet and EMA from the train state" in capsys.readouterr().out


def test_two_ranks_match_one_rank_with_twice_the_batch(tmp_path):
    """torchrun, 2 CPU ranks (gloo) × batch 2 == 1 rank × batch 4 after 3 steps: the same losses and gradient norms at
    every step, and the same weights to float tolerance. (Adam's first steps move a parameter by ≈ lr·sign(g)
    whatever |g|, so parameters with float-noise gradients may differ by up to a few lr: 99.9% agree to 1e-6.)
    Rank 0 validates on its own, and finds what one rank finds."""
    flags = ["--steps", "3", "--workers", "0", "--sample-every", "0", "--log-every", "1", "--device", "cpu",
             "--val-fraction", "0.005", "--val-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd in (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "zd.py", "train", "--out",
                 str(tmp_path / "ddp"), "--batch-size", "2", *flags],
                ["zd.py", "train", "--out", str(tmp_path / "one"), "--batch-size", "4", *flags]):
        run = subprocess.run([sys.executable, *cmd], cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    m_ddp = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl") if "val_loss" not in line]
    m_one = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl") if "val_loss" not in line]
    v_ddp, v_one = _val_lines(tmp_path / "ddp"), _val_lines(tmp_path / "one")
    assert sorted(v_ddp) == sorted(v_one) == [2, 3]
    for step in v_one:
        assert v_ddp[step]["val_loss_by_t"] == pytest.approx(v_one[step]["val_loss_by_t"], rel=1e-4)
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in m_ddp] == pytest.approx([m[key] for m in m_one], rel=1e-5), key
    ddp, one = _state(tmp_path / "ddp"), _state(tmp_path / "one")
    close = total = 0
    for k in one:
        if k.startswith(("unet.", "ema.")):
            torch.testing.assert_close(ddp[k], one[k], rtol=0, atol=3e-4, msg=k)
            close += ((ddp[k] - one[k]).abs() <= 1e-6).sum().item()
            total += one[k].numel()
    assert close / total > 0.999


def test_sigterm_saves_and_stops_cleanly(tmp_path):
    """SIGTERM mid-run (as a scheduler sends it): the step finishes, checkpoints and state are written, exit code 0,
    and --resume continues from that step."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "zd.py", "train", "--out", str(out), "--steps", "100000", *TINY_TRAIN],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log
    step = json.loads((out / "train_state.json").read_text())["step"]
    assert f"SIGTERM: stopped at step {step}, saved in" in log and "Traceback" not in log
    assert "\r" not in log and "step 1/100000  loss" in log             # piped: one line per progress line
    assert 1 <= step < 100000 and model.load(out / "model_ema.safetensors").meta["prediction"] == "v"
    _train(out, "--resume", "--steps", str(step + 1))
    assert json.loads((out / "train_state.json").read_text())["step"] == step + 1


# Runs `zd.py ARGV` in a session of its own and, from inside zd, sends signals to that whole process group (as a
# terminal's Ctrl-C or a job scheduler does) at one place: the first file write (a save), the first denoising step of a
# sample grid, the validation pass's second batch, the demo's score after its first prompt, the data loader's set-up
# (start-up), or at the first step (two Ctrl-C, or SIGTERM then Ctrl-C). It says when it sent them, for the test's log
# of the exit time.
SIGNAL_DRIVER = """
import os, signal, sys, time, data, model, schedule, zd
when, argv = sys.argv[1], sys.argv[2:]
def send(*sigs):
    print(f"signal sent at {time.time()}", file=sys.stderr, flush=True)
    for sig in sigs:
        os.killpg(0, sig)
def patch(owner, name, *sigs):
    original = getattr(owner, name)
    def patched(*a, **k):
        if not patched.sent:
            patched.sent = True
            send(*sigs)
        return original(*a, **k)
    patched.sent = False
    setattr(owner, name, patched)
def second_batch(*a, **k):
    for i, batch in enumerate(fixed_batches(*a, **k)):
        if i == 1:
            send(signal.SIGTERM)
        yield batch
fixed_batches, data.Loader.fixed_batches = data.Loader.fixed_batches, second_batch
{"save": lambda: patch(model, "atomic_write", signal.SIGTERM),
 "grid": lambda: patch(schedule, "ddim_step", signal.SIGTERM), "validation": lambda: None,
 "grid, Ctrl-C": lambda: patch(schedule, "ddim_step", signal.SIGINT),
 "demo score": lambda: patch(data, "demo_judge", signal.SIGTERM),
 "ctrl-c twice": lambda: patch(zd, "sample_noise", signal.SIGINT, signal.SIGINT),
 "sigterm, ctrl-c": lambda: patch(zd, "sample_noise", signal.SIGTERM, signal.SIGINT),
 "start-up": lambda: patch(zd, "make_loader", signal.SIGTERM)}[when]()
zd.main(argv)
"""


def _signalled(when, out, *flags):
    """(exit status, log) of SIGNAL_DRIVER; prints how long the exit took after the signal."""
    run = subprocess.run([sys.executable, "-c", SIGNAL_DRIVER, when, "train", "--out", str(out), *TINY_TRAIN, *flags],
                         cwd=HERE, capture_output=True, text=True, timeout=300, start_new_session=True)
    sent = re.search(r"signal sent at ([\d.]+)", run.stderr)
    print(f"{when}: exited {time.time() - float(sent[1]):.1f} s after the signal" if sent else f"{when}: no signal")
    return run.returncode, run.stdout + run.stderr


@pytest.mark.parametrize("when, flags, step, where, saying", [
    ("save", ["--steps", "6", "--save-every", "3"], 3, "a save", "after this step, saving it first"),   # the first save
    ("grid", ["--steps", "6", "--sample-every", "2"], 2, "a sample grid",                # at a step that is not saved
     "after this step, saving it first"),
    ("grid", ["--steps", "2", "--sample-every", "2"], 2, "a sample grid", "with every finished step saved"),  # after
    ("grid, Ctrl-C", ["--steps", "2", "--sample-every", "2"], 2, "a sample grid",  # the final save; as a terminal sends it
     "with every finished step saved"),
    ("validation", ["--steps", "6", "--val-fraction", "0.005", "--val-every", "2"], 2, "the validation pass",
     "after this step, saving it first"),
    ("demo score", ["--steps", "2", "--sample-every", "9", "--sample-prompt", "a plain black image"], 2,
     "the demo's score", "with every finished step saved")])
def test_a_signal_anywhere_stops_within_seconds_with_the_last_step_saved(tmp_path, when, flags, step, where, saying):
    """SIGTERM to the process group while a save is written lets it finish; during a sample grid, the validation pass
    or the demo's score it abandons them at the next network call, with the step saved before them. Either way the
    last completed step is saved whole, the exit status is 0, the signal's message and the last line say where, and
    --resume continues."""
    code, log = _signalled(when, tmp_path, *flags)
    assert code == 0 and "Traceback" not in log, log
    sig = "SIGINT" if "Ctrl-C" in when else "SIGTERM"
    assert f"{sig}: stopped at step {step}, saved in" in log and f"(signalled during {where})" in log, log
    assert f"{sig}: stopping {saying}" in log, log                    # the message is true where the signal came
    assert f"validation at step {step}:" not in log and "prompts pass" not in log
    if when.startswith("grid"):   # stopped inside its first prompt, between two denoising steps
        assert not re.search(f"sample grid at step {step}: 4/", log)
        assert not (tmp_path / "samples" / f"step_{step:06d}" / "grid.png").exists()
    assert json.loads((tmp_path / "train_state.json").read_text())["step"] == step
    assert model.load(tmp_path / "model.safetensors").meta["prediction"] == "v"
    assert all("val_loss" not in json.loads(line) for line in open(tmp_path / "metrics.jsonl"))
    _train(tmp_path, "--resume", "--steps", str(step + 1))
    assert json.loads((tmp_path / "train_state.json").read_text())["step"] == step + 1


# ---- watching a run: validation loss per timestep, TensorBoard ------------------------------------------------------

VAL = ["--val-fraction", "0.005", "--val-every", "1"]   # ≈ 10 of the demo's 2048 images


def _val_lines(out):
    return {m["step"]: m for m in map(json.loads, open(out / "metrics.jsonl")) if "val_loss" in m}


def test_validation_holds_out_a_fixed_share_never_trained_on(tmp_path):
    """--val-fraction: a seeded share of the images by name, the same every time, in no training batch; the rest train.
    Refused for shards (it would need a pass over all of them)."""
    kw = dict(workers=0, val_fraction=0.1, **TINY)
    train = data.Loader([data.DemoSource(n=300)], 8, **kw)
    val = data.Loader([data.DemoSource(n=300)], 8, validation=True, **kw)
    names = lambda loader: {it.name for it in loader.dataset.items}
    assert not names(train) & names(val) and len(names(train) | names(val)) == 300 and 15 <= len(names(val)) <= 45
    assert names(val) == {it.name for it in data.DemoSource(n=300).items() if data.held_out(0, it.name, 0.1)}
    assert names(val) == names(data.Loader([data.DemoSource(n=300)], 8, validation=True, **kw))     # fixed
    assert names(val) != names(data.Loader([data.DemoSource(n=300)], 8, validation=True, **kw | dict(seed=1)))
    trained = {train.dataset.items[i].name for b in _data_take(train.batches(), 40) for i in b["index"].tolist()}
    assert len(trained) > 200 and not trained & names(val)
    batches = list(val.fixed_batches())                       # every image once, as it is: no dropout, flip or crop
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(len(names(val))))
    assert all(c for b in batches for c in b["captions"]) and all(len(b["index"]) <= 8 for b in batches)
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(batches, val.fixed_batches()))
    shard = _data_scored_shard(tmp_path / "s.tar")           # --val-data shards: every kept sample, each pass
    val = data.Loader([shard], 5, workers=0, min_side=1, validation=True, **TINY)
    for _ in range(2):
        assert [b["index"].tolist() for b in val.fixed_batches()] == [list(range(5)), list(range(5, 10)), [10, 11]]
    with pytest.raises(ValueError, match="--val-data"):
        data.Loader([shard], 1, workers=0, val_fraction=0.1)
    for k in range(40):                                          # a folder's share is by the path within it
        Image.new("RGB", (8, 8)).save(tmp_path / f"{k}.png")
    picked = lambda folder: sorted(os.path.basename(it.name) for it in data.Loader(
        [str(folder)], 1, workers=0, min_side=1, val_fraction=0.3, validation=True).dataset.items)
    moved = shutil.move(tmp_path, tmp_path.with_name("moved"))
    assert picked(moved) == sorted(f"{k}.png" for k in range(40) if data.held_out(0, f"{k}.png", 0.3))


def test_validation_loss_is_the_same_for_the_same_weights_and_across_resume(tmp_path):
    """The validation pass is deterministic: the same checkpoint gives the same numbers twice, and a run stopped and
    resumed logs at step 2 what the run that went straight through logs there. Each t of VAL_T has its plain MSE, and
    the total is the min-SNR-weighted mean: at t = 999 the v weight is 0 (SNR = 0)."""
    _train(tmp_path / "a", "--steps", "2", *VAL)
    _train(tmp_path / "b", "--steps", "1", *VAL)
    _train(tmp_path / "b", "--resume", "--steps", "2")
    a, b = _val_lines(tmp_path / "a"), _val_lines(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2]
    for key in ("val_loss", "val_loss_by_t", "val_ema_loss", "val_ema_loss_by_t"):
        assert a[2][key] == b[2][key], key
    assert list(a[2]["val_loss_by_t"]) == [str(t) for t in zd.VAL_T] and zd.VAL_T[0] == 99 and zd.VAL_T[-1] == 999
    s = zd.settings(zd.parser().parse_args(["train", "--out", str(tmp_path / "a"), "--resume"]))
    nets = zd.load_model(str(tmp_path / "a" / "model.safetensors"), "demo")
    ema = zd.load_model(str(tmp_path / "a" / "model_ema.safetensors"), "demo").unet
    loader = zd.make_loader(s, 0, 1, False, validation=True)
    abar = S.alphas_cumprod(S.betas(True))
    again = [zd.validate(s, 2, nets, nets.unet, ema, loader, abar, S.snr(abar), contextlib.nullcontext(), None,
                         lambda: None) for _ in range(2)]
    for key in ("val_loss", "val_loss_by_t", "val_ema_loss", "val_ema_loss_by_t"):
        assert again[0][key] == again[1][key] == a[2][key], key
    by_t = np.array(list(a[2]["val_loss_by_t"].values()))
    w = S.min_snr_weight(S.snr(abar)[list(zd.VAL_T)], 5.0, "v").numpy()
    assert w[-1] == 0 and a[2]["val_loss"] == pytest.approx((w * by_t).mean(), rel=1e-5)


def test_tensorboard_has_the_scalars_and_grid_and_a_resumed_run_no_step_twice(tmp_path, monkeypatch):
    """--tensorboard writes metrics.jsonl's numbers and the sample grid to OUT/tensorboard, read back with
    tensorboard's own reader. A run resumed from step 2 drops what was logged after it (here a point written at step 3
    after the save, as an interrupted run leaves it), so every step appears once."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    monkeypatch.setattr(zd, "demo_score", lambda *a, **k: [])             # the demo's end, not needed here
    out, flags = tmp_path / "run", ["--tensorboard", *VAL, "--sample-prompt", "a plain black image"]
    _train(out, "--steps", "2", "--sample-every", "2", *flags)
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(out / "tensorboard") as w:
        w.add_scalar("loss", 123.0, 3)
    _train(out, "--resume", "--steps", "3")
    board = accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    tags = board.Tags()["scalars"]
    for tag in ("loss", "lr", "grad_norm", "skipped", "samples_s", "val_loss", "val_loss_by_t/999", "val_ema_loss",
                "val_ema_loss_by_t/999"):
        assert tag in tags, tag
    assert any(tag.startswith("loss_by_t/") for tag in tags)      # the bins this run's few samples fell in
    loss = {e.step: e.value for e in board.Scalars("loss")}
    assert [e.step for e in board.Scalars("loss")] == [1, 2, 3] and loss[3] != 123.0
    assert loss == pytest.approx({m["step"]: m["loss"] for m in map(json.loads, open(out / "metrics.jsonl"))
                                  if "loss" in m})
    assert [e.step for e in board.Scalars("val_loss_by_t/999")] == [1, 2, 3]
    assert [e.step for e in board.Images("samples")] == [2]


def test_tensorboard_missing_is_one_line_naming_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # as if tensorboard were not installed
    err = refused(capsys, "train", "--out", str(tmp_path), "--tensorboard", *TINY_TRAIN)
    assert "pip install tensorboard" in err and not (tmp_path / "train_state.json").exists()


def test_progress_says_something_at_least_every_30_seconds(monkeypatch):
    """A slow run (one step a minute, a line every 100 steps) still prints a line at least every 30 s."""
    clock, lines = [1000.0], []
    monkeypatch.setattr(zd.time, "time", lambda: clock[0])
    progress = zd.Progress(zd.Settings(steps=200), 0, lambda text, **kw: lines.append(text))
    for step in range(1, 4):
        clock[0] += 20
        progress.heartbeat(step)
    assert lines == ["step 2/200  ETA 1:06:00"]       # at 40 s: 2 steps in 40 s, 198 to go at 0.05 it/s


def test_a_cpu_run_with_a_vae_says_what_a_sample_grid_costs(tmp_path, capsys):
    _checkpoint(tmp_path / "sd.safetensors")
    _train(tmp_path / "out", "--model", str(tmp_path / "sd.safetensors"), "--data", "demo", "--steps", "1",
           "--bucket-area", str(64 * 64), "--bucket-min", "64", "--bucket-max", "64", "--sample-every", "1000",
           "--sample-size", "64", "64", "--sample-prompt", "a plain black image")
    out = capsys.readouterr().out
    assert re.search(r"each sample grid takes ≈ \d+ min on this CPU \(4 images, 25 steps, 64×64\)", out)
    assert "--sample-every 0 skips them" in out and (tmp_path / "out" / "samples" / "step_000001" / "grid.png").exists()


def test_a_signal_during_start_up_stops_at_once(tmp_path):
    code, log = _signalled("start-up", tmp_path, "--steps", "3")
    assert code == 0 and "SIGTERM: stopped before training: nothing new to save (signalled during start-up)" in log
    assert "Traceback" not in log and not (tmp_path / "train_state.json").exists(), log


@pytest.mark.parametrize("when, said", [("ctrl-c twice", "second Ctrl-C"), ("sigterm, ctrl-c", "Ctrl-C after SIGTERM")])
def test_a_ctrl_c_after_a_first_signal_quits_at_once(tmp_path, when, said):
    code, log = _signalled(when, tmp_path, "--steps", "3")
    assert code == 130 and f"{said}: quitting now, without saving this step" in log and "Traceback" not in log, log
    assert "(Ctrl-C quits at once, without saving this step)" in log


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_stops_workers_and_trainer_cleanly(tmp_path, sig):
    """A terminal's Ctrl-C, or a job scheduler's SIGTERM to all of a job's processes, reaches the loader's worker
    processes too: they leave it to the trainer, which finishes its step and saves."""
    out = tmp_path / "run"
    flags = [*TINY_TRAIN, "--workers", "2", "--steps", "100000"]         # the last --workers counts
    proc = subprocess.Popen([sys.executable, "zd.py", "train", "--out", str(out), *flags], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, sig)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and f"{sig.name}: stopped at step" in log and "Traceback" not in log, log


# ---- a user's mistakes: one line on stderr naming the problem and the fix, exit status ≠ 0, no traceback, no loss --

def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_new_run_refuses_to_start_over_an_earlier_one(tmp_path, capsys):
    """Forgetting --resume must not replace a run: one line naming --resume, --overwrite and a new --out, nothing
    touched; --overwrite starts over (metrics.jsonl anew)."""
    out = tmp_path / "run"
    _train(out, "--steps", "2")
    before = _files(out)
    err = refused(capsys, "train", "--out", str(out), *TINY_TRAIN, "--steps", "1")
    assert "holds an earlier run" in err and "--resume" in err and "--overwrite" in err and "new --out" in err
    assert _files(out) == before
    assert "give one of them" in refused(capsys, "train", "--out", str(out), "--resume", "--overwrite")
    assert "is the demo, trained from scratch: it takes no --model" in refused(capsys, "train", "--out", str(out),
                                                                              "--resume", "--model", "sd.safetensors")
    zd.main(["train", "--out", str(out), *TINY_TRAIN, "--steps", "1", "--overwrite"])
    assert json.loads((out / "train_state.json").read_text())["step"] == 1
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]
    _train(out, "--resume", "--steps", "2")                  # the saved --overwrite is not a setting of the run
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]


def _bad_files(folder):
    """Files a user mistakes for checkpoints: name → path."""
    folder.mkdir(exist_ok=True)
    files = {"random bytes": folder / "random.ckpt", "torch.save": folder / "real.ckpt",
             "text as .safetensors": folder / "text.safetensors", "huge header": folder / "hostile.safetensors",
             "cut short": folder / "cut.safetensors", "no unet/ folder": folder / "not_a_pipeline"}
    files["random bytes"].write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"state_dict": {"w": torch.zeros(3)}}, files["torch.save"])
    files["text as .safetensors"].write_text("this is a caption, not weights\n" * 20)
    files["huge header"].write_bytes(struct.pack("<Q", 2 ** 60) + b"{}")      # read as is: 1 EB allocated
    save_file({"w": torch.zeros(1000)}, files["cut short"])
    files["cut short"].write_bytes(files["cut short"].read_bytes()[:1000])
    (files["no unet/ folder"] / "vae").mkdir(parents=True)
    return files


@pytest.mark.parametrize("name, message", [
    ("random bytes", "is not a safetensors file"), ("torch.save", "is a pickled checkpoint"),
    ("text as .safetensors", "is not a safetensors file"), ("huge header", "is not a safetensors file"),
    ("cut short", "is cut short"), ("no unet/ folder", "no diffusers pipeline")])
def test_a_file_that_is_no_checkpoint_is_refused_in_one_line(tmp_path, capsys, name, message):
    """Every command that loads a model refuses these in one line, without reading them whole or unpickling."""
    path = str(_bad_files(tmp_path)[name])
    for argv in (["inspect", path], ["sample", "--model", path, "--prompt", "x"],
                 ["convert", path, str(tmp_path / "out.safetensors")],
                 ["train", "--model", path, "--data", "demo", "--out", str(tmp_path / "run")]):
        assert message in refused(capsys, *argv), argv
    assert not (tmp_path / "out.safetensors").exists()


def test_mistakes_in_paths_and_runs(tmp_path, capsys, tiny_file):
    path = str(tiny_file[0])
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    cases = [
        (["sample", "--model", str(tmp_path / "nope.safetensors"), "--prompt", "x"], "no such file or folder"),
        (["train", "--out", str(tmp_path / "none"), "--resume"], "--resume: no run in"),
        (["train", "--out", str(tmp_path / "a_file")], "cannot write to --out"),
        (["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run"), "--model", path],
         "no image file"),
        (["convert", path, str(tmp_path / "no" / "such" / "folder.safetensors")], "does not exist"),
        (["convert", path, str(tmp_path / "x.safetensors"), "--ema"], "without --ema"),
        (["sample", "--model", path, "--prompt", "x", "--prediction", "eps", "--schedule", "zt"],
         "ε-prediction cannot be sampled on the zero-terminal-SNR schedule"),
        (["sample", "--model", path, "--prompt", "x", "--mask", path], "--mask needs --image"),
        (["sample", "--model", path, "--prompt", "x", "--width", "72"], "multiples of 64"),
    ]
    for argv, message in cases:
        assert message in refused(capsys, *argv), argv
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "no").exists()
    Image.new("RGB", (64, 64)).save(tmp_path / "image.png")
    Image.new("L", (32, 32)).save(tmp_path / "mask.png")
    assert "give a mask of the image's size" in refused(capsys, "sample", "--model", path, "--prompt", "x", "--image",
                                                        str(tmp_path / "image.png"), "--mask",
                                                        str(tmp_path / "mask.png"))


def test_every_image_under_min_side_says_which_setting_to_change(tmp_path, capsys):
    (tmp_path / "small").mkdir()
    for i in range(3):
        Image.new("RGB", (200, 200)).save(tmp_path / "small" / f"{i}.png")
    err = refused(capsys, "train", "--model", "x.safetensors", "--data", str(tmp_path / "small"), "--out",
                  str(tmp_path / "run"))
    assert "no such file or folder: x.safetensors" in err           # the model is checked before the data is scanned
    err = refused(capsys, "train", "--data", str(tmp_path / "small"), "--out", str(tmp_path / "run"))
    assert "--data without --model would train the demo's small pixel-space model" in err and "--model SD1.5" in err
    err = refused(capsys, "train", "--data", str(tmp_path / "small"), "--out", str(tmp_path / "run"), "--min-side",
                  "1024", "--batch-size", "2", "--from-scratch")
    assert "no bucket holds a full global batch" in err and "min-side" in err and "batch size" in err


@pytest.mark.parametrize("argv, message", [
    (["sample", "--model", "m", "--prompt", "x", "--steps", "0"], "--steps: 0 is below 1"),
    (["sample", "--model", "m", "--prompt", "x", "--width", "100"], "--width: 100 is not a positive multiple of 8"),
    (["sample", "--model", "m", "--prompt", "x", "--strength", "1.5"], "1.5 is not a probability"),
    (["train", "--batch-size", "0"], "--batch-size: 0 is below 1"),
    (["train", "--caption-dropout", "1.5"], "1.5 is not a probability"),
    (["train", "--sample-size", "24", "30"], "30 is not a positive multiple of 8"),
    (["train", "--prediction", "x0"], "invalid choice: 'x0'"),
    (["train", "--steps", "ten"], "invalid int value: 'ten'"),
    (["schedule", "--steps", "-3"], "--steps: -3 is below 1")])
def test_flag_values_are_checked_where_they_are_parsed(capsys, argv, message):
    assert message in refused(capsys, *argv, status=2)


def test_help_shows_each_setting_s_default_and_meaning(capsys, monkeypatch):
    """train --help: --data's default without --model, not "(default ; demo demo)"; data --help: each flag's meaning,
    not "as train's"."""
    monkeypatch.setenv("COLUMNS", "250")                     # one line per flag
    helps = {}
    for command in ("train", "data"):
        with pytest.raises(SystemExit):
            zd.main([command, "--help"])
        helps[command] = capsys.readouterr().out
    assert "repeatable (without --model: demo)" in helps["train"] and "(default ;" not in helps["train"]
    assert re.search(r"--steps STEPS +optimiser steps \(default 10000; demo 1500\)", helps["train"])
    assert "as train's" not in helps["data"] and "(default None)" not in helps["data"]
    assert re.search(r"--min-side MIN_SIDE +keep images whose original shortest side is ≥ this \(the recipe's data\) "
                     r"\(default 1024\)", helps["data"])
    assert re.search(r"--flip +random horizontal flips \(default off\)", helps["data"])


@pytest.mark.parametrize("argv, message", [
    (["train", "--stpes", "60"], "zd.py train: unrecognized arguments: --stpes 60; did you mean --steps? (see zd.py "
                                 "train --help)"),
    (["train", "--sample_every=5", "--lrr", "1"], "did you mean --sample-every, --lr? (see zd.py train --help)"),
    (["schedule", "--stpes", "3"], "did you mean --steps? (see zd.py schedule --help)"),
    (["schedule", "--xyzzy"], "zd.py schedule: unrecognized arguments: --xyzzy (see zd.py schedule --help)")])
def test_a_mistyped_flag_gets_the_nearest_of_its_subcommand(capsys, argv, message):
    assert message in refused(capsys, *argv, status=2)


def test_a_full_disk_during_a_save_leaves_the_previous_files_whole(tmp_path, capsys, monkeypatch):
    """The second save fails half-way (no space left): the files of the first are unchanged, and the run says so."""
    out = tmp_path / "run"
    _train(out, "--steps", "2", "--save-every", "1")
    files = lambda: {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "metrics.jsonl"}
    before = files()

    def full(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(model, "save_file", full)
    with pytest.raises(zd.UserError, match="No space left on device.*the previous file is intact"):
        _train(out, "--resume", "--steps", "3", "--save-every", "1")
    assert files() == before                                  # the checkpoints and state, and no .tmp left


FULL_DISK_DRIVER = """
import sys, model, zd
from safetensors import SafetensorError
def full(tensors, path, metadata=None):   # what safetensors raises on a full disk: not an OSError
    raise {error}
model.save_file = full
zd.main(sys.argv[1:])
"""


@pytest.mark.parametrize("error", ['SafetensorError("Error while serializing: I/O error: No space left on device '
                                   '(os error 28) at path \\"x\\"")', 'RuntimeError("a bug")'])
def test_a_failed_save_with_loader_workers_exits_at_once(tmp_path, error):
    """safetensors' full-disk error is one line, exit 1; and whatever ends the run, the loader's worker processes end
    with it (left to the interpreter's exit, their join hung for good). A hang fails here by the timeout."""
    run = subprocess.run([sys.executable, "-c", FULL_DISK_DRIVER.format(error=error), "train", "--out",
                          str(tmp_path), *TINY_TRAIN, "--workers", "2", "--steps", "2", "--save-every", "1"],
                         cwd=HERE, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    if "No space" in error:
        assert run.stderr.strip() == f"cannot write {tmp_path / 'model.safetensors'} (No space left on device); the " \
                                     "previous file is intact: free space or choose another folder, then --resume"
    else:
        assert "RuntimeError: a bug" in run.stderr                # a bug keeps its traceback
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_says_what_it_keeps_and_when_there_is_nothing_to_do(tmp_path, capsys):
    """--resume with settings it cannot change: one line saying what is kept and how to change it; --resume of a
    finished run: nothing to do, no file rewritten."""
    _train(tmp_path, "--steps", "1")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir() if p.is_file()}
    capsys.readouterr()
    zd.main(["train", "--out", str(tmp_path), "--resume"])
    assert capsys.readouterr().out == f"train: the run in {tmp_path} is at step 1 of --steps 1: nothing to do (a " \
                                      "larger --steps continues it)\n"
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir() if p.is_file()} == before
    zd.main(["train", "--out", str(tmp_path), *TINY_TRAIN, "--resume", "--steps", "2", "--lr", "0.5", "--batch-size",
             "8"])
    said = [line for line in capsys.readouterr().out.splitlines() if "--resume keeps" in line]
    assert said == ["train: --resume keeps the run's --batch-size 4 (not 8), --lr 0.001 (not 0.5); to change them, "
                    "start a new run: --overwrite, or a new --out"]


def test_a_warm_up_longer_than_the_run_is_said(tmp_path, capsys):
    zd.main(["train", "--out", str(tmp_path), *TINY_TRAIN, "--steps", "2", "--warmup", "500", "--lr", "1e-5"])
    assert "train: warning: --warmup 500 is longer than --steps 2: the lr ends at 4e-08, never reaching --lr 1e-05; " \
           "lower --warmup" in capsys.readouterr().out


def test_zd_s_own_outputs_given_as_a_model_say_what_to_give(tmp_path, capsys):
    """A run folder or its train state where a model belongs: one line naming the run's model_ema.safetensors."""
    _train(tmp_path, "--steps", "1")
    ema = tmp_path / "model_ema.safetensors"
    for command in (["sample", "--prompt", "x", "--model"], ["inspect"]):
        err = refused(capsys, *command, str(tmp_path))
        assert f"{tmp_path} is a zd run folder, not a model: give {ema} (the EMA weights" in err
        err = refused(capsys, *command, str(tmp_path / "train_state.safetensors"))
        assert "is zd's train state (UNet, EMA and optimiser moments, for --resume), not a model: give " \
            + str(ema) in err


def test_checkpoints_are_written_with_the_umask_s_mode(tmp_path):
    """Not the 0600 of safetensors' temporary file: teammates on a shared machine read the checkpoints."""
    umask = os.umask(0o002)
    try:
        zd.main(["train", "--out", str(tmp_path), *TINY_TRAIN, "--steps", "1"])
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir() if p.is_file()}
    finally:
        os.umask(umask)
    assert len(modes) == 5 and set(modes.values()) == {"0o664"}, modes


def test_latent_cache_and_scan_cache_are_written_with_the_umask_s_mode(tmp_path):
    """The latent cache's parts and manifest and a folder's scan cache: others who read the data read them too."""
    ckpt = tmp_path / "sd.safetensors"
    _checkpoint(ckpt)
    src = _cache_images(tmp_path, "folders")
    umask = os.umask(0o002)
    try:
        _cache(ckpt, src, tmp_path / "cache")
    finally:
        os.umask(umask)
    files = [tmp_path / "cache" / data.CACHE_MANIFEST, *(tmp_path / "cache" / "parts").iterdir(),
             os.path.join(src, data.SCAN_CACHE)]
    assert len(files) == 3 and {oct(os.stat(f).st_mode & 0o777) for f in files} == {"0o664"}


def test_a_refusal_shows_its_traceback_with_debug(capsys):
    with pytest.raises(zd.UserError):
        zd.main(["--debug", "sample", "--model", "nope.safetensors", "--prompt", "x"])


def test_demo_command_prints_the_brightness_table(tmp_path, capsys):
    """`zd.py demo` (two short trainings here) prints a row per model with a mean for each prompt."""
    rows = zd.demo(zd.parser().parse_args(["demo", "--out", str(tmp_path), "--steps", "2", "--n", "2"]))
    assert [label for label, _ in rows] == ["zero terminal SNR schedule, v-prediction",
                                            "SD1.5 schedule, eps-prediction"]
    assert all(len(means) == 2 and all(0 <= m <= 255 for m in means) for _, means in rows)
    assert "SD1.5 schedule, eps-prediction" in capsys.readouterr().out
    assert model.load(tmp_path / "demo-sd15-eps" / "model_ema.safetensors").meta["prediction"] == "eps"


def test_demo_judge_regions_match_the_training_shapes():
    """demo_judge reads a shape's colour from the central 2×2 px and the background's from the four 2×2-px corners: on
    the demo's own training circles and squares, loaded at 16×16 as the demo trains on them, every centre pixel is
    inside ≥ 95% of the shapes and every corner pixel inside ≤ 5%, and ≥ 95% of the images score right."""
    images, want = [], []
    for it in data.DemoSource().items():
        words = it.caption.split()
        if words[2] in ("circle", "square"):
            images.append(torch.tensor(np.asarray(data.load_image(it.src, (16, 16))), dtype=torch.float32))
            want.append(torch.tensor([data.DEMO_COLOURS[words[1]], data.DEMO_COLOURS[words[-2]]], dtype=torch.float32))
    x, want = torch.stack(images), torch.stack(want)                             # [N, 16, 16, 3], [N, 2, 3]
    covered = ((x - want[:, None, None, 0]).abs().sum(-1) < (x - want[:, None, None, 1]).abs().sum(-1)).float().mean(0)
    assert zd.DEMO["sample_size"] == (16, 16) and data.buckets(16 * 16, 16, 16, 8) == [(16, 16)] and len(x) > 500
    assert covered[data.DEMO_CENTRE].min() >= 0.95 and covered[data.DEMO_CORNERS].max() <= 0.05
    got = torch.stack([x[:, data.DEMO_CENTRE].mean(1), x[:, data.DEMO_CORNERS].mean(1)], dim=1)
    assert ((got - want).abs() <= 40).flatten(1).all(1).float().mean() >= 0.95


def _fake_samples(monkeypatch, draw):
    """zd.generate replaced by `draw(prompt, i)` → a uint8 [16, 16, 3] image for sample i of a prompt."""
    monkeypatch.setattr(zd, "generate",
                        lambda nets, prompts, **kw: torch.stack([draw(p, i) for i, p in enumerate(prompts)]))


def _painted(shape_colour, background, radius=4):
    """A 16×16 disc of `radius` px at the centre, on a background; colours are RGB triples."""
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    disc = ((yy - 7.5) ** 2 + (xx - 7.5) ** 2 <= radius ** 2)[..., None]
    return torch.where(disc, torch.tensor(shape_colour), torch.tensor(background)).to(torch.uint8)


def test_demo_score_passes_right_images_and_fails_wrong_ones(monkeypatch):
    """demo_score against images painted from the caption: right colours pass; a colour off by more than the tolerance
    (25 for a plain colour, 40 for a shape or background), a missing shape, or two wrong samples of eight fail."""
    colour = lambda word, shift=0: [min(255, max(0, v + shift)) for v in data.DEMO_COLOURS[word]]

    def right(p, i, shift=0, wrong=(), shape=True):
        w = p.split()
        if w[1] == "plain":
            return _painted(colour(w[2], shift), colour(w[2], shift))
        background = colour("white" if i in wrong else w[-2], shift)
        return _painted(colour(w[1], shift) if shape else background, background)
    plain, shapes = [True] * 6, [True] * 6
    cases = [(right, plain + shapes),
             (lambda p, i: right(p, i, shift=20), plain + shapes),                    # within 25 and 40
             (lambda p, i: right(p, i, shift=-35), [True] + [False] * 5 + shapes),    # past 25 (black stays 0)
             (lambda p, i: right(p, i, wrong=(3,)), plain + shapes),                  # 7 of 8 right
             (lambda p, i: right(p, i, wrong=(3, 5)), plain + [False, True] + [False] * 4),   # 6 of 8 (bar white bg)
             (lambda p, i: right(p, i, shape=False), plain + [False] * 6),            # no shape: background only
             (lambda p, i: _painted([128] * 3, [128] * 3), [False] * 12)]             # grey mush
    for draw, expected in cases:
        _fake_samples(monkeypatch, draw)
        rows = zd.demo_score(None)
        assert tuple(r[0] for r in rows) == zd.DEMO_PROMPTS and [r[-1] for r in rows] == expected, rows
    zd.print_demo_score(rows)


@pytest.mark.skipif(not FULL, reason="trains the 1500-step demo (≈ 4 min on 2 quiet cores); ZD_FULL=1 runs it")
def test_demo_model_draws_its_vocabulary(tmp_path):
    """The point of the method, end to end: `python zd.py train` with no arguments (ZT schedule, v-prediction) leaves a
    model whose samples of "a plain black image" are near 0 and of "a plain white image" near 255, and that draws
    every prompt of its vocabulary right by demo_score's thresholds: each plain colour within 25 of the caption's in
    every channel, and in ≥ 7 of 8 samples the shape within 40 of its colour and the background within 40 of its own."""
    zd.train(zd.parser().parse_args(["train", "--out", str(tmp_path), "--sample-every", "0"]))
    sd = model.load(tmp_path / "model_ema.safetensors")
    black, white = (zd.generate(sd, [p] * 8, steps=25, guidance=zd.DEMO_CFG, seed=0, width=16, height=16,
                                progress=False).float().mean().item()
                    for p in ("a plain black image", "a plain white image"))
    assert black <= 5 and white >= 240, (black, white)
    rows = zd.demo_score(sd)
    zd.print_demo_score(rows)
    assert [p for p, *_, ok in rows if not ok] == []


# ---- bench.py ----

@pytest.mark.parametrize("with_diffusers", [True, False])
def test_bench_quick_reports_every_part(with_diffusers):
    """`bench.py --quick --json` runs end to end on the tiny configs and reports each part; without diffusers it
    still runs zd's own columns. Timings are not asserted: they depend on the machine and its load."""
    block = "" if with_diffusers else "import sys; sys.modules['diffusers'] = sys.modules['transformers'] = None; "
    code = f"{block}import bench; bench.main(['--quick', '--json', '--repeats', '1', '--threads', '1'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert {"cpu", "cores", "threads", "torch", "diffusers", "transformers", "dtype", "batch"} <= set(report["info"])
    assert (report["info"]["diffusers"] is not None) == with_diffusers
    assert with_diffusers or "diffusers not installed" in out.stderr
    row = lambda prefix: next(r for r in report["rows"] if r["name"].startswith(prefix))
    for prefix in ("UNet tiny forward,", "UNet tiny forward+backward", "VAE tiny encode", "VAE decode",
                   "CLIP text tiny forward", "training step, UNet tiny", "sampling 2 steps"):
        r = row(prefix)
        assert len(r["ours"]["runs"]) == 1 and r["ours"]["min"] <= r["ours"]["median"] <= r["ours"]["max"]
        assert (r["diffusers"] is not None) == with_diffusers and (r["ratio"] is not None) == with_diffusers
    memory = row("training step")["memory"]
    assert set(memory) == ({"ours", "diffusers"} if with_diffusers else {"ours"})
    assert all(m["peak_gb"] >= m["before_gb"] > 0 for m in memory.values())
    assert row("data pipeline")["data_ips"] > 0 and row("data pipeline")["train_ips"] > 0


def test_gpu_harness_step_is_zd_train_step(tmp_path, monkeypatch):
    """The step that .ci/gpu's parts time, profile and pull levers on (its train_step) is zd.train's own step: one step
    of each from the same checkpoint on the same batch leaves the same UNet and EMA, to the bit (CPU, fp32)."""
    import importlib.util
    monkeypatch.setenv("ZD_GPU_DRYRUN", "1")
    spec = importlib.util.spec_from_file_location("gpu_harness", os.path.join(HERE, ".ci", "gpu.py"))
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    unet, vae, clip = gpu.networks()
    ckpt, jpegs = str(tmp_path / "tiny.safetensors"), str(tmp_path / "jpegs")
    model.save(ckpt, unet, clip, vae, prediction="eps", ztsnr=False)
    gpu.write_jpegs(jpegs, 4)
    args = zd.parser().parse_args(["train", "--model", ckpt, "--data", jpegs, "--out", str(tmp_path / "run"),
                                   "--steps", "1", "--warmup", "0", "--caption-dropout", "0", "--sample-every", "0",
                                   *gpu.train_flags()])
    trained, ema = zd.train(args)

    batch = next(zd.make_loader(zd.settings(args), 0, 1, False).batches())
    H, W = batch["pixels"].shape[-2:]
    inputs = dict(pixels=batch["pixels"], mean=torch.zeros(len(batch["index"]), 4, H // 8, W // 8),
                  captions=batch["captions"], index=batch["index"])
    sd = model.load(ckpt, verbose=False)
    trainer = bench.trainer(sd.unet, bench.OURS_CALL)
    gpu.train_step(trainer, (sd.vae.eval(), sd.text_encoder.eval(), sd.tokenizer), inputs, 0)
    assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), sd.unet.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), trainer[3]))
    assert not torch.equal(next(trained.parameters()), next(unet.parameters()))       # the step moved the weights


def test_peak_bf16_tflops_by_device_name():
    """The fraction of peak divides by the card's dense bf16 peak (vendor sheets, without sparsity), found by the name
    torch reports: a variant (PCIe, NVL) is not taken for its SXM family, and an unknown card has none."""
    names = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H100 NVL": 835, "NVIDIA H200": 989,
             "NVIDIA A100-SXM4-80GB": 312, "NVIDIA L4": None}
    assert {n: bench.peak_bf16_tflops(n) for n in names} == names


def test_gpu_script_dry_run(tmp_path):
    """`ZD_GPU_DRYRUN=1 bash .ci/gpu all` runs every part of the GPU run on the CPU with tiny configs, so the script that
    only a GPU machine runs in earnest cannot rot: each part ends ok and is in gpu.json and gpu.md, its tables with it."""
    env = {**os.environ, "ZD_GPU_DRYRUN": "1", "OUT": str(tmp_path / "out"), "ZD_GPU_WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable}
    run = subprocess.run(["bash", ".ci/gpu", "all"], cwd=HERE, env=env, capture_output=True, text=True, timeout=1700)
    log = (tmp_path / "out" / "gpu.log").read_text()
    assert run.returncode == 0, run.stdout[-2000:] + log[-4000:]
    results = json.loads((tmp_path / "out" / "gpu.json").read_text())
    parts = ("env", "step", "batch", "levers", "train_cache", "sampling_fp16", "speed", "correctness", "train", "nan",
             "torchrun", "train_gc")
    assert {p: results[p]["status"] for p in parts} == {p: "ok" for p in parts}
    assert results["train"]["--resume to 4"]["ok"] and results["nan"]["non-finite steps skipped"]["weights_unchanged"]
    phases = results["step"]["phases"]
    assert {"VAE encode", "forward", "backward", "clip grad norm", "AdamW", "EMA"} <= set(phases)
    assert all(phases[p]["zd"]["ms"] > 0 for p in ("forward", "backward", "AdamW"))
    assert set(results["batch"]["rows"]) == {"1", "2"} and len(results["levers"]["rows"]) == 9
    assert results["sampling_fp16"]["pairs"]["zd fp32 vs diffusers fp32"]["max"] <= 2
    md = (tmp_path / "out" / "gpu.md").read_text()
    assert "DRY RUN" in md and all(f"## {p}: ok" in md for p in parts) and "partial results" not in md
    for header in ("| phase | zd ms |", "| batch | zd ms/step |", "| lever | ms/step |", "| images | mean abs."):
        assert header in md


# ---- the latent cache ------------------------------------------------------------------------------------------------

CACHE_BUCKETS = ["--min-side", "0", "--bucket-area", str(64 * 128), "--bucket-min", "64", "--bucket-max", "128",
                 "--bucket-step", "64"]   # 64×128 and 128×64: latents of 8×16 and 16×8, which the tiny UNet halves 3×


def _cache_images(tmp_path, layout):
    """12 noise JPEGs with captions, 6 per bucket (one of them undecodable), as a folder or as two tar shards."""
    samples = []
    for i in range(12):
        size = (80 + i, 150 + 2 * i) if i % 2 else (150 + 2 * i, 80 + i)   # odd: portrait, to 64×128
        raw = _data_noise_jpeg(size, seed=i)
        samples.append((f"{i:03d}", {"jpg": raw[:len(raw) // 2] if i == 5 else raw, "txt": f"image {i}".encode()}))
    if layout == "shards":
        _data_shard(tmp_path / "a.tar", samples[:7])
        _data_shard(tmp_path / "b.tar", samples[7:])
        return str(tmp_path / "*.tar")
    folder = tmp_path / "images"
    folder.mkdir()
    for key, files in samples:
        for ext, raw in files.items():
            (folder / f"{key}.{ext}").write_bytes(raw)
    return str(folder)


def _cache(ckpt, src, out, *flags):
    zd.main(["cache", "--model", str(ckpt), "--data", src, "--out", str(out), "--workers", "0", *CACHE_BUCKETS,
             *flags])


@pytest.mark.parametrize("layout", ["folders", "shards"])
def test_training_from_the_latent_cache_is_bit_identical_and_resumes(tmp_path, monkeypatch, capsys, layout):
    """Issue 19: 4 steps from the images == 2 steps from the cache, stop, --resume to 4, to the bit (weights, EMA,
    AdamW moments): the same crops, flips, order, caption dropout and posterior noise, with the moments of the cache
    (encoded in batches of 3, not 4; an undecodable image skipped in the same place). The VAE never runs."""
    ckpt = tmp_path / "sd.safetensors"
    _checkpoint(ckpt)
    src = _cache_images(tmp_path, layout)
    _cache(ckpt, src, tmp_path / "cache", "--flip", "--batch-size", "3")
    assert "cache: 12 images in" in capsys.readouterr().out
    flags = ["--model", str(ckpt), *CACHE_BUCKETS, "--flip", "--caption-dropout", "0.5", "--lr", "1e-3", "--warmup",
             "0", "--text-cache", "0"]
    _train(tmp_path / "a", "--data", src, "--steps", "4", *flags)
    monkeypatch.setattr(model.VAE, "encode", lambda *a: pytest.fail("the VAE ran while training from a cache"))
    _train(tmp_path / "b", "--data", str(tmp_path / "cache"), "--steps", "2", *flags)
    _train(tmp_path / "b", "--steps", "4", "--resume")
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    capsys.readouterr()
    zd.main(["data", "--data", str(tmp_path / "cache")])
    report = capsys.readouterr().out
    assert "11 images" in report and "1 undecodable" in report and "64×128: 5, 128×64: 6" in report


def _refused(capsys, *argv):
    """The one line `zd.py ARGV` exits with (status 1)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        zd.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "\n" not in err and "Traceback" not in err, err
    return err


def test_latent_cache_resumes_and_refuses_in_one_line(tmp_path, monkeypatch, capsys):
    """An interrupted cache (a signal between batches, a full disk) leaves whole parts only, is refused by train as
    unfinished, and continues when the command runs again; another VAE, other crop settings, --random-crop and a
    foreign --out are refused in one line naming the mismatch."""
    monkeypatch.setattr(data, "CACHE_PART_IMAGES", 4)
    ckpt, src, out = tmp_path / "sd.safetensors", _cache_images(tmp_path, "folders"), tmp_path / "cache"
    _checkpoint(ckpt)
    moments = model.SD.moments

    def interrupted(self, pixels):     # SIGINT during the first batch: the cache stops after it, before any part
        signal.raise_signal(signal.SIGINT)
        return moments(self, pixels)
    monkeypatch.setattr(model.SD, "moments", interrupted)
    _cache(ckpt, src, out)
    assert "SIGINT: stopped after 0 of 3 parts" in capsys.readouterr().out
    monkeypatch.setattr(model.SD, "moments", moments)
    train = ["train", "--model", ckpt, "--out", tmp_path / "run", *CACHE_BUCKETS, *TINY_TRAIN, "--steps", "1"]
    assert "unfinished latent cache" in _refused(capsys, *train, "--data", out)

    write, calls = data.save_file, []

    def full_disk(tensors, path, metadata=None):       # the third part finds the disk full halfway through
        calls.append(path)
        write(tensors, path, metadata)
        if len(calls) == 3:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(data, "save_file", full_disk)
    err = _refused(capsys, "cache", "--model", ckpt, "--data", src, "--out", out, "--workers", "0", *CACHE_BUCKETS)
    assert "No space left on device" in err and "the 2 parts written before it are whole" in err
    assert sorted(os.listdir(out / "parts")) == ["00000.safetensors", "00001.safetensors"]
    assert not (out / data.CACHE_MANIFEST).exists()
    monkeypatch.setattr(data, "save_file", write)
    first = (out / "parts" / "00000.safetensors").read_bytes()
    _cache(ckpt, src, out)
    assert "2 written before" in capsys.readouterr().out and (out / data.CACHE_MANIFEST).exists()
    assert (out / "parts" / "00000.safetensors").read_bytes() == first

    other = tmp_path / "other.safetensors"     # the same checkpoint with one VAE weight changed
    sd = load_file(ckpt)
    sd["first_stage_model.quant_conv.bias"] = sd["first_stage_model.quant_conv.bias"] + 1e-3
    save_file(sd, other)
    assert "was made by another VAE" in _refused(capsys, *train[:2], other, *train[3:], "--data", out)
    assert "is a latent cache: train from it with --model" in _refused(capsys, *train[:1], *train[3:], "--data", out)
    assert "(--flip: cache False, run True)" in _refused(capsys, *train, "--data", out, "--flip")
    assert "(--bucket-area: cache 8192, run 4096)" in _refused(capsys, *train, "--data", out, "--bucket-area", 4096)
    assert "--random-crop draws a new crop" in _refused(capsys, *train, "--data", out, "--random-crop")
    assert "inpainting draws a new mask every epoch" in _refused(capsys, *train, "--data", out, "--inpaint")
    assert "--random-crop draws a new crop" in _refused(capsys, "cache", "--model", ckpt, "--data", src, "--out",
                                                        tmp_path / "c2", *CACHE_BUCKETS, "--random-crop")
    assert "made by other settings" in _refused(capsys, "cache", "--model", ckpt, "--data", src, "--out", out,
                                                "--workers", "0", *CACHE_BUCKETS, "--flip")


def test_validation_from_a_latent_cache_equals_validation_from_its_images(tmp_path, monkeypatch):
    """--val-data may be a latent cache: its validation pass reads the moments of the same centre crops and draws the
    same noise, so the numbers equal those from the images, to the bit (CPU, fp32), and the VAE stays unused."""
    ckpt = tmp_path / "sd.safetensors"
    _checkpoint(ckpt)
    src = _cache_images(tmp_path, "folders")
    _cache(ckpt, src, tmp_path / "cache")
    flags = ["--model", str(ckpt), *CACHE_BUCKETS, "--steps", "1", "--warmup", "0", "--text-cache", "0",
             "--val-every", "1"]
    _train(tmp_path / "a", "--data", src, "--val-data", src, *flags)
    monkeypatch.setattr(model.VAE, "encode", lambda *a: pytest.fail("the VAE ran on a cache's validation set"))
    _train(tmp_path / "b", "--data", str(tmp_path / "cache"), "--val-data", str(tmp_path / "cache"), *flags)
    a, b = _val_lines(tmp_path / "a")[1], _val_lines(tmp_path / "b")[1]
    assert a["val_images"] == b["val_images"] > 0
    for key in ("val_loss", "val_loss_by_t", "val_ema_loss", "val_ema_loss_by_t"):
        assert a[key] == b[key], key


def test_fp16_latent_cache_prints_its_error_against_fp32(tmp_path, capsys):
    """--dtype fp16 halves the cache and prints what it costs, measured against fp32 on the same images: the
    difference of the two caches' moments, read back."""
    ckpt, src = tmp_path / "sd.safetensors", _cache_images(tmp_path, "folders")
    _checkpoint(ckpt)
    _cache(ckpt, src, tmp_path / "fp32", "--workers", "2")
    _cache(ckpt, src, tmp_path / "fp16", "--dtype", "fp16")
    line = [x for x in capsys.readouterr().out.splitlines() if "fp16 storage against fp32" in x][0]
    exact, half = (data.Loader([str(tmp_path / d)], 1, workers=0, min_side=0, bucket_area=64 * 128, bucket_min=64,
                               bucket_max=128, bucket_step=64) for d in ("fp32", "fp16"))
    worst = 0.0
    for item32, item16 in zip(exact.dataset.items, half.dataset.items):
        if item32.src.error is None:
            a, b = data.read_latent(item32.src), data.read_latent(item16.src)
            assert b.dtype == torch.float32 and not torch.equal(a, b)
            worst = max(worst, (a[0] - b[0]).abs().max().item())
    assert f"posterior mean max |Δ| {worst:.2e}" in line
    size = {d: sum(f.stat().st_size for f in (tmp_path / d / "parts").iterdir()) for d in ("fp32", "fp16")}
    assert size["fp16"] < 0.6 * size["fp32"]
