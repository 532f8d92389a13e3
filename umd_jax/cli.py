"""The command line (`umd-jax` once installed, or `python main.py`): pick a config and a mode.

  umd-jax --config=configs/umd_b.py --mode=pretrain --workdir=/path/to/workdir
  umd-jax --config=configs/umd_b.py --mode=probe --workdir=/path/to/workdir
  umd-jax --config=configs/umd_b.py --mode=summary --workdir=/tmp/summary
  umd-jax --config=configs/latent_umd_l.py --mode=encode --workdir=/path/to/latents \
      --config.vae.weights=vae.npz --config.data.data_dir=/path/to/tensorflow_datasets

Every host of a TPU pod runs the same command. Config values can be overridden on the
command line (`--config.batch_size=256`); an unknown key is an error.
"""
import json
import logging as std_logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow is only here for TensorBoard writers

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images (local or gs://).")
_MODE = flags.DEFINE_enum("mode", "pretrain", ["pretrain", "finetune", "probe", "generate", "summary", "encode"], "What to run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for clusters "
                                   "that JAX does not detect by itself (TPU slices, SLURM, Open MPI and "
                                   "Kubernetes jobs are detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
  """Keep orbax's and JAX's per-save INFO chatter out of the training log (warnings still show)."""

  def filter(self, record):
    if "Given directory is read only" in str(record.msg):  # our read-only loaders, by design
      return False
    return record.levelno >= std_logging.WARNING or not any(
        name in record.pathname for name in ("orbax", "xla_bridge", "grain"))


def main(argv):
  del argv
  # Imported once the flags parsed: the package pulls in TensorFlow (clu's writers) and JAX, which
  # would make `--help` and a mistyped flag take seconds instead of a moment.
  from umd_jax import checkpoint, data, encode, generate, latent, multihost, probe, sharding, train
  logging.get_absl_handler().addFilter(_QuietLibraries())
  multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value
  user_errors = (ValueError, data.DataError, sharding.ShardingError, checkpoint.CheckpointError,
                 train.TrainingError, probe.ProbeError, generate.SampleError, latent.LatentError)
  try:
    if _MODE.value == "summary":
      train.summarize(config, _WORKDIR.value)
    elif _MODE.value == "encode":
      meta = encode.run(config, _WORKDIR.value)
      split = config.data.train_split
      print(f"encoded {meta['splits'][split]['records']} images of {split!r} ({meta['views']} views, "
            f"{meta['dtype']}) into {_WORKDIR.value}; train with --config.data.latents={_WORKDIR.value}")
    elif _MODE.value == "generate":
      result = generate.run(config, _WORKDIR.value)
      print(json.dumps(result, indent=2))
    elif _MODE.value == "probe":
      probe.run(config, _WORKDIR.value)
      print(f"results: {_WORKDIR.value}/probe/results.json")
    elif _MODE.value in ("pretrain", "finetune"):
      result = getattr(train, _MODE.value)(config, _WORKDIR.value)
      if result["first_loss"] is None:  # resumed at or past total_steps: nothing was trained
        print(f"nothing to train: the checkpoint is at step {result['step']} and total_steps={config.total_steps}")
      else:
        print(f"trained steps {result['start_step']} -> {result['step']}; loss {result['first_loss']:.4f} "
              f"(first logged) -> {result['last_loss']:.4f} (last)")
      print(f"workdir: {result['workdir']}  (checkpoints/, images/, TensorBoard events: "
            f"tensorboard --logdir {result['workdir']})")
  except user_errors as e:
    sys.exit(f"error: {e}")


def _parse_flags(argv):
  """absl's parser, with a config typo (`--config.batch_sise=8`) reported on one line."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    message = " ".join(str(e).replace("\\n", " ").split()).replace("\\'", "'")
    sys.exit(f"error: bad flag or config override: {message}")


def run():
  """The console entry point."""
  app.run(main, flags_parser=_parse_flags)
