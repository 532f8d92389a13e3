"""DiffMAE (umd_jax/models/diffmae.py, umd_jax/methods/diffmae.py): the model's structure, the
loss against a hand computation, what the encoder may see, the top-down links, sharded ==
unsharded, inpainting, FLOPs against XLA, and the keys each method refuses."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common, demo, diffmae_b, umd_b
from conftest import tiny_config
from umd_jax import (checks, corruption, diffusion, geometry, generate, inpainting, methods, probe, sharding, summary, train,
                     train_step)
from umd_jax.methods import diffmae as method_lib
from umd_jax.models import diffmae as model_lib

SCHEDULE = diffusion.make_schedule("linear", 1000, 0.8)
TINY = dict(image_size=8, channels=1, patch=2, width=32, encoder_depth=4, heads=2, decoder_width=16,
            decoder_depth=2, decoder_heads=2, scan_layers=False)


def _model(**kw):
  return model_lib.DiffMAE(**{**TINY, **kw}, rngs=nnx.Rngs(0))


def _perturb(model, seed=1):
  """Every parameter moved off its initialisation (zero-initialised gates included)."""
  graphdef, params = nnx.split(model)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  leaves = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def test_top_down_pairs_mirror_equal_depths_and_spread_over_a_deeper_encoder():
  np.testing.assert_array_equal(model_lib.top_down_pairs(4, 4), [3, 2, 1, 0])
  np.testing.assert_array_equal(model_lib.top_down_pairs(24, 8), [23, 20, 17, 14, 11, 8, 5, 2])
  np.testing.assert_array_equal(model_lib.top_down_pairs(12, 8), [11, 10, 8, 7, 5, 4, 2, 1])
  np.testing.assert_array_equal(model_lib.top_down_pairs(2, 4), [1, 1, 0, 0])  # a deeper decoder reuses blocks
  model = _model(encoder_depth=4, decoder_depth=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  everything = model.encode(x, collect=True)["blocks"]
  np.testing.assert_array_equal(np.asarray(model.context(x)["blocks"]), np.asarray(everything[jnp.array([3, 1])]))


def test_decoder_kinds_have_the_papers_attention():
  def names(model):
    return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  cross_self, cross, joint = (names(_model(decoder=k)) for k in ("cross_self", "cross", "joint"))
  assert any("decoder/blocks/0/attn/" in n for n in cross_self) and any("/cross/" in n for n in cross_self)
  assert not any("decoder/blocks/0/attn/" in n for n in cross) and any("/cross/" in n for n in cross)
  assert any("decoder/blocks/0/attn/" in n for n in joint) and not any("/cross/" in n for n in joint)
  assert not any(n.startswith("encoder/") and "modulation" in n for n in cross_self)  # the encoder has no t


def test_sincos_positions_are_maes_table():
  table = geometry.sincos_2d(8, 2)  # 4 positions, row then column, each [sin | cos] of 2 frequencies
  pos = np.array([0, 0, 1, 1.0]), np.array([0, 1, 0, 1.0])
  freqs = 1 / 10000 ** (np.arange(2) / 2)
  expect = np.concatenate([np.sin(np.outer(pos[0], freqs)), np.cos(np.outer(pos[0], freqs)),
                           np.sin(np.outer(pos[1], freqs)), np.cos(np.outer(pos[1], freqs))], axis=1)
  np.testing.assert_allclose(table, expect, rtol=1e-6)


@pytest.mark.parametrize("decoder,links", [("cross_self", "top_down"), ("cross", "last"), ("joint", "top_down")])
def test_the_encoder_sees_only_clean_visible_patches_and_only_the_decoder_sees_t(decoder, links):
  model = _perturb(_model(decoder=decoder, links=links))
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 1))
  mask = corruption.random_mask(jax.random.PRNGKey(1), 3, 16, 0.75)
  xt = jax.random.normal(jax.random.PRNGKey(2), (3, 12, 4))
  t = jnp.array([5, 500, 999])
  out = model(x, xt, t, mask)
  assert out.shape == (3, 12, 4) and out.dtype == jnp.float32
  # the masked patches' clean pixels reach nothing: replacing them changes no output
  hidden = geometry.Grid(2, 4, 4).pixel_mask(mask.mask)
  np.testing.assert_array_equal(np.asarray(model(x + 7.0 * hidden, xt, t, mask)), np.asarray(out))
  # the visible patches do reach the output
  assert float(jnp.abs(model(x + 0.5 * (1 - hidden), xt, t, mask) - out).max()) > 1e-4
  # t reaches the prediction (decoder) but not what the encoder gives the decoder
  assert float(jnp.abs(model(x, xt, t[::-1], mask) - out).max()) > 1e-4
  # one encoder pass, computed without any t, reproduces the full forward at every t
  context = model.context(x, mask.keep_ids)
  for tt in (t, t[::-1], jnp.array([1, 1, 1])):
    np.testing.assert_allclose(np.asarray(model.decode(context, xt, mask.masked_ids, mask.keep_ids, tt)),
                               np.asarray(model(x, xt, tt, mask)), rtol=1e-6, atol=1e-6)


def test_loss_equals_the_hand_computation_and_visible_patches_are_never_noised():
  calls = []

  class Recorder:  # predicts 0.25 everywhere, records what the loss gave it
    def __call__(self, x, xt, t_index, mask):
      calls.append((x, xt, t_index, mask))
      return jnp.full(xt.shape, 0.25)

  x0 = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 1), minval=-1, maxval=1)
  for target in ("x0", "eps"):
    calls.clear()
    loss, metrics = method_lib.diffmae_loss(Recorder(), SCHEDULE, x0, jax.random.PRNGKey(3), grid=geometry.Grid(2, 4, 4),
                                            mask_ratio=0.75, target=target, num_buckets=4)
    x, xt, t_index, mask = calls[0]
    np.testing.assert_array_equal(np.asarray(x), np.asarray(x0))  # the encoder's image: clean, untouched
    assert xt.shape == (4, 12, 4) and mask.keep_ids.shape == (4, 4)  # only the 12 masked patches are noised
    patches = np.asarray(x0).reshape(4, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(4, 16, 4)
    clean = np.take_along_axis(patches, np.asarray(mask.masked_ids)[..., None], axis=1)
    t = np.asarray(t_index) - 1  # told t + 1
    ab = np.asarray(SCHEDULE.alphas_cumprod)[t][:, None, None]
    eps = (np.asarray(xt) - np.sqrt(ab) * clean) / np.sqrt(1 - ab)
    assert abs(eps.std() - 1) < 0.3  # xt is the masked patches noised to t
    truth = clean if target == "x0" else eps
    np.testing.assert_allclose(float(loss), np.mean((0.25 - truth) ** 2), rtol=1e-4)
    per_image = ((0.25 - truth) ** 2).mean(axis=(1, 2))
    buckets = t * 4 // 1000
    np.testing.assert_allclose(np.asarray(metrics["bucket_sum"]), [per_image[buckets == b].sum() for b in range(4)],
                               rtol=1e-4, atol=1e-6)
    assert np.asarray(mask.masked_ids).min() >= 0 and np.asarray(mask.masked_ids).max() < 16  # patch indices
    for row in range(4):  # kept and masked ids partition the patches
      assert sorted(np.concatenate([np.asarray(mask.keep_ids[row]), np.asarray(mask.masked_ids[row])])) == list(range(16))


def test_noise_exponent_adds_noise_and_one_is_the_plain_schedule():
  plain, rho = diffusion.make_schedule("linear", 1000), SCHEDULE
  np.testing.assert_allclose(np.asarray(diffusion.make_schedule("linear", 1000, 1.0).alphas_cumprod),
                             np.asarray(plain.alphas_cumprod))
  abar = np.asarray(plain.alphas_cumprod, np.float64)
  np.testing.assert_allclose(np.asarray(rho.alphas_cumprod), 1 - (1 - abar) ** 0.8, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(rho.alphas_cumprod) < abar)  # ρ < 1: more noise at every t
  assert np.all(np.asarray(rho.betas) > 0) and np.all(np.asarray(rho.betas) < 1)


def _batch(config, mesh, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (config.batch_size, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 10, config.batch_size).astype(np.int32)
  bs = sharding.batch_sharding(mesh)
  return {"image": jax.device_put(images, bs), "label": jax.device_put(labels, bs)}


def test_sharded_step_equals_single_device_step(one_device):
  results = []
  for devices, overrides in ((one_device, {}), (jax.devices(), {"mesh.data": 4, "mesh.fsdp": 2})):
    config = tiny_config("diffmae", **overrides)
    mesh = sharding.make_mesh(config.mesh, devices)
    run = train_step.build(config, mesh)
    state = run.state
    for i in range(2):
      state, metrics = run.step(state, _batch(config, mesh, i))
    results.append((jax.device_get(state.params), float(metrics["loss"])))
  (single, loss1), (sharded, loss8) = results
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_inpainting_copies_known_pixels_and_fills_only_masked_patches():
  config = tiny_config("diffmae", **{"sample.sampler": "ddim", "sample.steps": 4})
  model = _perturb(methods.get(config).build(config, nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 1), minval=-1, maxval=1)
  known = np.ones((4, 8, 8, 1), np.float32)
  known[:, 2:6, 2:6] = 0  # the centre: 4 patches of 2x2
  assert inpainting.masked_patch_count(config, known) == 4
  fill = inpainting.make_inpainter(config, graphdef, 4)
  out = fill(params, x, jnp.asarray(known), jnp.zeros(4, jnp.int32), jax.random.PRNGKey(2))
  np.testing.assert_array_equal(np.asarray(out * known), np.asarray(x * known))
  assert float(jnp.abs(out - x).max()) > 0
  again = fill(params, x, jnp.asarray(known), jnp.zeros(4, jnp.int32), jax.random.PRNGKey(2))
  np.testing.assert_array_equal(np.asarray(again), np.asarray(out))  # deterministic for a key
  # a mask that cuts a patch: the whole patch is denoised, the known pixels in it still copied
  known[:, 1, 1] = 0
  assert inpainting.masked_patch_count(config, known) == 5


def test_analytic_flops_match_xla_cost_analysis():
  """A wide enough model that the matmuls dominate: the analytic count within 10% of XLA's."""
  for decoder in ("cross_self", "cross", "joint"):
    config = tiny_config("diffmae", **{"model.variant": "Ti/4", "data.image_size": 32, "diffmae.decoder": decoder,
                                       "diffmae.decoder_width": 128, "diffmae.decoder_heads": 4,
                                       "data.channels": 3})
    method = methods.get(config)
    model = method.build(config, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    loss = method.loss_fn(config, diffusion.from_config(config))
    x = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
    forward = jax.jit(lambda p, x: loss(nnx.merge(graphdef, p), x, None, jax.random.PRNGKey(0))[0])
    cost = forward.lower(params, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    analytic = methods.get(config).train_flops_per_image(config) / 3 * 4
    assert 0.9 < analytic / cost["flops"] < 1.1, (decoder, analytic, cost["flops"])


@pytest.mark.parametrize("make,overrides,message", [
    (lambda: tiny_config("umd"), {"diffmae.decoder": "cross"}, r"diffmae.decoder='cross' is read only by method diffmae; this config's method is 'umd'"),
    (lambda: tiny_config("dit"), {"diffmae.mask_ratio": 0.9}, r"diffmae.mask_ratio=0.9 is read only by method diffmae"),
    (lambda: tiny_config("diffmae"), {"corruption.clean_fraction": 0.5},
     r"corruption.clean_fraction=0.5 is read only by method umd / dit / maskdit / mae"),
    (lambda: tiny_config("diffmae"), {"model.num_classes": 10}, r"model.num_classes=10 must be 0: DiffMAE is self-supervised"),
    (lambda: tiny_config("diffmae"), {"diffmae.decoder": "self"}, r"diffmae.decoder='self': use one of"),
    (lambda: tiny_config("diffmae"), {"diffmae.mask_ratio": 0.99}, r"diffmae.mask_ratio=0.99 must keep at least one"),
    (lambda: tiny_config("diffmae"), {"diffmae.decoder_width": 30}, r"diffmae.decoder_width=30 must be divisible"),
    (lambda: tiny_config("diffmae"), {"diffusion.noise_exponent": 0.0}, r"diffusion.noise_exponent=0.0 must be > 0"),
])
def test_keys_of_the_other_method_are_one_clear_error(make, overrides, message):
  config = make()
  for k, v in overrides.items():
    *parents, leaf = k.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = v
  with pytest.raises(checks.ConfigError, match=message):
    checks.check(config, "pretrain")


def test_modes_diffmae_does_not_have_are_refused():
  with pytest.raises(checks.ConfigError, match="--mode='finetune': method 'diffmae' does not sample \\(it is no Sampler"):
    checks.check(tiny_config("diffmae"), "finetune")
  with pytest.raises(checks.ConfigError, match="sample.num_samples=10: method 'diffmae' does not sample"):
    checks.check(tiny_config("diffmae", **{"sample.num_samples": 10}), "generate")
  with pytest.raises(checks.ConfigError, match="sample.num_samples=0: with sample.inpaint='' leaves nothing to generate"):
    checks.check(tiny_config("diffmae", **{"sample.inpaint": ""}), "generate")
  checks.check(tiny_config("diffmae"), "generate")
  checks.check(tiny_config("diffmae"), "probe")


def test_configs_follow_the_paper_and_the_comparable_setting():
  paper, comparable, umd = diffmae_b.get_config(), diffmae_b.get_config("umd64"), umd_b.get_config()
  assert paper.method == "diffmae" and paper.model.variant == "B/16" and paper.data.image_size == 224
  d = paper.diffmae
  assert (d.mask_ratio, d.decoder, d.links, d.target) == (0.75, "cross_self", "top_down", "x0")
  assert (d.decoder_width, d.decoder_depth, d.decoder_heads) == (512, 8, 16)
  assert (paper.diffusion.schedule, paper.diffusion.noise_exponent, paper.diffusion.num_timesteps) == ("linear", 0.8, 1000)
  assert paper.sample.sampler == "ddpm" and paper.batch_size == 4096
  for key in ("batch_size", "total_steps", "data.image_size", "model.variant", "optim.base_lr", "optim.warmup_fraction",
              "data.crop_area_min"):
    node_c, node_u = comparable, umd
    for part in key.split("."):
      node_c, node_u = node_c[part], node_u[part]
    assert node_c == node_u, key
  for config in (paper, comparable, demo.get_config("diffmae")):
    for mode in ("pretrain", "probe", "generate", "summary"):
      checks.check(config, mode)
  assert methods.REGISTRY.keys() >= {"umd", "dit", "maskdit", "mae", "diffmae"}


def test_pretrain_probe_and_inpaint_end_to_end(tmp_path, one_device):
  """The loop (preview grid, few-shot probe), --mode=probe with the sweep and --mode=generate's
  inpainting, each from the previous one's checkpoint, through the method interface."""
  config = tiny_config("diffmae", **{"total_steps": 4, "image_every": 4, "probe_every": 4, "probe.max_train_images": 200,
                                     "probe.fewshot_shots": (1, 5), "probe.sweep": True, "probe.sweep_ts": (-1, 100),
                                     "probe.linear_epochs": 2, "probe.linear_warmup_epochs": 1,
                                     "probe.linear_batch_size": 64, "probe.linear_augment": False,
                                     "probe.train_split": "train", "probe.eval_split": "test",
                                     "sample.sampler": "ddim", "sample.steps": 5, "sample.inpaint_images": 24,
                                     "sample.batch_size": 8})
  summary = train.pretrain(config, tmp_path, devices=one_device)
  assert summary["step"] == 4 and np.isfinite(summary["last_loss"])
  assert (tmp_path / "images" / "reconstruction_00000004.png").exists()
  results = probe.run(config, tmp_path, devices=one_device)
  assert set(results["fewshot"]) == {1, 5} and 0 <= results["linear"]["top1"] <= 1
  assert results["sweep"]["blocks"] == [-1, 0, 1]  # rep and the 2 encoder blocks of Mu
  assert np.asarray(results["sweep"]["accuracy"]).shape == (3, 2)
  result = generate.run(config, tmp_path, devices=one_device)
  saved = json.loads((tmp_path / "samples" / "result.json").read_text())
  assert saved["method"] == "diffmae" and saved["step"] == 4 and "npz" not in saved  # inpainting only
  scores = saved["inpaint"]
  assert scores["inpainter"] == "masked-patch diffusion" and scores["images"] == 24 and scores["steps"] == 5
  assert 0 < scores["psnr"] < 60 and -1 < scores["ssim"] <= 1 and result["inpaint"] == scores
  assert (tmp_path / "samples" / "inpaint.png").exists()
  _a_checkpoint_is_read_only_with_its_meaning(config, tmp_path, one_device)


def _a_checkpoint_is_read_only_with_its_meaning(config, workdir, one_device):
  """The settings that give these weights their meaning (METHOD.md §12) are the writer's: probe,
  generate and classify's init_from refuse another target, links or noise exponent by name before
  writing anything; a resume with another decoder width names the key."""
  from umd_jax import checkpoint, classify
  published = sorted(p.name for p in (workdir / "samples").iterdir())
  for key, value in (("diffmae.target", "eps"), ("diffmae.links", "last"), ("diffusion.noise_exponent", 1.0)):
    other = tiny_config("diffmae", **{**{k: v for k, v in _flat(config).items() if k != key}, key: value})
    saved = _flat(config)[key]
    for run in (probe.run, generate.run):
      with pytest.raises(checkpoint.CheckpointError, match=rf"written with {key}={saved!r}, read here with "
                         rf"{key}={value!r} .*run with --config.{key}={saved}$"):
        run(other, workdir, devices=one_device)
    cls = tiny_config("diffmae", **{**_flat(other), "init_from": str(workdir), "classify.epochs": 1,
                                         "classify.warmup_epochs": 0})
    with pytest.raises(checkpoint.CheckpointError, match=rf"read here with {key}={value!r}"):
      classify.run(cls, workdir.parent / f"classify_{key}", devices=one_device)
    assert not (workdir.parent / f"classify_{key}").exists()  # refused before the first write
  assert sorted(p.name for p in (workdir / "samples").iterdir()) == published  # the last set untouched
  wider = tiny_config("diffmae", **{**_flat(config), "total_steps": 6, "diffmae.decoder_width": 16})
  with pytest.raises(checkpoint.CheckpointError, match=r"parameters do not match .*changed config: "
                     r"diffmae.decoder_width: 32 -> 16"):
    train.pretrain(wider, workdir, devices=one_device)


def _flat(config) -> dict:
  from umd_jax import rules
  return {k: v for k, v in rules.flat(config).items() if k not in ("method",)}


def test_summary_counts_the_parameters_of_the_architecture(tmp_path):
  """--mode=summary's count against the architecture, block by block (cross-self decoder)."""
  config = tiny_config("diffmae")  # Mu/2 encoder: width 32, 2 blocks; decoder 32 wide, 2 blocks
  w, dw, p_dim, e, d, r = 32, 32, 4, 2, 2, 1
  vit_block = 12 * w * w + 13 * w                                      # qkv, proj, mlp, 2 LayerNorms
  encoder = p_dim * w + w + r * w + e * vit_block + 2 * w               # patch embed, class token, blocks, norm
  cross_self = (2 * dw + 4 * dw * dw + 4 * dw                          # self-attention and its norm
                + 2 * dw + 2 * w + (dw * dw + dw) + (w * 2 * dw + 2 * dw) + (dw * dw + dw)  # cross-attention
                + 2 * dw + 8 * dw * dw + 5 * dw + dw * 9 * dw + 9 * dw)                  # MLP, adaLN-Zero
  decoder = (p_dim * dw + dw + 4 * dw * dw + 3 * dw + d * cross_self + 2 * dw + dw * 2 * dw + 2 * dw
             + dw * p_dim + p_dim)                                     # embed, t MLP, blocks, norm, final, head
  result = summary.summarize(config, tmp_path)
  assert result["params"] == encoder + decoder
  assert result["train_flops_per_image"] == methods.get(config).train_flops_per_image(config) > 0


def test_latent_space_trains_on_vae_latents(one_device):
  """data.space="latents": the model sees (size / downsample)² × latent_channels inputs, the step
  draws z = mean + std·ε, and DiffMAE's patches are latent patches (4 channels)."""
  config = tiny_config("diffmae", **{"data.space": "latents", "data.image_size": 16, "data.channels": 3,
                                     "vae.downsample": 2, "vae.latent_channels": 4})
  mesh = sharding.make_mesh(config.mesh, one_device)
  run = train_step.build(config, mesh)
  assert run.state.params["head"]["kernel"].shape == (32, 2 * 2 * 4)  # predicts 2x2 patches of 4 channels
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((16, 8, 8, 4)).astype(np.float32), "std": np.full((16, 8, 8, 4), 0.1, np.float32),
           "label": np.zeros(16, np.int32)}
  state, metrics = run.step(run.state, jax.device_put(batch, sharding.batch_sharding(mesh)))
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
