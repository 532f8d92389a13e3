"""Latent space: the VAE weights file, images -> latents and latents -> images.

A run is latent when `data.space="latents"`; `vae.weights` names the file written by
tools/convert_vae_weights.py. Its model sees VAE latents times the scaling factor, (data.image_size / vae.downsample)² ×
vae.latent_channels, instead of pixels; `config.data` still names the images (encoded once by
`--mode=encode` (encode.py) for training, on the fly for probing and the preview grids; the FID
reference). Samples are divided by the scaling factor and decoded in float32 chunks of `vae.batch_size`.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from umd_jax import images, multihost, sharding
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
  """A loaded VAE, replicated on `mesh`: `graphdef`, `params`, `scale`, `meta`, and its compiled
  encode / decode (built here: load it once per run and pass it along)."""

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
    graphdef, scale = self.graphdef, self.scale

    def to_pixels(params, z):
      return jnp.clip(nnx.merge(graphdef, params).decode(z / scale), -1.0, 1.0)

    def decode_chunk(convention, rows, params, z, i):  # rows [i·rows, (i+1)·rows) of z, laid out like a batch
      out = sharding.batch_sharding(mesh)
      chunk = jax.lax.with_sharding_constraint(jax.lax.dynamic_slice_in_dim(z, i * rows, rows), out)
      return jax.lax.with_sharding_constraint(images.to_uint8_device(to_pixels(params, chunk), convention), out)

    self._to_latents = jax.jit(lambda params, x: nnx.merge(graphdef, params).encode(x)[0] * scale)
    self._to_pixels = jax.jit(to_pixels)
    self._decode_chunk = jax.jit(decode_chunk, static_argnums=(0, 1))

  def to_latents(self, x):
    """Images in [-1, 1] (B, H, W, 3), rows sharded -> posterior mean × scale (the model's input)."""
    return self._to_latents(self.params, x)

  def to_pixels(self, z):
    """Model-space latents -> float images clipped to [-1, 1] (preview grids)."""
    return self._to_pixels(self.params, z)

  def decode_uint8(self, z, chunk: int, convention: str):
    """uint8 images of model-space latents z (N, h, w, c) (rows sharded, N a multiple of chunk),
    decoded `chunk` rows at a time so the decoder's activations stay bounded."""
    bs = sharding.batch_sharding(self.mesh)
    return sharding.concatenate([self._decode_chunk(convention, chunk, self.params, z, i)
                                 for i in range(z.shape[0] // chunk)], bs)


def load(config, mesh) -> Vae:
  """The run's VAE on `mesh`, after checking that the file fits the config (latent channels,
  downsampling). Each call loads the file: keep the result for the whole run."""
  check_file(config)
  return Vae(config.vae.weights, mesh)


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
