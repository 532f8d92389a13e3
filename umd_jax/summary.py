"""--mode=summary: a config's parameter overview, parameter count and analytic training FLOPs per
image (the method's count), without building the model's weights."""
import json

import jax
import numpy as np
from clu import parameter_overview
from etils import epath
from flax import nnx

from umd_jax import files, methods, weights
from umd_jax.train import validate_config


def summarize(config, workdir: str) -> dict:
  """Parameter overview, parameter count and training FLOPs per image; writes summary.json."""
  validate_config(config, "summary")
  _, abstract_params = weights.abstract_model(config)
  params = nnx.to_pure_dict(abstract_params)
  overview = parameter_overview.get_parameter_overview(params, include_stats=False)
  count = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  result = {"params": count, "train_flops_per_image": methods.get(config).train_flops_per_image(config)}
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  files.write_text(workdir / "summary.json", json.dumps(result, indent=2))
  print(overview)
  print(f"parameters: {count:,}   training FLOPs per image (fwd+bwd): {result['train_flops_per_image']:.4g}")
  return result
