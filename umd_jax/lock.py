"""The lock of a training workdir: `WORKDIR/.lock` names the host and pid of the run writing there,
so a second run on the same workdir stops at once; the lock of a process that is gone (same host)
is taken over. Taking it is atomic (an exclusive flock of the folder around the look and the
write). Every process of a pod agrees on the outcome."""
import contextlib
import fcntl
import os
import socket

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

NAME = ".lock"


class WorkdirError(RuntimeError):
  """The workdir is in use or not writable: the message says what to do."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def take(workdir: epath.Path, prepare) -> epath.Path | None:
  """Process 0 takes WORKDIR/.lock ("host pid"); a lock of a dead process on this host is taken
  over. The look and the write are one step: they run holding an exclusive `flock` of the workdir
  folder, so of two runs started at the same instant exactly one gets the lock (remote paths,
  which have no flock, keep the look-then-write). All processes agree on the outcome; a held lock
  is a WorkdirError raised before anything is created in the workdir. `prepare()` (creating the
  checkpoint folder) runs once the lock is taken. Returns the lock's path on process 0 (for
  `release`), None elsewhere."""
  path, problem, taken = workdir / NAME, None, None
  if jax.process_index() == 0:
    with _exclusive(workdir):
      problem = _held_by(path, workdir)
      if problem is None:
        _write(path)
        taken = path
  if jax.process_count() > 1:
    held = multihost_utils.process_allgather(np.array(problem is not None))
    if np.any(held) and problem is None:
      problem = f"workdir {str(workdir)!r} is in use by another run (see process 0's error)"
  if problem:
    raise WorkdirError(problem)
  try:
    prepare()
  except BaseException:
    release(taken)
    raise
  return taken


def _held_by(path: epath.Path, workdir) -> str | None:
  """Why the lock at `path` is held (None: free, or left by a process of this host that is gone)."""
  if not path.exists():
    return None
  holder = path.read_text().split()
  host, pid = (holder + ["?", "0"])[:2]
  if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
    logging.warning("taking over the lock of a run that is gone (%s, pid %s)", host, pid)
    path.unlink()
    return None
  return (f"workdir {str(workdir)!r} is in use by pid {pid} on host {host} (lock file {path}): wait for "
          "that run to finish, use another --workdir, or delete the lock file if no run is using it")


def _write(path: epath.Path) -> None:
  text = f"{socket.gethostname()} {os.getpid()}"
  if "://" in str(path):
    path.write_text(text)
    return
  fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # never over another's lock
  with os.fdopen(fd, "w") as f:
    f.write(text)


@contextlib.contextmanager
def _exclusive(workdir: epath.Path):
  """An exclusive flock of the (created if need be) workdir folder for the duration; released
  by the kernel if the process dies. A no-op for remote paths."""
  if "://" in str(workdir):
    yield
    return
  try:
    os.makedirs(str(workdir), exist_ok=True)
    fd = os.open(str(workdir), os.O_RDONLY)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable ({e.strerror or e}): "
                       "choose another --workdir or fix its permissions") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the flock


def release(path) -> None:
  """Remove a lock `take` returned (None: nothing to do)."""
  if path is not None and path.exists():
    path.unlink()


def ensure_writable(directory: epath.Path) -> None:
  """Create `directory` and write a probe file there, per process (every host of a pod checks the
  shared workdir at once)."""
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write_test.{jax.process_index()}.{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"workdir {directory.parent} is not writable ({e.strerror or e}): "
                       "choose another --workdir or fix its permissions") from None
