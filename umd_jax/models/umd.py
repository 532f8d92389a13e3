"""The UMD auto-encoder (METHOD.md §3): embed -> mask -> encode -> decode -> (x0, eps) heads.

The model knows nothing of data or training: it takes images, timestep indices, optional
labels and optional kept/restore token indices (made by `corruption.py`).
"""
import math

import jax.numpy as jnp
from flax import nnx

from umd_jax import geometry
from umd_jax.models import layers
from umd_jax.rules import ConfigError

# name: (width, encoder depth, decoder depth, heads). METHOD.md §3; "Ti" and "Mu" are for tests/demos.
VARIANTS = {
    "Mu": (32, 2, 1, 2),
    "Ti": (64, 4, 2, 4),
    "S": (384, 12, 4, 6),
    "B": (768, 12, 4, 12),
    "L": (1024, 24, 8, 16),
}


def parse_variant(variant: str) -> dict:
  """'B/4' -> dict(width=768, encoder_depth=12, decoder_depth=4, heads=12, patch=4)."""
  try:
    name, patch = variant.split("/")
    width, enc, dec, heads = VARIANTS[name]
    patch = int(patch)
    if patch < 1:
      raise ValueError
  except (ValueError, KeyError):
    raise ValueError(
        f"model.variant={variant!r} is not NAME/PATCH with NAME in {sorted(VARIANTS)} "
        "(for example 'B/4')") from None
  return dict(width=width, encoder_depth=enc, decoder_depth=dec, heads=heads, patch=patch)


CONDITIONINGS = ("adaln", "in_context")


def check_conditioning(value: str) -> None:
  """The rule on model.conditioning (the constructor and the method's checks call it)."""
  if value not in CONDITIONINGS:
    raise ConfigError(f"model.conditioning={value!r}: use 'adaln' or 'in_context'")


class UMD(nnx.Module):

  def __init__(self, *, image_size: int, channels: int, patch: int, width: int, encoder_depth: int,
               decoder_depth: int, heads: int, num_registers: int = 4, conditioning: str = "adaln",
               num_classes: int = 0, dtype: str = "auto", scan_layers: bool = True,
               remat: str = "none", attention: str = "auto", frames: int = 1, tubelet: int = 1,
               rngs: nnx.Rngs):
    self.geometry = geometry.checked_grid(image_size, patch, frames, tubelet)
    check_conditioning(conditioning)
    if width % heads:
      raise ValueError(f"width {width} is not divisible by {heads} heads")
    self.patch, self.channels, self.num_classes = patch, channels, num_classes
    self.num_patches = self.geometry.num_tokens
    self.num_registers, self.encoder_depth = num_registers, encoder_depth
    self.adaln = conditioning == "adaln"
    self.dtype = dt = layers.DTYPES[layers.compute_dtype(dtype)]
    stack = dict(adaln=self.adaln, dtype=dt, scan=scan_layers, remat=remat, attention=attention, rngs=rngs)
    pos_init = layers.logical(nnx.initializers.normal(1 / math.sqrt(self.num_patches)), None, "seq", "embed")
    token_shape = (1, self.num_patches, width)

    token_dim = self.geometry.token_dim(channels)
    self.patch_embed = layers.dense(token_dim, width, ("patch", "embed"), dtype=dt, rngs=rngs)
    self.encoder_pos = nnx.Param(pos_init(rngs.params(), token_shape))
    self.registers = nnx.Param(layers.logical(layers.zeros, None, None, "embed")(rngs.params(), (1, num_registers, width)))
    self.encoder = layers.Stack(encoder_depth, width, heads, **stack)
    self.encoder_norm = layers.layer_norm(width, dtype=dt, rngs=rngs)

    self.mask_token = nnx.Param(layers.logical(nnx.initializers.normal(0.02), None, None, "embed")(rngs.params(), (1, 1, width)))
    self.decoder_pos = nnx.Param(pos_init(rngs.params(), token_shape))
    self.decoder = layers.Stack(decoder_depth, width, heads, **stack)
    self.decoder_norm = layers.layer_norm(width, dtype=dt, rngs=rngs)
    if self.adaln:
      self.final_modulation = layers.dense(width, 2 * width, ("embed", "mlp"), dtype=dt, rngs=rngs, kernel_init=layers.zeros)
    self.head = layers.dense(width, 2 * token_dim, ("embed", "patch"), dtype=dt, rngs=rngs,
                             kernel_init=nnx.initializers.normal(0.02))

    self.time_embed = layers.TimestepEmbedder(width, dtype=dt, rngs=rngs)
    if num_classes > 0:
      self.label_embed = layers.LabelEmbedder(num_classes, width, dtype=dt, rngs=rngs)

  # --- pieces -------------------------------------------------------------------------------

  def patchify(self, x):  # (B, [T,] H, W, C) -> (B, L, tokens' values)
    return self.geometry.patchify(x)

  def condition(self, t_index, labels=None):
    """(B,) timestep indices (0 = clean step) and optional labels -> (B, width) condition."""
    cond = self.time_embed(t_index)
    if self.num_classes > 0:
      if labels is None:
        labels = jnp.full(t_index.shape, self.num_classes, jnp.int32)  # null class
      cond = cond + self.label_embed(labels)
    return nnx.silu(cond) if self.adaln else cond

  def encode(self, x, cond, keep_ids=None, pooled=None):
    """Images (B, H, W, C) -> visible-token outputs (B, K, D) and rep (B, D).
    With a `pooled` dict, the mean-pooled patch tokens after each block go to pooled["encoder"]."""
    h = self._embed(x, keep_ids)
    if pooled is None:
      h = self.encoder(h, cond)
    else:
      h, pooled["encoder"] = self.encoder(h, cond, pool_from=self.num_registers)
    h = self.encoder_norm(h)
    return h[:, self.num_registers:], h[:, :self.num_registers].mean(axis=1)

  def _embed(self, x, keep_ids=None):
    """Images -> the encoder's input: registers, then the (kept) patch tokens with positions."""
    # The residual stream stays in the compute dtype (bf16 on accelerators halves the bytes every
    # norm, gate and residual add moves); LayerNorm statistics are still taken in float32.
    tokens = self.patch_embed(self.patchify(x).astype(self.dtype)) + self.encoder_pos[...].astype(self.dtype)
    if keep_ids is not None:
      tokens = jnp.take_along_axis(tokens, keep_ids[..., None], axis=1)
    registers = jnp.broadcast_to(self.registers[...], (tokens.shape[0],) + self.registers.shape[1:])
    return jnp.concatenate([registers.astype(tokens.dtype), tokens], axis=1)

  def _decoder_input(self, h, rep):
    """Patch tokens (B, L, D) in patch order and rep -> the decoder's input: rep first, positions added."""
    return jnp.concatenate([rep[:, None].astype(h.dtype), h + self.decoder_pos[...].astype(h.dtype)], axis=1)

  def tokens(self, x, cond, block: int, drop=None):
    """The unmasked forward cut after `block` (0 .. encoder_depth-1 the encoder's, then the
    decoder's, numbered as `features` numbers them): that block's patch tokens (B, L, D), without
    the registers or the decoder's rep token. `drop` (block + 1, 2, B): stochastic depth of the
    blocks run (layers.drop_path_scales). Recognition fine-tuning reads it: MAE's head after the
    encoder's last block, or DDAE's cut anywhere."""
    e = self.encoder_depth
    run = min(block + 1, e)
    h = self.encoder(self._embed(x), cond, upto=run if run < e else None, drop=None if drop is None else drop[:run])
    if block < e:
      return h[:, self.num_registers:]
    h = self.encoder_norm(h)
    h = self._decoder_input(h[:, self.num_registers:], h[:, :self.num_registers].mean(axis=1))
    run = block + 1 - e
    h = self.decoder(h, cond, upto=run if run < self.decoder.depth else None, drop=None if drop is None else drop[e:])
    return h[:, 1:]

  def decode(self, visible, rep, cond, restore_ids=None, pooled=None):
    """Visible tokens (B, K, D) + rep -> (x0, eps) inputs, each (B, [T,] H, W, C) in float32."""
    b, k, d = visible.shape
    if restore_ids is not None:
      mask_tokens = jnp.broadcast_to(self.mask_token[...], (b, self.num_patches - k, d)).astype(visible.dtype)
      h = jnp.concatenate([visible, mask_tokens], axis=1)
      h = jnp.take_along_axis(h, restore_ids[..., None], axis=1)  # back to patch order
    else:
      h = visible
    h = self._decoder_input(h, rep)
    if pooled is None:
      h = self.decoder(h, cond)
    else:
      h, pooled["decoder"] = self.decoder(h, cond, pool_from=1)
    h = self.decoder_norm(h)[:, 1:]
    if self.adaln:
      shift, scale = jnp.split(self.final_modulation(cond), 2, axis=-1)
      h = layers.modulate(h, shift, scale)
    out = self.geometry.unpatchify(self.head(h).astype(jnp.float32))
    return out[..., :self.channels], out[..., self.channels:]

  def __call__(self, x, t_index, labels=None, mask=None):
    """Returns dict(x0, eps, rep). `t_index` is what the network is told (0 = clean step); `mask`
    (a corruption.Mask, or None for every token) says which patches the encoder sees."""
    cond = self.condition(t_index, labels)
    visible, rep = self.encode(x, cond, None if mask is None else mask.keep_ids)
    x0, eps = self.decode(visible, rep, cond, None if mask is None else mask.restore_ids)
    return dict(x0=x0, eps=eps, rep=rep.astype(jnp.float32))

  def features(self, x, t_index, labels=None):
    """Unmasked forward for probing: rep (B, D) and every block's mean-pooled tokens,
    stacked as (encoder_depth + decoder_depth, B, D) in block order."""
    cond = self.condition(t_index, labels)
    pooled = {}
    visible, rep = self.encode(x, cond, pooled=pooled)
    self.decode(visible, rep, cond, pooled=pooled)
    return dict(rep=rep.astype(jnp.float32), blocks=jnp.concatenate([pooled["encoder"], pooled["decoder"]]))


def num_patches(config) -> int:
  """Tokens of one input: (token frames ×) (input size / patch)²."""
  return geometry.num_tokens(config, parse_variant(config.model.variant)["patch"])


def from_config(config, rngs: nnx.Rngs) -> UMD:
  """Build the model of `config.model` for the input of `config.data` (see `geometry.input_shape`)."""
  m = config.model
  size, channels = geometry.input_shape(config)
  return UMD(image_size=size, channels=channels, num_registers=m.num_registers,
             conditioning=m.conditioning, num_classes=m.num_classes, dtype=m.dtype,
             scan_layers=m.scan_layers, remat=m.remat, attention=m.attention, frames=geometry.frames(config),
             tubelet=m.tubelet, rngs=rngs, **parse_variant(m.variant))
