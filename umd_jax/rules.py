"""The vocabulary of setting checks: `ConfigError` and the one-line rules that raise it, naming the
key, its value and what to use instead. checks.py and each method's own `check` use them."""
import math

import ml_collections


class ConfigError(ValueError):
  """A setting that cannot work: the message names the key and what to change."""


def require(ok: bool, key: str, value, what: str) -> None:
  """`what` is a predicate ("must be ...", "is not ...") or advice ("use ...")."""
  if not ok:
    sep = " " if what.split()[0] in ("must", "is", "keeps", "needs", "has", "out", "not") else ": "
    raise ConfigError(f"{key}={value!r}{sep}{what}")


def lookup(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def integer(config, key: str, low: int, what: str = "") -> None:
  node = lookup(config, key)
  require(isinstance(node, int) and not isinstance(node, bool) and node >= low, key, node,
          what or f"must be an integer >= {low}")


def fraction(value, key: str, low_open=False, high_open=False) -> None:
  ok = (low_open and value > 0 or not low_open and value >= 0) and (high_open and value < 1 or not high_open and value <= 1)
  require(ok, key, value, f"must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}")


def unchanged(config, defaults: ml_collections.ConfigDict, keys, why: str) -> None:
  """Each of `keys` ("section" for all its keys, or "section.key") still at its value in
  `defaults`: a key another method reads, set here, would be silently ignored."""
  for key in keys:
    node = lookup(defaults, key)
    names = [f"{key}.{k}" for k in node.keys()] if isinstance(node, ml_collections.ConfigDict) else [key]
    for name in names:
      value = lookup(config, name)
      require(value == lookup(defaults, name), name, value, f"is {why}")


def flat(config, prefix: str = "") -> dict:
  """{'a.b': value} of every leaf of a ConfigDict (tuples are leaves)."""
  out = {}
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def finite(config) -> None:
  """The one numeric rule: every float setting (alone or in a tuple) is finite. inf and nan are
  never a meaningful setting here (a noise exponent, a learning rate, a mixup alpha ...), and they
  pass every `>` and `<=` a range check would make of them."""
  for key, value in flat(config).items():
    values = value if isinstance(value, (tuple, list)) else (value,)
    bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
    require(not bad, key, value, "must be a finite number")
