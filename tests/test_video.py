"""Clips (README, Video; METHOD.md §15): the geometry that cuts them, tube masking, moving digits,
the clip-aware augmentation and cutmix, the networks and losses on clips, FLOPs, the checks, and
pre-training -> probing -> classification end to end for UMD, MAE and DiffMAE."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from conftest import tiny_config
from umd_jax import (checks, classify, corruption, diffusion, generate, geometry, images, inpainting, methods, mixing,
                     probe, train)
from umd_jax.data import pipeline, sources
from umd_jax.methods import umd_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = geometry.Grid(patch=2, rows=3, cols=2, frames=2, tubelet=2, clip=True)  # input (4, 6, 4, C)


def clip_config(method: str = "umd", **overrides):
  """Mu/4 on moving digits: 4 frames of 8×8 in 2×4×4 tubes -> 2 × 2 × 2 = 8 tokens."""
  values = {"data.name": "moving_digits", "data.frames": 4, "data.image_size": 8, "data.num_classes": 4,
            "model.variant": "Mu/4", "model.tubelet": 2, "probe.fewshot_shots": (1, 5), "sample.num_samples": 0}
  if method == "diffmae":
    values["diffmae.decoder_width"] = 32
  values.update(overrides)
  return tiny_config(method, **values)


def test_clip_tokens_are_tubes_in_time_row_column_order():
  x = np.arange(4 * 6 * 4 * 3, dtype=np.float32).reshape(1, 4, 6, 4, 3)
  tokens = np.asarray(CLIP.patchify(x))
  assert tokens.shape == (1, CLIP.num_tokens, CLIP.token_dim(3)) == (1, 12, 24)
  for k in range(12):  # token k = (token frame f, row r, column c)
    f, r, c = k // 6, (k % 6) // 2, k % 2
    tube = x[0, 2 * f:2 * f + 2, 2 * r:2 * r + 2, 2 * c:2 * c + 2]  # (tubelet, p, p, C), in that order
    np.testing.assert_array_equal(tokens[0, k], tube.reshape(-1))
  np.testing.assert_array_equal(np.asarray(CLIP.unpatchify(tokens)), x)


def test_an_image_is_the_one_frame_case_cut_as_before():
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 8, 6, 3)))
  image = geometry.Grid(2, 4, 3)
  tokens = np.asarray(image.patchify(x))
  np.testing.assert_array_equal(tokens[0, 4], x[0, 2:4, 2:4].reshape(-1))  # row 1, column 1: row-major
  np.testing.assert_array_equal(np.asarray(image.unpatchify(tokens)), x)
  assert image.num_tokens == 12 and CLIP.num_tokens == 12


def test_pixel_and_token_masks_of_a_clip_invert_each_other():
  mask = np.zeros((1, 12), np.float32)
  mask[0, 7] = 1  # token frame 1, row 0, column 1
  pixels = np.asarray(CLIP.pixel_mask(mask))[0, ..., 0]
  expected = np.zeros((4, 6, 4))
  expected[2:4, 0:2, 2:4] = 1
  np.testing.assert_array_equal(pixels, expected)
  known = 1 - pixels[None, ..., None]
  known[0, 0, 5, 0] = 0  # one more unknown pixel: frame 0, row 5, column 0 -> token 4 (frame 0, row 2, col 0)
  np.testing.assert_array_equal(np.asarray(CLIP.known_tokens(known))[0], np.eye(12)[7] + np.eye(12)[4])


def test_clip_positions_are_a_time_quarter_then_the_2d_table():
  width = 32
  table = CLIP.sincos(width)
  assert table.shape == (12, width)
  for k in range(12):
    f, s = divmod(k, 6)
    omega = 1.0 / 10000 ** (np.arange(4) / 4.0)  # width/4 = 8 channels: 4 frequencies, sin then cos
    np.testing.assert_allclose(table[k, :8], np.concatenate([np.sin(f * omega), np.cos(f * omega)]), atol=1e-7)
    np.testing.assert_array_equal(table[k, 8:], geometry.sincos_2d(24, 3, 2)[s])
  image = geometry.Grid(2, 4, 4)
  np.testing.assert_array_equal(image.sincos(width), geometry.sincos_2d(width, 4))  # images: MAE's 2-D table


def test_tube_masks_drop_the_same_positions_in_every_frame():
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  mask = corruption.sample_mask(keys, 24, 0.75, tube=4)  # 4 frames of 6 positions: keep 1 of each frame's 6
  assert mask.keep_ids.shape == (5, 4) and mask.masked_ids.shape == (5, 20)
  per_frame = np.asarray(mask.mask).reshape(5, 4, 6)
  assert (per_frame == per_frame[:, :1]).all() and (per_frame.sum(axis=2) == 5).all()
  kept = np.asarray(mask.keep_ids)
  np.testing.assert_array_equal(kept % 6, np.repeat(kept[:, :1] % 6, 4, axis=1))  # one position, frame by frame
  np.testing.assert_array_equal(kept // 6, np.tile(np.arange(4), (5, 1)))
  restored = np.take_along_axis(np.concatenate([kept, np.asarray(mask.masked_ids)], axis=1),
                                np.asarray(mask.restore_ids), axis=1)
  np.testing.assert_array_equal(restored, np.tile(np.arange(24), (5, 1)))  # restore_ids undoes the order
  assert corruption.num_kept(24, 0.75, tube=4) == 4 and corruption.num_kept(24, 0.75) == 6
  # one frame: the random draw over all tokens, unchanged
  np.testing.assert_array_equal(np.asarray(corruption.sample_mask(keys, 24, 0.75, tube=1).keep_ids),
                                np.asarray(corruption.sample_mask(keys, 24, 0.75).keep_ids))


def test_moving_digits_move_one_way_and_split_by_source_digit():
  train_set = sources.MovingDigitsSource("train", frames=6, size=16)
  test_set = sources.MovingDigitsSource("test", frames=6, size=16)
  assert (len(train_set), len(test_set)) == (4 * 1500, 4 * 297) and train_set.num_classes == 4
  digits = sources.DigitsSource("test")
  for i in range(12):
    record = test_set[i]
    clip, label = record["image"], int(record["label"])
    assert clip.shape == (6, 16, 16, 1) and clip.dtype == np.uint8 and label == i % 4
    assert sorted(clip[0].ravel().tolist()) == sorted(np.pad(digits.images[i // 4], ((0, 8), (0, 8), (0, 0))).ravel().tolist())
    direction = np.asarray(sources.MovingDigitsSource.DIRECTIONS[label])
    speeds = [s for s in (1, 2) if all((clip[f + 1] == np.roll(clip[f], tuple(direction * s), axis=(0, 1))).all()
                                       for f in range(5))]
    assert len(speeds) == 1  # every frame is the last one moved `speed` pixels in the label's direction
  np.testing.assert_array_equal(test_set[5]["image"], sources.MovingDigitsSource("test", 6, 16)[5]["image"])
  frames = sources.MovingDigitsSource("test", frames=1, size=16)  # the frame-wise view: each clip's first frame
  np.testing.assert_array_equal(frames[7]["image"], test_set[7]["image"][0])
  assert frames[7]["image"].shape == (16, 16, 1) and not frames.gives_clips and test_set.gives_clips


def test_clip_augmentation_crops_every_frame_alike_and_flips_the_width():
  clip = np.random.default_rng(0).integers(0, 256, (3, 12, 10, 1), dtype=np.uint8)
  rng = np.random.default_rng(1)
  out = pipeline.inception_crop(clip, rng, (0.3, 0.5), 6)
  box = pipeline.inception_box(12, 10, np.random.default_rng(1), (0.3, 0.5))
  for f in range(3):
    np.testing.assert_array_equal(out[f], pipeline.crop_resize(clip[f], box, 6))
  flipped = pipeline.TrainAugment(10, (1.0, 1.0), flip=True)
  seen = set()
  for seed in range(8):
    got = flipped.random_map({"image": clip[:, 1:11], "label": 0}, np.random.default_rng(seed))["image"]
    plain = clip[:, 1:11].astype(np.float32) * (2 / 255) - 1
    seen.add("flip" if np.array_equal(got, plain[:, :, ::-1]) else "same" if np.array_equal(got, plain) else "other")
  assert seen == {"flip", "same"}


def test_cutmix_cuts_the_same_box_from_every_frame():
  clips = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 8, 8, 1))
  labels = jnp.arange(4)
  out, targets, lam = mixing.mix(jax.random.PRNGKey(5), clips, labels, 4, mixup_alpha=0.0, cutmix_alpha=1.0,
                                 switch_prob=1.0, smoothing=0.0)
  changed = np.asarray(out != clips)[0, ..., 0]  # (T, H, W) of the first clip
  assert changed.any() and (changed == changed[:1]).all()  # one box, every frame
  assert float(lam) == pytest.approx(1 - changed[0].mean())
  np.testing.assert_allclose(np.asarray(targets).sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("method", ["umd", "mae", "diffmae"])
def test_clip_networks_train_and_hide_masked_tubes_from_the_encoder(method):
  config = clip_config(method)
  m = methods.get(config)
  model = m.build(config, nnx.Rngs(0))
  assert model.num_patches == 8 and model.geometry == geometry.Grid(4, 2, 2, 2, 2, True)
  clips = jax.random.uniform(jax.random.PRNGKey(1), (4, 4, 8, 8, 1), minval=-1, maxval=1)
  loss_fn = m.loss_fn(config, diffusion.from_config(config))
  (loss, metrics), grads = nnx.value_and_grad(lambda mdl: loss_fn(mdl, clips, None, jax.random.PRNGKey(2)),
                                              has_aux=True)(model)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert float(optax_norm(grads)) > 0
  shown, predicted = m.preview(config, diffusion.from_config(config), model, clips, jax.random.PRNGKey(3))
  assert shown.shape == predicted.shape == clips.shape
  # the encoder's output for the kept tubes does not depend on the masked tubes' pixels
  mask = corruption.random_mask(jax.random.PRNGKey(4), 4, 8, 0.5)
  changed = clips + 3.0 * model.geometry.pixel_mask(mask.mask)
  if method == "diffmae":
    enc = lambda x: model.encode(x, mask.keep_ids)["last"]
  else:
    enc = lambda x: model.encode(x, model.condition(jnp.zeros((4,), jnp.int32)), mask.keep_ids)[0]
  np.testing.assert_allclose(np.asarray(enc(changed)), np.asarray(enc(clips)), atol=1e-6)
  features = m.features(model, clips, jnp.zeros((4,), jnp.int32), [-1, 0])
  assert features.shape == (2, 4, m.width(config))


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(nnx.state(tree, nnx.Param))))


def test_umd_loss_on_clips_weighs_the_masked_tubes_by_hand():
  """The clean sub-batch's loss is the x0 error over exactly the pixels of the masked tubes."""
  grid = geometry.Grid(2, 2, 2, 2, 2, True)  # (4, 4, 4, 1) clips, 8 tokens
  seen = {}
  def apply(x, t_index, labels, mask):
    seen["mask"] = mask
    return dict(x0=jnp.zeros_like(x), eps=jnp.zeros_like(x))
  x0 = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 4, 1))
  loss, metrics = umd_loss.loss(apply, diffusion.make_schedule("cosine"), x0, jax.random.PRNGKey(1), grid=grid,
                                clean_fraction=1.0, clean_mask_ratio=0.5, noised_mask_ratio=0.0, tube=2)
  mask = np.asarray(seen["mask"].mask)
  assert (mask.reshape(2, 2, 4)[:, 0] == mask.reshape(2, 2, 4)[:, 1]).all()  # tubes: frame 1 masked as frame 0
  pixels = np.broadcast_to(np.asarray(grid.pixel_mask(mask)), x0.shape)
  expected = (np.asarray(x0) ** 2 * pixels).sum() / pixels.sum()
  assert float(metrics["loss_clean"]) == pytest.approx(expected, rel=1e-6)


def test_analytic_flops_of_a_clip_match_xla_cost_analysis():
  """16 frames of 32² in 2×8×8 tubes (128 tokens), widths where matmuls dominate: within 10%."""
  for method, extra in (("umd", {}), ("diffmae", {"diffmae.decoder_width": 128, "diffmae.decoder_heads": 4})):
    config = clip_config(method, **{"model.variant": "Ti/8", "data.image_size": 32, "data.frames": 16,
                                    "data.channels": 3, **extra})
    m = methods.get(config)
    graphdef, params = nnx.split(m.build(config, nnx.Rngs(0)))
    loss = m.loss_fn(config, diffusion.from_config(config))
    x = jax.ShapeDtypeStruct((4, 16, 32, 32, 3), jnp.float32)
    forward = jax.jit(lambda p, x: loss(nnx.merge(graphdef, p), x, None, jax.random.PRNGKey(0))[0])
    cost = forward.lower(params, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    analytic = m.train_flops_per_image(config) / 3 * 4
    assert 0.9 < analytic / cost["flops"] < 1.1, (method, analytic, cost["flops"])


@pytest.mark.parametrize("overrides,mode,message", [
    ({"data.frames": 5}, "pretrain", r"model.tubelet=2: does not divide data.frames=5"),
    ({"data.frames": 1, "model.tubelet": 1, "data.name": "video_folder"}, "pretrain",
     r"data.name='video_folder' gives clips: set data.frames >= 2"),
    ({"data.name": "digits"}, "pretrain", r"asks for clips but data.name='digits' gives images"),
    ({"data.name": "synthetic"}, "pretrain", r"asks for clips but data.name='synthetic' gives images"),
    ({"model.masking": "tubes"}, "pretrain", r"model.masking='tubes': use one of \('random', 'tube'\)"),
    ({}, "encode", r"--mode='encode' is not built for clips \(data.frames=4\): clips run in pretrain, finetune, probe, "
                   r"generate, summary, classify"),
    ({"sample.fid": True, "sample.inpaint": "center"}, "generate", r"sample.fid=True: scores images with Inception, not clips"),
    ({"sample.inpaint": "future", "sample.inpaint_ratio": 0.0}, "generate",
     r"sample.inpaint_ratio=0.0 must be in \(0, 1\)"),
    ({"classify.randaugment_ops": 2}, "classify", r"classify.randaugment_ops=2 is image augmentation, not built for clips: set it to 0"),
    ({"data.space": "latents", "data.channels": 3, "data.image_size": 64}, "pretrain", r"data.space='latents': clips are read in pixels"),
])
def test_bad_clip_settings_are_one_line(overrides, mode, message):
  with pytest.raises(checks.ConfigError, match=message):
    checks.check(clip_config(**overrides), mode)


def test_future_frames_are_refused_for_images():
  with pytest.raises(checks.ConfigError, match=r"sample.inpaint='future': predicts the last frames of clips: use it "
                                               r"with data.frames > 1"):
    checks.check(tiny_config(**{"sample.inpaint": "future", "sample.num_samples": 0}), "generate")


def test_an_image_only_method_refuses_clips_and_images_refuse_a_tubelet():
  with pytest.raises(checks.ConfigError, match=r"method 'dit_original' reads images only: use data.frames=1, or a "
                                               r"method that reads clips \(umd, dit, maskdit, mae, diffmae\)"):
    checks.check(clip_config("dit_original", **{"model.variant": "Ti/4"}), "probe")
  with pytest.raises(checks.ConfigError, match=r"model.tubelet=2: does not divide data.frames=1: use a tubelet that "
                                               r"does \(images: 1\)"):
    checks.check(tiny_config(**{"model.tubelet": 2}), "pretrain")


def test_the_video_demo_config_checks_for_every_clip_method_and_mode():
  for arg, mode in (("video", "pretrain"), ("video", "probe"), ("video,mae", "pretrain"),
                    ("video,diffmae", "pretrain"), ("video,classify", "classify"), ("video,diffmae,classify", "classify")):
    config = demo.get_config(arg)
    checks.check(config, mode)
    assert config.data.frames == 8 and methods.get(config).clips
  assert demo.get_config("video,diffmae,classify").init_from == "workdirs/demo_video_diffmae"


def test_clip_grids_animate_the_rows_frame_by_frame():
  rows = [np.full((2, 3, 4, 4, 1), -1.0), np.full((2, 3, 4, 4, 1), 1.0)]
  rows[0][1, 2] = 1.0
  rows[0][0, 1] = 0.0  # every frame differs (a GIF merges equal neighbours)
  frames = images.clip_grids(rows)
  assert len(frames) == 3 and frames[0].shape == (11, 11, 1)
  assert frames[2][1:5, 6:10].min() == 255 and frames[0][1:5, 6:10].max() == 0  # clip 1 lights up in frame 2
  still = images.grid(rows)
  assert still.shape == (11, 31, 1)  # a row of clips: each clip's frames side by side
  gif = images.gif_bytes(frames, upscale=2)
  from PIL import Image
  import io
  with Image.open(io.BytesIO(gif)) as im:
    assert im.n_frames == 3 and im.size == (22, 22)


@pytest.mark.parametrize("method", ["umd", "mae", "diffmae"])
def test_clips_pretrain_probe_and_classify_end_to_end(method, tmp_path):
  """Pre-training on moving digits with the preview (PNG + GIF) and the few-shot probe, --mode=probe,
  then --mode=classify from the checkpoint with cutmix on clips: results name the step and settings."""
  pre = clip_config(method, **{"total_steps": 6, "image_every": 6, "probe_every": 6, "checkpoint_every": 6,
                               "data.train_split": "train[:100]", "data.eval_split": "test[:30]",
                               "probe.train_split": "train[:100]", "probe.eval_split": "test[:30]",
                               "model.masking": "tube" if method == "umd" else "random"})
  out = train.pretrain(pre, str(tmp_path / "pre"))
  assert out["step"] == 6 and np.isfinite(out["last_loss"])
  assert (tmp_path / "pre" / "images" / "reconstruction_00000006.gif").exists()
  result = probe.run(clip_config(method, **{"probe.train_split": "train[:100]", "probe.eval_split": "test[:30]",
                                            "probe.linear_epochs": 2, "probe.linear_warmup_epochs": 1,
                                            "probe.sweep": True, "probe.sweep_ts": (0, 100)}),
                     str(tmp_path / "pre"))
  assert result["step"] == 6 and 0 <= result["linear"]["top1"] <= 1
  sweep = np.asarray(result["sweep"]["accuracy"])  # DDAE's (block, t) grid on clips
  assert sweep.shape == (len(result["sweep"]["blocks"]), 2) and ((0 <= sweep) & (sweep <= 1)).all()
  cls = clip_config(method, **{"init_from": str(tmp_path / "pre"), "batch_size": 40, "classify.epochs": 1,
                               "classify.warmup_epochs": 0, "classify.eval_every_epochs": 1,
                               "classify.randaugment_ops": 0, "classify.erase_prob": 0.0,
                               "classify.eval_batch_size": 120, "data.train_split": "train[:100]",
                               "data.eval_split": "test[:30]"})
  got = classify.run(cls, str(tmp_path / "cls"))
  assert got["step"] == 400 // 40 and got["init"]["step"] == 6 and 0 <= got["top1"] <= 1
  saved = json.loads((tmp_path / "cls" / "classify" / "results.json").read_text())
  assert saved["top1"] == pytest.approx(got["top1"]) and saved["config"]["data"]["frames"] == 4


def test_clip_inpainting_masks_hide_what_they_say():
  config = clip_config(**{"data.frames": 8, "data.image_size": 8, "sample.inpaint_ratio": 0.5})
  future = inpainting.inpaint_mask(config, "future", 2, jax.random.PRNGKey(0))
  assert future.shape == (2, 8, 8, 8, 1)
  assert (future[:, :4] == 1).all() and (future[:, 4:] == 0).all()  # 2 of the 4 token frames: the last 4 frames
  assert inpainting.masked_patch_count(config, future) == 2 * 2 * 2
  center = inpainting.inpaint_mask(config, "center", 2, jax.random.PRNGKey(0))
  assert (center == center[:, :1]).all() and center[0, 0, 2:6, 2:6].max() == 0 and center[0, 0, 0].min() == 1
  random = inpainting.inpaint_mask(config, "random", 2, jax.random.PRNGKey(0))
  assert inpainting.masked_patch_count(config, random) == 16 - int(16 * 0.5)
  assert inpainting.future_frames(4, 0.1) == 1 and inpainting.future_frames(4, 0.99) == 3  # never none, never all


def test_clips_are_scored_frame_by_frame_over_their_filled_frames():
  rng = np.random.default_rng(0)
  original = jnp.asarray(rng.uniform(-1, 1, (3, 4, 8, 8, 1)), jnp.float32)
  filled = original + jnp.asarray(rng.normal(0, 0.1, original.shape), jnp.float32)
  known = np.ones((3, 4, 8, 8, 1), np.float32)
  known[:, 2:, 2:6, 2:6] = 0  # frames 2 and 3 have a hole
  sums = inpainting._score_sums(filled, original, jnp.asarray(known), jnp.array([0, 1, 5]), None, n=2)
  psnr, ssim = inpainting.region_scores(jnp.clip(filled, -1, 1).reshape(12, 8, 8, 1), original.reshape(12, 8, 8, 1),
                                        jnp.asarray(known).reshape(12, 8, 8, 1))
  psnr = np.asarray(psnr).reshape(3, 4)
  assert float(sums["psnr"]) == pytest.approx(psnr[:2, 2:].mean(axis=1).sum(), rel=1e-5)  # row 2 is padding
  np.testing.assert_allclose(np.asarray(sums["psnr_frames"])[2:], psnr[:2, 2:].sum(axis=0), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(sums["scored_frames"]), [0, 0, 2, 2])
  assert float(sums["ssim"]) == pytest.approx(np.asarray(ssim).reshape(3, 4)[:2, 2:].mean(axis=1).sum(), rel=1e-5)


def test_moving_digits_judge_reads_the_direction_of_real_clips_and_not_of_shuffled_ones():
  test_set = sources.MovingDigitsSource("test", frames=8, size=16)
  clips = np.stack([test_set[i]["image"] for i in range(40)])
  labels = np.array([test_set[i]["label"] for i in range(40)])
  np.testing.assert_array_equal(test_set.judge(clips), labels)
  np.testing.assert_array_equal(test_set.judge(clips[:, ::-1]), labels ^ 1)  # played backwards: the opposite way


def test_clip_sampling_and_inpainting_end_to_end(tmp_path):
  """An unconditional clip model inpaints the future (and the centre) of test clips, scored per
  frame, with the PNG and the animation; fine-tuned class-conditionally it samples clips scored by
  the direction they move in (moving digits' judge, 100% on real clips)."""
  base = {"total_steps": 4, "data.train_split": "train[:100]", "data.eval_split": "test[:16]", "sample.batch_size": 16,
          "sample.steps": 4, "sample.inpaint_images": 16, "sample.prediction": "eps"}
  train.pretrain(clip_config(**base), str(tmp_path / "pre"))
  got = generate.run(clip_config(**base, **{"sample.inpaint": "future"}), str(tmp_path / "pre"))["inpaint"]
  assert got["images"] == 16 and got["psnr_per_frame"][:2] == [None, None] and len(got["psnr_per_frame"]) == 4
  assert got["psnr"] == pytest.approx(np.mean(got["psnr_per_frame"][2:]), rel=1e-5)
  assert (tmp_path / "pre" / "samples" / "inpaint.gif").exists()
  ft = {**base, "init_from": str(tmp_path / "pre"), "model.num_classes": 4, "corruption.label_dropout": 0.1,
        "sample.num_samples": 8, "sample.classifier_score": True, "sample.grid_classes": 4, "sample.grid_per_class": 1}
  train.finetune(clip_config(**ft), str(tmp_path / "ft"))
  result = generate.run(clip_config(**ft), str(tmp_path / "ft"))
  assert result["npz"].endswith("samples_8x4x8x8x1.npz") and (tmp_path / "ft" / "samples" / "grid.gif").exists()
  assert result["classifier_accuracy_on_real_test"] == 1.0 and result["classifier"].startswith("direction of motion")


def test_the_video_experiment_runs_every_stage_and_resumes(tmp_path):
  """experiments/video.py --quick: every method's stages and the from-scratch baseline, the table;
  run again, it reads every stage's result back (nothing retrained)."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import video as experiment  # noqa: PLC0415
  record = experiment.main(["--quick", "--out", str(tmp_path)])
  results = record["results"]
  assert set(results) == {"umd", "mae", "diffmae", "scratch", "frame-wise"}
  assert (tmp_path / "runs" / "framewise_s0" / "checkpoints").exists()
  assert results["scratch"][0]["finetuned"] == json.loads(
      (tmp_path / "runs" / "scratch_s0" / "classify" / "results.json").read_text())["top1"]
  scratch = json.loads((tmp_path / "runs" / "scratch_s0" / "classify" / "results.json").read_text())
  assert scratch["init"] == {"workdir": "", "step": 0, "scratch": True}
  assert results["umd"][0]["inpainter"] == "repaint" and results["mae"][0]["inpainter"] == "one-shot fill"
  assert len(results["diffmae"][0]["future_psnr_per_frame"]) == 8  # frames of the clip, the first 4 given
  table = (tmp_path / "summary.md").read_text()
  assert "| fine-tuned top-1 % |" in table and "Linear probe on pixels" in table
  before = {p: p.stat().st_mtime for p in tmp_path.glob("runs/*/*.json")}
  again = experiment.main(["--quick", "--out", str(tmp_path)])
  assert again["results"] == json.loads(json.dumps(record["results"]))
  assert {p: p.stat().st_mtime for p in tmp_path.glob("runs/*/*.json")} == before


def test_classify_from_scratch_is_refused_beside_init_from():
  with pytest.raises(checks.ConfigError, match=r"classify.scratch=True: trains from the initialisation, yet "
                                               r"init_from='w' is set: leave one of them"):
    checks.check(clip_config(**{"classify.scratch": True, "init_from": "w", "classify.randaugment_ops": 0,
                                "classify.erase_prob": 0.0}), "classify")


def _write_video(path, frames: int, shift: int, size=(24, 32)):
  """An MPEG-4 file of a bright 8×8 square moving `shift` pixels a frame to the right."""
  import av  # noqa: PLC0415
  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(str(path), "w") as container:
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv420p"
    for f in range(frames):
      image = np.zeros(size + (3,), np.uint8)
      image[4:12, shift * f:shift * f + 8] = 255
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def _video_folder(root, per_class=3):
  for c, name in enumerate(["slow", "fast"]):
    for i in range(per_class):
      _write_video(root / name / f"{name}{i}.mp4", frames=12 + 4 * i, shift=1 + c)
  (root / "fast" / "broken.mp4").write_bytes(b"not a video")
  (root / "slow" / "notes.txt").write_text("ignored: not a video extension")


def test_a_video_folder_samples_strided_windows_and_skips_what_cannot_be_decoded(tmp_path, caplog):
  from umd_jax.data import video  # noqa: PLC0415
  _video_folder(tmp_path / "videos")
  config = clip_config(**{"data.name": "video_folder", "data.data_dir": str(tmp_path / "videos"), "data.channels": 3,
                          "data.frames": 4, "data.frame_stride": 2, "data.image_size": 16, "data.num_classes": 2})
  source = sources.make_source(config.data, "train")
  assert len(source) == 7 and source.class_names == ["fast", "slow"]
  assert sorted(source.labels.tolist()) == [0] * 4 + [1] * 3
  record = source[source.files.index(str(tmp_path / "videos" / "slow" / "slow0.mp4"))]
  clip = record["image"]
  assert clip.count() == 12 and clip.window(0, 12).tolist() == [0, 2, 4, 6] and clip.window(6, 12).tolist() == [6, 8, 10, 11]
  centre = clip.centre()  # starts 0..5 fit the whole window: the centre start is 2
  assert centre.shape == (4, 24, 32, 3)
  np.testing.assert_array_equal(centre[:, 8].mean(axis=-1).argmax(axis=1), [2, 4, 6, 8])  # the square's left edge
  views = clip.views(3)
  np.testing.assert_array_equal([v[0, 8].mean(axis=-1).argmax() for v in views], [0, 2, 5])  # starts 0, 2.5 -> 2, 5
  batch = pipeline.EvalPreprocess(16).map(record)["image"]
  assert batch.shape == (4, 16, 16, 3) and -1 <= batch.min() and batch.max() <= 1
  # the unreadable file: skipped for the next readable record, counted, never zeros
  broken = source[source.files.index(str(tmp_path / "videos" / "fast" / "broken.mp4"))]
  out = pipeline.EvalPreprocess(16).map(broken)
  assert out["image"].shape == (4, 16, 16, 3) and np.abs(out["image"]).sum() > 0
  assert str(tmp_path / "videos" / "fast" / "broken.mp4") in sources.DECODE_FAILURES
  views = pipeline.EvalViews(16, 3).map(record)["image"]
  assert views.shape == (3, 4, 16, 16, 3)


def test_kinetics_csv_labels_the_files_it_names_and_counts_the_missing(tmp_path):
  _write_video(tmp_path / "k" / "abc_000001_000011.mp4", frames=8, shift=1)
  _write_video(tmp_path / "k" / "xyz_000005_000015.mp4", frames=8, shift=2)
  (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end,split\nwaving,abc,1,11,train\n"
                                  "juggling,xyz,5,15,train\nwaving,gone,0,10,train\njuggling,xyz,5,15,validate\n")
  config = clip_config(**{"data.name": "video_folder", "data.data_dir": str(tmp_path / "k"), "data.channels": 3,
                          "data.video_csv": str(tmp_path / "k.csv"), "data.num_classes": 2})
  source = sources.make_source(config.data, "train")
  assert len(source) == 2 and source.class_names == ["juggling", "waving"]
  assert [os.path.basename(f) for f in source.files] == ["abc_000001_000011.mp4", "xyz_000005_000015.mp4"]
  assert source.labels.tolist() == [1, 0]
  with pytest.raises(sources.DataError, match=r"has no rows of split 'val' \(its splits: \['train', 'validate'\]\): pass "
                                              r"this split's CSV"):
    sources.make_source(config.data, "val")


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, r"video folder data.data_dir='.*missing' does not exist"),
    (lambda p: (p / "missing" / "a").mkdir(parents=True), r"video folder '.*missing' has no video files"),
])
def test_an_empty_or_missing_video_folder_is_one_line(tmp_path, setup, message):
  setup(tmp_path)
  config = clip_config(**{"data.name": "video_folder", "data.data_dir": str(tmp_path / "missing"), "data.channels": 3})
  with pytest.raises(sources.DataError, match=message):
    sources.make_source(config.data, "train")


def test_a_folder_of_unreadable_videos_stops_with_one_line(tmp_path):
  for i in range(2):
    (tmp_path / "v" / "a").mkdir(parents=True, exist_ok=True)
    (tmp_path / "v" / "a" / f"{i}.mp4").write_bytes(b"nothing")
  config = clip_config(**{"data.name": "video_folder", "data.data_dir": str(tmp_path / "v"), "data.channels": 3,
                          "data.num_classes": 1})
  source = sources.make_source(config.data, "train")
  with pytest.raises(sources.DataError, match=r"no video can be decoded \(2 tried\)"):
    pipeline.EvalPreprocess(8).map(source[0])


def test_a_tfds_video_dataset_gives_clips_of_its_encoded_frames():
  import tensorflow_datasets as tfds  # noqa: PLC0415
  config = clip_config(**{"data.name": "ucf101", "data.data_dir": "/unused", "data.channels": 3, "data.frames": 4,
                          "data.frame_stride": 2, "data.image_size": 16, "data.num_classes": 101})
  with tfds.testing.mock_data(num_examples=3):
    source = sources.make_source(config.data, "train")
    record = source[1]
    clip = pipeline.EvalPreprocess(16).map(record)["image"]
    assert clip.shape == (4, 16, 16, 3) and 0 <= record["label"] < 101
    with pytest.raises(sources.DataError, match=r"data 'ucf101' gives clips but data.frames=1: set data.frames >= 2"):
      sources.make_source(tiny_config(**{"data.name": "ucf101", "data.data_dir": "/unused", "data.num_classes": 101}).data,
                          "train")


def test_multi_view_evaluation_averages_the_views_softmax(one_device):
  """classify_step's evaluation of (B, V, ...) batches: the mean of the views' softmax decides."""
  from umd_jax import classify_step, sharding  # noqa: PLC0415
  config = clip_config(**{"classify.randaugment_ops": 0, "classify.erase_prob": 0.0})
  mesh = sharding.make_mesh(config.mesh, one_device)
  run = classify_step.build_run(config, mesh, 100)
  params = run.state.params
  rng = np.random.default_rng(0)
  clips = jnp.asarray(rng.uniform(-1, 1, (3, 2, 4, 8, 8, 1)), jnp.float32)
  labels, index = jnp.array([0, 1, 2]), jnp.arange(3)
  logits = classify_step.logits_fn(config)(nnx.merge(run.graphdef, params), clips.reshape(6, 4, 8, 8, 1))
  mean = np.asarray(jax.nn.softmax(logits.reshape(3, 2, -1), axis=-1).mean(axis=1))
  top1, _ = run.evaluate(params, clips, labels, index, 3)
  assert int(top1) == int((mean.argmax(axis=1) == np.asarray(labels)).sum())


def test_the_mae_st_sized_presets_check_and_cut_1568_tokens():
  from configs import video_l  # noqa: PLC0415
  for arg in ("umd", "mae", "diffmae", "mae,classify"):
    config = video_l.get_config(arg)
    checks.check(config, "classify" if "classify" in arg else "pretrain")
    model = nnx.eval_shape(lambda: methods.get(config).build(config, nnx.Rngs(0)))
    assert model.num_patches == 8 * 14 * 14 == 1568 and model.geometry.token_dim(3) == 2 * 16 * 16 * 3
  assert video_l.get_config("mae").corruption.clean_mask_ratio == 0.9
  assert video_l.get_config("mae,classify").classify.test_views == 7


def test_a_clip_config_on_an_image_checkpoint_is_one_line_naming_the_frames(tmp_path):
  train.pretrain(tiny_config(**{"model.variant": "Mu/4", "total_steps": 2}), str(tmp_path / "images"))
  with pytest.raises(Exception, match=r"data.frames: 1 -> 4") as raised:
    probe.run(clip_config(), str(tmp_path / "images"))
  assert "\n" not in str(raised.value) and "use the config the run was trained with" in str(raised.value)
  assert not (tmp_path / "images" / "probe").exists()


def test_a_folder_of_videos_pretrains_and_classifies_with_several_views(tmp_path):
  """The README's folder-of-videos path at toy size: pre-training reads strided windows of MPEG-4
  files (one of them unreadable), classification averages 3 evenly spaced windows at test."""
  _video_folder(tmp_path / "videos", per_class=4)
  data_keys = {"data.name": "video_folder", "data.data_dir": str(tmp_path / "videos"), "data.channels": 3,
               "data.frames": 4, "data.frame_stride": 2, "data.image_size": 16, "data.num_classes": 2,
               "data.eval_split": "train", "batch_size": 8}
  out = train.pretrain(clip_config(**data_keys, total_steps=2, probe_every=0), str(tmp_path / "pre"))
  assert out["step"] == 2 and np.isfinite(out["last_loss"])
  got = classify.run(clip_config(**data_keys, **{"init_from": str(tmp_path / "pre"), "classify.epochs": 1,
                                                 "classify.warmup_epochs": 0, "classify.eval_every_epochs": 1,
                                                 "classify.randaugment_ops": 0, "classify.erase_prob": 0.0,
                                                 "classify.test_views": 3, "classify.eval_batch_size": 16}),
                     str(tmp_path / "cls"))
  assert got["step"] == 9 // 8 and got["images"] == 9 and 0 <= got["top1"] <= 1
  assert json.loads((tmp_path / "cls" / "classify" / "results.json").read_text())["config"]["classify"]["test_views"] == 3
