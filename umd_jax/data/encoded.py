"""JPEGs kept encoded until the pipeline knows which region it needs, then decoded at reduced scale.

An ImageNet photo is ~500×375 pixels and the recipe crops 80–100% of it down to 64×64: a full
decode computes ~30× more pixels than are kept. libjpeg can decode at 1/2, 1/4 or 1/8 of the
size almost for free (it skips the inverse DCT's high frequencies), so the region is decoded at
the coarsest such scale that still leaves it at least 1.5 × `size` pixels on each side (PIL's
`draft`), then resized as before. The crop box is drawn on the original geometry (read from
the header), so the augmentation draws are exactly those of the full decode; only the
resampling differs (PSNR against the full decode: BENCHMARKS.md).
"""
import io
import math

import numpy as np
from PIL import Image


# The region is decoded at >= 1.5x the output size, then resized: close to the full decode's pixels
# for about the speed of the coarsest possible scale (the PSNR of both choices: BENCHMARKS.md).
MARGIN = 1.5


class DecodeError(ValueError):
  """The encoded image cannot be read; `EncodedImage.fallback` gives the record that replaces it."""


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """(H, W) or (H, W, c) uint8 -> (H, W, channels): grey repeated to RGB, RGB to luma."""
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == channels:
    return image
  if channels == 3 and image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  if channels == 1 and image.shape[-1] >= 3:
    return np.round(image[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
  raise ValueError(f"images have {image.shape[-1]} channels; data.channels={channels} cannot be made from them")


HIGH_DEPTH = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535}


def pixels(im: Image.Image, channels: int) -> np.ndarray:
  """A PIL image -> (H, W, channels) uint8: the one decode of every image path (training crops at
  every reduction, evaluation, folders, TFDS records, inpainting masks). 16-bit greys (PIL's
  "I;16*" and "I" modes: 16-bit PNGs) are scaled to 8 bits, value / 257, not clipped (PIL's own
  convert("L") clips them to white), float images ("F") are taken as [0, 1]; palette, CMYK and
  alpha modes go through PIL's conversion to L or RGB (alpha dropped)."""
  if im.mode in HIGH_DEPTH or im.mode == "F":
    values = np.asarray(im, np.float64)
    scale = 255.0 if im.mode == "F" else 255.0 / HIGH_DEPTH[im.mode]
    return to_channels(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), channels)
  return to_channels(np.asarray(im.convert("L" if channels == 1 else "RGB")), channels)



class EncodedImage:
  """JPEG bytes plus how to replace the record if they turn out not to decode.

  `shape` is (H, W, channels) from the header; `full()` decodes everything; `region(box, size)`
  gives box (left, top, right, bottom, original pixels) resized to size×size."""

  def __init__(self, data: bytes, channels: int, name: str = "", fallback=None, reduced: bool = True):
    self.data, self.channels, self.name, self.fallback, self.reduced = data, channels, name, fallback, reduced
    self._size, self._header = None, None

  def _open(self) -> Image.Image:
    """The opened (header-parsed, not decoded) image; the one `shape` parsed is used once more."""
    im, self._header = self._header, None
    if im is not None:
      return im
    try:
      return Image.open(io.BytesIO(self.data))
    except Exception as e:  # noqa: BLE001 - any unreadable header
      raise DecodeError(f"{self.name}: {type(e).__name__}: {e}") from None

  @property
  def shape(self):
    if self._size is None:  # the header is parsed once: the decode that follows reuses it
      self._header = self._open()
      self._size = self._header.size
    w, h = self._size
    return (h, w, self.channels)

  def full(self) -> np.ndarray:
    try:
      with self._open() as im:
        return pixels(im, self.channels)
    except DecodeError:
      raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
      raise DecodeError(f"{self.name}: {type(e).__name__}: {e}") from None

  def region(self, box, size: int) -> np.ndarray:
    left, top, right, bottom = box
    try:
      with self._open() as im:
        width, height = im.size
        spare = min(right - left, bottom - top) / (size * MARGIN)  # how many times larger than needed
        if not self.reduced or spare < 2 or im.format != "JPEG":  # no reduced decode: the full-decode path
          crop = pixels(im, self.channels)[top:bottom, left:right]
          return _resize(crop, size)
        # The coarsest 1/2^k scale keeping the region >= MARGIN·size on each side (draft never goes below).
        im.draft("L" if self.channels == 1 else "RGB", (math.ceil(width / spare), math.ceil(height / spare)))
        sx, sy = im.size[0] / width, im.size[1] / height
        decoded = pixels(im, self.channels)  # the one conversion of every path (CMYK, grey, ...)
        out = np.asarray(Image.fromarray(decoded[..., 0] if self.channels == 1 else decoded).resize(
            (size, size), Image.BILINEAR, box=(left * sx, top * sy, right * sx, bottom * sy)))
        return to_channels(out, self.channels)
    except DecodeError:
      raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
      raise DecodeError(f"{self.name}: {type(e).__name__}: {e}") from None


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  if image.shape[0] == size and image.shape[1] == size:
    return image
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((size, size), Image.BILINEAR))
  return out[..., None] if squeeze else out


def crop_resize(image, box, size: int) -> np.ndarray:
  """box (left, top, right, bottom) of an array or an EncodedImage, resized to size×size."""
  if isinstance(image, EncodedImage):
    return image.region(box, size)
  left, top, right, bottom = box
  return _resize(image[top:bottom, left:right], size)
