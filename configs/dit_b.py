"""DiT-B/4 baseline on ImageNet 64 px: no clean step, no masking (METHOD.md §1 table), adaLN-Zero.

  python main.py --config=configs/dit_b.py --mode=pretrain --workdir=/path/to/workdir \
      --config.data.data_dir=/path/to/tensorflow_datasets

Class-conditional fine-tuning for generation (METHOD.md §5 recipe), then sampling:

  python main.py --config=configs/dit_b.py:finetune --mode=finetune --workdir=/path/to/finetune \
      --config.init_from=/path/to/workdir --config.data.data_dir=/path/to/tensorflow_datasets
  python main.py --config=configs/dit_b.py:finetune --mode=generate --workdir=/path/to/finetune

Probe the pre-trained model: python main.py --config=configs/dit_b.py --mode=probe --workdir=/path/to/workdir

Same network, loss and recipe as UMD; only the corruption differs. Probe it DDAE-style (METHOD.md §6).
"""
from configs import common


def get_config(arg=None):
  c = common.base_config("dit")
  c.model.variant, finetune = common.parse_arg(arg, "B/4")
  if finetune:
    common.finetune_recipe(c)
  if common.wants_classify(arg):  # --mode=classify: METHOD.md §10 recognition fine-tuning
    common.classify_recipe(c)
  return common.finalize(c)
