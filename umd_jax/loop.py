"""What the two training loops share (pre-training / fine-tuning in train.py, recognition
fine-tuning in classify.py): their data source and its position, cadences, the profiler, the
TensorBoard writer and the non-finite-update policy."""
import time

import jax
import numpy as np
from absl import logging

from umd_jax import data, events, latent, multihost, rules


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the message says what happened and what to do."""


def finite_mean(values) -> float:
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else float("nan")


class Every:
  """callback(step, t, **kwargs) after every step that one of `periods` divides (0: none), on
  `on_steps` and, with `on_stop`, on the step at which a signal stops the run (t: time.monotonic())."""

  def __init__(self, periods, callback, *, on_steps=(), on_stop=False):
    self.periods = tuple(p for p in (periods if isinstance(periods, tuple) else (periods,)) if p)
    self.callback, self.on_steps, self.on_stop = callback, set(on_steps), on_stop

  def __call__(self, step, stopping=False, **kwargs):
    if (stopping and self.on_stop) or step in self.on_steps or any(step % p == 0 for p in self.periods):
      self.callback(step, time.monotonic(), **kwargs)


class Profile:
  """A jax.profiler trace (TensorBoard's profile tab) into `logdir`: started after step `first`,
  stopped after step `first + steps`, or by `close()` when the run ends inside it."""

  def __init__(self, logdir, first: int, steps: int):
    self.logdir, self.first, self.steps, self.running = str(logdir), first, steps, False

  def __call__(self, step):
    if step == self.first and not self.running:
      jax.profiler.start_trace(self.logdir)
      self.running = True
    elif self.running and step >= self.first + self.steps:
      self.close()

  def close(self):
    if self.running:
      jax.profiler.stop_trace()
      self.running = False


def event_writer(workdir):
  """TensorBoard (scalars, images, hyperparameters) from process 0, written asynchronously; the
  console gets the loop's one line per log step instead of every scalar again."""
  return events.Writer(workdir) if multihost.is_main() else events.NullWriter()


def data_position(config, source, step: int) -> dict:
  """The training stream's global position after `step` steps and what defines the stream
  (the same on every process and for any number of them)."""
  d = config.data
  return {"global_batches": int(step), "batch_size": config.batch_size, "seed": config.seed, "data": d.name,
          "split": d.train_split, "records": len(source), "image_size": d.image_size,
          "crop_area": [d.crop_area_min, d.crop_area_max], "flip": d.flip,
          **({"space": "latents"} if d.space == "latents" else {})}


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


def check_finite(config, state, step, ckpt, history, lr_key: str = "optim.base_lr"):
  """Policy for updates skipped because the loss, gradient or update was not finite: "stop" at
  the first, "skip" until more than `max_skips`. Raises without saving, so the latest
  checkpoint stays the last good state. `lr_key`: the learning rate the loop reads."""
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
                      f"checkpoint: step {ckpt.latest_step()}): lower {lr_key} or check the data")


def is_loss_part(key: str) -> bool:
  """A loss part of the method's metrics ("loss_clean", "loss_masked"; not the per-bucket "loss_t3")."""
  return key.startswith("loss_") and not (key[5:6] == "t" and key[6:].isdigit())


def _describe_bad(history) -> str:
  """Loss parts and norms of the first non-finite step still in the unlogged history."""
  fetched = jax.device_get(history)
  keys = ["loss"] + [k for k in (fetched[0] if fetched else {}) if is_loss_part(k)] + ["grad_norm", "update_norm"]
  for m in fetched:
    if not all(np.isfinite(m[k]) for k in keys):
      return " (" + ", ".join(f"{k} {float(m[k]):.4g}" for k in keys) + ")"
  return ""


def hparams(config) -> dict:
  """Every setting of `config` as TensorBoard's hyperparameters: scalars as they are, the rest as text."""
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in rules.flat(config).items()}
