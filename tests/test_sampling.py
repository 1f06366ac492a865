"""engine.sampling against independent references: published formulas, closed-form solutions, and diffusers' UniPC.

The toy data distribution used throughout is Gaussian, N(MU, SD^2) per element: its exact denoiser is
D(x; sigma) = MU + SD^2 / (SD^2 + sigma^2) (x - MU), and the probability-flow ODE from sigma_0 has the exact
solution x(sigma) = MU + sqrt(SD^2 + sigma^2) / sqrt(SD^2 + sigma_0^2) (x_0 - MU), so every ODE sampler has a known
answer, and every SDE sampler must end at mean MU and standard deviation SD.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch

from engine.sampling import ksampler, model_sampling as ms, samplers as S, schedules as sch
from engine.sampling.guidance import Cond, cfg_model

MU, SD = 0.3, 0.5
SEEDED = {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde",
          "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm"}


@pytest.fixture(autouse=True)
def _quiet_brownian_tree():
    # torchsde warns when a query touches the tree's end point after its internal rounding, as it does in ComfyUI.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Should have t")
        yield


@pytest.fixture(scope="module")
def sd() -> ms.ModelSampling:
    return ms.ModelSampling()


def gaussian_denoiser(x, sigma, **extra):
    s = sigma.view(-1, *([1] * (x.ndim - 1)))
    return MU + SD**2 / (SD**2 + s**2) * (x - MU)


def exact_flow(x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
    return MU + math.sqrt(SD**2 + sigma_end**2) / math.sqrt(SD**2 + sigma_start**2) * (x_start - MU)


def reference_sigma_table() -> np.ndarray:
    """Ho et al. 2020's 'scaled linear' betas for SD (0.00085 to 0.012), in float64 numpy."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def sigma_at(table: np.ndarray, t: float) -> float:
    """Log-linear interpolation of the table at fractional timestep t, in float64."""
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    return math.exp((1 - w) * math.log(table[lo]) + w * math.log(table[hi]))


# ---------------------------------------------------------------------------------------------------------------
# model_sampling
# ---------------------------------------------------------------------------------------------------------------


def test_sigma_table_matches_the_ddpm_schedule(sd):
    ref = reference_sigma_table()
    assert sd.sigmas.dtype == torch.float32 and sd.sigmas.shape == (1000,)
    rel = np.abs(sd.sigmas.numpy().astype(np.float64) / ref - 1).max()
    assert rel < 1e-7, f"max relative error {rel:.2e}"  # observed ~6e-8: float32 rounding
    assert float(sd.sigma_max) == pytest.approx(14.6146, abs=1e-4)
    assert float(sd.sigma_min) == pytest.approx(0.0292, abs=1e-4)


def test_sigma_table_matches_diffusers(sd):
    from diffusers import DDPMScheduler

    ac = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod.double()
    ref = ((1 - ac) / ac) ** 0.5
    rel = (sd.sigmas.double() / ref - 1).abs().max().item()
    assert rel < 2e-5, f"max relative error {rel:.2e}"  # diffusers builds its betas in float32


def test_timestep_and_sigma_round_trip(sd):
    steps = torch.arange(1000)
    assert torch.equal(sd.timestep(sd.sigmas), steps)
    rel = (sd.sigma(steps) / sd.sigmas - 1).abs().max().item()
    assert rel < 1e-6, f"{rel:.2e}"
    half = sd.sigma(torch.tensor([10.5, 500.25]))
    ref = reference_sigma_table()
    assert half[0].item() == pytest.approx(sigma_at(ref, 10.5), rel=1e-6)
    assert half[1].item() == pytest.approx(sigma_at(ref, 500.25), rel=1e-6)
    assert torch.equal(sd.timestep(half), torch.tensor([10, 500]))  # nearest, not rounded up
    assert torch.equal(sd.timestep(torch.tensor(100.0)), torch.tensor(999))  # above the table: the top


def test_percent_to_sigma(sd):
    assert sd.percent_to_sigma(0.0) == 999999999.9
    assert sd.percent_to_sigma(1.0) == 0.0
    assert sd.percent_to_sigma(0.5) == pytest.approx(sigma_at(reference_sigma_table(), 499.5), rel=1e-6)


def test_eps_and_v_parameterisations():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    out = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    sigma = torch.tensor([0.5, 3.0], dtype=torch.float64)
    s = sigma.view(2, 1, 1, 1)
    eps, v = ms.ModelSampling("eps"), ms.ModelSampling("v")
    torch.testing.assert_close(eps.calculate_input(sigma, x), x / (s**2 + 1).sqrt(), rtol=0, atol=0)
    torch.testing.assert_close(eps.calculate_denoised(sigma, out, x), x - s * out, rtol=0, atol=1e-15)
    # v = alpha eps - sigma_vp x0 with alpha = 1/sqrt(1+s^2): x0 = alpha x_vp - sigma_vp v, x_vp = x / sqrt(1+s^2)
    alpha, sigma_vp = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
    torch.testing.assert_close(v.calculate_denoised(sigma, out, x), alpha * (alpha * x) - sigma_vp * out)
    with pytest.raises(ValueError, match="prediction"):
        ms.ModelSampling("x0")


def test_noise_scaling(sd):
    noise, latent = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    sigma = torch.tensor(3.0)
    assert torch.equal(sd.noise_scaling(sigma, noise, latent), noise * 3.0 + latent)
    assert torch.equal(sd.noise_scaling(sigma, noise, latent, max_denoise=True), noise * math.sqrt(10.0) + latent)
    assert sd.inverse_noise_scaling(sigma, latent) is latent


def test_latent_formats():
    latent = torch.ones(1, 4, 2, 2)
    assert torch.equal(ms.SD15_LATENT.process_in(latent), latent * 0.18215)
    assert torch.equal(ms.SDXL_LATENT.process_out(latent), latent / 0.13025)


def test_make_denoiser_scales_input_timestep_and_dtype(sd):
    seen = {}

    def network(x, t, context, y):
        seen.update(x=x, t=t, context=context, y=y)
        return torch.ones_like(x)  # eps = 1

    model_fn = ms.make_denoiser(network, sd, torch.float64)
    x = torch.full((2, 4, 2, 2), 2.0)
    sigma = sd.sigmas[[999, 500]]
    denoised = model_fn(x, sigma, torch.zeros(2, 3, 8), torch.zeros(2, 5))
    assert seen["x"].dtype == torch.float64 and seen["context"].dtype == torch.float64
    assert torch.equal(seen["t"], torch.tensor([999.0, 500.0]))
    torch.testing.assert_close(seen["x"][:, 0, 0, 0].float(), 2.0 / (sigma**2 + 1).sqrt())
    assert denoised.dtype == torch.float32
    torch.testing.assert_close(denoised[:, 0, 0, 0], 2.0 - sigma)


# ---------------------------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------------------------


def assert_schedule(got: torch.Tensor, want, rel: float = 2e-6) -> float:
    want = np.asarray(want, dtype=np.float64)
    assert got.dtype == torch.float32 and got.shape == want.shape, (got.shape, want.shape)
    g = got.double().numpy()
    err = float(np.max(np.abs(g - want) / np.maximum(np.abs(want), 1e-12)))
    assert err < rel, f"max relative error {err:.2e}"
    return err


@pytest.mark.parametrize("steps", [1, 7, 20, 30])
def test_simple(sd, steps):
    table = reference_sigma_table()
    want = [table[999 - int(i * 1000 / steps)] for i in range(steps)] + [0.0]
    assert_schedule(sch.SCHEDULERS["simple"](sd, steps), want)


@pytest.mark.parametrize("steps", [7, 10, 30])
def test_ddim_uniform_uses_an_integer_stride_from_timestep_1(sd, steps):
    table = reference_sigma_table()
    want = [table[t] for t in range(1, 1000, 1000 // steps)][::-1] + [0.0]
    got = sch.SCHEDULERS["ddim_uniform"](sd, steps)
    assert_schedule(got, want)
    assert len(got) == {7: 9, 10: 11, 30: 32}[steps]  # 1000 // 7 = 142 gives 8 sigmas, 1000 // 30 = 33 gives 31


@pytest.mark.parametrize("steps", [1, 9, 25])
def test_normal_and_sgm_uniform_space_timesteps_evenly(sd, steps):
    table = reference_sigma_table()
    normal = [sigma_at(table, t) for t in np.linspace(999, 0, steps)] + [0.0]
    sgm = [sigma_at(table, t) for t in np.linspace(999, 0, steps + 1)[:-1]] + [0.0]
    assert_schedule(sch.SCHEDULERS["normal"](sd, steps), normal)
    assert_schedule(sch.SCHEDULERS["sgm_uniform"](sd, steps), sgm)


def test_karras_exponential_polyexponential_formulas(sd):
    n, lo, hi = 12, float(sd.sigma_min), float(sd.sigma_max)
    ramp = np.linspace(0, 1, n)
    karras = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    assert_schedule(sch.SCHEDULERS["karras"](sd, n), list(karras) + [0.0])
    assert_schedule(sch.get_sigmas_karras(n, lo, hi, rho=3.0),
                    list((hi ** (1 / 3) + ramp * (lo ** (1 / 3) - hi ** (1 / 3))) ** 3) + [0.0])
    expo = np.exp(np.linspace(math.log(hi), math.log(lo), n))
    assert_schedule(sch.SCHEDULERS["exponential"](sd, n), list(expo) + [0.0])
    assert_schedule(sch.get_sigmas_polyexponential(n, lo, hi, rho=1.0), list(expo) + [0.0])
    poly = np.exp(np.linspace(1, 0, n) ** 2 * (math.log(hi) - math.log(lo)) + math.log(lo))
    assert_schedule(sch.get_sigmas_polyexponential(n, lo, hi, rho=2.0), list(poly) + [0.0])
    t = np.linspace(1, 1e-3, n)
    assert_schedule(sch.get_sigmas_vp(n), list(np.sqrt(np.expm1(19.9 * t**2 / 2 + 0.1 * t))) + [0.0])


@pytest.mark.parametrize("steps", [2, 10, 40])
def test_kl_optimal(sd, steps):
    lo, hi = float(sd.sigma_min), float(sd.sigma_max)
    frac = np.arange(steps) / (steps - 1)
    want = np.tan(frac * math.atan(lo) + (1 - frac) * math.atan(hi))
    assert_schedule(sch.SCHEDULERS["kl_optimal"](sd, steps), list(want) + [0.0], rel=1e-5)


def test_kl_optimal_refuses_one_step(sd):
    with pytest.raises(ValueError, match="at least 2"):
        sch.SCHEDULERS["kl_optimal"](sd, 1)


@pytest.mark.parametrize("steps", [10, 300])
def test_beta_uses_beta_quantiles_and_drops_repeated_timesteps(sd, steps):
    table = reference_sigma_table()
    ts = np.rint(scipy.stats.beta.ppf(1 - np.arange(steps) / steps, 0.6, 0.6) * 999).astype(int)
    kept = [t for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]
    got = sch.SCHEDULERS["beta"](sd, steps)
    assert_schedule(got, [table[t] for t in kept] + [0.0])
    assert float(got[0]) == pytest.approx(table[999], rel=1e-7)  # ppf(1) = 1
    if steps == 300:
        assert len(got) == 294  # 7 rounded timesteps repeat and are dropped


@pytest.mark.parametrize("steps", [1, 8, 25])
def test_linear_quadratic(sd, steps):
    got = sch.SCHEDULERS["linear_quadratic"](sd, steps)
    hi = float(sd.sigma_max)
    assert len(got) == steps + 1 and float(got[-1]) == 0.0 and float(got[0]) == pytest.approx(hi, rel=1e-7)
    if steps == 1:
        return
    linear_steps = steps // 2
    # The first half lowers the noise level linearly by threshold_noise = 0.025 in total ...
    want_linear = [hi * (1 - i * 0.025 / linear_steps) for i in range(linear_steps + 1)]
    assert_schedule(got[: linear_steps + 1], want_linear)
    # ... and the second half is a quadratic in the step index through (linear_steps, 0.025) and (steps, 1).
    frac = 1 - got.double().numpy()[linear_steps:] / hi
    idx = np.arange(linear_steps, steps + 1)
    coef = np.polyfit(idx, frac, 2)
    assert np.abs(np.polyval(coef, idx) - frac).max() < 1e-6
    assert np.all(np.diff(got.numpy()) < 0)


def test_scheduler_table_names_and_errors(sd):
    assert list(sch.SCHEDULERS) == ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta",
                                    "normal", "linear_quadratic", "kl_optimal"]
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        sch.scheduler_sigmas(sd, "nope", 10)


# ---------------------------------------------------------------------------------------------------------------
# samplers: shared pieces
# ---------------------------------------------------------------------------------------------------------------


def test_sampler_table_and_discard_set():
    assert list(S.SAMPLERS) == [
        "euler", "euler_ancestral", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive",
        "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
        "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "ddim", "uni_pc", "uni_pc_bh2",
    ]
    assert S.DISCARD_PENULTIMATE_SIGMA_SAMPLERS == {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}
    with pytest.raises(ValueError, match="unknown sampler"):
        S.get_sampler("euler_a")


def test_get_ancestral_step():
    s_from, s_to = torch.tensor(2.0), torch.tensor(1.5)
    down, up = S.get_ancestral_step(s_from, s_to, eta=1.0)
    assert float(up) == pytest.approx(math.sqrt(1.5**2 * (4 - 1.5**2) / 4), rel=1e-6)
    assert float(down**2 + up**2) == pytest.approx(1.5**2, rel=1e-6)
    down, up = S.get_ancestral_step(s_from, s_to, eta=0.0)
    assert down is s_to and up == 0.0
    down, up = S.get_ancestral_step(s_from, s_to, eta=10.0)  # capped at sigma_to: nothing left deterministic
    assert float(up) == 1.5 and float(down) == 0.0


def test_default_noise_sampler_is_seeded_like_comfyui():
    x = torch.zeros(1, 4, 3, 3)
    draws = S.default_noise_sampler(x, seed=5)
    ref = torch.Generator().manual_seed(6)  # seed + 1 on the CPU
    assert torch.equal(draws(None, None), torch.randn(1, 4, 3, 3, generator=ref))
    assert torch.equal(draws(None, None), torch.randn(1, 4, 3, 3, generator=ref))


def test_brownian_tree_noise_sampler():
    import torchsde

    x = torch.zeros(2, 4, 3, 3)
    lo, hi = 0.03, 14.6
    ns = S.BrownianTreeNoiseSampler(x, lo, hi, seed=42)
    tree = torchsde.BrownianTree(lo, torch.zeros_like(x), hi, entropy=42)
    a, b, c = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(5.0)
    torch.testing.assert_close(ns(a, b), tree(1.0, 2.0) / 1.0, rtol=0, atol=0)
    # One path: increments add up, and the query order does not matter.
    total = ns(a, b) * (b - a).sqrt() + ns(b, c) * (c - b).sqrt()
    torch.testing.assert_close(total, ns(a, c) * (c - a).sqrt(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ns(b, a), -ns(a, b))
    assert torch.equal(S.BrownianTreeNoiseSampler(x, lo, hi, seed=42)(a, c), ns(a, c))
    assert not torch.equal(S.BrownianTreeNoiseSampler(x, lo, hi, seed=43)(a, c), ns(a, c))
    batched = S.BrownianTreeNoiseSampler(x, lo, hi, seed=[1, 2])
    assert batched(a, b).shape == x.shape
    with pytest.raises(ValueError, match="one seed per batch item"):
        S.BrownianTreeNoiseSampler(x, lo, hi, seed=[1, 2, 3])


# ---------------------------------------------------------------------------------------------------------------
# samplers: every name
# ---------------------------------------------------------------------------------------------------------------


def run(name, sigmas, x, seed=1, **options):
    return S.SAMPLERS[name](gaussian_denoiser, x, sigmas, extra_args={"seed": seed}, **options)


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_every_sampler_runs_deterministically_and_reports_steps(sd, name):
    sigmas = sch.SCHEDULERS["karras"](sd, 6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    steps = []
    out = S.SAMPLERS[name](gaussian_denoiser, x, sigmas, extra_args={"seed": 1}, callback=steps.append)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert torch.equal(out, run(name, sigmas, x, seed=1))
    assert steps and {"x", "i", "sigma", "sigma_hat", "denoised"} <= set(steps[0])
    assert [s["i"] for s in steps] == list(range(len(steps)))
    if name in SEEDED:
        assert not torch.equal(out, run(name, sigmas, x, seed=2)), "a different seed must give different noise"
    else:
        assert torch.equal(out, run(name, sigmas, x, seed=2)), "an ODE sampler must not depend on the seed"


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_every_sampler_returns_x_for_no_step(sd, name):
    x = torch.randn(1, 4, 2, 2)
    out = S.SAMPLERS[name](gaussian_denoiser, x, sd.sigmas[-1:].clone(), extra_args={"seed": 1})
    torch.testing.assert_close(out, x)


def test_euler_closed_form_on_a_linear_denoiser(sd):
    """With D(x) = a x, each Euler step multiplies x by 1 + (1 - a)(sigma_next - sigma) / sigma."""
    a = 0.25
    sigmas = sch.SCHEDULERS["normal"](sd, 8).double()
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    out = S.sample_euler(lambda x, s, **k: a * x, x, sigmas)
    factor = np.prod([1 + (1 - a) * (sigmas[i + 1] - sigmas[i]).item() / sigmas[i].item() for i in range(8)])
    err = (out - x * factor).abs().max().item()
    assert err < 1e-12, f"{err:.2e}"


CONVERGENCE = {  # sampler: (max abs error at 40 steps, observed error ratio 20 -> 40 steps lower bound)
    "euler": (0.08, 1.9), "ddim": (0.08, 1.9), "heunpp2": (0.08, 1.9), "euler_ancestral": (0.08, 1.9),
    "heun": (0.007, 3.5), "dpm_2": (0.005, 3.5), "dpmpp_2m": (0.007, 3.5), "dpm_2_ancestral": (0.005, 3.5),
    "dpmpp_2s_ancestral": (0.005, 3.5), "dpmpp_sde": (0.005, 3.5), "dpmpp_2m_sde": (0.007, 3.5),
    "dpmpp_3m_sde": (0.002, 3.0), "lms": (0.002, 5.0), "ipndm": (0.003, 4.0), "ipndm_v": (0.001, None),
    "deis": (0.002, 5.0), "dpm_fast": (0.001, 5.0), "dpm_adaptive": (0.05, None), "uni_pc": (0.001, None),
    "uni_pc_bh2": (0.001, None),
}


@pytest.mark.parametrize("name", list(CONVERGENCE))
def test_ode_samplers_converge_to_the_exact_flow(name):
    """Observed errors at 40 steps (float32): euler 7.2e-2, heun 5.7e-3, dpm_2 3.3e-3, lms 1.1e-3, dpm_fast 3.9e-4,
    dpmpp_2m 5.7e-3, dpmpp_3m_sde 1.2e-3, ipndm 1.9e-3, ipndm_v 9.3e-5, deis 1.5e-3, uni_pc 3.4e-4 (float32 floor)."""
    options = {"eta": 0.0} if name in SEEDED else {}
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (20, 40):
        sigmas = sch.get_sigmas_karras(steps, 0.0292, 14.6146)[:-1]  # end at sigma_min: no denoising jump
        x = MU + math.sqrt(SD**2 + float(sigmas[0]) ** 2) * z
        out = run(name, sigmas, x, **options)
        errors.append((out - exact_flow(x, float(sigmas[0]), float(sigmas[-1]))).abs().max().item())
    bound, ratio = CONVERGENCE[name]
    assert errors[1] < bound, f"error at 40 steps {errors[1]:.2e}"
    if ratio is not None:
        assert errors[0] / errors[1] > ratio, f"errors {errors} converge too slowly for the method's order"


@pytest.mark.parametrize("name", ["dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
                                  "dpmpp_3m_sde", "dpmpp_3m_sde_gpu"])
def test_sde_samplers_end_in_the_data_distribution(sd, name):
    """Reverse-SDE sampling of N(MU, SD^2) from its sigma_max marginal; observed mean/std at 40 steps within
    0.004 / 0.006 of (0.3, 0.5) over 16384 samples."""
    sigmas = sch.SCHEDULERS["karras"](sd, 40)
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    out = run(name, sigmas, MU + math.sqrt(SD**2 + float(sigmas[0]) ** 2) * z, seed=7)
    assert abs(out.mean().item() - MU) < 0.01 and abs(out.std().item() - SD) < 0.015, (out.mean(), out.std())


def test_sampler_steps_to_zero_return_the_denoised_prediction(sd):
    sigmas = torch.tensor([2.0, 0.0])
    x = torch.randn(1, 4, 2, 2)
    want = gaussian_denoiser(x, sigmas[:1])
    for name in ["lms", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "ipndm", "ipndm_v", "lcm", "euler_ancestral"]:
        assert torch.equal(run(name, sigmas, x), want), name


def test_linear_multistep_coefficients_against_closed_forms():
    t = np.array([10.0, 6.0, 3.5, 2.0], dtype=np.float32)
    i = 2
    assert S.linear_multistep_coeff(1, t, i, 0) == pytest.approx(float(t[3] - t[2]), rel=1e-6)
    a, b, p = float(t[2]), float(t[3]), float(t[1])  # step [a, b], previous node p
    # Lagrange basis through (a, p): l_0 = (tau - p) / (a - p), l_1 = (tau - a) / (p - a)
    c0 = ((b - p) ** 2 - (a - p) ** 2) / (2 * (a - p))
    c1 = (b - a) ** 2 / (2 * (p - a))
    assert S.linear_multistep_coeff(2, t, i, 0) == pytest.approx(c0, rel=1e-4)
    assert S.linear_multistep_coeff(2, t, i, 1) == pytest.approx(c1, rel=1e-4)
    with pytest.raises(ValueError, match="too high"):
        S.linear_multistep_coeff(4, t, 1, 0)


def test_lms_second_order_step_by_hand():
    sigmas = torch.tensor([8.0, 4.0, 1.0], dtype=torch.float64)
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    model = lambda x, s, **k: torch.tanh(x) / (1 + s.view(-1, 1, 1, 1))  # noqa: E731
    d0 = (x - model(x, sigmas[:1])) / 8.0
    x1 = x + (4.0 - 8.0) * d0
    d1 = (x1 - model(x1, sigmas[1:2])) / 4.0
    # integral over [4, 1] of the line through (8, d0), (4, d1)
    c1 = ((1 - 8) ** 2 - (4 - 8) ** 2) / (2 * (4 - 8))
    c0 = (1 - 4) ** 2 / (2 * (8 - 4))
    want = x1 + c1 * d1 + c0 * d0
    err = (S.sample_lms(model, x, sigmas, order=2) - want).abs().max().item()
    assert err < 1e-6, f"{err:.2e}"  # quad's epsrel=1e-4 on exact polynomial integrands: observed ~1e-15


def test_dpmpp_2m_two_steps_by_hand():
    """Algorithm 2 of Lu et al. 2022b (DPM-Solver++(2M)), written out in float64."""
    sigmas = torch.tensor([6.0, 2.0, 0.5], dtype=torch.float64)
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    model = lambda x, s, **k: torch.sin(x) * 0.5 + 0.1 * s.view(-1, 1, 1, 1)  # noqa: E731
    lam = [-math.log(s) for s in sigmas.tolist()]
    h0, h1 = lam[1] - lam[0], lam[2] - lam[1]
    den0 = model(x, sigmas[:1])
    x1 = (2.0 / 6.0) * x - math.expm1(-h0) * den0
    den1 = model(x1, sigmas[1:2])
    r = h0 / h1
    d = (1 + 1 / (2 * r)) * den1 - 1 / (2 * r) * den0
    want = (0.5 / 2.0) * x1 - math.expm1(-h1) * d
    err = (S.sample_dpmpp_2m(model, x, sigmas) - want).abs().max().item()
    assert err < 1e-12, f"{err:.2e}"


def test_ddpm_step_is_the_posterior_of_ho_et_al():
    """One step: the posterior mean in its x0 form (Ho et al. 2020 eq. 7) plus the posterior std times the noise."""
    sigmas = torch.tensor([3.0, 1.0], dtype=torch.float64)
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    noise = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    out = S.sample_ddpm(gaussian_denoiser, x, torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])[:2],
                        noise_sampler=lambda a, b: noise)
    ab_t, ab_prev = 1 / (1 + 9.0), 1 / (1 + 1.0)
    alpha = ab_t / ab_prev
    x_t = x / math.sqrt(1 + 9.0)  # the VP state
    x0 = gaussian_denoiser(x, sigmas[:1])
    mean = (math.sqrt(ab_prev) * (1 - alpha) / (1 - ab_t)) * x0 + (math.sqrt(alpha) * (1 - ab_prev) / (1 - ab_t)) * x_t
    std = math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - alpha))
    want = (mean + std * noise) * math.sqrt(1 + 1.0)  # back to the VE state at sigma = 1
    err = (out - want).abs().max().item()
    assert err < 1e-12, f"{err:.2e}"


def test_dpm_fast_spends_the_step_budget_and_stops_at_the_last_nonzero_sigma(sd):
    sigmas = sch.SCHEDULERS["karras"](sd, 10)
    calls = []

    def counting(x, sigma, **k):
        calls.append(float(sigma[0]))
        return gaussian_denoiser(x, sigma)

    x = torch.randn(1, 4, 4, 4) * sigmas[0]
    S.sample_dpm_fast(counting, x, sigmas)
    assert len(calls) == 10 and calls[0] == pytest.approx(float(sigmas[0]), rel=1e-6)
    assert min(calls) > float(sigmas[-2]) * 0.999


def test_uni_pc_matches_diffusers_in_float64(sd):
    """ComfyUI's UniPC (sigma as VP time, final sigma 0.001) against diffusers' UniPCMultistepScheduler driven on
    the same sigmas; float64 isolates the algorithm from ComfyUI's float32 cancellation at the final sigma.
    Observed max abs difference ~2e-13."""
    from diffusers import UniPCMultistepScheduler

    weights = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.3

    def model(x, sigma, **k):
        s = sigma.view(-1, 1, 1, 1)
        return torch.tanh(torch.einsum("oc,bchw->bohw", weights, x) / (1 + s)) * 0.8 + 0.1 * x / (s**2 + 1) ** 0.5

    x0 = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for variant, steps in [("bh1", 4), ("bh1", 9), ("bh2", 6)]:
        sigmas = sch.SCHEDULERS["karras"](sd, steps).double()
        out = S.SAMPLERS["uni_pc" if variant == "bh1" else "uni_pc_bh2"](model, x0 * sigmas[0], sigmas)
        ref = UniPCMultistepScheduler(solver_order=3, solver_type=variant, predict_x0=True, lower_order_final=True)
        ref.set_timesteps(steps)
        ref.sigmas = torch.cat([sigmas[:-1], torch.tensor([0.001], dtype=torch.float64)])
        ref.timesteps = torch.arange(steps, 0, -1)
        x_vp = x0 * sigmas[0] / (1 + sigmas[0] ** 2).sqrt()
        for i in range(steps):
            s = ref.sigmas[i]
            x_ve = x_vp * (s**2 + 1).sqrt()
            x_vp = ref.step((x_ve - model(x_ve, s.expand(2))) / s, ref.timesteps[i], x_vp).prev_sample
        err = (out - x_vp * (1 + ref.sigmas[-1] ** 2).sqrt()).abs().max().item()
        assert err < 1e-10, f"{variant} {steps} steps: {err:.2e}"


def test_deis_coefficients_integrate_polynomials_exactly_in_vp_time():
    """The order-k DEIS weights integrate the exponential-integrator weight against a Lagrange basis, so they sum
    to the integral of the weight itself: sum_j c_ij = integral of the integrand over [t_i, t_i+1]."""
    sigmas = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.3, 0.0])
    coefficients = S.deis_coefficients(sigmas, max_order=3)
    t, beta_0, beta_1 = S._edm_to_vp_time(sigmas)
    assert [len(c) for c in coefficients] == [0, 2, 3, 3, 3]
    # The last interval ends at t = 0 where the weight is singular; DEIS takes an Euler step there instead.
    for i in range(1, 4):
        taus = torch.linspace(float(t[i]), float(t[i + 1]), 200001, dtype=torch.float64)
        b0, b1 = beta_0.item(), beta_1.item()
        alpha = torch.exp(-0.5 * taus**2 * (b1 - b0) - taus * b0)
        weight = 0.5 * (taus * (b1 - b0) + b0) / torch.sqrt(alpha * (1 - alpha))
        integral = torch.trapezoid(weight, taus).item()
        assert sum(float(c) for c in coefficients[i]) == pytest.approx(integral, rel=2e-3)


@pytest.mark.gpu  # needs a CUDA device to observe host-device syncs: `pytest -m gpu` on a GPU machine
@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde_gpu", "uni_pc", "deis"])
def test_no_host_device_sync_inside_the_loop(sd, name):
    """Syncs happen once before the loop, so their number must not grow with the step count."""
    counts = []
    for steps in (4, 8):
        sigmas = sch.SCHEDULERS["karras"](sd, steps).cuda()
        x = torch.randn(1, 4, 8, 8, device="cuda") * sigmas[0]
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                S.SAMPLERS[name](gaussian_denoiser, x, sigmas, extra_args={"seed": 1})
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1], counts


# ---------------------------------------------------------------------------------------------------------------
# guidance
# ---------------------------------------------------------------------------------------------------------------


class Recorder:
    """A conditional denoiser whose output encodes its conditioning, recording every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, cross_attn, y):
        self.calls.append({"x": x, "sigma": sigma, "cross_attn": cross_attn, "y": y})
        shift = cross_attn.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if y is not None:
            shift = shift + y.mean(dim=1).view(-1, 1, 1, 1)
        return x * 0.5 + shift


def ctx(value: float, length: int = 77, batch: int = 1) -> torch.Tensor:
    return torch.full((batch, length, 8), value)


def test_cfg_one_skips_the_uncond_entirely():
    rec = Recorder()
    x, sigma = torch.randn(2, 4, 2, 2), torch.tensor([3.0, 3.0])
    out = cfg_model(rec, [Cond(ctx(1.0))], [Cond(ctx(-1.0))], 1.0)(x, sigma, seed=5)
    assert len(rec.calls) == 1 and rec.calls[0]["x"].shape[0] == 2
    assert torch.equal(rec.calls[0]["cross_attn"], ctx(1.0, batch=2))
    assert torch.equal(out, x * 0.5 + 1.0)


def test_cfg_batches_uncond_first_and_mixes():
    rec = Recorder()
    x, sigma = torch.randn(2, 4, 2, 2), torch.tensor([3.0, 3.0])
    out = cfg_model(rec, [Cond(ctx(1.0))], [Cond(ctx(-1.0))], 7.5)(x, sigma)
    assert len(rec.calls) == 1
    call = rec.calls[0]
    assert call["x"].shape[0] == 4 and torch.equal(call["sigma"], torch.tensor([3.0] * 4))
    assert torch.equal(call["cross_attn"][:2], ctx(-1.0, batch=2))  # uncond first, as ComfyUI batches
    assert torch.equal(call["cross_attn"][2:], ctx(1.0, batch=2))
    cond, uncond = x * 0.5 + 1.0, x * 0.5 - 1.0
    assert torch.equal(out, uncond + (cond - uncond) * 7.5)


def test_cfg_pads_cross_attention_to_the_lcm_length():
    rec = Recorder()
    x = torch.randn(1, 4, 2, 2)
    long = torch.cat([ctx(1.0), ctx(3.0)], dim=1)  # 154 tokens, mean 2
    cfg_model(rec, [Cond(long)], [Cond(ctx(-1.0))], 2.0)(x, torch.tensor([1.0]))
    assert len(rec.calls) == 1 and rec.calls[0]["cross_attn"].shape == (2, 154, 8)
    assert torch.equal(rec.calls[0]["cross_attn"][0], ctx(-1.0, 154)[0])  # the short one repeated twice
    rec = Recorder()
    cfg_model(rec, [Cond(ctx(1.0, 77 * 5))], [Cond(ctx(-1.0))], 2.0)(x, torch.tensor([1.0]))
    assert [c["cross_attn"].shape[1] for c in rec.calls] == [77 * 5, 77]  # more than 4x padding: separate calls


def test_cfg_averages_several_conds_by_strength():
    rec = Recorder()
    x = torch.randn(1, 4, 2, 2)
    positive = [Cond(ctx(1.0)), Cond(ctx(4.0), strength=0.5)]
    out = cfg_model(rec, positive, [Cond(ctx(0.0))], 3.0)(x, torch.tensor([2.0]))
    assert len(rec.calls) == 1 and rec.calls[0]["x"].shape[0] == 3
    cond = ((x * 0.5 + 1.0) + (x * 0.5 + 4.0) * 0.5) / 1.5
    uncond = x * 0.5
    err = (out - (uncond + (cond - uncond) * 3.0)).abs().max().item()
    assert err < 1e-5, f"{err:.2e}"


def test_cfg_vector_conditioning():
    rec = Recorder()
    x = torch.randn(2, 4, 2, 2)
    pos, neg = Cond(ctx(1.0), y=torch.full((1, 6), 2.0)), Cond(ctx(0.0), y=torch.zeros(1, 6))
    out = cfg_model(rec, [pos], [neg], 2.0)(x, torch.tensor([1.0, 1.0]))
    assert len(rec.calls) == 1 and rec.calls[0]["y"].shape == (4, 6)
    assert torch.equal(out, x * 0.5 + 2 * 3.0)  # uncond x/2, cond x/2 + 3
    rec = Recorder()
    cfg_model(rec, [pos], [Cond(ctx(0.0))], 2.0)(x, torch.tensor([1.0, 1.0]))
    assert len(rec.calls) == 2  # with and without y cannot share a call


def test_cfg_empty_lists_count_as_zero_and_near_one_cfg_scales():
    rec = Recorder()
    x = torch.randn(1, 4, 2, 2)
    out = cfg_model(rec, [Cond(ctx(1.0))], [], 3.0)(x, torch.tensor([1.0]))
    assert torch.equal(out, (x * 0.5 + 1.0) * 3.0)
    rec = Recorder()
    cfg = 1.0 + 1e-12
    out = cfg_model(rec, [Cond(ctx(1.0))], [Cond(ctx(0.0))], cfg)(x, torch.tensor([1.0]))
    assert len(rec.calls) == 1 and torch.equal(out, (x * 0.5 + 1.0) * cfg)


def test_cond_checks_its_fields():
    with pytest.raises(ValueError, match="area"):
        Cond(ctx(1.0), area=(0, 8, 0, 0))
    with pytest.raises(ValueError, match="mask"):
        Cond(ctx(1.0), mask=torch.ones(8, 8))
    assert Cond(ctx(1.0), area=(8, 8, 0, 0), timestep_range=(14.6, 0.0)).area == (8, 8, 0, 0)


def test_prepare_noise_is_torch_manual_seed_randn():
    latent = torch.zeros(2, 4, 8, 8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        want = torch.randn(2, 4, 8, 8)
    assert torch.equal(ksampler.prepare_noise(latent, 1234), want)
    assert ksampler.prepare_noise(latent, 1234).device.type == "cpu"


def test_prepare_noise_batch_index_draws_items_in_order():
    latent = torch.zeros(2, 4, 8, 8)
    generator = torch.Generator().manual_seed(7)
    draws = [torch.randn(1, 4, 8, 8, generator=generator) for _ in range(4)]
    got = ksampler.prepare_noise(latent, 7, batch_index=[3, 1])
    assert torch.equal(got, torch.cat([draws[3], draws[1]]))


def test_calculate_sigmas_denoise_takes_the_tail_of_a_longer_schedule(sd):
    full = sch.SCHEDULERS["normal"](sd, 20)
    got = ksampler.calculate_sigmas(sd, "normal", 10, "euler", denoise=0.5)
    assert len(got) == 11 and torch.equal(got, full[-11:])
    assert torch.equal(ksampler.calculate_sigmas(sd, "karras", 10, "euler"), sch.SCHEDULERS["karras"](sd, 10))
    assert len(ksampler.calculate_sigmas(sd, "karras", 10, "euler", denoise=0.0)) == 0
    assert torch.equal(ksampler.calculate_sigmas(sd, "simple", 7, "euler", denoise=0.3),
                       sch.SCHEDULERS["simple"](sd, 23)[-8:])  # int(7 / 0.3) = 23


def test_calculate_sigmas_discards_the_penultimate_sigma(sd):
    longer = sch.SCHEDULERS["karras"](sd, 11)
    got = ksampler.calculate_sigmas(sd, "karras", 10, "dpm_2")
    assert len(got) == 11 and torch.equal(got, torch.cat([longer[:-2], longer[-1:]]))


def test_slice_sigmas_as_ksampler_advanced(sd):
    sigmas = sch.SCHEDULERS["karras"](sd, 10)
    window = ksampler.slice_sigmas(sigmas, start_step=3, last_step=6, force_full_denoise=True)
    assert torch.equal(window, torch.cat([sigmas[3:6], torch.zeros(1)]))
    assert float(sigmas[6]) != 0  # the caller's schedule is untouched
    assert torch.equal(ksampler.slice_sigmas(sigmas, last_step=6), sigmas[:7])
    assert torch.equal(ksampler.slice_sigmas(sigmas, last_step=10, force_full_denoise=True), sigmas)
    assert ksampler.slice_sigmas(sigmas, start_step=10) is None


def first_model_input(sd, latent, **kwargs):
    rec = Recorder()
    ksampler.sample(rec, sd, ms.SD15_LATENT, [Cond(ctx(0.0))], [Cond(ctx(0.0))], latent, seed=3, cfg=1.0,
                    sampler_name="euler", **kwargs)
    return rec.calls[0]["x"]


def test_sample_noises_the_scaled_latent_as_comfyui(sd):
    latent = torch.randn(1, 4, 8, 8)
    noise = ksampler.prepare_noise(latent, 3)
    # Full denoise starts at sigma_max: the noise is scaled by sqrt(1 + sigma^2).
    sigma0 = sch.SCHEDULERS["karras"](sd, 5)[0]  # within rounding of sigma_max, so "max denoise"
    x = first_model_input(sd, latent, steps=5, scheduler="karras")
    assert torch.equal(x, noise * torch.sqrt(1.0 + sigma0**2) + latent * 0.18215)
    # Partial denoise starts lower: the noise is scaled by sigma.
    sigma0 = ksampler.calculate_sigmas(sd, "karras", 5, "euler", denoise=0.5)[0]
    x = first_model_input(sd, latent, steps=5, scheduler="karras", denoise=0.5)
    assert torch.equal(x, noise * sigma0 + latent * 0.18215)
    # add_noise=False: the latent alone.
    x = first_model_input(sd, latent, steps=5, scheduler="karras", denoise=0.5, add_noise=False)
    assert torch.equal(x, latent * 0.18215)


def test_sample_returns_the_raw_latent(sd):
    target = torch.randn(1, 4, 8, 8)  # in model space

    def fixed(x, sigma, cross_attn, y):
        return target.expand_as(x)

    latent = torch.zeros(1, 4, 8, 8)
    out = ksampler.sample(fixed, sd, ms.SDXL_LATENT, [Cond(ctx(0.0))], [], latent, seed=1, steps=6, cfg=1.0,
                          sampler_name="dpmpp_2m", scheduler="karras")
    err = (out - target / 0.13025).abs().max().item()
    assert out.dtype == torch.float32 and err < 1e-5, f"{err:.2e}"
    same = ksampler.sample(fixed, sd, ms.SDXL_LATENT, [Cond(ctx(0.0))], [], latent, seed=1, steps=6, cfg=1.0,
                           sampler_name="dpmpp_2m", scheduler="karras", start_step=6)
    assert same is latent  # an empty step window leaves the latent alone


def test_sample_is_the_composition_of_its_parts(sd):
    """noise -> schedule -> noise_scaling -> sampler(seed) -> process_out, written out by hand."""
    model = Recorder()
    positive, negative = [Cond(ctx(0.5))], [Cond(ctx(-0.5))]
    latent = torch.randn(1, 4, 8, 8)
    got = ksampler.sample(model, sd, ms.SD15_LATENT, positive, negative, latent, seed=11, steps=8, cfg=6.0,
                          sampler_name="euler_ancestral", scheduler="normal", denoise=0.75)
    sigmas = sch.SCHEDULERS["normal"](sd, int(8 / 0.75))[-9:]
    x = ksampler.prepare_noise(latent, 11) * sigmas[0] + latent * 0.18215
    samples = S.sample_euler_ancestral(cfg_model(model, positive, negative, 6.0), x, sigmas, extra_args={"seed": 11})
    assert torch.equal(got, samples / 0.18215)
    other = ksampler.sample(model, sd, ms.SD15_LATENT, positive, negative, latent, seed=12, steps=8, cfg=6.0,
                            sampler_name="euler_ancestral", scheduler="normal", denoise=0.75)
    assert not torch.equal(got, other)


def test_sample_custom_accepts_a_sampler_function_and_options(sd):
    sigmas = sch.SCHEDULERS["karras"](sd, 4)
    latent = torch.zeros(1, 4, 4, 4)
    noise = torch.randn(1, 4, 4, 4)
    rec = Recorder()

    def run_custom(sampler, seed, **options):
        return ksampler.sample_custom(rec, sd, ms.SD15_LATENT, [Cond(ctx(0.0))], [], latent, sampler=sampler,
                                      sigmas=sigmas, cfg=1.0, noise=noise, seed=seed, sampler_options=options)

    assert torch.equal(run_custom("euler", 1), run_custom(S.sample_euler, 1))
    assert not torch.equal(run_custom("euler_ancestral", 1), run_custom("euler_ancestral", 2))
    assert torch.equal(run_custom("euler_ancestral", 1, eta=0.0), run_custom("euler_ancestral", 2, eta=0.0))
    empty = torch.zeros(0)
    assert ksampler.sample_custom(rec, sd, ms.SD15_LATENT, [], [], latent, sampler="euler", sigmas=empty, cfg=1.0,
                                  noise=noise, seed=1) is latent
