"""Recognition fine-tuning (METHOD.md §10, MAE's protocol): the classifier, its optimizer, the jitted
train step and the evaluation.

The classifier is the pre-trained network of any method cut after a block (by default the
encoder's last, on the clean image: MAE's fine-tuning; or DDAE-style anywhere, at a noise level
t) with MAE's head: global average pool of that block's patch tokens, LayerNorm, Linear. The
optimizer is AdamW with layer-wise learning-rate decay (block i of the N blocks run scaled by
decay^(N-i), the embeddings by decay^(N+1), the head by 1), weight decay off for norms, biases,
position tables and tokens, warm-up then cosine. Parameters the cut network does not read (the
decoder past the cut, the pre-training heads) stay exactly as loaded. The step draws stochastic
depth, mixup / cutmix and (DDAE) the noise from the step key.
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from umd_jax import diffusion, methods, mixing, sharding
from umd_jax.models import layers
from umd_jax.train_step import TrainState, guarded_update

NO_DECAY_TOP = ("registers", "mask_token", "encoder_pos", "decoder_pos")  # tokens and position tables
NO_DECAY_LEAF = ("bias", "scale", "embedding")  # biases, LayerNorm scales, the label table (a token per class)


class Classifier(nnx.Module):
  """`backbone` (the method's pre-trained model) with MAE's fine-tuning head: the mean of the
  patch tokens after the cut block, LayerNorm (float32), Linear (trunc-normal std 2e-5, bias 0)."""

  def __init__(self, backbone, width: int, num_classes: int, *, rngs: nnx.Rngs):
    self.backbone = backbone
    self.fc_norm = nnx.LayerNorm(width, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs,
                           kernel_init=layers.logical(nnx.initializers.truncated_normal(2e-5), "embed", "vocab"),
                           bias_init=layers.zeros)

  def __call__(self, tokens):  # (B, L, D) -> (B, K) logits
    return self.head(self.fc_norm(tokens.astype(jnp.float32).mean(axis=1)))


def build(config, rngs: nnx.Rngs) -> Classifier:
  backbone = methods.get(config).build(config, rngs)
  width = methods.get(config).width(config)
  return Classifier(backbone, width, config.data.num_classes, rngs=rngs)


def abstract_classifier(config):
  """(graphdef, abstract Param state) of the classifier, nothing allocated."""
  model = nnx.eval_shape(lambda: build(config, nnx.Rngs(config.seed)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert not jax.tree.leaves(rest), "the classifier must hold only nnx.Param state"
  return graphdef, params


def cut_block(config) -> int:
  """The block the classifier reads: classify.block, or with -1 the encoder's last."""
  b = config.classify.block
  return methods.get(config).encoder_depth(config) - 1 if b == -1 else b


def logits_fn(config):
  """f(model, images, *, drop_key=None, noise=None) -> (B, K) logits. drop_key: training's
  stochastic depth; noise: the DDAE input's ε (classify.t >= 0), shaped like the images."""
  method, block, t = methods.get(config), cut_block(config), config.classify.t
  rate, schedule = config.classify.drop_path, diffusion.from_config(config)

  def apply(model, images, *, drop_key=None, noise=None):
    b = images.shape[0]
    tt = None if t < 0 else jnp.full((b,), t, jnp.int32)
    x, t_index = method.noised(config, schedule, images, tt, noise)
    drop = None if drop_key is None or rate == 0 else layers.drop_path_scales(drop_key, rate, block + 1, b)
    return model(method.classify_tokens(model.backbone, x, t_index, block, drop))
  return apply


def layer_ids(config, params) -> dict:
  """A tree like `params` of each leaf's layer id (an int, or for a scanned stack an int array
  over its blocks), -1 for parameters the cut network does not read. The head is N + 1, N =
  cut_block + 1 the blocks run."""
  block = cut_block(config)
  n = block + 1
  groups = methods.get(config).classify_layers(config, block)
  scanned = config.model.scan_layers

  def backbone_leaf(path, leaf):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    spec = groups.get(keys[0], -1)
    if not isinstance(spec, tuple):
      return spec
    first = spec[1]
    if scanned:  # (depth, ...) stacked blocks
      ids = first + np.arange(leaf.shape[0])
      return np.where(ids <= n, ids, -1)
    return first + keys[2] if first + keys[2] <= n else -1  # ("blocks", j, ...)

  backbone = jax.tree_util.tree_map_with_path(backbone_leaf, params["backbone"])
  return {**{k: jax.tree.map(lambda _: n + 1, v) for k, v in params.items() if k != "backbone"},
          "backbone": backbone}


def lr_multipliers(config, params) -> dict:
  """decay^(N + 1 - id) per leaf (broadcastable: (depth, 1, ...) for a scanned stack), 0 where the
  parameter is not read."""
  decay, n = config.classify.layer_decay, cut_block(config) + 1

  def scale(ids, leaf):
    ids = np.asarray(ids)
    m = np.where(ids >= 0, decay ** (n + 1 - np.maximum(ids, 0)), 0.0).astype(np.float32)
    return m.reshape(m.shape + (1,) * (leaf.ndim - m.ndim)) if m.ndim else m
  return jax.tree.map(scale, layer_ids(config, params), params)


def decay_mask(config, params) -> dict:
  """True where weight decay applies: read parameters other than norms, biases, positions, tokens."""
  ids = layer_ids(config, params)

  def decays(path, leaf_ids):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    top = keys[1] if keys[0] == "backbone" else keys[0]
    return bool(np.any(np.asarray(leaf_ids) >= 0)) and top not in NO_DECAY_TOP and keys[-1] not in NO_DECAY_LEAF
  return jax.tree_util.tree_map_with_path(decays, ids)


def scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiply each update by its (constant) multiplier: the layer-wise LR decay."""
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (jax.tree.map(lambda u, m: u * m, updates, multipliers), state))


def steps_per_epoch(config, num_records: int) -> int:
  return num_records // config.batch_size


def learning_rate(config, num_records: int):
  """base_lr · batch/256, linear warm-up over classify.warmup_epochs, then cosine to 0."""
  c, per_epoch = config.classify, steps_per_epoch(config, num_records)
  total, warmup = c.epochs * per_epoch, min(int(round(c.warmup_epochs * per_epoch)), c.epochs * per_epoch - 1)
  peak = c.base_lr * config.batch_size / 256
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1), 0.0)


def make_optimizer(config, abstract_params, num_records: int):
  c = config.classify
  lr = learning_rate(config, num_records)
  parts = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip > 0 else []
  parts += [optax.adamw(lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, mask=decay_mask(config, abstract_params)),
            scale_by_tree(lr_multipliers(config, abstract_params))]
  return optax.chain(*parts), lr


@dataclasses.dataclass(frozen=True)
class Run:
  mesh: Any
  graphdef: Any
  state: TrainState
  shardings: TrainState
  lr: Callable
  step: Callable      # jit(state, batch) -> (state, metrics), the state donated
  evaluate: Callable  # jit(params, images, labels, indices, n) -> (top-1 count, top-k count)


def build_run(config, mesh, num_records: int) -> Run:
  graphdef, abstract = abstract_classifier(config)
  pure = nnx.to_pure_dict(abstract)
  tx, lr = make_optimizer(config, pure, num_records)
  param_sharding = sharding.param_shardings(abstract, config.mesh.rules, mesh)
  use_ema = config.classify.ema_rate > 0

  def init():
    params = nnx.to_pure_dict(nnx.state(build(config, nnx.Rngs(config.seed)), nnx.Param))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if use_ema else None, rng=jax.random.PRNGKey(config.seed + 1),
                      nonfinite_steps=jnp.zeros((), jnp.int32), first_nonfinite=jnp.full((), -1, jnp.int32))

  shapes = jax.eval_shape(init)
  repl = sharding.replicated(mesh)
  shardings = TrainState(step=repl, params=param_sharding,
                         opt_state=sharding.optimizer_shardings(tx, shapes.opt_state, param_sharding, mesh),
                         ema_params=param_sharding if use_ema else None, rng=repl, nonfinite_steps=repl,
                         first_nonfinite=repl)
  state = jax.jit(init, out_shardings=shardings)()
  return Run(mesh=mesh, graphdef=graphdef, state=state, shardings=shardings, lr=lr,
             step=_make_step(config, graphdef, tx, lr, shardings, mesh), evaluate=_make_eval(config, graphdef, mesh))


def _make_step(config, graphdef, tx, lr, shardings, mesh):
  c, num_classes = config.classify, config.data.num_classes
  apply, ema_rate = logits_fn(config), c.ema_rate

  def step(state: TrainState, batch):
    key = jax.random.fold_in(state.rng, state.step)
    k_mix, k_drop, k_noise, k_posterior = jax.random.split(key, 4)
    images = batch["image"]
    if "std" in batch:  # latents: a posterior sample per step, as pre-training draws it
      images = images + batch["std"] * jax.random.normal(k_posterior, images.shape)
    images, targets, lam = mixing.mix(k_mix, images, batch["label"], num_classes, mixup_alpha=c.mixup_alpha,
                                      cutmix_alpha=c.cutmix_alpha, switch_prob=c.mix_switch_prob,
                                      smoothing=c.label_smoothing)
    noise = jax.random.normal(k_noise, images.shape) if c.t >= 0 else None

    def loss_fn(params):
      logits = apply(nnx.merge(graphdef, params), images, drop_key=k_drop, noise=noise)
      return optax.softmax_cross_entropy(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    new_state, grad_norm, update_norm = guarded_update(state, tx, loss, grads, ema_rate)
    return new_state, dict(loss=loss, grad_norm=grad_norm, update_norm=update_norm, lr=lr(state.step), mix_lambda=lam)

  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def top_k(num_classes: int) -> int:
  return min(5, num_classes)


def _make_eval(config, graphdef, mesh):
  """jit(params, images, labels, indices, n) -> (top-1 hits, top-5 hits) among the rows whose
  index < n (the eval split's padding left out). The DDAE input's noise is fixed per image index
  (classify.noise_seed), the same on any number of devices. Videos' multi-view batches (B, V, T, H,
  W, C) are scored by the mean of the V views' softmax (MAE-ST's multi-view testing)."""
  apply, k = logits_fn(config), top_k(config.data.num_classes)
  noise_key = jax.random.PRNGKey(config.classify.noise_seed)

  def evaluate(params, images, labels, indices, n):
    views = images.shape[1] if images.ndim == 6 else 0
    if views:  # every view a row; each keeps its record's noise below
      images, indices_ = images.reshape((-1,) + images.shape[2:]), jnp.repeat(indices, views)
    else:
      indices_ = indices
    noise = None
    if config.classify.t >= 0:
      noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), images.shape[1:]))(indices_)
    logits = apply(nnx.merge(graphdef, params), images, noise=noise)
    if views:
      logits = jax.nn.softmax(logits.reshape(-1, views, logits.shape[-1]), axis=-1).mean(axis=1)
    top = jax.lax.top_k(logits, k)[1]
    real = indices < n
    return (jnp.sum((top[:, 0] == labels) & real), jnp.sum(jnp.any(top == labels[:, None], axis=1) & real))

  return jax.jit(evaluate, out_shardings=sharding.replicated(mesh))
