"""Checkpoints of the whole run state (the only module that imports orbax).

Each step directory holds `state` (params, optimizer, EMA, step, RNG, counters), `data`
(the grain iterator of every process) and `config` (JSON). Orbax writes to a temporary
directory and renames it when complete, so a crash mid-write never leaves a partial step.
"""
import json
import os
import time

import grain
from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils


class CheckpointError(RuntimeError):
  """A checkpoint could not be read or written: the message names the step and what to do."""


def _ensure_writable(directory: epath.Path) -> None:
  try:
    directory.mkdir(parents=True, exist_ok=True)
    # One probe file per process: every host of a pod checks the shared workdir at once.
    probe = directory / f".write_test.{jax.process_index()}.{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise CheckpointError(f"workdir {directory.parent} is not writable ({e.strerror or e}): "
                          "choose another --workdir or fix its permissions") from None


def _absolute(path) -> epath.Path:
  """Orbax wants absolute paths; remote ones (gs://...) already are."""
  path = epath.Path(path)
  return path if "://" in str(path) else epath.Path(os.path.abspath(path))


def _config_changes(manager, step: int, config) -> list:
  """Values that shape the saved state (model.*, image geometry, EMA on/off) and differ between
  the config saved at `step` and `config`, as 'key: saved -> now'."""
  try:
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
  except Exception:  # noqa: BLE001 - no readable config: nothing to compare
    return []
  flat = lambda d, p="": {k2: v2 for k, v in d.items() for k2, v2 in
                          (flat(v, f"{p}{k}.").items() if isinstance(v, dict) else [(f"{p}{k}", v)])}
  old, new = flat(saved), flat(json.loads(config.to_json_best_effort()))
  shaping = lambda k: k.startswith("model.") or k in ("data.image_size", "data.channels")
  changes = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if shaping(k) and old.get(k) != new.get(k)]
  if (old.get("optim.ema_rate", 0) > 0) != (new.get("optim.ema_rate", 0) > 0):
    changes.append(f"optim.ema_rate: {old.get('optim.ema_rate')!r} -> {new.get('optim.ema_rate')!r} (EMA on/off)")
  return changes


def _param_mismatches(step_dir, abstract_params, key: str = "params", extra_ok: bool = False) -> list:
  """'path: saved (shape) dtype, model (shape) dtype' for each parameter of `abstract_params` whose
  shape or dtype differs from step_dir's `key` tree, or that one side lacks (saved extras are fine
  with `extra_ok`: a partial restore). Read from orbax's metadata; nothing is loaded."""
  try:
    saved = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / "state")[key]
  except Exception:  # noqa: BLE001 - unreadable metadata: the restore itself reports the damage
    return []
  if saved is None:
    return [f"{key}: not in the checkpoint"]
  name = lambda path: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
  flat = lambda tree: {name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  old, new = flat(saved), flat(abstract_params)
  describe = lambda x: f"{tuple(x.shape)} {np.dtype(x.dtype).name}"
  out = []
  for path in sorted(set(new) | (set() if extra_ok else set(old))):
    if path not in old:
      out.append(f"{path}: not in the checkpoint, model {describe(new[path])}")
    elif path not in new:
      out.append(f"{path}: saved {describe(old[path])}, not in this model")
    elif describe(old[path]) != describe(new[path]):
      out.append(f"{path}: saved {describe(old[path])}, model {describe(new[path])}")
  return out


def _mismatch_message(mismatches: list, changes: list) -> str:
  shown = "; ".join(mismatches[:6]) + (f"; and {len(mismatches) - 6} more" if len(mismatches) > 6 else "")
  why = f"; changed config: {'; '.join(changes)}" if changes else ""
  return f"{len(mismatches)} parameters do not match ({shown}){why}"


class Checkpointer:

  def __init__(self, workdir, *, max_to_keep: int = 3):
    self.directory = _absolute(workdir) / "checkpoints"
    _ensure_writable(self.directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            # A write cut short (SIGKILL, preemption without grace) leaves only a `*.orbax-checkpoint-tmp*`
            # folder, which is never read as a step; it is removed when the next run starts.
            cleanup_tmp_directories=True))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, config) -> None:
    """Asynchronous save; call `wait()` before the process exits."""
    items = dict(state=ocp.args.StandardSave(state),
                 config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """State at `step`, placed with the shardings of `abstract_state`; restores the iterator in place."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} could not be restored "
          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
          "it is damaged or was written by a different config: delete that step directory to resume "
          "from the previous one, or use a new --workdir") from None
    return restored.state

  def restore_latest(self, abstract_state, data_iterator=None, fallback: bool = True, config=None):
    """(state, step) of the newest readable checkpoint. A damaged step is reported by name and,
    with `fallback`, moved to WORKDIR/damaged_checkpoints/ (kept for a look, out of the way of
    the step that will be written again) and the previous step is tried."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    changes = _config_changes(self.manager, steps[0], config) if config is not None and steps else []
    mismatches = _param_mismatches(self.directory / str(steps[0]), abstract_state.params) if steps else []
    ema = [c for c in changes if "EMA on/off" in c]
    if mismatches or ema:  # not damage: a different model; never move a good checkpoint aside
      what = _mismatch_message(mismatches, changes) if mismatches else ema[0]
      raise CheckpointError(f"checkpoint step {steps[0]} in {self.directory} was written for a different "
                            f"model: {what}: run with the original values or use a new --workdir")
    if changes:  # e.g. model.dtype, model.remat, model.attention: same parameters, other compute
      logging.warning("resuming step %d with changed settings: %s", steps[0], "; ".join(changes))
    for i, step in enumerate(steps):
      try:
        return self.restore(step, abstract_state, data_iterator), step
      except CheckpointError as e:
        if not fallback or i == len(steps) - 1:
          raise
        # Process 0 moves it (one rename, one name: the time is agreed); the others wait for it.
        stamp = int(multihost_utils.broadcast_one_to_all(np.int64(time.time())))
        aside = self.directory.parent / "damaged_checkpoints" / f"{step}-{stamp}"
        if jax.process_index() == 0:
          aside.parent.mkdir(parents=True, exist_ok=True)
          (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
          multihost_utils.sync_global_devices(f"damaged checkpoint {step} moved aside")
        self.manager.reload()
        logging.warning("%s -- moved it to %s; falling back to step %d (restore_fallback)", e, aside, steps[i + 1])
    return None, None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def latest_step(workdir):
  """The newest complete checkpoint step of a workdir, or None."""
  manager = ocp.CheckpointManager(_absolute(workdir) / "checkpoints")
  try:
    return manager.latest_step()
  finally:
    manager.close()


def load_config(workdir):
  """The config a workdir's latest checkpoint was written with, as a locked ConfigDict."""
  import ml_collections
  manager = ocp.CheckpointManager(_absolute(workdir) / "checkpoints")
  try:
    step = manager.latest_step()
    if step is None:
      raise CheckpointError(f"workdir {str(workdir)!r} has no checkpoint: pre-train there first")
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
  finally:
    manager.close()
  config = ml_collections.ConfigDict(saved)
  config.lock()
  return config


def restore_params(workdir, abstract_params, prefer_ema: bool = False, config=None):
  """Only the parameters of the latest checkpoint in a workdir (for `init_from` and probing);
  the EMA copy instead when `prefer_ema` and the run kept one."""
  manager = ocp.CheckpointManager(_absolute(workdir) / "checkpoints")
  step = manager.latest_step()
  if step is None:
    manager.close()
    raise CheckpointError(f"workdir {str(workdir)!r} has no checkpoint: pre-train there first "
                          "(python main.py --mode=pretrain --workdir=...)")
  key = "params"
  if prefer_ema:
    try:
      saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
      key = "ema_params" if saved.get("optim", {}).get("ema_rate", 0) > 0 else "params"
    except Exception:  # noqa: BLE001 - no readable config: the parameters then
      pass
  # Checked first: a failed partial restore makes orbax log tracebacks from its threads.
  mismatches = _param_mismatches(manager.directory / str(step), abstract_params, key, extra_ok=True)
  if mismatches:
    changes = _config_changes(manager, step, config) if config is not None else []
    manager.close()
    raise CheckpointError(f"{str(workdir)!r} step {step}: {_mismatch_message(mismatches, changes)}: "
                          "use the config the run was trained with")
  try:
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract_params)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={key: abstract_params}, restore_args={key: restore_args}, partial_restore=True)))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"{str(workdir)!r} step {step}: parameters do not match this config "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
  finally:
    manager.close()
  return restored.state[key]
