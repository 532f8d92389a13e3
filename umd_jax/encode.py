"""--mode=encode: the VAE posterior moments of every training image (and its mirror), once.

Images get ADM's centre crop, the VAE's posterior mean and std go into ArrayRecord shards with
the label (record format: data/latents.py) plus `metadata.json` (VAE sha256, scaling factor,
preprocessing, views, per-channel statistics). Each process encodes the shards s ≡ its index
(mod processes) on its own devices; a shard is written under a temporary name and renamed when
whole, so an interrupted run resumes shard by shard.
"""
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image
from tqdm import tqdm

from umd_jax import checks, data, files, multihost, sharding
from umd_jax.data import latents as latent_data
from umd_jax.data import pipeline
from umd_jax.data.encoded import EncodedImage
from umd_jax.latent import LatentError, Vae


def adm_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """ADM's `center_crop_arr`: halve with BOX filtering while the short side is >= 2·size, resize
  the short side to `size` with BICUBIC, then take the centre square."""
  pil = Image.fromarray(image if image.shape[-1] == 3 else image[..., 0])
  while min(*pil.size) >= 2 * size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = size / min(*pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  arr = np.asarray(pil)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  arr = arr[top:top + size, left:left + size]
  return arr if arr.ndim == 3 else arr[..., None]


class AdmCrop:
  """grain map: record -> {"image": float32 [-1, 1] ADM centre crop, "label"}."""

  def __init__(self, size):
    self.size = size

  def __call__(self, record):
    full = lambda r: r["image"].full() if isinstance(r["image"], EncodedImage) else r["image"]
    image, record = pipeline.decoded(record, lambda r: adm_center_crop(full(r), self.size))
    return {"image": image.astype(np.float32) * (2.0 / 255.0) - 1.0, "label": np.int32(record["label"])}


def _encode_fn(vae: Vae, views: int, sharding_):
  graphdef = vae.graphdef

  def encode(params, x):
    b = x.shape[0]
    both = jnp.concatenate([x, x[:, :, ::-1]]) if views == 2 else x
    mean, std = nnx.merge(graphdef, params).encode(both)
    moments = jnp.stack([mean, std])                               # (2, views·B, h, w, c)
    return moments.reshape(2, views, b, *mean.shape[1:]).transpose(2, 0, 1, 3, 4, 5)  # (B, 2, views, ...)
  return jax.jit(encode, out_shardings=sharding_)


def run(config, workdir: str) -> dict:
  """--mode=encode: the posterior moments of every image of data.train_split (and its mirror) into
  `workdir` (see the module docstring); returns the metadata written."""
  checks.check(config, "encode")
  if "://" in str(workdir):
    raise LatentError(f"--workdir={workdir}: latents are written with array_record's file I/O, which takes no "
                      "URLs: use a path every host sees (local disk, NFS / Filestore, a gcsfuse mount)")
  e, d = config.encode, config.data
  workdir = epath.Path(workdir)
  source = data.make_source(d, d.train_split)
  mesh = sharding.local_mesh()
  vae = Vae(config.vae.weights, mesh)
  size = d.image_size // config.vae.downsample
  settings = {"vae_sha256": vae.meta["source_sha256"], "scaling_factor": vae.scale, "image_size": d.image_size, "latent_shape": [size, size, config.vae.latent_channels],
              "views": e.views, "dtype": e.dtype, "preprocessing": "ADM center crop (BOX halving, BICUBIC, centre square)",
              "source": {"name": d.name, "split": d.train_split, "records": len(source)},
              "num_classes": int(getattr(source, "num_classes", 0) or d.num_classes)}
  meta_path = workdir / "metadata.json"
  if meta_path.exists():
    old = json.loads(meta_path.read_text())
    changed = [k for k in settings if old.get(k) != settings[k]]
    if changed:
      raise LatentError(f"{workdir} holds latents encoded with other settings ({', '.join(changed)}): "
                        "use an empty workdir")
  multihost.barrier("encode_checked")
  shards = -(-len(source) // e.shard_records)
  files.on_main(lambda: meta_path.exists() or files.write_text(meta_path, json.dumps({**settings, "complete": False},
                                                                                     indent=2)))
  local = jax.local_device_count()
  batch = max(local, -(-config.vae.batch_size // local) * local)
  fn = _encode_fn(vae, e.views, NamedSharding(mesh, P("data")))
  mine = [s for s in range(shards) if s % jax.process_count() == jax.process_index()]
  todo = [s for s in mine if not _shard_done(workdir, d.train_split, s, shards)]
  logging.info("encoding %d records into %d shards: %d of this process's %d left", len(source), shards, len(todo),
               len(mine))
  for s in todo:
    _encode_shard(config, source, s, shards, fn, vae, mesh, batch, workdir)
  multihost.barrier("encode_done")
  stats = [json.loads((workdir / (latent_data.shard_name(d.train_split, s, shards) + ".stats.json")).read_text())
           for s in range(shards)]
  summary = _channel_statistics(stats)
  meta = {**settings, "splits": {d.train_split: {"records": len(source), "shards": shards}},
          "channel_statistics": summary, "complete": True}
  files.on_main(lambda: files.write_text(meta_path, json.dumps(meta, indent=2)))  # agreed: also the barrier
  return meta


def _shard_done(workdir, split, s, shards) -> bool:
  name = latent_data.shard_name(split, s, shards)
  return (workdir / name).exists() and (workdir / (name + ".stats.json")).exists()


def _encode_shard(config, source, s, shards, fn, vae, mesh, batch, workdir):
  e, d = config.encode, config.data
  start, stop = s * e.shard_records, min((s + 1) * e.shard_records, len(source))
  ds = grain.MapDataset.source(source)[start:stop].map(AdmCrop(d.image_size)).batch(batch, drop_remainder=False)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=pipeline.read_threads(d, source)))
  if d.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers),
                        worker_init_fn=pipeline.worker_init())
  name = latent_data.shard_name(d.train_split, s, shards)
  final = workdir / name
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
  writer = ArrayRecordWriter(str(tmp), "group_size:1")
  sums = np.zeros((3, config.vae.latent_channels), np.float64)  # sum mean, sum mean², sum std²
  count = 0
  in_sharding = NamedSharding(mesh, P("data"))
  for b in tqdm(ds, total=-(-(stop - start) // batch), desc=f"shard {s + 1}/{shards}",
                disable=not multihost.is_main()):
    n = len(b["label"])
    x = np.concatenate([b["image"], np.zeros((batch - n, *b["image"].shape[1:]), np.float32)])
    moments = np.asarray(fn(vae.params, jax.device_put(x, in_sharding)))[:n]   # (n, 2, views, h, w, c)
    for label, m in zip(b["label"], moments):
      writer.write(latent_data.to_record(int(label), m, e.dtype))
    m64 = moments.astype(np.float64)
    sums += np.stack([m64[:, 0].sum((0, 1, 2, 3)), (m64[:, 0] ** 2).sum((0, 1, 2, 3)), (m64[:, 1] ** 2).sum((0, 1, 2, 3))])
    count += int(np.prod(moments.shape[:1] + moments.shape[2:5]))
  writer.close()
  files.write_text(str(final) + ".stats.json", json.dumps({"sums": sums.tolist(), "count": count}))
  tmp.replace(final)  # the shard appears whole or not at all


def _channel_statistics(stats) -> dict:
  """Per-channel mean and std of the (unscaled) posterior samples over every encoded view."""
  sums = np.sum([np.asarray(s["sums"]) for s in stats], axis=0)
  count = sum(s["count"] for s in stats)
  mean = sums[0] / count
  var = sums[1] / count - mean ** 2 + sums[2] / count  # Var[mean] + E[std²]
  std = np.sqrt(np.maximum(var, 0))
  return {"mean": mean.tolist(), "std": std.tolist(), "overall_std": float(np.sqrt(np.mean(var))),
          "scale_for_unit_std": float(1.0 / np.sqrt(np.mean(var)))}
