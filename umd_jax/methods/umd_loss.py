"""The UMD objective (METHOD.md §1, §2): mask-then-noise corruption of one batch and its loss.

One global batch is split into a clean sub-batch (no noise, timestep index 0, mask ratio
`clean_mask_ratio`) and a noised sub-batch (t ~ U{0..T-1}, told t + 1, mask ratio
`noised_mask_ratio`). DiT, MaskDiT and MAE are other values of the same three numbers.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from umd_jax import diffusion
from umd_jax.corruption import Mask, sample_mask, split_sizes
from umd_jax.geometry import Grid


def masked_mean(sq_err, weight, axis=None):
  """sum(se * m) / sum(m) with m broadcast over channels; axis=None pools the whole sub-batch."""
  weight = jnp.broadcast_to(weight, sq_err.shape)
  return jnp.sum(sq_err * weight, axis=axis) / jnp.maximum(jnp.sum(weight, axis=axis), 1.0)


def _regions(mask: Optional[Mask], x, grid: Grid):
  """(visible, masked) pixel weights; without masking both are all pixels (METHOD.md §2)."""
  if mask is None:
    ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
    return ones, ones
  m = grid.pixel_mask(mask.mask)
  return 1.0 - m, m


def _per_sample(keys, purpose: int, draw: Callable):
  """draw(key) for every sample's key folded with `purpose` (one stream per kind of draw)."""
  return jax.vmap(lambda k: draw(jax.random.fold_in(k, purpose)))(keys)


def loss(apply_fn: Callable, schedule: diffusion.Schedule, x0: jax.Array, key: jax.Array, *,
             grid: Grid, clean_fraction: float, clean_mask_ratio: float, noised_mask_ratio: float,
             labels: Optional[jax.Array] = None, num_buckets: int = 10, label_dropout: float = 0.0,
             null_label: int = 0, sample_ids: Optional[jax.Array] = None, tube: int = 1):
  """The UMD loss of METHOD.md §2 and its parts.

  apply_fn(x, t_index, labels, mask: Mask | None) -> dict(x0=..., eps=...), inputs (B, [T,] H, W, C);
  x0 is cut into tokens as `grid` says; masks span `tube` token frames (corruption.sample_mask). The clean sub-batch is told the null label; in
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
    mask = sample_mask(_per_sample(k_clean, 0, lambda k: k), grid.num_tokens, clean_mask_ratio, tube)
    out = apply_fn(xc, jnp.zeros((n_clean,), jnp.int32), None, mask)
    _, masked = _regions(mask, xc, grid)
    metrics["loss_clean"] = masked_mean(jnp.square(out["x0"] - xc), masked)
    loss = loss + (n_clean / batch) * metrics["loss_clean"]
  if n_noised:
    xn = x0[n_clean:]
    t = _per_sample(k_noised, 1, lambda k: jax.random.randint(k, (), 0, schedule.num_timesteps))
    eps = _per_sample(k_noised, 2, lambda k: jax.random.normal(k, xn.shape[1:], xn.dtype))
    xt = diffusion.q_sample(schedule, xn, t, eps)
    mask = sample_mask(_per_sample(k_noised, 3, lambda k: k), grid.num_tokens, noised_mask_ratio, tube)
    noised_labels = None
    if labels is not None:
      noised_labels = labels[n_clean:]
      if label_dropout > 0:
        drop = _per_sample(k_noised, 4, lambda k: jax.random.uniform(k, ())) < label_dropout
        noised_labels = jnp.where(drop, null_label, noised_labels)
    out = apply_fn(xt, diffusion.network_timestep(t), noised_labels, mask)
    visible, masked = _regions(mask, xn, grid)
    eps_se, x0_se = jnp.square(out["eps"] - eps), jnp.square(out["x0"] - xn)
    metrics["loss_noised"] = 0.5 * masked_mean(eps_se, visible) + 0.5 * masked_mean(x0_se, masked)
    loss = loss + (n_noised / batch) * metrics["loss_noised"]
    pixels = tuple(range(1, xn.ndim))
    per_sample = (0.5 * masked_mean(eps_se, visible, axis=pixels)
                  + 0.5 * masked_mean(x0_se, masked, axis=pixels))
    onehot = jax.nn.one_hot(t * num_buckets // schedule.num_timesteps, num_buckets)
    metrics["bucket_sum"] = onehot.T @ per_sample
    metrics["bucket_count"] = onehot.sum(axis=0)
  return loss, metrics
