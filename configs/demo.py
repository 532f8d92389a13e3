"""Demo: a tiny UMD (Ti/2) pre-trained on scikit-learn's bundled 8×8 handwritten digits.

  make demo          # pre-trains, then probes:
  python main.py --config=configs/demo.py --mode=pretrain --workdir=workdirs/demo
  python main.py --config=configs/demo.py --mode=probe --workdir=workdirs/demo

Runs on a 2-core CPU in a few minutes; no download. 8×8 images with 2×2 patches give 16
tokens: the clean step keeps 4 of them, the noised step 10. No crop or flip (digits are
small and not mirror-symmetric); a higher learning rate than the ImageNet recipe since
the run is short. Argument: a step count, e.g. `--config=configs/demo.py:200`.
"""
from configs import common


def get_config(arg=None):
  c = common.base_config("umd")
  c.batch_size = 128
  c.total_steps = int(arg) if arg else 2000
  c.log_every = 100
  c.checkpoint_every = 1000
  c.image_every = 1000
  c.data.name = "digits"
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.image_size = 8
  c.data.channels = 1
  c.data.num_classes = 10
  c.data.crop_area_min = 1.0
  c.data.flip = False
  c.data.num_workers = 0
  c.model.variant = "Ti/2"
  c.model.scan_layers = False
  c.optim.base_lr = 2e-3       # peak LR 1e-3 at batch 128
  c.probe_every = 500          # few-shot accuracy in the log and TensorBoard while training
  c.probe.train_split = "train"
  c.probe.eval_split = "test"
  c.probe.fewshot_shots = (1, 5, 10, 25, 100)
  c.probe.linear_epochs = 50
  c.probe.linear_warmup_epochs = 5
  c.probe.linear_batch_size = 256
  c.probe.linear_base_lr = 10.0   # 300 LARS steps instead of ImageNet's ~7,000 (see common.py)
  c.probe.linear_augment = False  # 8×8 digits: crops would cut strokes; probe the centre view
  c.probe.baselines = True        # raw pixels and a random network of the same shape
  return common.finalize(c)
