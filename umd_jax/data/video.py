"""Clips cut from longer videos: a folder of video files decoded with PyAV (Kinetics-style labels:
one sub-folder per class, or Kinetics' CSV), and decoded TFDS videos -- each record's frames sampled
as MAE-ST samples them (data.frames frames every data.frame_stride: 16 × 4 on Kinetics): a random
window in training, the centre one at evaluation, `views` evenly spaced ones for multi-view testing.

A video that cannot be decoded is skipped and counted (the next readable record takes its place,
the same one every time), never read as zeros.
"""
import csv
import io
import os

import numpy as np
from absl import logging

from umd_jax.data.encoded import DecodeError
from umd_jax.data.sources import DataError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")


class Clip:
  """A record's frames, read lazily. `count()` frames in all, `read(indices)` -> uint8 (len, H, W, C);
  windows of `frames` frames `stride` apart (past the last frame: the last frame again)."""

  def __init__(self, frames: int, stride: int, name: str, fallback=None):
    self.frames, self.stride, self.name, self.fallback = frames, stride, name, fallback

  def window(self, start: int, count: int) -> np.ndarray:
    return np.minimum(start + self.stride * np.arange(self.frames), max(count - 1, 0))

  def _span(self, count):
    return max(count - (self.frames - 1) * self.stride, 1)  # start positions that fit the whole window

  def sample(self, rng: np.random.Generator) -> np.ndarray:
    """A window at a uniformly random start (training's temporal crop)."""
    count = self.count()
    return self.read(self.window(int(rng.integers(0, self._span(count))), count))

  def centre(self) -> np.ndarray:
    count = self.count()
    return self.read(self.window((self._span(count) - 1) // 2, count))

  def views(self, n: int) -> list:
    """`n` windows at evenly spaced starts, first to last (MAE-ST's multi-view testing)."""
    count = self.count()
    starts = np.linspace(0, self._span(count) - 1, n).round().astype(int) if n > 1 else [(self._span(count) - 1) // 2]
    return [self.read(self.window(int(s), count)) for s in starts]


class VideoFile(Clip):
  """A video file, decoded with PyAV (RGB, or grey when channels = 1) up to the last frame a window
  needs; frames of another size than the first are resized to it."""

  def __init__(self, path: str, frames: int, stride: int, channels: int, fallback=None):
    super().__init__(frames, stride, path, fallback)
    self.path, self.channels, self._count = path, channels, None

  def count(self) -> int:
    if self._count is None:
      import av  # noqa: PLC0415 - video runs only
      try:
        with av.open(self.path) as container:
          stream = container.streams.video[0]
          self._count = int(stream.frames) or sum(1 for _ in container.decode(stream))
      except Exception as e:  # noqa: BLE001 - any unreadable file is skipped the same way
        raise DecodeError(f"{self.path}: {type(e).__name__}: {e}") from None
      if not self._count:
        raise DecodeError(f"{self.path}: no video frames")
    return self._count

  def read(self, indices) -> np.ndarray:
    import av  # noqa: PLC0415
    wanted, frames, size = set(int(i) for i in indices), {}, None
    try:
      with av.open(self.path) as container:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
          if i in wanted:
            size = size or (frame.width, frame.height)
            frames[i] = frame.to_ndarray(format="gray" if self.channels == 1 else "rgb24", width=size[0],
                                         height=size[1])
          if i >= max(wanted):
            break
    except Exception as e:  # noqa: BLE001
      raise DecodeError(f"{self.path}: {type(e).__name__}: {e}") from None
    if not frames:
      raise DecodeError(f"{self.path}: no video frames decoded")
    last = frames[max(frames)]  # a header that promised more frames than there are: the last one again
    out = np.stack([frames.get(int(i), last) for i in indices])
    return out[..., None] if out.ndim == 3 else out


class ArrayClip(Clip):
  """Frames already decoded (a TFDS video feature): (N, H, W, C) uint8."""

  def __init__(self, array: np.ndarray, frames: int, stride: int, channels: int, name: str):
    super().__init__(frames, stride, name)
    self.array, self.channels = array, channels

  def count(self) -> int:
    return len(self.array)

  def read(self, indices) -> np.ndarray:
    from umd_jax.data.encoded import to_channels  # noqa: PLC0415
    return np.stack([to_channels(self.array[int(i)], self.channels) for i in indices])


class EncodedFrames(Clip):
  """A video stored as one encoded image per frame (PNG / JPEG bytes: how TFDS's Video feature keeps
  them): only the frames a window needs are decoded."""

  def __init__(self, encoded, frames: int, stride: int, channels: int, name: str, fallback=None):
    super().__init__(frames, stride, name, fallback)
    self.encoded, self.channels = encoded, channels

  def count(self) -> int:
    return len(self.encoded)

  def read(self, indices) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415
    from umd_jax.data.encoded import pixels  # noqa: PLC0415
    out = []
    for i in indices:
      try:
        with Image.open(io.BytesIO(bytes(self.encoded[int(i)]))) as im:
          if out and im.size != out[0].shape[1::-1]:  # frames of another size: resized to the first's
            im = im.resize(out[0].shape[1::-1], Image.BILINEAR)
          out.append(pixels(im, self.channels))
      except Exception as e:  # noqa: BLE001 - any undecodable frame skips the record
        raise DecodeError(f"{self.name} frame {int(i)}: {type(e).__name__}: {e}") from None
    return np.stack(out)


def tfds_clip(value, frames: int, stride: int, channels: int, name: str, fallback=None) -> Clip:
  """A TFDS Video feature's value: decoded frames (N, H, W, C) uint8, or N encoded frames."""
  array = np.asarray(value)
  if array.dtype == np.uint8 and array.ndim == 4:
    return ArrayClip(array, frames, stride, channels, name)
  return EncodedFrames(array, frames, stride, channels, name, fallback)


def _kinetics_rows(csv_path: str, split: str):
  """(file stem, label) of Kinetics' CSV (label, youtube_id, time_start, time_end, split): the stem
  is Kinetics' download name youtube_id_{start:06d}_{end:06d}."""
  with open(csv_path, newline="") as f:
    rows = list(csv.DictReader(f))
  need = {"label", "youtube_id", "time_start", "time_end"}
  if not rows or not need <= set(rows[0]):
    raise DataError(f"data.video_csv={csv_path!r} is not Kinetics' CSV: need the columns {sorted(need)}")
  chosen = [r for r in rows if r.get("split", split) in (split, "")]
  if not chosen:
    splits = sorted({r.get("split", "") for r in rows})
    raise DataError(f"data.video_csv={csv_path!r} has no rows of split {split!r} (its splits: {splits}): pass this "
                    "split's CSV, or name the split as the CSV does (data.train_split / data.eval_split)")
  return [(f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}", r["label"])
          for r in chosen]


class VideoFolderSource:
  """root/<class>/<video files>, or with `csv_path` (Kinetics' CSV) the files under root named as
  Kinetics downloads them, labelled by the CSV (rows whose file is missing are counted and left
  out). Nothing is decoded at start-up."""

  def __init__(self, root: str, split: str, frames: int, stride: int, channels: int, csv_path: str = ""):
    if not root or not os.path.isdir(root):
      raise DataError(f"video folder data.data_dir={root!r} does not exist: point it at ROOT/<class>/<video files> "
                      "(or at Kinetics' videos with data.video_csv)")
    self.root, self.frames, self.stride, self.channels = root, frames, stride, channels
    found = {}
    for folder, _, names in sorted(os.walk(root)):
      for name in sorted(names):
        if name.lower().endswith(VIDEO_EXTENSIONS):
          found.setdefault(os.path.splitext(name)[0], os.path.join(folder, name))
    if csv_path:
      rows = _kinetics_rows(csv_path, split)
      self.class_names = sorted({label for _, label in rows})
      present = [(found[stem], label) for stem, label in rows if stem in found]
      if len(present) < len(rows):
        logging.warning("video folder %s: %d of %d clips of %s are missing", root, len(rows) - len(present), len(rows),
                        csv_path)
    else:
      self.class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
      present = [(path, os.path.basename(os.path.dirname(path))) for path in found.values()
                 if os.path.dirname(os.path.dirname(path)) == root.rstrip("/")]
    if not present:
      raise DataError(f"video folder {root!r} has no video files: expected ROOT/<class>/<video> with extensions "
                      f"{', '.join(VIDEO_EXTENSIONS)}" + (f" named as {csv_path!r} lists them" if csv_path else ""))
    index = {name: i for i, name in enumerate(self.class_names)}
    present.sort()
    self.files = [p for p, _ in present]
    self.labels = np.asarray([index[label] for _, label in present], np.int32)
    self.num_classes = len(self.class_names)

  def __repr__(self):
    return f"VideoFolderSource(root={self.root!r}, files={len(self.files)}, frames={self.frames}x{self.stride})"

  def __len__(self):
    return len(self.files)

  def __getitem__(self, index):
    return self._record(int(index), 0)

  def _record(self, index: int, tried: int):
    """Record `index`; its fallback is the next file's (tried: how many failed before it)."""
    if tried >= len(self):
      raise DataError(f"video folder {self.root!r}: no video can be decoded ({tried} tried)")
    return {"image": VideoFile(self.files[index], self.frames, self.stride, self.channels,
                               fallback=lambda: self._record((index + 1) % len(self), tried + 1)),
            "label": self.labels[index]}
