"""One-time conversion of pytorch-fid's InceptionV3 weights to the .npz that umd_jax/fid.py reads.

  pip install torch   # only for this conversion, on any machine
  python tools/convert_inception_weights.py pt_inception-2015-12-05-6726825d.pth inception_fid.npz

The .pth is the file pytorch-fid (github.com/mseitzer/pytorch-fid) publishes as its FID
Inception weights (converted by its authors from the TensorFlow FID graph). Keys and layouts
stay as in the state_dict (conv weights OIHW); `num_batches_tracked` entries are dropped.
"""
import sys

import numpy as np


def main(src, dst):
  import torch
  state = torch.load(src, map_location="cpu", weights_only=True)  # tensors only: no pickled code runs
  arrays = {k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}
  np.savez(dst, **arrays)
  print(f"wrote {len(arrays)} arrays to {dst}")


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit(__doc__)
  main(*sys.argv[1:])
