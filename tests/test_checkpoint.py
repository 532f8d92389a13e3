"""Checkpoint integrity: flipped bytes (same length) in the array data or the data-iterator part are
found by the checksums saved with each step, and the run falls back to the previous step; the
workdir lock; keep_checkpoints; read-only uses create nothing."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import processes
from conftest import tiny_config
from test_main import run_main
from umd_jax import checkpoint, sharding, train, train_step, weights


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny run with checkpoints at steps 2 and 4, and a pristine copy to damage per test."""
  root = tmp_path_factory.mktemp("ckpt")
  config = tiny_config(**{"total_steps": 4, "checkpoint_every": 2})
  result = train.pretrain(config, root / "run", devices=jax.devices()[:1])
  return config, root / "run", result


@pytest.fixture
def fresh(run, tmp_path):
  import shutil
  config, workdir, result = run
  shutil.copytree(workdir, tmp_path / "run")
  return config, tmp_path / "run", result


def _flip(path, offset_fraction=0.5, count=16):
  """Flip `count` bytes in the middle of a file, keeping its length."""
  data = bytearray(path.read_bytes())
  start = int(len(data) * offset_fraction)
  for i in range(start, min(start + count, len(data))):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _largest_array_file(step_dir):
  files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
  return max(files, key=lambda f: f.stat().st_size)


def test_flipped_bytes_in_the_arrays_fall_back_to_the_previous_step(fresh):
  config, workdir, full = fresh
  _flip(_largest_array_file(workdir / "checkpoints" / "4"))
  with pytest.raises(checkpoint.CheckpointError, match="checkpoint step 4"):
    strict = tiny_config(**{"total_steps": 4, "checkpoint_every": 2, "restore_fallback": False})
    train.pretrain(strict, workdir, devices=jax.devices()[:1])
  resumed = train.pretrain(config, workdir, devices=jax.devices()[:1])
  assert resumed["start_step"] == 2 and resumed["step"] == 4
  for a, b in zip(jax.tree.leaves(full["state"].params), jax.tree.leaves(resumed["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert len(list((workdir / "damaged_checkpoints").iterdir())) == 1


def test_a_changed_array_is_caught_by_its_checksum(fresh):
  """Values that decode fine but differ from what was saved (here: the saved fingerprint of one
  array changed instead of the array, the same comparison) name the array."""
  config, workdir, _ = fresh
  meta = workdir / "checkpoints" / "4" / "checksums" / "metadata"
  saved = json.loads(meta.read_text())
  key = next(k for k in saved if "params" in k and "kernel" in k)
  saved[key] = (saved[key] + 1) % 2 ** 32
  meta.write_text(json.dumps(saved))
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    run = train_step.build(config, mesh)
    with pytest.raises(checkpoint.CheckpointError, match=r"array \['params'\].* does not match the checksum"):
      ckpt.restore(4, train_step.abstract_state(run.state, run.shardings))
    step_2 = ckpt.restore(2, train_step.abstract_state(run.state, run.shardings)).params
  finally:
    ckpt.close()
  # Read-only loaders (init_from, probe, generate) verify too, and use the previous step.
  params = weights.load(config, workdir, mesh, prefer_ema=False)[1]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(step_2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flipped_digits_in_the_data_position_fall_back(fresh):
  config, workdir, _ = fresh
  part = workdir / "checkpoints" / "4" / "position" / "metadata"
  text = part.read_text()
  assert '"global_batches": 4' in text
  part.write_text(text.replace('"global_batches": 4', '"global_batches": 7'))  # same length, other position
  resumed = train.pretrain(config, workdir, devices=jax.devices()[:1])
  assert resumed["start_step"] == 2


def test_checksums_change_with_any_element():
  tree = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, 2], np.int32)}
  base = checkpoint.fingerprints(tree)
  for key, index in (("a", (2, 3)), ("a", (0, 0)), ("b", (1,))):
    changed = {k: v.copy() for k, v in tree.items()}
    changed[key][index] += 1
    assert checkpoint.fingerprints(changed)["['" + key + "']"] != base["['" + key + "']"]
  swapped = {"a": tree["a"][::-1].copy(), "b": tree["b"]}  # same values, other places
  assert checkpoint.fingerprints(swapped)["['a']"] != base["['a']"]


def test_a_live_lock_stops_a_second_run_and_a_dead_one_is_taken_over(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / ".lock").write_text(f"{socket.gethostname()} {os.getpid()}")  # this (live) process
  with pytest.raises(checkpoint.CheckpointError, match=r"is in use by pid \d+ on host .*delete the lock file"):
    checkpoint.Checkpointer(workdir)
  (workdir / ".lock").write_text(f"{socket.gethostname()} 999999999")  # no such process
  ckpt = checkpoint.Checkpointer(workdir)
  assert (workdir / ".lock").read_text() == f"{socket.gethostname()} {os.getpid()}"
  ckpt.close()
  assert not (workdir / ".lock").exists()


LOCK_RACER = """
import json, sys, time
from etils import epath
from umd_jax import lock
root, start, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
won = []
for k in range(rounds):
  while time.time() < start + 0.05 * k:  # both racers leave the line in the same instant
    pass
  try:
    lock.take(epath.Path(root) / str(k), lambda: None)
    won.append(k)
  except lock.WorkdirError:
    pass
print(json.dumps(won), flush=True)
"""


def test_two_runs_started_at_the_same_instant_never_both_take_the_lock(tmp_path):
  """The look and the write of the lock are one step: of two processes that try the same new
  workdir at the same instant, exactly one gets it, in each of 60 rounds. (Both keep running
  through all rounds, so no lock is ever a dead process's to take over.)"""
  rounds, start = 60, time.time() + 6  # time to import JAX in both
  racers = [subprocess.Popen([sys.executable, "-c", LOCK_RACER, str(tmp_path), repr(start), str(rounds)],
                             stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
            for _ in range(2)]
  won = [set(json.loads(p.communicate(timeout=120)[0])) for p in racers]
  assert all(p.returncode == 0 for p in racers)
  assert not won[0] & won[1], f"both took the lock in rounds {sorted(won[0] & won[1])}"
  assert won[0] | won[1] == set(range(rounds))


def test_read_only_uses_create_nothing(tmp_path):
  assert checkpoint.latest_step(tmp_path / "absent") is None
  with pytest.raises(checkpoint.CheckpointError, match="has no checkpoint"):
    checkpoint.load_config(tmp_path / "absent")
  assert not (tmp_path / "absent").exists()


def test_keep_checkpoints_below_one_is_refused(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="keep_checkpoints=0"):
    checkpoint.Checkpointer(tmp_path / "run", max_to_keep=0)


def test_a_full_disk_is_one_error_that_says_what_to_free_and_the_lock_is_released(tmp_path, monkeypatch):
  """The OS's "no space left" from orbax (wrapped as it wraps it) becomes one CheckpointError naming
  the folder, the space one checkpoint needs and the step a rerun resumes from; close() still
  releases the workdir's lock when the manager's own close fails."""
  ckpt = checkpoint.Checkpointer(tmp_path / "run")
  state = {"w": np.zeros((256, 1024), np.float32)}  # 1 MiB
  config = tiny_config()

  def full(*args, **kwargs):
    raise ValueError("RESOURCE_EXHAUSTED: Error writing ... Failed to write 4096 bytes to file 5: No space left on "
                     "device [os_error_code='28']")
  monkeypatch.setattr(ckpt.manager, "save", full)
  with pytest.raises(checkpoint.CheckpointError, match=r"no space left on device writing a checkpoint to .*checkpoints: "
                     r"free at least 1.0 MiB there .* resumes from the start"):
    ckpt.save(2, state, {"global_batches": 2}, config)
  monkeypatch.setattr(ckpt.manager, "close", lambda: (_ for _ in ()).throw(OSError(28, "No space left on device")))
  assert (tmp_path / "run" / ".lock").exists()
  with pytest.raises(checkpoint.CheckpointError, match="no space left on device"):
    ckpt.close()
  assert not (tmp_path / "run" / ".lock").exists()
  assert not checkpoint._disk_full(ValueError("RESOURCE_EXHAUSTED: out of memory"))


def test_a_full_disk_ends_a_run_with_the_error_as_its_last_line(tmp_path):
  """A real full disk (a 3 MiB tmpfs; skipped where mounting is not allowed): the run ends with
  one `error:` line, last, no traceback, the lock released."""
  small = tmp_path / "small"
  with processes.small_disk(small, "3m"):
    proc = run_main("--config=configs/demo.py", f"--workdir={small / 'run'}", "--config.total_steps=20",
                    "--config.checkpoint_every=10", "--config.probe_every=0", "--config.image_every=1000")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("error: no space left on device"), proc.stderr[-2000:]
    assert "free at least" in lines[-1] and "Traceback" not in proc.stderr
    assert not (small / "run" / ".lock").exists()


def test_a_full_disk_in_generate_and_probe_is_one_line_and_leaves_the_last_set(tmp_path):
  """A real full disk (an 8 MiB tmpfs filled to 40 KiB free) under --mode=generate and
  --mode=probe: one `error:` line, last, no traceback, no staging folder left, the last set of
  samples whole. The generate runs are unconditional: no classifier accuracy is published."""
  small = tmp_path / "small"
  with processes.small_disk(small, "8m"):
    run = small / "run"
    common = ["--config=configs/demo.py", f"--workdir={run}", "--config.model.variant=Mu/2", "--config.probe_every=0",
              "--config.image_every=1000", "--config.sample.cfg_scale=1.0", "--config.sample.steps=2"]
    assert run_main(*common, "--config.total_steps=2").returncode == 0
    first = run_main(*common, "--mode=generate", "--config.sample.num_samples=10")
    assert first.returncode == 0, first.stderr[-2000:]
    published = json.loads((run / "samples" / "result.json").read_text())
    assert published["num_samples"] == 10 and not any(k.startswith("classifier") for k in published)
    assert "model is unconditional" in first.stderr  # why the asked-for score is not there
    processes.fill_disk(small, 40 * 1024)
    for mode, args, folder in (("generate", ["--config.sample.num_samples=3000"], "samples"),
                               ("probe", ["--config.probe.linear=False"], "probe")):
      proc = run_main(*common, f"--mode={mode}", *args)
      lines = proc.stderr.strip().splitlines()
      assert proc.returncode == 1 and lines[-1].startswith("error: no space left on device writing "), \
          f"{mode}: {proc.stderr[-2000:]}"
      assert "Traceback" not in proc.stderr, f"{mode}: {proc.stderr[-2000:]}"
      assert not (run / f".{folder}.staging").exists()
      assert not list(run.glob(f"{folder}/**/.*.tmp-*"))  # no half-written file either
    assert json.loads((run / "samples" / "result.json").read_text()) == published  # the last set, whole


def test_resuming_past_a_damaged_step_from_the_command_line_is_quiet(tmp_path):
  """The damaged step is named once and set aside; no traceback, no 'Event loop is closed' noise."""
  common = ["--config=configs/demo.py", f"--workdir={tmp_path}", "--config.model.variant=Mu/2",
            "--config.checkpoint_every=2", "--config.probe_every=0", "--config.image_every=1000"]
  assert run_main(*common, "--config.total_steps=4").returncode == 0
  for f in (tmp_path / "checkpoints" / "4").glob("state/**/*"):
    if f.is_file() and f.stat().st_size > 0 and "METADATA" not in f.name:
      f.write_bytes(b"\0" * 7)
  proc = run_main(*common, "--config.total_steps=6")
  assert proc.returncode == 0 and "trained steps 2 -> 6" in proc.stdout, proc.stderr[-2000:]
  assert "checkpoint step 4" in proc.stderr and "falling back to step 2" in proc.stderr
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr


def test_small_replicated_arrays_are_written_whole_big_ones_split_over_replicas(tmp_path, monkeypatch):
  """Orbax's replica-parallel write slices each replicated array into one piece per replica, an
  eager slice compiled per shape: kept where a piece is >= checkpoint.MIN_REPLICA_SLICE_BYTES
  (1 MiB), off below it (a small model's save was 152 compiles). The weights read back the same."""
  mesh = sharding.make_mesh(tiny_config().mesh)
  replicated = sharding.replicated(mesh)
  big = np.arange(8 * checkpoint.MIN_REPLICA_SLICE_BYTES // 4, dtype=np.float32)  # a 1 MiB piece per device
  params = {"big": jax.device_put(big, replicated),
            "small": jax.device_put(np.arange(1000, dtype=np.float32), replicated)}
  sliced = []
  slice_in_dim = jax.lax.slice_in_dim
  monkeypatch.setattr(jax.lax, "slice_in_dim", lambda x, *a, **k: sliced.append(x.shape) or slice_in_dim(x, *a, **k))
  checkpoint.save_weights(tmp_path / "w", params, tiny_config())
  assert sliced == [big.shape] * 8  # the big array: 8 pieces of 1 MiB; the small one: whole, no slice
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
  restored = checkpoint.restore_params(tmp_path / "w", target)
  for k in params:
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(params[k]))


def test_a_config_saved_before_a_key_existed_reads_with_that_keys_default():
  """A checkpoint written before `diffusion.rho_form` (or any later key) existed: its config reads
  back with the key at its default -- what the code did before -- and every saved value kept."""
  import json as json_lib
  from umd_jax import diffusion
  saved = json_lib.loads(tiny_config("diffmae", **{"diffusion.noise_exponent": 0.8}).to_json_best_effort())
  del saved["diffusion"]["rho_form"], saved["sample"]["lpips_weights"]
  config = checkpoint.with_defaults(saved)
  assert config.diffusion.rho_form == "variance" and config.sample.lpips_weights == ""
  assert config.diffusion.noise_exponent == 0.8 and config.model.variant == "Mu/2" and config.method == "diffmae"
  np.testing.assert_array_equal(np.asarray(diffusion.from_config(config).alphas_cumprod),
                                np.asarray(diffusion.make_schedule("linear", 1000, 0.8).alphas_cumprod))
  with pytest.raises(AttributeError):  # locked, as every config
    config.diffusion.rho = 1
