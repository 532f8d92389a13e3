"""Stable Diffusion's VAE (diffusers `AutoencoderKL`, kl-f8) in Flax NNX, NHWC.

Parameter names follow diffusers' state_dict (`encoder.down_blocks.0.resnets.1.conv2.weight`
-> `encoder/down_blocks/0/resnets/1/conv2/kernel`), so `tools/convert_vae_weights.py` only
transposes and renames leaves. The SD topology: block channels (128, 256, 512, 512), two ResNet
blocks per level (three in the decoder), 4 latent channels, 8× downsampling; encoder ≈ 34.2M and
decoder ≈ 49.5M parameters. What must match diffusers exactly: GroupNorm with 32 groups and
eps 1e-6 (two-pass variance); the encoder's downsampling pads (0, 1) on H and W, then a stride-2
VALID 3×3 conv; the decoder's upsampling is nearest ×2 then a 3×3 conv; one single-head
self-attention (with a GroupNorm and a residual) in each mid-block; the log-variance is clipped
to [-30, 20]. Convolutions and matmuls run at `precision` ("highest" by default: TPU's default
float32 convolution precision is bfloat16 passes, visibly lossy for a VAE).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Topology:
  block_out_channels: tuple = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  in_channels: int = 3
  out_channels: int = 3

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: dict) -> "Topology":
    """From a diffusers config.json (extra keys ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    return cls(**kw)


class _Norm(nnx.GroupNorm):
  def __init__(self, channels, groups, rngs):
    super().__init__(channels, num_groups=groups, epsilon=1e-6, use_fast_variance=False, rngs=rngs)


def _conv(cin, cout, k, precision, rngs, stride=1, padding="SAME"):
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, precision=precision, rngs=rngs)


class ResnetBlock(nnx.Module):
  def __init__(self, cin, cout, groups, precision, rngs):
    self.norm1, self.conv1 = _Norm(cin, groups, rngs), _conv(cin, cout, 3, precision, rngs)
    self.norm2, self.conv2 = _Norm(cout, groups, rngs), _conv(cout, cout, 3, precision, rngs)
    self.conv_shortcut = _conv(cin, cout, 1, precision, rngs) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Attention(nnx.Module):
  """Single-head self-attention over the H·W positions, with a GroupNorm in front and a residual."""

  def __init__(self, channels, groups, precision, rngs):
    self.group_norm = _Norm(channels, groups, rngs)
    linear = lambda: nnx.Linear(channels, channels, precision=precision, rngs=rngs)
    self.to_q, self.to_k, self.to_v, self.to_out = linear(), linear(), linear(), linear()
    self.precision = precision

  def __call__(self, x):
    b, h, w, c = x.shape
    y = self.group_norm(x).reshape(b, h * w, c)
    q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=self.precision) / math.sqrt(c)
    y = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits.astype(jnp.float32), axis=-1), v, precision=self.precision)
    return x + self.to_out(y).reshape(b, h, w, c)


class MidBlock(nnx.Module):
  def __init__(self, channels, groups, precision, rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, precision, rngs) for _ in range(2)])
    self.attentions = nnx.List([Attention(channels, groups, precision, rngs)])

  def __call__(self, x):
    return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nnx.Module):
  def __init__(self, channels, precision, rngs):
    self.conv = _conv(channels, channels, 3, precision, rngs, stride=2, padding="VALID")

  def __call__(self, x):
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  def __init__(self, channels, precision, rngs):
    self.conv = _conv(channels, channels, 3, precision, rngs)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
  """A down (encoder) or up (decoder) block: ResNet blocks, then an optional resampler."""

  def __init__(self, cin, cout, layers, groups, resample, precision, rngs):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, precision, rngs)
                             for i in range(layers)])
    if resample == "down":
      self.downsamplers = nnx.List([Downsample(cout, precision, rngs)])
    elif resample == "up":
      self.upsamplers = nnx.List([Upsample(cout, precision, rngs)])

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    for s in getattr(self, "downsamplers", ()) or getattr(self, "upsamplers", ()):
      x = s(x)
    return x


class Encoder(nnx.Module):
  def __init__(self, t: Topology, precision, rngs):
    ch, g = t.block_out_channels, t.norm_num_groups
    self.conv_in = _conv(t.in_channels, ch[0], 3, precision, rngs)
    self.down_blocks = nnx.List([
        Level(ch[max(i - 1, 0)], ch[i], t.layers_per_block, g, "down" if i < len(ch) - 1 else None, precision, rngs)
        for i in range(len(ch))])
    self.mid_block = MidBlock(ch[-1], g, precision, rngs)
    self.conv_norm_out = _Norm(ch[-1], g, rngs)
    self.conv_out = _conv(ch[-1], 2 * t.latent_channels, 3, precision, rngs)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
  def __init__(self, t: Topology, precision, rngs):
    ch, g = tuple(reversed(t.block_out_channels)), t.norm_num_groups
    self.conv_in = _conv(t.latent_channels, ch[0], 3, precision, rngs)
    self.mid_block = MidBlock(ch[0], g, precision, rngs)
    self.up_blocks = nnx.List([
        Level(ch[max(i - 1, 0)], ch[i], t.layers_per_block + 1, g, "up" if i < len(ch) - 1 else None, precision, rngs)
        for i in range(len(ch))])
    self.conv_norm_out = _Norm(ch[-1], g, rngs)
    self.conv_out = _conv(ch[-1], t.out_channels, 3, precision, rngs)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """`encode(x) -> (mean, std)` of the diagonal-Gaussian posterior for images x in [-1, 1]
  (B, H, W, 3); `decode(z) -> images` (unclipped). Latents here are unscaled: the diffusion
  model works on z · scaling_factor."""

  def __init__(self, topology: Topology = Topology(), *, precision="highest", rngs: nnx.Rngs):
    t, lc = topology, topology.latent_channels
    self.topology = t
    self.encoder = Encoder(t, precision, rngs)
    self.quant_conv = _conv(2 * lc, 2 * lc, 1, precision, rngs)
    self.post_quant_conv = _conv(lc, lc, 1, precision, rngs)
    self.decoder = Decoder(t, precision, rngs)

  def encode(self, x):
    moments = self.quant_conv(self.encoder(x.astype(jnp.float32)))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z.astype(jnp.float32)))
