"""Video at small scale (RESULTS.md, "Video: moving digits"): UMD, MAE and DiffMAE pre-trained on the
embedded moving digits (configs/demo.py:video), probed and fine-tuned for the motion label, against
the same network fine-tuned from scratch, and their future-frame prediction scored -- over seeds.

  python experiments/video.py                                # 3 methods x 3 seeds (~80 min, 2 CPU cores)
  python experiments/video.py --quick --out /tmp/video       # 1 seed, a few steps (run by the test suite)

For each method and seed: pre-train (the demo's video setting: Ti/4, 2×4×4 tubes, 1,500 steps of 64
clips, the method's preset); probe the frozen network (linear probe and few-shot ridge on `rep`;
raw pixels and a random network beside UMD's runs); fine-tune it end to end for the direction of
motion (--mode=classify, the demo's video recipe: 10 epochs) and score top-1 on the 1,188 test
clips; predict the last 4 of 8 frames of the first 200 test clips from the first 4 with the
method's own inpainter (RePaint with the eps head for UMD, MAE's one-shot fill, DiffMAE's
masked-patch DDPM over all T steps) and score them frame by frame (PSNR, SSIM). Baselines: "scratch",
the classify recipe from a randomly initialised UMD network (classify.scratch); "frame-wise", UMD
pre-trained, probed and fine-tuned the same way on single frames (each clip's first frame, an image
of 16 tokens): what a model that sees no time reads of the motion label.

Every stage skips work whose output exists (training resumes), so an interrupted run continues
with the same command. Outputs in --out: runs/<method>_s<seed>/, video.json (every number, the
command, commit and machine), summary.md (the table).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import machine  # noqa: E402  (bench/common.py)
from configs import demo  # noqa: E402
from umd_jax import classify, files, generate, probe, train  # noqa: E402

METHODS = ("umd", "mae", "diffmae")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results_video"))
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--quick", action="store_true", help="1 seed, a few steps of a Mu network: the script's every path")
  args = p.parse_args(argv)
  args.methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in args.methods if m not in METHODS]
  if unknown:
    p.error(f"--methods: {unknown} are not among {list(METHODS)}")
  if args.quick:
    args.seeds = 1
  return args


def _config(args, arg, seed, **values):
  c = demo.get_config(arg)
  c.unlock()
  c.seed = c.sample.seed = seed
  if args.quick:
    c.model.variant, c.total_steps, c.classify.epochs, c.classify.warmup_epochs = "Mu/4", 6, 1, 0
    c.data.train_split, c.probe.train_split = "train[:100]", "train[:100]"
    c.probe.linear_epochs, c.probe.linear_warmup_epochs, c.probe.fewshot_seeds = 2, 1, 1
    c.classify.eval_every_epochs, c.sample.inpaint_images = 1, 16
  for key, value in values.items():
    node, *path = c, *key.split(".")
    for part in path[:-1]:
      node = node[part]
    node[path[-1]] = value
  c.lock()
  return c


def _cached(path, compute):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  result = compute()
  files.write_text(path, json.dumps(result, indent=2, default=float))
  return json.loads(json.dumps(result, default=float))


def run_one(args, method, seed) -> dict:
  run = os.path.join(args.out, "runs", f"{method}_s{seed}")
  arg = f"video,{method}"
  pre = _config(args, arg, seed, probe_every=0, **{"probe.baselines": method == METHODS[0]})
  out = {}
  train.pretrain(pre, run)  # resumes; a finished run returns at once
  p = _cached(os.path.join(run, "probe.json"), lambda: probe.run(pre, run))
  out["linear"] = p["linear"]["top1"]
  out.update({f"fewshot_{k}": v["mean"] for k, v in p["fewshot"].items()})
  for name in ("pixels", "random_init"):
    if name in p.get("baselines", {}):
      out[f"{name}_linear"] = p["baselines"][name]["linear"]["top1"]
  cls = _config(args, arg + ",classify", seed, init_from=run)
  out["finetuned"] = _cached(os.path.join(run, "classify.json"),
                             lambda: _top1(classify.run(cls, os.path.join(run, "classify"))))["top1"]
  inpaint = {"sample.num_samples": 0, "sample.cfg_scale": 1.0, "sample.inpaint": "future", "sample.inpaint_ratio": 0.5,
             "sample.prediction": "eps"}
  if args.quick:  # a few steps for every inpainter: DDIM instead of DiffMAE's 1,000-step ancestral chain
    inpaint["sample.sampler"] = "ddim"
  gen = _cached(os.path.join(run, "future.json"), lambda: generate.run(_config(args, arg, seed, **inpaint), run)["inpaint"])
  out.update(future_psnr=gen["psnr"], future_ssim=gen["ssim"], future_psnr_per_frame=gen["psnr_per_frame"],
             inpainter=gen["inpainter"])
  return out


def run_framewise(args, seed) -> dict:
  run = os.path.join(args.out, "runs", f"framewise_s{seed}")
  frames = {"data.frames": 1, "model.tubelet": 1, "sample.inpaint": ""}
  pre = _config(args, "video", seed, probe_every=0, **frames)
  train.pretrain(pre, run)
  p = _cached(os.path.join(run, "probe.json"), lambda: probe.run(pre, run))
  cls = _config(args, "video,classify", seed, init_from=run, **frames)
  top1 = _cached(os.path.join(run, "classify.json"), lambda: _top1(classify.run(cls, os.path.join(run, "classify"))))
  return {"linear": p["linear"]["top1"], **{f"fewshot_{k}": v["mean"] for k, v in p["fewshot"].items()},
          "finetuned": top1["top1"]}


def run_scratch(args, seed) -> dict:
  run = os.path.join(args.out, "runs", f"scratch_s{seed}")
  cls = _config(args, "video,classify", seed, init_from="", **{"classify.scratch": True})
  return {"finetuned": _cached(os.path.join(run, "classify.json"), lambda: _top1(classify.run(cls, run)))["top1"]}


def _top1(result) -> dict:
  return {"top1": result["top1"], "step": result["step"]}


def _mean_std(values):
  values = [v for v in values if v is not None]
  return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else None


def summary(results, seeds) -> str:
  rows = [("linear probe top-1 %", "linear", 100), ("10-shot top-1 %", "fewshot_10", 100),
          ("fine-tuned top-1 %", "finetuned", 100), ("future frames PSNR dB", "future_psnr", 1),
          ("future frames SSIM ×100", "future_ssim", 100)]
  names = [m for m in (*METHODS, "scratch", "frame-wise") if m in results]
  cell = lambda ms: "—" if ms is None else (f"{ms[0]:.1f}" + (f" ± {ms[1]:.1f}" if seeds > 1 else ""))
  lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for label, key, scale in rows:
    vals = [_mean_std([r.get(key) * scale if r.get(key) is not None else None for r in results[n]]) for n in names]
    lines.append(f"| {label} | " + " | ".join(cell(v) for v in vals) + " |")
  base = results.get(METHODS[0], [{}])  # the baselines ran beside the first method
  for name in ("pixels", "random_init"):
    vals = _mean_std([r[f"{name}_linear"] * 100 for r in base if f"{name}_linear" in r])
    if vals:
      lines.append(f"\nLinear probe on {name.replace('_', ' ')}: {cell(vals)} % top-1.")
  return "\n".join(lines) + "\n"


def main(argv=None):
  args = parse_args(argv)
  results = {}
  for seed in range(args.seeds):
    for method in args.methods:
      results.setdefault(method, []).append(run_one(args, method, seed))
    results.setdefault("scratch", []).append(run_scratch(args, seed))
    results.setdefault("frame-wise", []).append(run_framewise(args, seed))
  commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
  record = {"command": " ".join(sys.argv), "commit": commit, "machine": machine(), "seeds": args.seeds,
            "quick": args.quick, "results": results}
  files.write_text(os.path.join(args.out, "video.json"), json.dumps(record, indent=2, default=float))
  table = summary(results, args.seeds)
  files.write_text(os.path.join(args.out, "summary.md"), table)
  print(table)
  return record


if __name__ == "__main__":
  main()
