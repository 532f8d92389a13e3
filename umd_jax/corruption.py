"""Patch masks (METHOD.md §1): random masks drawn per sample, masks from known pixels, and their
pixel maps. The objectives that use them live in their methods (methods/umd_loss.py, methods/diffmae.py)."""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from umd_jax.models import layers


class Mask(NamedTuple):
  keep_ids: jax.Array     # (B, K) indices of the kept patches, in shuffled order
  restore_ids: jax.Array  # (B, L) undoes the shuffle: take_along_axis(kept ++ masked, restore_ids)
  mask: jax.Array         # (B, L) float, 1 where the patch was dropped
  masked_ids: Optional[jax.Array] = None  # (B, L - K) indices of the dropped patches, in shuffled order


def num_kept(num_patches: int, ratio: float) -> int:
  return int(num_patches * (1 - ratio))


def random_mask(key, batch: int, num_patches: int, ratio: float) -> Optional[Mask]:
  """MAE-style per-sample masking: argsort of uniform noise, keep the first int(L(1-r))."""
  return sample_mask(jax.random.split(key, batch), num_patches, ratio)


def sample_mask(keys, num_patches: int, ratio: float) -> Optional[Mask]:
  """random_mask with one key per sample (B keys): a sample's mask depends on its key alone."""
  if ratio == 0:
    return None
  batch, keep = keys.shape[0], num_kept(num_patches, ratio)
  noise = jax.vmap(lambda k: jax.random.uniform(k, (num_patches,)))(keys)
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  mask = jnp.concatenate([jnp.zeros((batch, keep)), jnp.ones((batch, num_patches - keep))], axis=1)
  return Mask(ids_shuffle[:, :keep], ids_restore, jnp.take_along_axis(mask, ids_restore, axis=1), ids_shuffle[:, keep:])


def mask_from_patches(masked: jax.Array, num_masked: int) -> Mask:
  """A Mask from a (B, L) 0/1 patch mask (1 = dropped) with `num_masked` ones in every row (a
  fixed inpainting mask): kept and dropped patches each in patch order."""
  ids_shuffle = jnp.argsort(masked, axis=1, stable=True)  # the zeros (kept) first, each in order
  keep = masked.shape[1] - num_masked
  return Mask(ids_shuffle[:, :keep], jnp.argsort(ids_shuffle, axis=1), masked.astype(jnp.float32),
              ids_shuffle[:, keep:])


def known_patches(known, patch: int):
  """(B, H, W, 1) pixel mask (1 = known pixel) -> (B, L) patch mask, 1 where any pixel of the patch
  is unknown (numpy or JAX arrays)."""
  return 1.0 - layers.patchify(known, patch).min(axis=-1)


def pixel_mask(mask: jax.Array, height: int, width: int) -> jax.Array:
  """(B, L) patch mask -> (B, H, W, 1) pixel mask (patches in row-major order)."""
  b, num_patches = mask.shape
  grid = int(round(num_patches ** 0.5))
  m = mask.reshape(b, grid, grid)
  m = jnp.repeat(jnp.repeat(m, height // grid, axis=1), width // grid, axis=2)
  return m[..., None]


def split_sizes(batch: int, clean_fraction: float) -> tuple[int, int]:
  """(first, second) sub-batch sizes of a batch split at `clean_fraction` (Trainable.row_split)."""
  n_clean = int(batch * clean_fraction)
  return n_clean, batch - n_clean
