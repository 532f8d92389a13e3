"""Mixup and cutmix with label smoothing, on device (METHOD.md §10; timm's `Mixup` in its "batch"
mode, as MAE fine-tunes): one λ per batch, each image mixed with the batch's mirror row
(row i with row B-1-i). Every draw comes from the step's key, so a resumed run mixes exactly
as the uninterrupted one, on any number of devices or processes.
"""
import jax
import jax.numpy as jnp


def smooth_targets(labels, num_classes: int, smoothing: float):
  """(B,) labels -> (B, K) targets: 1 - smoothing + smoothing/K on the label, smoothing/K elsewhere."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(key, lam, height: int, width: int):
  """timm's rand_bbox: a box of sides ⌊H·√(1-λ)⌋ × ⌊W·√(1-λ)⌋ centred on a uniform pixel,
  clipped to the image -> (top, bottom, left, right), bottom/right exclusive."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = jnp.floor(height * ratio).astype(jnp.int32), jnp.floor(width * ratio).astype(jnp.int32)
  k_y, k_x = jax.random.split(key)
  cy, cx = jax.random.randint(k_y, (), 0, height), jax.random.randint(k_x, (), 0, width)
  return (jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height),
          jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width))


def mix(key, images, labels, num_classes: int, *, mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
        smoothing: float):
  """(mixed images, (B, K) soft targets, λ). With both alphas > 0 cutmix is chosen with probability
  `switch_prob`, else mixup; mixup: λ ~ Beta(α, α), x·λ + x_mirror·(1-λ); cutmix: λ ~ Beta(α, α)
  sizes a box pasted from the mirror row and λ becomes the share of the image left uncovered. The
  targets mix the smoothed labels with the same λ (they sum to 1). Both alphas 0: smoothing only."""
  targets = smooth_targets(labels, num_classes, smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets, jnp.ones((), jnp.float32)
  k_switch, k_mixup, k_cutmix, k_box = jax.random.split(key, 4)
  h, w = images.shape[-3:-1]  # of an image, or of every frame of a clip (one box for all)
  mirror = images[::-1]
  if cutmix_alpha > 0:
    top, bottom, left, right = cutmix_box(k_box, jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha), h, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)          # (H, W)
    cut_lam = 1.0 - (bottom - top) * (right - left) / (h * w)  # a clip's frames are all cut alike
    cut = jnp.where(box.reshape((1,) * (images.ndim - 3) + box.shape + (1,)), mirror, images)
  if mixup_alpha > 0:
    mix_lam = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha)
    mixed = images * mix_lam + mirror * (1.0 - mix_lam)
  if mixup_alpha <= 0:
    out, lam = cut, cut_lam
  elif cutmix_alpha <= 0:
    out, lam = mixed, mix_lam
  else:
    use_cut = jax.random.uniform(k_switch) < switch_prob
    out, lam = jnp.where(use_cut, cut, mixed), jnp.where(use_cut, cut_lam, mix_lam)
  lam = lam.astype(jnp.float32)
  return out, targets * lam + targets[::-1] * (1.0 - lam), lam
