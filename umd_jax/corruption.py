"""Patch masks (METHOD.md §1): random masks drawn per sample, masks from known pixels, and their
pixel maps. The objectives that use them live in their methods (methods/umd_loss.py, methods/diffmae.py)."""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp



class Mask(NamedTuple):
  keep_ids: jax.Array     # (B, K) indices of the kept patches, in shuffled order
  restore_ids: jax.Array  # (B, L) undoes the shuffle: take_along_axis(kept ++ masked, restore_ids)
  mask: jax.Array         # (B, L) float, 1 where the patch was dropped
  masked_ids: Optional[jax.Array] = None  # (B, L - K) indices of the dropped patches, in shuffled order


def num_kept(num_patches: int, ratio: float, tube: int = 1) -> int:
  """Tokens a mask of `ratio` keeps: int(L(1 - r)); with tube masking over `tube` token frames,
  int(L/tube · (1 - r)) of each frame's, the same in every frame."""
  return tube * int(num_patches // tube * (1 - ratio))


MASKINGS = ("random", "tube")


def tube_frames(config, grid) -> int:
  """Token frames one spatial mask spans: grid.frames with model.masking="tube" (VideoMAE), else 1
  (each token drawn alone: MAE, MAE-ST's random spacetime masking)."""
  return grid.frames if config.model.masking == "tube" else 1


def random_mask(key, batch: int, num_patches: int, ratio: float, tube: int = 1) -> Optional[Mask]:
  """MAE-style per-sample masking: argsort of uniform noise, keep the first int(L(1-r))."""
  return sample_mask(jax.random.split(key, batch), num_patches, ratio, tube)


def sample_mask(keys, num_patches: int, ratio: float, tube: int = 1) -> Optional[Mask]:
  """random_mask with one key per sample (B keys): a sample's mask depends on its key alone. With
  `tube` > 1 the L tokens are `tube` frames of L/tube: one draw over a frame's positions masks the
  same positions in every frame (VideoMAE's tube masking); tube = 1 is MAE's draw over all L."""
  if ratio == 0:
    return None
  batch, per_frame = keys.shape[0], num_patches // tube
  keep = num_kept(per_frame, ratio)
  noise = jax.vmap(lambda k: jax.random.uniform(k, (per_frame,)))(keys)
  ids_shuffle = jnp.argsort(noise, axis=1)
  if tube > 1:  # frame f's token of position s is f·L/tube + s; kept ones first, each in frame order
    frames = (jnp.arange(tube) * per_frame)[None, :, None]
    kept, dropped = ids_shuffle[:, None, :keep] + frames, ids_shuffle[:, None, keep:] + frames
    ids_shuffle = jnp.concatenate([kept.reshape(batch, -1), dropped.reshape(batch, -1)], axis=1)
    keep *= tube
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


def split_sizes(batch: int, clean_fraction: float) -> tuple[int, int]:
  """(first, second) sub-batch sizes of a batch split at `clean_fraction` (Trainable.row_split)."""
  n_clean = int(batch * clean_fraction)
  return n_clean, batch - n_clean
