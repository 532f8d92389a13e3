"""MAE-B/4 baseline on ImageNet 64 px: every image takes the clean step, 75% masked, and the
(constant, index 0) timestep condition is an in-context token instead of adaLN (SPEC §1 table).

  python main.py --config=configs/mae_b.py --mode=pretrain --workdir=/path/to/workdir \
      --config.data.data_dir=/path/to/tensorflow_datasets
"""
from configs import common


def get_config(arg=None):
  c = common.base_config("mae")
  c.model.variant = arg or "B/4"
  return common.finalize(c)
