"""events.py: TensorBoard event files written without TensorFlow, read back by TensorFlow's own
reader and by TensorBoard's, as `tf.summary` files are; a failed write is an error, not a gap."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from umd_jax import events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(logdir):
  rng = np.random.default_rng(0)
  grey, rgb = rng.integers(0, 256, (2, 5, 7, 1), np.uint8), rng.integers(0, 256, (1, 6, 4, 3), np.uint8)
  writer = events.Writer(logdir)
  writer.write_hparams({"optim.base_lr": 1.5e-4, "model.variant": "B/4", "flip": True, "batch_size": 256})
  writer.write_scalars(1, {"loss": 0.75, "lr": np.float64(1e-4)})
  writer.write_scalars(2, {"loss": np.float32(0.5)})
  writer.write_images(2, {"reconstruction": grey, "samples": rgb})
  writer.close()
  return grey, rgb


def test_scalars_images_and_hparams_read_back_with_tensorflows_reader(tmp_path):
  import tensorflow as tf  # here, not at the top: every test process collects this module
  grey, rgb = _write(tmp_path)
  [path] = tmp_path.glob("events.out.tfevents.*")
  scalars, pictures, hparams = {}, {}, None
  for event in tf.compat.v1.train.summary_iterator(str(path)):
    for v in event.summary.value:
      plugin = v.metadata.plugin_data
      if plugin.plugin_name == "scalars":  # what tf.summary.scalar writes: a float32 tensor
        assert v.tensor.dtype == tf.float32.as_datatype_enum
        scalars[(v.tag, event.step)] = float(tf.make_ndarray(v.tensor))
      elif plugin.plugin_name == "images":  # [width, height, PNG, ...], as tf.summary.image
        pictures[v.tag] = tf.make_ndarray(v.tensor)
      elif plugin.plugin_name == "hparams":
        hparams = plugin_data_pb2.HParamsPluginData.FromString(plugin.content).session_start_info.hparams
  assert scalars == {("loss", 1): 0.75, ("lr", 1): pytest.approx(1e-4), ("loss", 2): 0.5}
  for tag, batch in (("reconstruction", grey), ("samples", rgb)):
    width, height, *pngs = pictures[tag]
    assert (int(width), int(height), len(pngs)) == (batch.shape[2], batch.shape[1], len(batch))
    for png, image in zip(pngs, batch):
      np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))).reshape(image.shape), image)
  assert hparams["optim.base_lr"].number_value == 1.5e-4 and hparams["model.variant"].string_value == "B/4"
  assert hparams["flip"].bool_value and hparams["batch_size"].number_value == 256


def test_tensorboard_sees_the_scalar_and_image_tags(tmp_path):
  import tensorflow as tf
  _write(tmp_path)
  accumulator = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  tags = accumulator.Tags()["tensors"]
  assert {"loss", "lr", "reconstruction", "samples"} <= set(tags)
  assert [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in accumulator.Tensors("loss")] == [(1, 0.75), (2, 0.5)]


def test_a_failed_write_is_raised_by_the_next_write_or_flush(tmp_path, monkeypatch):
  writer = events.Writer(tmp_path)

  def full(record):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(writer._records, "write", full)
  writer.write_scalars(1, {"loss": 1.0})
  with pytest.raises(OSError, match="No space left"):
    writer.flush()
  writer.write_scalars(2, {"loss": 1.0})
  writer._pending[-1].exception()  # the write has run (and failed)
  with pytest.raises(OSError, match="No space left"):  # raised by the next write, not only at the end
    writer.write_scalars(3, {"loss": 1.0})


def test_no_module_imports_tensorflow():
  """No module of the package loads TensorFlow (~4 s and ~0.5 GB of every process's start-up;
  absent from many accelerator images)."""
  code = ("import importlib, pkgutil, sys, umd_jax\n"
          "for m in pkgutil.walk_packages(umd_jax.__path__, 'umd_jax.'): importlib.import_module(m.name)\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout
