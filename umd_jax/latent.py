"""Latent space: the VAE weights file, images -> latents, latents -> images, and `--mode=encode`.

A run is latent when `data.space="latents"`; `vae.weights` names the file written by
tools/convert_vae_weights.py. Its model sees VAE latents times the scaling factor, (data.image_size / vae.downsample)² ×
vae.latent_channels, instead of pixels; `config.data` still names the images (encoded once by
`--mode=encode` for training, on the fly for probing and the preview grids; the FID reference).
Samples are divided by the scaling factor and decoded in float32 chunks of `vae.batch_size`.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image
from tqdm import tqdm

from umd_jax import files, images, multihost, sharding
from umd_jax.data import latents as latent_data
from umd_jax.data.encoded import EncodedImage
from umd_jax.models import vae as vae_model


class LatentError(ValueError):
  """A bad VAE file or latent setting: the message says what to do."""


CONVERT_HELP = "convert a diffusers VAE folder once with `python tools/convert_vae_weights.py SD_VAE_DIR vae.npz`"


def is_latent(config) -> bool:
  return bool(config.vae.weights)


def read_meta(path: str) -> dict:
  """The converter's metadata (topology, scaling_factor, source_sha256) without loading the weights."""
  p = epath.Path(path)
  if not path or not p.exists():
    raise LatentError(f"vae.weights={path!r} is not a file: {CONVERT_HELP}")
  try:
    with p.open("rb") as f:
      return json.loads(str(np.load(f)["__meta__"]))
  except Exception as e:  # noqa: BLE001 - not an npz, or not one of ours
    raise LatentError(f"vae.weights={path!r} is not a converted VAE file ({type(e).__name__}): {CONVERT_HELP}") from None


class Vae:
  """A loaded VAE, replicated on `mesh`: `graphdef`, `params`, `scale`, `meta`."""

  def __init__(self, path: str, mesh):
    self.meta = read_meta(path)
    self.topology = vae_model.Topology.from_dict(self.meta["topology"])
    self.scale = float(self.meta["scaling_factor"])
    abstract = nnx.eval_shape(lambda: vae_model.AutoencoderKL(self.topology, rngs=nnx.Rngs(0)))
    self.graphdef, state = nnx.split(abstract, nnx.Param)
    with epath.Path(path).open("rb") as f:
      arrays = dict(np.load(f))
    flat = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]:
      name = "/".join(str(getattr(k, "key", k)) for k in keys)
      if name not in arrays or arrays[name].shape != leaf.shape:
        raise LatentError(f"vae.weights={path!r}: {name} is missing or has the wrong shape: {CONVERT_HELP}")
      flat[keys] = arrays[name]
    pure = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(nnx.to_pure_dict(state)), list(flat.values()))
    replicated = NamedSharding(mesh, P())  # every process holds the file: no transfer between hosts
    self.params = jax.tree.map(lambda a: multihost.global_array(a, replicated), pure)
    self.mesh = mesh

  def to_latents(self, x):
    """Images in [-1, 1] (B, H, W, 3), rows sharded -> posterior mean × scale (the model's input)."""
    return _to_latents(self.graphdef, self.scale, self.params, x)

  def to_pixels(self, z):
    """Model-space latents -> float images clipped to [-1, 1] (preview grids)."""
    return _to_pixels(self.graphdef, self.scale, self.params, z)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _to_latents(graphdef, scale, params, x):
  return nnx.merge(graphdef, params).encode(x)[0] * scale


@functools.partial(jax.jit, static_argnums=(0, 1))
def _to_pixels(graphdef, scale, params, z):
  return jnp.clip(nnx.merge(graphdef, params).decode(z / scale), -1.0, 1.0)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _decode_chunk(graphdef, scale, convention, rows, out_sharding, params, z, i):
  """uint8 images of rows [i·rows, (i+1)·rows) of z, laid out like a batch."""
  chunk = jax.lax.with_sharding_constraint(jax.lax.dynamic_slice_in_dim(z, i * rows, rows), out_sharding)
  pixels = _to_pixels(graphdef, scale, params, chunk)
  return jax.lax.with_sharding_constraint(images.to_uint8_device(pixels, convention), out_sharding)


_LOADED = {}


def load(config, mesh) -> Vae:
  """The run's VAE on `mesh` (kept: probing, previews and sampling share one copy), after checking
  that the file fits the config (latent channels, downsampling)."""
  key = (config.vae.weights, mesh)
  if key not in _LOADED:
    _LOADED.clear()
    check_file(config)
    _LOADED[key] = Vae(config.vae.weights, mesh)
  return _LOADED[key]


def check_file(config) -> dict:
  """The weights file exists and matches vae.latent_channels / vae.downsample; returns its metadata."""
  meta = read_meta(config.vae.weights)
  t = vae_model.Topology.from_dict(meta["topology"])
  if (t.latent_channels, t.downsample) != (config.vae.latent_channels, config.vae.downsample):
    raise LatentError(f"vae.weights={config.vae.weights!r} has {t.latent_channels} latent channels and "
                      f"{t.downsample}x downsampling: set --config.vae.latent_channels={t.latent_channels} "
                      f"--config.vae.downsample={t.downsample}")
  return meta


def expected_metadata(config) -> dict:
  """What a latent directory must have been encoded with to train this run."""
  meta = read_meta(config.vae.weights)
  size = config.data.image_size // config.vae.downsample
  return {"vae_sha256": meta["source_sha256"], "scaling_factor": meta["scaling_factor"],
          "image_size": config.data.image_size, "latent_shape": [size, size, config.vae.latent_channels]}


def decode_batches(vae: Vae, z, chunk: int, mesh, convention: str):
  """uint8 images of model-space latents z (N, h, w, c) (rows sharded, N a multiple of chunk),
  decoded `chunk` rows at a time so the decoder's activations stay bounded."""
  bs = sharding.batch_sharding(mesh)
  return sharding.concatenate([_decode_chunk(vae.graphdef, vae.scale, convention, chunk, bs, vae.params, z, i)
                               for i in range(z.shape[0] // chunk)], bs)


# --- --mode=encode ----------------------------------------------------------------------------


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
    from umd_jax.data.pipeline import decoded
    full = lambda r: r["image"].full() if isinstance(r["image"], EncodedImage) else r["image"]
    image, record = decoded(record, lambda r: adm_center_crop(full(r), self.size))
    return {"image": image.astype(np.float32) * (2.0 / 255.0) - 1.0, "label": np.int32(record["label"])}


def _encode_fn(vae: Vae, views: int, sharding_):
  graphdef = vae.graphdef

  @functools.partial(jax.jit, out_shardings=sharding_)
  def encode(params, x):
    b = x.shape[0]
    both = jnp.concatenate([x, x[:, :, ::-1]]) if views == 2 else x
    mean, std = nnx.merge(graphdef, params).encode(both)
    moments = jnp.stack([mean, std])                               # (2, views·B, h, w, c)
    return moments.reshape(2, views, b, *mean.shape[1:]).transpose(2, 0, 1, 3, 4, 5)  # (B, 2, views, ...)
  return encode


def encode(config, workdir: str) -> dict:
  """--mode=encode: the posterior moments of every image of data.train_split (and its mirror) into
  `workdir` (see data/latents.py). Each process encodes the shards s ≡ its index (mod processes)
  on its own devices; finished shards are kept, so an interrupted run resumes shard by shard."""
  from umd_jax import checks, data
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
  if multihost.is_main() and not meta_path.exists():
    files.write_text(meta_path, json.dumps({**settings, "complete": False}, indent=2))
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
  if multihost.is_main():
    files.write_text(meta_path, json.dumps(meta, indent=2))
  multihost.barrier("encode_written")
  return meta


def _shard_done(workdir, split, s, shards) -> bool:
  name = latent_data.shard_name(split, s, shards)
  return (workdir / name).exists() and (workdir / (name + ".stats.json")).exists()


def _encode_shard(config, source, s, shards, fn, vae, mesh, batch, workdir):
  import grain
  from array_record.python.array_record_module import ArrayRecordWriter

  from umd_jax.data import pipeline
  e, d = config.encode, config.data
  start, stop = s * e.shard_records, min((s + 1) * e.shard_records, len(source))
  ds = grain.MapDataset.source(source)[start:stop].map(AdmCrop(d.image_size)).batch(batch, drop_remainder=False)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=pipeline.read_threads(d, source)))
  if d.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
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
