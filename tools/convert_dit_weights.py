"""One-time conversion of a public DiT, SiT or REPA SiT checkpoint into a workdir umd_jax reads
(`--mode=probe`, `--mode=generate`, `--mode=classify` with init_from): DiT under
configs/dit_original.py (method 'dit_original'), SiT and REPA under configs/sit.py (method 'sit').

  python tools/convert_dit_weights.py SRC WORKDIR [--kind dit|sit|repa] [--config CONFIG]

SRC is one of
  * a diffusers folder: the `transformer/` folder of a DiT pipeline (config.json + safetensors),
    or the pipeline folder holding it (facebook/DiT-XL-2-256) -- read with `safetensors` alone;
  * DiT's own checkpoint `DiT-XL-2-256x256.pt` or SiT's `SiT-XL-2-256.pt` (needs `torch`, which the
    package does not require; the file is a pickle, read with `weights_only=True`, so nothing in
    it runs); a training checkpoint's "ema" (else "model") entry is taken -- DiT's, SiT's and
    REPA's `train.py` checkpoints, whose `args` (an argparse.Namespace) the weights-only reader
    is told to allow;
  * a .safetensors file with DiT's own key names.
Nothing is downloaded. The topology (width, depth, patch, channels, classes, learned sigma, input
size) is read from the file; every key and shape is checked against the model (a wrong shape is
named by its key), DiT's stored position table against this code's, and diffusers' per-block
copies of the timestep / label embedders against each other. WORKDIR must be new or empty, and is
checked before the file is read. Every failure -- a wrong, partial, truncated or foreign file, a
WORKDIR that holds something, a full disk -- is one `error:` line, and writes nothing. `--kind sit`: SiT's
weights (the same backbone, trained on the linear interpolant with continuous t in [0, 1]: method
'sit', sit.time = "sit"). `--kind repa`: REPA's SiT (sit.time = "repa": REPA's time runs from data
at 0 to noise at 1); its projector heads (`projectors.*`, read only by REPA's training loss) are
dropped, and said so; a file with them given as `--kind sit` is refused.
"""
import argparse
import glob
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from umd_jax.models import dit


class ConversionError(ValueError):
  pass


def read_source(src: str):
  """(state dict with DiT's own key names as float32 numpy, metadata from a diffusers config)."""
  if os.path.isdir(src):
    folder = next((d for d in (os.path.join(src, "transformer"), src) if os.path.exists(os.path.join(d, "config.json"))
                   and glob.glob(os.path.join(d, "*.safetensors"))), None)
    if folder is None:
      raise ConversionError(f"{src!r} is not a diffusers DiT folder: expected config.json and .safetensors weights in "
                            "it or in its transformer/ folder")
    with open(os.path.join(folder, "config.json")) as f:
      meta = json.load(f)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    full = [f for f in files if ".fp16." not in f] or files  # the full-precision copy when both are there
    state = {}
    for f in full:
      state.update(_safetensors(f))
    return diffusers_to_original(state, meta), meta
  if src.endswith(".safetensors"):
    return {k: np.asarray(v, np.float32) for k, v in _safetensors(src).items()}, {}
  if src.endswith((".pt", ".pth")):
    try:
      import torch
    except ImportError:
      raise ConversionError(f"{src!r} is a PyTorch file: reading it needs torch (pip install torch), or convert "
                            "the diffusers folder instead") from None
    try:  # training checkpoints (DiT, SiT, REPA) keep their argparse `args` beside the weights
      with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line
      raise ConversionError(f"{src!r} could not be read as a weights-only PyTorch file ({_first_line(e)})") from None
    return state_dict_of(obj, src), {}
  raise ConversionError(f"{src!r}: expected a diffusers folder, a .pt / .pth or a .safetensors file")


def state_dict_of(obj, src: str) -> dict:
  """The float32 numpy state dict in what a .pt held: the dict of tensors itself, or a training
  checkpoint's "ema" (else "model") entry."""
  for key in ("ema", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict) or not obj:
    raise ConversionError(f"{src!r} holds a {type(obj).__name__}, not a state dict: expected DiT's weights (a "
                          "dict of tensors) or a training checkpoint with an 'ema' or 'model' entry")
  bad = [k for k, v in obj.items() if not (isinstance(k, str) and hasattr(v, "float") and hasattr(v, "numpy"))]
  if bad:
    raise ConversionError(f"{src!r}: entry {bad[0]!r} is not a tensor: expected DiT's weights (a dict of tensors) "
                          "or a training checkpoint with an 'ema' or 'model' entry")
  return {k: v.float().numpy() for k, v in obj.items()}


def _safetensors(path: str) -> dict:
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except Exception as e:  # noqa: BLE001 - SafetensorError (truncated, not safetensors), OSError: one line
    raise ConversionError(f"{path!r} could not be read as safetensors ({_first_line(e)}): the file is damaged or "
                          "incomplete; download it again") from None


def _first_line(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"


def diffusers_to_original(d: dict, meta: dict) -> dict:
  """diffusers' DiTTransformer2DModel names -> DiT's models.py names (q, k, v fused into qkv; the
  per-block timestep / label embedders, copies of DiT's one, checked equal and taken once)."""
  d = {k: np.asarray(v, np.float32) for k, v in d.items()}
  depth = meta.get("num_layers") or 1 + max(int(k.split(".")[1]) for k in d if k.startswith("transformer_blocks."))
  out = {}

  def take(key):
    if key not in d:
      raise ConversionError(f"the diffusers weights lack {key!r}: not a complete DiT transformer")
    return d.pop(key)

  out["x_embedder.proj.weight"], out["x_embedder.proj.bias"] = take("pos_embed.proj.weight"), take("pos_embed.proj.bias")
  emb = {"t_embedder.mlp.0": "timestep_embedder.linear_1", "t_embedder.mlp.2": "timestep_embedder.linear_2",
         "y_embedder.embedding_table": "class_embedder.embedding_table"}
  for b in range(depth):
    p = f"transformer_blocks.{b}."
    for ours, theirs in emb.items():
      for kind in ("weight", "bias") if not ours.startswith("y_") else ("weight",):
        value = take(f"{p}norm1.emb.{theirs}.{kind}")
        name = f"{ours}.{kind}"
        if name in out and not np.array_equal(out[name], value):
          raise ConversionError(f"block {b}'s {theirs}.{kind} differs from block 0's: not a converted DiT (whose "
                                "blocks share one embedder)")
        out.setdefault(name, value)
    for kind in ("weight", "bias"):
      out[f"blocks.{b}.attn.qkv.{kind}"] = np.concatenate([take(f"{p}attn1.to_{x}.{kind}") for x in "qkv"])
      out[f"blocks.{b}.attn.proj.{kind}"] = take(f"{p}attn1.to_out.0.{kind}")
      out[f"blocks.{b}.mlp.fc1.{kind}"] = take(f"{p}ff.net.0.proj.{kind}")
      out[f"blocks.{b}.mlp.fc2.{kind}"] = take(f"{p}ff.net.2.{kind}")
      out[f"blocks.{b}.adaLN_modulation.1.{kind}"] = take(f"{p}norm1.linear.{kind}")
  for kind in ("weight", "bias"):
    out[f"final_layer.adaLN_modulation.1.{kind}"] = take(f"proj_out_1.{kind}")
    out[f"final_layer.linear.{kind}"] = take(f"proj_out_2.{kind}")
  left = sorted(k for k in d if not k.endswith("pos_embed.pos_embed"))
  if left:
    raise ConversionError(f"unexpected diffusers keys {left[:4]}{' ...' if len(left) > 4 else ''}: not a DiT transformer")
  return out


def topology(state: dict, meta: dict) -> dict:
  """variant, input size, channels, classes, learned sigma from the weights (and a diffusers config)."""
  try:
    width, channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
    out_dim = state["final_layer.linear.weight"].shape[0]
  except (KeyError, ValueError) as e:
    raise ConversionError(f"not a DiT state dict (missing or malformed {e}): expected DiT's models.py keys "
                          "(x_embedder, t_embedder, y_embedder, blocks.N, final_layer)") from None
  heads = meta.get("num_attention_heads")
  names = [n for n, (w, d, h) in dit.VARIANTS.items() if w == width and d == depth and (heads is None or h == heads)]
  if not names:
    raise ConversionError(f"width {width}, depth {depth}{f', {heads} heads' if heads else ''} is none of DiT's "
                          f"sizes {dit.VARIANTS}")
  if "pos_embed" in state:
    grid = int(round(np.sqrt(state["pos_embed"].shape[1])))
  elif meta.get("sample_size"):
    grid = meta["sample_size"] // patch
  else:
    raise ConversionError("the input size is unknown: the file has no pos_embed and no diffusers config")
  learn_sigma = out_dim == patch * patch * 2 * channels
  if not learn_sigma and out_dim != patch * patch * channels:
    raise ConversionError(f"final_layer.linear has {out_dim} outputs: expected {patch * patch * channels} or twice that")
  return dict(variant=f"{names[0]}/{patch}", input_size=grid * patch, channels=int(channels),
              num_classes=int(num_classes), learn_sigma=bool(learn_sigma), norm_eps=meta.get("norm_eps"))


def to_params(state: dict, topo: dict, config) -> dict:
  """DiT's state dict -> the pure-dict parameters of models/dit.DiT for `config` (scanned or
  unrolled blocks), every key and shape checked."""
  v = dit.parse_variant(topo["variant"])
  p, c, w = v["patch"], topo["channels"], v["width"]
  state = dict(state)
  pos = state.pop("pos_embed", None)
  if pos is not None:
    expected = dit.positions(w, topo["input_size"] // p)
    if pos.reshape(expected.shape).shape != expected.shape or not np.allclose(pos.reshape(expected.shape), expected,
                                                                              atol=1e-5):
      raise ConversionError("pos_embed is not DiT's sin-cos table for this size: not a DiT checkpoint")
  linear = lambda name: {"kernel": state.pop(f"{name}.weight").T, "bias": state.pop(f"{name}.bias")}
  conv = state.pop("x_embedder.proj.weight")
  params = {"x_embedder": {"kernel": conv.transpose(2, 3, 1, 0).reshape(p * p * c, w),
                           "bias": state.pop("x_embedder.proj.bias")},
            "t_embedder": {"fc1": linear("t_embedder.mlp.0"), "fc2": linear("t_embedder.mlp.2")},
            "y_embedder": {"embedding": state.pop("y_embedder.embedding_table.weight")},
            "final_modulation": linear("final_layer.adaLN_modulation.1"), "head": linear("final_layer.linear")}
  blocks = [{"attn": {"qkv": linear(f"blocks.{b}.attn.qkv"), "proj": linear(f"blocks.{b}.attn.proj")},
             "mlp": {"fc1": linear(f"blocks.{b}.mlp.fc1"), "fc2": linear(f"blocks.{b}.mlp.fc2")},
             "modulation": linear(f"blocks.{b}.adaLN_modulation.1")} for b in range(v["depth"])]
  if state:
    raise ConversionError(f"unexpected keys {sorted(state)[:4]}: not a DiT of this topology")
  abstract = nnx.to_pure_dict(nnx.eval_shape(lambda: nnx.state(dit.from_config(config, nnx.Rngs(0)), nnx.Param)))
  one_block = abstract["blocks"]["blocks"]
  one_block = jax.tree.map(lambda x: x.shape[1:], one_block) if config.model.scan_layers else \
      jax.tree.map(lambda x: x.shape, one_block[0])
  for b, block in enumerate(blocks):  # before stacking: a wrong shape is named by its key in the file
    for path, want in _flat(one_block).items():
      got = _flat(block)[path].shape
      if got != want:
        raise ConversionError(f"{_dit_key(b, path)} has shape {_file_shape(path, got)} in the file, the model "
                              f"needs {_file_shape(path, want)}: not a DiT of this topology")
  if config.model.scan_layers:
    params["blocks"] = {"blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
  else:
    params["blocks"] = {"blocks": dict(enumerate(blocks))}
  shapes = lambda tree: {k: getattr(x, "shape", x) for k, x in _flat(tree).items()}
  want, got = shapes(abstract), shapes(params)
  wrong = [f"{k}: file {got.get(k)}, model {want.get(k)}" for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
  if wrong:
    raise ConversionError(f"{len(wrong)} parameters do not fit the model: {'; '.join(wrong[:3])}")
  return params


def _flat(tree) -> dict:
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]}


def _dit_key(block: int, path: str) -> str:
  """models/dit.py's block path ('attn/qkv/kernel') -> DiT's key ('blocks.3.attn.qkv.weight')."""
  *module, leaf = path.split("/")
  module = ["adaLN_modulation", "1"] if module == ["modulation"] else module
  return ".".join([f"blocks.{block}", *module, "weight" if leaf == "kernel" else leaf])


def _file_shape(path: str, shape) -> tuple:
  """A kernel's shape as the file stores it (PyTorch's Linear: out × in)."""
  return tuple(reversed(shape)) if path.endswith("kernel") else tuple(shape)


def make_config(topo: dict, kind: str, config_spec: str = "", config=None):
  """The kind's config (configs/dit_original.py, configs/sit.py[:repa]; or `config_spec`, or a given
  `config`) set to the file's topology. A config of another method than the kind's is refused."""
  method, default_spec = KINDS[kind]
  if config is None:
    import importlib.util
    path, _, arg = (config_spec or default_spec).partition(":")
    spec = importlib.util.spec_from_file_location("dit_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
  if config.method != method:
    raise ConversionError(f"--config's method is {config.method!r}, but --kind {kind} weights are method {method!r}'s: "
                          f"use --config {default_spec}")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.variant = topo["variant"]
    config.model.num_classes = topo["num_classes"]
    config.dit.learn_sigma = topo["learn_sigma"]
    config.optim.ema_rate = 0.0  # the file's weights (a training checkpoint's EMA ones) are the workdir's only copy
    if method == "sit":
      config.sit.time = kind  # "sit" | "repa": the time the network was trained with
    else:
      config.dit.time = "dit"
    if config.data.space == "latents":
      config.data.image_size = topo["input_size"] * config.vae.downsample
      config.vae.latent_channels = topo["channels"]
    else:
      config.data.image_size, config.data.channels = topo["input_size"], topo["channels"]
  config.lock()
  return config


KINDS = {"dit": ("dit_original", "configs/dit_original.py"), "sit": ("sit", "configs/sit.py"),
         "repa": ("sit", "configs/sit.py:repa")}  # kind -> (method, its default config)
PROJECTORS = "projectors."  # REPA's alignment heads: read by its training loss only


def convert(src: str, workdir: str, kind: str = "dit", config_spec: str = "", config=None) -> dict:
  """Read, check and write. `config`: the base config instead of `config_spec`'s (tests); its model
  settings are set to the file's topology either way. `config_spec` "": the kind's own config."""
  from umd_jax import checkpoint
  if kind not in KINDS:
    raise ConversionError(f"--kind={kind!r}: use one of {', '.join(KINDS)}")
  _check_output(workdir)  # before the (possibly minutes-long) read
  state, meta = read_source(src)
  state, dropped = _projectors(state, src, kind)
  topo = topology(state, meta)
  config = make_config(topo, kind, config_spec, config)
  params = to_params(state, topo, config)
  try:
    checkpoint.save_weights(workdir, jax.tree.map(jnp.asarray, params), config)
  except BaseException:
    shutil.rmtree(workdir, ignore_errors=True)  # it was new or empty (checked): leave nothing half-written
    raise
  count = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  return {**topo, "kind": kind, "method": config.method, "params": count, "workdir": workdir,
          "source": os.path.abspath(src), **({"dropped": dropped} if dropped else {})}


def _projectors(state: dict, src: str, kind: str):
  """(state without REPA's projector heads, what was dropped): only for --kind repa; a file with them
  given as another kind is REPA's, and one without them given as repa is not."""
  heads = sorted(k for k in state if k.startswith(PROJECTORS))
  if heads and kind != "repa":
    raise ConversionError(f"{src!r} holds REPA's projector heads ({heads[0]}, ...): it is REPA's SiT, trained with "
                          "REPA's time (1 = noise); convert it with --kind repa")
  if kind == "repa" and not heads:
    raise ConversionError(f"{src!r} has no projector heads ({PROJECTORS}*): not a REPA checkpoint; a SiT "
                          "checkpoint converts with --kind sit")
  if not heads:
    return state, ""
  kept = {k: v for k, v in state.items() if not k.startswith(PROJECTORS)}
  count = int(sum(np.prod(state[k].shape) for k in heads))
  return kept, (f"REPA's projector heads: {len(heads)} tensors ({count:,} parameters) under {PROJECTORS}*, read only "
                "by REPA's alignment loss; sampling, probing and fine-tuning do not use them")


def _check_output(workdir: str) -> None:
  """WORKDIR is new or an empty folder: never a file, never a folder that holds anything (a
  checkpoint of a pre-training, or of an earlier conversion)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConversionError(f"WORKDIR {workdir!r} is a file: name a new folder to convert into")
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise ConversionError(f"WORKDIR {workdir!r} is not empty ({', '.join(sorted(os.listdir(workdir))[:3])}): "
                          "convert into a new folder")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("src")
  ap.add_argument("workdir")
  ap.add_argument("--kind", default="dit", help="dit, sit (SiT's weights: the same backbone), or repa (REPA's SiT)")
  ap.add_argument("--config", default="", help="the config the workdir is written with (default: the kind's)")
  args = ap.parse_args(argv)
  from umd_jax import checkpoint
  try:  # the one place every failure becomes one line
    info = convert(args.src, args.workdir, args.kind, args.config)
  except (ConversionError, ValueError, checkpoint.CheckpointError) as e:
    sys.exit(f"error: {e}")
  except OSError as e:  # a full disk, a folder that cannot be created
    sys.exit(f"error: {e.strerror or e} ({e.filename or args.workdir})"
             + (": free space there and run again" if checkpoint._disk_full(e) else ""))
  if info.get("dropped"):
    print(f"dropped {info['dropped']}")
  print(json.dumps(info, indent=2))
  spec = (args.config or KINDS[args.kind][1]).split(":")[0] + ":" + ",".join(
      [info["variant"]] + (["repa"] if args.kind == "repa" else []))
  print(f"probe it: python main.py --config={spec} --mode=probe --workdir={args.workdir} --config.vae.weights=vae.npz")
  return info


if __name__ == "__main__":
  main()
