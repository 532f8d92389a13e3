"""DDPM noise schedules and the forward process (SPEC §4); pure functions of arrays.

Tables are computed in float64 on the host and stored as float32 device arrays.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """abar(u) = cos²((u + s) / (1 + s) · π/2), betas clipped at `max_beta` (improved DDPM)."""
  f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  betas = np.minimum(1.0 - f(u[1:]) / f(u[:-1]), max_beta)
  return np.cumprod(1.0 - betas)


def linear_alphas_cumprod(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """Linear betas (DDPM), rescaled to T steps as in ADM / DiT."""
  scale = 1000 / num_timesteps
  betas = np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)
  return np.cumprod(1.0 - betas)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Per-timestep tables, index t in [0, T)."""
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_mean_coef_x0: jax.Array
  posterior_mean_coef_xt: jax.Array

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])


def make_schedule(name: str, num_timesteps: int = 1000) -> Schedule:
  if name == "cosine":
    abar = cosine_alphas_cumprod(num_timesteps)
  elif name == "linear":
    abar = linear_alphas_cumprod(num_timesteps)
  else:
    raise ValueError(f"diffusion.schedule={name!r}: use 'cosine' (pixels) or 'linear' (latents)")
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  betas = 1.0 - abar / abar_prev
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return Schedule(
      betas=f32(betas), alphas_cumprod=f32(abar), alphas_cumprod_prev=f32(abar_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(abar)), sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1 - abar)),
      posterior_variance=f32(post_var),
      posterior_mean_coef_x0=f32(betas * np.sqrt(abar_prev) / (1.0 - abar)),
      posterior_mean_coef_xt=f32((1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)))


def _bcast(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  return table[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per-sample t of shape (B,)."""
  return (_bcast(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + _bcast(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior(schedule: Schedule, x0: jax.Array, xt: jax.Array, t: jax.Array):
  """Mean and variance of q(x_{t-1} | x_t, x0)."""
  mean = (_bcast(schedule.posterior_mean_coef_x0, t, x0.ndim) * x0
          + _bcast(schedule.posterior_mean_coef_xt, t, x0.ndim) * xt)
  return mean, _bcast(schedule.posterior_variance, t, x0.ndim)
