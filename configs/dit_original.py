"""The public DiT-XL/2 (Peebles & Xie; METHOD.md §11) on ImageNet 256 px through the SD VAE (32×32×4
latents): convert the checkpoint once, then probe it DDAE-style, sample it as DiT does, or
fine-tune it for recognition. Nothing is downloaded; fetch the files once yourself (README,
"Public DiT weights"):

  python tools/convert_dit_weights.py /path/to/DiT-XL-2-256 /path/to/dit_xl   # diffusers folder, or DiT-XL-2-256x256.pt
  python main.py --config=configs/dit_original.py --mode=probe --workdir=/path/to/dit_xl \
      --config.vae.weights=vae.npz --config.data.data_dir=/path/to/tensorflow_datasets
  python main.py --config=configs/dit_original.py --mode=generate --workdir=/path/to/dit_xl \
      --config.vae.weights=vae.npz --config.sample.fid=True --config.sample.inception_weights=inception_fid.npz \
      --config.sample.fid_reference=VIRTUAL_imagenet256_labeled.npz

Argument: a variant (`configs/dit_original.py:L/2`) and/or `ddae_cifar10` / `ddae_tiny`: DDAE's
protocol on those datasets -- the images resized to 256 px and encoded with the VAE, the tokens
of block 13 at t = 121 (CIFAR-10) or t = 81 (Tiny-ImageNet) mean-pooled with the null label, a
linear probe. Sampling defaults are DiT's FID-50k protocol: ancestral DDPM with the learned
variance over 250 respaced steps, guidance 1.5 on 3 of the 4 latent channels, 50,000 samples.
"""
from configs import common
from configs.latent_umd_l import latent


def get_config(arg=None):
  parts = common.config_args(arg, ("ddae_cifar10", "ddae_tiny"))
  c = common.base_config("dit_original")
  c.model.variant = next((p for p in parts if "/" in p), "XL/2")
  c.model.num_classes = 1000
  c.model.scan_layers = True                 # 28 blocks: scanned, the compile stays short
  latent(c)
  c.sample.sampler = "ddpm"                  # DiT's sample.py: learned-variance DDPM, 250 respaced steps
  c.sample.steps = 250
  c.sample.cfg_scale = 1.5
  c.sample.num_samples = 50_000
  c.sample.prediction = "eps"
  c.probe.block, c.probe.t = 13, 121         # DDAE's cell for the public DiT-XL/2
  c.probe.sweep_ts = (0, 41, 81, 121, 161, 241)
  c.classify.block, c.classify.t = 13, 121   # --mode=classify: the same cut, fine-tuned (DDAE's fine-tuning)
  if "ddae_cifar10" in parts or "ddae_tiny" in parts:
    cifar = "ddae_cifar10" in parts
    c.data.name = "cifar10" if cifar else "folder"  # Tiny-ImageNet: an image folder (data.data_dir)
    c.data.num_classes = 10 if cifar else 200
    c.data.eval_split = "test" if cifar else "validation"
    c.probe.t = 121 if cifar else 81
    c.probe.fewshot_shots = (1, 5, 10, 100)
  return common.finalize(c)
