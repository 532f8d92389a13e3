"""FID and Inception Score (SPEC §6) with pytorch-fid's InceptionV3 (models/inception.py).

Statistics are float64 on the host; the Fréchet distance uses a symmetric square root
(eigh of sqrt(S1)·S2·sqrt(S1)), stable where sqrtm(S1·S2) of a product is not.
"""
import functools

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from umd_jax.models.inception import Inception


class FidError(ValueError):
  """Missing or bad FID inputs: the message says what to supply."""


WEIGHTS_HELP = ("convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth once with "
                "`python tools/convert_inception_weights.py PTH OUT.npz` and pass "
                "--config.sample.inception_weights=OUT.npz")


def load_inception(path: str) -> Inception:
  if not path or not epath.Path(path).exists():
    raise FidError(f"sample.inception_weights={path!r} is not a file: {WEIGHTS_HELP}")
  with epath.Path(path).open("rb") as f:
    weights = dict(np.load(f))
  net = Inception(weights)
  try:  # every weight present, with the right shape
    jax.eval_shape(net, jax.ShapeDtypeStruct((1, 64, 64, 3), np.uint8))
  except (KeyError, ValueError) as e:
    raise FidError(f"{path}: {str(e).strip(chr(34) + chr(39))}; {WEIGHTS_HELP}") from None
  return net


@functools.partial(jax.jit)
def _forward(weights, images):
  return Inception(weights)(images)


def activations(net: Inception, images: np.ndarray, batch: int = 200, progress=True):
  """(pool (N, 2048), logits (N, 1008)) as float64 for uint8 images (N, H, W, C)."""
  pools, logits = [], []
  batch = min(batch, len(images))
  for i in tqdm(range(0, len(images), batch), desc="inception", disable=not progress):
    chunk = images[i:i + batch]
    padded = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:], chunk.dtype)])
    p, l = jax.device_get(_forward(net.weights, padded))
    pools.append(p[:len(chunk)])
    logits.append(l[:len(chunk)])
  return np.concatenate(pools).astype(np.float64), np.concatenate(logits).astype(np.float64)


def statistics(pool: np.ndarray):
  return pool.mean(axis=0), np.cov(pool, rowvar=False)


def _sqrt_psd(m):
  w, v = np.linalg.eigh((m + m.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½); tr((S1 S2)^½) = tr((√S1 S2 √S1)^½)."""
  mu1, mu2, sigma1, sigma2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
  root1 = _sqrt_psd(sigma1)
  eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  covmean_trace = np.sqrt(np.clip(eig, 0, None)).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * covmean_trace)


def inception_score(logits: np.ndarray, splits: int = 10):
  """exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` parts."""
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  scores = []
  for part in np.array_split(p, max(1, min(splits, len(p)))):
    py = part.mean(axis=0, keepdims=True)
    scores.append(np.exp(np.mean(np.sum(part * (np.log(part + 1e-12) - np.log(py + 1e-12)), axis=1))))
  return float(np.mean(scores)), float(np.std(scores))


def reference_statistics(config, net: Inception, workdir=None):
  """mu, sigma of data.eval_split (centre-cropped like the model's input); cached as .npz."""
  from umd_jax import data
  s, d = config.sample, config.data
  path = epath.Path(s.fid_reference) if s.fid_reference else (
      epath.Path(workdir or ".") / f"fid_reference_{d.name}_{d.eval_split}_{d.image_size}.npz")
  if path.exists():
    with path.open("rb") as f:
      ref = np.load(f)
      return ref["mu"], ref["sigma"]
  source = data.make_source(d, d.eval_split)
  prep = data.pipeline.EvalPreprocess(d.image_size)
  real = np.stack([np.round((prep.map(source[i])["image"] + 1) * 127.5).astype(np.uint8) for i in range(len(source))])
  mu, sigma = statistics(activations(net, real)[0])
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
      np.savez(f, mu=mu, sigma=sigma)
  return mu, sigma


def evaluate(config, samples: np.ndarray, workdir=None) -> dict:
  """FID against the reference statistics and Inception Score of uint8 samples."""
  net = load_inception(config.sample.inception_weights)
  pool, logits = activations(net, samples)
  mu, sigma = reference_statistics(config, net, workdir)
  is_mean, is_std = inception_score(logits)
  return {"fid": frechet_distance(*statistics(pool), mu, sigma), "inception_score": is_mean,
          "inception_score_std": is_std, "fid_samples": int(len(samples))}
