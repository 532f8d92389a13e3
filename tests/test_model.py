"""The ViT auto-encoder of METHOD.md §3: shapes, parameter count, masking/restore, conditioning."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from umd_jax import corruption, geometry
from umd_jax.models import umd

TINY = dict(image_size=8, channels=1, patch=2, width=32, encoder_depth=2, decoder_depth=1, heads=2,
            dtype="float32")  # float32 on every backend ("auto" is bf16 on GPU): the tolerances are float32's


def make(**kw):
  return umd.UMD(**{**TINY, **kw}, rngs=nnx.Rngs(0))


def randomize(model, seed=1):
  """Give every parameter (zero-initialised adaLN ones included) random values."""
  graphdef, params = nnx.split(model, nnx.Param)
  leaves, tree = jax.tree.flatten(nnx.to_pure_dict(params))
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  new = [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, new))


@nnx.jit
def run(model, x, t, labels=None, mask=None):
  """Jitted forward (eager op-by-op dispatch is slow on 8 fake CPU devices)."""
  return model(x, t, labels, mask)


def images(b=3, size=8, c=1, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (b, size, size, c), minval=-1, maxval=1)


def test_variants_match_spec():
  assert umd.parse_variant("S/4") == dict(width=384, encoder_depth=12, decoder_depth=4, heads=6, patch=4)
  assert umd.parse_variant("B/4") == dict(width=768, encoder_depth=12, decoder_depth=4, heads=12, patch=4)
  assert umd.parse_variant("L/2") == dict(width=1024, encoder_depth=24, decoder_depth=8, heads=16, patch=2)
  with pytest.raises(ValueError, match="NAME/PATCH"):
    umd.parse_variant("B4")


def expected_param_count(w, enc, dec, p, c, num_patches, registers=4, adaln=True, num_classes=0):
  block = (w * 3 * w + 3 * w) + (w * w + w) + (w * 4 * w + 4 * w) + (4 * w * w + w) + 4 * w
  block += (w * 6 * w + 6 * w) if adaln else 0
  embed_mlp = (w * 2 * w + 2 * w) + (2 * w * w + w)
  total = (p * p * c * w + w) + 2 * num_patches * w + registers * w + w  # patch, 2 pos, registers, mask
  total += (enc + dec) * block + 2 * (2 * w)                              # blocks, two final norms
  total += (w * 2 * w + 2 * w) if adaln else 0                            # final modulation
  total += w * p * p * 2 * c + p * p * 2 * c                              # head
  total += embed_mlp + ((num_classes + 1) * w + embed_mlp if num_classes else 0)
  return total


@pytest.mark.parametrize("conditioning,num_classes", [("adaln", 0), ("in_context", 0), ("adaln", 10)])
def test_parameter_count_matches_the_architecture(conditioning, num_classes):
  model = make(conditioning=conditioning, num_classes=num_classes)
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == expected_param_count(32, 2, 1, 2, 1, 16, adaln=conditioning == "adaln", num_classes=num_classes)


def test_umd_b4_parameter_count():
  model = nnx.eval_shape(lambda: umd.UMD(image_size=64, channels=3, rngs=nnx.Rngs(0), **umd.parse_variant("B/4")))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == expected_param_count(768, 12, 4, 4, 3, 256)


def test_outputs_shapes_and_zero_init_gates():
  model = make()
  out = run(model, images(), jnp.array([0, 5, 1000]))
  assert out["x0"].shape == out["eps"].shape == (3, 8, 8, 1) and out["rep"].shape == (3, 32)
  assert out["x0"].dtype == jnp.float32
  # adaLN-Zero: at init every block and the final modulation are identity in the condition,
  # so the output cannot depend on the timestep yet.
  np.testing.assert_allclose(out["x0"], run(model, images(), jnp.array([7, 7, 7]))["x0"], atol=1e-6)


@pytest.mark.parametrize("conditioning", ["adaln", "in_context"])
def test_timestep_conditions_the_output(conditioning):
  model = randomize(make(conditioning=conditioning))
  x = images()
  a, b = run(model, x, jnp.zeros((3,), jnp.int32)), run(model, x, jnp.full((3,), 500))
  assert float(jnp.abs(a["rep"] - b["rep"]).max()) > 1e-3
  assert float(jnp.abs(a["x0"] - b["x0"]).max()) > 1e-3


def test_keeping_every_token_in_shuffled_order_equals_no_masking():
  """Position embeddings are added before the shuffle and attention is permutation-equivariant,
  so dropping nothing (in any order) and restoring must give exactly the unmasked output."""
  model = randomize(make())
  x, t = images(), jnp.array([0, 3, 900])
  ids = jnp.argsort(jax.random.uniform(jax.random.PRNGKey(5), (3, 16)), axis=1)
  shuffled = run(model, x, t, mask=corruption.Mask(ids, jnp.argsort(ids, axis=1), jnp.zeros((3, 16))))
  plain = run(model, x, t)
  np.testing.assert_allclose(shuffled["x0"], plain["x0"], atol=1e-5)
  np.testing.assert_allclose(shuffled["rep"], plain["rep"], atol=1e-5)


def test_masked_patches_do_not_reach_the_encoder():
  model = randomize(make())
  m = corruption.random_mask(jax.random.PRNGKey(2), 3, 16, 0.75)
  x = images()
  noise = 5.0 * geometry.Grid(2, 4, 4).pixel_mask(m.mask) * images(seed=9)  # change only the dropped patches
  a = run(model, x, jnp.zeros((3,), jnp.int32), None, m)
  b = run(model, x + noise, jnp.zeros((3,), jnp.int32), None, m)
  np.testing.assert_allclose(a["x0"], b["x0"], atol=1e-6)
  np.testing.assert_allclose(a["rep"], b["rep"], atol=1e-6)


@pytest.mark.parametrize("remat", ["none", "full", "dots", "matmuls"])
def test_scanned_layers_and_remat_equal_the_unrolled_model(remat):
  unrolled = randomize(make(scan_layers=False))
  scanned = make(scan_layers=True, remat=remat)
  pure = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
  stack = lambda blocks: jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in sorted(blocks)])
  pure["encoder"]["blocks"] = stack(pure["encoder"]["blocks"])
  pure["decoder"]["blocks"] = stack(pure["decoder"]["blocks"])
  graphdef, _ = nnx.split(scanned, nnx.Param)
  scanned = nnx.merge(graphdef, pure)
  x, t = images(), jnp.array([0, 3, 900])
  np.testing.assert_allclose(run(scanned, x, t)["x0"], run(unrolled, x, t)["x0"], atol=1e-5)
  grad = lambda m: jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(nnx.split(m, nnx.Param)[0], p)(x, t)["eps"] ** 2)))(
      nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  np.testing.assert_allclose(grad(scanned)["patch_embed"]["kernel"], grad(unrolled)["patch_embed"]["kernel"],
                             rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model = make(dtype="bfloat16")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  out = run(model, images(), jnp.zeros((3,), jnp.int32))
  assert out["x0"].dtype == jnp.float32 and bool(jnp.isfinite(out["x0"]).all())
  # The residual stream runs in bf16 (no silent promotion to float32 by the position tables) ...
  visible, _ = nnx.jit(lambda m, x: m.encode(x, m.condition(jnp.zeros((3,), jnp.int32))))(model, images())
  assert visible.dtype == jnp.bfloat16
  # ... and computes the float32 model's function to bf16 accuracy.
  t = jnp.array([0, 300, 900])
  lo, hi = run(randomize(make(dtype="bfloat16")), images(), t), run(randomize(make()), images(), t)
  for key in ("x0", "eps", "rep"):
    assert np.linalg.norm(lo[key] - hi[key]) / np.linalg.norm(hi[key]) < 3e-2, key


def test_labels_use_the_null_row_by_default():
  model = randomize(make(num_classes=10))
  x, t = images(), jnp.array([1, 2, 3])
  np.testing.assert_allclose(run(model, x, t)["x0"], run(model, x, t, jnp.full((3,), 10))["x0"], atol=1e-6)
  assert float(jnp.abs(run(model, x, t, jnp.array([0, 1, 2]))["x0"] - run(model, x, t)["x0"]).max()) > 1e-3


def test_image_size_not_divisible_by_patch_is_a_clear_error():
  with pytest.raises(ValueError, match="not divisible by patch size 3"):
    make(patch=3)


def test_attention_choice_is_validated_and_auto_is_xla_off_gpu():
  from umd_jax.models import layers
  assert layers.attention_implementation("auto", jnp.bfloat16, 64) == (
      "cudnn" if jax.default_backend() == "gpu" else "xla")
  assert layers.attention_implementation("auto", jnp.float32, 64) == "xla"
  with pytest.raises(ValueError, match="model.attention='flash'"):
    layers.attention_implementation("flash", jnp.float32, 64)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      layers.attention_implementation("cudnn", jnp.bfloat16, 64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_major_attention_is_the_dense_layers_around_jax_dot_product_attention(dtype):
  """XLA's path (layers.heads_first / attend / heads_merged) against what it replaced: the QKV
  dense layer, a (B, N, 3, H, d) split, `jax.nn.dot_product_attention` and the output dense layer;
  values and every gradient. DiffMAE's cross-attention (queries and keys of other lengths) too."""
  from umd_jax.models import diffmae, layers
  b, n, m, width, heads = 2, 10, 7, 32, 4
  attn = layers.Attention(width, heads, dtype=dtype, rngs=nnx.Rngs(0), attention="xla")
  cross = diffmae.CrossAttention(width, 24, heads, dtype=dtype, rngs=nnx.Rngs(1))
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x, g = jax.random.normal(keys[0], (b, n, width)), jax.random.normal(keys[1], (b, n, width))
  context = jax.random.normal(keys[2], (b, m, 24))

  def reference_self(module, x):
    q, k, v = jnp.split(module.qkv(x).reshape(b, n, 3, heads, width // heads), 3, axis=2)
    out = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], implementation="xla")
    return module.proj(out.reshape(b, n, width))

  def reference_cross(module, x, context):
    q = module.q(x).reshape(b, n, heads, width // heads)
    k, v = jnp.split(module.kv(context).reshape(b, m, 2, heads, width // heads), 2, axis=2)
    out = jax.nn.dot_product_attention(q, k[:, :, 0], v[:, :, 0], implementation="xla")
    return module.proj(out.reshape(b, n, width))

  tol = 1e-5 if dtype == jnp.float32 else 2e-2  # float32 sums reordered; bfloat16's 8-bit mantissa
  def ours(module, *args):
    return module(*args)

  for module, reference, args in ((attn, reference_self, (x,)), (cross, reference_cross, (x, context))):
    def loss(fn, module, *a):
      return jnp.sum(fn(module, *a).astype(jnp.float32) * g)
    got = nnx.grad(lambda mod, *a: loss(ours, mod, *a), argnums=(0, 1))(module, *args)
    want = nnx.grad(lambda mod, *a: loss(reference, mod, *a), argnums=(0, 1))(module, *args)
    np.testing.assert_allclose(np.asarray(ours(module, *args), np.float32),
                               np.asarray(reference(module, *args), np.float32), rtol=tol, atol=tol)
    for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      a, w = np.asarray(a, np.float32), np.asarray(w, np.float32)
      assert np.linalg.norm(a - w) <= tol * np.linalg.norm(w), (module, a.shape)


def test_dense_runs_on_rows_so_its_weight_gradient_needs_no_transposed_copy():
  """layers.Dense is nnx.Linear (same parameters, values and gradients) on (B, N, D) flattened to
  (B·N, D): its weight gradient contracts one leading axis, which XLA:CPU's dot reads as it lies.
  nnx.Linear's own contraction over (B, N) makes XLA copy an operand transposed to (features,
  rows) first: the copies BENCHMARKS.md ("HLO figures") counted, one per dense layer."""
  import re
  from umd_jax.models import layers
  b, n, d_in, d_out = 6, 20, 48, 80
  rows = b * n
  dense = layers.dense(d_in, d_out, ("embed", "mlp"), dtype=jnp.float32, rngs=nnx.Rngs(0))
  linear = nnx.Linear(d_in, d_out, rngs=nnx.Rngs(1))
  nnx.update(linear, nnx.state(dense))
  x = jax.random.normal(jax.random.PRNGKey(0), (b, n, d_in))
  transposed = {f"f32[{d_out},{rows}]", f"f32[{d_in},{rows}]"}
  results = {}
  for name, module in (("dense", dense), ("linear", linear)):
    graphdef, state = nnx.split(module)
    fn = lambda state, x: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))
    grad = jax.jit(jax.grad(fn, argnums=(0, 1)))
    results[name] = (fn(state, x), grad(state, x))
    hlo = grad.lower(state, x).compile().as_text()
    shapes = set(re.findall(r"= (f32\[[\d,]+\])", hlo[hlo.index("ENTRY"):]))
    if jax.default_backend() == "cpu":  # the layout question is XLA:CPU's
      assert bool(shapes & transposed) == (name == "linear"), (name, sorted(shapes))
  np.testing.assert_allclose(results["dense"][0], results["linear"][0], rtol=1e-6)
  for a, w in zip(jax.tree.leaves(results["dense"][1]), jax.tree.leaves(results["linear"][1])):
    np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU "
                    "(run on one with JAX_PLATFORMS=cuda,cpu)")
@pytest.mark.parametrize("n", [64, 68, 257])
def test_cudnn_attention_matches_xla_with_padded_lengths(n):
  from umd_jax.models import layers
  keys = jax.random.split(jax.random.PRNGKey(n), 4)
  q, k, v, g = (jax.random.normal(key, (4, n, 6, 64), jnp.bfloat16) for key in keys)

  def loss(impl, q, k, v):
    out = (layers._cudnn_attention(q, k, v) if impl == "cudnn"
           else jax.nn.dot_product_attention(q, k, v, implementation="xla"))
    return jnp.sum(out.astype(jnp.float32) * g), out

  for a, b in zip(jax.grad(lambda *t: loss("cudnn", *t), argnums=(0, 1, 2), has_aux=True)(q, k, v),
                  jax.grad(lambda *t: loss("xla", *t), argnums=(0, 1, 2), has_aux=True)(q, k, v)):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
      assert np.linalg.norm(x - y) / np.linalg.norm(y) < 2e-2
