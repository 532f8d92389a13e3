"""SiT (Ma et al., arXiv 2401.08740; METHOD.md §13): flow matching with the linear interpolant and
velocity prediction on Peebles' DiT network, class-conditional on the SD-VAE latents of ImageNet
256 (32×32×4). Train it here, or convert the public SiT-XL/2 or REPA SiT-XL/2 once and sample or
probe it (nothing is downloaded; README, "SiT and REPA"):

  python main.py --config=configs/sit.py:B/2 --mode=pretrain --workdir=/path/to/sit_b \
      --config.vae.weights=vae.npz --config.data.latents=/path/to/latents
  python tools/convert_dit_weights.py SiT-XL-2-256.pt /path/to/sit_xl --kind sit
  python tools/convert_dit_weights.py last.pt /path/to/repa_xl --kind repa --config configs/sit.py:repa
  python main.py --config=configs/sit.py --mode=generate --workdir=/path/to/sit_xl \
      --config.vae.weights=vae.npz --config.sample.fid=True --config.sample.inception_weights=inception_fid.npz \
      --config.sample.fid_reference=VIRTUAL_imagenet256_labeled.npz
  python main.py --config=configs/sit.py:repa --mode=probe --workdir=/path/to/repa_xl \
      --config.vae.weights=vae.npz --config.data.data_dir=/path/to/tensorflow_datasets

Argument: a variant (default `XL/2`), and/or `repa`: REPA's SiT-XL/2 (REPA's time, 1 = noise; no
learned sigma; block 8, the block REPA aligns, as the probe's and the classifier's cut).
Training (SiT's train.py): AdamW at 1e-4, no weight decay, β (0.9, 0.999), no warm-up or
clipping, batch 256, EMA decay 0.9999, labels dropped 10% of the time. Sampling defaults: SiT's
SDE (Euler-Maruyama, 250 grid points, diffusion w_t = 1 - t, last step 0.04), guidance 1.5 on 3
of the 4 latent channels (SiT's forward_with_cfg), 50,000 samples.
"""
from configs import common
from configs.latent_umd_l import latent


def get_config(arg=None):
  parts = common.config_args(arg, ("repa",))
  c = common.base_config("sit")
  c.model.variant = next((p for p in parts if "/" in p), "XL/2")
  c.model.num_classes = 1000
  c.model.scan_layers = True                 # 28 blocks: scanned, the compile stays short
  latent(c)
  c.batch_size = 256                         # SiT's train.py
  c.total_steps = 400 * common.IMAGENET_TRAIN_IMAGES // c.batch_size   # 400 epochs (chosen; SiT-XL/2: 7M steps)
  c.optim.base_lr = 1e-4                     # peak = base_lr · batch / 256 = 1e-4 at batch 256
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.warmup_fraction = 0.0
  c.optim.grad_clip = 0.0
  c.optim.ema_rate = 1e-4                    # EMA decay 0.9999
  c.corruption.label_dropout = 0.1           # SiT's class_dropout_prob
  c.sample.cfg_scale = 1.5
  c.sample.num_samples = 50_000
  c.probe.t = 121                            # DDAE's noise level (s = 1 - 121/1000 in SiT's time)
  c.probe.sweep_ts = (0, 41, 81, 121, 161, 241)
  if "repa" in parts:                        # REPA's released SiT-XL/2: its own time, 4 output channels
    c.sit.time = "repa"
    c.dit.learn_sigma = False
    c.dit.cfg_channels = 4                   # REPA's samplers guide every channel
    c.probe.block = c.classify.block = 7     # after block 8 (1-based), the block REPA aligns to DINOv2
  return common.finalize(c)
