"""FID / IS: Fréchet distance against scipy, the Inception network and its preprocessing."""
import jax
import numpy as np
import pytest
import scipy.linalg
from ml_collections import config_dict

from umd_jax import fid, sharding
from umd_jax.models import inception


def _cov(rng, d):
  a = rng.normal(size=(d, 2 * d))
  return a @ a.T / (2 * d)


def test_frechet_distance_matches_scipy_sqrtm():
  rng = np.random.default_rng(0)
  for d in (4, 32, 128):
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), _cov(rng, d), _cov(rng, d)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), ref, rtol=1e-6)


def test_fid_of_a_set_against_itself_is_zero():
  pool = np.random.default_rng(1).normal(size=(500, 64))
  mu, sigma = fid.statistics(pool)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_statistics_on_sharded_padded_rows_match_numpy_float64():
  rng = np.random.default_rng(2)
  pool = (3.0 + rng.normal(size=(300, 64)) * rng.uniform(0.5, 2.0, size=64)).astype(np.float32)
  mesh = sharding.make_mesh(config_dict.ConfigDict({"data": -1, "fsdp": 1}))
  padded = np.concatenate([pool, np.full((4, 64), 1e3, np.float32)])  # padding rows must not count
  sharded = jax.device_put(padded, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES)))
  mu, sigma = fid.statistics(sharded, n=300)
  # float32 sums of 300 centred terms: relative error a few 1e-7 of the larger entries
  np.testing.assert_allclose(mu, pool.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sigma, np.cov(pool.astype(np.float64), rowvar=False), rtol=1e-5, atol=1e-5)
  logits = rng.normal(size=(300, 10)).astype(np.float32) * 3
  host = _inception_score_float64(logits, splits=4)
  got = fid.inception_score(jax.device_put(np.concatenate([logits, np.zeros((4, 10), np.float32)]),
                                           sharded.sharding), splits=4, n=300)
  np.testing.assert_allclose(got, host, rtol=1e-5)


def _inception_score_float64(logits, splits):
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  scores = [np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), axis=1)))
            for part in np.array_split(p.astype(np.float64), splits)]
  return np.mean(scores), np.std(scores)


def test_inception_score_bounds():
  assert fid.inception_score(np.zeros((100, 1008)), splits=2)[0] == pytest.approx(1.0)
  confident = np.full((1000, 1008), -1e4)
  confident[np.arange(1000), np.arange(1000) % 10] = 0.0  # sure of one of 10 classes, evenly spread
  assert fid.inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)


def _bilinear_reference(img, out):
  """PyTorch's F.interpolate(mode='bilinear', align_corners=False) for upsampling, in numpy."""
  h, w = img.shape[:2]
  def axis(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
    i0 = np.floor(src).astype(int)
    return i0, np.minimum(i0 + 1, n_in - 1), src - i0
  y0, y1, fy = axis(h, out)
  x0, x1, fx = axis(w, out)
  top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
  bottom = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
  return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def test_preprocessing_matches_pytorch_fid():
  img = np.random.default_rng(0).integers(0, 256, (1, 13, 17, 3), dtype=np.uint8)
  got = np.asarray(inception.preprocess(img))[0]
  expected = 2 * _bilinear_reference(img[0].astype(np.float64) / 255, 299) - 1
  np.testing.assert_allclose(got, expected, atol=1e-5)
  grey = np.asarray(inception.preprocess(img[..., :1]))[0]
  # the same arithmetic per channel, but XLA:CPU may vectorise channels differently: 1 float32 ULP
  np.testing.assert_allclose(grey[..., 0], grey[..., 2], rtol=0, atol=4 * np.finfo(np.float32).eps)


def test_inception_shapes_and_weight_file_round_trip(tmp_path):
  net = inception.Inception(seed=0)  # random weights with pytorch-fid's names and shapes
  assert net.weights["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
  assert net.weights["fc.weight"].shape == (1008, 2048)
  np.savez(tmp_path / "w.npz", **net.weights)
  loaded = fid.load_inception(str(tmp_path / "w.npz"))
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
  mesh = sharding.make_mesh(config_dict.ConfigDict({"data": -1, "fsdp": 1}), jax.devices()[:2])
  pool, logits = fid.activations(loaded, images, mesh, batch=2, progress=False)
  assert len(pool.sharding.device_set) == 2  # rows stay sharded on the devices
  pool, logits = np.asarray(pool), np.asarray(logits)
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and np.isfinite(pool).all()
  assert (pool >= 0).all()  # average of ReLU outputs


def test_missing_or_wrong_weights_are_clear_errors(tmp_path):
  with pytest.raises(fid.FidError, match="convert_inception_weights.py"):
    fid.load_inception(str(tmp_path / "absent.npz"))
  np.savez(tmp_path / "bad.npz", **{"fc.weight": np.zeros((1008, 2048), np.float32)})
  with pytest.raises(fid.FidError, match="is this a pytorch-fid InceptionV3 file"):
    fid.load_inception(str(tmp_path / "bad.npz"))
