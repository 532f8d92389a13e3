"""FID and Inception Score (METHOD.md §6) with pytorch-fid's InceptionV3 (models/inception.py).

Activations, their mean and covariance (float32, mean removed before the product, highest
matmul precision) and the Inception Score are computed on the devices with the rows sharded
over the batch, so no host holds every sample; the Fréchet distance is float64 on the host and
uses a symmetric square root (eigh of sqrt(S1)·S2·sqrt(S1)), stable where sqrtm(S1·S2) is not.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from umd_jax import data, files, multihost, sharding
from umd_jax.images import to_uint8_device
from umd_jax.models.inception import Inception


class FidError(ValueError):
  """Missing or bad FID inputs: the message says what to supply."""


WEIGHTS_HELP = ("convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth once with "
                "`python tools/convert_inception_weights.py PTH OUT.npz` and pass "
                "--config.sample.inception_weights=OUT.npz")


def load_inception(path: str) -> Inception:
  if not path or not epath.Path(path).exists():
    raise FidError(f"sample.inception_weights={path!r} is not a file: {WEIGHTS_HELP}")
  try:
    with epath.Path(path).open("rb") as f:
      weights = dict(np.load(f, allow_pickle=False))  # a .pth or any pickle is refused, never run
  except Exception as e:  # noqa: BLE001 - not an .npz: numpy's own message would suggest allow_pickle
    raise FidError(f"sample.inception_weights={path!r} is not an .npz of arrays ({type(e).__name__}): "
                   f"{WEIGHTS_HELP}") from None
  net = Inception(weights)
  try:  # every weight present, with the right shape
    jax.eval_shape(net, jax.ShapeDtypeStruct((1, 64, 64, 3), np.uint8))
  except (KeyError, ValueError) as e:
    raise FidError(f"{path}: {str(e).strip(chr(34) + chr(39))}; {WEIGHTS_HELP}") from None
  return net


@jax.jit
def _forward(weights, images):
  return Inception(weights)(images)


def _rows(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(sharding.BATCH_AXES))


def activations(net: Inception, images, mesh, batch: int = 50, progress=True):
  """(pool (N, 2048), logits (N, 1008)) float32 of uint8 images (N, H, W, C), a host array or a
  global one with rows sharded over the batch; the results stay on the devices, rows sharded.
  N must be a multiple of the mesh's data shards (pad it). `batch` images per call: 50 keeps the
  299 px activations near 3 GB on a CPU host (200 took 11 GB; the suite's peak memory)."""
  shards = sharding.num_data_shards(mesh)
  if not isinstance(images, jax.Array):
    images = multihost.global_array(images, _rows(mesh))
  weights = {k: multihost.global_array(w, sharding.replicated(mesh)) for k, w in net.weights.items()}
  forward = jax.jit(_forward, out_shardings=(_rows(mesh), _rows(mesh)))
  batch = -(-min(batch, len(images)) // shards) * shards
  pools, logits = [], []
  for i in tqdm(range(0, len(images), batch), desc="inception", disable=not progress or not multihost.is_main()):
    p, l = forward(weights, images[i:i + batch])
    pools.append(p)
    logits.append(l)
  return sharding.concatenate(pools, _rows(mesh)), sharding.concatenate(logits, _rows(mesh))


@jax.jit
def _moments(pool, n):
  """Mean and covariance (divisor n - 1) of the first n rows, centred before the product."""
  real = (jnp.arange(pool.shape[0]) < n)[:, None]
  mu = jnp.sum(jnp.where(real, pool, 0.0), axis=0) / n
  centred = jnp.where(real, pool - mu, 0.0)
  return mu, jnp.matmul(centred.T, centred, precision=jax.lax.Precision.HIGHEST) / (n - 1)


def statistics(pool, n: int | None = None):
  """mu, sigma (float64, on every host) of the first n rows of pool (all by default), computed
  where pool lives (sharded on device) in float32 with the mean removed first."""
  n = len(pool) if n is None else n
  mu, sigma = multihost.to_host(_moments(jnp.asarray(pool, jnp.float32) if not isinstance(pool, jax.Array)
                                         else pool, n))
  return mu.astype(np.float64), sigma.astype(np.float64)


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


@functools.partial(jax.jit, static_argnames=("splits",))
def _inception_score_parts(logits, part, splits):
  """exp(E KL(p(y|x) || p(y))) within each part; rows whose part is `splits` (padding) count nowhere."""
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=1)
  member = jax.nn.one_hot(part, splits)  # (N, splits); padding rows are all zero
  count = member.sum(axis=0)
  py = jnp.matmul(member.T, p, precision=jax.lax.Precision.HIGHEST) / count[:, None]
  py_row = jnp.take(py, jnp.minimum(part, splits - 1), axis=0)
  kl = jnp.sum(p * (jnp.log(p + 1e-12) - jnp.log(py_row + 1e-12)), axis=1)
  return jnp.exp(jnp.sum(member * kl[:, None], axis=0) / count)


def inception_score(logits, splits: int = 10, n: int | None = None):
  """Inception Score of the first n rows (all by default): mean and std over `splits` consecutive
  parts (numpy.array_split's), computed where the logits live."""
  n = len(logits) if n is None else n
  splits = max(1, min(splits, n))
  part = np.full(len(logits), splits, np.int32)
  for i, rows in enumerate(np.array_split(np.arange(n), splits)):
    part[rows] = i
  scores = multihost.to_host(_inception_score_parts(logits, part, splits)).astype(np.float64)
  return float(np.mean(scores)), float(np.std(scores))


def reference_statistics(config, net: Inception, mesh, workdir=None):
  """mu, sigma of data.eval_split (centre-cropped like the model's input); cached as .npz by
  process 0 and read back only where every process sees the file."""
  s, d = config.sample, config.data
  split = re.sub(r"[^\w.-]", "_", d.eval_split)  # 'test[:40]' -> 'test__40_'
  path = epath.Path(s.fid_reference) if s.fid_reference else (
      epath.Path(workdir or ".") / f"fid_reference_{d.name}_{split}_{d.image_size}.npz")
  if multihost.all_processes(path.exists()):
    with path.open("rb") as f:
      ref = np.load(f)
      return ref["mu"], ref["sigma"]
  source = data.make_source(d, d.eval_split, labelled=False)  # images only
  shards = sharding.num_data_shards(mesh)
  batch = -(-min(200, len(source)) // shards) * shards
  batches = data.make_batches(d, source, global_batch=batch, sharding=_rows(mesh), seed=0, train=False)
  to_uint8 = jax.jit(to_uint8_device, out_shardings=_rows(mesh))
  real = sharding.concatenate([to_uint8(next(batches)["image"]) for _ in range(-(-len(source) // batch))],
                              _rows(mesh))
  mu, sigma = statistics(activations(net, real, mesh)[0], len(source))
  files.on_main(lambda: files.write_npz(path, mu=mu, sigma=sigma))
  return mu, sigma


def evaluate(config, samples, n: int, mesh, workdir=None) -> dict:
  """FID against the reference statistics and Inception Score of the first n uint8 samples
  (N, H, W, C; a global array with rows sharded over the batch, or a host array)."""
  net = load_inception(config.sample.inception_weights)
  pool, logits = activations(net, samples, mesh)
  mu, sigma = reference_statistics(config, net, mesh, workdir)
  is_mean, is_std = inception_score(logits, n=n)
  return {"fid": frechet_distance(*statistics(pool, n), mu, sigma), "inception_score": is_mean,
          "inception_score_std": is_std, "fid_samples": int(n)}
