"""DiffMAE-B/16 pre-training on ImageNet at 224 px (Wei et al., arXiv 2304.03283; METHOD.md §9),
then inpainting and probing. The recipe is MAE's (that DiffMAE pre-trains with it: recalled from
the paper, its text not re-read; METHOD.md §9): batch 4096, AdamW
β (0.9, 0.95), base LR 1.5e-4 (peak 1.5e-4 · 4096/256), weight decay 0.05, 40 warm-up epochs of
1600, random-resized crop (area 20-100%) + flip, no per-patch pixel normalisation (the masked
patches' statistics are unknown while sampling).

  python main.py --config=configs/diffmae_b.py --mode=pretrain --workdir=/path/to/workdir \
      --config.data.data_dir=/path/to/tensorflow_datasets
  python main.py --config=configs/diffmae_b.py --mode=generate --workdir=/path/to/workdir   # centre inpainting, scored
  python main.py --config=configs/diffmae_b.py --mode=probe --workdir=/path/to/workdir

Argument: a variant (`configs/diffmae_b.py:L/16`) and/or `umd64`: the setting comparable with
configs/umd_b.py -- ImageNet 64 px, B/4, batch 1024, 800 epochs, 5% warm-up, crop 80-100% --
so only the method differs (`configs/diffmae_b.py:umd64`); and/or `classify`: MAE's recognition
fine-tuning recipe (METHOD.md §10) for --mode=classify from a pre-training workdir:

  python main.py --config=configs/diffmae_b.py:classify --mode=classify --workdir=/path/to/classify \
      --config.init_from=/path/to/workdir --config.data.data_dir=/path/to/tensorflow_datasets

Where each default comes from (METHOD.md §9's table): chosen (recalled from the paper, its text
not re-read) -- 75% of the patches masked; only they are noised, per image to t ~ U{0..999}; the
encoder sees the clean visible patches and no t; a cross-self decoder (self-attention among the
noisy masked tokens, cross-attention to the encoder) linked top-down to the encoder blocks; pixel
(x0) target; linear β schedule with the exponent ρ = 0.8; ancestral DDPM over all 1000 steps to
inpaint. From MAE's reference code (facebookresearch/mae): decoder width 512, depth 8, 16 heads;
one class token (rep). Chosen: t enters the decoder by adaLN-Zero; with a shallower decoder,
decoder block i reads encoder block E-1-floor(i·E/D) (evenly spaced from the top); ρ acts as
1 - abar_t -> (1 - abar_t)^ρ (diffusion.rho_form); MAE's fixed sin-cos positions.
"""
from configs import common

COMPARABLE = "umd64"  # the argument for the setting comparable with configs/umd_b.py (experiments/reproduce.py)


def get_config(arg=None):
  c = common.base_config("diffmae")
  parts = common.config_args(arg, ("umd64", "classify"))
  comparable = "umd64" in parts
  variants = [p for p in parts if p not in ("umd64", "classify")]
  c.model.variant = variants[0] if variants else ("B/4" if comparable else "B/16")
  if not comparable:  # MAE's ImageNet recipe at 224 px (recalled as DiffMAE's)
    c.data.image_size = 224
    c.batch_size = 4096
    c.total_steps = 1600 * common.IMAGENET_TRAIN_IMAGES // 4096
    c.optim.warmup_fraction = 40 / 1600
    c.data.crop_area_min = 0.2
  if common.wants_classify(arg):  # --mode=classify: METHOD.md §10 recognition fine-tuning (ImageNet top-1)
    common.classify_recipe(c)
  return common.finalize(c)
