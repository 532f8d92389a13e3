"""grain pipeline: source -> augment -> per-process batch -> global, sharded `jax.Array` batch.

Training: Inception crop (area range from config, aspect 3/4..4/3) + horizontal flip.
Evaluation: resize the shorter side, centre crop. Pixels end up float32 in [-1, 1].
Order, training: one global stream (shuffle of all records, reshuffled every epoch, augmentation
seeded per stream position) cut into global batches; process i reads and decodes only rows
[i·B/n, (i+1)·B/n) of each, so the global batches are the same on any number of processes and
every epoch's records are split disjointly between them. Order, evaluation: the same cut into
global batches without shuffling, so global row r of batch k is record k·B + r on any number of
processes; the split is padded to whole global batches (rows whose "index" is >= the split's
length), so every process reads the same number of batches. The iterator
position (global batches taken) is checkpointed with the model; a resumed run starts the stream
there (`start`), on any number of processes.
"""
import ctypes
import functools
import math
import os
import signal
import sys

import grain
import jax
import numpy as np

from umd_jax.data import augment
from umd_jax.data.encoded import DecodeError, crop_resize
from umd_jax.data.latents import ChooseView, FirstView, LatentSource
from umd_jax.data.sources import DataError, skipped_at_decode
from umd_jax.data.video import Clip


def inception_box(h: int, w: int, rng: np.random.Generator, area_range):
  """(left, top, right, bottom) of a random crop of area in `area_range` (fraction of h·w) and
  aspect in [3/4, 4/3]; the centre square after 10 failed draws (or with area_range[0] = 1)."""
  if area_range[0] < 1.0:
    for _ in range(10):
      area = h * w * rng.uniform(*area_range)
      aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
      ch, cw = int(round(math.sqrt(area / aspect))), int(round(math.sqrt(area * aspect)))
      if 0 < ch <= h and 0 < cw <= w:
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return left, top, left + cw, top + ch
  return center_box(h, w)


def center_box(h: int, w: int):
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  return left, top, left + side, top + side


def _is_clip(image) -> bool:
  return isinstance(image, np.ndarray) and image.ndim == 4  # (T, H, W, C); images are (H, W, C)


def _crop(image, box, size: int) -> np.ndarray:
  """crop_resize of an image, or of every frame of a clip with the same box."""
  if _is_clip(image):
    return np.stack([crop_resize(frame, box, size) for frame in image])
  return crop_resize(image, box, size)


def inception_crop(image, rng: np.random.Generator, area_range, size: int) -> np.ndarray:
  """Random crop (see `inception_box`) of an array or an encoded JPEG, resized to size² (a clip:
  one box for all its frames; a video's window of frames drawn first, data/video.py)."""
  if isinstance(image, Clip):
    image = image.sample(rng)
  return _crop(image, inception_box(*image.shape[-3:-1], rng, area_range), size)


def center_crop(image, size: int) -> np.ndarray:
  if isinstance(image, Clip):
    image = image.centre()
  return _crop(image, center_box(*image.shape[-3:-1]), size)


def decoded(record, make):
  """make(record) -> image; a record whose JPEG fails to decode is replaced by its source's
  fallback (the next readable record, the same every time), counted and logged."""
  while True:
    try:
      return make(record), record
    except DecodeError as e:
      skipped_at_decode(record["image"].name, e)
      if record["image"].fallback is None:
        raise DataError(str(e)) from None
      record = record["image"].fallback()


def _to_float(image: np.ndarray) -> np.ndarray:
  return image.astype(np.float32) * (2.0 / 255.0) - 1.0


class TrainAugment(grain.transforms.RandomMap):

  def __init__(self, size, area_range, flip):
    self.size, self.area_range, self.flip = size, tuple(area_range), flip

  def random_map(self, record, rng):
    image, record = decoded(record, lambda r: inception_crop(r["image"], rng, self.area_range, self.size))
    if self.flip and rng.uniform() < 0.5:
      image = image[..., ::-1, :]  # the width axis, of an image or of every frame
    return {"image": _to_float(image), "label": np.int32(record["label"])}


class ClassifyAugment(TrainAugment):
  """Recognition fine-tuning's training view (METHOD.md §10): the Inception crop and flip, then
  RandAugment on the pixels and random erasing on the [-1, 1] image (data/augment.py)."""

  def __init__(self, size, area_range, flip, randaugment=None, erase_prob: float = 0.0):
    super().__init__(size, area_range, flip)
    self.randaugment, self.erase_prob = randaugment, erase_prob

  def random_map(self, record, rng):
    image, record = decoded(record, lambda r: inception_crop(r["image"], rng, self.area_range, self.size))
    if self.flip and rng.uniform() < 0.5:
      image = image[..., ::-1, :]
    if self.randaugment is not None:
      image = self.randaugment(np.ascontiguousarray(image), rng)
    image = _to_float(image)
    if self.erase_prob > 0:
      image = augment.random_erase(image, rng, self.erase_prob)
    return {"image": image, "label": np.int32(record["label"])}


class EvalPreprocess(grain.transforms.Map):

  def __init__(self, size):
    self.size = size

  def map(self, record):
    image, record = decoded(record, lambda r: center_crop(r["image"], self.size))
    return {"image": _to_float(image), "label": np.int32(record["label"])}


class EvalViews(grain.transforms.Map):
  """Multi-view testing of videos (MAE-ST): `views` evenly spaced windows of each record, each
  centre-cropped -> "image" (views, T, H, W, C); a clip with no longer video behind it repeats."""

  def __init__(self, size, views: int):
    self.size, self.views = size, views

  def map(self, record):
    def make(r):
      clips = r["image"].views(self.views) if isinstance(r["image"], Clip) else [r["image"]] * self.views
      return np.stack([center_crop(c, self.size) for c in clips])
    image, record = decoded(record, make)
    return {"image": _to_float(image), "label": np.int32(record["label"])}


class Batches:
  """Iterator of global batches {"image": (B, H, W, C) f32, "label": (B,) i32} on `sharding`;
  evaluation batches also carry "index" (B,) i32, the record's position in the split (padding
  after the last record has index >= its length). `iterator` is the grain iterator."""

  def __init__(self, iterator, sharding):
    self.iterator, self.sharding = iterator, sharding

  def __iter__(self):
    return self

  def __next__(self):
    local = {k: np.asarray(v) for k, v in next(self.iterator).items()}
    return {k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in local.items()}


class Head:
  """A source cut or padded to n records: its first n, or past its end record 0 again (padding
  with a real record's shapes and decoding, told apart by its index >= the source's length)."""

  def __init__(self, source, n):
    self.source, self.n = source, n
    self.in_memory = getattr(source, "in_memory", False)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return self.source[i if i < len(self.source) else 0]

  def __repr__(self):
    return f"Head({self.source!r}, {self.n})"


class _Indexed(grain.transforms.MapWithIndex):
  """Adds the record's position in the (padded) split."""

  def map_with_index(self, index, record):
    return {**record, "index": np.int32(index)}


def die_with_parent(parent: int, worker_index: int = 0, worker_count: int = 0) -> None:
  """grain worker init (bind `parent`, the pid of the process that starts the workers): the
  worker is killed when that process dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG), so no
  decoding worker outlives a killed run."""
  del worker_index, worker_count
  if not sys.platform.startswith("linux"):
    return
  ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
  if os.getppid() != parent:  # it was already gone before the request took effect
    os._exit(0)


def worker_init():
  """`die_with_parent` bound to this process, for grain's mp_prefetch."""
  return functools.partial(die_with_parent, os.getpid())


def check_read_threads(value) -> None:
  """The rule on data.read_threads (checks.py calls it before work)."""
  if not (isinstance(value, int) and not isinstance(value, bool) and value >= -1):
    raise DataError(f"data.read_threads={value!r}: use -1 (automatic) or a count >= 0")


def read_threads(data_config, source) -> int:
  """grain reader threads: `data.read_threads`, or with -1 none for in-memory sources (grain's
  advice: reader threads then only contend for the GIL with the thread that feeds the devices;
  BENCHMARKS.md, input pipeline) and grain's default 16 for files."""
  check_read_threads(data_config.read_threads)
  if data_config.read_threads >= 0:
    return data_config.read_threads
  return 0 if getattr(source, "in_memory", False) else 16


def make_batches(data_config, source, *, global_batch: int, sharding, seed: int, train: bool,
                 augment=None, start: int = 0) -> Batches:
  """Global batches of `source`. Training shuffles (seeded, reshuffled every epoch), repeats and
  augments; evaluation reads each record once in order, padding the last global batch (see the
  module docstring); `-(-len(source) // global_batch)` batches cover the split.
  `augment` overrides the training augmentation (e.g. the linear probe's crop range). `start`:
  the first global batch (a resumed run's position; the stream does not depend on it)."""
  processes = jax.process_count()
  if global_batch % processes:
    raise DataError(f"batch_size={global_batch} is not divisible by the {processes} processes")
  local_batch = global_batch // processes
  if train and len(source) < global_batch:
    raise DataError(f"{len(source)} records cannot fill one batch of {global_batch}: lower batch_size")
  d = data_config
  if augment is None and isinstance(source, LatentSource):  # pre-encoded latents: a view, no pixels
    augment = ChooseView() if train else FirstView()
  if augment is None:
    augment = (TrainAugment(d.image_size, (d.crop_area_min, d.crop_area_max), d.flip) if train
               else EvalPreprocess(d.image_size))
  if train:  # lazy: a process only reads and augments the records of its own rows
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat().random_map(augment, seed=seed)
  else:  # whole global batches, padded: every process reads the same number of batches
    total = -(-len(source) // global_batch) * global_batch
    ds = grain.MapDataset.source(Head(source, total)).map(augment)
    ds = ds.map_with_index(_Indexed())
  ds = ds.batch(local_batch, drop_remainder=True)[jax.process_index()::processes]  # its B/n rows of each
  if start:
    ds = ds[start:]
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads(d, source)))
  if d.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers), worker_init_fn=worker_init())
  return Batches(iter(ds), sharding)
