"""Device mesh, logical-axis rules and shardings of the train state (the only place meshes are built).

Mesh axes: ("data", "fsdp"). Batches are split over both; parameters (and their optimizer
state) are split over "fsdp" along the logical axis the config's rules map to it (FSDP).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


class ShardingError(ValueError):
  """The mesh or batch layout does not fit the devices: the message says what to change."""


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  devices = list(devices if devices is not None else jax.devices())
  n, fsdp, data = len(devices), mesh_config.fsdp, mesh_config.data
  if fsdp < 1 or n % fsdp:
    raise ShardingError(f"mesh.fsdp={fsdp} does not divide the {n} devices")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ShardingError(f"mesh data×fsdp = {data}×{fsdp} != {n} devices: set mesh.data=-1 or fix the sizes")
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), (AxisType.Auto, AxisType.Auto), devices=devices)


def local_mesh() -> jax.sharding.Mesh:
  """This process's devices alone, one "data" axis: for work each process does on its own
  (encoding its shards of a latent data set)."""
  return jax.make_mesh((jax.local_device_count(),), ("data",), (AxisType.Auto,), devices=jax.local_devices())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def micro_batch_sharding(mesh) -> NamedSharding:
  """(micro-batches, B/m, ...) arrays: the micro-batch rows split like a batch (grad accumulation)."""
  return NamedSharding(mesh, P(None, BATCH_AXES))


def _concatenate(*arrays, axis):
  return jnp.concatenate(arrays, axis=axis)


def concatenate(arrays, out_sharding, axis: int = 0) -> jax.Array:
  """Global arrays joined along `axis` into `out_sharding`, as one program on the devices. The
  jitted function is module-level, so repeated calls (an evaluator every N training steps) reuse
  its compilation instead of tracing a new lambda each time."""
  return jax.jit(_concatenate, static_argnames="axis", out_shardings=out_sharding)(*arrays, axis=axis)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_data_shards(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch(global_batch: int, mesh, what: str = "batch_size") -> None:
  shards = num_data_shards(mesh)
  if global_batch % shards:
    raise ShardingError(f"{what}={global_batch} is not divisible by the {shards} data shards "
                        f"(mesh data×fsdp): use a multiple of {shards}")


def logical_to_spec(names, shape, rules, mesh) -> P:
  """Map logical axis names to mesh axes; a dim the mesh axis does not divide stays replicated."""
  rules = dict(rules)
  used, spec = set(), []
  for name, size in zip(names, shape):
    axis = rules.get(name)
    if axis is not None and axis not in used and size % mesh.shape[axis] == 0:
      spec.append(axis)
      used.add(axis)
    else:
      spec.append(None)
  return P(*spec)


def param_shardings(abstract_params: nnx.State, rules, mesh):
  """Pure dict of NamedShardings for a model's Param state (made with `nnx.eval_shape`)."""
  names = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
  shapes = nnx.to_pure_dict(abstract_params)
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, logical_to_spec(tuple(spec), x.shape, rules, mesh)),
                      names, shapes, is_leaf=lambda s: isinstance(s, P))


def optimizer_shardings(tx: optax.GradientTransformation, abstract_opt_state, param_sharding, mesh):
  """Optimizer moments follow their parameters; counters and other scalars are replicated."""
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt_state, param_sharding,
                               transform_non_params=lambda _: replicated(mesh),
                               is_leaf=lambda x: isinstance(x, NamedSharding))
