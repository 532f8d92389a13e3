"""Inpainting with any method, scored against the ground truth it has: the first
`sample.inpaint_images` images of data.eval_split, a mask per batch (`sample.inpaint`: random
patches, the centre box or a PNG), the unknown region filled by the method's own inpainter
(methods/: RePaint-style for the UMD family, the masked-patch denoiser for DiffMAE), then PSNR
and SSIM of the filled region, LPIPS of the whole image when sample.lpips_weights is set (as DiffMAE
scores inpainting; perceptual.py), FID / IS of the inpainted images when sample.fid is set, and a
PNG grid (masked input, mask, filled, original) of the first images.

Multi-host: images, masks and fills stay sharded on the devices; the scores are sums reduced on
device (padding rows weighted out), only scalars and the grid's rows reach the hosts.
"""
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image
from tqdm import tqdm

from umd_jax import corruption, data, diffusion, fid, files, geometry, images, methods, multihost, perceptual, sharding
from umd_jax.data import encoded
from umd_jax.models import lpips


class InpaintError(ValueError):
  """A bad inpainting request: the message says what to change."""


MASKS = ("random", "center", "future")  # or the path of a PNG mask


def inpaint_mask(config, kind: str, batch: int, key) -> np.ndarray:
  """(B, [T,] H, W, 1) float, 1 = known pixel. kind: 'random' (tokens), 'center' (a box; in every
  frame of a clip), 'future' (clips: the last sample.inpaint_ratio of the token frames, the first
  ones known -- future-frame prediction), or a PNG path (white = to fill; every frame alike)."""
  size = config.data.image_size
  grid = geometry.grid(config, methods.get(config).patch(config))
  frames = (config.data.frames,) if grid.clip else ()
  if kind == "center":
    m = np.ones((size, size, 1), np.float32)
    m[size // 4:size - size // 4, size // 4:size - size // 4] = 0
    return np.broadcast_to(m, (batch,) + frames + (size, size, 1)).copy()
  if kind == "random":
    m = corruption.random_mask(key, batch, grid.num_tokens, config.sample.inpaint_ratio)
    return 1.0 - np.asarray(grid.pixel_mask(np.asarray(m.mask)))
  if kind == "future":
    if not grid.clip:
      raise InpaintError("sample.inpaint='future' predicts the last frames of clips: use it with data.frames > 1")
    hidden = future_frames(grid.frames, config.sample.inpaint_ratio) * grid.tubelet
    m = np.ones((batch, config.data.frames, size, size, 1), np.float32)
    m[:, config.data.frames - hidden:] = 0
    return m
  path = epath.Path(kind)
  if not path.exists():
    raise InpaintError(f"sample.inpaint={kind!r}: use one of {MASKS} or the path of an existing PNG mask")
  with path.open("rb") as f, Image.open(f) as im:  # the data's decode: a 16-bit mask is scaled, not clipped
    gray = np.asarray(Image.fromarray(encoded.pixels(im, 1)[..., 0]).resize((size, size), Image.NEAREST))
  return np.broadcast_to((gray < 128).astype(np.float32)[..., None], (batch,) + frames + (size, size, 1)).copy()


def future_frames(token_frames: int, ratio: float) -> int:
  """Token frames 'future' hides: round(ratio · T'), at least 1 and at most T' - 1."""
  return min(max(int(round(ratio * token_frames)), 1), token_frames - 1)


def masked_patch_count(config, known: np.ndarray) -> int:
  """Tokens with an unknown pixel, the same in every image of `known` (B, [T,] H, W, 1)."""
  grid = geometry.grid(config, methods.get(config).patch(config))
  counts = grid.known_tokens(known).sum(axis=1).round().astype(int)
  if counts.min() != counts.max():
    raise InpaintError(f"sample.inpaint={config.sample.inpaint!r} masks {counts.min()}..{counts.max()} patches per "
                       "image: every image of a batch must mask as many")
  if counts[0] == 0:
    raise InpaintError(f"sample.inpaint={config.sample.inpaint!r} leaves nothing to fill: mask at least one patch")
  return int(counts[0])


def make_inpainter(config, graphdef, num_masked: int):
  """jit(params, images, known, labels, key) -> images with the unknown pixels filled by the method."""
  method, schedule = methods.get(config), diffusion.from_config(config)

  @jax.jit
  def inpaint(params, x, known, labels, key):
    return method.inpaint(config, schedule, lambda: nnx.merge(graphdef, params), x, known, labels, key, num_masked)
  return inpaint


# --- scores of the filled region ----------------------------------------------------------------

def _blur(x, sigma: float = 1.5, radius: int = 5):
  """Gaussian blur (σ 1.5, 11 taps as Wang et al.'s SSIM; fewer on images under 11 px), reflect-padded."""
  r = min(radius, x.shape[1] - 1, x.shape[2] - 1)
  taps = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
  taps = taps / taps.sum()
  x = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
  h, w = x.shape[1] - 2 * r, x.shape[2] - 2 * r
  x = sum(float(k) * x[:, i:i + h] for i, k in enumerate(taps))
  return sum(float(k) * x[:, :, i:i + w] for i, k in enumerate(taps))


def ssim_map(x, y, data_range: float = 2.0):
  """Per-pixel SSIM (B, H, W) of images in [-1, 1] (data range 2), averaged over channels."""
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mx, my = _blur(x), _blur(y)
  vx, vy, cxy = _blur(x * x) - mx * mx, _blur(y * y) - my * my, _blur(x * y) - mx * my
  s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  return s.mean(axis=-1)


def region_scores(filled, original, known, data_range: float = 2.0):
  """Per-image PSNR (dB) and SSIM over the filled region (known == 0) -> two (B,) arrays."""
  unknown = 1.0 - known[..., 0]
  area = jnp.maximum(unknown.sum(axis=(1, 2)), 1.0)
  mse = (jnp.square(filled - original).mean(axis=-1) * unknown).sum(axis=(1, 2)) / area
  psnr = 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-10))
  ssim = (ssim_map(filled, original, data_range) * unknown).sum(axis=(1, 2)) / area
  return psnr, ssim


def _score_sums(filled, original, known, index, lpips_net, n):
  """Sums over the real rows (index < n, not padding) of the per-image PSNR and SSIM of the filled
  region and, with an LPIPS network, the LPIPS of the whole image (as DiffMAE reports it). A clip
  is scored frame by frame: PSNR and SSIM of each frame's filled region averaged over the frames
  that have one, LPIPS over all frames; "psnr_frames" / "ssim_frames" / "scored_frames" (T,) keep
  the per-frame sums (future-frame prediction's curve)."""
  filled = jnp.clip(filled, -1, 1)
  real = (index < n).astype(jnp.float32)
  if filled.ndim == 5:  # clips: (B, T, ...) -> B·T frames
    b, t = filled.shape[:2]
    frames = lambda x: x.reshape((b * t,) + x.shape[2:])
    psnr, ssim = (v.reshape(b, t) for v in region_scores(frames(filled), frames(original), frames(known)))
    scored = (known[..., 0].min(axis=(2, 3)) < 1).astype(jnp.float32) * real[:, None]  # frames with a filled region
    sums = {"psnr": jnp.sum((psnr * scored).sum(axis=1) / jnp.maximum(scored.sum(axis=1), 1.0)),
            "ssim": jnp.sum((ssim * scored).sum(axis=1) / jnp.maximum(scored.sum(axis=1), 1.0)),
            "psnr_frames": (psnr * scored).sum(axis=0), "ssim_frames": (ssim * scored).sum(axis=0),
            "scored_frames": scored.sum(axis=0)}
    if lpips_net is not None:
      sums["lpips"] = jnp.sum(perceptual.distance(lpips_net, frames(filled), frames(original)).reshape(b, t).mean(axis=1)
                              * real)
    return sums
  psnr, ssim = region_scores(filled, original, known)
  sums = {"psnr": jnp.sum(psnr * real), "ssim": jnp.sum(ssim * real)}
  if lpips_net is not None:
    sums["lpips"] = jnp.sum(perceptual.distance(lpips_net, filled, original) * real)
  return sums


def evaluate(config, graphdef, params, mesh, outputs, workdir) -> dict:
  """Inpaint the eval images, score the filled region, write `inpaint.png` into `outputs` (a
  files.OutputSet the caller publishes); returns the scores and the settings they came from (the
  caller writes them with the mode's other results)."""
  s = config.sample
  source = data.make_source(config.data, config.data.eval_split)
  n = len(source) if not s.inpaint_images else min(s.inpaint_images, len(source))
  shards, bs = sharding.num_data_shards(mesh), sharding.batch_sharding(mesh)
  batch = max(shards, -(-min(s.batch_size, n) // shards) * shards)
  batches = data.make_batches(config.data, data.Head(source, n), global_batch=batch, sharding=bs,
                              seed=config.seed, train=False)
  inpainter, sums, grid_rows, filled_all = None, {}, None, []
  replicated = sharding.replicated(mesh)
  first_rows = jax.jit(lambda *a: tuple(x[:8] for x in a), out_shardings=replicated)
  lpips_net = perceptual.load(s.lpips_weights) if s.lpips_weights else None
  if lpips_net is not None:  # its weights replicated: every device scores its rows of the batch
    graph, weights = nnx.split(lpips_net)
    weights = jax.tree.map(lambda w: multihost.global_array(np.asarray(w), replicated), weights)
    score = lambda f, x, k, i, w: _score_sums(f, x, k, i, nnx.merge(graph, w), n=n)
  else:
    weights, score = None, lambda f, x, k, i, w: _score_sums(f, x, k, i, None, n=n)
  score_sums = jax.jit(score, out_shardings=replicated)
  for i in tqdm(range(-(-n // batch)), desc="inpainting", disable=not multihost.is_main()):
    b = next(batches)
    key = jax.random.fold_in(jax.random.PRNGKey(s.seed), i)
    known_host = inpaint_mask(config, s.inpaint, batch, key)
    if inpainter is None:
      inpainter = make_inpainter(config, graphdef, masked_patch_count(config, known_host))
    known = multihost.global_array(known_host, bs)
    labels = b["label"] if config.model.num_classes else multihost.global_array(np.zeros((batch,), np.int32), bs)
    filled = inpainter(params, b["image"], known, labels, key)
    part = score_sums(filled, b["image"], known, b["index"], weights)
    sums = {k: sums.get(k, 0.0) + v for k, v in part.items()}
    if grid_rows is None:
      grid_rows = multihost.to_host(first_rows(b["image"], known, filled))  # collective: every process
    if s.fid:
      filled_all.append(images.to_uint8_device(jnp.clip(filled, -1, 1), s.uint8))
  x, k, f = grid_rows
  rows = [x * k, 2 * np.broadcast_to(k, x.shape) - 1, np.clip(f, -1, 1), x]
  picture = images.grid(rows)
  def write():
    images.save_png(outputs.path("inpaint.png"), picture, upscale=max(1, 256 // picture.shape[1]))
    if x.ndim == 5:  # clips: the same rows animated, frame by frame
      frames = images.clip_grids(rows)
      files.write_bytes(outputs.path("inpaint.gif"), images.gif_bytes(frames, upscale=max(1, 256 // frames[0].shape[0])))
  files.on_main(write)
  per_frame = {k: np.asarray(sums.pop(k)) for k in ("psnr_frames", "ssim_frames", "scored_frames") if k in sums}
  scores = {"mask": s.inpaint, "images": int(n), **{k: float(v) / n for k, v in sums.items()},
            "method": config.method, "inpainter": methods.get(config).inpainter(config),
            "steps": methods.get(config).inpaint_steps(config),
            "sampler": s.sampler, "grid": str(outputs.final("inpaint.png"))}
  if s.inpaint in ("random", "future"):
    scores["ratio"] = s.inpaint_ratio
  if per_frame:  # clips: each frame's mean over the clips whose frame had a filled region (None: none had)
    counted = per_frame["scored_frames"]
    for key in ("psnr", "ssim"):
      scores[f"{key}_per_frame"] = [float(v / c) if c else None for v, c in zip(per_frame[f"{key}_frames"], counted)]
    scores["animation"] = str(outputs.final("inpaint.gif"))
  if lpips_net is not None:  # what the LPIPS was computed on
    size = max(lpips.MIN_SIZE[lpips_net.net], config.data.image_size)
    scores["lpips_net"], scores["lpips_size"] = lpips_net.net, size
  if s.fid:
    fid_scores = fid.evaluate(config, sharding.concatenate(filled_all, bs), n, mesh, workdir)
    scores.update(fid_scores)
  return scores
