"""Data: random-access sources and the grain pipeline that turns them into global batches."""
from umd_jax.data.latents import LatentSource
from umd_jax.data.pipeline import Batches, Head, make_batches
from umd_jax.data.sources import CLIP_SOURCES, IMAGE_SOURCES, DataError, make_source
