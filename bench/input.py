"""Input pipeline throughput: images/s the grain pipeline delivers, against what the train step consumes.

  python bench/input.py                       # demo config: digits, synthetic and a TFDS array_record source
  python bench/input.py --config=configs/umd_s.py:S/4 --set batch_size=32 --set data.image_size=32

The TFDS source is a small dataset of random images that the benchmark writes itself in
array_record format (in a temporary directory), read back through `tfds.data_source`.
"""
import tempfile
import time

from common import load_config, make_parser, report
from train_step import measure

import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from umd_jax import data, sharding
from umd_jax.data import pipeline


class BenchImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Random 32×32 RGB images with labels, written by the benchmark (no download)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(32, 32, 3)), "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(2048)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(0)
    for i in range(n):
      yield i, {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "label": i % 10}


def pipeline_rate(config, source, batches=50):
  mesh = sharding.make_mesh(config.mesh)
  it = data.make_batches(config.data, source, global_batch=config.batch_size,
                         sharding=sharding.batch_sharding(mesh), seed=0, train=True)
  next(it)  # start-up (workers, first decode) is not throughput
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * config.batch_size / (time.perf_counter() - start)


def main():
  parser = make_parser(__doc__, "configs/demo.py")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain's worker processes (data.num_workers > 0) read absl flags
  config = load_config(args.config, args.set)
  consumed = measure(config, repeats=10, xla_check=False)["images_per_s"]
  rows = []
  sources = [("synthetic", None)]
  if config.data.name not in ("synthetic",):
    sources.insert(0, (config.data.name, None))
  with tempfile.TemporaryDirectory() as tmp:
    builder = BenchImages(data_dir=tmp)
    builder.download_and_prepare(file_format="array_record")
    sources.append(("tfds array_record", tmp))
    for name, data_dir in sources:
      c = load_config(args.config, args.set)
      if name == "synthetic":
        c.data.name = "synthetic"
      elif data_dir:
        c.data.name, c.data.data_dir, c.data.channels = "bench_images", data_dir, c.data.channels
      source = data.make_source(c.data, c.data.train_split if name != "tfds array_record" else "train")
      rate = pipeline_rate(c, source)
      rows.append({"source": name, "read_threads": pipeline.read_threads(c.data, source),
                   "images_per_s": rate, "train_step_images_per_s": consumed,
                   "headroom": rate / consumed})
  report("input", rows, {"config": args.config, "workers": config.data.num_workers}, args.json)


if __name__ == "__main__":
  main()
