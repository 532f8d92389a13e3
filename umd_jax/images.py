"""Image grids for TensorBoard and PNG files, and the uint8 convention of saved samples."""
import io

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from umd_jax import files


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8, any leading shape: round((x + 1) · 127.5), clipped."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


UINT8_CONVENTIONS = ("round", "truncate")


def to_uint8_device(images, convention: str = "round"):
  """`to_uint8` in JAX (the same values), for arrays that stay on the devices. "truncate" is
  guided-diffusion's sampling scripts' `((x + 1) * 127.5).clamp(0, 255).to(uint8)`, which
  darkens every pixel by half a level on average; "round" is unbiased and matches what
  real uint8 images give back after the [-1, 1] round trip (the FID reference statistics)."""
  scaled = (images.astype(jnp.float32) + 1.0) * 127.5
  if convention == "truncate":
    return jnp.clip(scaled, 0, 255).astype(jnp.uint8)  # float -> uint8 casts truncate
  return jnp.clip(jnp.round(scaled), 0, 255).astype(jnp.uint8)


def grid(rows, pad: int = 1) -> np.ndarray:
  """rows: list of (N, H, W, C) arrays in [-1, 1] -> one (rows·(H+pad), N·(W+pad), C) uint8 image.
  A row of clips (N, T, H, W, C) shows each clip's frames side by side (N·T images)."""
  rows = [to_uint8(r).reshape((-1,) + np.shape(r)[-3:]) for r in rows]
  n, h, w, c = rows[0].shape
  out = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, image in enumerate(row):
      out[pad + i * (h + pad):pad + i * (h + pad) + h, pad + j * (w + pad):pad + j * (w + pad) + w] = image
  return out


def clip_grids(rows, pad: int = 1) -> list:
  """rows: list of (N, T, H, W, C) clips in [-1, 1] -> T grids (one per frame, see `grid`): the
  frames of an animation of the rows."""
  return [grid([r[:, f] for r in rows], pad) for f in range(np.shape(rows[0])[1])]


def gif_bytes(frames_, upscale: int = 1, duration_ms: int = 200) -> bytes:
  """(H, W, C) uint8 images as a looping animated GIF's bytes."""
  pictures = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames_]
  if upscale > 1:
    pictures = [p.resize((p.width * upscale, p.height * upscale), Image.NEAREST) for p in pictures]
  buffer = io.BytesIO()
  pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=duration_ms, loop=0)
  return buffer.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
  """An (H, W, C) uint8 image (C = 1 or 3) as PNG file bytes."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  return buffer.getvalue()


def save_png(path, image: np.ndarray, upscale: int = 1) -> None:
  if upscale > 1:
    image = image.repeat(upscale, axis=0).repeat(upscale, axis=1)
  files.write_bytes(path, png_bytes(image))


def heatmap_png(grid: np.ndarray, row_labels, col_labels, path, cell=48):
  """A (rows, cols) accuracy grid as a PNG heatmap with the values written in the cells."""
  rows, cols = grid.shape
  left, top = 64, 24
  img = Image.new("RGB", (left + cols * cell, top + rows * cell), "white")
  draw = ImageDraw.Draw(img)
  lo, hi = float(np.nanmin(grid)), float(np.nanmax(grid))
  for r in range(rows):
    draw.text((4, top + r * cell + cell // 3), str(row_labels[r]), fill="black")
    for c in range(cols):
      v = (grid[r, c] - lo) / (hi - lo + 1e-12)
      color = (int(255 * v), int(80 + 100 * (1 - abs(v - 0.5) * 2)), int(255 * (1 - v)))
      box = (left + c * cell, top + r * cell, left + (c + 1) * cell - 1, top + (r + 1) * cell - 1)
      draw.rectangle(box, fill=color)
      draw.text((box[0] + 4, box[1] + cell // 3), f"{100 * grid[r, c]:.1f}", fill="white")
  for c in range(cols):
    draw.text((left + c * cell + 4, 6), f"t={col_labels[c]}", fill="black")
  save_png(path, np.asarray(img))
