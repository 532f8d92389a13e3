"""Demo: a tiny UMD (Ti/2) pre-trained on scikit-learn's bundled 8×8 handwritten digits.

  make demo          # pre-trains, probes, fine-tunes class-conditionally, samples:
  python main.py --config=configs/demo.py --mode=pretrain --workdir=workdirs/demo
  python main.py --config=configs/demo.py --mode=probe --workdir=workdirs/demo

Runs on a 2-core CPU in a few minutes; no download. 8×8 images with 2×2 patches give 16
tokens: the clean step keeps 4 of them, the noised step 10. No crop or flip (digits are
small and not mirror-symmetric); a higher learning rate than the ImageNet recipe since
the run is short. Argument: a step count and/or "finetune", e.g. `configs/demo.py:200`.

`configs/demo.py:diffmae` is DiffMAE at the same scale (Ti/2 encoder, a 2-block cross-self
decoder of width 64): pre-train, probe, then inpaint the centre of the test digits, scored by
PSNR / SSIM of the filled region (ancestral DDPM over all 1000 steps):
  python main.py --config=configs/demo.py:diffmae --mode=pretrain --workdir=workdirs/demo_diffmae
  python main.py --config=configs/demo.py:diffmae --mode=generate --workdir=workdirs/demo_diffmae

`configs/demo.py:finetune` fine-tunes the pre-trained demo class-conditionally (800 steps,
labels dropped 10% of the time, EMA step 0.01) and samples 50 digits per class with DDIM
(50 steps, guidance 2), scored by a logistic regression trained on the real digits:
  python main.py --config=configs/demo.py:finetune --mode=finetune --workdir=workdirs/demo_finetune
  python main.py --config=configs/demo.py:finetune --mode=generate --workdir=workdirs/demo_finetune

`configs/demo.py:classify` fine-tunes the pre-trained demo into a digit classifier end to end
(--mode=classify; METHOD.md §10, MAE's recipe scaled to the digits: batch 128, 100 epochs of 11 steps,
layer decay 0.65, drop path 0.1, label smoothing 0.1, mixup / cutmix; no RandAugment or random
erasing: at 8×8 px a 45% translation or a 27° rotation leaves no digit), scored on the test digits:
  python main.py --config=configs/demo.py:classify --mode=classify --workdir=workdirs/demo_classify
`diffmae,classify` does the same from the DiffMAE demo (init_from workdirs/demo_diffmae).

`configs/demo.py:video` is the same at video scale (README, Video): UMD on moving digits -- clips of
8 frames of 16×16 in which a digit moves right, left, down or up (the label: direction, which no
single frame shows) -- cut into 2×4×4 tubes (64 tokens), masked as random spacetime tokens.
--mode=generate on it predicts the last 4 frames of test clips from the first 4 (scored per frame);
`video,finetune` fine-tunes class-conditionally and samples 50 clips per direction, scored by the
direction they move in; `video,classify` fine-tunes for the motion label. `video,mae` and
`video,diffmae` are those methods on the clips (workdirs/demo_video[_METHOD]). `make demo-video`:
  python main.py --config=configs/demo.py:video --mode=pretrain --workdir=workdirs/demo_video
  python main.py --config=configs/demo.py:video --mode=probe --workdir=workdirs/demo_video
  python main.py --config=configs/demo.py:video --mode=generate --workdir=workdirs/demo_video
  python main.py --config=configs/demo.py:video,finetune --mode=finetune --workdir=workdirs/demo_video_finetune
  python main.py --config=configs/demo.py:video,finetune --mode=generate --workdir=workdirs/demo_video_finetune
  python main.py --config=configs/demo.py:video,classify --mode=classify --workdir=workdirs/demo_video_classify

Any method that trains here is a first word with the same meaning: `configs/demo.py:maskdit`
pre-trains MaskDiT at the demo's scale (its preset; workdirs/demo_maskdit for `finetune` and
`classify`), as experiments/reproduce.py does for every method.
"""
from configs import common
from umd_jax import methods


def get_config(arg=None):
  names = methods.trainable()
  parts = common.config_args(arg, (*names, "finetune", "classify", "video"), variant=False, steps=True)
  c = common.base_config(next((p for p in parts if p in names), names[0]))
  video = "video" in parts
  home = ("workdirs/demo" + ("_video" if video else "")
          + ("" if c.method == names[0] else f"_{c.method}"))  # its pre-training workdir
  c.batch_size = 128
  finetune, classify = "finetune" in parts, "classify" in parts
  steps = next((int(p) for p in parts if p.isdigit()), None)
  c.total_steps = steps or 2000
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
  c.sample.num_samples = 500
  c.sample.batch_size = 250
  c.sample.steps = 50
  c.sample.cfg_scale = 2.0
  c.sample.grid_per_class = 10
  c.sample.classifier_score = True
  c.sample.prediction = "x0"      # BENCHMARKS.md: x0 head 92% classified with or without clipping; eps 91% clipped, 31% not
  if c.method == "diffmae":
    c.diffmae.decoder_width = 64  # the encoder's width (Ti); MAE's 512 would dwarf it
    c.diffmae.decoder_depth = 2
    c.diffmae.decoder_heads = 4
    c.sample.num_samples = 0      # it inpaints, unguided (no labels)
    c.sample.cfg_scale = 1.0
    c.sample.inpaint_images = 0   # the whole test split
  if video:                       # moving digits (README, Video)
    c.data.name = "moving_digits"
    c.data.frames = 8
    c.data.image_size = 16
    c.data.num_classes = 4        # right, left, down, up
    c.model.variant = "Ti/4"
    c.model.tubelet = 2           # MAE-ST's tubelet: 4 token frames of 4×4 -> 64 tokens
    c.batch_size = 64
    c.total_steps = steps or 1500
    c.checkpoint_every = c.image_every = 500
    c.probe_every = 500
    c.probe.fewshot_shots = (1, 5, 10, 25)
    c.probe.linear_batch_size = 512
    c.sample.num_samples = 0        # pre-trained (unconditional): --mode=generate predicts the future
    c.sample.cfg_scale = 1.0
    c.sample.inpaint = "future"     # the last 4 of 8 frames from the first 4, the first 200 test clips
    c.sample.inpaint_images = 200
    c.sample.prediction = "eps"     # pre-training trains the x0 head on masked tokens only (METHOD.md §2)
    c.sample.grid_classes = 4
    c.sample.grid_per_class = 4
    c.classify.eval_batch_size = 1188  # the 1,188 test clips (297 digits × 4 directions) in one batch
    if c.method == "diffmae":
      c.diffmae.decoder_width = 64  # divisible by 16: 3-D sin-cos positions
  if finetune:                    # class-conditional fine-tuning of the pre-trained demo model
    c.init_from = home
    c.model.num_classes = c.data.num_classes
    c.total_steps = steps or 800
    c.checkpoint_every = c.image_every = 400
    c.probe_every = 0
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.0
    c.optim.ema_rate = 0.01       # a short run: the ImageNet EMA step (1e-4) would barely move
    c.corruption.clean_fraction = 0.05 if c.corruption.clean_fraction > 0 else 0.0  # METHOD.md §5 (none: DiT, MaskDiT)
    c.corruption.noised_mask_ratio = 0.0
    c.corruption.label_dropout = 0.1
    if video:                     # samples: 50 clips per direction, scored by the direction they move in
      c.sample.num_samples, c.sample.cfg_scale, c.sample.inpaint, c.sample.prediction = 200, 2.0, "", "x0"
  if classify:                    # recognition fine-tuning of the pre-trained demo (--mode=classify)
    c.init_from = home
    c.probe_every = 0
    c.checkpoint_every = 500
    c.classify.epochs = steps or (10 if video else 100)  # clips: 94 steps an epoch at batch 64
    c.classify.eval_every_epochs = 5 if video else 25
    c.classify.warmup_epochs = 1 if video else 5
    c.classify.eval_batch_size = 320  # the 297 test digits in one batch
    c.classify.randaugment_ops = 0
    c.classify.erase_prob = 0.0
  return common.finalize(c)
