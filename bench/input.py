"""Input pipeline throughput: images/s the grain pipeline delivers, against what the train step consumes.

  python bench/input.py                       # demo config: digits, synthetic and a TFDS array_record source
  python bench/input.py --config=configs/umd_s.py:S/4 --set batch_size=32 --set data.image_size=32
  python bench/input.py --photos 2000         # ImageNet-like JPEGs only: reduced vs full decode, 64 and 256 px
  python bench/input.py --classify 500        # recognition fine-tuning's view against pre-training's, 64 and 224 px

The TFDS source is a small dataset of random images that the benchmark writes itself in
array_record format (in a temporary directory), read back through `tfds.data_source`.
`--photos N` writes N photo-like JPEGs (smooth content plus texture, quality 90, at ImageNet's
common sizes) to a temporary image folder and as a TFDS array_record dataset (the encoded bytes
stored as they are), and reads them through the real pipeline with the training crop (area
80-100%) at 64 and 256 px, with `data.decode_reduced` on and off, in one process without reader
threads (the per-core rate) and with one grain worker per core; it also reports the PSNR of the
reduced decode against the full one on the same crop boxes, and the decode alone: whole image,
and at 1/8 scale (DC coefficients only), which still entropy-decodes every coefficient of the
file and is therefore the least any libjpeg decode of these files can cost on this host.
"""
import io
import os
import tempfile
import time

from common import load_config, make_parser, report
from train_step import measure

import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from PIL import Image

from umd_jax import data, sharding
from umd_jax.data import encoded, pipeline

SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (400, 500), (500, 500), (480, 360))


def photo(h, w, seed):
  """Smooth, textured content: sums of random gratings plus fine noise (JPEG-compresses like a photo)."""
  rng = np.random.default_rng(seed)
  sh, sw = h // 4, w // 4  # the smooth part at 1/4 size, upsampled (bicubic): it has no fine detail
  y, x = np.mgrid[0:sh, 0:sw] / max(sh, sw)
  smooth = np.zeros((sh, sw, 3), np.float32)
  for _ in range(6):
    f, phase = rng.uniform(1, 12, 2), rng.uniform(0, 2 * np.pi, 3)
    smooth += rng.uniform(20, 50) * np.sin(2 * np.pi * (f[0] * x + f[1] * y)[..., None] + phase).astype(np.float32)
  smooth = np.asarray(Image.fromarray(np.clip(128 + smooth, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC))
  # texture at two scales (photographs have detail at every scale; ~110 KB like ImageNet's JPEGs)
  coarse = rng.normal(0, 14, (h // 2, w // 2, 3)).astype(np.float32)
  coarse = np.asarray(Image.fromarray(np.clip(128 + coarse, 0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR))
  texture = rng.normal(0, 10, (h, w, 3)).astype(np.float32) + coarse.astype(np.float32) - 128
  return np.clip(smooth + texture, 0, 255).astype(np.uint8)


def photo_jpegs(n):
  """n (jpeg bytes, label) pairs, deterministic, at ImageNet's common sizes, quality 90."""
  for i in range(n):
    w, h = SIZES[i % len(SIZES)]
    buffer = io.BytesIO()
    Image.fromarray(photo(h, w, i)).save(buffer, "JPEG", quality=90)
    yield buffer.getvalue(), i % 10


class BenchPhotos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Photo-like JPEGs of varied size, stored encoded as they are (no re-encoding)."""
  VERSION = tfds.core.Version("1.0.0")
  JPEGS = []

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, (jpeg, label) in enumerate(self.JPEGS):
      yield i, {"image": io.BytesIO(jpeg), "label": label}


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


def psnr_reduced_vs_full(folder_source, size, n=200):
  """PSNR (dB) of the reduced-scale decode against the full decode, same crop boxes (same draws)."""
  values = []
  for i in range(min(n, len(folder_source))):
    image = folder_source[i]["image"]
    full = encoded.EncodedImage(image.data, image.channels, reduced=False)
    a = pipeline.inception_crop(image, np.random.default_rng(i), (0.8, 1.0), size)
    b = pipeline.inception_crop(full, np.random.default_rng(i), (0.8, 1.0), size)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    values.append(np.inf if mse == 0 else 10 * np.log10(255.0 ** 2 / mse))
  return float(np.mean(values)), float(np.min(values))


def decode_alone(jpegs, n=300):
  """ms per image (one core) of libjpeg decoding alone: the whole image, and at 1/8 scale."""
  rows = []
  for name, scale in (("whole image", 1), ("1/8 scale (entropy-decoding floor)", 8)):
    start = time.perf_counter()
    for jpeg, _ in jpegs[:n]:
      with Image.open(io.BytesIO(jpeg)) as im:
        if scale > 1:
          im.draft("RGB", (im.size[0] // scale, im.size[1] // scale))
        im.load()
    rows.append({"decode": name, "ms_per_image": 1000 * (time.perf_counter() - start) / min(n, len(jpegs))})
  return rows


def photos(args):
  """The ImageNet-like JPEG rows (see the module docstring)."""
  rows = []
  cores = os.cpu_count() or 1
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    BenchPhotos.JPEGS = list(photo_jpegs(args.photos))
    for i, (jpeg, label) in enumerate(BenchPhotos.JPEGS):
      os.makedirs(f"{tmp}/folder/{label}", exist_ok=True)
      with open(f"{tmp}/folder/{label}/{i:05d}.jpg", "wb") as f:
        f.write(jpeg)
    BenchPhotos(data_dir=f"{tmp}/tfds").download_and_prepare(file_format="array_record")
    print(f"wrote {args.photos} JPEGs in {time.perf_counter() - start:.0f} s", flush=True)
    for size in (64, 256):
      for kind in ("folder", "tfds"):
        for reduced in (False, True):
          for workers in (0, cores):
            c = load_config(args.config, args.set + [f"data.image_size={size}", "data.channels=3",
                                                     "data.crop_area_min=0.8", "data.flip=True",
                                                     f"data.num_workers={workers}", "data.read_threads=0",
                                                     f"data.decode_reduced={reduced}", "batch_size=64"])
            if kind == "folder":
              c.data.name, c.data.data_dir = "folder", f"{tmp}/folder"
            else:
              c.data.name, c.data.data_dir = "bench_photos", f"{tmp}/tfds"
            source = data.make_source(c.data, "train")
            rate = pipeline_rate(c, source, batches=args.batches)
            rows.append({"source": kind, "size": size, "decode_reduced": reduced, "processes": max(workers, 1),
                         "images_per_s": rate, "images_per_s_per_core": rate / max(workers, 1),
                         "ms_per_image_per_core": 1000 * max(workers, 1) / rate})
    folder = data.make_source(_folder_config(args, tmp).data, "train")
    psnr = [dict(zip(("size", "psnr_mean_db", "psnr_min_db"), (size, *psnr_reduced_vs_full(folder, size))))
            for size in (64, 256)]
    floor = decode_alone(BenchPhotos.JPEGS)
  report("input_photos", rows, {"photos": args.photos, "cores": cores}, args.json)
  report("input_photos_psnr", psnr, {"reduced vs full decode, same crop boxes": True}, None)
  report("input_photos_decode", floor, {"libjpeg via PIL, one core": True}, None)


def classify_views(args, rounds=3):
  """Per-core images/s of recognition fine-tuning's training view (crop 8-100% + flip, RandAugment
  m9 and random erasing 0.25: data/augment.py) against pre-training's (crop 80-100% + flip), on the
  same photo-like JPEGs of an image folder, in-process without reader threads, timed in
  interleaved rounds (ratios are medians of per-round ratios)."""
  from umd_jax.data import augment
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    labels = set()
    for i, (jpeg, label) in enumerate(photo_jpegs(args.classify)):
      os.makedirs(f"{tmp}/folder/{label}", exist_ok=True)
      with open(f"{tmp}/folder/{label}/{i:05d}.jpg", "wb") as f:
        f.write(jpeg)
      labels.add(label)
    c = load_config(args.config, args.set + ["data.channels=3", f"data.num_classes={len(labels)}"])
    c.data.name, c.data.data_dir = "folder", f"{tmp}/folder"
    source = data.make_source(c.data, "train")
    for size in (64, 224):
      views = {"pretrain": pipeline.TrainAugment(size, (0.8, 1.0), True),
               "classify": pipeline.ClassifyAugment(size, (0.08, 1.0), True, augment.RandAugment(2, 9.0, 0.5), 0.25)}
      times = {k: [] for k in views}
      for r in range(rounds):
        for name, view in views.items():
          rng = np.random.default_rng(r)
          start = time.perf_counter()
          for i in range(len(source)):
            view.random_map(source[i], rng)
          times[name].append((time.perf_counter() - start) / len(source))
      ratio = float(np.median([a / b for a, b in zip(times["classify"], times["pretrain"])]))
      for name in views:
        ms = 1000 * float(np.median(times[name]))
        rows.append({"size": size, "view": name, "ms_per_image_per_core": ms, "images_per_s_per_core": 1000 / ms,
                     "time_vs_pretrain_view": ratio if name == "classify" else 1.0})
  report("input_classify", rows, {"images": args.classify, "rounds": rounds}, args.json)


def _folder_config(args, tmp):
  c = load_config(args.config, args.set + ["data.channels=3"])
  c.data.name, c.data.data_dir = "folder", f"{tmp}/folder"
  return c


def main():
  parser = make_parser(__doc__, "configs/demo.py")
  parser.add_argument("--photos", type=int, default=0, help="ImageNet-like JPEG rows with this many images")
  parser.add_argument("--batches", type=int, default=20, help="batches of 64 timed per JPEG row")
  parser.add_argument("--classify", type=int, default=0, help="rows of recognition fine-tuning's view on this many JPEGs")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain's worker processes (data.num_workers > 0) read absl flags
  if args.photos:
    return photos(args)
  if args.classify:
    return classify_views(args)
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
