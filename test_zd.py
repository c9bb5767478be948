"""zd's executable spec: every equation against an independent value (a second formula, a paper's number, diffusers or
transformers as oracles), and a test for each pitfall of SPEC §7.   Run: python -m pytest -q test_zd.py"""
import json
import math
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import schedule as S
import zd

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- schedule.py: the ZT math -----------------------------------------------------------------------------------------

from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg  # noqa: E402
from diffusers.training_utils import compute_snr  # noqa: E402

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ZT = S.alphas_cumprod(S.betas())
ZT_SNR = S.snr(ZT)


def test_paper_numbers():
    """SPEC §2's reference values (float64), recomputed independently of the code under test where cheap."""
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
    """SPEC §7.8: the schedule is never held in fp16. ᾱ_998 in fp16 is a subnormal 5% off; √ᾱ taken in float64 and
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
    SPEC §7.1: weights from the *rescaled* SNR (t = 999 weighs 0, not SD1.5's 0.0047).
    SPEC §7.2: ε weight at SNR = 0 is finite. SPEC §7.3: not min(SNR + 1, γ)/(SNR + 1)."""
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
    """Ning et al. 2023: x_t uses ε + γξ, the v target uses the clean ε (SPEC §7.4)."""
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
    """SPEC §7.7: an ε model on the ZT schedule would divide by √ᾱ_999 = 0; refused with a clear error."""
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
    """Lin Table 2 lists; SPEC §7.6: the first step is 999, and the previous step is looked up in the list
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
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x_ref, x = x0.clone(), x0.double()
    for i, t in enumerate(ts.tolist()):
        x_ref = ref.step(_fake_model(x_ref, t), t, x_ref).prev_sample
        x = S.ddim_step(x, _fake_model(x, t), abar[t], S.abar_at(abar, S.prev_timestep(ts, i)), pred)
    torch.testing.assert_close(x.float(), x_ref, rtol=1e-4, atol=1e-4)


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
    torch.testing.assert_close(S.cfg(u, c, 7.5, phi), ref, rtol=1e-5, atol=1e-5)
    if phi == 1.0:   # Lin Alg. 2 with φ = 1: the guided output has the conditional output's std, per sample
        torch.testing.assert_close(S.cfg(u, c, 7.5, 1.0).std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)))


def test_ema_closed_form_and_no_warmup():
    """e_n = p + (e0 − p)·dⁿ for constant p; the default decay is constant from step 1, so one update moves the EMA by
    (1 − d) of the gap and does not wipe the init (SPEC §7.5)."""
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


def test_vectors_file(tmp_path):
    """The golden-vector file has the issue's tensors, each described, and they agree with independent recomputation."""
    out = tmp_path / "v.safetensors"
    zd.main(["vectors", "--out", str(out)])
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        desc = json.loads(f.metadata()["zd.description"])
        v = {k: f.get_tensor(k) for k in f.keys()}
    required = ["sd15.alphas_cumprod", "zt.betas", "zt.alphas_cumprod", "zt.snr", "zt.min_snr_weight.v",
                "zt.min_snr_weight.eps", "timesteps.trailing.10", "timesteps.trailing.13", "timesteps.trailing.25",
                "timesteps.trailing.50", "forward.x0", "forward.noise", "forward.ip_noise", "forward.t",
                "forward.x_t", "forward.v_target", "cfg.uncond", "cfg.cond", "cfg.out", "ddim.x_t", "ddim.model_v",
                "ddim.t", "ddim.t_prev", "ddim.x_prev"]
    assert set(required) <= set(v) and set(desc) == set(v)
    for k in ("zt.betas", "zt.alphas_cumprod", "zt.snr", "sd15.alphas_cumprod"):
        assert v[k].dtype == torch.float64 and v[k].shape == (1000,)
    assert v["timesteps.trailing.13"].dtype == torch.int64 and v["timesteps.trailing.13"][0].item() == 999
    assert {0, 500, 998, 999} <= set(v["forward.t"].tolist())
    a = v["zt.alphas_cumprod"][v["forward.t"]].view(-1, 1, 1, 1)
    x0, eps, xi = v["forward.x0"], v["forward.noise"], v["forward.ip_noise"]
    torch.testing.assert_close(v["forward.x_t"], a.sqrt() * x0 + (1 - a).sqrt() * (eps + 0.1 * xi))
    torch.testing.assert_close(v["forward.v_target"], a.sqrt() * eps - (1 - a).sqrt() * x0)
    u, c = v["cfg.uncond"], v["cfg.cond"]
    torch.testing.assert_close(v["cfg.out"], rescale_noise_cfg(u + 7.5 * (c - u), c, 0.7))
    at = v["zt.alphas_cumprod"][v["ddim.t"]].view(-1, 1, 1, 1)
    ap = torch.stack([v["zt.alphas_cumprod"][t] if t >= 0 else torch.tensor(1.0, dtype=torch.float64)
                      for t in v["ddim.t_prev"].tolist()]).view(-1, 1, 1, 1)
    x_t, m = v["ddim.x_t"], v["ddim.model_v"]
    x0_hat, eps_hat = at.sqrt() * x_t - (1 - at).sqrt() * m, (1 - at).sqrt() * x_t + at.sqrt() * m
    torch.testing.assert_close(v["ddim.x_prev"], ap.sqrt() * x0_hat + (1 - ap).sqrt() * eps_hat)


def test_schedule_cli(capsys):
    zd.main(["schedule", "--steps", "13"])
    out = capsys.readouterr().out
    assert "[999, 922, 845" in out and "zero terminal SNR" in out
    zd.main(["schedule", "--csv", "--no-zt"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1001 and lines[0].startswith("t,beta,abar")
    assert float(lines[-1].split(",")[2]) == pytest.approx(0.0046601, rel=1e-4)


def test_cli_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "zd.py", "--help"], cwd=HERE, capture_output=True, text=True, check=True).stdout
    commands = [c for c in ("schedule", "vectors", "convert", "merge", "inspect", "train", "sample", "bench")
                if f"    {c} " in out]
    assert {"schedule", "vectors"} <= set(commands)
    for c in commands:
        subprocess.run([sys.executable, "zd.py", c, "--help"], cwd=HERE, capture_output=True, check=True)
