"""Feature-extraction benchmark: images/s of the probe's jitted, sharded forward (all blocks
pooled, DDAE-style noise) against the pre-training forward rate measured in the same run.

  python bench/extraction.py --config=configs/demo.py --set probe.batch_size=256
  python bench/extraction.py --config=configs/umd_s.py:S/4 --set data.image_size=32 --set probe.batch_size=64

Weights are a fresh initialisation (speed does not depend on them).
"""
import statistics

from common import load_config, make_parser, median_ratio, report, time_rounds

import jax
import numpy as np
from flax import nnx

from umd_jax import corruption, diffusion, probe, sharding, weights
from umd_jax.models import umd


def main():
  parser = make_parser(__doc__, "configs/demo.py", repeats=10)
  args = parser.parse_args()
  config = load_config(args.config, args.set)
  d, b = config.data, config.probe.batch_size
  mesh = sharding.make_mesh(config.mesh)
  graphdef, params = weights.fresh(config, mesh, config.seed)
  bs = sharding.batch_sharding(mesh)
  images = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (b, d.image_size, d.image_size, d.channels))
                          .astype(np.float32), bs)
  indices = jax.device_put(np.arange(b, dtype=np.int32), bs)
  calls = {}
  for name, t, blocks in (("rep, clean", -1, [-1]), ("all blocks, t=100", 100, [-1] + list(range(probe.num_blocks(config))))):
    fn = probe.make_feature_fn(config, graphdef, t, blocks, mesh)
    calls[name] = lambda fn=fn: fn(params, images, indices)
  # The pre-training forward (both sub-batches at their own lengths, loss included), same batch.
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  c = config.corruption
  num_patches = umd.num_patches(config)

  @jax.jit
  def train_forward(params, x):
    model = nnx.merge(graphdef, params)
    return corruption.umd_loss(model, schedule, x, jax.random.PRNGKey(0), num_patches=num_patches,
                               clean_fraction=c.clean_fraction, clean_mask_ratio=c.clean_mask_ratio,
                               noised_mask_ratio=c.noised_mask_ratio)[0]
  calls["pre-training forward"] = lambda: train_forward(params, images)
  times = time_rounds(calls, repeats=args.repeats)  # the three take turns (see common.time_rounds)
  rows = [{"features": name, "batch": b, "ms": statistics.median(ts) * 1e3,
           "images_per_s": b / statistics.median(ts),
           "vs_training_forward": median_ratio(times["pre-training forward"], ts)} for name, ts in times.items()]
  report("extraction", rows, {"config": args.config, "overrides": " ".join(args.set) or "-"}, args.json)


if __name__ == "__main__":
  main()
