"""Samplers against theory (SPEC §4): an exact denoiser for Gaussian data, DDIM/DDPM, guidance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umd_jax import diffusion

SCHEDULE = diffusion.make_schedule("cosine", 1000)
MU, S = 0.3, 0.5


def oracle(x, t):
  """E[x0 | x_t] and the matching eps for x0 ~ N(MU, S²I): the exact denoiser."""
  ab = SCHEDULE.alphas_cumprod[t][:, None]
  x0 = MU + jnp.sqrt(ab) * S ** 2 / (ab * S ** 2 + 1 - ab) * (x - jnp.sqrt(ab) * MU)
  return x0, (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)


@pytest.mark.parametrize("sampler,kwargs,check_var", [
    ("ddim", dict(steps=250, eta=0.0), True), ("ddim", dict(steps=1000, eta=1.0), True), ("ddpm", {}, True),
    # Coarse stochastic DDIM under-disperses (a discretisation effect of using E[x0|x_t]): mean only.
    ("ddim", dict(steps=37, eta=1.0), False)])
def test_samplers_reproduce_the_data_distribution(sampler, kwargs, check_var):
  n, d = 4000, 4
  noise = jax.random.normal(jax.random.PRNGKey(0), (n, d))
  fn = diffusion.ddim_sample if sampler == "ddim" else diffusion.ddpm_sample
  x = np.asarray(jax.jit(lambda z, k: fn(oracle, SCHEDULE, z, k, **kwargs))(noise, jax.random.PRNGKey(1)))
  # Sampling error of the mean and variance of n·d draws, 5 sigma, plus 2% for discretisation.
  m = n * d
  assert abs(x.mean() - MU) < 5 * S / np.sqrt(m) + 0.02 * S
  if check_var:
    assert abs(x.var() - S ** 2) < 5 * S ** 2 * np.sqrt(2 / m) + 0.02 * S ** 2


def test_ddim_eta0_is_deterministic_and_one_step_returns_x0():
  noise = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
  a = diffusion.ddim_sample(oracle, SCHEDULE, noise, jax.random.PRNGKey(1), steps=10, eta=0.0)
  b = diffusion.ddim_sample(oracle, SCHEDULE, noise, jax.random.PRNGKey(2), steps=10, eta=0.0)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  one = diffusion.ddim_sample(oracle, SCHEDULE, noise, jax.random.PRNGKey(1), steps=1)
  np.testing.assert_allclose(one, oracle(noise, jnp.full((8,), 999))[0], rtol=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 7, 125, 333, 1000])
def test_ddim_timesteps_cover_any_step_count(steps):
  ts = diffusion.ddim_timesteps(1000, steps)
  assert len(ts) == steps and ts[0] == 999 and ts[-1] == (0 if steps > 1 else 999)
  assert (np.diff(ts) < 0).all()


def test_steps_beyond_T_is_a_clear_error():
  with pytest.raises(ValueError, match=r"sample.steps=1001 must be in \[1, 1000\]"):
    diffusion.ddim_timesteps(1000, 1001)


def test_guidance_scale_one_is_conditional_and_zero_unconditional():
  def apply(x, t, labels):  # a fake network whose output depends on the label
    return x + labels[:, None].astype(x.dtype), x * 0 + labels[:, None].astype(x.dtype) * t[:, None]
  x, t, labels = jnp.ones((3, 2)), jnp.array([5, 6, 7]), jnp.array([1, 2, 3])
  cond, uncond = apply(x, t + 1, labels), apply(x, t + 1, jnp.full((3,), 10))
  for scale, expected in ((1.0, cond), (0.0, uncond)):
    got = diffusion.guided(apply, labels, 10, scale)(x, t)
    for g, e in zip(got, expected):
      np.testing.assert_allclose(g, e)
  got = diffusion.guided(apply, labels, 10, 4.0)(x, t)
  np.testing.assert_allclose(got[0], uncond[0] + 4.0 * (cond[0] - uncond[0]))
