"""umd-jax: Unified Masked Diffusion (and DiT, MaskDiT, MAE) in JAX + Flax NNX."""
