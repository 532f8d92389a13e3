"""Shared config defaults; each method adds its own keys and preset (umd_jax/methods: the registry).

Every `configs/*.py` builds on `base_config()` and returns it locked, so a typo in a key
(in a file or on the command line, `--config.batch_sise=8`) is an error, not a silent default.
"""
import ml_collections

from umd_jax import methods

IMAGENET_TRAIN_IMAGES = 1_281_167


def base_config(method: str = "") -> ml_collections.ConfigDict:
  """All keys a run may use, with the METHOD.md §5 ImageNet 64 px pre-training recipe as defaults,
  every registered method's own keys, and `method`'s preset ("": the registry's first, UMD)."""
  method = method or next(iter(methods.REGISTRY))
  registered = methods.named(method)
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 0
  c.batch_size = 1024                      # global, over all hosts and devices
  # >1: the batch as that many micro-batches per update (less memory, the same update); "auto": 1 on
  # TPU/GPU, on a CPU micro-batches of <= 8*256*384 patch tokens x width per device (train_step.py)
  c.grad_accum_steps = ml_collections.FieldReference("auto", field_type=object)
  c.total_steps = 800 * IMAGENET_TRAIN_IMAGES // 1024   # 800 epochs at batch 1024
  c.log_every = 100
  c.checkpoint_every = 5000
  c.image_every = 5000                     # masked / reconstruction / original PNG grid
  c.keep_checkpoints = 3
  c.profile = ml_collections.ConfigDict()
  c.profile.steps = 0                      # trace this many training steps with jax.profiler (0: off) into
  c.profile.first_step = 10                # WORKDIR/profile/process_<i>/ from this step (TensorBoard's profile tab)
  c.restore_fallback = True                # a damaged latest checkpoint: resume from the previous one
  c.nonfinite_policy = "stop"              # non-finite loss/gradient: "stop", or "skip" the update
  c.max_skips = 10                         # with "skip": stop once more updates than this were skipped
  c.init_from = ""                         # workdir to take weights from when starting fresh
                                           # (fine-tuning: the pre-training workdir)

  c.data = ml_collections.ConfigDict()
  c.data.name = "imagenet2012"             # a TFDS name, or "digits", "folder", "synthetic"
  c.data.data_dir = ""                     # TFDS data_dir, or the root of an image folder
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = 64
  c.data.channels = 3
  c.data.frames = 1                        # 1: images (B, H, W, C); > 1: clips of that many frames (B, T, H, W, C)
  c.data.frame_stride = 4                  # videos: a clip takes every 4th frame (MAE-ST: 16 frames x 4)
  c.data.video_csv = ""                    # data.name="video_folder": Kinetics' CSV labels the files (else sub-folders)
  c.data.num_classes = 1000
  c.data.crop_area_min = 0.8               # Inception crop area range (METHOD.md §5)
  c.data.crop_area_max = 1.0
  c.data.flip = True
  c.data.num_workers = 8                   # grain worker processes per host (0: in-process)
  c.data.read_threads = -1                 # grain reader threads per process; -1: 0 for in-memory sources
                                           # (digits, synthetic: threads only contend for the GIL), else 16
  c.data.synthetic_size = 10_000           # records of the synthetic source
  c.data.space = "pixels"                  # what the model sees: "pixels" | "latents" (VAE latents of the images)
  c.data.latents = ""                      # latent runs: the directory --mode=encode wrote (training data)
  c.data.decode_reduced = True             # JPEGs: decode only at the scale the crop needs (libjpeg 1/2..1/8)

  # Latent space (README, Latent diffusion): with data.space="latents" the model sees VAE latents ×
  # scaling factor, (data.image_size / vae.downsample)² × vae.latent_channels, not pixels.
  c.vae = ml_collections.ConfigDict()
  c.vae.weights = ""                       # .npz from tools/convert_vae_weights.py (latent runs)
  c.vae.latent_channels = 4                # must match the file (checked)
  c.vae.downsample = 8
  c.vae.batch_size = 32                    # images per VAE call: encoding (per process), decoding (global)

  c.encode = ml_collections.ConfigDict()   # --mode=encode: data.train_split -> VAE posterior moments
  c.encode.views = 2                       # 2: the image and its mirror image; 1: the image only
  c.encode.dtype = "float32"               # "float32" | "bfloat16" (half the storage)
  c.encode.shard_records = 10_000          # records per ArrayRecord shard (the unit of resumption)

  c.model = ml_collections.ConfigDict()
  c.model.variant = "B/4"
  c.model.num_registers = 4
  c.model.num_classes = 0                  # 0: self-supervised, no label embedding
  c.model.dtype = "auto"                   # compute dtype: auto = bfloat16 on TPU/GPU, float32 on CPU; params stay float32
  c.model.scan_layers = False              # unrolled layers step faster (BENCHMARKS.md); L scans (compile time)
  c.model.tubelet = 1                      # clips: frames per token (MAE-ST: 2); images: 1
  c.model.masking = "random"               # clips: "random" spacetime tokens (MAE-ST) | "tube": one spatial
                                           # mask for every token frame (VideoMAE); images: the same thing
  c.model.remat = "none"                   # "none" | "full" | "dots" | "matmuls" (layers.REMAT_POLICIES)
  c.model.attention = "auto"               # "auto" (cuDNN flash on GPU in bf16/fp16, else XLA) | "xla" | "cudnn"

  c.corruption = ml_collections.ConfigDict()  # the UMD family's corruption (its keys: methods/umd.py)
  c.corruption.loss_buckets = 10           # per-timestep-bucket loss in the logs

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "cosine"          # "cosine" (pixels) | "linear" (latents)
  c.diffusion.num_timesteps = 1000         # (DiffMAE: recalled)
  c.diffusion.noise_exponent = 1.0         # ρ (DiffMAE: 0.8), applied as diffusion.rho_form says
  c.diffusion.rho_form = "variance"        # "variance": 1 - abar_t -> (1 - abar_t)^ρ (DiffMAE: chosen);
                                           # "beta": beta_t -> beta_t^ρ (an unofficial re-implementation's reading)

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.5e-4                 # peak LR = base_lr * batch_size / 256
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  c.optim.warmup_fraction = 0.05
  c.optim.grad_clip = 1.0
  c.optim.ema_rate = 0.0                   # EMA step size; 0 disables the EMA copy

  c.probe_every = 0                        # few-shot probe during pre-training every N steps (0: off)

  # Probing a frozen backbone (METHOD.md §6): --mode=probe, and the in-training few-shot evaluator.
  c.probe = ml_collections.ConfigDict()
  c.probe.t = -1                           # -1: clean image, timestep index 0; else noise to t, tell t + 1
  c.probe.block = -1                       # -1: rep (mean of the registers); else a block index
                                           # (0 .. enc_depth-1 encoder, then decoder), mean-pooled
  c.probe.train_split = "train"
  c.probe.eval_split = "validation"
  c.probe.max_train_images = 0             # 0: the whole split (few-shot pools and cached features)
  c.probe.max_eval_images = 0
  c.probe.batch_size = 256                 # feature extraction batch (global)
  c.probe.noise_seed = 0                   # fixed noise for DDAE-style features
  c.probe.use_ema = True                   # probe the EMA weights when the checkpoint has them
  c.probe.fewshot_shots = (1, 5, 10, 25)
  c.probe.fewshot_seeds = 3
  c.probe.fewshot_l2 = 1024.0
  c.probe.linear = True
  c.probe.linear_epochs = 90
  c.probe.linear_warmup_epochs = 10
  c.probe.linear_batch_size = 16384        # MAE protocol: batch 16384, LR 0.1 * 16384 / 256
  c.probe.linear_base_lr = 0.1             # LR = base * batch / 256; LARS steps are relative to |w|,
                                           # so small datasets (few steps) need a larger base
  c.probe.linear_weight_decay = 0.0
  c.probe.linear_augment = True            # on-line crop + flip through the frozen backbone
  c.probe.linear_crop_area_min = 0.08
  c.probe.sweep = False                    # DDAE grid over (block, t)
  c.probe.sweep_ts = (0, 25, 50, 100, 200, 400)
  c.probe.sweep_shots = 10
  c.probe.baselines = False                # also probe raw pixels and a randomly initialised network

  # Sampling (--mode=generate) and FID / IS (METHOD.md §4, §6).
  c.sample = ml_collections.ConfigDict()
  c.sample.num_samples = 50_000            # for the .npz (and FID when sample.fid)
  c.sample.batch_size = 256
  c.sample.sampler = "ddim"                # "ddim" | "ddpm" (ancestral, all T steps)
  c.sample.steps = 125
  c.sample.eta = 1.0
  c.sample.prediction = "eps"              # head that drives the sampler: "eps" (reference evaluations) | "x0"
  c.sample.timesteps = "even"              # DDIM grid: "even" | "strided" (reference: T-1, T-1-T//steps, ..., then 0)
  c.sample.cfg_scale = 1.0                 # classifier-free guidance; 1: conditional only
  c.sample.clip = True                     # clip x0 predictions to [-1, 1] (pixels)
  c.sample.uint8 = "round"                 # samples -> uint8: "round" (unbiased) | "truncate" (ADM's scripts)
  c.sample.classes = ()                    # () = all classes, cycled
  c.sample.grid_classes = 10               # rows of samples/grid.png
  c.sample.grid_per_class = 8
  c.sample.seed = 0
  c.sample.use_ema = True
  c.sample.inpaint = ""                    # "" | "random" | "center" | "future" (clips: the last frames) | path
                                           # to a PNG mask (white = fill)
  c.sample.inpaint_ratio = 0.5             # share of tokens to fill with "random", of token frames with "future"
  c.sample.inpaint_resample = 1            # RePaint resampling passes per step (UMD family)
  c.sample.inpaint_images = 1000           # eval images inpainted and scored (PSNR / SSIM; 0: the whole split)
  c.sample.lpips_weights = ""              # .npz from tools/convert_lpips_weights.py: inpainting also scored in LPIPS
  c.sample.classifier_score = False        # score samples with a classifier fit on the real images
  c.sample.fid = False
  c.sample.inception_weights = ""          # local .npz of pytorch-fid InceptionV3 weights (see README)
  c.sample.fid_reference = ""              # .npz with mu/sigma; "" = computed from data.eval_split, cached
  c.fid_every = 0                          # FID during fine-tuning every N steps (0: off)
  c.fid_samples = 10_000

  # Recognition fine-tuning (--mode=classify, METHOD.md §10: MAE's recipe for B; `classify_recipe` sets L's).
  # Global keys it reads too: batch_size (1024), seed, init_from, log/checkpoint cadence, data.crop_area_*.
  c.classify = ml_collections.ConfigDict()
  c.classify.block = -1                    # -1: after the encoder's last block (MAE); k: DDAE's cut after block k
                                           # (numbered as probe.block: encoder, then decoder blocks)
  c.classify.t = -1                        # -1: the clean image (timestep index 0); t >= 0: noised to t, told
                                           # t + 1 (DDAE; methods whose network never saw index 0 preset 0)
  c.classify.init_ema = True               # start from init_from's EMA weights when it kept them
  c.classify.scratch = False               # True: no init_from, the network as initialised (the from-scratch baseline)
  c.classify.epochs = 100
  c.classify.warmup_epochs = 5
  c.classify.base_lr = 5e-4                # peak LR = base_lr * batch_size / 256
  c.classify.layer_decay = 0.65            # block i of N: LR × decay^(N-i); embeddings decay^(N+1); head 1
  c.classify.weight_decay = 0.05           # not on norms, biases, position tables, tokens
  c.classify.b1 = 0.9
  c.classify.b2 = 0.999
  c.classify.grad_clip = 0.0               # 0: none (MAE's fine-tuning does not clip)
  c.classify.drop_path = 0.1               # stochastic depth of the last block (linear from 0 at the first)
  c.classify.label_smoothing = 0.1
  c.classify.mixup_alpha = 0.8             # 0: no mixup
  c.classify.cutmix_alpha = 1.0            # 0: no cutmix
  c.classify.mix_switch_prob = 0.5         # with both: P(cutmix) per batch
  c.classify.randaugment_ops = 2           # RandAugment (timm's rand-m9-mstd0.5-inc1); 0: off
  c.classify.randaugment_magnitude = 9.0
  c.classify.randaugment_magnitude_std = 0.5
  c.classify.erase_prob = 0.25             # random erasing (per-pixel noise box); 0: off
  c.classify.ema_rate = 0.0                # EMA step of the weights (also evaluated); 0: none
  c.classify.eval_every_epochs = 5         # top-1 / top-5 on data.eval_split (and at the end)
  c.classify.eval_batch_size = 1024
  c.classify.test_views = 1                # videos: evaluation averages this many evenly spaced windows (MAE-ST: 7)
  c.classify.noise_seed = 0                # classify.t >= 0: the fixed per-image noise of evaluation

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                         # -1: all devices not used by fsdp
  c.mesh.fsdp = 1
  # Logical parameter axis -> mesh axis (None: replicated). Data lives on ("data", "fsdp").
  c.mesh.rules = (("embed", "fsdp"), ("mlp", None), ("heads", None), ("patch", None),
                  ("layers", None), ("seq", None), ("vocab", None))
  methods.add_all_keys(c)                  # every method's own section (diffmae.*, dit.*, the corruption)
  registered.configure(c)                  # and this method's preset
  return c


class ConfigArgError(ValueError):
  """An unknown word in a config argument (`--config=configs/demo.py:abc`)."""


def config_args(arg, words=(), variant: bool = True, steps: bool = False) -> list:
  """The comma-separated parts of a config argument, each one of `words`, a variant ('B/8', with
  `variant`) or a step count (with `steps`); anything else is refused rather than ignored."""
  parts = [p for p in (arg or "").split(",") if p]
  for p in parts:
    if not (p in words or variant and "/" in p or steps and p.isdigit()):
      forms = [repr(w) for w in words] + (["a variant such as 'B/8'"] if variant else []) + (
          ["a step count"] if steps else [])
      raise ConfigArgError(f"config argument {p!r} is not known: use {', '.join(forms) or 'none'} (comma-separated)")
  return parts


def parse_arg(arg, default_variant: str, words=("finetune", "classify")):
  """Config argument: a variant ("B/8"), "finetune", or both ("B/8,finetune"); "classify" is
  read by `wants_classify`. Other words are refused (ConfigArgError)."""
  parts = config_args(arg, words)
  finetune = "finetune" in parts
  variants = [p for p in parts if p not in words]
  return (variants[0] if variants else default_variant), finetune


def wants_classify(arg) -> bool:
  return "classify" in (arg or "").split(",")


def classify_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """METHOD.md §10 recognition fine-tuning of model.variant: MAE's recipe (B: base LR 5e-4, layer decay
  0.65, drop path 0.1, 100 epochs; L: 1e-3, 0.75, 0.2, 50 epochs), batch 1024, Inception crop
  8-100% + flip; the rest are the `classify.*` defaults. Run with --mode=classify."""
  large = c.model.variant.split("/")[0] == "L"
  c.batch_size = 1024
  c.classify.base_lr = 1e-3 if large else 5e-4
  c.classify.layer_decay = 0.75 if large else 0.65
  c.classify.drop_path = 0.2 if large else 0.1
  c.classify.epochs = 50 if large else 100
  c.data.crop_area_min = 0.08
  c.data.crop_area_max = 1.0
  c.data.flip = True
  c.checkpoint_every = 1000
  return c


def finetune_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """METHOD.md §5 class-conditional fine-tuning (for generation): from `init_from`'s weights, a new
  label embedding and optimizer; batch 256, LR 1.5e-4, β2 0.999, no weight decay, 2 warmup
  epochs of 50, crop area 95-100%, no noised masking, EMA step 1e-4·B/256, label dropout 0.1."""
  c.model.num_classes = c.data.num_classes
  c.batch_size = 256
  c.total_steps = 50 * IMAGENET_TRAIN_IMAGES // 256
  c.optim.base_lr = 1.5e-4                 # peak 1.5e-4 at batch 256
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.warmup_fraction = 2 / 50
  c.optim.ema_rate = 1e-4 * c.batch_size / 256
  c.data.crop_area_min = 0.95
  c.corruption.noised_mask_ratio = 0.0
  # a clean sub-batch of 5% for the methods that have one (UMD, MAE), none for those without (DiT, MaskDiT)
  c.corruption.clean_fraction = 0.05 if c.corruption.clean_fraction > 0 else 0.0
  c.corruption.label_dropout = 0.1
  return c


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.lock()
  return c
