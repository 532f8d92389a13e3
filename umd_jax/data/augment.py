"""RandAugment and random erasing for recognition fine-tuning (METHOD.md §10), as MAE uses them:
timm's `rand-m9-mstd0.5-inc1` policy and `RandomErasing(0.25, mode="pixel")`.

Why not a library call: timm's and torchvision's implementations need PyTorch, and Keras 3's
`keras.layers.RandAugment` is another policy -- its `factor` is not RandAugment's magnitude (a
factor of 0.9 rotates by up to 0.9 of a full turn, where magnitude 9 rotates by up to 27°), it
applies its ops always, and it runs every one of its 11 ops per image to select two (22 ms per
224 px image on one core, against well under 1 ms here). So the image operations are PIL's
(ImageOps, ImageEnhance, affine transforms, what timm calls too) and this module holds only timm's
policy: the 15 ops of its "increasing" list, each applied with probability 0.5 at a magnitude
drawn from N(m, std) clipped to [0, 10], and timm's magnitude -> argument tables. Randomness comes
from the numpy Generator grain gives each record, so an augmented stream is the same on any
number of processes and after a resume.
"""
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

FILL = (124, 116, 104)  # ImageNet's mean colour (timm's img_mean) fills what affine ops uncover
LEVELS = 10.0           # magnitudes are on timm's 0..10 scale


def _negate_half(rng, v):
  return -v if rng.uniform() > 0.5 else v


def _affine(img, matrix):
  fill = FILL if img.mode == "RGB" else FILL[0]
  return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=fill)


def _solarize_add(img, add, thresh=128):
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  return img.point(lut * (3 if img.mode == "RGB" else 1))


def _enhance(kind):
  return lambda img, factor: kind(img).enhance(factor)


def _rotate(img, degrees):
  fill = FILL if img.mode == "RGB" else FILL[0]
  return img.rotate(degrees, resample=Image.BICUBIC, fillcolor=fill)


def _posterize(img, bits):
  return img if bits >= 8 else ImageOps.posterize(img, bits)


# name: (operation(img, *args), level(magnitude, rng) -> args); timm's "increasing" variants.
OPS = {
    "AutoContrast": (lambda img: ImageOps.autocontrast(img), lambda m, rng: ()),
    "Equalize": (lambda img: ImageOps.equalize(img), lambda m, rng: ()),
    "Invert": (lambda img: ImageOps.invert(img), lambda m, rng: ()),
    "Rotate": (_rotate, lambda m, rng: (_negate_half(rng, m / LEVELS * 30.0),)),
    "PosterizeIncreasing": (_posterize, lambda m, rng: (4 - int(m / LEVELS * 4),)),
    "SolarizeIncreasing": (ImageOps.solarize, lambda m, rng: (256 - min(256, int(m / LEVELS * 256)),)),
    "SolarizeAdd": (_solarize_add, lambda m, rng: (min(128, int(m / LEVELS * 110)),)),
    "ColorIncreasing": (_enhance(ImageEnhance.Color), None),
    "ContrastIncreasing": (_enhance(ImageEnhance.Contrast), None),
    "BrightnessIncreasing": (_enhance(ImageEnhance.Brightness), None),
    "SharpnessIncreasing": (_enhance(ImageEnhance.Sharpness), None),
    "ShearX": (lambda img, f: _affine(img, (1, f, 0, 0, 1, 0)), lambda m, rng: (_negate_half(rng, m / LEVELS * 0.3),)),
    "ShearY": (lambda img, f: _affine(img, (1, 0, 0, f, 1, 0)), lambda m, rng: (_negate_half(rng, m / LEVELS * 0.3),)),
    "TranslateXRel": (lambda img, pct: _affine(img, (1, 0, pct * img.size[0], 0, 1, 0)),
                      lambda m, rng: (_negate_half(rng, m / LEVELS * 0.45),)),
    "TranslateYRel": (lambda img, pct: _affine(img, (1, 0, 0, 0, 1, pct * img.size[1])),
                      lambda m, rng: (_negate_half(rng, m / LEVELS * 0.45),)),
}


def _enhance_level(m, rng):
  """timm's increasing enhancement: 1 ± 0.9·m/10, at least 0.1 (stronger with m either way)."""
  return (max(0.1, 1.0 + _negate_half(rng, m / LEVELS * 0.9)),)


def level_args(name: str, magnitude: float, rng) -> tuple:
  """The arguments op `name` takes at `magnitude` (0..10)."""
  level = OPS[name][1] or _enhance_level
  return level(magnitude, rng)


class RandAugment:
  """`ops` operations drawn with replacement from OPS; each applied with probability `prob` at a
  magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10] (timm's rand-m{magnitude}-mstd{std}-inc1)."""

  def __init__(self, ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5, prob: float = 0.5):
    self.ops, self.magnitude, self.magnitude_std, self.prob = ops, magnitude, magnitude_std, prob
    self.names = list(OPS)

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, C), C = 1 or 3 -> uint8 (H, W, C)."""
    gray = image.shape[-1] == 1
    img = Image.fromarray(image[..., 0] if gray else image)
    for name in rng.choice(self.names, self.ops, replace=True):
      if rng.uniform() > self.prob:
        continue
      m = self.magnitude
      if self.magnitude_std > 0:
        m = rng.normal(m, self.magnitude_std)
      m = max(0.0, min(float(m), LEVELS))
      img = OPS[name][0](img, *level_args(name, m, rng))
    out = np.asarray(img, np.uint8)
    return out[..., None] if gray else out


def random_erase(image: np.ndarray, rng: np.random.Generator, prob: float, area=(0.02, 1 / 3),
                 log_aspect=(math.log(0.3), math.log(1 / 0.3))) -> np.ndarray:
  """timm's RandomErasing(prob, mode="pixel", count 1) on a float (H, W, C) image in [-1, 1]: with
  probability `prob`, one box of area in `area` (share of the image) and aspect exp(U(log_aspect))
  is replaced by per-pixel standard normal noise (10 tries to fit a box, as timm)."""
  if rng.uniform() > prob:
    return image
  h, w, c = image.shape
  for _ in range(10):
    target = rng.uniform(*area) * h * w
    aspect = math.exp(rng.uniform(*log_aspect))
    bh, bw = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if bw < w and bh < h:
      top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
      image = image.copy()
      image[top:top + bh, left:left + bw] = rng.standard_normal((bh, bw, c)).astype(image.dtype)
      return image
  return image
