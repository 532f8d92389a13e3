"""Remote workdirs (gs://...): every file the runs write goes through etils' epath (which hands
gs:// to tf.io.gfile) or orbax (tensorstore), never through plain `open`/`os` -- checked with a
local workdir, whose epath calls are the same code path."""
import os
import re

from etils import epath

from conftest import tiny_config
from umd_jax import checkpoint, generate, probe, summary, train


def test_checkpoint_paths_keep_a_remote_scheme_and_make_local_ones_absolute():
  remote = checkpoint._absolute("gs://bucket/runs/umd_b")
  assert str(remote) == "gs://bucket/runs/umd_b" and isinstance(remote, epath.Path)
  assert str(checkpoint._absolute("runs/umd_b")) == os.path.abspath("runs/umd_b")


def test_every_output_of_pretrain_probe_and_generate_is_written_through_epath(tmp_path, one_device):
  written = set()

  def recording_open(original, path, mode="r", *args, **kwargs):
    if any(m in mode for m in "wax"):  # orbax writes into a temporary folder, renamed when complete;
      name = re.sub(r"\.orbax-checkpoint-tmp[^/]*", "", os.path.abspath(os.fspath(path)))
      name = re.sub(r"/\.([^/]+)\.staging/", r"/\1/", name)  # files.OutputSet: .DIR.staging, renamed to DIR
      written.add(re.sub(r"/\.([^/]+)\.tmp-\d+$", r"/\1", name))  # files.py: .NAME.tmp-PID, renamed to NAME
    return original(path, mode, *args, **kwargs)

  config = tiny_config(**{"total_steps": 2, "checkpoint_every": 2, "image_every": 2, "probe.fewshot_shots": (1,),
                          "probe.fewshot_seeds": 1, "probe.linear": False,
                          "probe.baselines": False, "probe.train_split": "train", "probe.eval_split": "test",
                          "sample.num_samples": 8, "sample.batch_size": 8, "sample.steps": 2,
                          "sample.grid_classes": 1, "sample.grid_per_class": 2})
  workdir = epath.Path(tmp_path / "run")
  with epath.testing.mock_epath(open=recording_open):
    train.pretrain(config, workdir, devices=one_device)
    summary.summarize(config, workdir)
    probe.run(config, workdir, devices=one_device)
    generate.run(config, workdir, devices=one_device)
  files = [os.path.join(d, f) for d, _, names in os.walk(tmp_path / "run") for f in names]
  other_writers = ("/state/", "_CHECKPOINT_METADATA", "/ocdbt", "manifest.ocdbt")  # orbax's
  bypassed = [f for f in files if f not in written and not any(w in f for w in other_writers)]
  assert not bypassed, f"written without epath: {bypassed}"
  names = {os.path.relpath(f, tmp_path / "run") for f in written}
  for expected in ("summary.json", "probe/results.json", "samples/grid.png", "samples/result.json",
                   "images/reconstruction_00000002.png"):
    assert expected in names, (expected, sorted(names))
  assert "checkpoints/2/position/metadata" in names  # the data position, too
  assert [n for n in names if n.startswith("events.out.tfevents.")]  # TensorBoard's events (events.py)
