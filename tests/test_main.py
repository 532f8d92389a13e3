"""The command line: modes, config overrides, and one-line errors."""
import json
import os
import sys

import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_env():
  """One CPU device, and the test session's compilation cache: every main.py process after the
  first one of a config loads its compiled programs instead of compiling them again."""
  import jax
  return {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
          "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def run_main(*args, idle_seconds=60):
  """`python main.py ARGS` to completion (a hang fails it: tests/processes.py)."""
  return processes.run([sys.executable, "main.py", *args], idle_seconds, cwd=ROOT, env=main_env())


def test_summary_mode_with_overrides(tmp_path):
  proc = run_main("--config=configs/umd_b.py", "--mode=summary", f"--workdir={tmp_path}",
                  "--config.data.image_size=32")
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  from test_model import expected_param_count
  assert summary["params"] == expected_param_count(768, 12, 4, 4, 3, 64)  # 16 adaLN blocks: ~174M
  assert summary["train_flops_per_image"] > 1e9
  assert "parameters:" in proc.stdout


def test_unknown_config_key_fails_at_parse_time(tmp_path):
  proc = run_main("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.batch_sise=8")
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith("error: bad flag or config override:")
  assert "Did you mean \"batch_size\"" in proc.stderr


def test_bad_value_is_a_one_line_error(tmp_path):
  proc = run_main("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.data.image_size=9")
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: data.image_size=9 is not divisible by the patch size 2"), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_sigterm_to_a_real_process_saves_and_the_same_command_finishes(tmp_path):
  import signal

  from umd_jax import checkpoint
  env = main_env()
  overrides = ["--config.model.variant=Mu/2", "--config.batch_size=16", "--config.log_every=1",
               "--config.probe_every=0", "--config.checkpoint_every=1000", "--config.image_every=1000"]
  command = lambda workdir: [sys.executable, "main.py", "--config=configs/demo.py:30", f"--workdir={workdir}",
                             *overrides]  # the SIGKILL test's program: compiled once for both
  with processes.started(command(tmp_path / "run"), cwd=ROOT, env=env) as (proc, read):
    # absl logs "step N/TOTAL: loss ..." to stderr
    processes.wait_until(lambda: "] step 3/30: loss" in read("err"), [proc], 60, lambda: read("err")[-2000:])
    proc.send_signal(signal.SIGTERM)
    processes.wait([proc], 30, lambda: read("err")[-2000:])
    err = read("err")
  assert proc.returncode == 0, err[-2000:]
  saved = checkpoint.latest_step(tmp_path / "run")
  assert saved is not None and 3 <= saved < 30  # saved where it was stopped, not at the end
  done = processes.run(command(tmp_path / "run"), 60, cwd=ROOT, env=env)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"trained steps {saved} -> 30" in done.stdout  # resumed where the signal stopped it
  assert checkpoint.latest_step(tmp_path / "run") == 30
  # (That a resumed run equals an uninterrupted one bitwise is tested in-process in test_train.py.)
  again = processes.run(command(tmp_path / "run"), 60, cwd=ROOT, env=env)
  assert again.returncode == 0 and "nothing to train: the checkpoint is at step 30" in again.stdout, again.stderr[-2000:]
  assert not (tmp_path / "run" / ".lock").exists()  # every run released its workdir


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_step_to_resume_from(tmp_path):
  """A process killed while orbax writes a step (its temporary folder is on disk) never leaves a
  readable partial step: the same command resumes from the last committed one and finishes."""
  import signal
  import time

  from umd_jax import checkpoint
  env = main_env()
  command = [sys.executable, "main.py", "--config=configs/demo.py:30", f"--workdir={tmp_path}",
             "--config.model.variant=Mu/2", "--config.batch_size=16", "--config.log_every=1",
             "--config.probe_every=0", "--config.checkpoint_every=1", "--config.image_every=1000"]
  ckpts = tmp_path / "checkpoints"
  partial = None
  for _ in range(5):  # a write takes tens of ms; catch one in progress (each try resumes the last)
    with processes.started(command, cwd=ROOT, env=env) as (proc, read):
      watch, seen = processes.Watch([proc], 60, lambda: read("err")[-2000:]), None
      while proc.poll() is None and seen is None:
        names = os.listdir(ckpts) if ckpts.exists() else []
        writing = [n for n in names if ".orbax-checkpoint-tmp" in n]
        if writing and any(n.isdigit() for n in names):
          proc.send_signal(signal.SIGKILL)
          seen = writing[0]
        watch.check()
        time.sleep(0.001)
    if seen and (ckpts / seen).exists():  # still there after the kill: the write was cut short
      partial = seen
      break
  assert partial is not None, "no checkpoint write was caught in progress"
  assert proc.returncode == -signal.SIGKILL
  committed = checkpoint.latest_step(tmp_path)
  assert committed is not None and committed < int(partial.split(".")[0]) <= 30
  done = processes.run(command, 60, cwd=ROOT, env=env)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"trained steps {committed} -> 30" in done.stdout
  assert checkpoint.latest_step(tmp_path) == 30
  assert not [n for n in os.listdir(ckpts) if ".orbax-checkpoint-tmp" in n]  # the partial write is gone
