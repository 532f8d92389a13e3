"""Recognition fine-tuning (--mode=classify, METHOD.md §10): layer-wise LR decay, the weight-decay set,
mixup / cutmix targets, stochastic depth, the cut network, RandAugment's tables, bad settings,
resume, and that fine-tuning the demo beats its linear probe."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from configs import demo
from umd_jax import checkpoint, checks, classify, classify_step, methods, loop, mixing, probe, sharding, train, weights
from umd_jax.data import augment
from umd_jax.models import layers

DECAY = 0.5


def _flat(tree):
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _multipliers(config):
  params = nnx.to_pure_dict(classify_step.abstract_classifier(config)[1])
  return _flat(classify_step.lr_multipliers(config, params)), params


def test_layer_decay_multipliers_by_hand_for_the_encoder_head():
  """Mu/2: 2 encoder blocks. Default cut after block 1 (N = 2): embeddings 0.5^3, block 0 0.5^2,
  block 1 0.5, head 1; the decoder and the pre-training head are not read (0)."""
  config = tiny_config(**{"classify.layer_decay": DECAY})
  m, _ = _multipliers(config)
  assert m["backbone/patch_embed/kernel"] == m["backbone/encoder_pos"] == m["backbone/registers"] == DECAY ** 3
  assert m["backbone/time_embed/mlp/fc1/kernel"] == DECAY ** 3
  assert m["backbone/encoder/blocks/0/attn/qkv/kernel"] == DECAY ** 2
  assert m["backbone/encoder/blocks/1/mlp/fc2/bias"] == DECAY ** 1
  assert m["head/kernel"] == m["head/bias"] == m["fc_norm/scale"] == 1.0
  for key in ("backbone/decoder/blocks/0/attn/qkv/kernel", "backbone/encoder_norm/scale", "backbone/head/kernel",
              "backbone/mask_token", "backbone/decoder_pos", "backbone/final_modulation/kernel"):
    assert m[key] == 0.0, key


@pytest.mark.parametrize("scan", [False, True])
def test_layer_decay_multipliers_by_hand_for_a_cut_in_the_decoder(scan):
  """Mu/2 has 2 encoder and 1 decoder blocks; a cut after block 2 (the decoder's first, N = 3):
  embeddings 0.5^4, encoder blocks 0.5^3, 0.5^2, then the encoder's norm, the decoder positions
  and decoder block 0 0.5^1. Scanned stacks carry one multiplier per block along their first axis."""
  config = tiny_config(**{"classify.layer_decay": DECAY, "classify.block": 2, "model.scan_layers": scan})
  m, params = _multipliers(config)
  assert m["backbone/patch_embed/kernel"] == DECAY ** 4
  assert m["backbone/encoder_norm/scale"] == m["backbone/decoder_pos"] == DECAY
  if scan:
    np.testing.assert_allclose(m["backbone/encoder/blocks/attn/qkv/kernel"].reshape(-1), [DECAY ** 3, DECAY ** 2])
    assert m["backbone/encoder/blocks/attn/qkv/kernel"].shape == (2, 1, 1)
    np.testing.assert_allclose(m["backbone/decoder/blocks/mlp/fc1/kernel"].reshape(-1), [DECAY])
  else:
    assert m["backbone/encoder/blocks/0/attn/qkv/kernel"] == DECAY ** 3
    assert m["backbone/encoder/blocks/1/attn/qkv/kernel"] == DECAY ** 2
    assert m["backbone/decoder/blocks/0/mlp/fc1/kernel"] == DECAY
  assert m["head/kernel"] == 1.0 and m["backbone/head/kernel"] == 0.0 and m["backbone/decoder_norm/scale"] == 0.0


def test_layer_decay_multipliers_of_a_cut_inside_the_encoder_and_of_diffmae():
  config = tiny_config(**{"classify.layer_decay": DECAY, "classify.block": 0})
  m, _ = _multipliers(config)  # N = 1: block 0 0.5, block 1 not run
  assert m["backbone/patch_embed/kernel"] == DECAY ** 2 and m["backbone/encoder/blocks/0/attn/qkv/kernel"] == DECAY
  assert m["backbone/encoder/blocks/1/attn/qkv/kernel"] == 0.0
  m, _ = _multipliers(tiny_config("diffmae", **{"classify.layer_decay": DECAY}))
  assert m["backbone/patch_embed/kernel"] == m["backbone/registers"] == DECAY ** 3
  assert m["backbone/encoder/blocks/1/attn/proj/kernel"] == DECAY and m["head/kernel"] == 1.0
  assert all(v == 0.0 for k, v in m.items() if k.startswith(("backbone/decoder", "backbone/time_embed",
                                                              "backbone/head", "backbone/encoder_norm")))


def test_weight_decay_applies_to_read_weights_only_not_norms_biases_positions_tokens():
  config = tiny_config(**{"model.num_classes": 10})  # with a label table (a class-conditional backbone)
  params = nnx.to_pure_dict(classify_step.abstract_classifier(config)[1])
  mask = _flat(classify_step.decay_mask(config, params))
  decayed = {k for k, v in mask.items() if v}
  read = {k for k, v in _flat(classify_step.lr_multipliers(config, params)).items() if np.any(np.asarray(v) > 0)}
  expected_off = {k for k in read if k.split("/")[-1] in ("bias", "scale", "embedding")
                  or k.split("/")[1:2] and k.split("/")[1] in ("registers", "encoder_pos", "decoder_pos")}
  assert decayed == read - expected_off
  assert "backbone/encoder/blocks/0/attn/qkv/kernel" in decayed and "head/kernel" in decayed
  assert {"backbone/encoder_pos", "backbone/registers", "fc_norm/scale", "head/bias",
          "backbone/label_embed/table/embedding"} <= expected_off
  assert not any(k.startswith("backbone/decoder") for k in decayed)  # not read: never decayed


def test_optimizer_leaves_unread_parameters_unchanged_and_scales_updates_by_layer():
  """One step of the classify optimizer with gradient 1 everywhere: read parameters move by the
  AdamW step times their multiplier (block 0 by 0.5^2 of the head's), unread ones not at all."""
  config = tiny_config(**{"classify.layer_decay": DECAY, "classify.weight_decay": 0.0, "classify.warmup_epochs": 0})
  params = weights.fresh(config, sharding.make_mesh(config.mesh, jax.devices()[:1]), 0)[1]
  params = {"backbone": params, "fc_norm": {"scale": jnp.ones(32), "bias": jnp.zeros(32)},
            "head": {"kernel": jnp.zeros((32, 10)), "bias": jnp.zeros(10)}}
  tx, lr = classify_step.make_optimizer(config, params, num_records=160)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  u = _flat(updates)
  head = float(u["head/bias"][0])
  assert head != 0
  assert float(u["backbone/encoder/blocks/0/attn/qkv/bias"][0]) == pytest.approx(head * DECAY ** 2, rel=1e-6)
  assert float(u["backbone/patch_embed/bias"][0]) == pytest.approx(head * DECAY ** 3, rel=1e-6)
  assert not np.any(u["backbone/decoder/blocks/0/mlp/fc1/kernel"]) and not np.any(u["backbone/head/kernel"])


def test_mixup_targets_hand_case_and_sum_to_one():
  labels = jnp.array([0, 1, 2, 3])
  images = jnp.arange(4, dtype=jnp.float32)[:, None, None, None] * jnp.ones((4, 4, 4, 1))
  x, y, lam = mixing.mix(jax.random.PRNGKey(0), images, labels, 5, mixup_alpha=0.8, cutmix_alpha=0.0,
                         switch_prob=0.5, smoothing=0.1)
  lam = float(lam)
  np.testing.assert_allclose(x[:, 0, 0, 0], lam * np.arange(4) + (1 - lam) * np.arange(4)[::-1], rtol=1e-6)
  on, off = 1 - 0.1 + 0.02, 0.02  # smoothing 0.1 over 5 classes
  expected = np.full((4, 5), off)
  for i in range(4):
    expected[i, i] += lam * (on - off)
    expected[i, 3 - i] += (1 - lam) * (on - off)
  np.testing.assert_allclose(y, expected, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y).sum(axis=1), 1.0, rtol=1e-6)


def test_cutmix_pastes_a_box_of_area_one_minus_lambda_from_the_mirror_row():
  h = w = 32
  images = jnp.stack([jnp.zeros((h, w, 1)), jnp.ones((h, w, 1))])
  labels = jnp.array([0, 1])
  areas, lams = [], []
  for seed in range(40):
    x, y, lam = mixing.mix(jax.random.PRNGKey(seed), images, labels, 2, mixup_alpha=0.0, cutmix_alpha=1.0,
                           switch_prob=0.5, smoothing=0.0)
    pasted = float(np.asarray(x[0]).mean())  # row 0 is zeros: what is 1 came from the mirror row
    assert float(lam) == pytest.approx(1 - pasted, abs=1e-6)  # λ is the share left uncovered, exactly
    np.testing.assert_allclose(y, [[lam, 1 - lam], [1 - lam, lam]], rtol=1e-5, atol=1e-6)
    assert set(np.unique(np.asarray(x[0]))) <= {0.0, 1.0}
    areas.append(pasted)
    lams.append(float(lam))
  # A box drawn for λ has sides ⌊32·√(1-λ)⌋ (even-rounded) before clipping: never more than 1-λ of the image.
  for seed in range(40):
    k_box = jax.random.split(jax.random.split(jax.random.PRNGKey(seed), 4)[3], 1)[0]
    lam = 0.75
    top, bottom, left, right = (int(v) for v in mixing.cutmix_box(k_box, lam, h, w))
    area = (bottom - top) * (right - left) / (h * w)
    assert area <= 1 - lam + 1e-9
    if 0 < top and bottom < h and 0 < left and right < w:  # not clipped: (2·⌊16·0.5⌋)² = 16² = 256
      assert area == pytest.approx(1 - lam, abs=2 * 2 / h)
  assert 0.3 < np.mean(lams) < 0.7  # λ ~ Beta(1, 1) before the box correction


def test_mix_switches_between_cutmix_and_mixup_at_the_switch_probability():
  images = jnp.stack([jnp.zeros((8, 8, 1)), jnp.ones((8, 8, 1))])
  kinds = []
  for seed in range(200):
    x, _, _ = mixing.mix(jax.random.PRNGKey(seed), images, jnp.array([0, 1]), 2, mixup_alpha=0.8, cutmix_alpha=1.0,
                         switch_prob=0.5, smoothing=0.1)
    values = np.unique(np.asarray(x[0]))
    kinds.append(bool(set(values) <= {0.0, 1.0}))  # cutmix copies pixels; mixup blends them
  assert 0.38 < np.mean(kinds) < 0.62


def test_drop_path_scales_drop_whole_branches_at_the_configured_rate():
  depth, batch, rate = 5, 4000, 0.4
  scales = np.asarray(layers.drop_path_scales(jax.random.PRNGKey(0), rate, depth, batch))
  assert scales.shape == (depth, 2, batch)
  for i in range(depth):
    p = rate * i / (depth - 1)
    dropped = scales[i] == 0
    assert dropped.mean() == pytest.approx(p, abs=0.03)  # linear from 0 (first block) to `rate` (last)
    np.testing.assert_allclose(scales[i][~dropped], 1 / (1 - p), rtol=1e-6)  # kept branches rescaled


def test_drop_path_removes_the_branch_and_is_the_identity_when_nothing_drops():
  block = layers.Block(16, 2, adaln=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
  block.modulation.kernel[...] = jax.random.normal(jax.random.PRNGKey(1), block.modulation.kernel.shape) * 0.1
  x, cond = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 16)), jax.random.normal(jax.random.PRNGKey(3), (3, 16))
  np.testing.assert_array_equal(block(x, cond, drop=jnp.ones((2, 3))), block(x, cond))
  np.testing.assert_array_equal(block(x, cond, drop=jnp.zeros((2, 3))), x)  # both residual branches gone
  only_mlp = block(x, cond, drop=jnp.array([[0.0] * 3, [1.0] * 3]))
  assert not np.allclose(only_mlp, x) and not np.allclose(only_mlp, block(x, cond))


def test_classifier_is_deterministic_at_evaluation_and_drops_paths_in_training():
  config = tiny_config(**{"classify.drop_path": 0.5})
  model = classify_step.build(config, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)  # random everywhere: adaLN-Zero's zero gates would hide drops
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  model = nnx.merge(graphdef, jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
  apply = classify_step.logits_fn(config)
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 1))
  eval_logits = apply(model, x)
  np.testing.assert_array_equal(eval_logits, apply(model, x))
  a, b = apply(model, x, drop_key=jax.random.PRNGKey(5)), apply(model, x, drop_key=jax.random.PRNGKey(6))
  assert not np.allclose(a, b) and not np.allclose(a, eval_logits)


@pytest.mark.parametrize("scan", [False, True])
def test_cut_tokens_pool_to_the_probe_features_of_that_block(scan):
  """The classifier's cut after block k, mean-pooled, is the probe's feature of block k."""
  config = tiny_config(**{"model.scan_layers": scan})
  graphdef, params = weights.fresh(config, sharding.make_mesh(config.mesh, jax.devices()[:1]), 3)
  model, method = nnx.merge(graphdef, params), methods.get(config)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  t_index = jnp.full((4,), 7, jnp.int32)
  feats = model.features(x, t_index)["blocks"]
  for k in range(method.num_blocks(config)):
    pooled = method.classify_tokens(model, x, t_index, k).mean(axis=1)
    np.testing.assert_allclose(pooled, feats[k], rtol=1e-5, atol=1e-5)


def test_randaugment_levels_follow_timms_tables_and_draws_follow_the_rng():
  rng = np.random.default_rng(0)
  assert abs(augment.level_args("Rotate", 9, rng)[0]) == pytest.approx(27.0)
  assert abs(augment.level_args("ShearX", 9, rng)[0]) == pytest.approx(0.27)
  assert abs(augment.level_args("TranslateYRel", 9, rng)[0]) == pytest.approx(0.405)
  assert augment.level_args("PosterizeIncreasing", 9, rng) == (1,)      # 4 - int(3.6)
  assert augment.level_args("SolarizeIncreasing", 9, rng) == (26,)      # 256 - int(230.4)
  assert augment.level_args("SolarizeAdd", 9, rng) == (99,)
  assert augment.level_args("ContrastIncreasing", 9, rng)[0] in (pytest.approx(1.81), pytest.approx(0.19))
  assert augment.level_args("BrightnessIncreasing", 10, rng)[0] in (pytest.approx(1.9), pytest.approx(0.1))
  image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  ra = augment.RandAugment(2, 9.0, 0.5)
  a, b = ra(image, np.random.default_rng(7)), ra(image, np.random.default_rng(7))
  np.testing.assert_array_equal(a, b)
  outs = [ra(image, np.random.default_rng(s)) for s in range(30)]
  assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
  assert 0.1 < np.mean([np.array_equal(o, image) for o in outs]) < 0.45  # both ops skipped: 0.5² = 0.25
  grey = ra(image[..., :1], np.random.default_rng(3))
  assert grey.shape == (16, 16, 1)


def test_random_erasing_boxes_follow_the_probability_and_area_range():
  image = np.zeros((32, 32, 3), np.float32)
  erased = [augment.random_erase(image, np.random.default_rng(s), 0.25) != 0 for s in range(400)]
  applied = [e.any() for e in erased]
  assert np.mean(applied) == pytest.approx(0.25, abs=0.06)
  shares = [e[..., 0].mean() for e, a in zip(erased, applied) if a]
  assert min(shares) >= 0.015 and max(shares) <= 0.36  # area 2%..1/3 (rounded box sides)


@pytest.mark.parametrize("key, value, words", [
    ("classify.layer_decay", 0.0, "(0, 1]"), ("classify.layer_decay", 1.5, "(0, 1]"),
    ("classify.block", 99, "not a block of this network"), ("classify.t", 1000, "timestep"),
    ("classify.warmup_epochs", 100, "classify.epochs"), ("classify.drop_path", 1.0, "[0, 1)"),
    ("classify.randaugment_magnitude", 11.0, "[0, 10]"), ("classify.mixup_alpha", -1.0, ">= 0"),
    ("classify.epochs", 0, ">= 1"), ("data.num_classes", 0, "labels")])
def test_bad_classify_settings_are_refused_in_one_line(key, value, words):
  config = tiny_config(**{key: value})
  with pytest.raises(checks.ConfigError) as e:
    checks.check(config, "classify")
  assert key in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_classify_without_init_from_or_with_a_wrong_backbone_writes_nothing(tmp_path):
  with pytest.raises(ValueError, match="init_from"):
    classify.run(tiny_config(), str(tmp_path / "a"))
  assert not (tmp_path / "a").exists()
  with pytest.raises(Exception, match="no checkpoint"):
    classify.run(tiny_config(**{"init_from": str(tmp_path / "missing")}), str(tmp_path / "b"))
  assert not (tmp_path / "b").exists()


def _classify_config(init_from, **overrides):
  return tiny_config(**{"init_from": str(init_from), "batch_size": 32, "classify.epochs": 2,
                        "classify.warmup_epochs": 1, "classify.eval_every_epochs": 1, "classify.eval_batch_size": 160,
                        "checkpoint_every": 1000, "log_every": 10, **overrides})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  root = tmp_path_factory.mktemp("classify")
  train.pretrain(tiny_config(**{"total_steps": 4}), str(root / "pre"))
  return root


def test_classify_end_to_end_results_and_exact_resume(pretrained, tmp_path):
  """Two epochs straight equal one epoch, a stop, and a resume to two epochs -- bitwise (model,
  optimizer, step, data position); results.json says where the weights came from."""
  pre = pretrained / "pre"
  straight = classify.run(_classify_config(pre), str(tmp_path / "straight"))
  per_epoch = 1500 // 32
  assert straight["step"] == 2 * per_epoch and straight["init"] == {"workdir": str(pre), "step": 4}
  saved = json.loads((tmp_path / "straight" / "classify" / "results.json").read_text())
  assert saved["top1"] == straight["top1"] and 0 <= saved["top1"] <= 1 and saved["top5"] >= saved["top1"]
  assert [e["step"] for e in saved["evaluations"]] == [per_epoch, 2 * per_epoch]
  assert saved["config"]["classify"]["layer_decay"] == 0.65 and saved["cut"] == {"block": 1, "t": -1}
  assert saved["images"] == 297
  half = classify.run(_classify_config(pre, **{"checkpoint_every": per_epoch}), str(tmp_path / "resumed"))
  assert half["step"] == 2 * per_epoch
  # stop after epoch 1: rerun from a copy holding only that checkpoint
  import shutil
  resumed = tmp_path / "resumed2"
  shutil.copytree(tmp_path / "resumed", resumed)
  shutil.rmtree(resumed / "checkpoints" / str(2 * per_epoch))
  again = classify.run(_classify_config(pre, **{"checkpoint_every": per_epoch}), str(resumed))
  assert again["start_step"] == per_epoch and again["step"] == 2 * per_epoch
  for a, b in zip(jax.tree.leaves(straight["state"].params), jax.tree.leaves(again["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(straight["state"].opt_state), jax.tree.leaves(again["state"].opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert again["top1"] == straight["top1"]
  assert [e["step"] for e in json.loads((resumed / "classify" / "results.json").read_text())["evaluations"]] == [
      per_epoch, 2 * per_epoch]
  with pytest.raises(Exception, match="classify.layer_decay"):  # another recipe is another run
    classify.run(_classify_config(pre, **{"classify.layer_decay": 0.5, "classify.epochs": 3}), str(resumed))
  # killed after its first checkpoint, before any evaluation wrote results.json: the checkpoint
  # itself says where the backbone came from
  killed = tmp_path / "killed"
  shutil.copytree(tmp_path / "resumed", killed)
  shutil.rmtree(killed / "checkpoints" / str(2 * per_epoch))
  (killed / "classify" / "results.json").unlink()
  after_kill = classify.run(_classify_config(pre, **{"checkpoint_every": per_epoch}), str(killed))
  assert after_kill["init"] == {"workdir": str(pre), "step": 4}
  assert json.loads((killed / "classify" / "results.json").read_text())["init"] == {"workdir": str(pre), "step": 4}


def _damage(workdir):
  """Truncated garbage in every data file of every step of a workdir's checkpoints."""
  for f in workdir.glob("checkpoints/*/state/**/*"):
    if f.is_file() and f.stat().st_size > 0 and "METADATA" not in f.name:
      f.write_bytes(b"\0" * 7)


def test_a_damaged_init_from_is_refused_before_the_workdir_exists(pretrained, tmp_path):
  """init_from's weights are read and verified before anything is created: one error that says
  there is no earlier step, no workdir, nothing compiled for the run first."""
  import shutil
  source = tmp_path / "damaged"
  shutil.copytree(pretrained / "pre", source)
  _damage(source)
  with pytest.raises(checkpoint.CheckpointError, match=r"step 2 .*damaged; no earlier step is left: write the "
                     r"weights of .* again"):
    classify.run(_classify_config(source), str(tmp_path / "c"))
  assert not (tmp_path / "c").exists()
  from test_generate import finetune_config
  with pytest.raises(checkpoint.CheckpointError, match=r"step 2 .*damaged; no earlier step is left"):
    train.finetune(finetune_config(source), str(tmp_path / "f"))
  assert not (tmp_path / "f").exists()


def test_classify_reads_unread_parameters_back_unchanged(pretrained, tmp_path):
  """The decoder and the pre-training head (not read by the default cut) end as loaded."""
  pre = pretrained / "pre"
  out = classify.run(_classify_config(pre, **{"classify.epochs": 1, "classify.warmup_epochs": 0, "classify.ema_rate": 0.5}),
                     str(tmp_path / "c"))
  config = tiny_config()
  loaded = weights.load(config, str(pre), sharding.make_mesh(config.mesh), prefer_ema=False)[1]
  after = out["state"].params["backbone"]
  for key in ("decoder", "head", "mask_token", "encoder_norm"):
    for a, b in zip(jax.tree.leaves(loaded[key]), jax.tree.leaves(after[key])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(loaded["patch_embed"]["kernel"]), np.asarray(after["patch_embed"]["kernel"]))
  assert "top1_ema" in out


def test_fine_tuning_the_demo_beats_its_linear_probe(tmp_path, optimized):
  """The demo pre-trained (shortened to 200 steps) then, from the same weights: the linear probe on
  its frozen features, and end-to-end fine-tuning with MAE's recipe (60 epochs)."""
  pre = tmp_path / "demo"
  train.pretrain(demo.get_config("200"), str(pre))
  config = demo.get_config("200")
  mesh = sharding.make_mesh(config.mesh)
  graphdef, params = weights.load(config, str(pre), mesh)
  extractor = probe.Extractor(config, graphdef, t=-1, blocks=[-1], mesh=mesh)
  tr, te = extractor(params, "train", progress=False), extractor(params, "test", progress=False)
  linear = probe.linear_probe_features(tr.feature(0), tr.y, te.feature(0), te.y, config.probe, 10)["top1"]
  tuned = demo.get_config("classify,60")
  with tuned.unlocked():
    tuned.init_from = str(pre)
  result = classify.run(tuned, str(tmp_path / "classify"))
  print(f"fine-tuned top-1 {result['top1']:.4f}, linear probe {linear:.4f}")
  assert result["top1"] > linear + 0.03, (result["top1"], linear)  # measured: 97.0 against 88.2
  assert result["top1"] > 0.9


def test_classify_configs_follow_maes_recipe():
  from configs import mae_b, umd_l
  b, l = mae_b.get_config("classify"), umd_l.get_config("classify")
  assert (b.classify.layer_decay, b.classify.drop_path, b.classify.base_lr, b.classify.epochs) == (0.65, 0.1, 5e-4, 100)
  assert (l.classify.layer_decay, l.classify.drop_path, l.classify.base_lr, l.classify.epochs) == (0.75, 0.2, 1e-3, 50)
  assert b.batch_size == 1024 and b.data.crop_area_min == 0.08 and b.classify.label_smoothing == 0.1
  assert (b.classify.mixup_alpha, b.classify.cutmix_alpha, b.classify.mix_switch_prob) == (0.8, 1.0, 0.5)
  assert (b.classify.randaugment_ops, b.classify.randaugment_magnitude, b.classify.erase_prob) == (2, 9.0, 0.25)
  from configs import dit_b
  assert dit_b.get_config("classify").classify.t == 0 and b.classify.t == -1  # DiT never saw the clean index
  assert math.isclose(classify_step.learning_rate(b, 1_281_167)(0), 0.0)


def test_a_non_finite_loss_stops_without_saving(pretrained, tmp_path):
  """The guard of pre-training: a step with a non-finite loss leaves the state as it was and the
  run stops at the next log or checkpoint step, saving nothing."""
  config = _classify_config(pretrained / "pre", **{"classify.base_lr": 1e38, "classify.warmup_epochs": 0,
                                                   "log_every": 2, "checkpoint_every": 4})
  with pytest.raises(loop.TrainingError, match="non-finite loss or gradient at step .*lower classify.base_lr "):
    classify.run(config, str(tmp_path / "nan"))
  assert not list((tmp_path / "nan" / "checkpoints").glob("[0-9]*"))
