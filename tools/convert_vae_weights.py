"""One-time conversion of a Stable Diffusion VAE (diffusers format) to the .npz umd_jax reads.

  python tools/convert_vae_weights.py SD_VAE_DIR vae.npz

SD_VAE_DIR is a diffusers `AutoencoderKL` folder (`config.json` + `diffusion_pytorch_model
.safetensors`, or a pipeline folder with them under `vae/`): e.g. stabilityai/sd-vae-ft-ema,
sd-vae-ft-mse or the SD 1.x VAE, which share one encoder. Only the `safetensors` package is
needed (no torch); nothing is downloaded. Conv weights go OIHW -> HWIO, linear weights are
transposed, legacy attention names (`query`, `key`, `value`, `proj_attn`) are renamed, and every
key and shape is checked against the NNX model. The file also records the topology, the
`scaling_factor` (default 0.18215) and the sha256 of the source weights, which latent data sets
and training runs are checked against.
"""
import hashlib
import json
import os
import sys

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from umd_jax.models import vae

LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
SD_SCALING_FACTOR = 0.18215


class ConversionError(ValueError):
  pass


def find_files(folder: str):
  """(config.json, weights .safetensors) of a diffusers VAE folder or a pipeline's vae/ folder."""
  for d in (folder, os.path.join(folder, "vae")):
    config = os.path.join(d, "config.json")
    weights = [os.path.join(d, w) for w in WEIGHT_FILES if os.path.exists(os.path.join(d, w))]
    if os.path.exists(config) and weights:
      return config, weights[0]
  raise ConversionError(f"{folder!r} holds no diffusers VAE: expected config.json and "
                        f"{WEIGHT_FILES[0]} in it or in its vae/ folder (a .bin checkpoint can be saved "
                        "as safetensors with diffusers' save_pretrained(safe_serialization=True))")


def _diffusers_name(key: str) -> str:
  """A state_dict key with legacy attention names renamed to diffusers' current ones."""
  parts = key.split(".")
  if len(parts) >= 2 and parts[-2] in LEGACY:
    parts[-2:-1] = LEGACY[parts[-2]].split(".")
  return ".".join(parts)


def convert_state(state: dict, topology) -> dict:
  """diffusers state_dict (numpy) -> {"encoder/conv_in/kernel": array, ...} for `AutoencoderKL`."""
  abstract = nnx.eval_shape(lambda: vae.AutoencoderKL(topology, rngs=nnx.Rngs(0)))
  target = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))[0]}
  source = {_diffusers_name(k): np.asarray(v, np.float32) for k, v in state.items()}
  out, used = {}, set()
  for name, shape in target.items():
    module, leaf = name.rsplit("/", 1)
    key = module.replace("/", ".").replace("to_out", "to_out.0") + (".bias" if leaf == "bias" else ".weight")
    if key not in source:
      raise ConversionError(f"the weights have no {key!r} (needed for {name}): not an AutoencoderKL of "
                            f"this topology {topology}")
    w = source[key]
    used.add(key)
    if leaf == "kernel" and len(shape) == 4:
      w = w.transpose(2, 3, 1, 0)                          # OIHW -> HWIO
    elif leaf == "kernel":
      w = w.reshape(w.shape[:2]).T                         # (out, in[, 1, 1]) -> (in, out)
    if tuple(w.shape) != tuple(shape):
      raise ConversionError(f"{key}: shape {tuple(source[key].shape)} does not fit {name} {tuple(shape)}")
    out[name] = np.ascontiguousarray(w)
  extra = sorted(set(source) - used)
  if extra:
    raise ConversionError(f"{len(extra)} weights are not used by the model (first: {extra[0]!r}): "
                          "not a plain AutoencoderKL")
  return out


def convert(folder: str):
  """(arrays, metadata) for `folder`; see the module docstring."""
  config_path, weights_path = find_files(folder)
  with open(config_path) as f:
    config = json.load(f)
  if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
    raise ConversionError(f"{config_path}: _class_name is {config['_class_name']!r}, not AutoencoderKL")
  checks = {"act_fn": "silu", "mid_block_add_attention": True, "use_quant_conv": True, "use_post_quant_conv": True,
            "shift_factor": None}
  for k, v in checks.items():
    if config.get(k, v) != v:
      raise ConversionError(f"{config_path}: {k}={config[k]!r} is not supported (only {v!r})")
  for k in ("down_block_types", "up_block_types"):
    kinds = set(config.get(k, ()))
    if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
      raise ConversionError(f"{config_path}: {k}={sorted(kinds)} is not supported")
  topology = vae.Topology.from_dict(config)
  with open(weights_path, "rb") as f:
    sha256 = hashlib.sha256(f.read()).hexdigest()
  arrays = convert_state(load_file(weights_path), topology)
  scaling = config.get("scaling_factor")
  meta = {"topology": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(topology).items()},
          "scaling_factor": float(scaling if scaling is not None else SD_SCALING_FACTOR),
          "source_sha256": sha256, "source": os.path.basename(weights_path)}
  return arrays, meta


def main(folder, dst):
  try:
    arrays, meta = convert(folder)
  except ConversionError as e:
    sys.exit(f"error: {e}")
  with open(dst + ".tmp", "wb") as f:
    np.savez(f, __meta__=np.array(json.dumps(meta)), **arrays)
  os.replace(dst + ".tmp", dst)
  count = sum(a.size for a in arrays.values())
  print(f"wrote {len(arrays)} arrays ({count:,} parameters) to {dst}; scaling_factor {meta['scaling_factor']}, "
        f"source sha256 {meta['source_sha256'][:16]}...")


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit(__doc__)
  main(*sys.argv[1:])
