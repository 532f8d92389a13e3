"""Output files written whole: to a temporary name beside the target, then renamed over it, so a
failed or interrupted run never leaves a half-written file and never destroys the last good one
before the new one is complete; a mode's outputs as one set (`OutputSet`). Paths may be local or
remote (etils epath)."""
import errno
import io
import os

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils


class OutputError(RuntimeError):
  """An output could not be written (a full disk, a read-only folder): the message names the file,
  how much it needed and what to do; the previous outputs are left whole."""


def _explained(e: OSError, path, size: int) -> OutputError:
  if e.errno == errno.ENOSPC or "No space left on device" in str(e):
    need = f"at least {size / 2 ** 20:.1f} MiB" if size else "space"
    return OutputError(f"no space left on device writing {path}: free {need} there and run the same command "
                       "again (the previous results are left whole)")
  return OutputError(f"cannot write {path} ({e.strerror or e}): make its folder writable or use another --workdir")


def write_bytes(path, data: bytes) -> None:
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic on a local filesystem; a copy-then-delete on object stores
  except OSError as e:
    try:
      if tmp.exists():
        tmp.unlink()
    except OSError:
      pass
    raise _explained(e, path, len(data)) from None


def on_main(write) -> None:
  """`write()` on process 0 -- the one writer of a mode's outputs -- with its outcome agreed by
  every process (a collective: all of them call this at the same point). A failure (a full disk,
  a read-only folder) is an OutputError raised on every process, so no process waits for one that
  stopped writing."""
  error = None
  if jax.process_index() == 0:
    try:
      write()
    except OutputError as e:
      error = e
    except OSError as e:
      error = _explained(e, getattr(e, "filename", None) or "an output", 0)
  if jax.process_count() > 1:
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and error is None:
      error = OutputError("process 0 could not write this mode's outputs: see its error line")
  if error is not None:
    raise error


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode())


def write_npz(path, **arrays) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(path, buffer.getvalue())


class OutputSet:
  """The outputs of one run of a mode, published together: written into a staging folder beside
  `target` (`path(name)`), then moved into place by `publish()` (process 0; call it on every
  process). A failed or interrupted run leaves the previous set whole (and its staging folder,
  removed by the next run). Entries of the previous set matching `keep` (caches) carry over.
  Used as a context manager, a failure removes the staging folder at once (process 0)."""

  def __init__(self, target, keep=()):
    self.target, self.keep = epath.Path(target), tuple(keep)
    self.staging = self.target.parent / f".{self.target.name}.staging"
    if jax.process_index() == 0 and self.target.parent.exists():
      previous = self.target.parent / f".{self.target.name}.previous"
      if previous.exists() and not self.target.exists():  # cut short between publish's two renames
        previous.rename(self.target)
      _remove(self.staging)  # a previous run's, cut short
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"staging {self.target} cleared")

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    if error is not None and jax.process_index() == 0:
      try:
        _remove(self.staging)
      except OSError:
        pass  # the next run removes it
    if isinstance(error, OSError):  # e.g. a full disk in a writer that is not write_bytes
      raise _explained(error, self.staging, 0) from None
    return False

  def path(self, name: str) -> epath.Path:
    """Where to write output `name` now (process 0)."""
    return self.staging / name

  def final(self, name: str) -> epath.Path:
    """Where output `name` will be once published (what results should name)."""
    return self.target / name

  def publish(self) -> None:
    if jax.process_index() == 0:
      try:
        self._publish()
      except OSError as e:
        raise _explained(e, self.target, 0) from None
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"{self.target} published")

  def _publish(self) -> None:
    self.staging.mkdir(parents=True, exist_ok=True)
    old = self.target.parent / f".{self.target.name}.previous"
    if self.target.exists():
      for pattern in self.keep:
        for entry in self.target.glob(pattern):
          entry.rename(self.staging / entry.name)
      _remove(old)
      self.target.rename(old)
    self.staging.rename(self.target)  # the new set appears in one rename
    _remove(old)


def _remove(path: epath.Path) -> None:
  if path.is_dir():
    path.rmtree()
  elif path.exists():
    path.unlink()
