"""Inpainting cost: one DiffMAE inpainting (encoder once, only the masked patches denoised) against
one UMD inpainting (the whole network on the whole image, RePaint-style) with the same number of
network calls, on the same images and mask, timed in the same rounds.

  python bench/inpainting.py                                        # the digits demo scale
  python bench/inpainting.py --config=configs/umd_b.py:B/4 --diffmae=configs/diffmae_b.py:umd64 \
      --set sample.batch_size=64 --set sample.steps=50 --set model.dtype=bfloat16

--set overrides go to both configs (sample.steps, sample.batch_size, sample.inpaint, the dtype);
both inpaint by DDIM over sample.steps. Weights are fresh (speed does not depend on them).
"""
from common import load_config, make_parser, median_ratio, report, time_rounds

import jax
import numpy as np

from umd_jax import inpainting, methods, multihost, sharding, weights


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


def main():
  parser = make_parser(__doc__, "configs/demo.py", repeats=5)
  parser.add_argument("--diffmae", default="configs/demo.py:diffmae")
  args = parser.parse_args()
  both = ["sample.sampler=ddim", "sample.inpaint=center", *args.set]
  umd, diffmae = load_config(args.config, both), load_config(args.diffmae, both)
  steps = {name: methods.get(c).inpaint_steps(c) for name, c in (("umd", umd), ("diffmae", diffmae))}
  if steps["umd"] != steps["diffmae"]:
    raise SystemExit(f"the two inpaint with {steps} network calls: set sample.inpaint_resample=1")
  mesh = sharding.make_mesh(umd.mesh)
  calls = {}
  for name, config in (("umd", umd), ("diffmae", diffmae)):
    calls[name], known = inpaint_call(config, mesh)
  times = time_rounds(calls, repeats=args.repeats, warmup=1)
  row = {"umd": args.config, "diffmae": args.diffmae, "batch": umd.sample.batch_size, "steps": steps["umd"],
         "masked_share": float(1 - known.mean()), "umd_ms": 1e3 * float(np.median(times["umd"])),
         "diffmae_ms": 1e3 * float(np.median(times["diffmae"])),
         "diffmae_over_umd": median_ratio(times["diffmae"], times["umd"])}
  report("inpainting", [row], {"overrides": " ".join(args.set) or "-"}, args.json)


if __name__ == "__main__":
  main()
