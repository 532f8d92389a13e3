"""Masks, the clean/noised split and the UMD loss against a hand computation (METHOD.md §1, §2)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dit_b, mae_b, maskdit_b, umd_b
from umd_jax import corruption, diffusion, geometry
from umd_jax.methods import umd_loss

SCHEDULE = diffusion.make_schedule("cosine", 1000)


@pytest.mark.parametrize("num_patches,ratio", [(16, 0.75), (16, 0.375), (256, 0.5), (49, 0.1)])
def test_mask_keeps_exact_count_and_restores_order(num_patches, ratio):
  m = corruption.random_mask(jax.random.PRNGKey(0), 32, num_patches, ratio)
  keep = int(num_patches * (1 - ratio))
  assert m.keep_ids.shape == (32, keep)
  np.testing.assert_array_equal(m.mask.sum(axis=1), num_patches - keep)
  for row in range(32):
    assert len(set(np.asarray(m.keep_ids[row]).tolist())) == keep
    np.testing.assert_array_equal(m.mask[row, m.keep_ids[row]], 0.0)
  # kept tokens followed by the dropped ones, un-shuffled with restore_ids, give 0..L-1 back.
  dropped = jnp.argsort(m.mask, axis=1, stable=True)[:, keep:]  # any order works for the check below
  order = jnp.concatenate([m.keep_ids, jnp.sort(dropped, axis=1)], axis=1)
  shuffled = jnp.take_along_axis(order, m.restore_ids, axis=1)
  kept_back = jnp.where(m.mask == 0, shuffled, -1)
  np.testing.assert_array_equal(kept_back, jnp.where(m.mask == 0, jnp.arange(num_patches)[None], -1))


def test_masks_are_uniform_over_positions_and_independent_per_sample():
  n, num_patches, ratio = 20000, 16, 0.75
  m = np.asarray(corruption.random_mask(jax.random.PRNGKey(1), n, num_patches, ratio).mask)
  freq = m.mean(axis=0)
  # Each position is masked with probability 0.75; 4 sigma of a binomial mean over 20k draws.
  np.testing.assert_allclose(freq, 0.75, atol=4 * np.sqrt(0.75 * 0.25 / n))
  assert len({tuple(r) for r in m[:200]}) > 150  # per-sample, not one mask for the batch


def test_no_mask_for_ratio_zero():
  assert corruption.random_mask(jax.random.PRNGKey(0), 4, 16, 0.0) is None


def test_pixel_mask_expands_patches_row_major():
  mask = jnp.zeros((1, 4)).at[0, 1].set(1.0)  # 2×2 grid of 3×3 patches; patch 1 is top-right
  pm = np.asarray(geometry.Grid(3, 2, 2).pixel_mask(mask))[0, ..., 0]
  expected = np.zeros((6, 6))
  expected[:3, 3:] = 1
  np.testing.assert_array_equal(pm, expected)


class Recorder:
  """A fake network: x0_pred = 0.5·input, eps_pred = -0.25·input; records what it was told."""

  def __init__(self, patch=2):
    self.calls, self.patch = [], patch

  def __call__(self, x, t, labels, mask):
    self.calls.append(dict(x=np.asarray(x), t=np.asarray(t), labels=labels,
                           keep=None if mask is None else np.asarray(mask.keep_ids)))
    return dict(x0=0.5 * x, eps=-0.25 * x)


def _pixel_mask_from_keep(keep, num_patches, size, patch):
  grid = size // patch
  m = np.ones((keep.shape[0], num_patches))
  for i, row in enumerate(keep):
    m[i, row] = 0
  return m.reshape(-1, grid, grid).repeat(patch, 1).repeat(patch, 2)[..., None]


def _hand_loss(x0, calls, n_clean, clean_ratio, noised_ratio, size=8, patch=2):
  """METHOD.md §2, written out with numpy from what the fake network was shown."""
  num_patches = (size // patch) ** 2
  b = x0.shape[0]
  parts = {}
  i = 0
  if n_clean:
    c = calls[i]; i += 1
    xc = x0[:n_clean]
    m = _pixel_mask_from_keep(c["keep"], num_patches, size, patch) if clean_ratio else np.ones(xc.shape[:3] + (1,))
    m = np.broadcast_to(m, xc.shape)
    parts["clean"] = ((0.5 * c["x"] - xc) ** 2 * m).sum() / m.sum()
  if b - n_clean:
    c = calls[i]
    xn = x0[n_clean:]
    t = c["t"] - 1
    abar = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[t][:, None, None, None]
    eps = (c["x"] - np.sqrt(abar) * xn) / np.sqrt(1 - abar)
    if noised_ratio:
      m = np.broadcast_to(_pixel_mask_from_keep(c["keep"], num_patches, size, patch), xn.shape)
      vis, msk = 1 - m, m
    else:
      vis = msk = np.ones_like(xn)
    eps_mse = ((-0.25 * c["x"] - eps) ** 2 * vis).sum() / vis.sum()
    x0_mse = ((0.5 * c["x"] - xn) ** 2 * msk).sum() / msk.sum()
    parts["noised"] = 0.5 * eps_mse + 0.5 * x0_mse
  total = (n_clean / b) * parts.get("clean", 0.0) + (1 - n_clean / b) * parts.get("noised", 0.0)
  return total, parts


@pytest.mark.parametrize("fraction,clean_ratio,noised_ratio", [
    (0.5, 0.75, 0.375),   # UMD
    (0.0, 0.0, 0.0),      # DiT
    (0.0, 0.0, 0.5),      # MaskDiT
    (1.0, 0.75, 0.0),     # MAE
    (0.25, 0.0, 0.5),     # clean step without masking
])
def test_loss_equals_hand_computation(fraction, clean_ratio, noised_ratio):
  x0 = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (8, 8, 8, 1), minval=-1, maxval=1))
  rec = Recorder()
  loss, metrics = umd_loss.loss(rec, SCHEDULE, jnp.asarray(x0), jax.random.PRNGKey(7), grid=geometry.Grid(2, 4, 4),
                                      clean_fraction=fraction, clean_mask_ratio=clean_ratio,
                                      noised_mask_ratio=noised_ratio)
  n_clean = int(8 * fraction)
  expected, parts = _hand_loss(x0, rec.calls, n_clean, clean_ratio, noised_ratio)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  if "clean" in parts:
    np.testing.assert_allclose(float(metrics["loss_clean"]), parts["clean"], rtol=1e-5)
  if "noised" in parts:
    np.testing.assert_allclose(float(metrics["loss_noised"]), parts["noised"], rtol=1e-5)
    assert float(metrics["bucket_count"].sum()) == 8 - n_clean


def test_bucket_losses_pool_to_the_noised_loss_without_masking():
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (64, 8, 8, 1), minval=-1, maxval=1)
  _, m = umd_loss.loss(Recorder(), SCHEDULE, x0, jax.random.PRNGKey(1), grid=geometry.Grid(2, 4, 4),
                             clean_fraction=0.0, clean_mask_ratio=0.0, noised_mask_ratio=0.0, num_buckets=10)
  # Without masking every sample has the same pixel count, so the bucket means pool to the loss.
  np.testing.assert_allclose(float(m["bucket_sum"].sum() / m["bucket_count"].sum()), float(m["loss_noised"]),
                             rtol=1e-5)


@pytest.mark.parametrize("module,fraction,clean_ratio,noised_ratio,conditioning", [
    (umd_b, 0.5, 0.75, 0.375, "adaln"),
    (dit_b, 0.0, None, 0.0, "adaln"),
    (maskdit_b, 0.0, None, 0.5, "adaln"),
    (mae_b, 1.0, 0.75, None, "in_context"),
])
def test_method_configs_produce_the_spec_corruption(module, fraction, clean_ratio, noised_ratio, conditioning):
  config = module.get_config()
  c = config.corruption
  assert (c.clean_fraction, config.model.conditioning) == (fraction, conditioning)
  if clean_ratio is not None:
    assert c.clean_mask_ratio == clean_ratio
  if noised_ratio is not None:
    assert c.noised_mask_ratio == noised_ratio
  # What the network sees for a batch of 16 images with 16 patches each:
  rec = Recorder()
  umd_loss.loss(rec, SCHEDULE, jnp.zeros((16, 8, 8, 1)), jax.random.PRNGKey(0), grid=geometry.Grid(2, 4, 4),
                      clean_fraction=c.clean_fraction, clean_mask_ratio=c.clean_mask_ratio,
                      noised_mask_ratio=c.noised_mask_ratio)
  n_clean = int(16 * fraction)
  calls = list(rec.calls)
  if n_clean:
    clean = calls.pop(0)
    assert clean["x"].shape[0] == n_clean and (clean["t"] == 0).all()
    assert clean["keep"].shape[1] == int(16 * (1 - clean_ratio))
  if n_clean < 16:
    noised = calls.pop(0)
    assert noised["x"].shape[0] == 16 - n_clean
    assert noised["t"].min() >= 1 and noised["t"].max() <= 1000  # told t + 1; index 0 is the clean step
    expected_keep = None if noised_ratio == 0 else int(16 * (1 - noised_ratio))
    assert (noised["keep"] is None) if expected_keep is None else noised["keep"].shape[1] == expected_keep
  assert not calls
