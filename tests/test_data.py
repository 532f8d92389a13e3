"""Sources (digits, TFDS via mock_data, image folder, synthetic) and the grain pipeline."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from conftest import tiny_config
from umd_jax import data, sharding
from umd_jax.data import pipeline, sources


def _mesh(one_device):
  return sharding.make_mesh(tiny_config().mesh, one_device)


def _first(config, source, one_device, train=True, seed=0, batch=8):
  it = data.make_batches(config.data, source, global_batch=batch, sharding=sharding.batch_sharding(_mesh(one_device)),
                         seed=seed, train=train)
  return it, {k: np.asarray(v) for k, v in next(it).items()}


def test_digits_fixed_split():
  train, test = data.make_source(tiny_config().data, "train"), data.make_source(tiny_config().data, "test")
  assert (len(train), len(test)) == (1500, 297)
  assert train[0]["image"].shape == (8, 8, 1) and train[0]["image"].dtype == np.uint8
  assert sorted(set(test.labels.tolist())) == list(range(10))
  # Same split in every run; no image is in both.
  again = data.make_source(tiny_config().data, "test")
  np.testing.assert_array_equal(again.images, test.images)
  train_set = {im.tobytes() + bytes([l]) for im, l in zip(train.images, train.labels)}
  assert sum(im.tobytes() + bytes([l]) in train_set for im, l in zip(test.images, test.labels)) < 5  # exact dups only


def test_digits_splits_slice_as_tfds_splits_do():
  d = tiny_config().data
  test, train = data.make_source(d, "test"), data.make_source(d, "train")
  for split, rows in (("test[:40]", slice(0, 40)), ("test[-7:]", slice(290, 297)), ("train[10%:20%]", slice(150, 300)),
                      ("test[5:9]", slice(5, 9))):
    part, whole = data.make_source(d, split), test if split.startswith("test") else train
    np.testing.assert_array_equal(part.images, whole.images[rows])
    np.testing.assert_array_equal(part.labels, whole.labels[rows])
  for bad in ("val", "test[:x]", "test[1:2:3]"):
    with pytest.raises(data.DataError, match=r"use one of \['test', 'train'\], optionally sliced as TFDS does"):
      data.make_source(d, bad)


def test_batches_are_global_scaled_and_deterministic(one_device):
  config = tiny_config()
  source = data.make_source(config.data, "train")
  _, a = _first(config, source, one_device)
  _, b = _first(config, source, one_device)
  _, c = _first(config, source, one_device, seed=1)
  assert a["image"].shape == (8, 8, 8, 1) and a["image"].dtype == np.float32 and a["label"].dtype == np.int32
  assert a["image"].min() >= -1.0 and a["image"].max() <= 1.0 and a["image"].min() == -1.0
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["label"], c["label"])


def test_reader_threads_by_source_and_same_batches_either_way(one_device):
  config = tiny_config()
  source = data.make_source(config.data, "train")
  assert pipeline.read_threads(config.data, source) == 0  # in memory: no reader threads
  assert pipeline.read_threads(config.data, object()) == 16  # files: grain's default
  threaded = tiny_config(**{"data.read_threads": 4})
  assert pipeline.read_threads(threaded.data, source) == 4
  it_a, _ = _first(config, source, one_device)
  it_b, _ = _first(threaded, source, one_device)
  for _ in range(3):  # the order does not depend on how many threads read the records
    np.testing.assert_array_equal(np.asarray(next(it_a)["image"]), np.asarray(next(it_b)["image"]))
  with pytest.raises(data.DataError, match="data.read_threads=-2"):
    pipeline.read_threads(tiny_config(**{"data.read_threads": -2}).data, source)


def test_a_stream_started_at_a_position_continues_the_same_order(one_device):
  """What a resumed run relies on: the batches from global batch k on are those an
  uninterrupted stream gives after k batches (and the stream is the same on any process count)."""
  config = tiny_config()
  source = data.make_source(config.data, "train")
  mesh = sharding.make_mesh(config.mesh, one_device)
  make = lambda start: data.make_batches(config.data, source, global_batch=16, seed=0, train=True, start=start,
                                         sharding=sharding.batch_sharding(mesh))
  whole = make(0)
  expected = [np.asarray(next(whole)["image"]) for _ in range(100)][95:]  # past the first epoch (93 batches)
  resumed = make(95)
  for e in expected:
    np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), e)


def test_tfds_array_record_source_with_mock_data(one_device):
  config = tiny_config(**{"data.name": "cifar10", "data.data_dir": "/unused", "data.image_size": 16,
                          "data.channels": 3, "data.crop_area_min": 0.8, "data.flip": True})
  with tfds.testing.mock_data(num_examples=24):
    source = data.make_source(config.data, "train")
    assert len(source) == 24 and source.num_classes == 10
    _, batch = _first(config, source, one_device)
  assert batch["image"].shape == (8, 16, 16, 3)
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert ((0 <= batch["label"]) & (batch["label"] < 10)).all()


def _write_folder(root, per_class=5, bad=1):
  rng = np.random.default_rng(0)
  for c, name in enumerate(["cat", "dog"]):
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
  for i in range(bad):
    (root / "cat" / f"broken{i}.jpg").write_bytes(b"not an image at all")
  (root / "dog" / "notes.txt").write_text("ignored: not an image extension")


def test_image_folder_skips_unreadable_files_and_counts_them(tmp_path, one_device):
  _write_folder(tmp_path / "images")
  config = tiny_config(**{"data.name": "folder", "data.data_dir": str(tmp_path / "images"), "data.channels": 3,
                          "data.image_size": 8, "data.num_classes": 2})
  source = data.make_source(config.data, "train")  # no train/ sub-folder: the root is the split
  assert len(source) == 10 and source.num_skipped == 1 and source.num_classes == 2
  assert sorted(source.labels.tolist()) == [0] * 5 + [1] * 5
  _, batch = _first(config, source, one_device)
  assert batch["image"].shape == (8, 8, 8, 3)


def test_image_folder_uses_the_split_subfolder(tmp_path):
  _write_folder(tmp_path / "images" / "train", per_class=2, bad=0)
  _write_folder(tmp_path / "images" / "validation", per_class=3, bad=0)
  config = tiny_config(**{"data.name": "folder", "data.data_dir": str(tmp_path / "images"), "data.channels": 3,
                          "data.num_classes": 2})
  assert len(data.make_source(config.data, "train")) == 4
  assert len(data.make_source(config.data, "validation")) == 6


def test_empty_image_folder_is_a_clear_error(tmp_path):
  (tmp_path / "images" / "cat").mkdir(parents=True)
  (tmp_path / "images" / "cat" / "x.png").write_bytes(b"garbage")
  config = tiny_config(**{"data.name": "folder", "data.data_dir": str(tmp_path / "images")})
  with pytest.raises(data.DataError, match="no readable images.*1 unreadable skipped"):
    data.make_source(config.data, "train")


def test_too_few_records_for_a_batch_is_a_clear_error(tmp_path, one_device):
  _write_folder(tmp_path / "images", per_class=2, bad=0)
  config = tiny_config(**{"data.name": "folder", "data.data_dir": str(tmp_path / "images"), "data.channels": 3,
                          "data.num_classes": 2})
  with pytest.raises(data.DataError, match="cannot fill one batch of 8"):
    _first(config, data.make_source(config.data, "train"), one_device)


def test_inception_crop_area_and_aspect():
  rng = np.random.default_rng(0)
  boxes = np.array([pipeline.inception_box(100, 120, rng, (0.3, 0.5)) for _ in range(300)])
  h, w = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
  assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 120).all() and (boxes[:, 3] <= 100).all()
  areas, aspects = h * w / (100 * 120), w / h
  assert areas.min() >= 0.28 and areas.max() <= 0.52          # rounding of the sides
  assert aspects.min() >= 0.72 and aspects.max() <= 1.38
  assert areas.std() > 0.03                                    # really random
  out = pipeline.inception_crop(np.zeros((100, 120, 3), np.uint8), rng, (0.3, 0.5), 32)
  assert out.shape == (32, 32, 3)


def _photo(h, w, seed=0):
  """Smooth, textured content (not white noise, which decodes unlike photographs)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  image = np.zeros((h, w, 3))
  for _ in range(6):
    f, phase = rng.uniform(1, 12, 2), rng.uniform(0, 2 * np.pi, 3)
    image += rng.uniform(20, 50) * np.sin(2 * np.pi * (f[0] * x + f[1] * y)[..., None] + phase)
  image += rng.normal(0, 6, (h, w, 3))  # texture
  return np.clip(128 + image, 0, 255).astype(np.uint8)


def _jpeg(image, quality=90):
  import io
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, "JPEG", quality=quality)
  return buffer.getvalue()


def _psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return np.inf if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.mark.parametrize("size", [64, 256])
def test_reduced_jpeg_decode_draws_the_same_boxes_and_differs_only_by_resampling(size):
  from umd_jax.data.encoded import EncodedImage
  encoded = _jpeg(_photo(375, 500))
  reduced, full = EncodedImage(encoded, 3), EncodedImage(encoded, 3, reduced=False)
  decoded = np.asarray(Image.open(__import__("io").BytesIO(encoded)).convert("RGB"))
  assert reduced.shape == decoded.shape
  psnrs = []
  for seed in range(20):
    outs, states = [], []
    for image in (reduced, full, decoded):
      rng = np.random.default_rng(seed)
      outs.append(pipeline.inception_crop(image, rng, (0.8, 1.0), size))
      states.append(rng.bit_generator.state["state"]["state"])
    assert states[0] == states[1] == states[2]  # the same random draws, so the same boxes
    np.testing.assert_array_equal(outs[1], outs[2])  # reduced=False is exactly today's full decode
    psnrs.append(_psnr(outs[0], outs[2]))
  # At 64 px the 1/4-scale decode differs from the full path by resampling only
  assert min(psnrs) > (30 if size == 64 else 99), psnrs  # 256 px of a 300-500 px crop: no reduction
  np.testing.assert_array_equal(pipeline.center_crop(full, size), pipeline.center_crop(decoded, size))


def test_a_jpeg_header_is_parsed_once_per_read_and_decodes_again_when_asked(monkeypatch):
  from umd_jax.data import encoded as enc
  data = _jpeg(_photo(375, 500))
  opened = []
  real_open = enc.Image.open
  monkeypatch.setattr(enc.Image, "open", lambda f: opened.append(1) or real_open(f))
  image = enc.EncodedImage(data, 3)
  first = pipeline.inception_crop(image, np.random.default_rng(0), (0.8, 1.0), 64)
  assert len(opened) == 1  # shape (the crop box) and the region decode share one parsed header
  again = pipeline.inception_crop(image, np.random.default_rng(0), (0.8, 1.0), 64)
  np.testing.assert_array_equal(first, again)  # a second read opens the bytes afresh, same pixels
  np.testing.assert_array_equal(image.full(), np.asarray(real_open(__import__("io").BytesIO(data)).convert("RGB")))


def test_grey_and_cmyk_jpegs_and_pngs_convert_as_before(tmp_path):
  from umd_jax.data.encoded import EncodedImage
  photo = _photo(120, 160)
  grey = np.asarray(Image.fromarray(photo).convert("L"))
  for mode, array in (("L", grey), ("CMYK", None)):
    pil = Image.fromarray(grey) if mode == "L" else Image.fromarray(photo).convert("CMYK")
    import io
    buffer = io.BytesIO()
    pil.save(buffer, "JPEG", quality=95)
    for channels in (1, 3):
      expected = sources._to_channels(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert(
          "L" if channels == 1 else "RGB")), channels)
      got = EncodedImage(buffer.getvalue(), channels).full()
      np.testing.assert_array_equal(got, expected)
      small = pipeline.center_crop(EncodedImage(buffer.getvalue(), channels), 16)  # reduced scale
      assert small.shape == (16, 16, channels)


def test_flip_happens_half_the_time_and_eval_is_a_center_crop():
  augment = pipeline.TrainAugment(4, (1.0, 1.0), flip=True)
  image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 10
  rng = np.random.default_rng(0)
  flipped = sum(augment.random_map({"image": image, "label": 0}, rng)["image"][0, 0, 0] > -0.9 for _ in range(400))
  assert 160 < flipped < 240
  wide = np.zeros((4, 8, 1), np.uint8)
  wide[:, 2:6] = 255
  out = pipeline.EvalPreprocess(4).map({"image": wide, "label": 3})
  np.testing.assert_array_equal(out["image"], np.ones((4, 4, 1), np.float32))
  assert out["label"] == 3


def test_synthetic_source_is_deterministic():
  config = tiny_config(**{"data.name": "synthetic", "data.synthetic_size": 64, "data.channels": 3})
  a, b = data.make_source(config.data, "train"), data.make_source(config.data, "train")
  assert len(a) == 64
  np.testing.assert_array_equal(a[5]["image"], b[5]["image"])
  assert a[5]["image"].shape == (8, 8, 3) and not np.array_equal(a[5]["image"], a[6]["image"])


def test_class_folders_must_match_the_class_count(tmp_path):
  root = tmp_path / "images"
  for c in range(11):  # sorted as c0, c1, c10, c2, ...: 11 classes where 10 are configured
    (root / f"c{c}").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / f"c{c}" / "0.png")
  config = tiny_config(**{"data.name": "folder", "data.data_dir": str(root), "data.channels": 3})
  with pytest.raises(data.DataError, match=r"has 11 classes \(c0, c1, c10, c2, .*\) but data.num_classes=10: "
                                           r"set --config.data.num_classes=11"):
    data.make_source(config.data, "train")
  assert len(data.make_source(config.data, "train", labelled=False)) == 11  # FID's reference images


def test_a_file_that_fails_at_decode_time_is_skipped_deterministically(tmp_path, one_device):
  import io
  root = tmp_path / "images"
  _write_folder(root, per_class=4, bad=0)
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
  (root / "cat" / "truncated.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
  config = tiny_config(**{"data.name": "folder", "data.data_dir": str(root), "data.channels": 3,
                          "data.num_classes": 2, "data.image_size": 8})
  source = data.make_source(config.data, "train")
  assert len(source) == 9 and source.num_skipped == 0  # the header is fine: the scan keeps it
  bad = [i for i, f in enumerate(source.files) if f.endswith("truncated.jpg")][0]
  prep = pipeline.EvalPreprocess(8)  # JPEGs decode in the pipeline: the failure shows there
  record = prep.map(source[bad])  # skipped at decode: the next readable file takes its place, every time
  np.testing.assert_array_equal(record["image"], prep.map(source[bad + 1])["image"])
  assert record["label"] == source[bad + 1]["label"]
  assert str(root / "cat" / "truncated.jpg") in data.sources.DECODE_FAILURES
  mesh = sharding.make_mesh(config.mesh, one_device)
  make = lambda: data.make_batches(config.data, source, global_batch=8, sharding=sharding.batch_sharding(mesh),
                                   seed=0, train=True)
  first, second = make(), make()
  for _ in range(3):  # whole epochs through the truncated file, the same batches twice
    np.testing.assert_array_equal(np.asarray(next(first)["image"]), np.asarray(next(second)["image"]))


def test_evaluation_batches_are_in_split_order_padded_to_whole_batches(one_device):
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh, one_device)
  source = data.make_source(config.data, "test")  # 297 digits
  batches = data.make_batches(config.data, source, global_batch=128, sharding=sharding.batch_sharding(mesh),
                              seed=0, train=False)
  got = [next(batches) for _ in range(3)]  # 3 x 128 = 384 rows: 297 records, then padding
  index = np.concatenate([np.asarray(b["index"]) for b in got])
  labels = np.concatenate([np.asarray(b["label"]) for b in got])
  np.testing.assert_array_equal(index, np.arange(384))
  np.testing.assert_array_equal(labels[:297], [r["label"] for r in source])
  with pytest.raises(StopIteration):
    next(batches)


class PhotosForTest(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A few JPEGs stored encoded in array_record, as ImageNet's TFDS build stores them."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    import io
    for i in range(8):
      yield i, {"image": io.BytesIO(_jpeg(_photo(300 + 10 * i, 400, seed=i))), "label": i % 2}


def test_tfds_jpegs_reach_the_pipeline_encoded_and_decode_like_the_full_path(tmp_path, one_device):
  from umd_jax.data.encoded import EncodedImage
  PhotosForTest(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
  config = tiny_config(**{"data.name": PhotosForTest.name, "data.data_dir": str(tmp_path), "data.channels": 3,
                          "data.num_classes": 2, "data.image_size": 32, "data.crop_area_min": 0.8})
  source = data.make_source(config.data, "train")
  record = source[3]
  assert isinstance(record["image"], EncodedImage) and record["image"].shape[0] in range(300, 380, 10)
  assert record["image"].shape[1:] == (400, 3)  # geometry from the header, nothing decoded
  config.data.decode_reduced = False
  full = data.make_source(config.data, "train")
  augment = pipeline.TrainAugment(32, (0.8, 1.0), True)
  for i in range(8):
    a = augment.random_map(source[i], np.random.default_rng(i))
    b = augment.random_map(full[i], np.random.default_rng(i))
    decoded = np.asarray(Image.open(__import__("io").BytesIO(full[i]["image"].data)).convert("RGB"))
    c = augment.random_map({"image": decoded, "label": full[i]["label"]}, np.random.default_rng(i))
    np.testing.assert_array_equal(b["image"], c["image"])  # decode_reduced=False: exactly the old path
    assert _psnr((a["image"] + 1) * 127.5, (c["image"] + 1) * 127.5) > 30


def test_16_bit_pngs_are_scaled_to_8_bits_not_clipped(tmp_path):
  """A 16-bit grey PNG (PIL mode I;16) keeps its contrast: value / 257, as an 8-bit image of it."""
  ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000
  for c in ("a", "b"):
    (tmp_path / c).mkdir()
    Image.fromarray(ramp).save(tmp_path / c / "0.png")  # uint16: PIL mode I;16
  assert Image.open(tmp_path / "a" / "0.png").mode.startswith("I")  # PIL opens it as a 16-bit / int image
  for channels in (1, 3):
    config = tiny_config(**{"data.name": "folder", "data.data_dir": str(tmp_path), "data.channels": channels,
                            "data.num_classes": 2})
    image = data.make_source(config.data, "train")[0]["image"]
    expected = np.round(ramp / 257).astype(np.uint8)
    assert image.shape == (8, 8, channels)
    np.testing.assert_array_equal(image[..., 0], expected)
    assert (image == 255).mean() < 0.05  # not the near-white image a clipping convert gives


WORKER_SCRIPT = '''
import sys, time
from absl import flags
from configs import demo
from umd_jax import data, sharding


def main():
  flags.FLAGS(["workers"])  # grain reads its own absl flags
  config = demo.get_config()
  config.unlock()
  config.data.num_workers = 2
  mesh = sharding.make_mesh(config.mesh)
  batches = data.make_batches(config.data, data.make_source(config.data, "train"), global_batch=16,
                              sharding=sharding.batch_sharding(mesh), seed=0, train=True)
  next(batches)
  print("ready", flush=True)
  time.sleep(300)


if __name__ == "__main__":
  main()
'''


def test_grain_workers_die_with_a_killed_run(tmp_path):
  """kill -9 of a run with data.num_workers=2: its decoding workers (and multiprocessing's
  resource tracker) do not outlive it."""
  script = tmp_path / "workers.py"
  script.write_text(WORKER_SCRIPT)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                          text=True)
  try:
    assert proc.stdout.readline().strip() == "ready"
    children = [int(p) for p in subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True,
                                               text=True).stdout.split()]
    assert len(children) >= 2, children  # the two workers (and the resource tracker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def alive(pid):  # a process that exists and is not a zombie
      try:
        with open(f"/proc/{pid}/stat") as f:
          return f.read().split()[2] != "Z"
      except OSError:
        return False
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
      time.sleep(0.2)
    assert not [pid for pid in children if alive(pid)], "workers outlived the killed run"
  finally:
    if proc.poll() is None:
      proc.kill()


def _odd_mode_files():
  """{name: (encoded bytes, expected (H, W, 1) grey, expected (H, W, 3) RGB)} of a 16-bit grey PNG,
  a palette PNG, an LA PNG and a CMYK JPEG, each a uniform 64×64 image, with the pixels the one
  decode must give (16-bit: value / 257; the others: PIL's conversion)."""
  import io
  def encoded(pil, fmt):
    buffer = io.BytesIO()
    pil.save(buffer, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    return buffer.getvalue()
  def expect(pil_rgb, grey):
    return np.full((64, 64, 1), grey, np.uint8), np.asarray(pil_rgb)[:64, :64]
  out = {}
  deep = Image.fromarray(np.full((64, 64), 32896, np.uint16))  # PIL mode I;16: mid grey
  out["16-bit"] = (encoded(deep, "PNG"), np.full((64, 64, 1), 128, np.uint8), np.full((64, 64, 3), 128, np.uint8))
  palette = Image.fromarray(np.full((64, 64, 3), (200, 40, 90), np.uint8)).convert("P", palette=Image.ADAPTIVE)
  out["palette"] = (encoded(palette, "PNG"), *expect(palette.convert("RGB"), np.asarray(palette.convert("L"))[0, 0]))
  la = Image.fromarray(np.stack([np.full((64, 64), 77, np.uint8), np.full((64, 64), 200, np.uint8)], -1), "LA")
  out["LA"] = (encoded(la, "PNG"), *expect(la.convert("RGB"), 77))
  cmyk = Image.fromarray(np.full((64, 64, 3), (30, 160, 220), np.uint8)).convert("CMYK")
  data_ = encoded(cmyk, "JPEG")
  decoded = Image.open(io.BytesIO(data_))
  assert decoded.mode == "CMYK"
  out["CMYK"] = (data_, *expect(decoded.convert("RGB"), np.asarray(decoded.convert("L"))[0, 0]))
  return out


@pytest.mark.parametrize("name", ["16-bit", "palette", "LA", "CMYK"])
def test_every_image_path_decodes_16_bit_palette_cmyk_and_la_alike(name, tmp_path):
  """One decode (encoded.pixels): the full decode, the training crop at a reduced scale, the eval
  crop, an image folder, a TFDS record and an inpainting mask read the same pixels."""
  from configs import demo
  from umd_jax import inpainting
  from umd_jax.data.encoded import EncodedImage
  raw, grey, rgb = _odd_mode_files()[name]
  tolerance = 2 if name == "CMYK" else 0  # JPEG's colour transform rounds a level or two
  for channels, expected in ((1, grey), (3, rgb)):
    close = lambda got: np.testing.assert_allclose(got.astype(int), np.broadcast_to(
        expected[:1, :1], got.shape).astype(int), atol=tolerance, err_msg=f"{name}, {channels} channels")
    image = EncodedImage(raw, channels)
    close(image.full())
    close(EncodedImage(raw, channels).region((0, 0, 64, 64), 8))  # 8× smaller: the reduced-decode path
    close(EncodedImage(raw, channels, reduced=False).region((8, 8, 40, 40), 16))
    close(pipeline.center_crop(EncodedImage(raw, channels), 16))
    tfds_like = object.__new__(sources.TfdsSource)  # a prepared TFDS split of this one record
    tfds_like.source, tfds_like.channels, tfds_like._repr, tfds_like.reduced = [{"image": raw, "label": 0}], channels, "mock", True
    got = tfds_like[0]["image"]
    close(got if isinstance(got, np.ndarray) else got.full())
  suffix = ".jpg" if name == "CMYK" else ".png"
  for c in ("a", "b"):
    (tmp_path / c).mkdir()
    (tmp_path / c / f"0{suffix}").write_bytes(raw)
  for channels, expected in ((1, grey), (3, rgb)):
    folder = sources.ImageFolderSource(str(tmp_path), channels)[0]["image"]
    folder = folder if isinstance(folder, np.ndarray) else folder.full()
    np.testing.assert_allclose(folder.astype(int), np.broadcast_to(expected[:1, :1], folder.shape).astype(int),
                               atol=tolerance)
  # as an inpainting mask (white = fill): each of these uniform images is dark or light as a whole
  config = demo.get_config()
  mask = inpainting.inpaint_mask(config, str(tmp_path / "a" / f"0{suffix}"), 1, None)
  assert (mask == (1.0 if grey[0, 0, 0] < 128 else 0.0)).all(), name


def test_a_16_bit_inpainting_mask_keeps_its_dark_grey_known_area(tmp_path):
  """A dark-grey known area of a 16-bit mask (8000 / 65535: 31 of 255) stays known; only the
  white 4×4 centre is filled (PIL's convert("L") clipped the grey to white: all 64 pixels filled)."""
  from configs import demo
  from umd_jax import inpainting
  mask16 = np.full((8, 8), 8000, np.uint16)
  mask16[2:6, 2:6] = 65535
  Image.fromarray(mask16).save(tmp_path / "mask.png")
  known = inpainting.inpaint_mask(demo.get_config(), str(tmp_path / "mask.png"), 2, None)
  assert known.shape == (2, 8, 8, 1)
  assert int((known[0] == 0).sum()) == 16
  assert (known[:, 2:6, 2:6] == 0).all()
