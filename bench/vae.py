"""VAE benchmark: encoding and decoding images/s of Stable Diffusion's VAE (the latent pipeline's
two ends), float32 at precision "highest", timed in the same rounds as a dense matmul roofline.

  python bench/vae.py                                   # SD topology, 256 px, batch 8, random weights
  python bench/vae.py --size 256 --batch 2 --repeats 3  # a CPU-sized run
  python bench/vae.py --weights vae.npz                 # a converted file (speed does not depend on it)

Encoding is what `--mode=encode` runs per view (twice per record: image and mirror); decoding is
what `--mode=generate` runs per sample. Work is sharded over the batch on every device.
"""
import argparse
import statistics

from common import matmul_call, median_ratio, report, time_rounds

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from umd_jax import latent, sharding
from umd_jax.models import vae as vae_model


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", default=None, help="write rows and machine facts to this file")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--weights", default="")
  args = parser.parse_args()
  mesh = sharding.local_mesh()
  rows = NamedSharding(mesh, P("data"))
  if args.weights:
    v = latent.Vae(args.weights, mesh)
    graphdef, params, topology = v.graphdef, v.params, v.topology
  else:
    model = vae_model.AutoencoderKL(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params, topology = jax.device_put(nnx.to_pure_dict(state), NamedSharding(mesh, P())), model.topology
  f = topology.downsample
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32), rows)
  z = jax.device_put(rng.standard_normal((args.batch, args.size // f, args.size // f, topology.latent_channels))
                     .astype(np.float32), rows)
  encode = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode(x), out_shardings=rows)
  decode = jax.jit(lambda p, z: nnx.merge(graphdef, p).decode(z), out_shardings=rows)
  matmul, matmul_flops = matmul_call("float32")
  enc_flops = encode.lower(params, x).compile().cost_analysis()
  dec_flops = decode.lower(params, z).compile().cost_analysis()
  gflop = lambda c: float((c[0] if isinstance(c, (list, tuple)) else c).get("flops", float("nan"))) / 1e9
  times = time_rounds({"encode": lambda: encode(params, x), "decode": lambda: decode(params, z), "matmul": matmul},
                      repeats=args.repeats, warmup=1, best_of={"matmul": 3})
  matmul_gflops = matmul_flops / statistics.median(times["matmul"]) / 1e9
  out = []
  for name, c in (("encode", enc_flops), ("decode", dec_flops)):
    t = statistics.median(times[name])
    out.append({"part": name, "size": args.size, "batch": args.batch, "images_per_s": args.batch / t,
                "ms_per_image": t / args.batch * 1e3, "xla_gflop_per_image": gflop(c) / args.batch,
                "fraction_of_matmul_rate": gflop(c) / median_ratio(times[name], times["matmul"]) /
                (matmul_flops / 1e9)})
  report("vae", out, {"matmul_gflops": matmul_gflops, "devices": len(jax.devices())}, args.json)


if __name__ == "__main__":
  main()
