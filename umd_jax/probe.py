"""Probing a frozen backbone (METHOD.md §6): features, linear probe (LARS), few-shot ridge, DDAE sweep.

Features are `rep` at timestep index 0 on clean images (UMD, MAE), or DDAE-style: the image
noised to a fixed t with a fixed per-image noise, the network told t + 1, and the tokens after
any encoder/decoder block mean-pooled (DiT, MaskDiT). One jitted, sharded forward gives all
requested blocks at once.

Multi-host: features stay on the devices, their rows sharded over the batch in the split's order
(row r is record r on any number of processes); the ridge solve, the linear probe and the test
accuracies run as sharded jitted computations on them. Only labels (to draw the shots) and the
scalar results come to the hosts, and features only to be written to the cache.
"""
import dataclasses
import functools
import hashlib
import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image, ImageDraw
from tqdm import tqdm

from umd_jax import checks, data, diffusion, files, images, latent, methods, multihost, sharding, weights
from umd_jax.methods import REP


class ProbeError(ValueError):
  """Bad probe request (block, t, split, shots): the message says what to change."""


def num_blocks(config) -> int:
  """Blocks the method's features offer (UMD: encoder then decoder; DiffMAE: the encoder's)."""
  return methods.get(config).num_blocks(config)


def check_request(config, blocks: Sequence[int], ts: Sequence[int]) -> None:
  methods.check_cut(config, blocks, ts)


def load_backbone(config, workdir, mesh):
  """(graphdef, params) of the latest checkpoint in `workdir`, EMA weights if present and wanted."""
  return weights.load(config, workdir, mesh, prefer_ema=config.probe.use_ema)


def cache_key(config) -> str:
  """A short hash of every setting besides the weights, split, t, blocks and image count that
  features depend on: the data and its preprocessing, the VAE, the compute dtype, the noise seed."""
  d = {k: v for k, v in config.data.to_dict().items() if k not in ("num_workers", "read_threads")}
  settings = {"data": d, "vae": config.vae.weights if config.data.space == "latents" else "",
              "dtype": config.model.dtype, "noise_seed": config.probe.noise_seed,
              "schedule": config.diffusion.to_dict()}
  return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def random_backbone(config, mesh):
  """A randomly initialised network of the same shape (a baseline)."""
  return weights.fresh(config, mesh, seed=config.seed + 12345)


def rows_sharding(mesh) -> NamedSharding:
  """(K, N, D) features: the N rows split over the batch axes."""
  return NamedSharding(mesh, P(None, sharding.BATCH_AXES))


def make_feature_fn(config, graphdef, t: int, blocks: Sequence[int], mesh):
  """jit(params, inputs, indices) -> (len(blocks), B, D) features of the requested blocks, rows
  sharded like the batch."""
  schedule, method = diffusion.from_config(config), methods.get(config)
  noise_key = jax.random.PRNGKey(config.probe.noise_seed)
  blocks = tuple(blocks)

  def features(params, images, indices):
    if t < 0:
      x, t_index = method.noised(config, schedule, images, None, None)
    else:  # fixed noise per image index: the same on any number of devices or batch size
      eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), images.shape[1:]))(indices)
      x, t_index = method.noised(config, schedule, images, jnp.full((images.shape[0],), t, jnp.int32), eps)
    return method.features(nnx.merge(graphdef, params), x, t_index, blocks).astype(jnp.float32)

  return jax.jit(features, out_shardings=rows_sharding(mesh))


class Extractor:
  """Features of `blocks` at timestep `t` (see the module docstring), compiled once when built
  and applied to any weights and any split. The model's inputs are the images, or for latent
  models their VAE latents (posterior mean × scaling factor) encoded on the fly by `vae`."""

  def __init__(self, config, graphdef, *, t: int, blocks: Sequence[int], mesh, vae=None):
    check_request(config, blocks, [t])
    self.config, self.t, self.blocks, self.mesh, self.vae = config, t, tuple(blocks), mesh, vae
    self.fn = make_feature_fn(config, graphdef, t, blocks, mesh)

  def inputs(self, images):
    return model_inputs(self.vae)(images)

  def __call__(self, params, split: str, max_images: int = 0, progress: bool = True) -> "Features":
    """Features of a whole split (or its first max_images), row r = record r."""
    return _extract(self.config, split, lambda x, i: self.fn(params, x, i), self.mesh, max_images,
                    f"features {split} t={self.t}", progress, self.inputs)


@dataclasses.dataclass(frozen=True)
class Features:
  """Features of a split in its order: row r is record r, whatever the number of processes."""
  x: jax.Array  # (K, N_pad, D) float32, rows sharded over the batch axes; rows >= n are padding
  y: np.ndarray  # (n,) int32 labels of the real rows, on every process (shots are drawn from them)

  @property
  def n(self) -> int:
    return len(self.y)

  def block(self, k: int) -> jax.Array:
    return self.x[k]  # (N_pad, D)


def model_inputs(vae):
  """images -> what the model sees: the images themselves, or with a `vae` their latents."""
  return (lambda images: images) if vae is None else vae.to_latents


def _extract(config, split, fn, mesh, max_images, desc, progress, prep) -> Features:
  """Runs fn(prep(images), indices) -> (K, B, D) over a split (or its first max_images) in order."""
  source = data.make_source(config.data, split)
  n = len(source) if not max_images else min(max_images, len(source))
  if n == 0:
    raise ProbeError(f"split {split!r} of {config.data.name!r} is empty")
  shards = sharding.num_data_shards(mesh)
  batch = max(shards, (min(config.probe.batch_size, n) + shards - 1) // shards * shards)
  batches = data.make_batches(config.data, data.Head(source, n), global_batch=batch,
                              sharding=sharding.batch_sharding(mesh), seed=config.seed, train=False)
  chunks, labels = [], []
  for _ in tqdm(range(-(-n // batch)), desc=desc, disable=not progress or not multihost.is_main()):
    b = next(batches)
    chunks.append(fn(prep(b["image"]), b["index"]))
    labels.append(b["label"])
  x = sharding.concatenate(chunks, rows_sharding(mesh), axis=1)
  return Features(x, np.concatenate(multihost.to_host(labels))[:n])


def extract_cached(extractor: Extractor, params, split, *, max_images=0, cache=None, check=None) -> Features:
  """`extractor(params, split)`, reusing features saved under `cache` (a directory; None: no
  caching). File names carry the split, t, blocks, image count, noise seed and a hash of the other
  settings features depend on (`cache_key`); the caller puts the checkpoint step read in `cache`.
  `check(labels)` runs before anything is written. Process 0 writes the file; it is read only where
  every process can read it."""
  path = None
  if cache is not None:
    path = epath.Path(cache) / (f"{split}_t{extractor.t}_blocks{'_'.join(map(str, extractor.blocks))}_n{max_images}_"
                                f"seed{extractor.config.probe.noise_seed}_{cache_key(extractor.config)}.npz")
    if multihost.all_processes(path.exists()):
      with path.open("rb") as f:
        saved = np.load(f)
        return _placed(saved["features"], saved["labels"], extractor.mesh)
  feats = extractor(params, split, max_images)
  if check is not None:
    check(feats.y)
  if path is not None:
    x = multihost.to_host(feats.x)[:, :feats.n]  # collective: every process takes part
    if multihost.is_main():
      path.parent.mkdir(parents=True, exist_ok=True)
      files.write_npz(path, features=x, labels=feats.y)
  return feats


def _placed(x: np.ndarray, y: np.ndarray, mesh) -> Features:
  """Host features (K, n, D) (the same on every process) as sharded Features."""
  shards = sharding.num_data_shards(mesh)
  pad = -(-x.shape[1] // shards) * shards - x.shape[1]
  x = np.concatenate([x, np.zeros((x.shape[0], pad, x.shape[2]), x.dtype)], axis=1)
  return Features(multihost.global_array(x, rows_sharding(mesh)), np.asarray(y, np.int32))


# --- few-shot ridge ---------------------------------------------------------------------------

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
  """Linear probe trained through the frozen backbone on crop + flip augmented images; the
  feature is the extractor's first block."""
  p, mesh = config.probe, extractor.mesh
  source = data.make_source(config.data, p.train_split)
  shards = sharding.num_data_shards(mesh)
  batch = max(shards, min(p.linear_batch_size, len(source)) // shards * shards)
  lr, total = linear_schedule(p, len(source), batch)
  augment = data.pipeline.TrainAugment(config.data.image_size, (p.linear_crop_area_min, 1.0), True)
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


def heatmap_png(grid: np.ndarray, row_labels, col_labels, path, cell=48):
  """A (rows, cols) accuracy grid as a PNG heatmap with the values written in the cells."""
  rows, cols = grid.shape
  left, top = 64, 24
  img = Image.new("RGB", (left + cols * cell, top + rows * cell), "white")
  draw = ImageDraw.Draw(img)
  lo, hi = float(np.nanmin(grid)), float(np.nanmax(grid))
  for r in range(rows):
    draw.text((4, top + r * cell + cell // 3), str(row_labels[r]), fill="black")
    for c in range(cols):
      v = (grid[r, c] - lo) / (hi - lo + 1e-12)
      color = (int(255 * v), int(80 + 100 * (1 - abs(v - 0.5) * 2)), int(255 * (1 - v)))
      box = (left + c * cell, top + r * cell, left + (c + 1) * cell - 1, top + (r + 1) * cell - 1)
      draw.rectangle(box, fill=color)
      draw.text((box[0] + 4, box[1] + cell // 3), f"{100 * grid[r, c]:.1f}", fill="white")
  for c in range(cols):
    draw.text((left + c * cell + 4, 6), f"t={col_labels[c]}", fill="black")
  images.save_png(path, np.asarray(img))


# --- the probe mode -----------------------------------------------------------------------------

def _flat_pixels(images, _indices):
  return images.reshape(images.shape[0], -1)[None]


def pixel_features(config, split, mesh, max_images=0, vae=None) -> Features:
  """The raw input (centre-cropped pixels, or with a `vae` their latents) as a (1, N, H·W·C)
  baseline feature."""
  flat = jax.jit(_flat_pixels, out_shardings=rows_sharding(mesh))
  return _extract(config, split, flat, mesh, max_images, f"pixels {split}", False, model_inputs(vae))


def _heads(config, train: Features, test: Features, online=None):
  """Few-shot (all configured shot counts) and linear probe on one kind of feature (its block 0)."""
  p, k = config.probe, config.data.num_classes
  args = (train.block(0), train.y, test.block(0), test.y)
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
    res = fewshot(tr.block(0), tr.y, te.block(0), te.y, shots=usable, seeds=1, l2=p.fewshot_l2, num_classes=k)
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
  outputs = files.OutputSet(epath.Path(workdir) / "probe", keep=("features_step*",))
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
    online = (functools.partial(linear_probe_online, config, extractor, params_, test_x=te.block(0), test_y=te.y,
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
  if multihost.is_main():
    files.write_text(outputs.path("results.json"), json.dumps(results, indent=2))
  outputs.publish()
  print(format_table(results))
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
      grid[i, j] = fewshot(tr.block(i), tr.y, te.block(i), te.y, shots=[p.sweep_shots], seeds=p.fewshot_seeds,
                           l2=p.fewshot_l2, num_classes=config.data.num_classes)[p.sweep_shots]["mean"]
  names = ["rep"] + [f"block {b}" for b in blocks[1:]]
  if heatmap is not None and multihost.is_main():
    heatmap_png(grid, names, list(p.sweep_ts), heatmap)
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
