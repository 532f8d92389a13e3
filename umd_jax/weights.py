"""Model weights for inference (probing, sampling, summaries): the model's structure without
allocating it, a checkpoint's weights sharded for a mesh, or a fresh initialisation. The training
state (optimizer, EMA, counters) is train_step.py's."""
import jax
from flax import nnx

from umd_jax import checkpoint, methods, sharding


def abstract_model(config):
  """(graphdef, abstract Param state) of `config`'s model, without allocating anything."""
  model = nnx.eval_shape(lambda: methods.get(config).build(config, nnx.Rngs(config.seed)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert not jax.tree.leaves(rest), "the model must hold only nnx.Param state"
  return graphdef, params


def load(config, workdir, mesh, prefer_ema: bool = True):
  """(graphdef, params) of a workdir's latest checkpoint, sharded for `mesh` (EMA if kept and wanted)."""
  return load_with_step(config, workdir, mesh, prefer_ema)[:2]


def load_with_step(config, workdir, mesh, prefer_ema: bool = True):
  """(graphdef, params, step): `load` and the step the weights were read from (an earlier one
  than the latest when that is damaged)."""
  graphdef, abstract = abstract_model(config)
  shardings = sharding.param_shardings(abstract, config.mesh.rules, mesh)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nnx.to_pure_dict(abstract), shardings)
  params, step = checkpoint.restore_params_and_step(workdir, target, prefer_ema=prefer_ema, config=config)
  return graphdef, params, step


def fresh(config, mesh, seed: int):
  """(graphdef, params) of a randomly initialised model of the same shape, sharded for `mesh`."""
  graphdef, abstract = abstract_model(config)
  shardings = sharding.param_shardings(abstract, config.mesh.rules, mesh)
  init = lambda: nnx.to_pure_dict(nnx.state(methods.get(config).build(config, nnx.Rngs(seed)), nnx.Param))
  return graphdef, jax.jit(init, out_shardings=shardings)()
