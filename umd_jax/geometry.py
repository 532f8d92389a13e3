"""What the network sees, in numbers every method and mode shares: the input's size, frames and
channels (pixels, or SD-VAE latents), and how it is cut into tokens (`Grid`).

An image (B, H, W, C) is cut into patch × patch squares; a clip (B, T, H, W, C) into tubelet ×
patch × patch tubes (MAE-ST, arXiv 2205.09113: 2 × 16 × 16 on 16 frames). Tokens are numbered in
(time, row, column) order; an image is the one-frame case, numbered as before (row-major).
"""
from typing import NamedTuple

import einops
import numpy as np


# Keys whose values give a network's tokens their meaning (every method's `meaning` holds them): a
# clip model's tokens are not an image model's, nor one tubelet's another's.
MEANING = ("data.frames", "model.tubelet")


def input_shape(config) -> tuple:
  """(size, channels) of one frame of what the model sees: the images of `config.data`, or with
  data.space="latents" their VAE latents (size / vae.downsample, vae.latent_channels)."""
  d = config.data
  if d.space == "latents":
    return d.image_size // config.vae.downsample, config.vae.latent_channels
  return d.image_size, d.channels


def frames(config) -> int:
  """Frames of one input: 1 for images (B, H, W, C), data.frames for clips (B, T, H, W, C)."""
  return config.data.frames


def sample_shape(config) -> tuple:
  """One sample's shape without the batch: (H, W, C), or ([T,] H, W, C) for clips."""
  size, channels = input_shape(config)
  return ((frames(config),) if frames(config) > 1 else ()) + (size, size, channels)


class Grid(NamedTuple):
  """How one input is cut into tokens. `frames` counts token frames (clip frames / tubelet; 1 for
  an image), `clip` says whether the input has a time axis."""
  patch: int
  rows: int
  cols: int
  frames: int = 1
  tubelet: int = 1
  clip: bool = False

  @property
  def num_tokens(self) -> int:
    return self.frames * self.rows * self.cols

  @property
  def per_frame(self) -> int:
    """Tokens of one token frame (rows × cols)."""
    return self.rows * self.cols

  def token_dim(self, channels: int) -> int:
    """Values in one token: tubelet · patch² · channels."""
    return self.tubelet * self.patch * self.patch * channels

  def patchify(self, x):
    """(B, [T,] H, W, C) -> (B, L, tubelet·p·p·C), tokens in (time, row, column) order."""
    if self.clip:
      return einops.rearrange(x, "b (t r) (h p) (w q) c -> b (t h w) (r p q c)", r=self.tubelet, p=self.patch,
                              q=self.patch)
    return einops.rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=self.patch, q=self.patch)

  def unpatchify(self, x):
    """(B, L, tubelet·p·p·C) -> (B, [T,] H, W, C)."""
    if self.clip:
      return einops.rearrange(x, "b (t h w) (r p q c) -> b (t r) (h p) (w q) c", t=self.frames, h=self.rows,
                              r=self.tubelet, p=self.patch, q=self.patch)
    return einops.rearrange(x, "b (h w) (p q c) -> b (h p) (w q) c", h=self.rows, p=self.patch, q=self.patch)

  def pixel_mask(self, mask):
    """(B, L) token mask -> (B, [T,] H, W, 1): each token's value on its pixels (numpy or JAX)."""
    xp = np if isinstance(mask, np.ndarray) else _jnp()
    b = mask.shape[0]
    if self.clip:
      m = mask.reshape(b, self.frames, self.rows, self.cols)
      m = xp.repeat(xp.repeat(xp.repeat(m, self.tubelet, axis=1), self.patch, axis=2), self.patch, axis=3)
    else:
      m = mask.reshape(b, self.rows, self.cols)
      m = xp.repeat(xp.repeat(m, self.patch, axis=1), self.patch, axis=2)
    return m[..., None]

  def known_tokens(self, known):
    """(B, [T,] H, W, 1) pixel mask (1 = known pixel) -> (B, L) token mask, 1 where any pixel of
    the token is unknown (numpy or JAX arrays)."""
    return 1.0 - self.patchify(known).min(axis=-1)

  def sincos(self, width: int) -> np.ndarray:
    """(L, width) fixed sin-cos position table: MAE's 2-D table for an image; for a clip the 3-D
    form (torchmultimodal's get_3d_sin_cos_embeddings, from FAIR's video MAE code): the first
    width/4 channels encode the token frame, the other 3·width/4 the 2-D position in the frame."""
    if not self.clip:
      return sincos_2d(width, self.rows, self.cols)
    if width % 16:
      raise ValueError(f"width {width} must be divisible by 16 for 3-D sin-cos positions")
    time = _sincos_1d(width // 4, np.arange(self.frames, dtype=np.float64))           # (T', width/4)
    space = sincos_2d(width // 4 * 3, self.rows, self.cols)                           # (H'W', 3 width/4)
    return np.concatenate([np.repeat(time, self.per_frame, axis=0).astype(np.float32),
                           np.tile(space, (self.frames, 1))], axis=1)


def _jnp():
  import jax.numpy as jnp  # noqa: PLC0415 - numpy callers (data, tests) need not import JAX
  return jnp


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """(len(pos), dim) [sin | cos] of the positions times 1/10000^(2k/dim)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(width: int, rows: int, cols: int | None = None) -> np.ndarray:
  """(rows·cols, width) fixed 2-D sin-cos position table (MAE / DiT): half the channels encode the
  row, half the column, each as [sin | cos] of the position times 1/10000^(2k/(width/2))."""
  if width % 4:
    raise ValueError(f"width {width} must be divisible by 4 for 2-D sin-cos positions")
  r, c = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(rows if cols is None else cols, dtype=np.float64),
                     indexing="ij")
  return np.concatenate([_sincos_1d(width // 2, r), _sincos_1d(width // 2, c)], axis=1).astype(np.float32)


def grid(config, patch: int, tubelet: int | None = None) -> Grid:
  """The token grid of `config`'s input for a patch size (and `model.tubelet` for clips)."""
  return checked_grid(input_shape(config)[0], patch, frames(config),
                      config.model.tubelet if tubelet is None else tubelet)


def num_tokens(config, patch: int) -> int:
  """Tokens of one input: (token frames) × (input size / patch)²."""
  return grid(config, patch).num_tokens


def checked_grid(size: int, patch: int, frames_: int = 1, tubelet: int = 1) -> Grid:
  """The Grid of a size × size input of `frames_` frames, refused in one line when it does not cut."""
  if size % patch:
    raise ValueError(f"image size {size} is not divisible by patch size {patch}: change data.image_size or "
                     "model.variant")
  if frames_ % tubelet:
    raise ValueError(f"data.frames={frames_} is not divisible by model.tubelet={tubelet}: change one of them")
  return Grid(patch, size // patch, size // patch, frames_ // tubelet, tubelet, frames_ > 1)
