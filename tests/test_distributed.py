"""Two real processes on loopback: jax.distributed, CPU (gloo) collectives, 4 fake devices each."""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["--config.model.variant=Mu/2", "--config.batch_size=16", "--config.log_every=1",
             "--config.probe_every=0", "--config.checkpoint_every=2", "--config.image_every=2"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _started(commands, logdir):
  """Start every command (output to files, so no pipe can fill and stall a peer); always reap."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
         # the resumed launch reuses the first launch's compiled programs
         "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  procs = []
  try:
    for i, command in enumerate(commands):
      out, err = open(logdir / f"out{i}.txt", "w"), open(logdir / f"err{i}.txt", "w")
      procs.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err), out, err))
    yield [p for p, _, _ in procs]
  finally:
    for p, out, err in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
      out.close()
      err.close()


def _run_together(commands, logdir, timeout=240):
  """Run the processes to completion; returns their stdouts. Fails with the stderr of any that failed."""
  logdir.mkdir(parents=True, exist_ok=True)
  with _started(commands, logdir) as procs:
    deadline = time.monotonic() + timeout
    # A process that fails leaves its peers waiting in a collective: stop at the first failure.
    while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
      assert time.monotonic() < deadline, "processes did not finish in time: " + _tails(logdir, len(procs))
      time.sleep(0.2)
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed: " + _tails(logdir, len(procs))
  return [(logdir / f"out{i}.txt").read_text() for i in range(len(commands))]


def _tails(logdir, n) -> str:
  return "\n".join(f"--- process {i}:\n" + (logdir / f"err{i}.txt").read_text()[-1500:] for i in range(n))


def test_two_processes_read_disjoint_rows_of_the_same_global_batches(tmp_path):
  port, steps = _free_port(), 13  # 13 batches of 16 from 100 records: two epochs
  worker = os.path.join(ROOT, "tests", "distributed_worker.py")
  _run_together([[sys.executable, worker, f"127.0.0.1:{port}", "2", str(i), str(steps), str(tmp_path / f"p{i}.json")]
                 for i in range(2)], tmp_path / "logs", timeout=120)
  p0, p1 = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2))
  assert (p0["devices"], p0["local_devices"], p0["process"], p1["process"]) == (8, 4, 0, 1)
  # The global batches do not depend on the number of processes: one process on 8 devices sees the same.
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import distributed_worker
  _, single = distributed_worker.read_batches(steps)
  assert p0["global"] == p1["global"] == single
  for step, batch in enumerate(single):  # process i read rows [8i, 8i + 8) of each global batch
    assert p0["local"][step] == batch[:8] and p1["local"][step] == batch[8:]
  epoch = distributed_worker.NUM_RECORDS // distributed_worker.GLOBAL_BATCH  # 6 full batches
  rows0, rows1 = (set(sum(p["local"][:epoch], [])) for p in (p0, p1))
  assert not rows0 & rows1 and len(rows0) == len(rows1) == 48  # disjoint, no repeats within the epoch
  assert len(set(sum(single[:epoch], []))) == 96 and set(sum(single[:7], [])) == set(range(100))


def test_two_main_py_processes_train_save_resume_and_equal_one_process(tmp_path):
  """`python main.py ... --coordinator_address --num_processes --process_id` twice, by hand."""
  from configs import demo
  from umd_jax import checkpoint, train
  multi = tmp_path / "multi"

  def launch(logs):
    port = _free_port()
    return _run_together([[sys.executable, "main.py", "--config=configs/demo.py:4", f"--workdir={multi}",
                           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
                           *OVERRIDES] for i in range(2)], tmp_path / logs)

  out = launch("first")
  assert "trained steps 0 -> 4" in out[0] and "trained steps 0 -> 4" in out[1]
  assert sorted(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
  events = lambda: sorted(multi.glob("events.out.tfevents*"))
  assert len(events()) == 1  # only process 0 writes TensorBoard events (and the PNGs below)
  assert sorted(p.name for p in (multi / "images").iterdir()) == ["reconstruction_00000002.png",
                                                                   "reconstruction_00000004.png"]
  # Restore: without step 4 the same command resumes both processes from step 2.
  shutil.rmtree(multi / "checkpoints" / "4")
  out = launch("resumed")
  assert "trained steps 2 -> 4" in out[0] and "trained steps 2 -> 4" in out[1]
  assert len(events()) == 2

  # One process with 8 devices and the same global batches, uninterrupted.
  config = demo.get_config("4")
  for item in OVERRIDES:
    key, value = item.removeprefix("--config.").split("=")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value)
  single = train.pretrain(config, str(tmp_path / "single"))["state"]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), single.params)
  restored = checkpoint.restore_params(multi, abstract)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(single.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
