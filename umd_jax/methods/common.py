"""What the methods share: the representation's block index, picking probe features, sampling
with a (x0, eps) denoiser."""
import jax.numpy as jnp
import ml_collections

from umd_jax import diffusion

REP = -1  # block index meaning "the representation" (rep)


def section(c, name: str) -> ml_collections.ConfigDict:
  """Config section `name`, made empty if missing: methods that share a section each add their keys."""
  if name not in c:
    c[name] = ml_collections.ConfigDict()
  return c[name]


def pick(features: dict, blocks) -> jnp.ndarray:
  """dict(rep (B, D), blocks (n, B, D)) -> (len(blocks), B, D) in the order asked."""
  return jnp.stack([features["rep"] if b == REP else features["blocks"][b] for b in blocks])


def sample_with(denoise, config, schedule, noise, key):
  """sample.sampler with denoise(x_t, t) -> (x0, eps): ancestral DDPM over all T steps (posterior
  variance), or DDIM over sample.steps."""
  s = config.sample
  if s.sampler == "ddpm":
    return diffusion.ddpm_sample(denoise, schedule, noise, key, clip=s.clip, prediction=s.prediction)
  return diffusion.ddim_sample(denoise, schedule, noise, key, steps=s.steps, eta=s.eta, clip=s.clip,
                               prediction=s.prediction, grid=s.timesteps)


def ddpm_noised(config, schedule, images, t, eps, told):
  """(input, what the network is told): the clean images told CLEAN_INDEX (t None), or q_sample
  to timesteps t (B,) told `told(t)`."""
  if t is None:
    return images, jnp.full((images.shape[0],), diffusion.CLEAN_INDEX, jnp.int32)
  return diffusion.q_sample(schedule, images, t, eps), told(t)
