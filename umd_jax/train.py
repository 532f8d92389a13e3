"""Pre-training loop, readable top to bottom: config -> mesh -> state -> data -> steps -> checkpoints.

Resume order: the workdir's latest checkpoint, else `config.init_from`'s weights, else scratch.
SIGTERM / SIGINT save a checkpoint and return cleanly, on every process at the same step
(multihost.StopRequest), even when the signal reached only some of them.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from flax import nnx

from umd_jax import (checkpoint, checks, corruption, data, files, diffusion, flops, generate, images, latent, multihost,
                     probe, sharding, train_step)
from umd_jax.models import umd


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the message says what happened and what to do."""


def validate_config(config, mode: str = "pretrain") -> None:
  """Fail fast, with one line, on every setting training reads (see checks.py)."""
  checks.check(config, mode)
  train_step.accumulation_order(config.batch_size, config.corruption.clean_fraction, config.grad_accum_steps)


def _reconstruction_fn(config, graphdef, mesh):
  """jit(params, images, key) -> rows (input shown to the model, x0 prediction, original),
  replicated so that every process can fetch them (a batch-sharded result spans all hosts)."""
  c = config.corruption
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  num_patches = umd.num_patches(config)
  clean = c.clean_fraction > 0
  latent_space = config.data.space == "latents"
  ratio = c.clean_mask_ratio if clean else c.noised_mask_ratio

  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def reconstruct(params, x0, key):
    k_mask, k_eps = jax.random.split(key)
    b = x0.shape[0]
    t = jnp.full((b,), schedule.num_timesteps // 2, jnp.int32)
    x_in = x0 if clean else diffusion.q_sample(schedule, x0, t, jax.random.normal(k_eps, x0.shape))
    mask = corruption.random_mask(k_mask, b, num_patches, ratio)
    out = nnx.merge(graphdef, params)(x_in, jnp.zeros_like(t) if clean else t + 1, None,
                                      *(mask[:2] if mask is not None else (None, None)))
    shown = x_in if mask is None else x_in * (1 - corruption.pixel_mask(mask.mask, *x0.shape[1:3]))
    return shown, out["x0"] if latent_space else jnp.clip(out["x0"], -1, 1), x0

  return reconstruct


def _finite_mean(values) -> float:
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else float("nan")


def _mean_metrics(history):
  """Average the per-step metric dicts fetched since the last log; buckets are pooled properly."""
  fetched = jax.device_get(history)
  # Skipped (non-finite) steps are left out of the means; the skip count is logged instead.
  out = {k: _finite_mean([m[k] for m in fetched]) for k in fetched[0] if not k.startswith("bucket_")}
  sums = np.sum([m["bucket_sum"] for m in fetched], axis=0)
  counts = np.sum([m["bucket_count"] for m in fetched], axis=0)
  for i, (s, n) in enumerate(zip(sums, counts)):
    if n > 0:
      out[f"loss_t{i}"] = float(s / n)
  return out


def pretrain(config, workdir: str, devices=None, mode: str = "pretrain") -> dict:
  """Train for config.total_steps (resuming if the workdir has a checkpoint); returns a summary.
  Every setting, the data and `init_from` are checked before anything is written to the workdir."""
  validate_config(config, mode)
  workdir = epath.Path(workdir)
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch(config.batch_size, mesh)
  source = training_source(config)  # also checks its class count (and latents their encoding)
  resuming = checkpoint.latest_step(workdir) is not None
  if config.init_from and not resuming:
    checkpoint.load_config(config.init_from)  # read-only: a mistyped path creates nothing there
  if mode == "finetune" and not config.init_from and not resuming:
    raise ValueError("fine-tuning needs --config.init_from=PRETRAINING_WORKDIR (or a workdir to resume)")
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)  # takes the workdir's lock
  try:
    return _train(config, workdir, mesh, ckpt, source)
  finally:
    ckpt.close()  # also on an error: no checkpointer threads left to print after the error line


def _train(config, workdir, mesh, ckpt, source) -> dict:
  tx, lr = train_step.make_optimizer(config)
  graphdef, state, shardings = train_step.create_state(config, mesh, tx)
  step_fn = train_step.make_train_step(config, graphdef, tx, lr, shardings, mesh)
  reconstruct = _reconstruction_fn(config, graphdef, mesh)

  position_at = functools.partial(data_position, config, source)
  if ckpt.latest_step() is not None:
    state, start = ckpt.restore_latest(train_step.abstract_state(state, shardings), position_at,
                                       fallback=config.restore_fallback, config=config)
    logging.info("resumed from %s at step %d", ckpt.directory, start)
  elif config.init_from:
    state = state.replace(**_init_from(config, state, shardings))
    logging.info("initialised weights from %s", config.init_from)
  start = int(state.step)
  # One global batch per step: every process starts its rows of the stream at batch `start`,
  # whatever the number of processes that wrote the checkpoint.
  batches = data.make_batches(config.data, source, global_batch=config.batch_size,
                              sharding=sharding.batch_sharding(mesh), seed=config.seed, train=True, start=start)

  is_main = multihost.is_main()
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main, asynchronous=True)
  if start == 0:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()})
  progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_steps=config.log_every)
  preview = _preview_images(config, mesh)
  history, first_loss, last = [], None, {}
  step = start
  with multihost.StopRequest() as stop:
    while step < config.total_steps:
      state, metrics = step_fn(state, next(batches))
      step += 1
      history.append(metrics)
      progress(step)
      final = step == config.total_steps
      stopping = stop.reached(step)  # the same answer on every process
      if step == start + 1 or step % config.log_every == 0 or final or stopping:
        _check_finite(config, state, step, ckpt, history)
        last = _mean_metrics(history)
        last["nonfinite_skipped"] = float(state.nonfinite_steps)
        history = []
        first_loss = first_loss if first_loss is not None else last["loss"]
        writer.write_scalars(step, last)
        logging.info("step %d: loss %.5f (clean %.5f, noised %.5f)", step, last["loss"],
                     last["loss_clean"], last["loss_noised"])
      if step % config.image_every == 0 or final:
        rows = reconstruct(state.params, preview, jax.random.PRNGKey(config.seed))
        if config.data.space == "latents":  # shown in pixels
          rows = [latent.load(config, mesh).to_pixels(r) for r in rows]
        picture = images.grid(multihost.to_host(rows))
        if is_main:
          images.save_png(workdir / "images" / f"reconstruction_{step:08d}.png", picture,
                          upscale=max(1, 256 // picture.shape[0]))
        writer.write_images(step, {"reconstruction": picture[None]})
      if config.probe_every and (step % config.probe_every == 0 or final):
        scores = probe.fewshot_eval(config, graphdef, state.params, mesh)
        writer.write_scalars(step, scores)
        logging.info("step %d: %s", step, ", ".join(f"{k} {100 * v:.1f}%" for k, v in scores.items()))
      if config.fid_every and (step % config.fid_every == 0 or final):
        weights = state.ema_params if state.ema_params is not None else state.params
        scores = generate.fid_during_training(config, graphdef, weights, mesh, workdir)
        writer.write_scalars(step, {k: v for k, v in scores.items() if k != "fid_samples"})
        logging.info("step %d: FID %.2f, IS %.2f", step, scores["fid"], scores["inception_score"])
      if step % config.checkpoint_every == 0 or final or stopping:
        _check_finite(config, state, step, ckpt, history)
        ckpt.save(step, state, position_at(step), config)
      if stopping:
        logging.warning("%s received: saved step %d, exiting", stop.signal, step)
        break
  ckpt.wait()
  writer.flush()
  return dict(start_step=start, step=step, first_loss=first_loss, last_loss=last.get("loss"),
              stopped_by=stop.signal, workdir=str(workdir), state=state)


def data_position(config, source, step: int) -> dict:
  """The training stream's global position after `step` steps and what defines the stream
  (the same on every process and for any number of them)."""
  d = config.data
  return {"global_batches": int(step), "batch_size": config.batch_size, "seed": config.seed, "data": d.name,
          "split": d.train_split, "records": len(source), "image_size": d.image_size,
          "crop_area": [d.crop_area_min, d.crop_area_max], "flip": d.flip,
          **({"space": "latents"} if d.space == "latents" else {})}


def _init_from(config, state, shardings) -> dict:
  """Weights of `config.init_from`'s latest checkpoint. A label embedding the source did not
  have (fine-tuning a self-supervised model) stays freshly initialised, as does the optimizer."""
  source = checkpoint.load_config(config.init_from)
  fresh = {"label_embed"} if source.model.num_classes == 0 else set()
  target = {k: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), v, shardings.params[k])
            for k, v in state.params.items() if k not in fresh}
  params = {**state.params, **checkpoint.restore_params(config.init_from, target)}
  ema = jax.tree.map(jnp.copy, params) if state.ema_params is not None else None  # own buffers: both are donated
  return dict(params=params, ema_params=ema)


def finetune(config, workdir, devices=None) -> dict:
  """Class-conditional fine-tuning: the pre-training loop from `init_from`'s weights with labels."""
  return pretrain(config, workdir, devices, mode="finetune")


def training_source(config):
  """The records training reads: the images of data.train_split, or their encoded latents."""
  d = config.data
  if d.space != "latents":
    return data.make_source(d, d.train_split)
  source = data.LatentSource(d.latents, d.train_split, latent.expected_metadata(config))
  if d.num_classes and source.num_classes and source.num_classes != d.num_classes:
    raise data.DataError(f"data.latents={d.latents!r} holds {source.num_classes} classes but data.num_classes="
                         f"{d.num_classes}: set --config.data.num_classes={source.num_classes} or encode the right set")
  return source


def _preview_images(config, mesh):
  """A fixed batch (>= 8 images) for the reconstruction grid: the test split of the digits, else
  train; for latent models their latents."""
  shards = sharding.num_data_shards(mesh)
  split = config.data.eval_split if config.data.name == "digits" else config.data.train_split
  batches = data.make_batches(config.data, data.make_source(config.data, split), train=False,
                              global_batch=shards * max(1, 8 // shards),
                              sharding=sharding.batch_sharding(mesh), seed=config.seed)
  images_ = next(batches)["image"]
  return latent.load(config, mesh).to_latents(images_) if config.data.space == "latents" else images_


def _check_finite(config, state, step, ckpt, history):
  """Policy for updates skipped because the loss, gradient or update was not finite: "stop" at
  the first, "skip" until more than `max_skips`. Raises without saving, so the latest
  checkpoint stays the last good state."""
  bad = int(state.first_nonfinite)
  if bad < 0:
    return
  skipped = int(state.nonfinite_steps)
  if config.nonfinite_policy == "skip" and skipped <= config.max_skips:
    logging.warning("step %d: %d non-finite updates skipped so far (first at step %d)", step, skipped, bad + 1)
    return
  ckpt.wait()
  where = (f"{skipped} updates skipped for a non-finite loss or gradient, more than max_skips={config.max_skips}; "
           f"the first at step {bad + 1}" if config.nonfinite_policy == "skip" else
           f"non-finite loss or gradient at step {bad + 1}")
  raise TrainingError(f"{where}{_describe_bad(history)}; stopped at step {step} without saving (latest good "
                      f"checkpoint: step {ckpt.latest_step()}): lower optim.base_lr or check the data")


def _describe_bad(history) -> str:
  """Loss parts and norms of the first non-finite step still in the unlogged history."""
  keys = ("loss", "loss_clean", "loss_noised", "grad_norm", "update_norm")
  for m in jax.device_get(history):
    if not all(np.isfinite(m[k]) for k in keys):
      return " (" + ", ".join(f"{k} {float(m[k]):.4g}" for k in keys) + ")"
  return ""


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out


def summarize(config, workdir: str) -> dict:
  """Parameter overview, parameter count and training FLOPs per image; writes summary.json."""
  validate_config(config, "summary")
  _, abstract_params = train_step.abstract_model(config)
  params = nnx.to_pure_dict(abstract_params)
  overview = parameter_overview.get_parameter_overview(params, include_stats=False)
  count = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  result = {"params": count, "train_flops_per_image": flops.train_flops_per_image(config)}
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  files.write_text(workdir / "summary.json", json.dumps(result, indent=2))
  print(overview)
  print(f"parameters: {count:,}   training FLOPs per image (fwd+bwd): {result['train_flops_per_image']:.4g}")
  return result
