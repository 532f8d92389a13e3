"""InceptionV3 as in pytorch-fid (the FID network): 2048-d pool features and 1008-way logits.

Weights are a flat dict named as pytorch-fid's state_dict (`Mixed_5b.branch1x1.conv.weight`,
`...bn.running_mean`, `fc.weight`, ...), loaded from a local .npz the user converts once
(tools/convert_inception_weights.py); nothing is downloaded. The FID-specific blocks keep
pytorch-fid's quirks: average pools that exclude padding, and a max pool in Mixed_7c.
"""
import jax
import jax.numpy as jnp
import numpy as np


class Inception:
  """`Inception(weights)(images)`: uint8 or [0, 1] images (N, H, W, 1|3) -> (pool (N, 2048), logits)."""

  def __init__(self, weights=None, seed: int = 0):
    self.weights = dict(weights) if weights is not None else None
    if self.weights is None:  # random weights of the right shapes (tests): trace once to create them
      self.weights, self._rng = {}, np.random.default_rng(seed)
      jax.eval_shape(self._forward, jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
      self._rng = None

  # --- layers ---------------------------------------------------------------------------------

  def _param(self, name, shape, scale=0.05):
    if name not in self.weights:
      if getattr(self, "_rng", None) is None:
        raise KeyError(f"Inception weights have no {name!r}: is this a pytorch-fid InceptionV3 file?")
      init = (1.0 + 0.1 * self._rng.standard_normal(shape)) if name.endswith((".weight", "running_var")) and len(shape) == 1 \
          else scale * self._rng.standard_normal(shape)
      self.weights[name] = np.abs(init).astype(np.float32) if name.endswith("running_var") else init.astype(np.float32)
    w = self.weights[name]
    if tuple(w.shape) != tuple(shape):
      raise ValueError(f"Inception weight {name!r} has shape {tuple(w.shape)}, expected {tuple(shape)}")
    return jnp.asarray(w)

  def conv(self, name, x, out, kernel, stride=1, pad=0):
    """BasicConv2d: conv (no bias) + BatchNorm (eps 1e-3, running stats) + ReLU. Weights OIHW."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    w = self._param(f"{name}.conv.weight", (out, x.shape[-1], kh, kw))
    y = jax.lax.conv_general_dilated(x, jnp.transpose(w, (2, 3, 1, 0)), (stride, stride), ((ph, ph), (pw, pw)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    scale = self._param(f"{name}.bn.weight", (out,)) * jax.lax.rsqrt(self._param(f"{name}.bn.running_var", (out,)) + 1e-3)
    y = (y - self._param(f"{name}.bn.running_mean", (out,))) * scale + self._param(f"{name}.bn.bias", (out,), 0.0)
    return jax.nn.relu(y)

  @staticmethod
  def max_pool(x, k=3, s=2, pad=0):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1),
                                 ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  @staticmethod
  def avg_pool_exclude_pad(x):  # 3×3, stride 1, pad 1, count_include_pad=False
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    count = jax.lax.reduce_window(jnp.ones_like(x[:1, ..., :1]), 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    return total / count

  # --- blocks -----------------------------------------------------------------------------------

  def block_a(self, n, x, pool_features):
    b1 = self.conv(f"{n}.branch1x1", x, 64, 1)
    b5 = self.conv(f"{n}.branch5x5_2", self.conv(f"{n}.branch5x5_1", x, 48, 1), 64, 5, pad=2)
    b3 = self.conv(f"{n}.branch3x3dbl_1", x, 64, 1)
    b3 = self.conv(f"{n}.branch3x3dbl_3", self.conv(f"{n}.branch3x3dbl_2", b3, 96, 3, pad=1), 96, 3, pad=1)
    bp = self.conv(f"{n}.branch_pool", self.avg_pool_exclude_pad(x), pool_features, 1)
    return jnp.concatenate([b1, b5, b3, bp], -1)

  def block_b(self, n, x):
    b3 = self.conv(f"{n}.branch3x3", x, 384, 3, stride=2)
    bd = self.conv(f"{n}.branch3x3dbl_1", x, 64, 1)
    bd = self.conv(f"{n}.branch3x3dbl_3", self.conv(f"{n}.branch3x3dbl_2", bd, 96, 3, pad=1), 96, 3, stride=2)
    return jnp.concatenate([b3, bd, self.max_pool(x)], -1)

  def block_c(self, n, x, c7):
    b1 = self.conv(f"{n}.branch1x1", x, 192, 1)
    b7 = self.conv(f"{n}.branch7x7_1", x, c7, 1)
    b7 = self.conv(f"{n}.branch7x7_3", self.conv(f"{n}.branch7x7_2", b7, c7, (1, 7), pad=(0, 3)), 192, (7, 1), pad=(3, 0))
    bd = self.conv(f"{n}.branch7x7dbl_1", x, c7, 1)
    for i, (out, k, p) in enumerate([(c7, (7, 1), (3, 0)), (c7, (1, 7), (0, 3)), (c7, (7, 1), (3, 0)),
                                     (192, (1, 7), (0, 3))], start=2):
      bd = self.conv(f"{n}.branch7x7dbl_{i}", bd, out, k, pad=p)
    bp = self.conv(f"{n}.branch_pool", self.avg_pool_exclude_pad(x), 192, 1)
    return jnp.concatenate([b1, b7, bd, bp], -1)

  def block_d(self, n, x):
    b3 = self.conv(f"{n}.branch3x3_2", self.conv(f"{n}.branch3x3_1", x, 192, 1), 320, 3, stride=2)
    b7 = self.conv(f"{n}.branch7x7x3_1", x, 192, 1)
    b7 = self.conv(f"{n}.branch7x7x3_2", b7, 192, (1, 7), pad=(0, 3))
    b7 = self.conv(f"{n}.branch7x7x3_3", b7, 192, (7, 1), pad=(3, 0))
    b7 = self.conv(f"{n}.branch7x7x3_4", b7, 192, 3, stride=2)
    return jnp.concatenate([b3, b7, self.max_pool(x)], -1)

  def block_e(self, n, x, max_pool: bool):
    b1 = self.conv(f"{n}.branch1x1", x, 320, 1)
    b3 = self.conv(f"{n}.branch3x3_1", x, 384, 1)
    b3 = jnp.concatenate([self.conv(f"{n}.branch3x3_2a", b3, 384, (1, 3), pad=(0, 1)),
                          self.conv(f"{n}.branch3x3_2b", b3, 384, (3, 1), pad=(1, 0))], -1)
    bd = self.conv(f"{n}.branch3x3dbl_2", self.conv(f"{n}.branch3x3dbl_1", x, 448, 1), 384, 3, pad=1)
    bd = jnp.concatenate([self.conv(f"{n}.branch3x3dbl_3a", bd, 384, (1, 3), pad=(0, 1)),
                          self.conv(f"{n}.branch3x3dbl_3b", bd, 384, (3, 1), pad=(1, 0))], -1)
    pooled = self.max_pool(x, 3, 1, 1) if max_pool else self.avg_pool_exclude_pad(x)
    return jnp.concatenate([b1, b3, bd, self.conv(f"{n}.branch_pool", pooled, 192, 1)], -1)

  def _forward(self, x):  # x: (N, 299, 299, 3) in [-1, 1]
    x = self.conv("Conv2d_1a_3x3", x, 32, 3, stride=2)
    x = self.conv("Conv2d_2a_3x3", x, 32, 3)
    x = self.max_pool(self.conv("Conv2d_2b_3x3", x, 64, 3, pad=1))
    x = self.max_pool(self.conv("Conv2d_4a_3x3", self.conv("Conv2d_3b_1x1", x, 80, 1), 192, 3))
    for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = self.block_a(name, x, pool)
    x = self.block_b("Mixed_6a", x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = self.block_c(name, x, c7)
    x = self.block_e("Mixed_7b", self.block_d("Mixed_7a", x), max_pool=False)
    pool = self.block_e("Mixed_7c", x, max_pool=True).mean(axis=(1, 2))
    logits = pool @ self._param("fc.weight", (1008, 2048), 0.01).T + self._param("fc.bias", (1008,), 0.0)
    return pool, logits

  def __call__(self, images):
    return self._forward(preprocess(images))


def preprocess(images) -> jax.Array:
  """pytorch-fid's input: [0, 1] (uint8 / 255), bilinear resize to 299×299 (align_corners=False,
  no antialiasing), grey repeated to RGB, then scaled to [-1, 1]."""
  x = jnp.asarray(images)
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = jax.image.resize(x, (x.shape[0], 299, 299, 3), "bilinear", antialias=False)
  return 2.0 * x - 1.0
