"""Samplers against theory (METHOD.md §4): an exact denoiser for Gaussian data, DDIM/DDPM, guidance."""
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
    ("ddim", dict(steps=250, eta=0.0, prediction="x0"), True), ("ddpm", dict(prediction="x0"), True),
    ("ddim", dict(steps=125, eta=0.0, grid="strided"), True),
    ("ddim", dict(steps=125, eta=0.0, grid="strided", prediction="x0"), True),
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
  expected = oracle(noise, jnp.full((8,), 999))[0]
  one = diffusion.ddim_sample(oracle, SCHEDULE, noise, jax.random.PRNGKey(1), steps=1, prediction="x0")
  np.testing.assert_allclose(one, expected, rtol=1e-6)
  # From the eps head, x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) with abar_999 = 2.4e-9: float32
  # cancellation in the numerator is amplified 1 / sqrt(abar) = 2e4 times (a few 1e-7 -> ~1e-4).
  one = diffusion.ddim_sample(oracle, SCHEDULE, noise, jax.random.PRNGKey(1), steps=1, prediction="eps")
  np.testing.assert_allclose(one, expected, atol=1e-3)


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
      np.testing.assert_allclose(g, e, rtol=1e-6)
  got = diffusion.guided(apply, labels, 10, 4.0)(x, t)
  np.testing.assert_allclose(got[0], uncond[0] + 4.0 * (cond[0] - uncond[0]))


def test_strided_grid_is_the_reference_one():
  ts = diffusion.ddim_timesteps(1000, 125, "strided")
  assert len(ts) == 126 and list(ts[:3]) == [999, 991, 983] and list(ts[-2:]) == [7, 0]
  assert (np.diff(ts[:-1]) == -8).all()
  assert list(diffusion.ddim_timesteps(1000, 1000, "strided")) == list(range(999, -1, -1))  # 0 not doubled
  assert list(diffusion.ddim_timesteps(10, 3, "strided")) == [9, 6, 3, 0]


def test_the_sampler_visits_exactly_the_grid():
  visited = []

  def recording(x, t):
    jax.debug.callback(lambda tt: visited.append(int(tt[0])), t)
    return oracle(x, t)
  noise = jnp.zeros((2, 4))
  jax.block_until_ready(diffusion.ddim_sample(recording, SCHEDULE, noise, jax.random.PRNGKey(0), steps=125,
                                              grid="strided"))
  jax.effects_barrier()
  assert visited == list(diffusion.ddim_timesteps(1000, 125, "strided"))


def _inconsistent(x, t):
  """Heads that disagree: the x0 head says 0.7 everywhere, the eps head says 0.2 everywhere."""
  return jnp.full_like(x, 0.7), jnp.full_like(x, 0.2)


@pytest.mark.parametrize("clip", [False, True])
def test_each_parameterisation_follows_its_head_only(clip):
  x, t = jnp.full((3, 4), 1.5), jnp.full((3,), 600)
  ab = float(SCHEDULE.alphas_cumprod[600])
  x0, eps = diffusion.parameterise(SCHEDULE, x, t, *_inconsistent(x, t), prediction="x0", clip=clip)
  np.testing.assert_allclose(x0, 0.7, rtol=1e-6)
  np.testing.assert_allclose(eps, (1.5 - np.sqrt(ab) * 0.7) / np.sqrt(1 - ab), rtol=1e-5)
  x0, eps = diffusion.parameterise(SCHEDULE, x, t, *_inconsistent(x, t), prediction="eps", clip=clip)
  from_eps = (1.5 - np.sqrt(1 - ab) * 0.2) / np.sqrt(ab)  # 1.5...: above 1, so clipping changes it
  np.testing.assert_allclose(x0, min(from_eps, 1.0) if clip else from_eps, rtol=1e-5)
  np.testing.assert_allclose(eps, (1.5 - np.sqrt(ab) * np.asarray(x0)) / np.sqrt(1 - ab), rtol=1e-5)
  # A whole DDIM step: with eta 0 the next x is sqrt(ab') x0 + sqrt(1 - ab') eps of the chosen head.
  for prediction in ("eps", "x0"):
    x0, eps = diffusion.parameterise(SCHEDULE, x, t, *_inconsistent(x, t), prediction=prediction, clip=clip)
    nxt, _ = diffusion.ddim_step(_inconsistent, SCHEDULE, x, 600, 500, jax.random.PRNGKey(0), eta=0.0, clip=clip,
                                 prediction=prediction)
    ab_prev = float(SCHEDULE.alphas_cumprod[500])
    np.testing.assert_allclose(nxt, np.sqrt(ab_prev) * np.asarray(x0) + np.sqrt(1 - ab_prev) * np.asarray(eps),
                               rtol=1e-5)


def test_uint8_conventions():
  from umd_jax import images
  x = jnp.array([-1.2, -1.0, -0.999, 0.0, 0.0039, 0.99, 1.0, 1.3])
  rounded, truncated = (np.asarray(images.to_uint8_device(x, c)) for c in ("round", "truncate"))
  np.testing.assert_array_equal(rounded, [0, 0, 0, 128, 128, 254, 255, 255])
  np.testing.assert_array_equal(truncated, [0, 0, 0, 127, 127, 253, 255, 255])
  np.testing.assert_array_equal(rounded, images.to_uint8(np.asarray(x)))  # the host function's values
