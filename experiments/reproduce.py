"""The paper's ordering at small scale: UMD, DiT, MaskDiT, MAE and DiffMAE trained alike, probed,
inpainted, fine-tuned class-conditionally (all but DiffMAE, which does not generate), sampled and
scored, over several seeds, in one command.

  python experiments/reproduce.py                        # digits, 5 methods × 3 seeds (~2 h, 2 CPU cores)
  make reproduce                                         # the same
  python experiments/reproduce.py --quick --out /tmp/r   # 1 seed, a few steps (run by the test suite)
  python experiments/reproduce.py --methods=diffmae --set diffusion.rho_form=beta \
      --lpips_weights=lpips_alex.npz --out experiments/results_rho_beta   # an ablation: one setting changed
  python experiments/reproduce.py --dataset=imagenet2012 --data_dir=/data/tensorflow_datasets \
      --image_size=64 --variant=B/4 --batch_size=1024 --pretrain_steps=1000000 --finetune_steps=250000 \
      --num_samples=10000 --sample_steps=125 --cfg_scale=1.5 --inception_weights=inception_fid.npz \
      --out experiments/results_imagenet64                # the paper's setting (METHOD.md §5-7), accelerators

For each method and seed: pre-train (same model, batch, steps, data, seed); probe the frozen
network (linear probe and few-shot ridge on `rep`, and the DDAE (block, t) sweep, whose best cell is
the fair feature for DiT and MaskDiT); fine-tune it end to end into a classifier (--mode=classify,
MAE's recipe, METHOD.md §10; the encoder's output on the clean image, or for DiT and MaskDiT DDAE's
input noised to t = 0) and score top-1 on the test split; inpaint the test images with the pre-trained network and
the method's own inpainter (centre box and 50% random patches; RePaint with the same DDIM sampler
and the eps head for UMD, DiT and MaskDiT, MAE's one-shot fill, DiffMAE's masked-patch DDPM over
all T steps) and score the filled region (PSNR, SSIM; with --lpips_weights the whole image's LPIPS
too); fine-tune class-conditionally with the METHOD.md §5 recipe (same
steps for all); sample with the same sampler, steps and guidance; score the samples. On the digits
the scores are the demo's classifier accuracy (a logistic regression on real training digits) and a
Fréchet distance, precision and recall in the hidden layer of a small MLP classifier trained once on
the real training digits ("digits-FD": the FID recipe with a digits network; not comparable with FID).
With --inception_weights (other datasets) FID and Inception Score replace them. The training cost
of each method is its analytic FLOPs per image and its step time, measured in one interleaved run.

Every stage skips work whose output exists (training resumes from checkpoints), so an interrupted
run continues with the same command. Outputs in --out: runs/<method>_s<seed>/ (workdirs),
reproduce.json (every number, the command, commit and machine), summary.md (the table),
probe_vs_generation.png.
"""
import argparse
import ast
import importlib
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bench/common.py (timing, machine facts) and bench/train_step.py (the step-time measurement): the
# benchmarks are scripts, not part of the installed package.
sys.path.insert(0, os.path.join(ROOT, "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402

import train_step as bench_train_step  # noqa: E402  (bench/train_step.py)
from common import machine, time_rounds  # noqa: E402  (bench/common.py)
from configs import demo  # noqa: E402
from umd_jax import classify, fid, files, generate, inpainting, methods, probe, sharding, train, weights  # noqa: E402

# The registry's methods this experiment can measure: trained here, probed and inpainted (SiT has no inpainter).
METHODS = tuple(n for n in methods.trainable() if isinstance(methods.named(n), methods.Backbone)
                and isinstance(methods.named(n), methods.Inpainter))
INPAINT = (("center", 0.5), ("random", 0.5))  # (mask, share of patches for "random")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"))
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--dataset", default="digits", help="digits, or a TFDS name (with --data_dir)")
  p.add_argument("--data_dir", default="")
  p.add_argument("--image_size", type=int, default=0, help="0: the dataset profile's (digits 8, else 64)")
  p.add_argument("--variant", default="", help="'': Ti/2 on the digits, B/4 otherwise")
  p.add_argument("--batch_size", type=int, default=0)
  p.add_argument("--pretrain_steps", type=int, default=2000)
  p.add_argument("--finetune_steps", type=int, default=800)
  p.add_argument("--classify_epochs", type=int, default=0,
                 help="recognition fine-tuning epochs (METHOD.md §10); 0: the recipe's (digits demo 100, B 100, L 50)")
  p.add_argument("--num_samples", type=int, default=500)
  p.add_argument("--sample_steps", type=int, default=50)
  p.add_argument("--cfg_scale", type=float, default=2.0)
  p.add_argument("--inception_weights", default="", help="pytorch-fid weights (.npz): FID / IS of the samples")
  p.add_argument("--lpips_weights", default="", help="tools/convert_lpips_weights.py's .npz: inpainting also in LPIPS")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config value for every run of every stage (an ablation: --set diffusion.rho_form=beta)")
  p.add_argument("--timing_rounds", type=int, default=10)
  p.add_argument("--quick", action="store_true", help="1 seed, a few steps: checks that the script runs")
  args = p.parse_args(argv)
  for item in args.set:
    if "=" not in item:
      p.error(f"--set {item!r}: use KEY=VALUE, e.g. --set diffusion.rho_form=beta")
  if args.quick:
    args.seeds, args.pretrain_steps, args.finetune_steps = 1, 6, 4
    args.num_samples, args.sample_steps, args.timing_rounds = 40, 4, 2
    args.classify_epochs = 1
    args.variant = args.variant or "Mu/2"  # the tests' network: the script's every path, compiled in seconds
  return args


# --- configs ------------------------------------------------------------------------------------


def _overrides(c, args):
  """--set KEY=VALUE on an unlocked config (values parsed as Python literals, else strings); a key
  the config does not have is an error."""
  for item in args.set:
    key, raw = item.split("=", 1)
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
      node = node[part]
    if leaf not in node:
      sys.exit(f"error: --set {item!r}: the config has no key {key!r}")
    node[leaf] = value


def _paper_config(args, method, recipe):
  """configs/<method>_b.py with `recipe` ("", "finetune", "classify"), unlocked, on the requested data
  (in the setting comparable with UMD's where the file has another: its COMPARABLE argument)."""
  module = importlib.import_module(f"configs.{method}_b")
  setting = getattr(module, "COMPARABLE", "")
  c = module.get_config(",".join(p for p in (args.variant or "B/4", recipe, setting) if p))
  c.unlock()
  c.data.name, c.data.data_dir = args.dataset, args.data_dir
  c.data.image_size = args.image_size or 64
  return c


def make_config(args, method, seed, finetune=False, init_from=""):
  """The pre-training (or fine-tuning) config of one run."""
  if args.dataset == "digits":  # the demo's settings with the method's preset (configs/demo.py:METHOD)
    c = demo.get_config(method + (",finetune" if finetune else ""))
    c.unlock()
  else:  # the ImageNet recipe of configs/<method>_b.py (METHOD.md §5; DiffMAE's 64 px setting), on the requested data
    c = _paper_config(args, method, "finetune" if finetune else "")
  if args.variant:
    c.model.variant = args.variant
  if args.image_size:
    c.data.image_size = args.image_size
  if args.batch_size and not finetune:
    c.batch_size = args.batch_size
  c.seed = seed
  c.init_from = init_from
  c.total_steps = args.finetune_steps if finetune else args.pretrain_steps
  c.checkpoint_every = c.image_every = max(1, c.total_steps // 2)
  c.probe_every = 0
  s = c.sample
  if isinstance(methods.get(c), methods.Sampler):
    s.num_samples, s.steps, s.cfg_scale = args.num_samples, args.sample_steps, args.cfg_scale
  else:  # DiffMAE: inpainting only, ancestral DDPM over all T steps (its preset), no guidance
    s.num_samples, s.steps = 0, args.sample_steps
    if args.quick:  # a few steps for every method: DDIM instead of the 1000-step ancestral chain
      s.sampler = "ddim"
  s.seed = seed
  s.classifier_score = args.dataset == "digits" and isinstance(methods.get(c), methods.Sampler)
  s.fid = bool(args.inception_weights)
  s.inception_weights = args.inception_weights
  p = c.probe
  s.inpaint_images = 0 if args.dataset == "digits" else 10_000  # scored on the first images of eval_split
  p.sweep, p.baselines = True, method == METHODS[0]  # raw pixels and a random network, beside UMD's runs
  p.sweep_ts = (0, 25, 50, 100, 200, 400)
  p.fewshot_shots = (1, 5, 10, 25, 100)  # METHOD.md §7 reports 100-shot
  if args.dataset != "digits":  # the sweep keeps every block's features of the pool: cap the pool
    p.max_train_images = 200_000
  if args.quick:
    p.linear_epochs, p.linear_warmup_epochs, p.sweep_ts, p.fewshot_seeds = 2, 1, (0, 100), 1
  s.lpips_weights = "" if finetune else args.lpips_weights  # scores the pre-trained network's inpainting
  _overrides(c, args)
  c.lock()
  return c


def make_classify_config(args, method, seed, init_from):
  """Recognition fine-tuning (METHOD.md §10) of a pre-trained run: the demo's `classify` setting on the
  digits, configs/<method>_b.py:classify (MAE's recipe) otherwise; the same for every method."""
  if args.dataset == "digits":
    c = demo.get_config(f"{method},classify")  # the method's classify.t: DiT / MaskDiT read DDAE's noised input
    c.unlock()
  else:
    c = _paper_config(args, method, "classify")
  if args.variant:
    c.model.variant = args.variant
  if args.image_size:
    c.data.image_size = args.image_size
  if args.classify_epochs:
    c.classify.epochs = args.classify_epochs
    c.classify.warmup_epochs = min(c.classify.warmup_epochs, args.classify_epochs - 1)
    c.classify.eval_every_epochs = min(c.classify.eval_every_epochs, args.classify_epochs)
  c.seed, c.init_from = seed, init_from
  _overrides(c, args)
  c.lock()
  return c


# --- one run ------------------------------------------------------------------------------------


def run_one(args, method, seed, scorer) -> dict:
  work = os.path.join(args.out, "runs", f"{method}_s{seed}")
  pre_dir, ft_dir = os.path.join(work, "pretrain"), os.path.join(work, "finetune")
  pre = make_config(args, method, seed)
  start = time.time()
  trained = train.pretrain(pre, pre_dir)
  probe_file = os.path.join(pre_dir, "probe", "results.json")
  probed = json.load(open(probe_file)) if os.path.exists(probe_file) else probe.run(pre, pre_dir)
  inpainted = {kind: inpaint(pre, pre_dir, kind, ratio) for kind, ratio in INPAINT}
  tuned = classify.run(make_classify_config(args, method, seed, pre_dir), os.path.join(work, "classify"))
  sampled = {}
  if isinstance(methods.get(pre), methods.Sampler):
    ft = make_config(args, method, seed, finetune=True, init_from=pre_dir)
    train.finetune(ft, ft_dir)
    result_file = os.path.join(ft_dir, "samples", "result.json")
    sampled = json.load(open(result_file)) if os.path.exists(result_file) else generate.run(ft, ft_dir)
  out = {"method": method, "seed": seed, "last_pretrain_loss": trained["last_loss"], "inpaint": inpainted,
         "linear_top1": probed["linear"]["top1"], "classify_top1": tuned["top1"],
         "fewshot": {str(k): v["mean"] for k, v in probed["fewshot"].items()},
         "sweep_best": probed["sweep"]["best"],
         "train_gflop_per_image": methods.get(pre).train_flops_per_image(pre) / 1e9, "wall_s": time.time() - start}
  if "baselines" in probed:
    out["baselines"] = {name: {"linear_top1": r["linear"]["top1"], "fewshot": {str(k): v["mean"] for k, v in
                                                                              r["fewshot"].items()}}
                        for name, r in probed["baselines"].items()}
  if "classifier_accuracy" in sampled:
    out["classifier_accuracy"] = sampled["classifier_accuracy"]
  for key in ("fid", "inception_score"):
    if key in sampled:
      out[key] = sampled[key]
  if scorer is not None and "npz" in sampled:
    # the file beside result.json: the path it records is as the run that wrote it named it (maybe
    # relative to another working directory, when an interrupted run is continued from elsewhere)
    with np.load(os.path.join(ft_dir, "samples", os.path.basename(sampled["npz"]))) as f:
      out.update(scorer.score(f["arr_0"]))
  return out


def inpaint(config, workdir, kind, ratio) -> dict:
  """PSNR / SSIM of the pre-trained network's inpainting of the eval images (inpainting.py) with
  the method's own inpainter; written to WORKDIR/inpaint_<kind>.json and reused."""
  path = os.path.join(workdir, f"inpaint_{kind}.json")
  if os.path.exists(path):
    return json.load(open(path))
  config = config.copy_and_resolve_references()
  config.unlock()
  config.sample.inpaint, config.sample.inpaint_ratio = kind, ratio
  # The eps head drives RePaint here: in pre-training, UMD's and MaskDiT's noised step trains the
  # eps head on the visible tokens and the x0 head only on the masked ones, and RePaint shows the
  # network every token (the demo's x0 sampler is for fine-tuned networks, trained unmasked).
  config.sample.prediction = "eps"
  mesh = sharding.make_mesh(config.mesh)
  graphdef, params = weights.load(config, workdir, mesh, prefer_ema=config.sample.use_ema)
  outputs = files.OutputSet(os.path.join(workdir, f"inpaint_{kind}"))
  scores = inpainting.evaluate(config, graphdef, params, mesh, outputs, workdir)
  outputs.publish()
  with open(path, "w") as f:
    json.dump(scores, f, indent=2)
  return scores


# --- digits-FD ------------------------------------------------------------------------------------


class DigitsScorer:
  """A small MLP classifier trained once on the real training digits; samples are compared with
  the real test digits in its hidden layer: Fréchet distance (digits-FD) and k-NN precision /
  recall (Kynkäänniemi et al. 2019, k = 3)."""

  def __init__(self, config):
    train_x, train_y = generate._pixels(config, config.data.train_split)
    test_x, test_y = generate._pixels(config, config.data.eval_split)
    self.net = MLPClassifier(hidden_layer_sizes=(64,), max_iter=1000, random_state=0).fit(train_x, train_y)
    self.test_accuracy = float(self.net.score(test_x, test_y))
    self.real = self.features(test_x)
    self.real_train = self.features(train_x)

  def features(self, x):
    return np.maximum(x @ self.net.coefs_[0] + self.net.intercepts_[0], 0.0)

  @staticmethod
  def frechet(a, b) -> float:
    return fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))

  @staticmethod
  def precision_recall(real, fake, k=3):
    def radii(x):
      d = np.linalg.norm(x[:, None] - x[None], axis=-1)
      return np.sort(d, axis=1)[:, k]  # distance to the k-th neighbour (index 0 is the point itself)
    cross = np.linalg.norm(fake[:, None] - real[None], axis=-1)   # (fake, real)
    precision = float(np.mean((cross <= radii(real)[None]).any(axis=1)))
    recall = float(np.mean((cross <= radii(fake)[:, None]).any(axis=0)))
    return precision, recall

  def score(self, samples: np.ndarray) -> dict:
    fake = self.features(samples.reshape(len(samples), -1).astype(np.float32) / 127.5 - 1)
    precision, recall = self.precision_recall(self.real, fake)
    return {"digits_fd": self.frechet(fake, self.real), "precision": precision, "recall": recall}

  def reference(self) -> dict:
    """The same scores for the real training digits against the real test digits: the floor."""
    precision, recall = self.precision_recall(self.real, self.real_train)
    return {"digits_fd": self.frechet(self.real_train, self.real), "precision": precision, "recall": recall,
            "mlp_test_accuracy": self.test_accuracy}


# --- step cost --------------------------------------------------------------------------------------


def step_times(args, names) -> dict:
  """Median step time of each method's pre-training step, all timed in the same rounds, and its ratio
  to the step of the method of most FLOPs per image (the unmasked one: DiT's objective)."""
  configs = {m: make_config(args, m, 0) for m in names}
  calls = {m: bench_train_step.build(c, xla_check=False)[1] for m, c in configs.items()}
  times = time_rounds(calls, repeats=args.timing_rounds, warmup=2)
  reference = max(names, key=lambda m: methods.get(configs[m]).train_flops_per_image(configs[m]))
  return {m: {"step_ms": 1e3 * statistics.median(t), "reference": reference,
              "step_vs_reference": statistics.median(a / b for a, b in zip(t, times[reference]))}
          for m, t in times.items()}


# --- summary --------------------------------------------------------------------------------------

METRICS = [("classify_top1", "fine-tuned top-1 (end to end, METHOD.md §10)", 100), ("linear_top1", "linear top-1 (rep)", 100), ("fewshot.10", "10-shot (rep)", 100),
           ("fewshot.100", "100-shot (rep)", 100), ("sweep_best.accuracy", "best sweep cell, 10-shot", 100),
           ("classifier_accuracy", "samples classified as their class", 100), ("digits_fd", "digits-FD ↓", 1),
           ("precision", "precision", 100), ("recall", "recall", 100), ("fid", "FID ↓", 1),
           ("inception_score", "IS", 1), ("inpaint.center.psnr", "centre inpainting PSNR (dB)", 1),
           ("inpaint.center.ssim", "centre inpainting SSIM ×100", 100),
           ("inpaint.center.lpips", "centre inpainting LPIPS ×100 ↓", 100),
           ("inpaint.random.psnr", "50% random-patch inpainting PSNR (dB)", 1),
           ("inpaint.random.ssim", "50% random-patch inpainting SSIM ×100", 100),
           ("inpaint.random.lpips", "50% random-patch inpainting LPIPS ×100 ↓", 100)]


def _get(run, key):
  node = run
  for part in key.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def mean_std(values):
  values = [v for v in values if v is not None]
  if not values:
    return None
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(runs, methods, cost, reference) -> str:
  header = "| metric | " + " | ".join(methods) + " |"
  lines = [header, "|" + "---|" * (len(methods) + 1)]
  for key, name, scale in METRICS:
    cells = [mean_std([_get(r, key) for r in runs if r["method"] == m]) for m in methods]
    if all(c is None for c in cells):
      continue
    fmt = lambda c: "–" if c is None else f"{scale * c[0]:.1f} ± {scale * c[1]:.1f}"
    lines.append(f"| {name} | " + " | ".join(fmt(c) for c in cells) + " |")
  best = [[r["sweep_best"] for r in runs if r["method"] == m] for m in methods]
  lines.append("| best sweep cells (block, t) | " + " | ".join(
      ", ".join(f"({b['block']}, {b['t']})" for b in bs) for bs in best) + " |")
  lines.append("| train GFLOP / image | " + " | ".join(
      f"{_get([r for r in runs if r['method'] == m][0], 'train_gflop_per_image'):.3f}" for m in methods) + " |")
  if cost:
    lines.append("| step time (ms), one interleaved run | " + " | ".join(f"{cost[m]['step_ms']:.1f}" for m in methods) + " |")
    slowest = cost[methods[0]]["reference"]
    lines.append(f"| step time / {slowest}'s (most FLOPs per image) | " + " | ".join(
        f"{cost[m]['step_vs_reference']:.2f}" for m in methods) + " |")
  baselines = [r["baselines"] for r in runs if "baselines" in r]
  if baselines:
    lines += ["", "| baseline | linear top-1 | 10-shot | 100-shot |", "|---|---|---|---|"]
    for name in baselines[0]:
      cell = lambda key: mean_std([_get(b[name], key) for b in baselines])
      fmt = lambda c: "–" if c is None else f"{100 * c[0]:.1f} ± {100 * c[1]:.1f}"
      lines.append(f"| {name} | {fmt(cell('linear_top1'))} | {fmt(cell('fewshot.10'))} | {fmt(cell('fewshot.100'))} |")
  if reference:
    lines += ["", f"Real training digits scored like samples: digits-FD {reference['digits_fd']:.2f}, precision "
              f"{100 * reference['precision']:.1f}, recall {100 * reference['recall']:.1f} (the MLP scores "
              f"{100 * reference['mlp_test_accuracy']:.1f}% on the test digits)."]
  return "\n".join(lines) + "\n"


def plot(runs, methods, path, gen_key):
  fig, ax = plt.subplots(figsize=(5, 4))
  for m in methods:
    x = mean_std([_get(r, "fewshot.10") for r in runs if r["method"] == m])
    y = mean_std([_get(r, gen_key) for r in runs if r["method"] == m])
    if x and y:
      ax.errorbar(100 * x[0], y[0], xerr=100 * x[1], yerr=y[1], fmt="o", capsize=3, label=m)
  ax.set_xlabel("10-shot ridge probe on rep (%)")
  ax.set_ylabel({"digits_fd": "digits-FD of samples (lower is better)", "fid": "FID (lower is better)"}[gen_key])
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  unknown = set(methods) - set(METHODS)
  if unknown:
    sys.exit(f"error: --methods {sorted(unknown)}: use some of {','.join(METHODS)}")
  os.makedirs(args.out, exist_ok=True)
  started = time.time()
  scorer = DigitsScorer(make_config(args, METHODS[0], 0, finetune=True)) if args.dataset == "digits" else None
  runs = []
  for seed in range(args.seeds):
    for m in methods:
      print(f"=== {m} seed {seed} ===", flush=True)
      runs.append(run_one(args, m, seed, scorer))
  cost = step_times(args, methods)
  reference = scorer.reference() if scorer else None
  result = {"command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + (argv if argv is not None else sys.argv[1:])),
            "args": vars(args), "machine": machine(), "wall_s": time.time() - started,
            "runs": runs, "step_cost": cost, "real_reference": reference}
  with open(os.path.join(args.out, "reproduce.json"), "w") as f:
    json.dump(result, f, indent=2)
  table = summarize(runs, methods, cost, reference)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(f"Command: `{result['command']}`; commit {result['machine']['commit']}; "
            f"{result['machine']['cpu_count']} CPUs ({result['machine']['backend']}); "
            f"{result['wall_s'] / 60:.0f} min.\n\n" + table)
  plot(runs, methods, os.path.join(args.out, "probe_vs_generation.png"), "digits_fd" if scorer else "fid")
  print(table)
  return result


if __name__ == "__main__":
  main()
