"""One process of the 2-process data test (tests/test_distributed.py): joins jax.distributed on
loopback, reads training batches of a source whose records are their own index, and writes the
rows this process read and the global batches it saw.

  python tests/distributed_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID STEPS OUT.json
"""
import json
import sys

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from configs import demo
from umd_jax import data, sharding

NUM_RECORDS, GLOBAL_BATCH = 100, 16


class IndexSource:
  """Record i is the image i (mod 256) with label i: a batch names the records it holds."""

  def __len__(self):
    return NUM_RECORDS

  def __getitem__(self, i):
    return {"image": np.full((8, 8, 1), i % 256, np.uint8), "label": np.int32(i)}


class AsIs(grain.transforms.RandomMap):
  def random_map(self, record, rng):
    return {"image": record["image"].astype(np.float32), "label": record["label"]}


def read_batches(steps: int):
  """(local rows, global batches) of the first `steps` training batches, as label lists."""
  config = demo.get_config("4")
  mesh = sharding.make_mesh(config.mesh)
  batches = data.make_batches(config.data, IndexSource(), global_batch=GLOBAL_BATCH,
                              sharding=sharding.batch_sharding(mesh), seed=0, train=True, augment=AsIs())
  local, global_ = [], []
  for _ in range(steps):
    labels = next(batches)["label"]
    shards = sorted(labels.addressable_shards, key=lambda s: s.index[0].start)
    local.append(np.concatenate([np.asarray(s.data) for s in shards]).tolist())
    global_.append(np.asarray(multihost_utils.process_allgather(labels, tiled=True)).tolist())
  return local, global_


def main():
  coordinator, num_processes, process_id, steps, out = sys.argv[1:]
  jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
  local, global_ = read_batches(int(steps))
  with open(out, "w") as f:
    json.dump({"process": jax.process_index(), "devices": jax.device_count(),
               "local_devices": jax.local_device_count(), "local": local, "global": global_}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
