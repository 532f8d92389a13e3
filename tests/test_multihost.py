"""multihost.py on one process: the start-up decision (environments mocked), host copies and
agreement helpers, and the stop request. The N-process behaviour is in test_distributed.py."""
import os
import signal

import jax
import numpy as np
import pytest
from jax._src.clusters import cloud_tpu_cluster

from umd_jax import multihost, sharding
from conftest import tiny_config

SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                "TPU_SKIP_MDS_QUERY")


@pytest.fixture
def joins(monkeypatch):
  """No cluster variables; jax.distributed.initialize recorded instead of run."""
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
  return calls


def _tpu_vm(monkeypatch, workers: int):
  """A Cloud TPU VM whose metadata server names `workers` hosts; TPU_WORKER_HOSTNAMES not exported."""
  metadata = {"agent-worker-number": "0", "worker-network-endpoints": ",".join(f"h{i}" for i in range(workers)),
              "tpu-env": "ACCELERATOR_TYPE: 'v4-32'"}
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: (metadata[key], 200))


def test_single_host_stays_uninitialised(joins):
  assert multihost.detected_cluster() is None
  assert multihost.initialize() is False and joins == []


def test_explicit_coordinator_joins(joins):
  assert multihost.initialize("127.0.0.1:1234", 2, 1) is True and joins == [("127.0.0.1:1234", 2, 1)]


@pytest.mark.parametrize("tasks,expected", [("1", False), ("4", True)])
def test_slurm_is_detected_and_joined_only_with_several_tasks(joins, monkeypatch, tasks, expected):
  for k, v in {**SLURM, "SLURM_NTASKS": tasks}.items():
    monkeypatch.setenv(k, v)
  assert multihost.detected_cluster() == ("slurm", int(tasks))
  assert multihost.initialize() is expected and joins == ([()] if expected else [])


@pytest.mark.parametrize("workers,expected", [(1, False), (4, True)])
def test_tpu_slice_found_from_the_vm_metadata_without_worker_hostnames(joins, monkeypatch, workers, expected):
  _tpu_vm(monkeypatch, workers)
  assert multihost.detected_cluster() == ("gcetpu", workers)
  assert multihost.initialize() is expected and joins == ([()] if expected else [])


def test_host_copies_and_agreement_on_one_process():
  mesh = sharding.make_mesh(tiny_config().mesh)
  value = np.arange(32, dtype=np.float32).reshape(16, 2)
  placed = multihost.global_array(value, sharding.batch_sharding(mesh))
  assert len(placed.sharding.device_set) == 8
  np.testing.assert_array_equal(multihost.to_host(placed), value)
  assert multihost.all_processes(True) and not multihost.all_processes(False)
  multihost.barrier("one process: returns at once")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_request_on_one_process(sig):
  before = signal.getsignal(sig)
  with multihost.StopRequest() as stop:
    assert not stop.reached(1)
    os.kill(os.getpid(), sig)
    assert stop.reached(2) and stop.signal == sig.name
  assert signal.getsignal(sig) is before
