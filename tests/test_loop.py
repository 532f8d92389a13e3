"""The training loop as periodic actions: one log line per log step, evaluators compiled once,
a profiler trace on request, and the finiteness guard before every log line and checkpoint."""
import logging

from conftest import tiny_config
from test_main import run_main
from umd_jax import loop, probe, train


def test_one_log_line_per_log_step_and_the_fewshot_evaluator_compiled_once(tmp_path, one_device, caplog, monkeypatch):
  built = []

  class Recorded(probe.FewShotEval):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      built.append(self)

  monkeypatch.setattr(probe, "FewShotEval", Recorded)
  config = tiny_config(**{"total_steps": 6, "log_every": 2, "checkpoint_every": 3, "probe_every": 3,
                          "probe.train_split": "train", "probe.eval_split": "test", "probe.fewshot_shots": (1,),
                          "probe.max_train_images": 64, "probe.max_eval_images": 64, "probe.batch_size": 64})
  caplog.set_level(logging.INFO)
  train.pretrain(config, tmp_path / "run", devices=one_device)
  messages = [r.getMessage() for r in caplog.records]
  # steps 1 (first), 2, 4, 6 (last): one line each, and no second copy of the scalars (clu's
  # LoggingWriter prints "[step] loss=..., loss_clean=...") or progress notes
  assert [m.split(":")[0] for m in messages if m.startswith("step ") and "loss" in m] == [
      "step 1/6", "step 2/6", "step 4/6", "step 6/6"]
  assert not [m for m in messages if "loss_clean=" in m or "work unit notes" in m]
  assert [m.split(":")[0] for m in messages if "fewshot_1shot" in m] == ["step 3", "step 6"]
  assert len(built) == 1 and built[0].extractor.fn._cache_size() == 1  # two evaluations, one compile


def test_profile_steps_writes_one_trace_of_a_real_run(tmp_path):
  """`--config.profile.steps`: a jax.profiler trace of steps 2-3 of a 6-step main.py run (in its
  own process, as a user runs it; a trace that outlasts the run: the 2-process latent test)."""
  proc = run_main("--config=configs/demo.py:6", f"--workdir={tmp_path / 'run'}", "--config.model.variant=Mu/2",
                  "--config.batch_size=16", "--config.probe_every=0", "--config.log_every=1",
                  "--config.profile.steps=2", "--config.profile.first_step=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  traces = list((tmp_path / "run" / "profile" / "process_0").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_the_finiteness_guard_runs_before_every_log_line_and_checkpoint(tmp_path, one_device, monkeypatch):
  checked, log_every, checkpoint_every = [], 2, 3
  monkeypatch.setattr(loop, "check_finite", lambda config, state, step, ckpt, history: checked.append(step))
  config = tiny_config(**{"total_steps": 8, "log_every": log_every, "checkpoint_every": checkpoint_every})
  train.pretrain(config, tmp_path / "run", devices=one_device)
  needed = {1, 8} | {s for s in range(1, 9) if s % log_every == 0 or s % checkpoint_every == 0}
  assert sorted(checked) == sorted(needed)  # each of those steps once, and no other
