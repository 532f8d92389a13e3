"""Random-access image sources (grain's `__len__` + `__getitem__` protocol).

Each record is `{"image": uint8 (H, W, C), "label": int}`, or for clips uint8 (T, H, W, C).
Sources: any TFDS dataset prepared in array_record format, a folder with one sub-folder per class,
scikit-learn's bundled handwritten digits (the embedded default; no download), clips of those
digits moving (the embedded video set), and synthetic random images.
"""
import functools
import io
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from umd_jax.data.encoded import EncodedImage, pixels, to_channels

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(ValueError):
  """Bad or missing data: the message says what to do."""


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  try:
    return to_channels(image, channels)
  except ValueError as e:
    raise DataError(str(e)) from None


_SLICE = re.compile(r"^(\w+)(?:\[(-?\d*)(%?):(-?\d*)(%?)\])?$")


def split_slice(split: str, sizes: dict) -> tuple[str, slice]:
  """TFDS's split syntax for in-memory sources: 'test', 'test[:40]', 'train[10%:]' -> (name, rows)."""
  m = _SLICE.match(split)
  if not m or m.group(1) not in sizes:
    raise DataError(f"split {split!r}: use one of {sorted(sizes)}, optionally sliced as TFDS does ('test[:40]', "
                    "'train[:10%]')")
  name, start, start_pct, stop, stop_pct = m.groups()
  bound = lambda v, pct: None if v in (None, "") else (int(v) * sizes[name] // 100 if pct else int(v))
  return name, slice(bound(start, start_pct), bound(stop, stop_pct))


class DigitsSource:
  """scikit-learn's 1,797 handwritten 8×8 digits, 10 classes; fixed split (last 297 = 'test'),
  sliced as TFDS splits are ('test[:40]')."""
  TEST_SIZE = 297
  in_memory = True  # no file reads: the pipeline uses no reader threads (see pipeline.read_threads)

  def __init__(self, split: str, channels: int = 1):
    from sklearn.datasets import load_digits  # here: importing scikit-learn costs ~1.3 s, paid by digits runs only
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))  # fixed shuffle, then split
    cut = len(order) - self.TEST_SIZE
    name, rows = split_slice(split, {"train": cut, "test": self.TEST_SIZE})
    idx = (order[:cut] if name == "train" else order[cut:])[rows]
    images = np.round(digits.images[idx] * (255.0 / 16.0)).astype(np.uint8)[..., None]
    self.images = np.stack([_to_channels(im, channels) for im in images])
    self.labels = digits.target[idx].astype(np.int32)
    self.num_classes = 10
    self._repr = f"DigitsSource(split={split!r}, channels={channels})"

  def __repr__(self):
    return self._repr

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    return {"image": self.images[index], "label": self.labels[index]}


class MovingDigitsSource:
  """Clips of one of scikit-learn's handwritten digits moving across a dark size × size canvas
  (wrapping around its edges), `frames` frames long; the label is the direction of motion (0
  right, 1 left, 2 down, 3 up), which no single frame shows. Four clips per source digit, one per
  direction, so the split is the digits' ('train' / 'test', sliced as they are: 'test[:40]' is 160
  clips); record i is digit i // 4 moving in direction i % 4, from a start position and a speed of
  1 or 2 pixels a frame drawn from the record's own seed: the same clips on every host and run.
  With frames = 1 a record is the clip's first frame, an image (H, W, C): the frame-wise view, whose
  label no model can read (a baseline)."""
  DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (rows, columns) per frame
  NAMES = ("right", "left", "down", "up")
  in_memory = True

  def __init__(self, split: str, frames: int, size: int, channels: int = 1):
    if size < 8:
      raise DataError(f"moving digits need data.image_size >= 8 (the digits are 8×8): got {size}")
    self.digits = DigitsSource(split, channels)
    self.frames, self.size, self.split = frames, size, split
    self.num_classes, self.class_names = len(self.DIRECTIONS), list(self.NAMES)
    self.labels = np.tile(np.arange(self.num_classes, dtype=np.int32), len(self.digits))
    self.salt = 0 if split.startswith("train") else 1
    self.gives_clips = frames > 1

  def __repr__(self):
    return f"MovingDigitsSource(split={self.split!r}, frames={self.frames}, size={self.size})"

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    index = int(index)
    digit, direction = divmod(index, self.num_classes)
    rng = np.random.default_rng([self.salt, index])
    start, speed = rng.integers(0, self.size, 2), int(rng.integers(1, 3))
    canvas = np.zeros((self.size, self.size, self.digits.images.shape[-1]), np.uint8)
    canvas[:8, :8] = self.digits.images[digit]
    step = np.asarray(self.DIRECTIONS[direction]) * speed
    clip = np.stack([np.roll(canvas, tuple(start + f * step), axis=(0, 1)) for f in range(self.frames)])
    return {"image": clip if self.gives_clips else clip[0], "label": np.int32(direction)}

  judge_name = "direction of motion read off consecutive frames"

  def judge(self, clips: np.ndarray) -> np.ndarray:
    """(N, T, H, W, C) uint8 clips -> (N,) direction each moves in (generated clips' class score):
    for every pair of consecutive frames the shift of 1 or 2 pixels in one of the 4 directions that
    best maps one onto the next (least squared error), the direction most pairs agree on."""
    x = clips.astype(np.float32).mean(axis=-1)  # (N, T, H, W)
    shifts = [(d, s) for d in range(len(self.DIRECTIONS)) for s in (1, 2)]
    errors = np.stack([np.square(np.roll(x[:, :-1], tuple(np.asarray(self.DIRECTIONS[d]) * s), axis=(2, 3))
                                 - x[:, 1:]).mean(axis=(2, 3)) for d, s in shifts], axis=-1)  # (N, T-1, 8)
    votes = np.asarray([d for d, _ in shifts])[errors.argmin(axis=-1)]                       # (N, T-1)
    return np.asarray([np.bincount(v, minlength=len(self.DIRECTIONS)).argmax() for v in votes])


class SyntheticSource:
  """Deterministic random images (for benchmarks): record i is the same on every host and run.
  Records are rolls of a fixed bank of random images, so reading one costs no RNG set-up."""
  BANK = 256
  in_memory = True

  def __init__(self, size: int, image_size: int, channels: int, num_classes: int):
    self.size, self.shape, self.num_classes = size, (image_size, image_size, channels), max(num_classes, 1)
    self.bank = np.random.default_rng(0).integers(0, 256, (self.BANK,) + self.shape, dtype=np.uint8)

  def __repr__(self):
    return f"SyntheticSource(size={self.size}, shape={self.shape}, num_classes={self.num_classes})"

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    index = int(index)
    image = np.roll(self.bank[index % self.BANK], index // self.BANK, axis=(0, 1))
    return {"image": image, "label": index % self.num_classes}


DECODE_FAILURES = set()  # files / records of this process that failed to decode (skipped)


def skipped_at_decode(path: str, error: Exception) -> None:
  if path not in DECODE_FAILURES:
    DECODE_FAILURES.add(path)
    logging.warning("skipped %s: it cannot be decoded (%s: %s); %d such files so far in this process", path,
                    type(error).__name__, error, len(DECODE_FAILURES))


class ImageFolderSource:
  """root/<class>/<image>. Unreadable files are skipped at start-up (and counted in the log)."""

  def __init__(self, root: str, channels: int = 3, reduced: bool = True):
    self.reduced = reduced
    if not root or not os.path.isdir(root):
      raise DataError(f"image folder data.data_dir={root!r} does not exist: point it at ROOT/<class>/<image files>")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    self.files, labels, skipped = [], [], []
    for label, name in enumerate(classes):
      for fname in sorted(os.listdir(os.path.join(root, name))):
        path = os.path.join(root, name, fname)
        if not fname.lower().endswith(IMAGE_EXTENSIONS):
          continue
        try:
          with Image.open(path) as im:
            im.verify()  # header and structure only; cheap compared to a decode
        except Exception:  # noqa: BLE001 - any unreadable file is skipped the same way
          skipped.append(path)
          continue
        self.files.append(path)
        labels.append(label)
    if skipped:
      logging.warning("image folder %s: skipped %d unreadable files (first: %s)", root, len(skipped), skipped[0])
    if not self.files:
      raise DataError(f"image folder {root!r} has no readable images: expected ROOT/<class>/<image> with "
                      f"extensions {', '.join(IMAGE_EXTENSIONS)} ({len(skipped)} unreadable skipped)")
    self.labels = np.asarray(labels, np.int32)
    self.class_names = classes
    self.num_classes, self.num_skipped, self.channels = len(classes), len(skipped), channels
    self.root = root

  def __repr__(self):
    return f"ImageFolderSource(root={self.root!r}, files={len(self.files)}, channels={self.channels})"

  def __len__(self):
    return len(self.files)

  def __getitem__(self, index):
    # A file that passed the scan can still fail to decode (a truncated JPEG): it is skipped and
    # counted, and the next readable file takes its place -- the same one every time, so the
    # batches (and a resumed run's) stay deterministic.
    for offset in range(len(self.files)):
      i = (int(index) + offset) % len(self.files)
      if self.files[i].lower().endswith((".jpg", ".jpeg")):  # decoded later, at the scale the crop needs
        try:
          with open(self.files[i], "rb") as f:
            encoded = f.read()
        except OSError as e:
          skipped_at_decode(self.files[i], e)
          continue
        return {"image": EncodedImage(encoded, self.channels, self.files[i], reduced=self.reduced,
                                      fallback=functools.partial(self.__getitem__, (i + 1) % len(self.files))),
                "label": self.labels[i]}
      try:
        with Image.open(self.files[i]) as im:
          return {"image": pixels(im, self.channels), "label": self.labels[i]}
      except DataError:
        raise
      except Exception as e:  # noqa: BLE001 - any decode failure is skipped the same way
        skipped_at_decode(self.files[i], e)
    raise DataError(f"image folder {self.root!r}: no file can be decoded")


class TfdsSource:
  """A TFDS dataset prepared as array_record, read with `tfds.data_source` (never downloads). A
  dataset with a "video" feature gives clips of its videos (data/video.py)."""
  gives_clips = False

  def __init__(self, name: str, split: str, data_dir: str, channels: int, reduced: bool = True, frames: int = 1,
               stride: int = 1):
    self.reduced, self.frames, self.stride = reduced, frames, stride
    try:  # the images stay encoded: the pipeline decodes only what its crop needs
      self.source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                                     decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # noqa: BLE001 - tfds raises many types for "not prepared"
      raise DataError(
          f"TFDS dataset {name!r} (split {split!r}) not found as array_record in data_dir={data_dir!r}: "
          f"prepare it once with `tfds build {name} --data_dir=DIR --file_format=array_record` "
          f"(ImageNet needs the archives placed in DIR/downloads/manual) [{type(e).__name__}]") from None
    self.channels = channels
    label = self.source.dataset_info.features["label"] if "label" in self.source.dataset_info.features else None
    self.num_classes = getattr(label, "num_classes", 0)
    self.class_names = list(getattr(label, "names", None) or [])
    self.gives_clips = "video" in self.source.dataset_info.features  # a video dataset: clips of its videos
    self._repr = f"TfdsSource(name={name!r}, split={split!r}, records={len(self.source)}, channels={channels})"

  def __repr__(self):
    return self._repr

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    index = int(index)
    record = self.source[index]
    label = np.int32(record.get("label", 0))
    if self.gives_clips:
      from umd_jax.data import video  # noqa: PLC0415 - it imports this module (DataError)
      return {"image": video.tfds_clip(record["video"], self.frames, self.stride, self.channels,
                                       f"{self._repr}[{index}]", functools.partial(self.__getitem__, (index + 1) % len(self))),
              "label": label}
    image = record["image"]
    if isinstance(image, bytes):
      if image[:2] == b"\xff\xd8":  # JPEG: decoded later, at the scale the crop needs
        return {"image": EncodedImage(image, self.channels, f"{self._repr}[{index}]", reduced=self.reduced,
                                      fallback=functools.partial(self.__getitem__, (index + 1) % len(self))),
                "label": label}
      with Image.open(io.BytesIO(image)) as im:  # PNG and others: decoded whole, as before
        return {"image": pixels(im, self.channels), "label": label}
    return {"image": _to_channels(np.asarray(image), self.channels), "label": label}


CLIP_SOURCES = ("video_folder",)                   # data.name of the sources whose records are clips,
IMAGE_SOURCES = ("digits", "synthetic", "folder")  # of images; moving digits give either (data.frames), a
                                                   # TFDS dataset what its features hold


def make_source(data_config, split: str, labelled: bool = True):
  """The source named by `config.data.name` for `split`. With `labelled` (everything but FID's
  reference images) its class count must be `data.num_classes` where both are known."""
  d = data_config
  if d.name == "digits":
    source = DigitsSource(split, d.channels)
  elif d.name == "moving_digits":
    source = MovingDigitsSource(split, d.frames, d.image_size, d.channels)
  elif d.name == "synthetic":
    source = SyntheticSource(d.synthetic_size, d.image_size, d.channels, d.num_classes)
  elif d.name == "video_folder":
    from umd_jax.data import video  # noqa: PLC0415 - it imports this module (DataError)
    root = os.path.join(d.data_dir, split) if os.path.isdir(os.path.join(d.data_dir, split)) else d.data_dir
    source = video.VideoFolderSource(root, split, d.frames, d.frame_stride, d.channels, d.video_csv)
  elif d.name == "folder":
    source = ImageFolderSource(os.path.join(d.data_dir, split) if os.path.isdir(os.path.join(d.data_dir, split))
                               else d.data_dir, d.channels, d.decode_reduced)
  else:
    source = TfdsSource(d.name, split, d.data_dir, d.channels, d.decode_reduced, frames=d.frames, stride=d.frame_stride)
  if len(source) == 0:
    raise DataError(f"data {d.name!r} split {split!r} is empty")
  clips = getattr(source, "gives_clips", d.name in CLIP_SOURCES)
  if clips != (d.frames > 1):
    raise DataError(f"data {d.name!r} gives {'clips' if clips else 'images'} but data.frames={d.frames}: "
                    + ("set data.frames >= 2 (e.g. 16, with model.tubelet=2)" if clips else "use data.frames=1"))
  found = getattr(source, "num_classes", 0)
  if labelled and d.num_classes and found and found != d.num_classes:  # labels would index the wrong classes
    names = list(getattr(source, "class_names", []))
    shown = f" ({', '.join(map(str, names[:12]))}{', ...' if len(names) > 12 else ''})" if names else ""
    raise DataError(f"data {d.name!r} split {split!r} has {found} classes{shown} but data.num_classes="
                    f"{d.num_classes}: set --config.data.num_classes={found} (and model.num_classes for "
                    "class-conditional runs) or fix the data")
  return source
