"""Checkpoints of the whole run state (the only module that imports orbax).

Each step directory holds `state` (params, optimizer, EMA, step, RNG, counters), `position`
(JSON: the global data-stream position and what defines the stream; every process rebuilds its
iterator from it, so a checkpoint does not depend on how many processes wrote it), `config`
(JSON) and `checksums` (JSON: a fingerprint
of every saved array, computed on device before the write and compared after every restore,
so flipped bytes are found and the step is treated as damaged). Orbax writes to a temporary
directory and renames it when complete, so a crash mid-write never leaves a partial step. A
training workdir is locked (lock.py) while a run writes to it.
"""
import contextlib
import dataclasses
import errno
import json
import os
import re
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

# Not public in orbax 0.12 (pinned): the default array handler's metadata store, and the registry's
# override without its warning (register_type_handler logs one in every run).
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import type_handler_registry

from umd_jax import lock, methods

# Orbax splits every replicated array over its replicas, which then write in parallel (pods), by
# eager slices compiled per shape: for small arrays that costs more than it saves (2.4 s per save of
# a 200-array model on 8 CPU devices, all of it slicing). Arrays whose per-replica piece would be
# under 1 MiB are written whole by one replica; bigger ones keep the split. The files are the same.
MIN_REPLICA_SLICE_BYTES = 1 << 20
type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, ocp.type_handlers.ArrayHandler(
    array_metadata_store=array_metadata_store.Store(), min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
    override=True, ignore_warnings=True)


class CheckpointError(RuntimeError):
  """A checkpoint could not be read or written: the message names the step and what to do."""


def _as_dict(state) -> dict:
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)} if dataclasses.is_dataclass(state) \
      else dict(state)


def _bits(x):
  """The array's bits as uint32 (one element per element; 8-byte types folded)."""
  size = np.dtype(x.dtype).itemsize
  if size == 8:
    pair = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return pair[..., 0] ^ (pair[..., 1] * jnp.uint32(0x9E3779B1))
  kind = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[size]
  return jax.lax.bitcast_convert_type(x, kind).astype(jnp.uint32)


@jax.jit
def _fingerprint_tree(tree):
  def one(x):
    bits = _bits(x)
    position = jnp.zeros(bits.shape, jnp.uint32)
    for d in range(bits.ndim):  # the element's flat index, without reshaping a sharded array
      stride = int(np.prod(bits.shape[d + 1:], dtype=np.int64)) % 2 ** 32
      position = position + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride)
    return jnp.sum(bits * (position * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)
  return jax.tree.map(one, tree)


def fingerprints(tree) -> dict:
  """{path: uint32} of every array of a (state) tree: the sum of its bits weighted by position,
  computed where the arrays live; any changed byte changes it (up to a 2^-32 chance)."""
  tree = _as_dict(tree)
  values = jax.device_get(_fingerprint_tree(tree))  # replicated scalars: readable on every process
  return {jax.tree_util.keystr(path): int(v) for path, v in jax.tree_util.tree_flatten_with_path(values)[0]}


def _verify(saved: dict | None, tree, where: str) -> None:
  """Raise CheckpointError if an array of `tree` differs from the fingerprint saved with it."""
  if saved is None:
    logging.warning("%s has no checksums (written by an older version): not verified", where)
    return
  for path, value in fingerprints(tree).items():
    if path in saved and saved[path] != value:
      raise CheckpointError(f"{where}: array {path} does not match the checksum saved with it: the file is damaged")


def _absolute(path) -> epath.Path:
  """Orbax wants absolute paths; remote ones (gs://...) already are."""
  path = epath.Path(path)
  return path if "://" in str(path) else epath.Path(os.path.abspath(path))


def _flat_configs(manager, step: int, config):
  """(saved, now) configs as flat {'a.b': value} dicts; (None, None) when the saved one is unreadable."""
  try:
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
  except Exception:  # noqa: BLE001 - no readable config: nothing to compare
    return None, None
  flat = lambda d, p="": {k2: v2 for k, v in d.items() for k2, v2 in
                          (flat(v, f"{p}{k}.").items() if isinstance(v, dict) else [(f"{p}{k}", v)])}
  return flat(saved), flat(json.loads(config.to_json_best_effort()))


OBJECTIVE = methods.objective_prefixes()  # the shared diffusion. and optim., and each method's own


def _objective(key: str, sections=OBJECTIVE) -> bool:
  """Keys that define what a run optimises and how: the method and the `sections` its mode reads
  (pre-training: the diffusion schedule, the optimizer and each method's own objective keys).
  Resuming with any of them changed is another run."""
  return key == "method" or key.startswith(sections) and key != "corruption.loss_buckets"


def _objective_changes(manager, step: int, config, sections=OBJECTIVE) -> list:
  """'key: saved -> now' for each objective key that differs from the saved config. Keys the saved
  config does not have (added to the code since) are not changes: that run never read them."""
  old, new = _flat_configs(manager, step, config)
  if old is None:
    return []
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) & set(new))
          if _objective(k, sections) and old.get(k) != new.get(k)]


def _config_changes(manager, step: int, config) -> list:
  """Values that shape the saved state (model.*, image geometry, EMA on/off) and differ between
  the config saved at `step` and `config`, as 'key: saved -> now'."""
  old, new = _flat_configs(manager, step, config)
  if old is None:
    return []
  meaning = set(methods.get(config).meaning)
  shaping = lambda k: k.startswith("model.") or k in meaning or k in (
      "method", "data.image_size", "data.channels", "data.frames", "data.space", "vae.latent_channels",
      "vae.downsample")
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
  """The checkpoints of a training workdir, which it locks until `close()`."""

  def __init__(self, workdir, *, max_to_keep: int = 3):
    if max_to_keep < 1:
      raise CheckpointError(f"keep_checkpoints={max_to_keep}: must be >= 1 (a run must keep its last checkpoint)")
    self.directory = _absolute(workdir) / "checkpoints"
    try:
      self._lock = lock.take(self.directory.parent, lambda: lock.ensure_writable(self.directory))
    except lock.WorkdirError as e:
      raise CheckpointError(str(e)) from None
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            # A write cut short (SIGKILL, preemption without grace) leaves only a `*.orbax-checkpoint-tmp*`
            # folder, which is never read as a step; it is removed when the next run starts.
            cleanup_tmp_directories=True))

  def latest_step(self):
    return self.manager.latest_step()

  def provenance(self, step: int):
    """What `save` recorded of the run's first weights at `step` (None: started from scratch, or
    written before provenance was saved)."""
    return _saved_item(self.manager, step, "provenance")

  def save(self, step: int, state, position: dict, config, provenance: dict | None = None) -> None:
    """Asynchronous save; call `wait()` before the process exits. `position`: JSON describing
    the data stream's global position (see `data_position`); `provenance`: JSON of where the
    run's first weights came from (init_from's workdir and step), kept with every step. A full
    disk (here, or found from the previous asynchronous save) is a CheckpointError that says how
    much to free."""
    self._state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    items = dict(state=ocp.args.StandardSave(state),
                 config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
                 checksums=ocp.args.JsonSave(fingerprints(state)),
                 position=ocp.args.JsonSave(position))
    if provenance is not None:
      items["provenance"] = ocp.args.JsonSave(provenance)
    with self._disk_full_explained():
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  @contextlib.contextmanager
  def _disk_full_explained(self):
    try:
      yield
    except Exception as e:  # noqa: BLE001 - orbax / tensorstore wrap the OS error in several types
      if not _disk_full(e):
        raise
      self.manager.reload()
      need, last = getattr(self, "_state_bytes", 0), self.manager.latest_step()
      raise CheckpointError(
          f"no space left on device writing a checkpoint to {self.directory}: free at least "
          f"{need / 2 ** 20:.1f} MiB there (one checkpoint of this run) and run the same command: it resumes "
          + (f"from the last complete step, {last}" if last is not None else "from the start (no step was complete)")
          ) from None

  def restore(self, step: int, abstract_state, position: dict | None = None):
    """State at `step`, placed with the shardings of `abstract_state` (any mesh, any number of
    processes). With `position` (what this run's data stream would save at `step`), the saved
    position must agree: a different stream is named, a wrong count is damage."""
    where = f"checkpoint step {step} in {self.directory}"
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
      _verify(_saved_checksums(self.manager, step), restored.state, where)
      saved = _saved_item(self.manager, step, "position")
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
      raise CheckpointError(f"{where} could not be restored ({_describe(e)}): its files are damaged") from None
    if position is not None and saved is not None:
      changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in position.items()
                 if k != "global_batches" and saved.get(k) != v]
      if changed:
        raise _DifferentRun(f"{where} was written with another data stream ({'; '.join(changed)}): resuming would "
                            "not continue its data order: run with the original values or use a new --workdir")
      if saved.get("global_batches") != position["global_batches"]:
        raise CheckpointError(f"{where}: its data position {saved.get('global_batches')} does not match the step: "
                              "the position part is damaged")
    return restored.state

  def restore_latest(self, abstract_state, position_at=None, fallback: bool = True, config=None,
                     objective=OBJECTIVE):
    """(state, step) of the newest readable checkpoint. A damaged step is reported by name and,
    with `fallback`, moved to WORKDIR/damaged_checkpoints/ (kept for a look, out of the way of
    the step that will be written again) and the previous step is tried. `position_at(step)`:
    the data position this run would save at a step (checked against the saved one)."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    changes = _config_changes(self.manager, steps[0], config) if config is not None and steps else []
    mismatches = _param_mismatches(self.directory / str(steps[0]), abstract_state.params) if steps else []
    ema = [c for c in changes if "EMA on/off" in c]
    if mismatches or ema:  # not damage: a different model; never move a good checkpoint aside
      what = _mismatch_message(mismatches, changes) if mismatches else ema[0]
      raise CheckpointError(f"checkpoint step {steps[0]} in {self.directory} was written for a different "
                            f"model: {what}: run with the original values or use a new --workdir")
    objective = _objective_changes(self.manager, steps[0], config, objective) if config is not None and steps else []
    if objective:
      raise _DifferentRun(f"checkpoint step {steps[0]} in {self.directory} was written with another objective, "
                          f"schedule or optimizer ({'; '.join(objective)}): resuming would not continue that run: run "
                          "with the original values or use a new --workdir")
    if changes:  # e.g. model.dtype, model.remat, model.attention: same parameters, other compute
      logging.warning("resuming step %d with changed settings: %s", steps[0], "; ".join(changes))
    old, new = _flat_configs(self.manager, steps[0], config) if config is not None and steps else (None, None)
    if old is not None and old.get("total_steps") != new.get("total_steps"):
      logging.warning("resuming step %d with total_steps %s -> %s: the learning-rate schedule (warm-up, cosine) "
                      "now spans the new length, so the rate from here on differs from the original run's",
                      steps[0], old.get("total_steps"), new.get("total_steps"))
    def read(step):
      return self.restore(step, abstract_state, position_at(step) if position_at else None)

    def set_aside(step, error, next_step):
      # Process 0 moves it (one rename, one name: the time is agreed); the others wait for it.
      stamp = int(multihost_utils.broadcast_one_to_all(np.int64(time.time())))
      aside = self.directory.parent / "damaged_checkpoints" / f"{step}-{stamp}"
      if jax.process_index() == 0:
        aside.parent.mkdir(parents=True, exist_ok=True)
        (self.directory / str(step)).rename(aside)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"damaged checkpoint {step} moved aside")
      self.manager.reload()
      logging.warning("%s -- moved it to %s; falling back to step %d (restore_fallback)", error, aside, next_step)

    return first_readable(steps, read, set_aside, fallback=fallback,
                          start_over=f"move {self.directory} aside to train from the start, or use a new --workdir")

  def wait(self) -> None:
    with self._disk_full_explained():
      self.manager.wait_until_finished()

  def close(self) -> None:
    """Finish any save and release the workdir's lock, whatever the save's outcome."""
    try:
      with self._disk_full_explained():
        self.manager.close()
    finally:
      lock.release(self._lock)
      self._lock = None


def first_readable(steps, read, on_damaged, fallback: bool = True, start_over: str = ""):
  """(read(step), step) for the first of `steps` (newest first) that reads; a CheckpointError of a
  damaged step calls on_damaged(step, error, next step) and tries the next one: the one fallback
  loop of training resumes and of weight loaders. A _DifferentRun (another config, not damage) is
  raised as it is; damage with `fallback` off or no step left with the advice true for the case
  (`start_over`: what to do when no readable step is left)."""
  for i, step in enumerate(steps):
    try:
      return read(step), step
    except CheckpointError as e:
      if isinstance(e, _DifferentRun):
        raise
      if i == len(steps) - 1:
        earlier = "no earlier step is left" if i else "there is no earlier step to fall back to"
        raise CheckpointError(f"{e}; {earlier}" + (f": {start_over}" if start_over else "")) from None
      if not fallback:
        raise CheckpointError(f"{e}; with restore_fallback=True the run resumes from the previous step, "
                              f"{steps[i + 1]}") from None
      on_damaged(step, e, steps[i + 1])
  return None, None


class _DifferentRun(CheckpointError):
  """Not damage: the checkpoint belongs to another configuration (never moved aside)."""


def _disk_full(e: BaseException) -> bool:
  """Whether an error (or one it wraps) is the OS's "no space left on device" (errno 28)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e) \
        or "os_error_code='28'" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _describe(e: Exception) -> str:
  """One readable line of an orbax / tensorstore error: its first line without the bound-method
  repr orbax appends, followed by the first line of the error it wraps (where the cause is)."""
  def line(x):
    first = str(x).strip().splitlines()[0] if str(x).strip() else ""
    return re.sub(r"\s*See full TensorStore details:.*$", "", first)[:200]
  text, cause = f"{type(e).__name__}: {line(e)}", e.__cause__ or e.__context__
  if cause is not None and line(cause) and line(cause) not in text:
    text += f" <- {type(cause).__name__}: {line(cause)}"
  return text


def _saved_item(manager, step: int, name: str):
  """A JSON item of a step, or None where the step has none (written before it existed)."""
  if not (epath.Path(manager.directory) / str(step) / name).exists():
    return None
  return getattr(manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()})), name)


def _saved_checksums(manager, step: int):
  """The step's saved fingerprints, or None for checkpoints written before they existed."""
  return _saved_item(manager, step, "checksums")


def _reader(workdir) -> ocp.CheckpointManager:
  """A manager that only reads: it creates nothing (a mistyped path stays absent)."""
  return ocp.CheckpointManager(_absolute(workdir) / "checkpoints", options=ocp.CheckpointManagerOptions(
      create=False, read_only=True, max_to_keep=None, save_interval_steps=0))


def latest_step(workdir):
  """The newest complete checkpoint step of a workdir, or None (also when it has no checkpoints/).
  Read from the directory listing, not through an orbax manager (whose start-up is a collective
  that every process would have to reach): a step is a numbered folder that orbax finalised."""
  directory = _absolute(workdir) / "checkpoints"
  if not directory.is_dir():
    return None
  steps = [int(d.name) for d in directory.iterdir() if d.name.isdigit() and (
      (d / "_CHECKPOINT_METADATA").exists() or (d / "commit_success.txt").exists())]
  return max(steps, default=None)


def save_weights(workdir, params, config, step: int = 0) -> None:
  """A new workdir holding only `params` at `step`, with the config and checksums: what converted
  public weights become, read by every loader (probe, generate, classify's init_from)."""
  ckpt = Checkpointer(workdir, max_to_keep=1)
  try:
    if ckpt.latest_step() is not None:
      raise CheckpointError(f"{str(workdir)!r} already holds a checkpoint: convert into a new folder")
    ckpt.save(step, {"params": params}, {}, config)
    ckpt.wait()
  finally:
    ckpt.close()


def load_config(workdir):
  """The config a workdir's latest checkpoint was written with, as a locked ConfigDict."""
  if latest_step(workdir) is None:
    raise CheckpointError(f"workdir {str(workdir)!r} has no checkpoint: pre-train there first")
  manager = _reader(workdir)
  try:
    step = manager.latest_step()
    if step is None:
      raise CheckpointError(f"workdir {str(workdir)!r} has no checkpoint: pre-train there first")
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
  finally:
    manager.close()
  return with_defaults(saved)


def with_defaults(saved: dict):
  """A saved config as a locked ConfigDict, with every key added to the code since it was written
  at its default (configs/common.py) -- each such key defaults to what the code did before it."""
  from configs import common  # noqa: PLC0415 - the config defaults, wherever this module is imported
  method = saved.get("method")
  base = common.base_config(method).to_dict() if method in methods.REGISTRY else {}
  def merged(defaults, values):
    out = dict(defaults)
    for k, v in values.items():
      out[k] = merged(defaults[k], v) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
    return out
  config = ml_collections.ConfigDict(merged(base, saved))
  config.lock()
  return config


def load_provenance(workdir):
  """Where the latest checkpoint's run took its first weights from ({"workdir", "step"} of its
  init_from), or None (from scratch, or an older checkpoint)."""
  if latest_step(workdir) is None:
    raise CheckpointError(f"workdir {str(workdir)!r} has no checkpoint")
  manager = _reader(workdir)
  try:
    return _saved_item(manager, manager.latest_step(), "provenance")
  finally:
    manager.close()


def _flag_value(value) -> str:
  return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _refuse_other_meaning(manager, step: int, config, workdir) -> None:
  """The one rule of every reader of weights: the settings that give a network's numbers their
  meaning (its method's `meaning`: targets, links, schedule, exponent, conditioning ...) are the
  ones the weights were written with. A differing one is refused, named with the value to use;
  keys the saved config lacks (added to the code since) are not compared."""
  old, new = _flat_configs(manager, step, config)
  if old is None:
    return
  writer = methods.REGISTRY.get(old.get("method"))
  if writer is not None and type(writer) is not type(methods.get(config)):  # another objective's numbers
    raise CheckpointError(f"{str(workdir)!r} step {step} holds weights of method {old['method']!r} (another "
                          f"objective: {type(writer).__name__}), read here as method {config.method!r}: run with a "
                          f"config of method {old['method']!r} (--config.method={old['method']})")
  differ = [k for k in methods.get(config).meaning if k in old and k in new and old[k] != new[k]]
  if differ:
    raise CheckpointError(
        f"{str(workdir)!r} step {step} holds weights written with "
        + ", ".join(f"{k}={old[k]!r}" for k in differ) + ", read here with "
        + ", ".join(f"{k}={new[k]!r}" for k in differ) + " (another meaning of the same numbers): run with "
        + " ".join(f"--config.{k}={_flag_value(old[k])}" for k in differ))


def restore_params(workdir, abstract_params, prefer_ema: bool = False, config=None):
  """Only the parameters of the latest checkpoint in a workdir (for `init_from` and probing);
  the EMA copy instead when `prefer_ema` and the run kept one."""
  return restore_params_and_step(workdir, abstract_params, prefer_ema, config)[0]


def restore_params_and_step(workdir, abstract_params, prefer_ema: bool = False, config=None):
  """(parameters, the step they were read from): the latest step, or an earlier one when the
  latest is damaged -- what a result computed from them must say it came from."""
  step = latest_step(workdir)
  if step is None:
    raise CheckpointError(f"workdir {str(workdir)!r} has no checkpoint: pre-train there first "
                          "(python main.py --mode=pretrain --workdir=...)")
  manager = _reader(workdir)
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
  if config is not None:  # the same shapes read under another meaning than they were written with
    try:
      _refuse_other_meaning(manager, step, config, workdir)
    except CheckpointError:
      manager.close()
      raise
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract_params)
  steps = sorted((s for s in manager.all_steps() if s <= step), reverse=True)
  try:
    def read(at):
      try:
        restored = manager.restore(at, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={key: abstract_params}, restore_args={key: restore_args}, partial_restore=True)))
      except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
        raise CheckpointError(f"{str(workdir)!r} step {at} could not be read ({_describe(e)}): it is damaged") from None
      _verify(_saved_checksums(manager, at), {key: restored.state[key]}, f"{str(workdir)!r} step {at}")
      return restored.state[key]

    def use_previous(at, error, next_step):
      logging.warning("%s -- using the previous step %d instead", error, next_step)

    return first_readable(steps, read, use_previous,  # a damaged step: the previous one, as resumes do
                          start_over=f"write the weights of {str(workdir)!r} again (train, or convert, into a new folder)")
  finally:
    manager.close()
