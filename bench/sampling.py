"""Sampling benchmark: images/s and the time of one sampling step against a plain forward of
the same (guidance-doubled) batch; the scan should add no overhead (target ≤ 1.1×).

  python bench/sampling.py --config=configs/demo.py:finetune --set sample.batch_size=256
  python bench/sampling.py --config=configs/umd_s.py:S/4,finetune --set data.image_size=32 --set sample.batch_size=32

Weights are a fresh initialisation (speed does not depend on them), so no checkpoint is needed.
"""
import statistics

from common import load_config, make_parser, median_ratio, report, time_rounds

import jax
import jax.numpy as jnp
from flax import nnx

from umd_jax import generate, sharding, weights
from umd_jax.models import umd


def main():
  parser = make_parser(__doc__, "configs/demo.py:finetune", repeats=5)
  args = parser.parse_args()
  config = load_config(args.config, args.set)
  s = config.sample
  mesh = sharding.make_mesh(config.mesh)
  graphdef, params = weights.fresh(config, mesh, config.seed)
  b = s.batch_size
  labels = jax.device_put(jnp.arange(b, dtype=jnp.int32) % max(config.model.num_classes, 1),
                          sharding.batch_sharding(mesh))
  sampler = generate.make_sampler(config, graphdef, mesh)
  guided = config.model.num_classes > 0 and s.cfg_scale != 1.0
  rows = 2 * b if guided else b  # guidance runs the conditional and null halves together
  size, channels = umd.input_shape(config)
  x = jax.device_put(jnp.zeros((rows, size, size, channels)), sharding.batch_sharding(mesh))
  y = jnp.zeros((rows,), jnp.int32) if config.model.num_classes else None
  forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, jnp.full((rows,), 500), y)["x0"])
  # The whole sampling loop and one forward take turns (see common.time_rounds).
  times = time_rounds({"sample": lambda: sampler(params, labels, jax.random.PRNGKey(0)),
                       "forward": lambda: forward(params, x)}, repeats=args.repeats, warmup=1)
  sample_s, forward_s = statistics.median(times["sample"]), statistics.median(times["forward"])
  steps = 1000 if s.sampler == "ddpm" else s.steps
  row = {"config": args.config, "batch": b, "steps": steps, "cfg": s.cfg_scale, "sample_s": sample_s,
         "images_per_s": b / sample_s, "step_ms": sample_s / steps * 1e3, "forward_ms": forward_s * 1e3,
         "step_over_forward": median_ratio(times["sample"], times["forward"]) / steps}
  report("sampling", [row], {"overrides": " ".join(args.set) or "-"}, args.json)


if __name__ == "__main__":
  main()
