"""The method interface: what the loop, the preview, probing, sampling, inpainting, FLOPs, the
summary, the checks and weight loading know of a method. `get(config)` returns the method of
`config.method`; nothing outside `umd_jax/methods/` and `umd_jax/models/` names one.

A method is an object with:
  name, generates            its name; whether it samples class-conditionally (generate's grid,
                             .npz and FID) -- DiffMAE does not, it only inpaints
  build(config, rngs)        the nnx model (every leaf an nnx.Param)
  row_split(config)          share of the batch in its first sub-batch: gradient accumulation
                             gives every micro-batch an equal part of each sub-batch
  loss_fn(config, schedule)  loss(model, images, labels, key, sample_ids) -> (loss, metrics); the
                             metrics hold "loss_*" parts (one log line) and per-timestep buckets
  num_blocks(config)         blocks a probe may read (features' block indices 0 .. n-1)
  features(model, x, t_index, blocks)
                             (len(blocks), B, D) probe features, REP (-1) for the representation
  preview(config, schedule, model, x0, key)
                             (input shown to the model, its prediction) for the reconstruction grid
  denoiser(config, make_model, labels)
                             denoise(x_t, t) -> (x0, eps) for diffusion.py's samplers (generates)
  sample(config, schedule, make_model, labels, noise, key)
                             class-conditional samples from `noise` with sample.sampler (generates)
  inpaint(config, schedule, make_model, images, known, labels, key, num_masked)
                             images with the unknown pixels (known == 0) filled, known ones copied;
                             num_masked: patches with an unknown pixel, the same in every image
  inpaint_steps(config)      network calls of one inpainting (the sampling benchmark's unit)
  train_flops_per_image(config)
                             analytic forward + backward FLOPs of one training image
  check(config, mode)        the method's own settings (raises checks.ConfigError)
  variant(config)            model.variant parsed: width, patch, depths, heads (ValueError if bad)
  noised(config, schedule, images, t, eps)
                             (input, what the network is told) for probes and classifiers: the
                             clean images (t None) or noised to timesteps t (B,) with eps (UMD
                             family, DiffMAE: told t + 1, the clean step 0; DiT: t; SiT: its time)
  encoder_depth(config)      blocks of its encoder (the classifier's default cut: after the last)
  classify_tokens(model, x, t_index, block, drop)
                             (B, L, D) patch tokens after `block` of the unmasked forward (numbered
                             as `features` numbers them); drop (block + 1, 2, B) stochastic depth
  classify_layers(config, block)
                             {top-level parameter: layer id, or ("stack", id of its block 0)} of
                             what that cut reads (MAE's layer-wise LR decay); others stay frozen
`make_model()` merges the weights where it is called (inside a sampling scan: newer Flax refuses
a module built at an outer trace level inside the model's own nnx.scan).
"""
from umd_jax import rules
from umd_jax.methods import diffmae, dit_original, umd
from umd_jax.methods.common import REP  # noqa: F401 (re-exported)

METHODS = {"umd": umd.METHOD, "dit": umd.METHOD, "maskdit": umd.METHOD, "mae": umd.METHOD,
           "diffmae": diffmae.METHOD, "dit_original": dit_original.METHOD}


class UnknownMethod(ValueError):
  pass


def get(config):
  """The method of `config.method`."""
  try:
    return METHODS[config.method]
  except KeyError:
    raise UnknownMethod(f"method={config.method!r}: use one of {sorted(METHODS)}") from None


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
