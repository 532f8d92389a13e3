"""The lock of a training workdir: `WORKDIR/.lock` names the host and pid of the run writing there,
so a second run on the same workdir stops at once; the lock of a process that is gone (same host)
is taken over. Every process of a pod agrees on the outcome."""
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
  over. All processes agree on the outcome; a held lock is a WorkdirError raised before anything
  is created. `prepare()` (creating the workdir) runs only once it is free. Returns the lock's
  path on process 0 (for `release`), None elsewhere."""
  path, problem = workdir / NAME, None
  if jax.process_index() == 0:
    if path.exists():
      holder = path.read_text().split()
      host, pid = (holder + ["?", "0"])[:2]
      if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
        logging.warning("taking over the lock of a run that is gone (%s, pid %s)", host, pid)
      else:
        problem = (f"workdir {str(workdir)!r} is in use by pid {pid} on host {host} (lock file {path}): wait for "
                   "that run to finish, use another --workdir, or delete the lock file if no run is using it")
  if jax.process_count() > 1:
    held = multihost_utils.process_allgather(np.array(problem is not None))
    if np.any(held) and problem is None:
      problem = f"workdir {str(workdir)!r} is in use by another run (see process 0's error)"
  if problem:
    raise WorkdirError(problem)
  prepare()
  if jax.process_index() == 0:
    path.write_text(f"{socket.gethostname()} {os.getpid()}")
    return path
  return None


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
