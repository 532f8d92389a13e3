"""MAE-ST-sized video pre-training (METHOD.md §15): ViT-L/16 on 16 frames of 224 px every 4th frame,
2 × 16 × 16 tubes (1,568 tokens a clip), for UMD, MAE or DiffMAE, on a folder of Kinetics videos.

  python main.py --config=configs/video_l.py:mae --mode=pretrain --workdir=/path/to/workdir \
      --config.data.data_dir=/path/to/kinetics400 --config.data.video_csv=/path/to/kinetics400/train.csv
  python main.py --config=configs/video_l.py:mae,classify --mode=classify --workdir=/path/to/cls \
      --config.init_from=/path/to/workdir --config.data.data_dir=/path/to/kinetics400 \
      --config.data.video_csv=/path/to/kinetics400/train.csv

The argument names the method (`umd` by default, `mae`, `diffmae`) and optionally `classify`
(action recognition fine-tuning, MAE's recipe for L from METHOD.md §10 on clips, 7 temporal views
averaged at test). data.data_dir holds the videos (ROOT/<class>/<video>, or Kinetics' download names
with data.video_csv, whose `split` column must name data.train_split / data.eval_split: pass each
split's CSV to the run that reads it, or use sub-folders train/ and validate/ of class folders).

Sources: 16 frames × stride 4, 224 px, 2×16×16 tubes and MAE's 90% mask ratio are MAE-ST's
("We observe that the optimal masking ratio is as high as 90% (vs. 75% on images)", its abstract);
its 800 epochs at batch 512 and 7 test views are recalled, not read; UMD's ratios on clips (0.9 clean,
0.45 noised: its image ratios' proportion) and DiffMAE's 90% are chosen.
"""
from configs import common

KINETICS_TRAIN_CLIPS = 240_000  # about; the exact count depends on the videos still downloadable
METHODS = ("umd", "mae", "diffmae")


def get_config(arg=None):
  parts = common.config_args(arg, (*METHODS, "classify"), variant=True)
  method = next((p for p in parts if p in METHODS), "umd")
  c = common.base_config(method)
  c.model.variant = next((p for p in parts if "/" in p), "L/16")
  c.model.scan_layers = True      # 24 blocks: scanned for compile time
  c.model.tubelet = 2
  c.data.name = "video_folder"
  c.data.frames = 16
  c.data.frame_stride = 4
  c.data.image_size = 224
  c.data.channels = 3
  c.data.num_classes = 400
  c.data.train_split = "train"
  c.data.eval_split = "validate"
  c.data.flip = True
  c.batch_size = 512
  c.total_steps = 800 * KINETICS_TRAIN_CLIPS // 512
  c.sample.num_samples = 0        # generation needs class-conditional fine-tuning first
  if method == "mae":
    c.corruption.clean_mask_ratio = 0.9
  elif method == "umd":
    c.corruption.clean_mask_ratio = 0.9
    c.corruption.noised_mask_ratio = 0.45
  elif method == "diffmae":
    c.diffmae.mask_ratio = 0.9
  if "classify" in parts:         # action recognition (METHOD.md §10 on clips)
    common.classify_recipe(c)
    c.batch_size = 512
    c.classify.randaugment_ops = 0  # image augmentation: not built for clips
    c.classify.erase_prob = 0.0
    c.classify.test_views = 7
    c.classify.eval_batch_size = 64
  return common.finalize(c)
