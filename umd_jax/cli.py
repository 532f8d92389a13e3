"""The command line (`umd-jax` once installed, or `python main.py`): pick a config and a mode.

  umd-jax --config=configs/umd_b.py --mode=pretrain --workdir=/path/to/workdir
  umd-jax --config=configs/umd_b.py --mode=probe --workdir=/path/to/workdir
  umd-jax --config=configs/umd_b.py:classify --mode=classify --workdir=/path/to/classify \
      --config.init_from=/path/to/workdir
  umd-jax --config=configs/umd_b.py --mode=summary --workdir=/tmp/summary
  umd-jax --config=configs/latent_umd_l.py --mode=encode --workdir=/path/to/latents \
      --config.vae.weights=vae.npz --config.data.data_dir=/path/to/tensorflow_datasets

Every host of a TPU pod runs the same command. Config values can be overridden on the
command line (`--config.batch_size=256`); an unknown key is an error.
"""
import json
import logging as std_logging
import os
import re
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow is only here for TensorBoard writers

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from umd_jax import hugepages
from umd_jax.modes import MODES

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images (local or gs://).")
_MODE = flags.DEFINE_enum("mode", "pretrain", list(MODES), "What to run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for clusters "
                                   "that JAX does not detect by itself (TPU slices, SLURM, Open MPI and "
                                   "Kubernetes jobs are detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
  """Keep orbax's and JAX's per-save INFO chatter out of the training log (warnings still show).
  A failed asynchronous save is logged by each of orbax's worker threads and by asyncio with a
  traceback; the error also reaches the main thread, which reports it on one line: orbax's records
  keep their one line without the traceback, asyncio's unretrieved-exception copies are dropped."""

  def filter(self, record):
    message = str(record.msg)
    if "Given directory is read only" in message:  # our read-only loaders, by design
      return False
    if record.name == "asyncio" and "exception was never retrieved" in message:
      return False
    if "orbax" in record.pathname and record.exc_info:
      record.exc_info, record.exc_text = None, None
    return record.levelno >= std_logging.WARNING or not any(
        name in record.pathname for name in ("orbax", "xla_bridge", "grain"))


def _fail(message: str) -> None:
  """The run's last words: one `error:` line, then exit at once -- without the interpreter's
  shutdown, in which orbax's and asyncio's leftover threads and futures print tracebacks after it.
  Checkpoints and the workdir lock were settled by the modes' own `finally` blocks before this."""
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(1)


def _quiet_unraisable(hook):
  """sys.unraisablehook without the "Event loop is closed" reports of orbax's event loops being
  collected after a damaged checkpoint was read (the read's own error is reported on its own)."""
  def quiet(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
      return
    hook(unraisable)
  return quiet


def main(argv):
  del argv
  # Imported once the flags parsed, and the modes only once the settings passed: the modes pull in
  # JAX, orbax, TFDS and grain (~2.5 s), which `--help` and a bad setting need not wait for.
  from umd_jax import checks, multihost
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
  multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value
  try:
    checks.check(config, _MODE.value)  # the check every mode starts with (it runs again there: no cost)
  except ValueError as e:  # checks.ConfigError (a ValueError, as are the modes' errors below)
    _fail(str(e))
  from umd_jax import checkpoint, classify, data, encode, files, generate, latent, loop, probe, sharding, summary, train
  user_errors = (ValueError, data.DataError, sharding.ShardingError, checkpoint.CheckpointError,
                 loop.TrainingError, probe.ProbeError, generate.SampleError, latent.LatentError, files.OutputError)
  try:
    if _MODE.value == "summary":
      summary.summarize(config, _WORKDIR.value)
    elif _MODE.value == "encode":
      meta = encode.run(config, _WORKDIR.value)
      split = config.data.train_split
      print(f"encoded {meta['splits'][split]['records']} images of {split!r} ({meta['views']} views, "
            f"{meta['dtype']}) into {_WORKDIR.value}; train with --config.data.latents={_WORKDIR.value}")
    elif _MODE.value == "generate":
      result = generate.run(config, _WORKDIR.value)
      print(json.dumps(result, indent=2))
    elif _MODE.value == "classify":
      result = classify.run(config, _WORKDIR.value)
      if "top1" in result:
        k = [key for key in result if key.startswith("top") and key[3:].isdigit() and key != "top1"]
        print(f"step {result['step']} (epoch {result['epoch']:.1f}): top-1 {100 * result['top1']:.2f}%"
              + "".join(f", {key[:3]}-{key[3:]} {100 * result[key]:.2f}%" for key in k))
      print(f"results: {_WORKDIR.value}/classify/results.json")
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
    _fail(str(e))
  except OSError as e:  # a machinery failure no mode translated (a full disk under a log writer ...)
    if checkpoint._disk_full(e):
      _fail(f"no space left on device ({e.filename or _WORKDIR.value}): free space there and run the same command "
            "again (a training run resumes from its last complete checkpoint)")
    _fail(f"{type(e).__name__}: {e.strerror or e} ({e.filename or _WORKDIR.value}): fix the path or its permissions")


def _config_spec(argv):
  """The value of --config (`--config=PATH[:ARG]` or `--config PATH[:ARG]`), or None."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _check_config_file(spec: str) -> None:
  """The config file exists and is Python, before absl loads it (whose failures are tracebacks)."""
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    sys.exit(f"error: --config={spec}: no file {path!r} (from {os.getcwd()}): use a config file such as "
             "configs/demo.py")
  try:
    with open(path, encoding="utf-8") as f:
      compile(f.read(), path, "exec")
  except SyntaxError as e:
    sys.exit(f"error: --config={spec}: {path} line {e.lineno}: {e.msg}: fix the file")


def _parse_flags(argv):
  """absl's parser, with a config typo (`--config.batch_sise=8`) and a broken config file
  reported on one line."""
  spec = _config_spec(argv)
  if spec is not None:
    _check_config_file(spec)
  try:
    parsed = flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - sorted below: each kind its own line
    _flag_error(e, spec)
  if spec is not None and not isinstance(_CONFIG.value, ml_collections.ConfigDict):
    sys.exit(f"error: --config={spec}: get_config returned a {type(_CONFIG.value).__name__}, not an "
             "ml_collections.ConfigDict: build it on configs.common.base_config() and return common.finalize(c)")
  if _WORKDIR.value is not None and not _WORKDIR.value.strip():
    sys.exit("error: --workdir is empty: name the run's directory (e.g. --workdir=workdirs/run1); "
             "an empty one would write into the current directory")
  return parsed


def _flag_error(e: Exception, spec) -> None:
  """Exit with one line for a failure of absl's parser or of the config file's get_config."""
  # absl re-raises get_config's exceptions as a flag error that quotes their traceback
  bad_arg = re.search(r"ConfigArgError: (.*)$", str(e).strip())
  if bad_arg:
    sys.exit(f"error: --config={spec}: {bad_arg.group(1)}")
  if spec is not None and "--config must have a value other than None" in str(e):
    sys.exit(f"error: --config={spec}: get_config returned None (a missing `return`?): return the locked "
             "ConfigDict, e.g. `return common.finalize(c)`")
  if isinstance(e, (AttributeError, KeyError, TypeError, ValueError, flags.Error)):
    message = " ".join(str(e).replace("\\n", " ").split()).replace("\\'", "'")
    sys.exit(f"error: bad flag or config override: {message}")
  # get_config itself failed: whatever it raised, one line
  where = next((f"{fr.filename} line {fr.lineno}" for fr in reversed(traceback.extract_tb(e.__traceback__))
                if spec and fr.filename.endswith(spec.split(":", 1)[0].lstrip("./"))), spec)
  sys.exit(f"error: --config={spec}: get_config raised {type(e).__name__}: {e} ({where}): fix the config file")


def run():
  """The console entry point."""
  hugepages.ensure()  # a no-op when main.py already did
  app.run(main, flags_parser=_parse_flags)
