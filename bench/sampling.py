"""Sampling benchmark: images/s and the time of one sampling step against a plain forward of
the same (guidance-doubled) batch; the scan should add no overhead (target ≤ 1.1×).

  python bench/sampling.py --config=configs/demo.py:finetune --set sample.batch_size=256
  python bench/sampling.py --config=configs/umd_s.py:S/4,finetune --set data.image_size=32 --set sample.batch_size=32

With --inpainting: one DiffMAE inpainting (encoder once, only the masked patches denoised)
against one UMD inpainting (the whole network on the whole image, RePaint-style) with the same
number of network calls (DDIM over sample.steps), on the same images and mask, timed in the same
rounds; --set overrides go to both configs:

  python bench/sampling.py --inpainting --config=configs/demo.py --diffmae=configs/demo.py:diffmae \
      --set sample.steps=50 --set sample.batch_size=256
  python bench/sampling.py --inpainting --config=configs/umd_b.py:B/4 --diffmae=configs/diffmae_b.py:umd64 \
      --set sample.batch_size=64 --set sample.steps=50 --set model.dtype=bfloat16

Weights are a fresh initialisation (speed does not depend on them), so no checkpoint is needed.
"""
import statistics

from common import load_config, make_parser, median_ratio, report, time_rounds

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from umd_jax import generate, geometry, inpainting, methods, multihost, sharding, weights


def main():
  parser = make_parser(__doc__, "configs/demo.py:finetune", repeats=5)
  parser.add_argument("--inpainting", action="store_true", help="DiffMAE's inpainting against UMD's")
  parser.add_argument("--diffmae", default="configs/demo.py:diffmae", help="with --inpainting: the DiffMAE config")
  args = parser.parse_args()
  if args.inpainting:
    return inpainting_row(args)
  config = load_config(args.config, args.set)
  if not isinstance(methods.get(config), methods.Sampler):
    raise SystemExit(f"error: {args.config} is a {config.method} config, which does not sample: use --inpainting")
  s = config.sample
  mesh = sharding.make_mesh(config.mesh)
  graphdef, params = weights.fresh(config, mesh, config.seed)
  b = s.batch_size
  labels = jax.device_put(jnp.arange(b, dtype=jnp.int32) % max(config.model.num_classes, 1),
                          sharding.batch_sharding(mesh))
  sampler = generate.make_sampler(config, graphdef, mesh)
  guided = config.model.num_classes > 0 and s.cfg_scale != 1.0
  rows = 2 * b if guided else b  # guidance runs the conditional and null halves together
  size, channels = geometry.input_shape(config)
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


def inpaint_call(config, mesh):
  """A no-argument call of one batch's inpainting with `config`'s method and fresh weights."""
  s = config.sample
  graphdef, params = weights.fresh(config, mesh, config.seed)
  bs = sharding.batch_sharding(mesh)
  size, channels = config.data.image_size, config.data.channels
  images = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (s.batch_size, size, size, channels))
                          .astype(np.float32), bs)
  known_host = inpainting.inpaint_mask(config, s.inpaint, s.batch_size, jax.random.PRNGKey(0))
  known = multihost.global_array(known_host, bs)
  labels = jax.device_put(np.zeros((s.batch_size,), np.int32), bs)
  fill = inpainting.make_inpainter(config, graphdef, inpainting.masked_patch_count(config, known_host))
  return lambda: fill(params, images, known, labels, jax.random.PRNGKey(1)), known_host


def inpainting_row(args):
  """One row: DiffMAE's inpainting time against UMD's, same images, mask and network calls
  (no guidance on either side: DiffMAE has none)."""
  both = ["sample.sampler=ddim", "sample.inpaint=center", "sample.cfg_scale=1.0", *args.set]
  configs = {"umd": load_config(args.config, both), "diffmae": load_config(args.diffmae, both)}
  steps = {name: methods.get(c).inpaint_steps(c) for name, c in configs.items()}
  if steps["umd"] != steps["diffmae"]:
    raise SystemExit(f"error: the two inpaint with {steps} network calls: set sample.inpaint_resample=1")
  mesh = sharding.make_mesh(configs["umd"].mesh)
  calls = {}
  for name, config in configs.items():
    calls[name], known = inpaint_call(config, mesh)
  times = time_rounds(calls, repeats=args.repeats, warmup=1)
  row = {"umd": args.config, "diffmae": args.diffmae, "batch": configs["umd"].sample.batch_size, "steps": steps["umd"],
         "masked_share": float(1 - known.mean()), "umd_ms": 1e3 * float(np.median(times["umd"])),
         "diffmae_ms": 1e3 * float(np.median(times["diffmae"])),
         "diffmae_over_umd": median_ratio(times["diffmae"], times["umd"])}
  report("inpainting", [row], {"overrides": " ".join(args.set) or "-"}, args.json)


if __name__ == "__main__":
  main()
