"""Schedules against their closed forms; the posterior is the standard DDPM one (METHOD.md §4)."""
import jax
import numpy as np
import pytest

from umd_jax import diffusion


def test_cosine_schedule_matches_closed_form():
  s = diffusion.make_schedule("cosine", 1000)
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
  t = np.arange(1000)
  expected = f((t + 1) / 1000) / f(0.0)
  abar = np.asarray(s.alphas_cumprod, np.float64)
  # Identical until the 0.999 clip bites at the very end of the schedule.
  np.testing.assert_allclose(abar[:-1], expected[:-1], rtol=1e-5, atol=1e-9)
  assert np.asarray(s.betas).max() <= 0.999 + 1e-6
  assert abar[-1] < 1e-4 and abar[0] > 0.999


def test_linear_schedule_matches_closed_form():
  s = diffusion.make_schedule("linear", 1000)
  betas = np.linspace(1e-4, 0.02, 1000)
  np.testing.assert_allclose(np.asarray(s.betas), betas, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), np.cumprod(1 - betas), rtol=1e-4)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_posterior_variance_is_the_standard_one(name):
  s = diffusion.make_schedule(name, 1000)
  # float64 tables: the float32 ones lose digits in 1 - abar near t = 0.
  abar = diffusion.cosine_alphas_cumprod(1000) if name == "cosine" else diffusion.linear_alphas_cumprod(1000)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  beta = 1 - abar / abar_prev
  np.testing.assert_allclose(np.asarray(s.posterior_variance), beta * (1 - abar_prev) / (1 - abar),
                             rtol=1e-5, atol=1e-9)
  assert float(s.posterior_variance[0]) == 0.0


def test_q_sample_and_posterior_mean_by_bayes():
  s = diffusion.make_schedule("cosine", 1000)
  key = jax.random.PRNGKey(0)
  x0 = jax.random.normal(key, (4, 2, 2, 1))
  eps = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = np.array([0, 10, 500, 999])
  xt = diffusion.q_sample(s, x0, t, eps)
  abar = np.asarray(s.alphas_cumprod, np.float64)[t][:, None, None, None]
  np.testing.assert_allclose(np.asarray(xt), np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps, rtol=1e-5, atol=1e-6)
  # q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0): precision-weighted mean of the two Gaussians.
  tt = np.array([10, 500])
  a = np.asarray(s.alphas_cumprod, np.float64)
  ab, ab_prev = a[tt], a[tt - 1]
  beta = 1 - ab / ab_prev
  x0s, xts = np.asarray(x0[1:3], np.float64), np.asarray(xt[1:3], np.float64)
  b4 = lambda v: v[:, None, None, None]
  prec = b4(1 / (1 - ab_prev) + (1 - beta) / beta)
  mean = (b4(np.sqrt(ab_prev) / (1 - ab_prev)) * x0s + b4(np.sqrt(1 - beta) / beta) * xts) / prec
  got_mean, got_var = diffusion.q_posterior(s, x0[1:3], xt[1:3], tt)
  np.testing.assert_allclose(np.asarray(got_mean), mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_var)[:, 0, 0, 0], 1 / prec[:, 0, 0, 0], rtol=1e-4)


def test_unknown_schedule_is_a_clear_error():
  with pytest.raises(ValueError, match="cosine"):
    diffusion.make_schedule("sigmoid")


def test_both_readings_of_the_noise_exponent_against_their_closed_forms():
  """ρ = 0.8 on the linear schedule, T = 1000 (METHOD.md §9): "variance" 1 - ᾱ' = (1 - ᾱ)^ρ;
  "beta" β' = β^ρ, ᾱ' = Π(1 - β^ρ). Signal and noise are equal (the last t with ᾱ >= 1/2) at step
  258 without ρ, 228 under "variance" and 133 under "beta"; ρ = 1 is the plain schedule under both."""
  betas = np.linspace(1e-4, 0.02, 1000)
  plain = np.cumprod(1 - betas)
  variance = diffusion.make_schedule("linear", 1000, 0.8, "variance")
  beta = diffusion.make_schedule("linear", 1000, 0.8, "beta")
  np.testing.assert_allclose(np.asarray(variance.alphas_cumprod), 1 - (1 - plain) ** 0.8, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(beta.betas), betas ** 0.8, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(beta.alphas_cumprod), np.cumprod(1 - betas ** 0.8), rtol=1e-4, atol=1e-8)
  last_half = lambda abar: int(np.nonzero(np.asarray(abar, np.float64) >= 0.5)[0][-1])
  assert (last_half(plain), last_half(variance.alphas_cumprod), last_half(beta.alphas_cumprod)) == (258, 228, 133)
  for form in diffusion.RHO_FORMS:
    np.testing.assert_array_equal(np.asarray(diffusion.make_schedule("linear", 1000, 1.0, form).alphas_cumprod),
                                  np.asarray(diffusion.make_schedule("linear", 1000).alphas_cumprod))
  with pytest.raises(ValueError, match="diffusion.rho_form='sigma': use 'variance'"):
    diffusion.make_schedule("linear", 1000, 0.8, "sigma")
