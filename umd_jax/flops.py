"""Analytic model FLOPs (multiply-add = 2 FLOPs) per training image: `train_flops_per_image` asks
the config's method; the UMD auto-encoder's count is here, DiffMAE's in methods/diffmae.py.

Counted for UMD: patch embedding, every dense layer and both attention matmuls of the encoder (on
registers + kept tokens) and decoder (on rep + all tokens), adaLN modulations, condition MLPs
and the output head. Not counted: norms, softmax, elementwise ops. Backward = 2× forward;
remat recompute is not model FLOPs.
"""
from umd_jax import corruption, methods
from umd_jax.models.umd import input_shape, parse_variant


def block_flops(tokens: int, width: int, adaln: bool) -> float:
  dense = 2 * tokens * width * (3 * width + width + 4 * width + 4 * width)  # qkv, proj, mlp in/out
  attention = 2 * 2 * tokens * tokens * width                                # q·k and p·v
  return dense + attention + (2 * width * 6 * width if adaln else 0)


def forward_flops(*, width, encoder_depth, decoder_depth, heads, patch, image_size, channels,
                  mask_ratio=0.0, num_registers=4, adaln=True, num_classes=0) -> float:
  del heads  # FLOPs do not depend on the head split
  num_patches = (image_size // patch) ** 2
  kept = corruption.num_kept(num_patches, mask_ratio)
  extra = 0 if adaln else 1  # the in-context condition token
  flops = 2 * num_patches * patch * patch * channels * width                 # patch embedding
  flops += encoder_depth * block_flops(num_registers + kept + extra, width, adaln)
  flops += decoder_depth * block_flops(num_patches + 1 + extra, width, adaln)
  flops += 2 * num_patches * width * patch * patch * 2 * channels             # x0 + eps head
  flops += 8 * width * width * (2 if num_classes else 1)                      # condition MLPs
  flops += 2 * width * 2 * width if adaln else 0                              # final modulation
  return float(flops)


def train_flops_per_image(config) -> float:
  """Forward + backward FLOPs of one training image of `config`'s method."""
  return methods.get(config).train_flops_per_image(config)


def umd_train_flops_per_image(config) -> float:
  """UMD: forward + backward FLOPs of one training image, averaged over the clean and noised sub-batches."""
  c, m = config.corruption, config.model
  size, channels = input_shape(config)
  common = dict(image_size=size, channels=channels, num_registers=m.num_registers,
                adaln=m.conditioning == "adaln", num_classes=m.num_classes, **parse_variant(m.variant))
  n_clean, n_noised = corruption.split_sizes(config.batch_size, c.clean_fraction)
  per_batch = (n_clean * forward_flops(mask_ratio=c.clean_mask_ratio, **common)
               + n_noised * forward_flops(mask_ratio=c.noised_mask_ratio, **common))
  return 3.0 * per_batch / config.batch_size
