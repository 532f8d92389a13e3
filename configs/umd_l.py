"""UMD-L/4 pre-training on ImageNet at 64×64 pixels (METHOD.md §5 recipe, 800 epochs, batch 1024).

  python main.py --config=configs/umd_l.py --mode=pretrain --workdir=/path/to/workdir \
      --config.data.data_dir=/path/to/tensorflow_datasets

Class-conditional fine-tuning for generation (METHOD.md §5 recipe), then sampling:

  python main.py --config=configs/umd_l.py:finetune --mode=finetune --workdir=/path/to/finetune \
      --config.init_from=/path/to/workdir --config.data.data_dir=/path/to/tensorflow_datasets
  python main.py --config=configs/umd_l.py:finetune --mode=generate --workdir=/path/to/finetune

Probe the pre-trained model: python main.py --config=configs/umd_l.py --mode=probe --workdir=/path/to/workdir

Argument: a variant and/or `finetune`, e.g. `configs/umd_l.py:L/8` or `configs/umd_l.py:L/8,finetune`. Choices where METHOD.md is silent:
mask token init N(0, 0.02); weight decay skips biases, LayerNorm scales, registers, mask token.
Layers are scanned (`nnx.scan`) here for compile time; `--config.model.scan_layers=false` runs faster.
"""
from configs import common


def get_config(arg=None):
  c = common.base_config("umd")
  c.model.variant, finetune = common.parse_arg(arg, "L/4")
  c.model.scan_layers = True  # 24+ blocks: scanned layers keep the compile under a minute
  if finetune:
    common.finetune_recipe(c)
  if common.wants_classify(arg):  # --mode=classify: METHOD.md §10 recognition fine-tuning
    common.classify_recipe(c)
  return common.finalize(c)
