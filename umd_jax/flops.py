"""Analytic FLOPs (multiply-add = 2 FLOPs) of the transformer block every network here is made of.
Each method counts its own network from it (`train_flops_per_image`). Not counted: norms, softmax,
elementwise ops. Backward = 2× forward; remat recompute is not model FLOPs.
"""


def block_flops(tokens: int, width: int, adaln: bool) -> float:
  dense = 2 * tokens * width * (3 * width + width + 4 * width + 4 * width)  # qkv, proj, mlp in/out
  attention = 2 * 2 * tokens * tokens * width                                # q·k and p·v
  return dense + attention + (2 * width * 6 * width if adaln else 0)
