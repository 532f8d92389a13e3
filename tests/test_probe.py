"""Probes (METHOD.md §6): ridge and linear heads against references, LARS, features, the probe mode."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.linear_model import LogisticRegression

from conftest import tiny_config
from umd_jax import checkpoint, data, probe, sharding, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny UMD pre-trained for a few steps (adaLN weights no longer zero)."""
  workdir = tmp_path_factory.mktemp("pretrained")
  config = tiny_config(**{"total_steps": 6, "checkpoint_every": 6, "optim.base_lr": 1e-2})
  train.pretrain(config, workdir, devices=jax.devices()[:1])
  return config, workdir


def probe_config(**overrides):
  base = {"probe.train_split": "train", "probe.eval_split": "test", "probe.batch_size": 64,
          "probe.fewshot_shots": (1, 5), "probe.fewshot_seeds": 2, "probe.linear_epochs": 10,
          "probe.linear_base_lr": 10.0,
          "probe.linear_warmup_epochs": 1, "probe.linear_batch_size": 128, "probe.linear_augment": False}
  return tiny_config(**{**base, **overrides})


def separable(n=600, d=16, k=4, seed=0):
  rng = np.random.default_rng(seed)
  centers = 6.0 * rng.normal(size=(k, d))
  y = rng.integers(0, k, n)
  return (centers[y] + 0.3 * rng.normal(size=(n, d))).astype(np.float32), y.astype(np.int32)  # margins >> noise


def test_ridge_is_the_closed_form_solution():
  rng = np.random.default_rng(0)
  x, y, l2 = rng.normal(size=(50, 8)), rng.normal(size=(50, 3)), 7.0
  w = np.asarray(probe.ridge_solve(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), l2))
  # The same minimiser from an independent route: least squares on the augmented system.
  aug_x, aug_y = np.vstack([x, np.sqrt(l2) * np.eye(8)]), np.vstack([y, np.zeros((8, 3))])
  np.testing.assert_allclose(w, np.linalg.lstsq(aug_x, aug_y, rcond=None)[0], rtol=1e-4, atol=1e-5)


def test_probes_separate_separable_features():
  all_x, all_y = separable(n=1200, seed=0)
  x, y, xt, yt = all_x[:600], all_y[:600], all_x[600:], all_y[600:]
  cfg = probe_config(**{"probe.linear_epochs": 20, "probe.linear_base_lr": 10.0}).probe
  assert probe.linear_probe_features(x, y, xt, yt, cfg, num_classes=4)["top1"] >= 0.99
  few = probe.fewshot(x, y, xt, yt, shots=[5], seeds=3, l2=1.0, num_classes=4)
  assert few[5]["mean"] >= 0.99


def test_linear_probe_matches_logistic_regression_on_digit_pixels():
  config = probe_config()
  mesh = sharding.make_mesh(config.mesh)
  train_feats, test_feats = probe.pixel_features(config, "train", mesh), probe.pixel_features(config, "test", mesh)
  cfg = probe_config(**{"probe.linear_epochs": 100, "probe.linear_warmup_epochs": 5, "probe.linear_base_lr": 10.0,
                        "probe.linear_batch_size": 256}).probe
  # sharded over 8 devices, padded rows after the real ones
  assert train_feats.x.shape[1] > train_feats.n and len(train_feats.x.sharding.device_set) == 8
  ours = probe.linear_probe_features(train_feats.feature(0), train_feats.y, test_feats.feature(0), test_feats.y,
                                     cfg, num_classes=10)["top1"]
  tr, ytr = np.asarray(train_feats.x)[:, :train_feats.n], train_feats.y
  te, yte = np.asarray(test_feats.x)[:, :test_feats.n], test_feats.y
  mean, std = tr[0].mean(0), tr[0].std(0) + 1e-6
  reference = LogisticRegression(max_iter=2000).fit((tr[0] - mean) / std, ytr).score((te[0] - mean) / std, yte)
  assert abs(ours - reference) <= 0.015, (ours, reference)


def test_lars_matches_its_definition():
  lr, wd, mom, tc = 0.1, 0.01, 0.9, 0.001
  params = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.array([0.5, -0.5])}
  grads = [{"w": jnp.array([[0.1, -0.2], [0.3, 0.4]]), "b": jnp.array([1.0, 2.0])},
           {"w": jnp.array([[0.0, 0.5], [-0.1, 0.2]]), "b": jnp.array([-1.0, 0.5])}]
  tx = probe.lars(lr, wd, mom, tc)
  state, p = tx.init(params), params
  w, b = np.asarray(params["w"]), np.asarray(params["b"])
  mu_w, mu_b = np.zeros_like(w), np.zeros_like(b)
  for g in grads:
    upd, state = tx.update(g, state, p)
    p = optax.apply_updates(p, upd)
    gw = np.asarray(g["w"]) + wd * w                         # decay only on the 2-D weight
    mu_w = mom * mu_w + tc * np.linalg.norm(w) / np.linalg.norm(gw) * gw
    mu_b = mom * mu_b + np.asarray(g["b"])                   # bias: no decay, no trust ratio
    w, b = w - lr * mu_w, b - lr * mu_b
    np.testing.assert_allclose(np.asarray(p["w"]), w, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(p["b"]), b, rtol=1e-6)


def test_features_identical_on_one_and_eight_devices(trained):
  config, workdir = trained
  config = probe_config()
  feats = {}
  for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
    mesh = sharding.make_mesh(config.mesh, devices)
    graphdef, params = probe.load_backbone(config, trained[1], mesh)
    feats[name] = probe.Extractor(config, graphdef, t=100, blocks=[-1, 0, 2], mesh=mesh)(params, "test", progress=False)
  # 297 test digits in order (the padding after them is left out); the batch is 64, so 320 rows
  assert feats["one"].x.shape == (3, 320, 32) and feats["one"].n == 297
  test_labels = np.array([r["label"] for r in data.make_source(config.data, "test")])
  np.testing.assert_array_equal(feats["one"].y, test_labels)
  np.testing.assert_array_equal(feats["eight"].y, test_labels)
  np.testing.assert_allclose(np.asarray(feats["one"].x)[:, :297], np.asarray(feats["eight"].x)[:, :297],
                             rtol=1e-4, atol=1e-5)


def test_timestep_index_conditions_the_features(trained):
  config, workdir = trained
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  graphdef, params = probe.load_backbone(config, workdir, mesh)
  model = nnx.merge(graphdef, params)
  x = next(iter(data.make_batches(config.data, data.make_source(config.data, "test"), global_batch=16,
                                  sharding=sharding.batch_sharding(mesh), seed=0, train=False)))["image"]
  clean = model.features(x, jnp.zeros((16,), jnp.int32))
  told_noisy = model.features(x, jnp.full((16,), 501, jnp.int32))  # same pixels, other timestep index
  assert float(jnp.abs(clean["rep"] - told_noisy["rep"]).max()) > 1e-4
  assert clean["blocks"].shape == (3, 16, 32)


def test_probe_mode_writes_results_with_sweep_and_baselines(trained):
  _, workdir = trained
  config = probe_config(**{"probe.sweep": True, "probe.sweep_ts": (0, 200), "probe.sweep_shots": 5,
                           "probe.baselines": True})
  results = probe.run(config, workdir, devices=jax.devices()[:1])
  saved = json.loads((workdir / "probe" / "results.json").read_text())
  assert saved["linear"]["top1"] == results["linear"]["top1"] and 0.0 <= saved["linear"]["top1"] <= 1.0
  assert set(saved["fewshot"]) == {"1", "5"} and len(saved["fewshot"]["5"]["per_seed"]) == 2
  assert np.asarray(saved["sweep"]["accuracy"]).shape == (4, 2)  # rep + 3 blocks, 2 timesteps
  assert saved["sweep"]["best"]["accuracy"] == max(map(max, saved["sweep"]["accuracy"]))
  assert (workdir / "probe" / "sweep.png").exists()
  assert saved["baselines"]["pixels"]["linear"]["top1"] > 0.8  # digits are nearly linear in pixels
  assert set(saved["baselines"]) == {"pixels", "random_init"}
  cached = sorted(f.name for f in (workdir / "probe" / "features_step6").iterdir())
  key = probe.cache_key(config)  # the noise seed and a hash of the other settings name each file too
  assert f"test_t-1_blocks-1_n0_seed0_{key}.npz" in cached and f"train_t200_blocks-1_0_1_2_n0_seed0_{key}.npz" in cached
  again = probe.run(config, workdir, devices=jax.devices()[:1])  # from the cached features
  assert again["fewshot"][5]["per_seed"] == results["fewshot"][5]["per_seed"]


def test_online_linear_probe_with_augmentation(trained):
  config, workdir = trained
  config = probe_config(**{"probe.linear_augment": True, "probe.linear_epochs": 1, "probe.linear_crop_area_min": 0.5})
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  graphdef, params = probe.load_backbone(config, workdir, mesh)
  extractor = probe.Extractor(config, graphdef, t=-1, blocks=[-1], mesh=mesh)
  te = extractor(params, "test", progress=False)
  acc = probe.linear_probe_online(config, extractor, params, test_x=te.feature(0), test_y=te.y, num_classes=10)
  assert 0.0 <= acc["top1"] <= acc["top5"] <= 1.0


@pytest.mark.parametrize("overrides,error,message", [
    ({"probe.block": 3}, ValueError, r"probe.block=3: use -1 \(rep\) or 0..2"),
    ({"probe.t": 1000}, ValueError, r"probe.t=1000: use -1 \(clean image\) or a timestep in \[0, 1000\)"),
    ({"probe.fewshot_shots": (500,)}, probe.ProbeError, "500 shots per class asked"),
    ({"model.variant": "Ti/2"}, checkpoint.CheckpointError, r"parameters do not match \(.*saved \(32, 32\) float32, model \(64, 64\) float32.*changed config: "
     r"model.variant: 'Mu/2' -> 'Ti/2'"),
])
def test_bad_probe_requests_are_clear_errors(trained, overrides, error, message):
  with pytest.raises(error, match=message):
    probe.run(probe_config(**{"probe.linear": False, **overrides}), trained[1], devices=jax.devices()[:1])


def test_probe_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="has no checkpoint: pre-train there first"):
    probe.run(probe_config(), tmp_path, devices=jax.devices()[:1])


def test_empty_split_is_a_clear_error(tmp_path, trained):
  (tmp_path / "images" / "test" / "a").mkdir(parents=True)
  config = probe_config(**{"data.name": "folder", "data.data_dir": str(tmp_path / "images")})
  with pytest.raises(data.DataError, match="no readable images"):
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    graphdef, params = probe.load_backbone(config, trained[1], mesh)
    probe.Extractor(config, graphdef, t=-1, blocks=[-1], mesh=mesh)(params, "test")


def test_colab_notebook_runs_top_to_bottom(trained, monkeypatch, tmp_path):
  import os

  import convert_vae_weights
  import nbclient
  import nbformat
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  monkeypatch.setenv("UMD_WORKDIR", str(trained[1]))
  monkeypatch.setenv("UMD_QUICK", "1")
  # the DiT section: the tiny reference-made DiT fixture, converted and probed through the tiny VAE
  convert_vae_weights.main(os.path.join(root, "tests", "fixtures", "vae_tiny"), str(tmp_path / "vae.npz"))
  monkeypatch.setenv("UMD_DIT_SOURCE", os.path.join(root, "tests", "fixtures", "dit_tiny"))
  monkeypatch.setenv("UMD_VAE_WEIGHTS", str(tmp_path / "vae.npz"))
  monkeypatch.setenv("UMD_DIT_WORKDIR", str(tmp_path / "dit"))
  nb = nbformat.read(os.path.join(root, "notebooks", "probe.ipynb"), as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.join(root, "notebooks")}}).execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "1-shot:" in text and "linear probe:" in text and "best:" in text
  assert "DiT Mu/2 block 1, t=121, 5-shot:" in text and (tmp_path / "dit" / "checkpoints").exists()
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2  # the sweep heatmap and the PCA / t-SNE scatter


def test_probe_names_the_step_it_read_and_caches_by_every_setting(tmp_path):
  """A damaged latest step: the probe falls back to the previous one and says so in results.json
  and the cache's folder; features at t >= 0 are cached per noise seed (and other settings)."""
  import shutil
  workdir = tmp_path / "run"
  config = probe_config(**{"total_steps": 4, "checkpoint_every": 2, "probe.linear": False, "probe.t": 100,
                           "probe.block": 1, "probe.max_train_images": 200, "probe.max_eval_images": 100})
  train.pretrain(config, workdir, devices=jax.devices()[:1])
  for f in (workdir / "checkpoints" / "4").glob("state/**/*"):  # step 4's arrays: truncated garbage
    if f.is_file() and f.stat().st_size > 0 and "METADATA" not in f.name:
      f.write_bytes(b"\0" * 7)
  results = probe.run(config, workdir, devices=jax.devices()[:1])
  assert results["step"] == 2 and json.loads((workdir / "probe" / "results.json").read_text())["step"] == 2
  assert sorted(p.name for p in (workdir / "probe").iterdir() if p.is_dir()) == ["features_step2"]
  assert results["config"]["probe"]["noise_seed"] == 0  # every setting it came from
  other_seed = probe_config(**{**{"total_steps": 4, "checkpoint_every": 2, "probe.linear": False, "probe.t": 100,
                                  "probe.block": 1, "probe.max_train_images": 200, "probe.max_eval_images": 100},
                               "probe.noise_seed": 1})
  again = probe.run(other_seed, workdir, devices=jax.devices()[:1])
  cached = sorted(p.name for p in (workdir / "probe" / "features_step2").iterdir())
  assert len(cached) == 4 and sum("_seed1_" in n for n in cached) == 2  # seed 1 computed, not seed 0's reused
  assert again["fewshot"] != results["fewshot"]
  shutil.rmtree(workdir / "probe" / "features_step2")
  fresh = probe.run(other_seed, workdir, devices=jax.devices()[:1])
  assert fresh["fewshot"] == again["fewshot"]


def test_too_few_training_images_for_the_shots_names_the_cap_and_writes_nothing(trained):
  _, workdir = trained
  probe_dir = workdir / "probe"
  before = sorted(str(p) for p in probe_dir.rglob("*")) if probe_dir.exists() else []
  config = probe_config(**{"probe.max_train_images": 30, "probe.fewshot_shots": (1, 5), "probe.t": 300,
                           "probe.block": 0})
  with pytest.raises(probe.ProbeError, match=r"probe.max_train_images=30 leaves \d images of class \d+, fewer than "
                                             r"the 5 shots asked"):
    probe.run(config, workdir, devices=jax.devices()[:1])
  assert (sorted(str(p) for p in probe_dir.rglob("*")) if probe_dir.exists() else []) == before
