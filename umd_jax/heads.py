"""Probe heads on features (METHOD.md §6): the few-shot ridge (closed form, on device) and the
linear probe of MAE's protocol (BatchNorm without affine + Linear, LARS), on cached features or
on line through the frozen network on augmented images. Features may be sharded device arrays;
only labels (to draw shots) and the scalar accuracies come to the hosts.
"""
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from umd_jax import data, multihost, sharding
from umd_jax.features import Extractor, ProbeError


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _ridge_accuracy(train_x, shot_rows, shot_y, test_x, test_y, l2, num_classes):
  """Accuracy on the first len(test_y) rows of test_x of the ridge fit to train_x[shot_rows]."""
  shots = jnp.take(train_x, shot_rows, axis=0)
  mean, std = shots.mean(0), shots.std(0) + 1e-6  # standardise with the shots' statistics
  def prep(x):
    x = (x - mean) / std
    return jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)  # constant bias feature
  targets = 2.0 * jax.nn.one_hot(shot_y, num_classes) - 1.0  # ±1
  w = ridge_solve(prep(shots), targets, l2)
  predicted = jnp.argmax(prep(test_x) @ w, axis=1)[:test_y.shape[0]]  # the real rows (not padding)
  return jnp.mean(predicted == test_y)


def ridge_solve(x, y, l2):
  """argmin_w |xw - y|² + l2 |w|² in closed form: (xᵀx + l2 I)⁻¹ xᵀy (float32, on device)."""
  return jnp.linalg.solve(x.T @ x + l2 * jnp.eye(x.shape[1], dtype=x.dtype), x.T @ y)


def fewshot(train_x, train_y, test_x, test_y, *, shots: Sequence[int], seeds: int, l2: float, num_classes: int):
  """{shots: {"mean", "std", "per_seed"}} accuracy of the ridge probe over `seeds` draws of the shots.
  train_x / test_x: (N, D) features, host or sharded device arrays, whose first len(train_y) /
  len(test_y) rows are the records those host label arrays describe (the rest is padding)."""
  counts = np.bincount(train_y, minlength=num_classes)
  results = {}
  for k in shots:
    if counts.min() < k:
      raise ProbeError(f"{k} shots per class asked, but class {int(counts.argmin())} has only "
                       f"{int(counts.min())} training images: lower probe.fewshot_shots")
    accs = []
    for seed in range(seeds):
      rng = np.random.default_rng(seed)
      idx = np.concatenate([rng.choice(np.flatnonzero(train_y == c), k, replace=False) for c in range(num_classes)])
      accs.append(float(_ridge_accuracy(train_x, idx, train_y[idx], test_x, test_y, l2, num_classes)))
    results[k] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "per_seed": accs}
  return results


# --- linear probe (MAE protocol) --------------------------------------------------------------

def lars(learning_rate, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
  """LARS as in MoCo v3 / MAE: weight decay and the trust ratio only on ≥2-D weights (not biases).
  Built from optax parts because MAE applies momentum before the learning rate (`optax.lars`
  scales by the learning rate first, so its momentum carries past learning rates)."""
  mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(optax.add_decayed_weights(weight_decay, mask),
                     optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), mask),
                     optax.trace(decay=momentum), optax.scale_by_learning_rate(learning_rate))


def batch_norm(x, stats, train: bool, momentum=0.9, eps=1e-6):
  """BatchNorm without affine parameters; returns (normalised x, updated running stats)."""
  if train:
    mean, var = x.mean(0), x.var(0)
    stats = {"mean": momentum * stats["mean"] + (1 - momentum) * mean,
             "var": momentum * stats["var"] + (1 - momentum) * var}
  else:
    mean, var = stats["mean"], stats["var"]
  return (x - mean) * jax.lax.rsqrt(var + eps), stats


def init_head(dim, num_classes, seed=0):
  w = 0.01 * jax.random.normal(jax.random.PRNGKey(seed), (dim, num_classes))
  return {"w": w, "b": jnp.zeros((num_classes,))}, {"mean": jnp.zeros((dim,)), "var": jnp.ones((dim,))}


def head_logits(head, stats, x, train):
  x, stats = batch_norm(x, stats, train)
  return x @ head["w"] + head["b"], stats


def _head_update(tx, head, stats, opt, x, labels):
  """One LARS step of the BatchNorm + linear head on a batch of features."""
  def loss_fn(h):
    logits, new_stats = head_logits(h, stats, x, True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_stats

  (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(head)
  updates, opt = tx.update(grads, opt, head)
  return optax.apply_updates(head, updates), new_stats, opt, loss


def make_head_step(tx, feature_fn):
  """jit(head, stats, opt, inputs, labels, params, indices) -> updated (head, stats, opt, loss):
  features of a batch come from the frozen backbone on-line (feature_fn: `make_feature_fn`)."""

  @jax.jit
  def step(head, stats, opt, images, labels, params, indices):
    x = jax.lax.stop_gradient(feature_fn(params, images, indices)[0])
    return _head_update(tx, head, stats, opt, x, labels)

  return step


def make_head_steps(tx):
  """jit(head, stats, opt, features, rows (S, B), labels (S, B)) -> (head, stats, opt): S steps
  on the batches features[rows[s]] in one `lax.scan` (one dispatch; features stay sharded)."""

  @jax.jit
  def steps(head, stats, opt, features, rows, labels):
    def body(carry, batch):
      head, stats, opt = carry
      head, stats, opt, _ = _head_update(tx, head, stats, opt, jnp.take(features, batch[0], axis=0), batch[1])
      return (head, stats, opt), None
    return jax.lax.scan(body, (head, stats, opt), (rows, labels))[0]

  return steps


@functools.partial(jax.jit, static_argnames=("ks",))
def _topk_correct(head, stats, test_x, test_y, ks):
  """Fraction of the first len(test_y) rows of test_x whose label is among the head's top k."""
  logits, _ = head_logits(head, stats, test_x, False)
  top = jax.lax.top_k(logits[:test_y.shape[0]], max(ks))[1]
  return {f"top{k}": jnp.mean(jnp.any(top[:, :k] == test_y[:, None], axis=1)) for k in ks}


def topk_accuracy(head, stats, test_x, test_y, num_classes) -> dict:
  return {k: float(v) for k, v in _topk_correct(head, stats, test_x, np.asarray(test_y),
                                                 (1, min(5, num_classes))).items()}


def linear_schedule(probe_config, num_train, batch):
  steps_per_epoch = max(1, num_train // batch)
  total = max(1, probe_config.linear_epochs * steps_per_epoch)
  warmup = min(total - 1, probe_config.linear_warmup_epochs * steps_per_epoch)
  peak = probe_config.linear_base_lr * batch / 256
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, 0.0), total


def linear_probe_features(train_x, train_y, test_x, test_y, probe_config, num_classes, seed=0):
  """Linear probe on fixed features (no augmentation): {"top1", "top5"} on the test features.
  Features and labels as for `fewshot` (train_x / test_x may be sharded and padded)."""
  batch = min(probe_config.linear_batch_size, len(train_y))
  lr, total = linear_schedule(probe_config, len(train_y), batch)
  tx = lars(lr, probe_config.linear_weight_decay)
  head, stats = init_head(train_x.shape[1], num_classes, seed)
  opt, steps = tx.init(head), make_head_steps(tx)
  rng = np.random.default_rng(seed)
  order = np.array([], np.int64)
  rows = np.empty((total, batch), np.int32)
  for i in range(total):  # reshuffled every epoch; an epoch's leftover rows start the next
    if len(order) < batch:
      order = np.concatenate([order, rng.permutation(len(train_y))])
    rows[i], order = order[:batch], order[batch:]
  for start in range(0, total, 1000):  # chunks bound the index array sent at once
    chunk = rows[start:start + 1000]
    head, stats, opt = steps(head, stats, opt, train_x, chunk, train_y[chunk])
  return topk_accuracy(head, stats, test_x, test_y, num_classes)


def linear_probe_online(config, extractor: Extractor, params, *, test_x, test_y, num_classes, seed=0):
  """Linear probe trained through the frozen backbone on crop (+ flip where data.flip allows: a
  flip would swap moving digits' left and right) augmented images; the feature is the extractor's
  first block."""
  p, mesh = config.probe, extractor.mesh
  source = data.make_source(config.data, p.train_split)
  shards = sharding.num_data_shards(mesh)
  batch = max(shards, min(p.linear_batch_size, len(source)) // shards * shards)
  lr, total = linear_schedule(p, len(source), batch)
  augment = data.pipeline.TrainAugment(config.data.image_size, (p.linear_crop_area_min, 1.0), config.data.flip)
  batches = data.make_batches(config.data, source, global_batch=batch, sharding=sharding.batch_sharding(mesh),
                              seed=config.seed + seed, train=True, augment=augment)
  tx = lars(lr, p.linear_weight_decay)
  head, stats = init_head(test_x.shape[1], num_classes, seed)
  opt, step = tx.init(head), make_head_step(tx, extractor.fn)
  # the stream position of each row: the per-image noise (t >= 0), the same on any process count
  positions = jax.jit(lambda i: i * batch + jnp.arange(batch, dtype=jnp.int32),
                      out_shardings=sharding.batch_sharding(mesh))
  for i in tqdm(range(total), desc="linear probe", disable=not multihost.is_main()):
    b = next(batches)
    head, stats, opt, loss = step(head, stats, opt, extractor.inputs(b["image"]), b["label"], params, positions(i))
    # One step in flight at a time: XLA:CPU's in-process collectives can deadlock when many
    # small collective programs are queued at once (seen with 8 fake devices on 2 cores).
    loss.block_until_ready()
  return topk_accuracy(head, stats, test_x, test_y, num_classes)
