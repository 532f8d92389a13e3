"""Pre-training loop, readable top to bottom: config -> mesh -> state -> data -> steps, with
everything periodic (finiteness guard, log line, reconstruction grid, few-shot probe, FID,
checkpoint, profile) as an action with its own cadence. TensorBoard events: `events.py`.

Resume order: the workdir's latest checkpoint, else `config.init_from`'s weights, else scratch.
SIGTERM / SIGINT save a checkpoint and return cleanly, on every process at the same step
(multihost.StopRequest), even when the signal reached only some of them.
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from umd_jax import (checkpoint, checks, data, diffusion, files, generate, images, latent, loop, methods,
                     multihost, probe, sharding, train_step, weights)


def validate_config(config, mode: str = "pretrain") -> None:
  """Fail fast, with one line, on every setting training reads (see checks.py)."""
  checks.check(config, mode)
  if config.grad_accum_steps != "auto":  # "auto" picks a count that splits (train_step.accumulation_steps)
    train_step.accumulation_order(config.batch_size, methods.get(config).row_split(config), config.grad_accum_steps)


def _reconstruction_fn(config, graphdef, mesh):
  """jit(params, images, key) -> rows (input shown to the model, its prediction, original) of the
  method's preview, replicated so that every process can fetch them (a batch-sharded result spans
  all hosts)."""
  method, schedule = methods.get(config), diffusion.from_config(config)
  latent_space = config.data.space == "latents"

  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def reconstruct(params, x0, key):
    shown, predicted = method.preview(config, schedule, nnx.merge(graphdef, params), x0, key)
    return shown, predicted if latent_space else jnp.clip(predicted, -1, 1), x0

  return reconstruct


def _mean_metrics(history):
  """Average the per-step metric dicts fetched since the last log; buckets are pooled properly."""
  fetched = jax.device_get(history)
  # Skipped (non-finite) steps are left out of the means; the skip count is logged instead.
  out = {k: loop.finite_mean([m[k] for m in fetched]) for k in fetched[0] if not k.startswith("bucket_")}
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
  source = loop.training_source(config)  # also checks its class count (and latents their encoding)
  resuming = checkpoint.latest_step(workdir) is not None
  # the micro-batch of gradient accumulation must split over the devices too
  accum = train_step.accumulation_steps(config, mesh)
  sharding.check_batch(config.batch_size // accum, mesh, what="the micro-batch batch_size/grad_accum_steps")
  if config.grad_accum_steps == "auto" and accum > 1:
    logging.info("grad_accum_steps=auto: %d micro-batches of %d per update on this CPU (at most %d patch "
                 "tokens x width per device; grad_accum_steps=1: one batch)", accum, config.batch_size // accum,
                 train_step.CPU_MICRO_BATCH_ELEMENTS)
  if mode == "finetune" and not config.init_from and not resuming:
    raise ValueError("fine-tuning needs --config.init_from=PRETRAINING_WORKDIR (or a workdir to resume)")
  # init_from's weights are read and verified now: a damaged or other source creates nothing here
  init = read_init(config, mesh) if config.init_from and not resuming else None
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)  # takes the workdir's lock
  try:
    return _train(config, workdir, mesh, ckpt, source, init)
  finally:
    ckpt.close()  # also on an error: no checkpointer threads left to print after the error line


def _train(config, workdir, mesh, ckpt, source, init=None) -> dict:
  run = train_step.build(config, mesh)
  state, graphdef = run.state, run.graphdef
  position_at = functools.partial(loop.data_position, config, source)
  provenance = None
  if ckpt.latest_step() is not None:
    state, start = ckpt.restore_latest(train_step.abstract_state(state, run.shardings), position_at,
                                       fallback=config.restore_fallback, config=config)
    provenance = ckpt.provenance(start)
    logging.info("resumed from %s at step %d", ckpt.directory, start)
  elif init is not None:
    params, provenance = init
    params = {**state.params, **params}
    ema = jax.tree.map(jnp.copy, params) if state.ema_params is not None else None  # own buffers: both are donated
    state = state.replace(params=params, ema_params=ema)
    logging.info("initialised weights from %s (step %d)", provenance["workdir"], provenance["step"])
  start = int(state.step)
  # One global batch per step: every process starts its rows of the stream at batch `start`,
  # whatever the number of processes that wrote the checkpoint.
  batches = data.make_batches(config.data, source, global_batch=config.batch_size,
                              sharding=sharding.batch_sharding(mesh), seed=config.seed, train=True, start=start)
  vae = latent.load(config, mesh) if config.data.space == "latents" else None
  writer = loop.event_writer(workdir)
  if start == 0:
    writer.write_hparams(loop.hparams(config))

  history, logged = [], {}
  last, first, t0 = config.total_steps, start + 1, time.monotonic()

  def guard(step, t, state):
    loop.check_finite(config, state, step, ckpt, history)

  def log(step, t, state):  # the means since the last log line
    since_step, since_t = logged.get("at", (start, t0))
    scalars = {**_mean_metrics(history), "nonfinite_skipped": float(state.nonfinite_steps)}
    history.clear()
    rate = (step - since_step) / max(t - since_t, 1e-9)
    writer.write_scalars(step, {**scalars, "steps_per_sec": rate, "images_per_sec": rate * config.batch_size})
    parts = ", ".join(f"{k[5:]} {v:.5f}" for k, v in scalars.items() if loop.is_loss_part(k))
    logging.info("step %d/%d: loss %.5f (%s), %.2f steps/s", step, last, scalars["loss"], parts, rate)
    logged.update(last=scalars, at=(step, t))
    logged.setdefault("first_loss", scalars["loss"])

  # The finiteness guard runs before every log line and checkpoint: nothing logs or saves a bad state.
  actions = [loop.Every((config.log_every, config.checkpoint_every), guard, on_steps=(first, last), on_stop=True),
             loop.Every(config.log_every, log, on_steps=(first, last), on_stop=True),
             loop.Every(config.image_every, _reconstruction_action(config, graphdef, mesh, workdir, writer, vae),
                   on_steps=(last,))]
  if config.probe_every:
    fewshot = probe.FewShotEval(config, graphdef, mesh, vae)
    actions.append(loop.Every(config.probe_every, lambda step, t, state: _scores(writer, step, fewshot(state.params)),
                         on_steps=(last,)))
  if config.fid_every:
    fid = generate.FidEval(config, graphdef, mesh, workdir, vae)
    ema_or_live = lambda state: state.ema_params if state.ema_params is not None else state.params
    actions.append(loop.Every(config.fid_every, lambda step, t, state: _scores(writer, step, fid(ema_or_live(state))),
                         on_steps=(last,)))
  actions.append(loop.Every(config.checkpoint_every,
                       lambda step, t, state: ckpt.save(step, state, position_at(step), config, provenance),
                       on_steps=(last,), on_stop=True))
  profile = None
  if config.profile.steps:  # a trace of `steps` steps from `first_step`: TensorBoard's profile tab
    profile = loop.Profile(workdir / "profile" / f"process_{jax.process_index()}", config.profile.first_step,
                      config.profile.steps)

  step = start
  with multihost.StopRequest() as stop:
    while step < config.total_steps:
      state, metrics = run.step(state, next(batches))
      step += 1
      history.append(metrics)
      stopping = stop.reached(step)  # the same answer on every process
      for action in actions:
        action(step, stopping=stopping, state=state)
      if profile is not None:
        profile(step)
      if stopping:
        logging.warning("%s received: saved step %d, exiting", stop.signal, step)
        break
  if profile is not None:  # the run may have ended inside the traced steps
    profile.close()
  ckpt.wait()
  writer.close()
  return dict(start_step=start, step=step, first_loss=logged.get("first_loss"), last_loss=logged.get("last", {}).get("loss"),
              stopped_by=stop.signal, workdir=str(workdir), state=state)


def _scores(writer, step, scores: dict) -> None:
  """An evaluation's results: to TensorBoard, and one log line."""
  writer.write_scalars(step, {k: v for k, v in scores.items() if k != "fid_samples"})
  logging.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))


def _reconstruction_action(config, graphdef, mesh, workdir, writer, vae):
  """callback(step, t, state): the masked input / reconstruction / original grid of a fixed batch,
  as a PNG (process 0) and in TensorBoard; latent models' rows are decoded to pixels."""
  reconstruct = _reconstruction_fn(config, graphdef, mesh)
  preview = _preview_images(config, mesh, vae)

  def action(step, t, state):
    rows = reconstruct(state.params, preview, jax.random.PRNGKey(config.seed))
    if vae is not None:
      rows = [vae.to_pixels(r) for r in rows]
    rows = multihost.to_host(rows)  # collective: every process takes part
    picture = images.grid(rows)
    upscale = max(1, 256 // picture.shape[0])
    def save():
      images.save_png(workdir / "images" / f"reconstruction_{step:08d}.png", picture, upscale=upscale)
      if np.ndim(rows[0]) == 5:  # clips: also an animation, one grid per frame
        frames = images.clip_grids(rows)
        files.write_bytes(workdir / "images" / f"reconstruction_{step:08d}.gif",
                          images.gif_bytes(frames, upscale=max(1, 256 // frames[0].shape[0])))
    files.on_main(save)
    writer.write_images(step, {"reconstruction": picture[None]})
  return action


def _fresh_keys(config, source_config) -> set:
  """Parameters a fine-tuning run makes anew: a label embedding its source did not have (the
  method's `label_params`)."""
  return set(methods.get(config).label_params) if source_config.model.num_classes == 0 else set()


def read_init(config, mesh):
  """(parameters, provenance) of `config.init_from`'s latest readable step, read and verified
  against their checksums, sharded for `mesh`: every parameter but a label embedding the source
  did not have (fine-tuning a self-supervised model), which stays freshly initialised, as does the
  optimizer. Provenance: {"workdir", "step"}, saved with every checkpoint of the run."""
  fresh = _fresh_keys(config, checkpoint.load_config(config.init_from))
  _, abstract = weights.abstract_model(config)
  shardings = sharding.param_shardings(abstract, config.mesh.rules, mesh)
  target = {k: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), v, shardings[k])
            for k, v in nnx.to_pure_dict(abstract).items() if k not in fresh}
  params, step = checkpoint.restore_params_and_step(config.init_from, target, config=config)
  return params, {"workdir": str(config.init_from), "step": int(step)}


def finetune(config, workdir, devices=None) -> dict:
  """Class-conditional fine-tuning: the pre-training loop from `init_from`'s weights with labels."""
  return pretrain(config, workdir, devices, mode="finetune")


def _preview_images(config, mesh, vae=None):
  """A fixed batch (>= 8 images) for the reconstruction grid: the test split of the digits, else
  train; for latent models (`vae`) their latents."""
  shards = sharding.num_data_shards(mesh)
  split = config.data.eval_split if config.data.name == "digits" else config.data.train_split
  batches = data.make_batches(config.data, data.make_source(config.data, split), train=False,
                              global_batch=shards * max(1, 8 // shards),
                              sharding=sharding.batch_sharding(mesh), seed=config.seed)
  images_ = next(batches)["image"]
  return images_ if vae is None else vae.to_latents(images_)


