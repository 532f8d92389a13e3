"""Latent DiT-L/2 from scratch: class-conditional on the SD-VAE latents of ImageNet 256, 400 epochs.

The paper's generative baseline for latent UMD-L/2 (METHOD.md §7: FID 4.31 against UMD's 3.96):
no clean step, no masking, labels (dropped 10% of the time) from the start, the fine-tuning
optimizer (batch 256, peak LR 1.5e-4 with warmup then cosine, β2 0.999, no weight decay, EMA).
Uses the latents `configs/latent_umd_l.py` encodes:

  python main.py --config=configs/latent_dit_l.py --mode=pretrain --workdir=/path/to/workdir \
      --config.vae.weights=vae.npz --config.data.latents=/path/to/latents \
      --config.data.data_dir=/path/to/tensorflow_datasets
  python main.py --config=configs/latent_dit_l.py --mode=generate --workdir=/path/to/workdir \
      --config.vae.weights=vae.npz --config.sample.fid=True --config.sample.inception_weights=inception_fid.npz \
      --config.sample.fid_reference=VIRTUAL_imagenet256_labeled.npz

Argument: a variant (`configs/latent_dit_l.py:B/2`).
"""
from configs import common
from configs.latent_umd_l import latent


def get_config(arg=None):
  c = common.base_config("dit")
  c.model.variant, _ = common.parse_arg(arg, "L/2", words=())
  common.finetune_recipe(c)                 # labels, β2 0.999, no weight decay, EMA, label dropout 0.1
  c.total_steps = 400 * common.IMAGENET_TRAIN_IMAGES // c.batch_size
  return common.finalize(latent(c))
