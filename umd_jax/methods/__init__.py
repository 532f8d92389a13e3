"""The method registry: every method of this code, one line each. Config sections, presets, the
keys a method refuses as another's, the resume objective check and every method list are derived
from it; nothing outside `umd_jax/methods/` and `umd_jax/models/` names a method.

A method satisfies `interface.Method` (core) and some of `interface.Trainable`, `Backbone`,
`Sampler`, `Inpainter`; shared modules ask for a capability with `interface.require`.
Adding a method: its module here (and its network in models/), then one line in REGISTRY.
"""
import ml_collections

from umd_jax import rules
from umd_jax.methods import diffmae, dit_original, interface, sit, umd
from umd_jax.methods.common import REP  # noqa: F401 (re-exported)
from umd_jax.methods.interface import Backbone, Inpainter, Sampler, Trainable  # noqa: F401 (re-exported)

REGISTRY = {m.name: m for m in (
    umd.UMD, umd.DIT, umd.MASKDIT, umd.MAE,
    diffmae.METHOD,
    dit_original.METHOD,
    sit.METHOD,
    sit.ON_UMD,
)}
SHARED_OBJECTIVE = ("diffusion.", "optim.")  # what every trained method's loss depends on


class UnknownMethod(ValueError):
  pass


def named(name: str):
  """The registered method `name`."""
  try:
    return REGISTRY[name]
  except KeyError:
    raise UnknownMethod(f"method={name!r}: use one of {sorted(REGISTRY)}") from None


def get(config):
  """The method of `config.method`."""
  return named(config.method)


def trainable() -> list:
  """Names of the methods that train here, in registry order."""
  return [n for n, m in REGISTRY.items() if interface.has(m, Trainable)]


def add_all_keys(c) -> None:
  """Every method's own keys, each once (methods that share a class share their keys)."""
  for m in {type(m): m for m in REGISTRY.values()}.values():
    m.add_keys(c)


def own_keys(method) -> set:
  """Dotted keys `method.add_keys` adds (on an empty config with the shared sections it may extend)."""
  c = ml_collections.ConfigDict()
  for section in ("corruption", "model", "diffusion", "sample", "classify", "data", "optim"):
    c[section] = ml_collections.ConfigDict()
  method.add_keys(c)
  return set(rules.flat(c))


def foreign_keys(method) -> dict:
  """{key: the methods that read it} for the keys other methods add and `method` does not: it must
  leave them at their defaults."""
  owned = {name: own_keys(m) for name, m in REGISTRY.items()}
  mine = own_keys(method)
  return {k: [n for n, keys in owned.items() if k in keys]
          for k in sorted(set().union(*owned.values()) - mine)}


def objective_prefixes() -> tuple:
  """Key prefixes a resumed training may not change: the shared ones and every method's own."""
  return SHARED_OBJECTIVE + tuple(dict.fromkeys(p for m in REGISTRY.values() for p in m.objective))


def check_cut(config, blocks, ts, block_key: str = "probe.block", t_key: str = "probe.t") -> None:
  """The rule on the blocks and timesteps a probe reads: -1 (rep; the clean image) or one of the
  network's blocks / a timestep in [0, T). Raises ConfigError naming the key."""
  n, T = get(config).num_blocks(config), config.diffusion.num_timesteps
  shown = lambda values, v: v if len(values) == 1 else tuple(values)
  for b in blocks:
    rules.require(isinstance(b, int) and REP <= b < n, block_key, shown(blocks, b), f"use -1 (rep) or 0..{n - 1}")
  for t in ts:
    rules.require(isinstance(t, int) and -1 <= t < T, t_key, shown(ts, t),
                  f"use -1 (clean image) or a timestep in [0, {T})")
