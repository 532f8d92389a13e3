"""--mode=classify: end-to-end fine-tuning for recognition (METHOD.md §10, MAE's protocol), the
evaluation MAE, DiffMAE and DDAE report, for any method's pre-trained network.

From `config.init_from` (a pre-training workdir: its latest weights, EMA ones when it kept them
and classify.init_ema) the classifier (classify_step.py) trains for classify.epochs over
data.train_split with the training view of `augmentation(config)`, mixup / cutmix and label
smoothing, and is evaluated (top-1 / top-5, centre view) on data.eval_split every
classify.eval_every_epochs epochs and at the end: WORKDIR/classify/results.json (with the step,
the weights it started from and the whole config) and TensorBoard. Checkpoints, exact resume
(data position included), the non-finite guard and SIGTERM handling are pre-training's.
"""
import functools
import json
import time

import jax
from absl import logging
from etils import epath
from flax import nnx

from umd_jax import checkpoint, checks, classify_step, data, files, latent, loop, multihost, sharding
from umd_jax.data import augment


def augmentation(config):
  """The training view: Inception crop (data.crop_area_min..max) + flip, RandAugment and random
  erasing (data/augment.py) as classify.* sets them; None for pre-encoded latents (no pixels)."""
  if config.data.space == "latents":
    return None
  c, d = config.classify, config.data
  randaugment = (augment.RandAugment(c.randaugment_ops, c.randaugment_magnitude, c.randaugment_magnitude_std)
                 if c.randaugment_ops > 0 else None)
  return data.pipeline.ClassifyAugment(d.image_size, (d.crop_area_min, d.crop_area_max), d.flip,
                                       randaugment, c.erase_prob)


def run(config, workdir, devices=None) -> dict:
  """Fine-tune (resuming when the workdir has a checkpoint); returns the last evaluation. Every
  setting, the data and `init_from` are checked before anything is written."""
  checks.check(config, "classify")
  workdir = epath.Path(workdir)
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch(config.batch_size, mesh)
  sharding.check_batch(config.classify.eval_batch_size, mesh, what="classify.eval_batch_size")
  source = loop.training_source(config)
  eval_source = data.make_source(config.data, config.data.eval_split)
  if classify_step.steps_per_epoch(config, len(source)) < 1:
    raise data.DataError(f"batch_size={config.batch_size} is larger than the {len(source)} training records: "
                         "lower batch_size")
  init = None
  if checkpoint.latest_step(workdir) is None:
    if config.classify.scratch:  # the baseline: the same network and recipe from its initialisation (config.seed)
      init = None, {"workdir": "", "step": 0, "scratch": True}
    elif not config.init_from:
      raise ValueError("classify fine-tunes a pre-trained network: pass --config.init_from=PRETRAINING_WORKDIR "
                       "(or a workdir to resume, or --config.classify.scratch=True for the from-scratch baseline)")
    else:
      init = _read_backbone(config, mesh)  # read and verified before the workdir is created
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  try:
    return _train(config, workdir, mesh, ckpt, source, eval_source, init)
  finally:
    ckpt.close()


def _read_backbone(config, mesh):
  """(backbone weights, provenance {"workdir", "step"}) of init_from (EMA when kept and
  classify.init_ema), checked by name and meaning, then read and verified against its checksums."""
  _, abstract = classify_step.abstract_classifier(config)
  shardings = sharding.param_shardings(abstract, config.mesh.rules, mesh)["backbone"]
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nnx.to_pure_dict(abstract)["backbone"], shardings)
  backbone, step = checkpoint.restore_params_and_step(config.init_from, target, prefer_ema=config.classify.init_ema,
                                                      config=config)
  return backbone, {"workdir": str(config.init_from), "step": int(step)}


class Evaluator:
  """Top-1 / top-5 accuracy of given weights on data.eval_split (centre view, every image once; videos:
  classify.test_views evenly spaced windows, their softmax averaged)."""

  def __init__(self, config, run, eval_source, vae):
    self.config, self.run, self.source, self.vae = config, run, eval_source, vae

  def __call__(self, params) -> dict:
    c, mesh = self.config, self.run.mesh
    views = c.classify.test_views if c.data.frames > 1 else 1
    batches = data.make_batches(c.data, self.source, global_batch=c.classify.eval_batch_size,
                                sharding=sharding.batch_sharding(mesh), seed=c.seed, train=False,
                                augment=data.pipeline.EvalViews(c.data.image_size, views) if views > 1 else None)
    n = len(self.source)
    hits1 = hits5 = 0
    for _ in range(-(-n // c.classify.eval_batch_size)):
      b = next(batches)
      images = b["image"] if self.vae is None else self.vae.to_latents(b["image"])
      h1, h5 = self.run.evaluate(params, images, b["label"], b["index"], n)
      hits1, hits5 = hits1 + h1, hits5 + h5  # on device: one fetch at the end
    hits1, hits5 = jax.device_get((hits1, hits5))
    k = classify_step.top_k(c.data.num_classes)
    return {"top1": float(hits1) / n, f"top{k}": float(hits5) / n, "images": n}


def _train(config, workdir, mesh, ckpt, source, eval_source, init_weights=None) -> dict:
  c = config.classify
  per_epoch = classify_step.steps_per_epoch(config, len(source))
  total = c.epochs * per_epoch
  run = classify_step.build_run(config, mesh, len(source))
  state = run.state
  position_at = functools.partial(loop.data_position, config, source)
  results_path = workdir / "classify" / "results.json"
  if ckpt.latest_step() is not None:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, run.shardings)
    state, _ = ckpt.restore_latest(abstract, position_at, fallback=config.restore_fallback, config=config,
                                   objective=("classify.", "diffusion."))  # what this mode reads
    previous = json.loads(results_path.read_text()) if results_path.exists() else {}
    # the checkpoint says where its backbone came from (a kill before the first evaluation leaves no results file)
    init = ckpt.provenance(int(state.step)) or previous.get("init", {"workdir": config.init_from})
    evals = [e for e in previous.get("evaluations", []) if e["step"] <= int(state.step)]
    logging.info("resumed from %s at step %d", ckpt.directory, int(state.step))
  else:
    backbone, init = init_weights
    if backbone is not None:
      params = {**state.params, "backbone": backbone}
      ema = jax.tree.map(lambda x: x.copy(), params) if state.ema_params is not None else None
      state = state.replace(params=params, ema_params=ema)
      logging.info("initialised the backbone from %s (step %d)", init["workdir"], init["step"])
    else:
      logging.info("the backbone from scratch (classify.scratch): initialised with seed %d", config.seed)
    evals = []
  start = int(state.step)
  batches = data.make_batches(config.data, source, global_batch=config.batch_size, seed=config.seed, train=True,
                              sharding=sharding.batch_sharding(mesh), start=start, augment=augmentation(config))
  vae = latent.load(config, mesh) if config.data.space == "latents" else None
  evaluator = Evaluator(config, run, eval_source, vae)
  writer = loop.event_writer(workdir)
  if start == 0:
    writer.write_hparams(loop.hparams(config))
  history, logged, t0 = [], {}, time.monotonic()

  def guard(step, t, state):
    loop.check_finite(config, state, step, ckpt, history, lr_key="classify.base_lr")

  def log(step, t, state):
    since_step, since_t = logged.get("at", (start, t0))
    fetched = jax.device_get(history)
    history.clear()
    scalars = {k: loop.finite_mean([m[k] for m in fetched]) for k in ("loss", "grad_norm", "lr")}
    rate = (step - since_step) / max(t - since_t, 1e-9)
    writer.write_scalars(step, {**scalars, "steps_per_sec": rate, "images_per_sec": rate * config.batch_size,
                                "nonfinite_skipped": float(state.nonfinite_steps)})
    logging.info("step %d/%d (epoch %.1f): loss %.4f, lr %.3g, %.2f steps/s", step, total, step / per_epoch,
                 scalars["loss"], scalars["lr"], rate)
    logged["at"] = (step, t)

  def evaluate(step, t, state):
    scores = evaluator(state.params)
    if state.ema_params is not None:
      scores.update({f"{k}_ema": v for k, v in evaluator(state.ema_params).items() if k != "images"})
    entry = {"step": step, "epoch": step / per_epoch, **scores}
    evals.append(entry)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items() if k != "images"})
    logging.info("step %d (epoch %.1f): %s", step, step / per_epoch,
                 ", ".join(f"{k} {100 * v:.2f}%" for k, v in scores.items() if k != "images"))
    result = {"step": step, "epoch": step / per_epoch, "total_steps": total, **scores, "init": init,
              "cut": {"block": classify_step.cut_block(config), "t": c.t}, "evaluations": evals,
              "config": json.loads(config.to_json_best_effort())}
    files.on_main(lambda: files.write_text(results_path, json.dumps(result, indent=2)))
    logged["result"] = result

  every_eval = c.eval_every_epochs * per_epoch
  Every = loop.Every
  actions = [Every((config.log_every, config.checkpoint_every, every_eval), guard, on_steps=(start + 1, total),
                   on_stop=True),
             Every(config.log_every, log, on_steps=(start + 1, total), on_stop=True),
             Every(every_eval, evaluate, on_steps=(total,)),
             Every(config.checkpoint_every, lambda step, t, state: ckpt.save(step, state, position_at(step), config, init),
                   on_steps=(total,), on_stop=True)]
  step = start
  with multihost.StopRequest() as stop:
    while step < total:
      state, metrics = run.step(state, next(batches))
      step += 1
      history.append(metrics)
      stopping = stop.reached(step)
      for action in actions:
        action(step, stopping=stopping, state=state)
      if stopping:
        logging.warning("%s received: saved step %d, exiting", stop.signal, step)
        break
  ckpt.wait()
  writer.close()
  if "result" not in logged and results_path.exists():  # nothing left to train: the last results
    logged["result"] = json.loads(results_path.read_text())
  return {**logged.get("result", {}), "start_step": start, "stopped_by": stop.signal, "workdir": str(workdir),
          "state": state}

