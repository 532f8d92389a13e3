"""--mode=generate: class-conditional samples (PNG grid, ADM-style .npz), FID / IS, and inpainting
scored against the ground truth (inpainting.py) -- with a method that does not generate
(DiffMAE), inpainting only.

Sampling is one compiled `lax.scan` per batch (diffusion.py), sharded over the batch, using the
EMA weights when the checkpoint has them. Deterministic for a given `sample.seed`, on any number
of devices and processes. Samples stay on the devices (rows sharded over the batch) for FID;
they are gathered to the hosts only for what is written or scored on the host.
"""
import json

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from tqdm import tqdm

from umd_jax import checks, data, diffusion, fid, files, images, geometry, inpainting, latent, methods, multihost, sharding, weights


class SampleError(ValueError):
  """A bad sampling request: the message says what to change."""


def classes_to_sample(config) -> list:
  """sample.classes, or every class of the model (None for an unconditional one). The settings
  themselves are validated by checks.py before sampling starts."""
  s, k = config.sample, config.model.num_classes
  return list(s.classes) if s.classes else (list(range(k)) if k else [None])


def make_sampler(config, graphdef, mesh):
  """jit(params, labels (B,), key) -> uint8 images (B, H, W, C) or clips (B, T, H, W, C)
  (sample.uint8's convention), or for latent models the model-space latents (decoded by
  `sample_many`), rows sharded over the batch. Build it once and reuse it: every new sampler
  compiles anew."""
  s = config.sample
  shape = geometry.sample_shape(config)
  latent_space = config.data.space == "latents"
  schedule, method = diffusion.from_config(config), methods.get(config)
  bs = sharding.batch_sharding(mesh)

  def sample(params, labels, key):
    k_noise, k_sample = jax.random.split(key)
    noise = jax.random.normal(k_noise, (labels.shape[0],) + shape)
    noise = jax.lax.with_sharding_constraint(noise, bs)
    x = method.sample(config, schedule, lambda: nnx.merge(graphdef, params), labels, noise, k_sample)
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


def run(config, workdir, devices=None) -> dict:
  """Writes samples/grid.png, samples/samples_<N>x<H>x<W>x<C>.npz (arr_0 uint8 images, arr_1
  labels) and FID / IS when sample.fid (methods that generate), samples/inpaint.png and the
  inpainting scores when sample.inpaint is set, and samples/result.json with every setting."""
  s = config.sample
  checks.check(config, "generate")  # settings and input files, before anything is sampled or written
  mesh = sharding.make_mesh(config.mesh, devices)
  graphdef, params, step = weights.load_with_step(config, workdir, mesh, prefer_ema=s.use_ema)  # the step read
  result = {"method": config.method, "step": step, "num_samples": int(s.num_samples),
            "steps": s.steps, "sampler": s.sampler, "eta": s.eta, "cfg_scale": s.cfg_scale, "seed": s.seed,
            "prediction": s.prediction, "timesteps": s.timesteps, "clip": s.clip, "uint8": s.uint8}
  with files.OutputSet(epath.Path(workdir) / "samples") as outputs:  # published together, at the end
    if isinstance(methods.get(config), methods.Sampler):
      result.update(_samples(config, graphdef, params, mesh, outputs, workdir))
    if s.inpaint:
      result["inpaint"] = inpainting.evaluate(config, graphdef, params, mesh, outputs, workdir)
    result["config"] = json.loads(config.to_json_best_effort())
    files.on_main(lambda: files.write_text(outputs.path("result.json"), json.dumps(result, indent=2)))
    outputs.publish()
  return result


def _samples(config, graphdef, params, mesh, outputs, workdir) -> dict:
  """Class-conditional samples: the grid, the .npz, the classifier score and FID / IS."""
  s = config.sample
  classes = classes_to_sample(config)
  vae = latent.load(config, mesh) if config.data.space == "latents" else None
  sampler = make_sampler(config, graphdef, mesh)
  as_label = lambda c: 0 if c is None else c
  labels = np.array([as_label(classes[i % len(classes)]) for i in range(s.num_samples)], np.int32)
  result = {}
  shown = classes[:s.grid_classes]
  grid_labels = np.repeat(np.array([as_label(c) for c in shown], np.int32), s.grid_per_class)
  grid = multihost.to_host(sample_many(config, sampler, params, mesh, grid_labels, s.seed + 1, progress=False, vae=vae))
  rows = [grid[i * s.grid_per_class:(i + 1) * s.grid_per_class].astype(np.float32) / 127.5 - 1 for i in range(len(shown))]
  samples = sample_many(config, sampler, params, mesh, labels, s.seed, vae=vae) if s.num_samples else None
  # gathered for the .npz and the host-side classifier (collective: every process takes part)
  host_samples = multihost.to_host(samples)[:len(labels)] if samples is not None else None
  if samples is not None:
    result["npz"] = str(outputs.final("samples_{}.npz".format("x".join(map(str, host_samples.shape)))))

  def write():
    picture = images.grid(rows)
    images.save_png(outputs.path("grid.png"), picture, upscale=max(1, 512 // picture.shape[1]))
    if grid.ndim == 5:  # clips: the grid animated, frame by frame
      frames = images.clip_grids(rows)
      files.write_bytes(outputs.path("grid.gif"), images.gif_bytes(frames, upscale=max(1, 256 // frames[0].shape[0])))
    if samples is not None:
      files.write_npz(outputs.path(epath.Path(result["npz"]).name), arr_0=host_samples, arr_1=labels)
  files.on_main(write)
  if s.classifier_score and samples is not None:
    if config.model.num_classes:
      result.update(classifier_score(config, host_samples, labels))
    else:  # no class was asked for: an accuracy per class would score labels nobody gave
      logging.warning("sample.classifier_score: not computed: the model is unconditional (model.num_classes=0), "
                      "so its samples have no class to be right about")
  if s.fid and samples is not None:  # else (checked) only the inpainted images are scored
    result.update(fid.evaluate(config, samples, len(labels), mesh, workdir))
  return result


def classifier_score(config, samples: np.ndarray, labels: np.ndarray) -> dict:
  """A generation score that needs no downloaded weights: a logistic regression trained on the
  real training images classifies the samples; accuracy per class and overall. A source that can
  read a record's label off its pixels (`judge`: moving digits' direction of motion) is its own
  classifier: no regression is fitted ("classifier": which one scored)."""
  source = data.make_source(config.data, config.data.eval_split)
  if hasattr(source, "judge") and config.data.frames > 1:
    predicted, real = source.judge(samples), _pixels(config, config.data.eval_split, uint8=True)
    on_real, name = float(np.mean(source.judge(real[0]) == real[1])), source.judge_name
  else:
    from sklearn.linear_model import LogisticRegression  # here: scikit-learn's import is ~1.3 s, for digits runs only
    clf = LogisticRegression(max_iter=2000).fit(*_pixels(config, config.data.train_split))
    predicted = clf.predict(samples.reshape(len(samples), -1).astype(np.float32) / 127.5 - 1)
    on_real, name = float(clf.score(*_pixels(config, config.data.eval_split))), "logistic regression on real pixels"
  per_class = {int(c): float(np.mean(predicted[labels == c] == c)) for c in np.unique(labels)}
  return {"classifier_accuracy": float(np.mean(predicted == labels)), "classifier_accuracy_per_class": per_class,
          "classifier_accuracy_on_real_test": on_real, "classifier": name}


def _pixels(config, split, uint8: bool = False):
  """Every image of a split, centre-cropped and flattened to [-1, 1] pixels (with `uint8`: kept
  as uint8 images or clips, unflattened), and its labels."""
  source, prep = data.make_source(config.data, split), data.pipeline.EvalPreprocess(config.data.image_size)
  real = [prep.map(source[i]) for i in range(len(source))]
  if uint8:
    return images.to_uint8(np.stack([r["image"] for r in real])), np.array([r["label"] for r in real])
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
