"""Inpainting scores (PSNR, SSIM of the filled region) against hand computations, and the masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from umd_jax import inpainting


def _ssim_reference(x, y, data_range=2.0, sigma=1.5, radius=5):
  """SSIM map written out pixel by pixel in numpy (reflect padding, Gaussian weights)."""
  h, w = x.shape
  r = min(radius, h - 1, w - 1)
  taps = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
  window = np.outer(taps, taps) / taps.sum() ** 2
  xp, yp = np.pad(x, r, mode="reflect"), np.pad(y, r, mode="reflect")
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  out = np.zeros((h, w))
  for i in range(h):
    for j in range(w):
      a, b = xp[i:i + 2 * r + 1, j:j + 2 * r + 1], yp[i:i + 2 * r + 1, j:j + 2 * r + 1]
      ma, mb = (window * a).sum(), (window * b).sum()
      va, vb = (window * a * a).sum() - ma ** 2, (window * b * b).sum() - mb ** 2
      cab = (window * a * b).sum() - ma * mb
      out[i, j] = (2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
  return out


def test_psnr_and_ssim_of_the_filled_region_against_hand_computations():
  rng = np.random.default_rng(0)
  original = rng.uniform(-1, 1, (2, 12, 12, 1)).astype(np.float32)
  known = np.ones((2, 12, 12, 1), np.float32)
  known[:, 4:8, 4:8] = 0
  filled = original.copy()
  filled[0, 4:8, 4:8] += 0.1  # error 0.1 on the 16 filled pixels: MSE 0.01, PSNR 10·log10(4 / 0.01)
  filled[1] += 0.5 * (1 - known[1])  # and 0.5 in the second image; known pixels are never scored
  psnr, ssim = inpainting.region_scores(jnp.asarray(filled), jnp.asarray(original), jnp.asarray(known))
  np.testing.assert_allclose(np.asarray(psnr), [10 * np.log10(4 / 0.01), 10 * np.log10(4 / 0.25)], rtol=1e-5)
  for i in range(2):
    expected = (_ssim_reference(filled[i, ..., 0], original[i, ..., 0]) * (1 - known[i, ..., 0])).sum() / 16
    assert float(ssim[i]) == pytest.approx(expected, rel=1e-4)
  same_psnr, same_ssim = inpainting.region_scores(jnp.asarray(original), jnp.asarray(original), jnp.asarray(known))
  assert np.all(np.asarray(same_ssim) == pytest.approx(1.0)) and np.all(np.asarray(same_psnr) > 90)


def test_masks_and_their_patch_counts():
  config = tiny_config()  # 8×8 images, 2×2 patches: 16 patches
  center = inpainting.inpaint_mask(config, "center", 3, jax.random.PRNGKey(0))
  assert center.shape == (3, 8, 8, 1) and center[:, 2:6, 2:6].sum() == 0 and center.sum() == 3 * 48
  assert inpainting.masked_patch_count(config, center) == 4
  config.sample.inpaint_ratio = 0.5
  random = inpainting.inpaint_mask(config, "random", 4, jax.random.PRNGKey(1))
  assert inpainting.masked_patch_count(config, random) == 8 and not np.array_equal(random[0], random[1])
  uneven = center.copy()
  uneven[0, 0, 0] = 0  # one image masks a fifth patch
  with pytest.raises(inpainting.InpaintError, match="masks 4..5 patches per image"):
    inpainting.masked_patch_count(config, uneven)
  with pytest.raises(inpainting.InpaintError, match="leaves nothing to fill"):
    inpainting.masked_patch_count(config, np.ones((2, 8, 8, 1), np.float32))
