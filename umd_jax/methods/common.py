"""What the methods share: the representation's block index and picking probe features."""
import jax.numpy as jnp

REP = -1  # block index meaning "the representation" (rep)


def pick(features: dict, blocks) -> jnp.ndarray:
  """dict(rep (B, D), blocks (n, B, D)) -> (len(blocks), B, D) in the order asked."""
  return jnp.stack([features["rep"] if b == REP else features["blocks"][b] for b in blocks])
