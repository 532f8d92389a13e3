"""The original DiT (Peebles & Xie; METHOD.md §11), to load the public checkpoints (DiT-XL/2, and SiT's
same backbone): patch embedding (a linear map of each p×p×C patch, the conv of kernel = stride =
p), MAE's fixed 2-D sin-cos positions (column coordinate in the first half), a 256-dim frequency
embedding of t -> Linear -> SiLU -> Linear, a label table with the null class last, N adaLN-Zero
blocks whose LayerNorms have no affine parameters, the final adaLN layer, and the learned-sigma
output: 2C channels, eps and v (log σ² = frac·log β_t + (1 - frac)·log β̃_t, frac = (v + 1)/2).
The MLP branch's LayerNorm eps is a setting: 1e-6 in the original code, 1e-5 in diffusers' port
(`norm_eps`); the converter keeps the one its source file's implementation uses.

The network is told the timestep itself (0..T-1), not this code's t + 1 convention: it was
trained so. Block numbering for probes is 0..depth-1.
"""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from umd_jax.models import layers
from umd_jax.geometry import input_shape, sincos_2d
from umd_jax.models.layers import DTYPES, compute_dtype

# name: (width, depth, heads); METHOD.md §11. "Mu" (tests) and "Ti" (the demo: UMD Ti's width and block count) are ours.
VARIANTS = {"Mu": (32, 2, 2), "Ti": (64, 6, 4), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
FREQUENCY_DIM = 256


def parse_variant(variant: str) -> dict:
  """'XL/2' -> dict(width=1152, depth=28, heads=16, patch=2)."""
  try:
    name, patch = variant.split("/")
    width, depth, heads = VARIANTS[name]
    patch = int(patch)
    if patch < 1:
      raise ValueError
  except (ValueError, KeyError):
    raise ValueError(f"model.variant={variant!r} is not NAME/PATCH with NAME in {sorted(VARIANTS)} "
                     "(for example 'XL/2')") from None
  return dict(width=width, depth=depth, heads=heads, patch=patch)


def positions(width: int, grid: int) -> np.ndarray:
  """(grid², width) DiT's table: MAE's get_2d_sincos_pos_embed, whose first half encodes the
  column and the second the row (sincos_2d has them the other way round)."""
  table = sincos_2d(width, grid)
  return np.concatenate([table[:, width // 2:], table[:, :width // 2]], axis=1)


class TimestepEmbedder(nnx.Module):
  """t -> 256 [cos | sin] frequencies (max period 10,000) -> Linear -> SiLU -> Linear."""

  def __init__(self, width, *, dtype, rngs):
    init = nnx.initializers.normal(0.02)
    self.fc1 = layers.dense(FREQUENCY_DIM, width, ("embed", "mlp"), dtype=dtype, rngs=rngs, kernel_init=init)
    self.fc2 = layers.dense(width, width, ("mlp", "embed"), dtype=dtype, rngs=rngs, kernel_init=init)

  def __call__(self, t):  # (B,) -> (B, width)
    return self.fc2(nnx.silu(self.fc1(layers.timestep_sinusoids(t, FREQUENCY_DIM))))


class DiT(nnx.Module):

  def __init__(self, *, image_size: int, channels: int, patch: int, width: int, depth: int, heads: int,
               num_classes: int = 1000, learn_sigma: bool = True, mlp_norm_eps: float = 1e-6, dtype: str = "auto",
               scan_layers: bool = False,
               remat: str = "none", attention: str = "auto", rngs: nnx.Rngs):
    if image_size % patch:
      raise ValueError(f"input size {image_size} is not divisible by patch size {patch}: change data.image_size "
                       "or model.variant")
    self.patch, self.channels, self.num_classes = patch, channels, num_classes
    self.grid = image_size // patch
    self.num_patches = self.grid ** 2
    self.width, self.depth = width, depth
    self.out_channels = 2 * channels if learn_sigma else channels
    self.dtype = dt = DTYPES[compute_dtype(dtype)]
    self.x_embedder = layers.dense(patch * patch * channels, width, ("patch", "embed"), dtype=dt, rngs=rngs)
    self.t_embedder = TimestepEmbedder(width, dtype=dt, rngs=rngs)
    self.y_embedder = nnx.Embed(num_classes + 1, width, dtype=dt, param_dtype=jnp.float32, rngs=rngs,
                                embedding_init=layers.logical(nnx.initializers.normal(0.02), "vocab", "embed"))
    self.blocks = layers.Stack(depth, scan=scan_layers, remat=remat, rngs=rngs, make=lambda r: layers.Block(
        width, heads, adaln=True, dtype=dt, rngs=r, attention=attention, affine_norms=False, mlp_norm_eps=mlp_norm_eps,
        fast_variance=False))  # PyTorch's two-pass variance: 28 blocks of E[x²]-E[x]² drift 4e-5 from the reference
    self.final_norm = layers.layer_norm(width, dtype=dt, rngs=rngs, affine=False, fast_variance=False)
    self.final_modulation = layers.dense(width, 2 * width, ("embed", "mlp"), dtype=dt, rngs=rngs,
                                         kernel_init=layers.zeros)
    self.head = layers.dense(width, patch * patch * self.out_channels, ("embed", "patch"), dtype=dt, rngs=rngs,
                             kernel_init=layers.zeros)

  def condition(self, t, labels=None):
    """(B,) timesteps as the network was trained on them (0..T-1) and labels (None: the null
    class) -> SiLU(t_emb + y_emb), what every adaLN modulation reads."""
    if labels is None:
      labels = jnp.full(t.shape, self.num_classes, jnp.int32)
    return nnx.silu(self.t_embedder(t) + self.y_embedder(labels))

  def _embed(self, x):
    tokens = self.x_embedder(layers.patchify(x, self.patch).astype(self.dtype))
    return tokens + jnp.asarray(positions(self.width, self.grid), self.dtype)[None]

  def __call__(self, x, t, labels=None):
    """Latents (B, H, W, C), timesteps (B,), labels (B,) or None -> dict(eps, v), each (B, H, W, C)
    float32 (v only with learned sigma)."""
    cond = self.condition(t, labels)
    h = self.blocks(self._embed(x), cond)
    shift, scale = jnp.split(self.final_modulation(cond), 2, axis=-1)
    out = self.head(layers.modulate(self.final_norm(h), shift, scale)).astype(jnp.float32)
    out = layers.unpatchify(out, self.patch, self.grid)
    return dict(eps=out[..., :self.channels], v=out[..., self.channels:] if self.out_channels > self.channels else None)

  def tokens(self, x, cond, block: int, drop=None):
    """The tokens after `block` (B, L, D); drop (block + 1, 2, B): stochastic depth."""
    run = block + 1
    return self.blocks(self._embed(x), cond, upto=run if run < self.depth else None, drop=drop)

  def features(self, x, cond):
    """Every block's mean-pooled tokens (depth, B, D); rep is the last block's."""
    _, pooled = self.blocks(self._embed(x), cond, pool_from=0)
    return dict(rep=pooled[-1], blocks=pooled)


def from_config(config, rngs: nnx.Rngs) -> DiT:
  m = config.model
  size, channels = input_shape(config)
  return DiT(image_size=size, channels=channels, num_classes=m.num_classes, learn_sigma=config.dit.learn_sigma,
             mlp_norm_eps=config.dit.mlp_norm_eps,
             dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat, attention=m.attention, rngs=rngs,
             **parse_variant(m.variant))

