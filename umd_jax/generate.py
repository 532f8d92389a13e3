"""--mode=generate: class-conditional samples (PNG grid, ADM-style .npz), inpainting, FID / IS.

Sampling is one compiled `lax.scan` per batch (diffusion.py), sharded over the batch, using the
EMA weights when the checkpoint has them. Deterministic for a given `sample.seed`, on any number
of devices and processes. Samples stay on the devices (rows sharded over the batch) for FID;
they are gathered to the hosts only for what is written or scored on the host.
"""
import json

import jax
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from umd_jax import checks, corruption, data, diffusion, fid, files, images, latent, multihost, sharding, weights
from umd_jax.models import umd


class SampleError(ValueError):
  """A bad sampling request: the message says what to change."""


def classes_to_sample(config) -> list:
  """sample.classes, or every class of the model (None for an unconditional one). The settings
  themselves are validated by checks.py before sampling starts."""
  s, k = config.sample, config.model.num_classes
  return list(s.classes) if s.classes else (list(range(k)) if k else [None])


def _denoiser(config, graphdef, params, labels):
  def apply(x, t, y):
    # Merged where it is called (inside the sampling scan): newer Flax refuses a module built at
    # an outer trace level inside the model's own nnx.scan.
    out = nnx.merge(graphdef, params)(x, t, y)
    return out["x0"], out["eps"]
  if config.model.num_classes == 0:
    return lambda x, t: apply(x, t + 1, None)
  return diffusion.guided(apply, labels, config.model.num_classes, config.sample.cfg_scale)


def make_sampler(config, graphdef, mesh):
  """jit(params, labels (B,), key) -> uint8 images (B, H, W, C) (sample.uint8's convention), or
  for latent models the model-space latents (decoded by `sample_many`), rows sharded over the
  batch. Build it once and reuse it: every new sampler compiles anew."""
  s = config.sample
  size, channels = umd.input_shape(config)
  latent_space = config.data.space == "latents"
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  bs = sharding.batch_sharding(mesh)

  def sample(params, labels, key):
    k_noise, k_sample = jax.random.split(key)
    noise = jax.random.normal(k_noise, (labels.shape[0], size, size, channels))
    noise = jax.lax.with_sharding_constraint(noise, bs)
    denoise = _denoiser(config, graphdef, params, labels)
    if s.sampler == "ddpm":
      x = diffusion.ddpm_sample(denoise, schedule, noise, k_sample, clip=s.clip, prediction=s.prediction)
    else:
      x = diffusion.ddim_sample(denoise, schedule, noise, k_sample, steps=s.steps, eta=s.eta, clip=s.clip,
                                prediction=s.prediction, grid=s.timesteps)
    return x if latent_space else images.to_uint8_device(x, s.uint8)  # latents are decoded in chunks

  return jax.jit(sample, out_shardings=bs)


def sample_many(config, sampler, params, mesh, labels: np.ndarray, seed: int, progress=True, vae=None) -> jax.Array:
  """uint8 samples (N_pad, H, W, C) for every label, in batches of sample.batch_size, rows sharded
  over the batch; row i is the sample of labels[i], rows from len(labels) on are padding.
  `sampler`: `make_sampler`'s; latent models decode with `vae`."""
  shards = sharding.num_data_shards(mesh)
  batch = max(shards, -(-min(config.sample.batch_size, len(labels)) // shards) * shards)
  if vae is not None:  # decoded `decode_rows` rows at a time: the batch is a multiple of it
    decode_rows = max(shards, min(config.vae.batch_size, batch) // shards * shards)
    batch = -(-batch // decode_rows) * decode_rows
  bs, out = sharding.batch_sharding(mesh), []
  steps = -(-len(labels) // batch)
  for i in tqdm(range(steps), desc="sampling", disable=not progress or not multihost.is_main()):
    chunk = labels[i * batch:(i + 1) * batch]
    padded = np.concatenate([chunk, np.zeros(batch - len(chunk), np.int32)])
    x = sampler(params, multihost.global_array(padded, bs), jax.random.fold_in(jax.random.PRNGKey(seed), i))
    out.append(x if vae is None else vae.decode_uint8(x, decode_rows, config.sample.uint8))
  return sharding.concatenate(out, bs)


def inpaint_mask(config, kind: str, batch: int, key) -> np.ndarray:
  """(B, H, W, 1) float, 1 = known pixel. kind: 'random' (patches), 'center' (a box), or a PNG path
  (white = to fill)."""
  size = config.data.image_size
  if kind == "center":
    m = np.ones((size, size, 1), np.float32)
    m[size // 4:size - size // 4, size // 4:size - size // 4] = 0
    return np.broadcast_to(m, (batch, size, size, 1)).copy()
  if kind == "random":
    m = corruption.random_mask(key, batch, umd.num_patches(config), config.sample.inpaint_ratio)
    return 1.0 - np.asarray(corruption.pixel_mask(m.mask, size, size))
  path = epath.Path(kind)
  if not path.exists():
    raise SampleError(f"sample.inpaint={kind!r}: use 'random', 'center' or the path of an existing PNG mask")
  with path.open("rb") as f:
    gray = np.asarray(Image.open(f).convert("L").resize((size, size), Image.NEAREST))
  return np.broadcast_to((gray < 128).astype(np.float32)[..., None], (batch, size, size, 1)).copy()


def make_inpainter(config, graphdef):
  s = config.sample
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)

  @jax.jit
  def inpaint(params, x, known, labels, key):
    k_noise, k_sample = jax.random.split(key)
    return diffusion.inpaint_sample(_denoiser(config, graphdef, params, labels), schedule, x, known,
                                    jax.random.normal(k_noise, x.shape), k_sample, steps=s.steps, eta=s.eta,
                                    clip=s.clip, resample=s.inpaint_resample, prediction=s.prediction,
                                    grid=s.timesteps)
  return inpaint


def run(config, workdir, devices=None) -> dict:
  """Writes samples/grid.png, samples/samples_<N>x<H>x<W>x<C>.npz (arr_0 uint8 images, arr_1
  labels), samples/inpaint.png when sample.inpaint is set, and FID / IS when sample.fid."""
  s = config.sample
  checks.check(config, "generate")  # settings and input files, before anything is sampled or written
  classes = classes_to_sample(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  graphdef, params = weights.load(config, workdir, mesh, prefer_ema=s.use_ema)
  vae = latent.load(config, mesh) if config.data.space == "latents" else None
  sampler = make_sampler(config, graphdef, mesh)
  out_dir = epath.Path(workdir) / "samples"
  is_main = multihost.is_main()
  as_label = lambda c: 0 if c is None else c
  labels = np.array([as_label(classes[i % len(classes)]) for i in range(s.num_samples)], np.int32)
  result = {"num_samples": int(s.num_samples), "steps": s.steps, "sampler": s.sampler, "eta": s.eta,
            "cfg_scale": s.cfg_scale, "seed": s.seed, "prediction": s.prediction, "timesteps": s.timesteps,
            "clip": s.clip, "uint8": s.uint8}
  shown = classes[:s.grid_classes]
  grid_labels = np.repeat(np.array([as_label(c) for c in shown], np.int32), s.grid_per_class)
  grid = multihost.to_host(sample_many(config, sampler, params, mesh, grid_labels, s.seed + 1, progress=False, vae=vae))
  rows = [grid[i * s.grid_per_class:(i + 1) * s.grid_per_class].astype(np.float32) / 127.5 - 1 for i in range(len(shown))]
  samples = sample_many(config, sampler, params, mesh, labels, s.seed, vae=vae) if s.num_samples else None
  # gathered for the .npz and the host-side classifier (collective: every process takes part)
  host_samples = multihost.to_host(samples)[:len(labels)] if samples is not None else None
  if is_main:
    out_dir.mkdir(parents=True, exist_ok=True)
    picture = images.grid(rows)
    images.save_png(out_dir / "grid.png", picture, upscale=max(1, 512 // picture.shape[1]))
    if samples is not None:
      name = "samples_{}x{}x{}x{}.npz".format(*host_samples.shape)
      files.write_npz(out_dir / name, arr_0=host_samples, arr_1=labels)
      result["npz"] = str(out_dir / name)
  if s.inpaint:
    result["inpaint"] = _inpaint_grid(config, graphdef, params, mesh, out_dir, is_main)
  if s.classifier_score and samples is not None:
    result.update(classifier_score(config, host_samples, labels))
  if s.fid:
    result.update(fid.evaluate(config, samples, len(labels), mesh, workdir))
  if is_main:
    files.write_text(out_dir / "result.json", json.dumps(result, indent=2))
  return result


def classifier_score(config, samples: np.ndarray, labels: np.ndarray) -> dict:
  """A generation score that needs no downloaded weights: a logistic regression trained on the
  real training images classifies the samples; accuracy per class and overall."""
  clf = LogisticRegression(max_iter=2000).fit(*_pixels(config, config.data.train_split))
  predicted = clf.predict(samples.reshape(len(samples), -1).astype(np.float32) / 127.5 - 1)
  per_class = {int(c): float(np.mean(predicted[labels == c] == c)) for c in np.unique(labels)}
  return {"classifier_accuracy": float(np.mean(predicted == labels)), "classifier_accuracy_per_class": per_class,
          "classifier_accuracy_on_real_test": float(clf.score(*_pixels(config, config.data.eval_split)))}


def _pixels(config, split):
  """Every image of a split, centre-cropped and flattened to [-1, 1] pixels, and its labels."""
  source, prep = data.make_source(config.data, split), data.pipeline.EvalPreprocess(config.data.image_size)
  real = [prep.map(source[i]) for i in range(len(source))]
  return np.stack([r["image"].reshape(-1) for r in real]), np.array([r["label"] for r in real])


class FidEval:
  """FID / IS of `config.fid_samples` samples of given weights (fine-tuning's periodic
  evaluation, every `config.fid_every` steps): the sampler is compiled once, when this is built."""

  def __init__(self, config, graphdef, mesh, workdir, vae=None):
    self.config, self.mesh, self.workdir, self.vae = config, mesh, workdir, vae
    self.sampler = make_sampler(config, graphdef, mesh)
    classes = classes_to_sample(config)
    self.labels = np.array([0 if classes[i % len(classes)] is None else classes[i % len(classes)]
                            for i in range(config.fid_samples)], np.int32)

  def __call__(self, params) -> dict:
    samples = sample_many(self.config, self.sampler, params, self.mesh, self.labels, self.config.sample.seed,
                          progress=False, vae=self.vae)
    return fid.evaluate(self.config, samples, len(self.labels), self.mesh, self.workdir)


def _inpaint_grid(config, graphdef, params, mesh, out_dir, is_main) -> str:
  s = config.sample
  n = max(8, -(-8 // sharding.num_data_shards(mesh)) * sharding.num_data_shards(mesh))
  split = config.data.eval_split
  batch = next(data.make_batches(config.data, data.make_source(config.data, split), global_batch=n,
                                 sharding=sharding.batch_sharding(mesh), seed=config.seed, train=False))
  bs = sharding.batch_sharding(mesh)
  known = multihost.global_array(inpaint_mask(config, s.inpaint, n, jax.random.PRNGKey(s.seed)), bs)
  labels = batch["label"] if config.model.num_classes else multihost.global_array(np.zeros((n,), np.int32), bs)
  filled = make_inpainter(config, graphdef)(params, batch["image"], known, labels, jax.random.PRNGKey(s.seed))
  x, k, f = multihost.to_host((batch["image"], known, filled))
  picture = images.grid([x * k, 2 * np.broadcast_to(k, x.shape) - 1, f, x])
  path = out_dir / "inpaint.png"
  if is_main:
    out_dir.mkdir(parents=True, exist_ok=True)
    images.save_png(path, picture, upscale=max(1, 256 // picture.shape[1]))
  return str(path)
