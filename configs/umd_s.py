"""UMD-S/4 pre-training on ImageNet at 64×64 pixels (SPEC §5 recipe, 800 epochs, batch 1024).

  python main.py --config=configs/umd_s.py --mode=pretrain --workdir=/path/to/workdir \
      --config.data.data_dir=/path/to/tensorflow_datasets

Argument: a variant string, e.g. `--config=configs/umd_s.py:S/8`. Choices where SPEC is silent:
mask token init N(0, 0.02); weight decay skips biases, LayerNorm scales, registers, mask token.
"""
from configs import common


def get_config(arg=None):
  c = common.base_config("umd")
  c.model.variant = arg or "S/4"
  return common.finalize(c)
