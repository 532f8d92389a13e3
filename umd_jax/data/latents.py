"""Pre-encoded VAE latents (written by `--mode=encode`, read for latent-space training).

Layout of a latent directory:
  metadata.json                                 what was encoded and how (checked against the run)
  <split>/latents-00000-of-00129.array_record   records [s·R, (s+1)·R) of the split, in order
  <split>/latents-00000-of-00129.array_record.stats.json   per-shard sums for the channel statistics

A record is the label (int32) then the posterior moments (2, views, h, w, c) -- mean, then std --
in `metadata["dtype"]` (float32 or bfloat16); view 0 is the image, view 1 its mirror image
(encoding a flipped image is not the same as flipping its latent). Training takes one random
view per record and epoch and returns it scaled by the VAE's scaling factor; the step then
draws z = mean + std·ε on the devices (train_step), so a resumed run stays exact.
"""
import json
import os

import grain
import ml_dtypes
import numpy as np
from etils import epath

from umd_jax.data.sources import DataError

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def shard_name(split: str, shard: int, shards: int) -> str:
  return f"{split}/latents-{shard:05d}-of-{shards:05d}.array_record"


def to_record(label: int, moments: np.ndarray, dtype: str) -> bytes:
  """moments (2, views, h, w, c) -> record bytes."""
  return np.int32(label).tobytes() + np.ascontiguousarray(moments, DTYPES[dtype]).tobytes()


def from_record(data: bytes, shape, dtype: str):
  """record bytes -> (label, moments (2, views, h, w, c) float32)."""
  label = int(np.frombuffer(data[:4], np.int32)[0])
  return label, np.frombuffer(data[4:], DTYPES[dtype]).reshape(shape).astype(np.float32)


def read_metadata(directory) -> dict:
  path = epath.Path(directory) / "metadata.json"
  if not directory or not path.exists():
    raise DataError(f"data.latents={str(directory)!r} has no metadata.json: encode the images first with "
                    "--mode=encode --workdir=LATENT_DIR (see README, Latent diffusion)")
  return json.loads(path.read_text())


class LatentSource:
  """Records of one split of a latent directory: {"moments": (2, views, h, w, c) float32, already
  multiplied by the scaling factor, "label": int32}."""

  def __init__(self, directory: str, split: str, expected: dict):
    meta = read_metadata(directory)
    if not meta.get("complete"):
      raise DataError(f"data.latents={directory!r} is not completely encoded: run --mode=encode with the same "
                      "config and workdir again (it resumes)")
    if split not in meta["splits"]:
      raise DataError(f"data.latents={directory!r} has splits {sorted(meta['splits'])}, not {split!r}")
    for key, want in expected.items():
      if meta.get(key) != want:
        raise DataError(f"data.latents={directory!r} was encoded with {key}={meta.get(key)!r} but this run has "
                        f"{want!r}: encode again for this VAE and image size (--mode=encode) or point "
                        "data.latents at the matching set")
    info = meta["splits"][split]
    paths = [os.path.join(directory, shard_name(split, s, info["shards"])) for s in range(info["shards"])]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
      raise DataError(f"latent shard {missing[0]} is missing ({len(missing)} of {len(paths)}): encode again")
    self.source = grain.sources.ArrayRecordDataSource(paths)
    if len(self.source) != info["records"]:
      raise DataError(f"data.latents={directory!r} split {split!r}: {len(self.source)} records, metadata says "
                      f"{info['records']}: encode again into an empty directory")
    self.shape = (2, meta["views"], *meta["latent_shape"])
    self.dtype, self.scale = meta["dtype"], float(meta["scaling_factor"])
    self.num_classes = int(meta.get("num_classes", 0))
    self._repr = f"LatentSource({directory!r}, split={split!r}, records={len(self.source)})"

  def __repr__(self):
    return self._repr

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    label, moments = from_record(self.source[int(index)], self.shape, self.dtype)
    return {"moments": moments * np.float32(self.scale), "label": np.int32(label)}


class ChooseView(grain.transforms.RandomMap):
  """Training: one view drawn per record and epoch -> {"image": mean, "std": std, "label"}."""

  def random_map(self, record, rng):
    m = record["moments"]
    v = int(rng.integers(0, m.shape[1]))
    return {"image": m[0, v], "std": m[1, v], "label": record["label"]}


class FirstView(grain.transforms.Map):
  """Evaluation: the image's own view (0)."""

  def map(self, record):
    m = record["moments"]
    return {"image": m[0, 0], "std": m[1, 0], "label": record["label"]}
