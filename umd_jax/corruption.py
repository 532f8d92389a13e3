"""Mask-then-noise corruption and the UMD objective (METHOD.md §1, §2).

One global batch is split into a clean sub-batch (no noise, timestep index 0, mask ratio
`clean_mask_ratio`) and a noised sub-batch (t ~ U{0..T-1}, told t + 1, mask ratio
`noised_mask_ratio`). DiT, MaskDiT and MAE are other values of the same three numbers.
"""
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from umd_jax import diffusion
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


def masked_mean(sq_err, weight, axis=None):
  """sum(se * m) / sum(m) with m broadcast over channels; axis=None pools the whole sub-batch."""
  weight = jnp.broadcast_to(weight, sq_err.shape)
  return jnp.sum(sq_err * weight, axis=axis) / jnp.maximum(jnp.sum(weight, axis=axis), 1.0)


def _regions(mask: Optional[Mask], x):
  """(visible, masked) pixel weights; without masking both are all pixels (METHOD.md §2)."""
  if mask is None:
    ones = jnp.ones(x.shape[:3] + (1,), x.dtype)
    return ones, ones
  m = pixel_mask(mask.mask, x.shape[1], x.shape[2])
  return 1.0 - m, m


def split_sizes(batch: int, clean_fraction: float) -> tuple[int, int]:
  n_clean = int(batch * clean_fraction)
  return n_clean, batch - n_clean


def _per_sample(keys, purpose: int, draw: Callable):
  """draw(key) for every sample's key folded with `purpose` (one stream per kind of draw)."""
  return jax.vmap(lambda k: draw(jax.random.fold_in(k, purpose)))(keys)


def umd_loss(apply_fn: Callable, schedule: diffusion.Schedule, x0: jax.Array, key: jax.Array, *,
             num_patches: int, clean_fraction: float, clean_mask_ratio: float, noised_mask_ratio: float,
             labels: Optional[jax.Array] = None, num_buckets: int = 10, label_dropout: float = 0.0,
             null_label: int = 0, sample_ids: Optional[jax.Array] = None):
  """The UMD loss of METHOD.md §2 and its parts.

  apply_fn(x, t_index, labels, mask: Mask | None) -> dict(x0=..., eps=...), images (B, H, W, C);
  x0 (B, H, W, C) holds `num_patches` patches. The clean sub-batch is told the null label; in
  the noised one each label is replaced by `null_label` with probability `label_dropout` (CFG).
  Returns (loss, metrics) with loss_clean, loss_noised and per-timestep-bucket sums/counts.

  Every random draw of a sample (mask, t, noise, label drop) comes from fold_in(key, its
  `sample_ids` entry; default its row): a micro-batch of rows with their global ids draws
  exactly what the full batch draws for them (gradient accumulation). Each sub-batch's loss is
  a mean over equal-sized per-sample regions, so the loss is the mean of per-sample losses.
  """
  batch = x0.shape[0]
  n_clean, n_noised = split_sizes(batch, clean_fraction)
  ids = jnp.arange(batch) if sample_ids is None else sample_ids
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
  k_clean, k_noised = keys[:n_clean], keys[n_clean:]
  zero = jnp.zeros((), jnp.float32)
  metrics = dict(loss_clean=zero, loss_noised=zero,
                 bucket_sum=jnp.zeros((num_buckets,)), bucket_count=jnp.zeros((num_buckets,)))

  loss = zero
  if n_clean:
    xc = x0[:n_clean]
    mask = sample_mask(_per_sample(k_clean, 0, lambda k: k), num_patches, clean_mask_ratio)
    out = apply_fn(xc, jnp.zeros((n_clean,), jnp.int32), None, mask)
    _, masked = _regions(mask, xc)
    metrics["loss_clean"] = masked_mean(jnp.square(out["x0"] - xc), masked)
    loss = loss + (n_clean / batch) * metrics["loss_clean"]
  if n_noised:
    xn = x0[n_clean:]
    t = _per_sample(k_noised, 1, lambda k: jax.random.randint(k, (), 0, schedule.num_timesteps))
    eps = _per_sample(k_noised, 2, lambda k: jax.random.normal(k, xn.shape[1:], xn.dtype))
    xt = diffusion.q_sample(schedule, xn, t, eps)
    mask = sample_mask(_per_sample(k_noised, 3, lambda k: k), num_patches, noised_mask_ratio)
    noised_labels = None
    if labels is not None:
      noised_labels = labels[n_clean:]
      if label_dropout > 0:
        drop = _per_sample(k_noised, 4, lambda k: jax.random.uniform(k, ())) < label_dropout
        noised_labels = jnp.where(drop, null_label, noised_labels)
    out = apply_fn(xt, diffusion.network_timestep(t), noised_labels, mask)
    visible, masked = _regions(mask, xn)
    eps_se, x0_se = jnp.square(out["eps"] - eps), jnp.square(out["x0"] - xn)
    metrics["loss_noised"] = 0.5 * masked_mean(eps_se, visible) + 0.5 * masked_mean(x0_se, masked)
    loss = loss + (n_noised / batch) * metrics["loss_noised"]
    per_sample = (0.5 * masked_mean(eps_se, visible, axis=(1, 2, 3))
                  + 0.5 * masked_mean(x0_se, masked, axis=(1, 2, 3)))
    onehot = jax.nn.one_hot(t * num_buckets // schedule.num_timesteps, num_buckets)
    metrics["bucket_sum"] = onehot.T @ per_sample
    metrics["bucket_count"] = onehot.sum(axis=0)
  return loss, metrics
