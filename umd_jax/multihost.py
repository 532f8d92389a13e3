"""What the processes of a multi-host job (TPU pod, GPU cluster) share: start-up, host copies of
global arrays, agreed stops and decisions, and once-only file work.

Every function here is collective where it says so: all processes must call it, in the same order.
With one process each is a plain local operation.
"""
import signal

import jax
import numpy as np
from absl import logging
from jax._src import clusters
from jax.experimental import multihost_utils


def detected_cluster():
  """(name, process count) of the cluster `jax.distributed.initialize()` would detect by itself
  (SLURM, Open MPI, Cloud TPU slices from the VM's metadata or GKE's variables, Kubernetes), or
  None. JAX's own detectors, in JAX's order; opt-in ones (mpi4py) are left out as JAX does."""
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if not env.opt_in_only_method and env.is_env_present():
      return env.name, int(env.get_process_count())
  return None


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> bool:
  """Join the job's processes: explicitly with a coordinator address, else where JAX detects a
  cluster of more than one process. A single-host run stays uninitialised. True if joined."""
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  found = detected_cluster()
  if found is not None and found[1] > 1:
    logging.info("%s cluster of %d processes detected", *found)
    jax.distributed.initialize()
    return True
  return False


def is_main() -> bool:
  return jax.process_index() == 0


def to_host(tree):
  """Numpy copies of (possibly batch-sharded, multi-host) arrays on every process. Collective."""
  return multihost_utils.process_allgather(tree, tiled=True)


def global_array(value, sharding) -> jax.Array:
  """A global array with `sharding` from a host value that every process holds in full."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def all_processes(flag: bool) -> bool:
  """True where `flag` is true on every process (e.g. 'my copy of the cache file exists'). Collective."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.all(multihost_utils.process_allgather(np.array(bool(flag)))))


def barrier(name: str) -> None:
  """Wait until every process gets here (e.g. until process 0 has written a file). Collective."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class StopRequest:
  """SIGTERM / SIGINT, turned into a stop that every process takes at the same step.

  One process: a signal sets a flag, and `reached(step)` is true at the next step boundary.
  Several: JAX's preemption service (its SIGTERM notifier and the coordination service's sync
  point) tells every process the same step: the first step after the notice has reached all of
  them (max + 1 of the steps they had reported), so no process leaves the step loop alone.
  SIGINT is passed on as SIGTERM to that notifier. `reached` must be called at every step.
  """

  def __init__(self):
    self.signal = None
    self._previous = {}
    self._distributed = jax.process_count() > 1

  def __enter__(self):
    # Several processes: SIGTERM stays with JAX's notifier (a Python handler would replace it).
    for sig in (signal.SIGINT,) if self._distributed else (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, _frame):
    if self._distributed:
      self.signal = "SIGINT"
      signal.raise_signal(signal.SIGTERM)  # to the preemption notifier, which tells the others
    else:
      self.signal = signal.Signals(signum).name

  def reached(self, step: int) -> bool:
    if not self._distributed:
      return self.signal is not None
    if multihost_utils.reached_preemption_sync_point(step):
      self.signal = self.signal or "SIGTERM (preemption notice)"
      return True
    return False

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
