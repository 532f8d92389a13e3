"""Shared benchmark helpers: load a config with overrides, time jitted calls, measure a matmul roofline."""
import argparse
import collections
import glob
import gzip
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from umd_jax import hugepages

if os.path.abspath(getattr(sys.modules.get("__main__"), "__file__", None) or "").startswith(os.path.join(ROOT, "bench")):
  hugepages.ensure()  # a benchmark script: host memory as main.py trains with it (umd_jax/hugepages.py)

import jax
import jax.numpy as jnp

from umd_jax.models.layers import DTYPES, compute_dtype


def load_config(spec: str, overrides=()):
  """'configs/umd_s.py:S/4' plus ['batch_size=32', 'data.image_size=32'] -> locked ConfigDict."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for item in overrides:
    key, _, value = item.partition("=")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    current = node[leaf]
    if isinstance(current, bool):
      node[leaf] = value.lower() in ("1", "true")
    elif node.get_ref(leaf).get_type() is object:  # a key that takes a word or a number ("auto" or 8)
      node[leaf] = int(value) if value.lstrip("-").isdigit() else value
    else:
      node[leaf] = type(current)(value)
  return config


def make_parser(doc: str, default_config: str, repeats: int | None = None) -> argparse.ArgumentParser:
  """The flags every benchmark takes: --config (path[:arg]), --set key=value (repeatable), --json,
  and --repeats when the benchmark times repeated calls."""
  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=default_config)
  parser.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
  parser.add_argument("--json", default=None, help="write rows and machine facts to this file")
  if repeats is not None:
    parser.add_argument("--repeats", type=int, default=repeats)
  return parser


def time_rounds(fns: dict, repeats=20, warmup=3, best_of: dict | None = None) -> dict:
  """{name: no-argument fn} -> {name: [wall seconds of each round]}, block_until_ready after each
  call. The fns take turns, one call each per round, so a shared machine that slows down mid-run
  slows every fn of that round alike: compare fns by per-round ratios (`median_ratio`), not by
  separately timed medians. `best_of={name: k}` calls that fn k times in a row per round and
  keeps the fastest: a roofline matmul run right after a long step starts with cold caches, and a
  roofline should be the warm rate."""
  best_of = best_of or {}
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      calls = []
      for _ in range(best_of.get(name, 1)):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        calls.append(time.perf_counter() - start)
      times[name].append(min(calls))
  return times


def median_ratio(num: list, den: list) -> float:
  """Median over rounds of num[i] / den[i] (two timings taken in the same rounds)."""
  return statistics.median(a / b for a, b in zip(num, den))


SWEEP = (4096, 8192, 12288, 16384)  # accelerators: the roofline is the fastest of these square products


def matmul_call(dtype: str = "float32", n: int | None = None, sizes=None):
  """(fn, flops): a no-argument call of a large square dense matmul in `dtype` on the default
  device, the roofline every MFU here is measured against, and its FLOP count. On CPU a 2048²
  product; on accelerators the fastest per FLOP of a `jnp.dot` sweep over `sizes` (default SWEEP:
  an 8192² product alone under-states what the device's matmul units reach), each timed warm as
  the best of 3 calls. `n` fixes the size instead."""
  dt = DTYPES[compute_dtype(dtype)]

  def call(n):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dt)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dt)
    dot = jax.jit(jnp.dot)
    return (lambda: dot(a, b)), 2.0 * n ** 3

  if n is None and sizes is None and jax.default_backend() == "cpu":
    n = 2048
  if n is not None:
    return call(n)
  best = None
  for size in sizes or SWEEP:
    fn, flops = call(size)
    seconds = min(time_rounds({size: fn}, repeats=3, warmup=1)[size])
    if best is None or flops / seconds > best[2]:
      best = (fn, flops, flops / seconds, size)
  print(f"roofline: {best[3]}² {compute_dtype(dtype)} jnp.dot, {best[2] / 1e12:.1f} TFLOP/s (fastest of {sizes or SWEEP})")
  return best[0], best[1]


def hlo_figures(compiled) -> dict:
  """A compiled program's HLO figures: fusion instructions in its optimised HLO, XLA's `bytes
  accessed` (every instruction's operands and outputs, in GB) and FLOPs (GFLOP). XLA counts the body
  of a loop (scanned layers, gradient accumulation) once, so compare programs with unrolled layers
  and one micro-batch."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  fusions = sum(1 for line in compiled.as_text().splitlines() if " fusion(" in line)
  return {"fusions": fusions, "xla_gb_accessed": float(cost.get("bytes accessed", float("nan"))) / 1e9,
          "xla_gflop": float(cost.get("flops", float("nan"))) / 1e9}


def dot_instructions(hlo_text: str) -> set:
  """Names of the instructions of an optimised HLO module whose computation (or one it calls)
  holds a dot or convolution. XLA:CPU names its dot fusions after the library that runs them
  (`ynn_fusion.462`), so a trace's op names alone do not say which ops are matmuls."""
  bodies, calls, current = {}, {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
    if head and not line.startswith(" "):
      current = head.group(1)
      bodies[current] = []
    elif current is not None:
      bodies[current].append(line)
      op = re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = .*calls=%([\w.\-]+)", line)
      if op:
        calls[op.group(1)] = op.group(2)
  memo = {}

  def has_dot(name, depth=0):
    if name not in memo:
      body = "\n".join(bodies.get(name, ()))
      memo[name] = (" dot(" in body or " convolution(" in body or (depth < 8 and any(
          has_dot(sub, depth + 1) for sub in re.findall(r"calls=%([\w.\-]+)", body) if sub != name)))
    return memo[name]
  return {inst for inst, comp in calls.items() if has_dot(comp)}


def profile(fn, *args, steps: int = 5, logdir: str, top: int = 15, hlo_text: str = "") -> list[dict]:
  """Trace `steps` calls of fn with jax.profiler (TensorBoard / Perfetto files under `logdir`) and
  return the ops that took the most device time: [{op, ms_per_call, share}], busiest first, then the
  totals of matmul / attention / other kernels: by kernel name (cuBLAS, cuDNN), and with the
  compiled program's `hlo_text`, every fusion that contains a dot counts as matmul (XLA:CPU)."""
  jax.block_until_ready(fn(*args))
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for _ in range(steps):
      out = fn(*args)
    jax.block_until_ready(out)
  path = sorted(glob.glob(os.path.join(logdir, "**", "*perfetto_trace.json.gz"), recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  names = {e["pid"]: e["args"].get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"].get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  accel = {pid for pid, n in names.items() if "/device:" in n and "CPU" not in n}
  # Accelerator: its op lines (not the module/step summary lines). CPU: XLA's worker threads.
  skip = ("python", "Modules", "Steps", "Framework", "Source", "Host")
  totals = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or (accel and e["pid"] not in accel) or "ThunkExecutor" in e["name"]:
      continue
    if not any(w in threads.get((e["pid"], e.get("tid")), "") for w in skip):
      totals[e["name"]] += e.get("dur", 0) / 1e3
  busy = sum(totals.values()) or 1.0
  dots = dot_instructions(hlo_text)
  kinds = collections.Counter()
  for n, ms in totals.items():
    low = n.lower()
    kind = ("attention" if any(w in low for w in ("sdpa", "flash", "fmha")) else
            "matmul" if n in dots or any(w in low for w in ("gemm", "nvjet", "cublas", "cutlass", "xmma", "dot")) else
            "other: " + re.sub(r"[._]?\d+$", "", n)[:40])  # fusion family, e.g. input_add_reduce_fusion
    kinds[kind] += ms
  ops = [{"op": n[:60], "ms_per_call": ms / steps, "share": ms / busy} for n, ms in totals.most_common(top)]
  return ops + [{"op": f"[all {k}]", "ms_per_call": ms / steps, "share": ms / busy} for k, ms in kinds.most_common(top)]


def machine() -> dict:
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
  except OSError:
    commit = "unknown"
  return {"backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()],
          "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
          "commit": commit, "date": time.strftime("%Y-%m-%d")}


def report(name: str, rows: list[dict], extra: dict, out: str | None):
  """Print a table and write JSON (rows + machine facts)."""
  keys = list(rows[0].keys())
  widths = [max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in keys]
  print(f"\n{name}")
  print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
  for r in rows:
    print("  ".join(_fmt(r[k]).ljust(w) for k, w in zip(keys, widths)))
  for k, v in extra.items():
    print(f"{k}: {_fmt(v)}")
  if out:
    with open(out, "w") as f:
      json.dump({"benchmark": name, "machine": machine(), "rows": rows, **extra}, f, indent=2)


def _fmt(v):
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)
