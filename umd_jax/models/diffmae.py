"""DiffMAE (Wei et al., arXiv 2304.03283; METHOD.md §9): a ViT encoder of the clean visible
patches, and a decoder that denoises only the masked patches, told their noise level t.

Decoders (`decoder`): "cross_self" (self-attention among the noisy masked tokens, then
cross-attention to an encoder block, then the MLP), "cross" (cross-attention and MLP only) and
"joint" (MAE's decoder: self-attention over the projected visible tokens and the noisy masked
tokens together). Links (`links`, cross decoders): "top_down" pairs decoder block i with encoder
block `top_down_pairs(...)[i]`, the last encoder block first; "last" gives every decoder block the
encoder's last (normalised) output. The encoder never sees t; the decoder's blocks take it by
adaLN-Zero. Positions are MAE's fixed 2-D sin-cos tables (clips: 3-D, geometry.Grid.sincos).
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from umd_jax import geometry
from umd_jax.models import layers
from umd_jax.geometry import input_shape
from umd_jax.models.layers import DTYPES, compute_dtype
from umd_jax.models.umd import parse_variant

DECODERS = ("cross_self", "cross", "joint")
LINKS = ("top_down", "last")


def top_down_pairs(encoder_depth: int, decoder_depth: int) -> np.ndarray:
  """Encoder block each decoder block attends to: the first decoder block reads the last encoder
  block, going down. Equal depths mirror one to one (E-1, E-2, ..., 0); a shallower decoder
  reads evenly spaced encoder blocks from the top (E=24, D=8: 23, 20, ..., 2), so its links still
  span the encoder's hierarchy; a deeper one reuses blocks (block E-1-floor(i·E/D))."""
  return (encoder_depth - 1 - (np.arange(decoder_depth) * encoder_depth) // decoder_depth).astype(np.int32)


def _take(table, ids):
  """(1, L, D) table rows at per-sample indices (B, K) -> (B, K, D)."""
  return jnp.take_along_axis(jnp.broadcast_to(table, (ids.shape[0],) + table.shape[1:]), ids[..., None], axis=1)


class CrossAttention(nnx.Module):
  """Queries from the decoder tokens (width), keys and values from an encoder block (context_width)."""

  def __init__(self, width, context_width, heads, *, dtype, rngs):
    self.heads = heads
    self.q = layers.dense(width, width, ("embed", "heads"), dtype=dtype, rngs=rngs)
    self.kv = layers.dense(context_width, 2 * width, ("embed", "heads"), dtype=dtype, rngs=rngs)
    self.proj = layers.dense(width, width, ("heads", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x, context):  # x (B, N, D), context (B, M, Dc)
    q = layers.heads_first(self.q, x, 1, self.heads)[0]
    k, v = layers.heads_first(self.kv, context, 2, self.heads)
    return layers.heads_merged(self.proj, layers.attend(q, k, v))


class CrossBlock(nnx.Module):
  """A cross_self / cross decoder block with adaLN-Zero on t: [self-attention], cross-attention to
  its encoder block (LayerNorm'd), MLP; every branch has its own shift / scale / gate."""

  def __init__(self, width, context_width, heads, *, self_attention: bool, dtype, rngs, attention="auto"):
    self.self_attention = self_attention
    if self_attention:
      self.norm_self = layers.layer_norm(width, dtype=dtype, rngs=rngs)
      self.attn = layers.Attention(width, heads, dtype=dtype, rngs=rngs, attention=attention)
    self.norm_cross = layers.layer_norm(width, dtype=dtype, rngs=rngs)
    self.norm_context = layers.layer_norm(context_width, dtype=dtype, rngs=rngs)
    self.cross = CrossAttention(width, context_width, heads, dtype=dtype, rngs=rngs)
    self.norm_mlp = layers.layer_norm(width, dtype=dtype, rngs=rngs)
    self.mlp = layers.Mlp(width, dtype=dtype, rngs=rngs)
    branches = 3 if self_attention else 2
    self.modulation = layers.dense(width, 3 * branches * width, ("embed", "mlp"), dtype=dtype, rngs=rngs,
                                   kernel_init=layers.zeros)

  def __call__(self, x, cond, context):  # x (B, M, D); cond (B, D); context (B, N, Dc)
    mods = jnp.split(self.modulation(cond), 9 if self.self_attention else 6, axis=-1)
    branch = lambda i: (mods[3 * i], mods[3 * i + 1], mods[3 * i + 2])  # shift, scale, gate
    i = 0
    if self.self_attention:
      shift, scale, gate = branch(0)
      x = x + gate[:, None] * self.attn(layers.modulate(self.norm_self(x), shift, scale))
      i = 1
    shift, scale, gate = branch(i)
    x = x + gate[:, None] * self.cross(layers.modulate(self.norm_cross(x), shift, scale), self.norm_context(context))
    shift, scale, gate = branch(i + 1)
    return x + gate[:, None] * self.mlp(layers.modulate(self.norm_mlp(x), shift, scale))


class DiffMAE(nnx.Module):

  def __init__(self, *, image_size: int, channels: int, patch: int, width: int, encoder_depth: int, heads: int,
               decoder_width: int, decoder_depth: int, decoder_heads: int, decoder: str = "cross_self",
               links: str = "top_down", num_registers: int = 1, dtype: str = "auto", scan_layers: bool = True,
               remat: str = "none", attention: str = "auto", frames: int = 1, tubelet: int = 1,
               rngs: nnx.Rngs):
    self.geometry = geometry.checked_grid(image_size, patch, frames, tubelet)
    if decoder not in DECODERS:
      raise ValueError(f"diffmae.decoder={decoder!r}: use one of {DECODERS}")
    if links not in LINKS:
      raise ValueError(f"diffmae.links={links!r}: use one of {LINKS}")
    self.patch, self.channels, self.decoder_kind, self.links = patch, channels, decoder, links
    self.num_patches = self.geometry.num_tokens
    self.num_registers = num_registers
    self.dtype = dt = DTYPES[compute_dtype(dtype)]
    patch_dim = self.geometry.token_dim(channels)
    self.pairs = tuple(int(i) for i in top_down_pairs(encoder_depth, decoder_depth))  # static ints, not state
    common = dict(dtype=dt, scan=scan_layers, remat=remat, attention=attention, rngs=rngs)

    self.patch_embed = layers.dense(patch_dim, width, ("patch", "embed"), dtype=dt, rngs=rngs)
    self.width, self.decoder_width = width, decoder_width
    self.registers = nnx.Param(layers.logical(nnx.initializers.normal(0.02), None, None, "embed")(
        rngs.params(), (1, num_registers, width)))
    self.encoder = layers.Stack(encoder_depth, width, heads, adaln=False, **common)
    self.encoder_norm = layers.layer_norm(width, dtype=dt, rngs=rngs)

    self.decoder_embed = layers.dense(patch_dim, decoder_width, ("patch", "embed"), dtype=dt, rngs=rngs)
    self.time_embed = layers.TimestepEmbedder(decoder_width, dtype=dt, rngs=rngs)
    if decoder == "joint":
      self.context_embed = layers.dense(width, decoder_width, ("embed", "mlp"), dtype=dt, rngs=rngs)
      self.decoder = layers.Stack(decoder_depth, decoder_width, decoder_heads, adaln=True, **common)
    else:
      self.decoder = layers.Stack(decoder_depth, scan=scan_layers, remat=remat, rngs=rngs, make=lambda r: CrossBlock(
          decoder_width, width, decoder_heads, self_attention=decoder == "cross_self", dtype=dt, rngs=r,
          attention=attention))
    self.decoder_norm = layers.layer_norm(decoder_width, dtype=dt, rngs=rngs)
    self.final_modulation = layers.dense(decoder_width, 2 * decoder_width, ("embed", "mlp"), dtype=dt, rngs=rngs,
                                         kernel_init=layers.zeros)
    self.head = layers.dense(decoder_width, patch_dim, ("embed", "patch"), dtype=dt, rngs=rngs,
                             kernel_init=nnx.initializers.normal(0.02))

  # --- pieces -------------------------------------------------------------------------------

  def positions(self, width):  # (1, L, width) fixed table: a constant of the program, not a parameter
    return jnp.asarray(self.geometry.sincos(width), self.dtype)[None]

  def patchify(self, x):  # (B, [T,] H, W, C) -> (B, L, tokens' values)
    return self.geometry.patchify(x)

  def _embed(self, x, keep_ids=None):
    """Clean images -> the encoder's input: the class token(s), then the (kept) patches with positions."""
    patches, pos = self.patchify(x).astype(self.dtype), self.positions(self.width)
    if keep_ids is not None:  # only the kept patches are embedded
      patches = jnp.take_along_axis(patches, keep_ids[..., None], axis=1)
      pos = _take(pos, keep_ids)
    tokens = self.patch_embed(patches) + pos
    registers = jnp.broadcast_to(self.registers[...], (tokens.shape[0],) + self.registers.shape[1:])
    return jnp.concatenate([registers.astype(tokens.dtype), tokens], axis=1)

  def encode(self, x, keep_ids=None, collect: bool = False, pooled=None):
    """Clean images (B, H, W, C), their kept patches (B, K) (None: all) -> dict(last (B, R+K, D)
    normalised output, rep (B, D) the mean of the register outputs, and with `collect` every
    block's output (E, B, R+K, D)). With a `pooled` dict, the mean-pooled patch tokens after each
    block go to pooled["encoder"] (E, B, D). No timestep: the encoder only ever sees clean patches."""
    h = self._embed(x, keep_ids)
    out = {}
    if pooled is not None:
      h, pooled["encoder"] = self.encoder(h, None, pool_from=self.num_registers)
    elif collect:
      h, out["blocks"] = self.encoder(h, None, collect=True)
    else:
      h = self.encoder(h, None)
    last = self.encoder_norm(h)
    out.update(last=last, rep=last[:, :self.num_registers].mean(axis=1).astype(jnp.float32))
    return out

  def tokens(self, x, block: int, drop=None):
    """The encoder on the whole clean image cut after `block`: its patch tokens (B, L, D), without
    the class token. `drop` (block + 1, 2, B): stochastic depth of the blocks run. Recognition
    fine-tuning reads it (MAE's head after the last block)."""
    h = self._embed(x)
    run = block + 1
    return self.encoder(h, None, upto=run if run < self.encoder.depth else None, drop=drop)[:, self.num_registers:]

  def context(self, x, keep_ids=None):
    """What the decoder reads of the encoder, computed once per image (inpainting reuses it at every
    step): the encoder blocks its blocks are linked to, or the last output ("joint", "last")."""
    enc = self.encode(x, keep_ids, collect=self.decoder_kind != "joint" and self.links == "top_down")
    if "blocks" in enc:
      enc["blocks"] = jnp.take(enc["blocks"], jnp.asarray(self.pairs), axis=0)  # (Ddec, B, N, D)
    return enc

  def decode(self, context, xt_patches, masked_ids, keep_ids, t_index):
    """Noisy masked patches (B, M, p*p*C) at their positions (B, M), told t_index (B,) -> the
    prediction for them (B, M, p*p*C) in float32 (x0 or eps, as the model was trained)."""
    cond = nnx.silu(self.time_embed(t_index))
    pos = self.positions(self.decoder_width)
    h = self.decoder_embed(xt_patches.astype(self.dtype)) + _take(pos, masked_ids)
    m = h.shape[1]
    if self.decoder_kind == "joint":
      visible = self.context_embed(context["last"])
      positions = jnp.concatenate([jnp.zeros((visible.shape[0], self.num_registers, pos.shape[-1]), pos.dtype),
                                   _take(pos, keep_ids)], axis=1)
      h = self.decoder(jnp.concatenate([visible + positions, h], axis=1), cond)[:, -m:]
    elif self.links == "top_down":
      h = self.decoder(h, cond, context=context["blocks"])
    else:
      depth = len(self.pairs)
      h = self.decoder(h, cond, context=jnp.broadcast_to(context["last"], (depth,) + context["last"].shape))
    shift, scale = jnp.split(self.final_modulation(cond), 2, axis=-1)
    return self.head(layers.modulate(self.decoder_norm(h), shift, scale)).astype(jnp.float32)

  def __call__(self, x, xt_patches, t_index, mask):
    """Clean images (B, H, W, C); the noisy masked patches (B, M, p*p*C) of `mask` (a corruption.Mask
    with masked_ids); t_index (B,) what the decoder is told -> prediction for the masked patches."""
    return self.decode(self.context(x, mask.keep_ids), xt_patches, mask.masked_ids, mask.keep_ids, t_index)

  def features(self, x):
    """Probing: the encoder on the whole clean image -> rep (B, D) and each encoder block's mean-
    pooled patch tokens (E, B, D)."""
    pooled = {}
    out = self.encode(x, pooled=pooled)
    return dict(rep=out["rep"], blocks=pooled["encoder"])


def from_config(config, rngs: nnx.Rngs) -> DiffMAE:
  m, d = config.model, config.diffmae
  size, channels = input_shape(config)
  variant = parse_variant(m.variant)
  del variant["decoder_depth"]  # the variant names the encoder; the decoder is diffmae.*
  return DiffMAE(image_size=size, channels=channels, num_registers=m.num_registers, dtype=m.dtype,
                 scan_layers=m.scan_layers, remat=m.remat, attention=m.attention, decoder=d.decoder, links=d.links,
                 decoder_width=d.decoder_width, decoder_depth=d.decoder_depth, decoder_heads=d.decoder_heads,
                 frames=geometry.frames(config), tubelet=m.tubelet, rngs=rngs, **variant)
