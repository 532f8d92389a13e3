"""Building blocks of the networks (METHOD.md §3): embeddings, attention, adaLN-Zero block, compute dtype.

Kernels carry logical axis names ("embed", "mlp", ...) that `sharding.py` maps to mesh axes.
"""
import math

import einops
import jax
import jax.numpy as jnp
from flax import nnx

xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> str:
  """`model.dtype` -> "float32" | "bfloat16"; "auto" is bfloat16 on TPU and GPU (their matmul
  units' native input type; params, optimizer and loss stay float32), float32 on CPU."""
  if name == "auto":
    return "bfloat16" if jax.default_backend() in ("tpu", "gpu", "cuda", "rocm") else "float32"
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r}: use 'auto' or one of {sorted(DTYPES)}")
  return name


def patchify(x, patch: int):  # (B, H, W, C) -> (B, L, p*p*C), patches in row-major order
  return einops.rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(x, patch: int, grid: int):  # (B, L, p*p*C) -> (B, H, W, C)
  return einops.rearrange(x, "b (h w) (p q c) -> b (h p) (w q) c", h=grid, p=patch, q=patch)


def logical(init, *names):
  """Annotate an initializer with logical axis names (resolved later by `sharding.py`)."""
  return nnx.with_partitioning(init, names, eager_sharding=False)


class Dense(nnx.Linear):
  """`nnx.Linear` (the same parameters and products) that runs on its input's rows flattened to 2-D:
  (..., D_in) -> (..., D_out) as one (rows, D_in) x (D_in, D_out) product. What this changes is the
  weight gradient, a contraction over the rows: over the one leading axis of a 2-D operand XLA's
  CPU dot reads both operands as they lie, over (B, N) it first copies one of them transposed
  (BENCHMARKS.md, "HLO figures": with `heads_first` / `heads_merged`, 8.9% of UMD-S/4's bytes)."""

  def __call__(self, x):
    if x.ndim <= 2:
      return super().__call__(x)
    return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def dense(in_features, out_features, axes, *, dtype, rngs, kernel_init=xavier):
  return Dense(in_features, out_features, kernel_init=logical(kernel_init, *axes),
               bias_init=zeros, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def layer_norm(width, *, dtype, rngs, affine: bool = True, eps: float = 1e-6, fast_variance: bool = True):
  """LayerNorm; `affine=False`: no scale or bias (DiT's, whose adaLN supplies both).
  `fast_variance=False`: the variance as mean((x - mean)²), PyTorch's, not E[x²] - E[x]²."""
  return nnx.LayerNorm(width, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                       use_scale=affine, use_bias=affine, use_fast_variance=fast_variance)


def timestep_sinusoids(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """(B,) integer timestep indices -> (B, dim) [cos | sin] features, as in DiT/ADM."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


class EmbedMLP(nnx.Module):
  """Dense(2·width) -> SiLU -> Dense(width), the MLP after the timestep / label embedding."""

  def __init__(self, width, *, dtype, rngs):
    init = nnx.initializers.normal(0.02)
    self.fc1 = dense(width, 2 * width, ("embed", "mlp"), dtype=dtype, rngs=rngs, kernel_init=init)
    self.fc2 = dense(2 * width, width, ("mlp", "embed"), dtype=dtype, rngs=rngs, kernel_init=init)

  def __call__(self, x):
    return self.fc2(nnx.silu(self.fc1(x)))


class TimestepEmbedder(nnx.Module):
  def __init__(self, width, *, dtype, rngs):
    self.width = width
    self.mlp = EmbedMLP(width, dtype=dtype, rngs=rngs)

  def __call__(self, t):  # (B,) int -> (B, width)
    return self.mlp(timestep_sinusoids(t, self.width))


class LabelEmbedder(nnx.Module):
  """num_classes + 1 rows; the last row is the null class used for guidance and the clean step."""

  def __init__(self, num_classes, width, *, dtype, rngs):
    self.table = nnx.Embed(num_classes + 1, width, embedding_init=logical(nnx.initializers.normal(0.02), "vocab", "embed"),
                           dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.mlp = EmbedMLP(width, dtype=dtype, rngs=rngs)

  def __call__(self, labels):  # (B,) int -> (B, width)
    return self.mlp(self.table(labels))


ATTENTION = ("auto", "xla", "cudnn")


def attention_implementation(choice: str, dtype, head_dim: int) -> str:
  """`model.attention` -> the `jax.nn.dot_product_attention` implementation. 'auto' takes cuDNN's
  fused (flash) attention on NVIDIA GPUs in bfloat16/float16 -- it never materialises the
  (B, H, N, N) logits, which in XLA's version dominate step time and memory -- and XLA's elsewhere."""
  if choice not in ATTENTION:
    raise ValueError(f"model.attention={choice!r}: use one of {list(ATTENTION)}")
  fits = jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
  if choice == "cudnn" and not fits:
    raise ValueError(f"model.attention='cudnn' needs an NVIDIA GPU, model.dtype bfloat16/float16 and a head "
                     f"dim divisible by 8 (backend {jax.default_backend()}, head dim {head_dim}): use 'auto'")
  return choice if choice != "auto" else ("cudnn" if fits else "xla")


def heads_first(linear: Dense, x, parts: int, heads: int):
  """`linear(x)` for a kernel (D_in, parts·D) read as `parts` tensors of `heads` heads, in the layout
  attention contracts in: x (B, N, D_in) -> (parts, B, heads, N, D/heads). One 2-D product, then the
  head split as a transpose: an einsum straight into this layout ("bnd,dphk->pbhnk") makes the
  kernel's gradient a contraction over (B, N), which XLA:CPU copies transposed first (BENCHMARKS.md)."""
  b, n, _ = x.shape
  return linear(x).reshape(b, n, parts, heads, -1).transpose(2, 0, 3, 1, 4)


def heads_merged(linear: Dense, out):
  """`linear` applied to attention's output: (B, heads, N, d) -> (B, N, D_out), as linear(out as
  (B, N, heads·d)), one 2-D product after the heads are merged."""
  b, heads, n, head_dim = out.shape
  return linear(out.transpose(0, 2, 1, 3).reshape(b, n, heads * head_dim))


def attend(q, k, v):
  """Softmax attention in head-major layout, q (B, H, N, d), k and v (B, H, M, d) -> (B, H, N, d),
  with `jax.nn.dot_product_attention(implementation="xla")`'s numerics (float32 logits scaled by
  1/sqrt(d), float32 softmax, probabilities in v's dtype); q, k, v come from `heads_first`."""
  precision = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
               jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(jnp.dtype(q.dtype))
  logits = jnp.einsum("bhnd,bhmd->bhnm", q, k, precision=precision, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits * (1.0 / math.sqrt(q.shape[-1])), axis=-1).astype(k.dtype)
  return jnp.einsum("bhnm,bhmd->bhnd", probs, v)


class Attention(nnx.Module):
  def __init__(self, width, heads, *, dtype, rngs, attention: str = "auto"):
    self.heads = heads
    self.implementation = attention_implementation(attention, dtype, width // heads)
    self.qkv = dense(width, 3 * width, ("embed", "heads"), dtype=dtype, rngs=rngs)
    self.proj = dense(width, width, ("heads", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x):  # (B, N, D)
    if self.implementation == "xla":
      q, k, v = heads_first(self.qkv, x, 3, self.heads)
      return heads_merged(self.proj, attend(q, k, v))
    b, n, d = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads), 3, axis=2)
    out = _cudnn_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])  # (B, N, H, d/H), cuDNN's layout
    return self.proj(out.reshape(b, n, d))


def _cudnn_attention(q, k, v):
  """cuDNN flash attention. Its kernels want sequence lengths divisible by 8 (ours are registers +
  kept tokens, or 1 + patches): pad to that and mask the padded keys out through the lengths."""
  b, n = q.shape[:2]
  pad = -n % 8
  if not pad:
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
  lengths = jnp.full((b,), n, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                     implementation="cudnn")
  return out[:, :n]


class Mlp(nnx.Module):
  def __init__(self, width, *, dtype, rngs):
    self.fc1 = dense(width, 4 * width, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.fc2 = dense(4 * width, width, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


class Block(nnx.Module):
  """Pre-LN transformer block. adaLN-Zero when `adaln`, else the condition is an in-context token."""

  def __init__(self, width, heads, *, adaln: bool, dtype, rngs, attention: str = "auto", affine_norms: bool = True,
               mlp_norm_eps: float = 1e-6, fast_variance: bool = True):
    self.adaln = adaln
    norm = dict(dtype=dtype, rngs=rngs, affine=affine_norms, fast_variance=fast_variance)
    self.norm1 = layer_norm(width, **norm)
    self.attn = Attention(width, heads, dtype=dtype, rngs=rngs, attention=attention)
    self.norm2 = layer_norm(width, eps=mlp_norm_eps, **norm)
    self.mlp = Mlp(width, dtype=dtype, rngs=rngs)
    if adaln:
      self.modulation = dense(width, 6 * width, ("embed", "mlp"), dtype=dtype, rngs=rngs, kernel_init=zeros)

  def __call__(self, x, cond, drop=None):
    """x (B, N, D); cond (B, D), or None for an unconditioned block; `drop` (2, B): per-sample
    scales of the attention and MLP branches (stochastic depth: 0, or 1 / keep probability)."""
    keep = (lambda i, y: y) if drop is None else (lambda i, y: y * drop[i][:, None, None].astype(y.dtype))
    if cond is None:
      x = x + keep(0, self.attn(self.norm1(x)))
      return x + keep(1, self.mlp(self.norm2(x)))
    if self.adaln:
      shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.modulation(cond), 6, axis=-1)
      x = x + keep(0, gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1)))
      return x + keep(1, gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2)))
    x = jnp.concatenate([cond[:, None].astype(x.dtype), x], axis=1)
    x = x + keep(0, self.attn(self.norm1(x)))
    x = x + keep(1, self.mlp(self.norm2(x)))
    return x[:, 1:]


def drop_path_scales(key, rate: float, depth: int, batch: int) -> jax.Array:
  """(depth, 2, B) stochastic-depth scales for `Block`'s two branches (timm's DropPath, as MAE
  fine-tunes): block i drops each branch of each sample independently with probability
  rate·i/(depth-1) (0 for the first block, `rate` for the last) and scales kept ones by 1/keep."""
  rates = rate * jnp.arange(depth, dtype=jnp.float32) / max(depth - 1, 1)
  keep = 1.0 - rates[:, None, None]
  kept = jax.random.bernoulli(key, keep, (depth, 2, batch))
  return kept.astype(jnp.float32) / keep


# model.remat: what a block keeps for its backward pass; the rest is recomputed there (BENCHMARKS.md).
REMAT_POLICIES = {
    "none": None,                                                # keep everything
    "full": jax.checkpoint_policies.nothing_saveable,            # keep the block's input (the official UMD code's)
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep the dense layers' outputs
    "matmuls": jax.checkpoint_policies.dots_saveable,            # and attention's two batched products:
}                                                                # only elementwise work (norms, softmax, GELU) is redone


class Stack(nnx.Module):
  """`depth` blocks, either stacked and run with `nnx.scan` (fast compiles at depth 24) or unrolled.
  `make(rngs)` builds one block (default: `Block`); a block is called as block(x, cond) or, with a
  per-block `context`, block(x, cond, context)."""

  def __init__(self, depth, width=None, heads=None, *, adaln=True, dtype=None, scan, remat, rngs,
               attention="auto", make=None):
    if remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat={remat!r}: use one of {sorted(REMAT_POLICIES)}")
    self.scan, self.remat, self.depth = scan, remat, depth
    if make is None:
      make = lambda r: Block(width, heads, adaln=adaln, dtype=dtype, rngs=r, attention=attention)
    if scan:
      @nnx.split_rngs(splits=depth)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def create(r):
        return make(r)
      self.blocks = create(rngs)
    else:
      self.blocks = nnx.List([make(rngs) for _ in range(depth)])

  def __call__(self, x, cond, pool_from: int | None = None, context=None, collect: bool = False, upto=None,
               drop=None):
    """Apply every block (or, with `upto`, the first `upto`). With `pool_from`, also return each
    block's output mean-pooled over tokens[pool_from:] as a (depth, B, D) array (features for
    DDAE-style probing); with `collect`, every block's whole output (depth, B, N, D). `context`
    (depth, ...): block i's own input; `drop` (depth, 2, B): block i's stochastic-depth scales."""
    if drop is not None:
      if context is not None:
        raise ValueError("a Stack takes either a per-block context or stochastic depth, not both")
      context = drop
    def apply(block, h, c, ctx):
      if ctx is None:
        h = block(h, c)
      else:
        h = block(h, c, drop=ctx) if drop is not None else block(h, c, ctx)
      if collect:
        return h, h
      return h, (None if pool_from is None else h[:, pool_from:].mean(axis=1).astype(jnp.float32))
    if self.remat != "none":
      apply = nnx.remat(apply, policy=REMAT_POLICIES[self.remat])
    blocks = self.blocks
    if self.scan:
      if upto is not None:  # the first `upto` of the stacked blocks
        graphdef, state = nnx.split(blocks)
        blocks = nnx.merge(graphdef, jax.tree.map(lambda a: a[:upto], state))
      @nnx.scan(in_axes=(0, nnx.Carry, None, None if context is None else 0), out_axes=(nnx.Carry, 0))
      def body(block, h, c, ctx):
        return apply(block, h, c, ctx)
      x, out = body(blocks, x, cond, context)
    else:
      out = []
      for i, block in enumerate(blocks if upto is None else list(blocks)[:upto]):
        x, o = apply(block, x, cond, None if context is None else context[i])
        out.append(o)
      out = None if pool_from is None and not collect else jnp.stack(out)
    return x if pool_from is None and not collect else (x, out)
