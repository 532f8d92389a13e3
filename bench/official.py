"""Side by side: this repository's UMD train step against the official UMD step (small-vision).

  git clone https://github.com/philippe-eecs/small-vision /path/to/small-vision   # the user's own checkout
  python bench/official.py --small_vision=/path/to/small-vision \
      --config=configs/umd_s.py:S/4 --set batch_size=64 \
      --compare model.remat=full,model.scan_layers=true --rss

Nothing of small-vision is copied here: its model (`big_vision.models.ae.Model`) and its diffusion
tables (`big_vision.gaussian_diffusion`) are imported from the checkout. Its train step is a closure
inside `big_vision/trainers/train_ae.main` (not importable), so `official_step` below restates that
update as this harness reads it: the clean sub-batch through `model.apply(mask=mask_ratio_no_noise)`
with the x0 error on masked pixels, the noised sub-batch told t + 1 with mask_ratio (eps error on
visible pixels, x0 error on masked, averaged), the two weighted by their share of the batch; AdamW
with its weight-decay mask (`model.no_decay_list`) after global-norm clipping; the parameter and
update norms it logs. The two steps get the same batch, variant, input size, mask ratios, clean
share, schedule and optimizer hyper-parameters (from our config); the official model runs as its
ImageNet config sets it (`configs/ae_i1k.py`: scanned layers, remat policy `nothing_saveable`,
adaLN), unless --official_scan / --official_remat say otherwise.

Rows: the official step, then ours with --set, then one per --compare (as in train_step.py; a key
starting with `xla_` is an XLA compiler option). All steps take turns in every round; `vs_official`
is the official step's time over the row's (the median of per-round ratios: > 1 is faster than
the official). Memory: XLA's `memory_analysis()` of each compiled step (temporaries; arguments and
outputs are the train state and batch) and, with --rss, each step alone in a child process:
`rss_peak_mib` is that process's high-water resident memory (VmHWM) after compiling and running
5 steps, `rss_step_mib` the same minus its resident memory before the step was built (both
children import the same modules, small-vision's included). HLO figures (of the step lowered with
unrolled layers and one micro-batch: XLA counts a loop body once): fusion instructions, XLA's
`bytes accessed` and FLOPs.
"""
import json
import os
import subprocess
import sys

from common import hlo_figures, load_config, make_parser, median_ratio, report, time_rounds
from train_step import random_batch, split_options, xla_figures

import jax
import jax.numpy as jnp
import numpy as np

from umd_jax import geometry, sharding, train_step
from umd_jax.models.layers import compute_dtype
from umd_jax.models.umd import parse_variant


def import_official(path: str):
  """(big_vision.models.ae, big_vision.gaussian_diffusion) from a small-vision checkout."""
  if not os.path.isfile(os.path.join(path, "big_vision", "models", "ae.py")):
    raise SystemExit(f"--small_vision={path!r} has no big_vision/models/ae.py: give the root of a small-vision "
                     "checkout (git clone https://github.com/philippe-eecs/small-vision)")
  sys.path.insert(0, os.path.abspath(path))
  import big_vision.gaussian_diffusion as gd_module
  import big_vision.models.ae as ae
  return ae, gd_module


def check_comparable(config):
  """The official model is the UMD family's adaLN/in-context ViT auto-encoder on images: refuse
  what it does not have, in one line."""
  problems = []
  if config.method not in ("umd", "dit", "maskdit", "mae"):
    problems.append(f"method={config.method!r} (the official code trains the UMD family only)")
  if geometry.frames(config) > 1:
    problems.append("data.frames > 1 (the official model takes images)")
  if config.data.space != "pixels":
    problems.append("data.space='latents' (compare on pixels)")
  if problems:
    raise SystemExit("bench/official.py compares UMD-family image pre-training: " + "; ".join(problems))


def official_step(config, ae, gd_module, *, scan: bool, remat: str, mu_dtype: str, seed: int = 0):
  """(jitted step(state, batch) -> (state, metrics), initial state) of the official UMD update for
  `config`'s variant, input, corruption and optimizer. See the module docstring for what it restates."""
  import flax
  import optax
  c, o = config.corruption, config.optim
  size, channels = geometry.input_shape(config)
  model = ae.Model(variant=config.model.variant, num_classes=None, channels=channels, img_size=size,
                   scan=scan, adaln=config.model.conditioning == "adaln", remat_policy=remat,
                   num_cls=config.model.num_registers, dtype_mm=compute_dtype(config.model.dtype))
  gd = {k: jnp.asarray(v, jnp.float32) for k, v in
        gd_module.create_gaussian_diffusion(config.diffusion.schedule, config.diffusion.num_timesteps).items()}
  b = config.batch_size
  rng = jax.random.PRNGKey(seed)
  params = flax.core.unfreeze(model.init({"params": rng, "dropout": rng, "mae_noise": rng, "cfg": rng},
                                         jnp.zeros((b,) + (size, size, channels)), t=jnp.zeros((b, 1), jnp.int32),
                                         train=True, mask=True))["params"]

  def decays(path, _):
    return all(getattr(k, "key", None) not in model.no_decay_list for k in path)
  peak = o.base_lr * b / 256
  warmup = int(o.warmup_fraction * config.total_steps)
  lr = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(config.total_steps, warmup + 1))
  tx = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                   optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                               mask=lambda p: jax.tree_util.tree_map_with_path(decays, p), mu_dtype=mu_dtype))
  state = {"params": params, "opt": tx.init(params), "rng": jax.random.PRNGKey(seed + 1)}
  n_clean = int(b * c.clean_fraction)
  n_noised = b - n_clean

  def apply(params, x, t, ratio, key):
    k1, k2, k3 = jax.random.split(key, 3)
    return model.apply({"params": params}, x, t=t, train=True, mask=ratio,
                       rngs={"dropout": k1, "cfg": k2, "mae_noise": k3})

  def step(state, batch):
    images = batch["image"]
    rng, k_clean, k_t, k_noise, k_noised = jax.random.split(state["rng"], 5)
    x_clean, x_noised = images[n_noised:], images[:n_noised]  # the official order: noised rows first
    t = jax.random.randint(k_t, (n_noised, 1), 0, config.diffusion.num_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(k_noise, x_noised.shape)
    x_t = gd_module.q_sample(gd=gd, x_start=x_noised, t=t, noise=noise)

    def loss_fn(params):
      loss = 0.0
      if n_clean:
        pred, out = apply(params, x_clean, jnp.zeros((n_clean, 1), jnp.int32), c.clean_mask_ratio, k_clean)
        se = (pred[..., :channels] - x_clean) ** 2
        mae = jnp.mean(se * out["mask"]) / jnp.mean(out["mask"]) if out["mask"] is not None else jnp.mean(se)
        loss = loss + mae * n_clean / b
      if n_noised:
        pred, out = apply(params, x_t, t + 1, c.noised_mask_ratio, k_noised)
        x0_se, eps_se = (pred[..., :channels] - x_noised) ** 2, (pred[..., channels:] - noise) ** 2
        if out["mask"] is not None:
          m = out["mask"]
          dit = (jnp.mean(eps_se * (1 - m)) / jnp.mean(1 - m) + jnp.mean(x0_se * m) / jnp.mean(m)) / 2
        else:
          dit = (jnp.mean(eps_se) + jnp.mean(x0_se)) / 2
        loss = loss + dit * n_noised / b
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "l2_params": optax.tree.norm(params), "l2_updates": optax.tree.norm(updates)}
    return {"params": params, "opt": opt, "rng": rng}, metrics

  return jax.jit(step, donate_argnums=(0,)), state


class Side:
  """One contender: a compiled step with its state, a no-argument call, its row of compile facts."""

  def __init__(self, name, step, state, batch, *, compiler_options=None):
    self.name, self.compiled = name, step.lower(state, batch).compile(compiler_options=compiler_options or None)
    memory = self.compiled.memory_analysis()
    self.row = {"row": name, "temp_mib": getattr(memory, "temp_size_in_bytes", 0) / 2 ** 20,
                "args_mib": getattr(memory, "argument_size_in_bytes", 0) / 2 ** 20}
    self.holder, self.batch = [state], batch

  def __call__(self):
    self.holder[0], metrics = self.compiled(self.holder[0], self.batch)
    return metrics["loss"]


def official_side(config, args, *, unrolled_figures=True):
  ae, gd_module = import_official(args.small_vision)
  batch = jax.device_put(random_batch(config))
  step, state = official_step(config, ae, gd_module, scan=args.official_scan, remat=args.official_remat,
                              mu_dtype=args.official_mu_dtype)
  label = f"official ({'scanned' if args.official_scan else 'unrolled'}, {args.official_remat})"
  side = Side(label, step, state, batch)
  side.row["micro_batches"] = 1  # one value_and_grad over the batch
  if unrolled_figures:  # its step with unrolled layers, as ours
    u_step, u_state = official_step(config, ae, gd_module, scan=False, remat=args.official_remat,
                                    mu_dtype=args.official_mu_dtype)
    side.row.update(hlo_figures(u_step.lower(u_state, batch).compile()))
  return side


def our_side(config, label, compiler_options=None, *, unrolled_figures=True):
  run = train_step.build(config, sharding.make_mesh(config.mesh))
  batch = jax.device_put(random_batch(config), sharding.batch_sharding(run.mesh))
  side = Side(label, run.step, run.state, batch, compiler_options=compiler_options)
  side.row["micro_batches"] = train_step.accumulation_steps(config, run.mesh)  # "auto" resolved
  if unrolled_figures:  # the step with unrolled layers and one micro-batch, as train_step.py's rows
    side.row.update(xla_figures(config, batch, compiler_options))
  return side


def rss_alone(argv_base: list, which: int) -> dict:
  """Build and run contender `which` (0 = official) alone in a child process -> its memory figures."""
  import umd_jax  # the child imports the same checkout of this repository as this process
  root = os.path.dirname(os.path.dirname(os.path.abspath(umd_jax.__file__)))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
  out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv_base, f"--alone={which}"],
                       capture_output=True, text=True, check=False, env=env)
  if out.returncode:
    raise SystemExit(f"the child measuring row {which}'s memory failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _vm(field: str) -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024  # kB -> MiB
  return float("nan")


def main():
  parser = make_parser(__doc__, "configs/umd_s.py:S/4", repeats=10)
  parser.add_argument("--small_vision", required=True, help="root of a small-vision checkout")
  parser.add_argument("--official_scan", type=lambda v: v.lower() in ("1", "true"), default=True)
  parser.add_argument("--official_remat", default="nothing_saveable",
                      help="a jax.checkpoint_policies name (the official config's: nothing_saveable)")
  parser.add_argument("--official_mu_dtype", default="float32",
                      help="AdamW first-moment dtype of the official step: float32 as ours (default), or "
                      "bfloat16 as its trainer's default")
  parser.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]")
  parser.add_argument("--rss", action="store_true", help="also each step alone in a child process: peak RSS")
  parser.add_argument("--alone", type=int, default=None, help=argparse_hidden())
  args = parser.parse_args()
  specs = [split_options(args.set + (c.split(",") if c else [])) for c in [""] + args.compare]
  configs = [load_config(args.config, overrides) for overrides, _ in specs]
  for config in configs:
    check_comparable(config)
  labels = ["ours" + (f" ({' '.join(args.set)})" if args.set else "")] + [f"ours + {c}" for c in args.compare]

  if args.alone is not None:  # child: one contender, its memory
    import_official(args.small_vision)  # the same modules imported on both sides
    before = _vm("VmRSS")
    if args.alone == 0:
      side = official_side(configs[0], args, unrolled_figures=False)
    else:
      side = our_side(configs[args.alone - 1], labels[args.alone - 1], specs[args.alone - 1][1],
                      unrolled_figures=False)
    for _ in range(5):
      jax.block_until_ready(side())
    print(json.dumps({"rss_peak_mib": _vm("VmHWM"), "rss_step_mib": _vm("VmHWM") - before}))
    return

  sides = [official_side(configs[0], args)]
  sides += [our_side(c, label, options) for c, label, (_, options) in zip(configs, labels, specs)]
  times = time_rounds({i: side for i, side in enumerate(sides)}, repeats=args.repeats)
  rows = []
  for i, side in enumerate(sides):
    row = dict(side.row, step_ms=float(np.median(times[i])) * 1e3,
               vs_official=median_ratio(times[0], times[i]))
    if args.rss:
      row.update(rss_alone([a for a in sys.argv[1:] if a != "--rss"], i))
    rows.append(row)
  v = parse_variant(configs[0].model.variant)
  report("official", rows, {"config": args.config, "overrides": " ".join(args.set) or "-",
                            "variant": configs[0].model.variant, "width": v["width"],
                            "batch": configs[0].batch_size, "small_vision": os.path.abspath(args.small_vision),
                            "official_mu_dtype": args.official_mu_dtype}, args.json)


def argparse_hidden():
  import argparse
  return argparse.SUPPRESS


if __name__ == "__main__":
  main()
