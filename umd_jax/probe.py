"""--mode=probe (METHOD.md §6): the configured feature of a checkpoint through the few-shot ridge and
the linear probe, the DDAE (block, t) sweep and its heatmap, the baselines (raw input, a random
network of the same shape), published together as WORKDIR/probe/results.json and sweep.png; and
the few-shot evaluator pre-training runs periodically. Features: features.py; heads: heads.py.
"""
import functools
import json

import numpy as np
from etils import epath

from umd_jax import checks, files, images, latent, sharding, weights
from umd_jax.features import (  # noqa: F401 (the probe API, used by the notebook and the tests)
    Extractor, Features, ProbeError, cache_key, check_request, extract_cached, load_backbone, make_feature_fn,
    model_inputs, num_blocks, pixel_features, random_backbone, rows_sharding)
from umd_jax.heads import (  # noqa: F401
    batch_norm, fewshot, init_head, lars, linear_probe_features, linear_probe_online, linear_schedule, ridge_solve,
    topk_accuracy)
from umd_jax.methods import REP

heatmap_png = images.heatmap_png  # noqa: E305 (where the sweep's picture is drawn)


def _heads(config, train: Features, test: Features, online=None):
  """Few-shot (all configured shot counts) and linear probe on one kind of feature (its block 0)."""
  p, k = config.probe, config.data.num_classes
  args = (train.feature(0), train.y, test.feature(0), test.y)
  out = {"fewshot": fewshot(*args, shots=p.fewshot_shots, seeds=p.fewshot_seeds, l2=p.fewshot_l2, num_classes=k)}
  if p.linear:
    out["linear"] = online() if online else linear_probe_features(*args, p, k)
  return out


class FewShotEval:
  """Few-shot accuracy of the configured feature for given weights (pre-training's periodic
  evaluation): the extractor is compiled once, when this is built."""

  def __init__(self, config, graphdef, mesh, vae=None):
    self.config = config
    self.extractor = Extractor(config, graphdef, t=config.probe.t, blocks=[config.probe.block], mesh=mesh, vae=vae)

  def __call__(self, params) -> dict:
    p, k = self.config.probe, self.config.data.num_classes
    tr = self.extractor(params, p.train_split, p.max_train_images, progress=False)
    te = self.extractor(params, p.eval_split, p.max_eval_images, progress=False)
    counts = np.bincount(tr.y, minlength=k)
    usable = [n for n in p.fewshot_shots if n <= counts.min()]
    res = fewshot(tr.feature(0), tr.y, te.feature(0), te.y, shots=usable, seeds=1, l2=p.fewshot_l2, num_classes=k)
    return {f"fewshot_{n}shot": v["mean"] for n, v in res.items()}


def run(config, workdir, devices=None) -> dict:
  """--mode=probe: few-shot + linear probe (+ DDAE sweep, + baselines); writes probe/results.json."""
  p = config.probe
  checks.check(config, "probe")
  mesh = sharding.make_mesh(config.mesh, devices)
  vae = latent.load(config, mesh) if config.data.space == "latents" else None
  graphdef, params, step = weights.load_with_step(config, workdir, mesh, prefer_ema=p.use_ema)  # the step read
  extractor = Extractor(config, graphdef, t=p.t, blocks=[p.block], mesh=mesh, vae=vae)
  # results.json and sweep.png are published together at the end; the feature cache (features_step*)
  # lives in the published folder and carries over
  with files.OutputSet(epath.Path(workdir) / "probe", keep=("features_step*",)) as outputs:
    results = _probe_into(config, graphdef, params, step, mesh, vae, extractor, outputs)
  print(format_table(results))
  return results


def _probe_into(config, graphdef, params, step, mesh, vae, extractor, outputs) -> dict:
  """run's work: every head and table into `outputs`, published at the end."""
  p = config.probe
  cache = outputs.final(f"features_step{step}{'_ema' if p.use_ema and config.optim.ema_rate > 0 else ''}")

  def enough_shots(labels):  # before any features are cached: the shots must exist in the pool
    counts = np.bincount(labels, minlength=config.data.num_classes)
    shots = max(list(p.fewshot_shots) + ([p.sweep_shots] if p.sweep else []))
    if counts.min() < shots:
      key = (f"probe.max_train_images={p.max_train_images} leaves" if p.max_train_images else
             f"probe.train_split={p.train_split!r} has")
      raise ProbeError(f"{key} {int(counts.min())} images of class {int(counts.argmin())}, fewer than the {shots} "
                       f"shots asked (probe.fewshot_shots / probe.sweep_shots): raise it or ask fewer shots")

  def probe_backbone(params_, cache=None):
    tr = extract_cached(extractor, params_, p.train_split, max_images=p.max_train_images, cache=cache,
                        check=enough_shots)
    te = extract_cached(extractor, params_, p.eval_split, max_images=p.max_eval_images, cache=cache)
    online = (functools.partial(linear_probe_online, config, extractor, params_, test_x=te.feature(0), test_y=te.y,
                                num_classes=config.data.num_classes)
              if p.linear_augment else None)
    return _heads(config, tr, te, online)

  results = {"feature": {"t": p.t, "block": p.block}, "step": step, "config": json.loads(config.to_json_best_effort()),
             **probe_backbone(params, cache)}
  if p.sweep:
    results["sweep"] = sweep(config, graphdef, params, mesh, outputs.path("sweep.png"), cache, vae)
  if p.baselines:
    tr = pixel_features(config, p.train_split, mesh, p.max_train_images, vae)
    te = pixel_features(config, p.eval_split, mesh, p.max_eval_images, vae)
    raw = "latents" if config.data.space == "latents" else "pixels"  # the model's raw input
    results["baselines"] = {raw: _heads(config, tr, te),
                            "random_init": probe_backbone(random_backbone(config, mesh)[1])}
  files.on_main(lambda: files.write_text(outputs.path("results.json"), json.dumps(results, indent=2)))
  outputs.publish()
  return results


def sweep(config, graphdef, params, mesh, heatmap=None, cache=None, vae=None):
  """DDAE grid: few-shot accuracy for every (block, t); table and best cell, and a PNG heatmap
  written to the path `heatmap` (process 0) when given."""
  p = config.probe
  blocks = [REP] + list(range(num_blocks(config)))
  check_request(config, blocks, p.sweep_ts)
  grid = np.zeros((len(blocks), len(p.sweep_ts)))
  for j, t in enumerate(p.sweep_ts):
    extractor = Extractor(config, graphdef, t=t, blocks=blocks, mesh=mesh, vae=vae)
    tr = extract_cached(extractor, params, p.train_split, max_images=p.max_train_images, cache=cache)
    te = extract_cached(extractor, params, p.eval_split, max_images=p.max_eval_images, cache=cache)
    for i in range(len(blocks)):
      grid[i, j] = fewshot(tr.feature(i), tr.y, te.feature(i), te.y, shots=[p.sweep_shots], seeds=p.fewshot_seeds,
                           l2=p.fewshot_l2, num_classes=config.data.num_classes)[p.sweep_shots]["mean"]
  names = ["rep"] + [f"block {b}" for b in blocks[1:]]
  if heatmap is not None:
    files.on_main(lambda: heatmap_png(grid, names, list(p.sweep_ts), heatmap))
  i, j = np.unravel_index(np.argmax(grid), grid.shape)
  return {"ts": list(p.sweep_ts), "blocks": blocks, "shots": p.sweep_shots, "accuracy": grid.tolist(),
          "best": {"block": blocks[i], "t": p.sweep_ts[j], "accuracy": float(grid[i, j])}}


def format_table(results) -> str:
  lines = [f"{'features':<14}{'linear top1':>12}" + "".join(f"{str(k) + '-shot':>12}" for k in results["fewshot"])]

  def row(name, r):
    lin = f"{100 * r['linear']['top1']:.1f}" if "linear" in r else "-"
    return f"{name:<14}{lin:>12}" + "".join(f"{100 * v['mean']:>8.1f}±{100 * v['std']:<3.1f}" for v in r["fewshot"].values())
  lines.append(row("backbone", results))
  for name, r in results.get("baselines", {}).items():
    lines.append(row(name, r))
  if "sweep" in results:
    b = results["sweep"]["best"]
    lines.append(f"DDAE sweep best: block {b['block']} (-1 = rep), t={b['t']}: {100 * b['accuracy']:.1f}% "
                 f"({results['sweep']['shots']}-shot)")
  return "\n".join(lines)
