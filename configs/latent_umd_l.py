"""Latent UMD-L/2: ImageNet 256×256 through Stable Diffusion's VAE to 32×32×4 latents (METHOD.md §8).

Convert the VAE once, encode the training images once, then pre-train on the latents:

  python tools/convert_vae_weights.py /path/to/sd-vae-ft-ema vae.npz
  python main.py --config=configs/latent_umd_l.py --mode=encode --workdir=/path/to/latents \
      --config.vae.weights=vae.npz --config.data.data_dir=/path/to/tensorflow_datasets
  python main.py --config=configs/latent_umd_l.py --mode=pretrain --workdir=/path/to/workdir \
      --config.vae.weights=vae.npz --config.data.latents=/path/to/latents \
      --config.data.data_dir=/path/to/tensorflow_datasets

Class-conditional fine-tuning (50 epochs, batch 256), sampling and FID at 256 px:

  python main.py --config=configs/latent_umd_l.py:finetune --mode=finetune --workdir=/path/to/finetune \
      --config.init_from=/path/to/workdir --config.vae.weights=vae.npz --config.data.latents=/path/to/latents \
      --config.data.data_dir=/path/to/tensorflow_datasets
  python main.py --config=configs/latent_umd_l.py:finetune --mode=generate --workdir=/path/to/finetune \
      --config.vae.weights=vae.npz --config.sample.fid=True --config.sample.inception_weights=inception_fid.npz \
      --config.sample.fid_reference=VIRTUAL_imagenet256_labeled.npz

Probe (the probe images are encoded on the fly with the same VAE):

  python main.py --config=configs/latent_umd_l.py --mode=probe --workdir=/path/to/workdir \
      --config.vae.weights=vae.npz --config.data.data_dir=/path/to/tensorflow_datasets

Argument: a variant and/or `finetune` (`configs/latent_umd_l.py:B/2,finetune`). The official
recipe: linear β schedule 1e-4 → 0.02, T = 1000, no x0 clipping, batch 1024 for 800 epochs;
pre-encoded ADM centre crops with their mirror images stand in for the reference's on-the-fly
Inception crops (METHOD.md §8). The reference repository's sampling protocol is the default here (DDIM
η = 1, 125 steps, 10k samples for FID); ADM's is `--config.sample.steps=250
--config.sample.num_samples=50000 --config.sample.cfg_scale=1.5` (README, Latent diffusion).
"""
from configs import common


def latent(c):
  """The latent-space settings, applied last (over the fine-tuning recipe's crop range)."""
  c.data.space = "latents"
  c.data.image_size = 256                  # pixels; the model sees 32×32×4 latents
  c.data.crop_area_min = 1.0               # pre-encoded: the crop and flip are fixed at encoding
  c.data.flip = False
  c.diffusion.schedule = "linear"
  c.sample.clip = False                    # no x0 clipping in latent space
  c.sample.num_samples = 10_000
  c.model.scan_layers = True
  c.probe.linear_augment = False           # the on-line crop would run the VAE encoder every probe step
  c.classify.randaugment_ops = 0           # --mode=classify: pre-encoded latents have no pixels to augment
  c.classify.erase_prob = 0.0
  return c


def get_config(arg=None):
  c = common.base_config("umd")
  c.model.variant, finetune = common.parse_arg(arg, "L/2")
  if finetune:
    common.finetune_recipe(c)
  if common.wants_classify(arg):  # --mode=classify: METHOD.md §10 recognition fine-tuning
    common.classify_recipe(c)
  return common.finalize(latent(c))
