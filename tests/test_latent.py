"""Latent-space UMD end to end on CPU: encode -> pre-train -> fine-tune -> sample/decode -> FID, probe.

A tiny VAE (tests/fixtures/vae_tiny: 2× downsampling, 4 latent channels, diffusers-made weights)
encodes the digits at 16×16 RGB into 8×8×4 latents; the model is Mu/2 (16 tokens).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from umd_jax import checks, classify, data, encode, generate, latent, probe, sharding, train, train_step, weights
from umd_jax.data import latents as latent_data

import convert_vae_weights  # noqa: E402

TINY = os.path.join(os.path.dirname(__file__), "fixtures", "vae_tiny")


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vae") / "vae.npz")
  convert_vae_weights.main(TINY, path)
  return path


def latent_config(vae_file, **overrides):
  base = {"data.space": "latents", "data.image_size": 16, "data.channels": 3, "vae.weights": vae_file,
          "vae.downsample": 2, "vae.batch_size": 64, "diffusion.schedule": "linear", "sample.clip": False,
          "encode.shard_records": 600, "probe.train_split": "train", "probe.eval_split": "test",
          "probe.linear": False, "probe.fewshot_shots": (1, 5), "probe.fewshot_seeds": 1}
  return tiny_config(**{**base, **overrides})


@pytest.fixture(scope="module")
def encoded(vae_file, tmp_path_factory):
  out = tmp_path_factory.mktemp("latents")
  meta = encode.run(latent_config(vae_file), str(out))
  return out, meta


def test_encode_writes_both_views_of_every_image(encoded, vae_file):
  out, meta = encoded
  config = latent_config(vae_file)
  source = data.make_source(config.data, "train")
  assert meta["complete"] and meta["splits"]["train"] == {"records": len(source), "shards": 3}
  assert meta["latent_shape"] == [8, 8, 4] and meta["views"] == 2 and meta["scaling_factor"] == 0.18215
  lat = data.LatentSource(str(out), "train", latent.expected_metadata(config))
  assert len(lat) == len(source)
  vae = latent.Vae(vae_file, sharding.local_mesh())
  from flax import nnx
  net = nnx.merge(vae.graphdef, vae.params)
  for i in (0, 599, 600, len(source) - 1):  # first and last records of shards
    image = encode.adm_center_crop(source[i]["image"], 16).astype(np.float32) / 127.5 - 1
    mean, std = net.encode(np.stack([image, image[:, ::-1]]))
    record = lat[i]
    assert record["label"] == source[i]["label"]
    np.testing.assert_allclose(record["moments"][0], np.asarray(mean) * 0.18215, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(record["moments"][1], np.asarray(std) * 0.18215, rtol=1e-4, atol=1e-6)
  assert not np.allclose(lat[0]["moments"][0, 1], lat[0]["moments"][0, 0][:, ::-1], atol=1e-3)  # not a flipped latent
  stats = meta["channel_statistics"]
  assert len(stats["mean"]) == 4 and all(s > 0 for s in stats["std"])


def test_encode_resumes_shard_by_shard_and_refuses_other_settings(encoded, vae_file, tmp_path):
  out, _ = encoded
  work = tmp_path / "lat"
  import shutil
  shutil.copytree(out, work)
  keep = work / latent_data.shard_name("train", 0, 3)
  redo = work / latent_data.shard_name("train", 1, 3)
  before = keep.stat().st_mtime_ns
  redo.unlink()  # as if the run had stopped in shard 1
  (work / "train" / ".half-written.tmp-1").write_bytes(b"garbage")  # a crashed write is never read
  meta = encode.run(latent_config(vae_file), str(work))
  assert keep.stat().st_mtime_ns == before and redo.exists() and meta["complete"]
  assert redo.read_bytes() == (out / latent_data.shard_name("train", 1, 3)).read_bytes()
  with pytest.raises(latent.LatentError, match="other settings.*views"):
    encode.run(latent_config(vae_file, **{"encode.views": 1}), str(work))


def test_latent_source_refuses_a_set_of_another_vae_or_size(encoded, vae_file):
  out, _ = encoded
  config = latent_config(vae_file)
  wrong = {**latent.expected_metadata(config), "vae_sha256": "0" * 64}
  with pytest.raises(data.DataError, match="encoded with vae_sha256="):
    data.LatentSource(str(out), "train", wrong)
  with pytest.raises(data.DataError, match="image_size=16 but this run has 32"):
    data.LatentSource(str(out), "train", {**latent.expected_metadata(config), "image_size": 32})
  with pytest.raises(data.DataError, match="no metadata.json"):
    data.LatentSource(str(out / "train"), "train", {})


def test_latent_checks(vae_file):
  with pytest.raises(checks.ConfigError, match="data.latents='' is not set"):
    checks.check(latent_config(vae_file), "pretrain")
  with pytest.raises(checks.ConfigError, match="sample.inpaint='center' is for pixel-space"):
    checks.check(latent_config(vae_file, **{"sample.inpaint": "center"}), "generate")
  with pytest.raises(checks.ConfigError, match="4 latent channels and 2x downsampling"):
    checks.check(latent_config(vae_file, **{"vae.downsample": 8, "data.image_size": 64}), "probe")
  with pytest.raises(checks.ConfigError, match="gives latents of size 8, which are not divisible by the patch size 3"):
    checks.check(latent_config(vae_file, **{"model.variant": "Mu/3"}), "summary")
  with pytest.raises(checks.ConfigError, match="vae.weights='/nonexistent.npz' is not a file"):
    checks.check(latent_config("/nonexistent.npz"), "probe")
  with pytest.raises(checks.ConfigError, match="data.latents='gs://b/lat' is a URL"):
    checks.check(latent_config(vae_file, **{"data.latents": "gs://b/lat"}), "pretrain")
  with pytest.raises(latent.LatentError, match="takes no URLs"):
    encode.run(latent_config(vae_file), "gs://bucket/latents")
  checks.check(latent_config(""), "summary")  # the model's shape needs no file


def test_train_step_draws_the_posterior_sample(vae_file):
  """The step's input is mean + std·ε: with std = 0 it is the mean (the loss equals the pixel
  path's on that input), and ε is drawn from the step's key (same batch, same state: same loss)."""
  config = latent_config(vae_file, **{"data.latents": "x"})
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  run = train_step.build(config, mesh)
  state, step = run.state, run.step
  rng = np.random.default_rng(0)
  mean = rng.standard_normal((16, 8, 8, 4)).astype(np.float32)
  labels = np.zeros(16, np.int32)
  copy = lambda s: jax.tree.map(jnp.copy, s)
  _, m_zero = step(copy(state), {"image": mean, "std": np.zeros_like(mean), "label": labels})
  _, m_plain = step(copy(state), {"image": mean, "label": labels})
  _, m_a = step(copy(state), {"image": mean, "std": np.ones_like(mean), "label": labels})
  _, m_b = step(copy(state), {"image": mean, "std": np.ones_like(mean), "label": labels})
  assert float(m_a["loss"]) == float(m_b["loss"]) != float(m_zero["loss"])
  # the split of the key changes the corruption draws, so compare inputs, not losses, with std 0:
  assert np.isfinite(float(m_zero["loss"])) and np.isfinite(float(m_plain["loss"]))


def test_latent_run_end_to_end(encoded, vae_file, tmp_path):
  """pre-train on the latents -> resume exactly -> fine-tune -> sample, decode, FID -> probe."""
  out, _ = encoded
  one = jax.devices()[:1]
  base = {"data.latents": str(out), "optim.base_lr": 1e-2, "image_every": 4}
  pre = tmp_path / "pre"
  result = train.pretrain(latent_config(vae_file, **base), str(pre), devices=one)
  assert result["step"] == 4 and np.isfinite(result["last_loss"])
  assert (pre / "images" / "reconstruction_00000004.png").exists()
  # exact resume (the posterior draws and view choices included): from step 2 to 4 again
  import shutil
  shutil.copytree(pre, tmp_path / "half")
  shutil.rmtree(tmp_path / "half" / "checkpoints" / "4")
  resumed = train.pretrain(latent_config(vae_file, **base), str(tmp_path / "half"), devices=one)
  assert resumed["start_step"] == 2
  for a, b in zip(jax.tree.leaves(resumed["state"].params), jax.tree.leaves(result["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  from umd_jax.models import inception
  np.savez(tmp_path / "inception.npz", **inception.Inception(seed=0).weights)
  fine = tmp_path / "fine"
  ft = {**base, "init_from": str(pre), "model.num_classes": 10, "corruption.label_dropout": 0.1,
        "corruption.clean_fraction": 0.25, "corruption.noised_mask_ratio": 0.0, "total_steps": 2,
        "checkpoint_every": 2, "sample.num_samples": 12, "sample.batch_size": 8, "sample.steps": 4,
        "sample.grid_classes": 3, "sample.grid_per_class": 2, "sample.cfg_scale": 2.0,
        "data.eval_split": "test[:40]",  # FID's reference: 40 Inception images, not 297
        "sample.fid": True, "sample.inception_weights": str(tmp_path / "inception.npz"), "vae.batch_size": 4}
  train.finetune(latent_config(vae_file, **ft), str(fine), devices=one)
  res = generate.run(latent_config(vae_file, **ft), str(fine), devices=jax.devices()[:2])
  samples = np.load(res["npz"])
  assert samples["arr_0"].shape == (12, 16, 16, 3) and samples["arr_0"].dtype == np.uint8  # decoded pixels
  assert res["fid"] > 0 and res["fid_samples"] == 12
  # the decoded samples are the VAE's decoding of the sampled latents / scale
  config = latent_config(vae_file, **ft)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:2])
  graphdef, params = weights.load(config, str(fine), mesh)
  z = generate.make_sampler(config, graphdef, mesh)(params, jnp.arange(8, dtype=jnp.int32) % 10,
                                                     jax.random.fold_in(jax.random.PRNGKey(0), 0))
  vae = latent.load(config, mesh)
  from flax import nnx
  expected = np.clip(np.asarray(nnx.merge(vae.graphdef, vae.params).decode(np.asarray(z) / 0.18215)), -1, 1)
  np.testing.assert_allclose(samples["arr_0"][:8].astype(np.float32), np.round((expected + 1) * 127.5), atol=1.0)

  results = probe.run(latent_config(vae_file, **{"probe.baselines": True}), str(pre), devices=one)
  assert set(results["baselines"]) == {"latents", "random_init"}
  assert 0 <= results["fewshot"][5]["mean"] <= 1
  with open(pre / "probe" / "results.json") as f:
    assert json.load(f)["step"] == 4

  # recognition fine-tuning on the latents (evaluated on eval images encoded on the fly)
  cls = {**base, "init_from": str(pre), "batch_size": 64, "classify.epochs": 1, "classify.warmup_epochs": 0,
         "classify.eval_batch_size": 64, "data.eval_split": "test"}
  with pytest.raises(checks.ConfigError, match="classify.randaugment_ops=2 is pixel-space augmentation"):
    checks.check(latent_config(vae_file, **cls), "classify")
  cls.update({"classify.randaugment_ops": 0, "classify.erase_prob": 0.0})
  tuned = classify.run(latent_config(vae_file, **cls), str(tmp_path / "classify"), devices=one)
  assert tuned["step"] == 1500 // 64 and tuned["images"] == 297 and 0 <= tuned["top1"] <= tuned["top5"] <= 1
  assert tuned["init"] == {"workdir": str(pre), "step": 4}


def test_encode_reads_jpeg_folders_with_adm_crops(vae_file, tmp_path):
  """An image folder of JPEGs of several sizes: every file encoded once per view, in order, from
  ADM's centre crop of the full decode."""
  from PIL import Image
  rng = np.random.default_rng(0)
  sizes = [(40, 30), (17, 64), (33, 33), (100, 20), (21, 50)]
  for i, (w, h) in enumerate(sizes):
    (tmp_path / "images" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "images" / f"c{i % 2}" / f"{i}.jpg")
  config = latent_config(vae_file, **{"data.name": "folder", "data.data_dir": str(tmp_path / "images"),
                                      "data.num_classes": 2, "encode.shard_records": 2, "vae.batch_size": 8})
  meta = encode.run(config, str(tmp_path / "latents"))
  assert meta["splits"]["train"] == {"records": 5, "shards": 3} and meta["num_classes"] == 2
  lat = data.LatentSource(str(tmp_path / "latents"), "train", latent.expected_metadata(config))
  source = data.make_source(config.data, "train")
  vae = latent.Vae(vae_file, sharding.local_mesh())
  from flax import nnx
  net = nnx.merge(vae.graphdef, vae.params)
  for i in range(5):
    image = encode.adm_center_crop(source[i]["image"].full(), 16)
    assert image.shape == (16, 16, 3)
    mean, _ = net.encode(image[None].astype(np.float32) / 127.5 - 1)
    np.testing.assert_allclose(lat[i]["moments"][0, 0], np.asarray(mean[0]) * 0.18215, rtol=1e-4, atol=1e-5)
    assert lat[i]["label"] == source[i]["label"]


def test_adm_center_crop_halves_then_resizes_the_short_side():
  """A 600×160 image to 32: halved with BOX while the short side is >= 64 (160 -> 80 -> 40),
  resized to short side 32 with BICUBIC (150×40 -> 120×32), centre 32×32 taken."""
  from PIL import Image
  image = np.tile(np.linspace(0, 255, 600).astype(np.uint8)[None, :, None], (160, 1, 3))
  out = encode.adm_center_crop(image, 32)
  pil = Image.fromarray(image)
  for _ in range(2):
    pil = pil.resize((pil.size[0] // 2, pil.size[1] // 2), resample=Image.BOX)
  expected = np.asarray(pil.resize((120, 32), resample=Image.BICUBIC))[:, 44:76]
  np.testing.assert_array_equal(out, expected)
