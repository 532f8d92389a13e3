"""Train-step benchmark: compile time, step time, images/s, memory and MFU against a same-run roofline.

  python bench/train_step.py --config=configs/umd_s.py:S/4 --set batch_size=32 --set data.image_size=32
  python bench/train_step.py --config=configs/demo.py
  python bench/train_step.py --config=configs/latent_umd_l.py --set batch_size=8 --compile_only   # 32x32x4 latents
  python bench/train_step.py --config=configs/demo.py --compare grad_accum_steps=2   # A/B in the same rounds
  python bench/train_step.py --config=configs/demo.py:video    # clips: "image" is FRAMES x SIZE, images/s clips/s
  python bench/train_step.py --config=configs/video_l.py:mae --set batch_size=2 --compile_only --no_xla_check
  python bench/train_step.py --config=configs/demo.py \
      --compare xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT   # an XLA option, same rounds

MFU = analytic model FLOPs of the step (encoder on registers + kept tokens, decoder on all
tokens, attention included, both sub-batches at their own lengths, backward = 2× forward,
no remat recompute) / step time / the FLOP/s of a large dense matmul of the same dtype on
the same device. The step and the matmul take turns in each round (the matmul's time is the
fastest of 3 back-to-back calls: its warm rate) and the MFU is the median of the rounds'
ratios, so a shared machine's slow spells cancel out. XLA's `cost_analysis()` count (of the
step lowered with unrolled layers and one micro-batch) is printed beside the analytic one; it
includes the elementwise, norm, softmax and optimizer work that model FLOPs leave out. Beside it,
the same program's `bytes accessed` (GB) and fusion count: the memory passes of the step.

In --set and --compare, a key that starts with `xla_` is an XLA compiler option for that row's
step (`compile(compiler_options=...)`; true/false and integers are converted), so flag A/Bs
share rounds too, which separate processes with different XLA_FLAGS cannot.
"""
import copy
import statistics
import time

from common import hlo_figures, load_config, make_parser, matmul_call, median_ratio, profile, report, time_rounds

import jax
import numpy as np

from umd_jax import geometry, methods, sharding, train_step
from umd_jax.models.layers import compute_dtype


def xla_figures(config, batch, compiler_options=None) -> dict:
  """`common.hlo_figures` of the step lowered with unrolled layers and one micro-batch (XLA counts
  a loop body once, so a scanned or accumulating program under-reports): fusions, XLA's bytes
  accessed and FLOPs, the figures to compare two versions of the step by."""
  unrolled = copy.deepcopy(config)
  unrolled.model.scan_layers = False
  unrolled.grad_accum_steps = 1
  run = train_step.build(unrolled, sharding.make_mesh(unrolled.mesh))
  return hlo_figures(run.step.lower(run.state, batch).compile(compiler_options=compiler_options or None))


def split_options(items) -> tuple[list, dict]:
  """KEY=VALUE items -> (config overrides, XLA compiler options: the keys starting with 'xla_')."""
  def value(v):
    if v.lower() in ("true", "false"):
      return v.lower() == "true"
    try:
      return int(v)
    except ValueError:
      return v
  pairs = [item.partition("=") for item in items]
  return ([f"{k}={v}" for k, _, v in pairs if not k.startswith("xla_")],
          {k: value(v) for k, _, v in pairs if k.startswith("xla_")})


def random_batch(config) -> dict:
  """A host batch of `config`'s shape: uniform images (or clips, or latents with their posterior
  std: the step draws z = mean + std·ε) and labels, the same for every call."""
  d = config.data
  rng = np.random.default_rng(0)
  shape = geometry.sample_shape(config)          # (H, W, C), or clips' (T, H, W, C)
  batch = {"image": rng.uniform(-1, 1, (config.batch_size,) + shape).astype(np.float32),
           "label": rng.integers(0, max(d.num_classes, 1), (config.batch_size,)).astype(np.int32)}
  if d.space == "latents":
    batch["std"] = np.full_like(batch["image"], 0.1)
  return batch


def build(config, *, xla_check=True, compiler_options=None):
  """Compile the step of `config` (with these XLA compiler options) on a random batch -> (row of
  compile facts, no-argument step call, the compiled step)."""
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.batch_size, mesh)
  run = train_step.build(config, mesh)
  d = config.data
  size, channels = geometry.input_shape(config)  # pixels, or latents (data.space="latents")
  batch = jax.device_put(random_batch(config), sharding.batch_sharding(mesh))
  start = time.perf_counter()
  compiled = run.step.lower(run.state, batch).compile(compiler_options=compiler_options or None)
  compile_s = time.perf_counter() - start
  model_flops = methods.get(config).train_flops_per_image(config) * config.batch_size
  nan = float("nan")
  xla = xla_figures(config, batch, compiler_options) if xla_check else dict(fusions=0, xla_gb_accessed=nan, xla_gflop=nan)
  memory = compiled.memory_analysis()
  temp_bytes = getattr(memory, "temp_size_in_bytes", None)
  image = f"{size}x{channels}" if d.space == "latents" else (f"{d.frames}x{size}" if d.frames > 1 else size)
  row = {"variant": config.model.variant, "image": image, "batch": config.batch_size,
         "dtype": compute_dtype(config.model.dtype), "compile_s": compile_s, "model_gflop": model_flops / 1e9,
         "xla_gflop": xla["xla_gflop"], "xla_gb_accessed": xla["xla_gb_accessed"], "fusions": xla["fusions"],
         "temp_mib": (temp_bytes or 0) / 2 ** 20,
         "micro_batches": train_step.accumulation_steps(config, mesh)}  # grad_accum_steps ("auto" resolved)
  holder = [run.state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    return metrics["loss"]
  return row, run, compiled


def timing(row, step_times, matmul_times, matmul_flops) -> dict:
  """Step time, images/s, FLOP/s and MFU (median of per-round ratios to the matmul) for a row."""
  seconds, flop = statistics.median(step_times), row["model_gflop"] * 1e9
  return dict(step_ms=seconds * 1e3, images_per_s=row["batch"] / seconds, achieved_gflops=flop / seconds / 1e9,
              roofline_gflops=matmul_flops / statistics.median(matmul_times) / 1e9,
              mfu=flop / matmul_flops * median_ratio(matmul_times, step_times))


def measure(config, *, repeats=20, xla_check=True, profile_dir=None):
  return measure_all([config], repeats=repeats, xla_check=xla_check, profile_dir=profile_dir)[0]


def measure_all(configs, *, repeats=20, xla_check=True, profile_dir=None, compiler_options=None) -> list[dict]:
  """Rows for several configs (each with its dict of XLA compiler options, if given) whose steps
  (and the roofline matmul) take turns in every round; with more than one, `vs_first` is each
  step's time over the first's (median of per-round ratios)."""
  options = compiler_options or [None] * len(configs)
  built = [build(c, xla_check=xla_check, compiler_options=o) for c, o in zip(configs, options)]
  matmul, matmul_flops = matmul_call(configs[0].model.dtype)
  times = time_rounds({**{i: run for i, (_, run, _) in enumerate(built)}, "matmul": matmul}, repeats=repeats,
                      best_of={"matmul": 3})
  if profile_dir:
    ops = profile(built[0][1], logdir=profile_dir, hlo_text=built[0][2].as_text())
    print(f"\nbusiest device ops ({profile_dir}):")
    for op in ops:
      print(f"  {op['share']:6.1%}  {op['ms_per_call']:8.2f} ms  {op['op']}")
  rows = [{**row, **timing(row, times[i], times["matmul"], matmul_flops)} for i, (row, _, _) in enumerate(built)]
  if len(rows) > 1:
    for i, row in enumerate(rows):
      row["vs_first"] = median_ratio(times[i], times[0])
  return rows


def main():
  parser = make_parser(__doc__, "configs/demo.py", repeats=20)
  parser.add_argument("--compile_only", action="store_true")
  parser.add_argument("--no_xla_check", action="store_true", help="skip the unrolled cost_analysis() cross-check")
  parser.add_argument("--profile", default=None, help="also trace 5 steps with jax.profiler into this directory "
                      "and print the ops that took the most device time")
  parser.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                      help="another row: these overrides (config keys, or xla_* compiler options) on top of --set, "
                      "timed in the same rounds (repeatable)")
  args = parser.parse_args()
  rows_spec = [split_options(args.set + (c.split(",") if c else [])) for c in [""] + args.compare]
  configs = [load_config(args.config, overrides) for overrides, _ in rows_spec]
  options = [opts for _, opts in rows_spec]
  if args.compile_only:
    rows = [build(c, xla_check=not args.no_xla_check, compiler_options=o)[0] for c, o in zip(configs, options)]
  else:
    rows = measure_all(configs, repeats=args.repeats, xla_check=not args.no_xla_check, profile_dir=args.profile,
                       compiler_options=options)
  if args.compare:
    for row, label in zip(rows, ["-"] + args.compare):
      row["compare"] = label
  report("train_step", rows, {"config": args.config, "overrides": " ".join(args.set) or "-"}, args.json)


if __name__ == "__main__":
  main()
