"""Writes tests/fixtures/same_seed.json: the state after 4 steps of a tiny run, fixed seed.

  python tests/make_same_seed_fixture.py      # from the repository root, with make install's .venv

For each array of the state (parameters, optimizer moments, EMA) it keeps the bitwise fingerprint
(checkpoint.fingerprints) and float64 sums. tests/test_same_seed.py compares a fresh run with it:
bitwise where the machine (JAX version, CPU model and vector extensions) is the one that wrote the
file, to float32 tolerances elsewhere. Regenerate it only when a change is meant to alter the
numbers, and say so in the commit.
"""
import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"  # full optimizations, as training runs (not the suite's default)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from conftest import tiny_config  # noqa: E402  (tests/ is this script's directory)
from umd_jax import checkpoint, train  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "same_seed.json")


def machine() -> dict:
  """What bitwise equality depends on: the compiler and the CPU it generates code for."""
  model, flags = "", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
          model = value.strip()
        if key.strip() == "flags" and not flags:
          flags = {x for x in value.split() if x.startswith(("avx", "fma", "amx"))}
  except OSError:
    pass
  return {"jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
          "cpu": model, "vector": sorted(flags), "devices": jax.device_count()}


def config():
  return tiny_config(**{"total_steps": 4, "checkpoint_every": 4, "optim.ema_rate": 0.5})


def state_summary(state) -> dict:
  tree = {"params": state.params, "opt_state": state.opt_state, "ema_params": state.ema_params}
  prints = checkpoint.fingerprints(tree)
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  arrays = {}
  for path, x in flat:
    x = np.asarray(x, np.float64)
    arrays[jax.tree_util.keystr(path)] = {"fingerprint": prints[jax.tree_util.keystr(path)],
                                          "sum": float(x.sum()), "abs_sum": float(np.abs(x).sum()),
                                          "size": int(x.size)}
  return arrays


def run(workdir) -> dict:
  return state_summary(train.pretrain(config(), workdir)["state"])


if __name__ == "__main__":
  with tempfile.TemporaryDirectory() as tmp:
    arrays = run(os.path.join(tmp, "run"))
  os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
  with open(FIXTURE, "w") as f:
    json.dump({"machine": machine(), "arrays": arrays}, f, indent=1, sort_keys=True)
  print(f"wrote {FIXTURE}: {len(arrays)} arrays", file=sys.stderr)
