"""Probe features of a frozen network (METHOD.md §6): `rep` on the clean image, or DDAE-style the
image noised to a fixed t with a fixed per-image noise and any block's tokens mean-pooled; one
jitted, sharded forward gives all requested blocks at once; the raw input as a baseline feature;
a cache of a split's features keyed by every setting they depend on.

Multi-host: features stay on the devices, their rows sharded over the batch in the split's order
(row r is record r on any number of processes); only labels come to the hosts, and features only
to be written to the cache.
"""
import dataclasses
import hashlib
import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from umd_jax import data, diffusion, files, methods, multihost, sharding, weights


class ProbeError(ValueError):
  """Bad probe request (block, t, split, shots): the message says what to change."""


def num_blocks(config) -> int:
  """Blocks the method's features offer (UMD: encoder then decoder; DiffMAE: the encoder's)."""
  return methods.get(config).num_blocks(config)


def check_request(config, blocks: Sequence[int], ts: Sequence[int]) -> None:
  methods.check_cut(config, blocks, ts)


def load_backbone(config, workdir, mesh):
  """(graphdef, params) of the latest checkpoint in `workdir`, EMA weights if present and wanted."""
  return weights.load(config, workdir, mesh, prefer_ema=config.probe.use_ema)


def cache_key(config) -> str:
  """A short hash of every setting besides the weights, split, t, blocks and image count that
  features depend on: the data and its preprocessing, the VAE, the compute dtype, the noise seed."""
  d = {k: v for k, v in config.data.to_dict().items() if k not in ("num_workers", "read_threads")}
  settings = {"data": d, "vae": config.vae.weights if config.data.space == "latents" else "",
              "dtype": config.model.dtype, "noise_seed": config.probe.noise_seed,
              "schedule": config.diffusion.to_dict()}
  return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def random_backbone(config, mesh):
  """A randomly initialised network of the same shape (a baseline)."""
  return weights.fresh(config, mesh, seed=config.seed + 12345)


def rows_sharding(mesh) -> NamedSharding:
  """(K, N, D) features: the N rows split over the batch axes."""
  return NamedSharding(mesh, P(None, sharding.BATCH_AXES))


def make_feature_fn(config, graphdef, t: int, blocks: Sequence[int], mesh):
  """jit(params, inputs, indices) -> (len(blocks), B, D) features of the requested blocks, rows
  sharded like the batch."""
  schedule, method = diffusion.from_config(config), methods.get(config)
  noise_key = jax.random.PRNGKey(config.probe.noise_seed)
  blocks = tuple(blocks)

  def features(params, images, indices):
    if t < 0:
      x, t_index = method.noised(config, schedule, images, None, None)
    else:  # fixed noise per image index: the same on any number of devices or batch size
      eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), images.shape[1:]))(indices)
      x, t_index = method.noised(config, schedule, images, jnp.full((images.shape[0],), t, jnp.int32), eps)
    return method.features(nnx.merge(graphdef, params), x, t_index, blocks).astype(jnp.float32)

  return jax.jit(features, out_shardings=rows_sharding(mesh))


class Extractor:
  """Features of `blocks` at timestep `t` (see the module docstring), compiled once when built
  and applied to any weights and any split. The model's inputs are the images, or for latent
  models their VAE latents (posterior mean × scaling factor) encoded on the fly by `vae`."""

  def __init__(self, config, graphdef, *, t: int, blocks: Sequence[int], mesh, vae=None):
    check_request(config, blocks, [t])
    self.config, self.t, self.blocks, self.mesh, self.vae = config, t, tuple(blocks), mesh, vae
    self.fn = make_feature_fn(config, graphdef, t, blocks, mesh)

  def inputs(self, images):
    return model_inputs(self.vae)(images)

  def __call__(self, params, split: str, max_images: int = 0, progress: bool = True) -> "Features":
    """Features of a whole split (or its first max_images), row r = record r."""
    return _extract(self.config, split, lambda x, i: self.fn(params, x, i), self.mesh, max_images,
                    f"features {split} t={self.t}", progress, self.inputs)


@dataclasses.dataclass(frozen=True)
class Features:
  """Features of a split in its order: row r is record r, whatever the number of processes."""
  x: jax.Array  # (K, N_pad, D) float32, rows sharded over the batch axes; rows >= n are padding
  y: np.ndarray  # (n,) int32 labels of the real rows, on every process (shots are drawn from them)

  @property
  def n(self) -> int:
    return len(self.y)

  def feature(self, k: int) -> jax.Array:
    """(N_pad, D): the k-th of the features asked for (a block's pooled tokens, or rep)."""
    return self.x[k]


def model_inputs(vae):
  """images -> what the model sees: the images themselves, or with a `vae` their latents."""
  return (lambda images: images) if vae is None else vae.to_latents


def _extract(config, split, fn, mesh, max_images, desc, progress, prep) -> Features:
  """Runs fn(prep(images), indices) -> (K, B, D) over a split (or its first max_images) in order."""
  source = data.make_source(config.data, split)
  n = len(source) if not max_images else min(max_images, len(source))
  if n == 0:
    raise ProbeError(f"split {split!r} of {config.data.name!r} is empty")
  shards = sharding.num_data_shards(mesh)
  batch = max(shards, (min(config.probe.batch_size, n) + shards - 1) // shards * shards)
  batches = data.make_batches(config.data, data.Head(source, n), global_batch=batch,
                              sharding=sharding.batch_sharding(mesh), seed=config.seed, train=False)
  chunks, labels = [], []
  for _ in tqdm(range(-(-n // batch)), desc=desc, disable=not progress or not multihost.is_main()):
    b = next(batches)
    chunks.append(fn(prep(b["image"]), b["index"]))
    labels.append(b["label"])
  x = sharding.concatenate(chunks, rows_sharding(mesh), axis=1)
  return Features(x, np.concatenate(multihost.to_host(labels))[:n])


def extract_cached(extractor: Extractor, params, split, *, max_images=0, cache=None, check=None) -> Features:
  """`extractor(params, split)`, reusing features saved under `cache` (a directory; None: no
  caching). File names carry the split, t, blocks, image count, noise seed and a hash of the other
  settings features depend on (`cache_key`); the caller puts the checkpoint step read in `cache`.
  `check(labels)` runs before anything is written. Process 0 writes the file; it is read only where
  every process can read it."""
  path = None
  if cache is not None:
    path = epath.Path(cache) / (f"{split}_t{extractor.t}_blocks{'_'.join(map(str, extractor.blocks))}_n{max_images}_"
                                f"seed{extractor.config.probe.noise_seed}_{cache_key(extractor.config)}.npz")
    if multihost.all_processes(path.exists()):
      with path.open("rb") as f:
        saved = np.load(f)
        return _placed(saved["features"], saved["labels"], extractor.mesh)
  feats = extractor(params, split, max_images)
  if check is not None:
    check(feats.y)
  if path is not None:
    x = multihost.to_host(feats.x)[:, :feats.n]  # collective: every process takes part
    files.on_main(lambda: files.write_npz(path, features=x, labels=feats.y))
  return feats


def _placed(x: np.ndarray, y: np.ndarray, mesh) -> Features:
  """Host features (K, n, D) (the same on every process) as sharded Features."""
  shards = sharding.num_data_shards(mesh)
  pad = -(-x.shape[1] // shards) * shards - x.shape[1]
  x = np.concatenate([x, np.zeros((x.shape[0], pad, x.shape[2]), x.dtype)], axis=1)
  return Features(multihost.global_array(x, rows_sharding(mesh)), np.asarray(y, np.int32))


def _flat_pixels(images, _indices):
  return images.reshape(images.shape[0], -1)[None]


def pixel_features(config, split, mesh, max_images=0, vae=None) -> Features:
  """The raw input (centre-cropped pixels, or with a `vae` their latents) as a (1, N, H·W·C)
  baseline feature."""
  flat = jax.jit(_flat_pixels, out_shardings=rows_sharding(mesh))
  return _extract(config, split, flat, mesh, max_images, f"pixels {split}", False, model_inputs(vae))
