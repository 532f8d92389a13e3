"""Train state, optimizer and the one jitted, sharded, donated train step.

The step fuses the method's corruption and loss (methods/: UMD's mask-then-noise with both
sub-batch forward passes, or DiffMAE's), gradients, AdamW (METHOD.md §5 schedule, decay mask, clipping) and the optional EMA. A step
whose loss, gradient or update is not finite leaves the state unchanged and is recorded in it, so
the host can stop before any bad state is written.
"""
import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from umd_jax import corruption, diffusion, geometry, methods, sharding, weights

NO_DECAY_TOP = ("registers", "mask_token")
NO_DECAY_LEAF = ("bias", "scale")  # biases and LayerNorm scales (1-D in every unscanned layer)


@flax.struct.dataclass
class TrainState:
  step: jax.Array             # int32 (), steps taken
  params: Any                 # pure dict of float32 arrays
  opt_state: Any
  ema_params: Any             # same tree as params, or None when config.optim.ema_rate == 0
  rng: jax.Array              # uint32 (2,); step keys are fold_in(rng, step)
  nonfinite_steps: jax.Array  # int32 (), updates skipped for a non-finite loss or gradient
  first_nonfinite: jax.Array  # int32 (), step of the first such update, -1 if none


def learning_rate(config):
  o = config.optim
  peak = o.base_lr * config.batch_size / 256
  warmup = int(o.warmup_fraction * config.total_steps)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(config.total_steps, warmup + 1), 0.0)


def weight_decay_mask(params):
  def decays(path, _):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    return keys[0] not in NO_DECAY_TOP and keys[-1] not in NO_DECAY_LEAF
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config):
  o = config.optim
  lr = learning_rate(config)
  clip = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []  # 0: none (SiT's training)
  tx = optax.chain(*clip,
                   optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=weight_decay_mask))
  return tx, lr


def create_state(config, mesh, tx):
  """Shape first, then materialise sharded: returns (graphdef, state, state shardings)."""
  graphdef, abstract_params = weights.abstract_model(config)
  param_sharding = sharding.param_shardings(abstract_params, config.mesh.rules, mesh)
  use_ema = config.optim.ema_rate > 0

  def init():
    params = nnx.to_pure_dict(nnx.state(methods.get(config).build(config, nnx.Rngs(config.seed)), nnx.Param))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if use_ema else None,
                      rng=jax.random.PRNGKey(config.seed + 1),
                      nonfinite_steps=jnp.zeros((), jnp.int32), first_nonfinite=jnp.full((), -1, jnp.int32))

  shapes = jax.eval_shape(init)
  repl = sharding.replicated(mesh)
  shardings = TrainState(
      step=repl, params=param_sharding,
      opt_state=sharding.optimizer_shardings(tx, shapes.opt_state, param_sharding, mesh),
      ema_params=param_sharding if use_ema else None, rng=repl, nonfinite_steps=repl, first_nonfinite=repl)
  state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings


def abstract_state(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _splits_evenly(batch_size: int, clean_fraction: float, steps: int) -> bool:
  """Whether `steps` micro-batches can each take an equal share of the clean and the noised rows."""
  n_clean, n_noised = corruption.split_sizes(batch_size, clean_fraction)
  return (steps >= 1 and batch_size % steps == 0 and n_clean % steps == 0
          and corruption.split_sizes(batch_size // steps, clean_fraction) == (n_clean // steps, n_noised // steps))


def accumulation_order(batch_size: int, clean_fraction: float, steps: int) -> np.ndarray:
  """(steps, batch_size // steps) rows of the global batch for each micro-batch: every micro-batch
  takes an equal share of the clean rows (which come first: the method's `row_split`) and of the
  noised rows, so it is split like the full batch and the mean of the micro-batch losses is the
  full-batch loss."""
  n_clean, n_noised = corruption.split_sizes(batch_size, clean_fraction)
  if not _splits_evenly(batch_size, clean_fraction, steps):
    raise ValueError(f"grad_accum_steps={steps} must divide batch_size={batch_size} and its {n_clean} clean "
                     f"and {n_noised} noised samples (corruption.clean_fraction={clean_fraction}): pick a divisor")
  clean = np.arange(n_clean).reshape(steps, -1)
  noised = (n_clean + np.arange(n_noised)).reshape(steps, -1)
  return np.concatenate([clean, noised], axis=1)


# grad_accum_steps="auto" on a CPU: micro-batches of at most this many patch tokens × model width per
# device (3 MiB of float32 per token-wide activation). Chosen from BENCHMARKS.md ("Against the official
# UMD step"): UMD-S/4 at 64 px (256 patches, width 384) ran fastest as micro-batches of 8 images,
# 2.4x one batch of 64, in less memory than the official step's.
CPU_MICRO_BATCH_ELEMENTS = 8 * 256 * 384


def auto_accumulation_steps(batch_size: int, clean_fraction: float, tokens: int, width: int, shards: int,
                            platform: str) -> int:
  """grad_accum_steps="auto": 1 on an accelerator (one batch ran fastest on the H100/H200 and fits);
  on a CPU the fewest micro-batches that split evenly (clean / noised rows, data shards) and give
  each device at most CPU_MICRO_BATCH_ELEMENTS patch tokens × width, or, if none does, the most
  that split."""
  if platform != "cpu":
    return 1
  splits = [m for m in range(1, batch_size + 1)
            if _splits_evenly(batch_size, clean_fraction, m) and (batch_size // m) % shards == 0]
  small = [m for m in splits if batch_size // m // shards * tokens * width <= CPU_MICRO_BATCH_ELEMENTS]
  if small:
    return small[0]
  return splits[-1] if splits else 1


def accumulation_steps(config, mesh) -> int:
  """config.grad_accum_steps on `mesh`: an integer as given, "auto" by `auto_accumulation_steps`."""
  if config.grad_accum_steps != "auto":
    return config.grad_accum_steps
  method = methods.get(config)
  return auto_accumulation_steps(config.batch_size, method.row_split(config),
                                 geometry.num_tokens(config, method.patch(config)), method.width(config),
                                 sharding.num_data_shards(mesh), mesh.devices.flat[0].platform)


def guarded_update(state: TrainState, tx, loss, grads, ema_rate: float):
  """The optimizer update, the EMA and the step counter; a step whose loss, gradient or update is
  not finite leaves the parameters and optimizer state as they were and is recorded in the state.
  Returns (new state, gradient norm, update norm). Pre-training and fine-tuning steps share it."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
  keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  params = keep_if_bad(params, state.params)
  opt_state = keep_if_bad(opt_state, state.opt_state)
  ema = state.ema_params
  if ema is not None:
    ema = jax.tree.map(lambda e, p: e + ema_rate * (p - e), ema, params)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
      first_nonfinite=jnp.where((state.first_nonfinite < 0) & ~finite, state.step, state.first_nonfinite))
  return new_state, grad_norm, update_norm


def make_train_step(config, graphdef, tx, lr_schedule, state_shardings, mesh):
  """jit(step)(state, batch) -> (state, metrics); the state buffers are donated. With
  m = accumulation_steps(config, mesh) > 1 the batch is taken as m micro-batches in a `lax.scan`
  inside the step (activations of one micro-batch at a time) and their mean gradient makes one
  update, equal to the full-batch update."""
  method = methods.get(config)
  method_loss = method.loss_fn(config, diffusion.from_config(config))
  ema_rate = config.optim.ema_rate
  accum = accumulation_steps(config, mesh)
  order = accumulation_order(config.batch_size, method.row_split(config), accum)
  sharding.check_batch(order.shape[1], mesh, what="the micro-batch batch_size/grad_accum_steps")
  micro_sharding = sharding.micro_batch_sharding(mesh)

  def step(state: TrainState, batch):
    key = jax.random.fold_in(state.rng, state.step)
    if "std" in batch:  # latents: a posterior sample z = mean + std·ε (both already × scale) per step
      key, k_posterior = jax.random.split(key)
      batch = {"image": batch["image"] + batch["std"] * jax.random.normal(k_posterior, batch["std"].shape),
               "label": batch["label"]}

    def loss_fn(params, images, labels, sample_ids=None):
      return method_loss(nnx.merge(graphdef, params), images, labels, key, sample_ids)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
      (loss, metrics), grads = grad_fn(state.params, batch["image"], batch["label"])
    else:
      ids = jnp.asarray(order)
      micro = {k: jax.lax.with_sharding_constraint(jnp.take(v, ids, axis=0), micro_sharding)
               for k, v in batch.items()}

      def accumulate(total, xs):
        (loss, metrics), grads = grad_fn(state.params, xs["image"], xs["label"], xs["ids"])
        return jax.tree.map(jnp.add, total, grads), (loss, metrics)

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      grads, (losses, parts) = jax.lax.scan(accumulate, zeros, {**micro, "ids": ids})
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = losses.mean()
      metrics = {k: v.sum(axis=0) if k.startswith("bucket_") else v.mean(axis=0) for k, v in parts.items()}
    new_state, grad_norm, update_norm = guarded_update(state, tx, loss, grads, ema_rate)
    metrics.update(loss=loss, grad_norm=grad_norm, param_norm=optax.tree.norm(new_state.params),
                   update_norm=update_norm, lr=lr_schedule(state.step))
    return new_state, metrics

  batch_shard = sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(state_shardings, batch_shard),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


@dataclasses.dataclass(frozen=True)
class Run:
  """What training a config on a mesh needs: the model's graphdef, the sharded initial state and
  its shardings, the optimizer and its learning-rate schedule, and the compiled step."""
  mesh: Any
  graphdef: Any
  state: TrainState
  shardings: TrainState
  tx: optax.GradientTransformation
  lr: Callable
  step: Callable  # jit(state, batch) -> (state, metrics), the state donated


def build(config, mesh, tx=None) -> Run:
  """The one way to set up training (train.py, the benchmarks and the tests): optimizer (or `tx`),
  sharded initial state, compiled step."""
  default_tx, lr = make_optimizer(config)
  tx = default_tx if tx is None else tx
  graphdef, state, shardings = create_state(config, mesh, tx)
  return Run(mesh=mesh, graphdef=graphdef, state=state, shardings=shardings, tx=tx, lr=lr,
             step=make_train_step(config, graphdef, tx, lr, shardings, mesh))
