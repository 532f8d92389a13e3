"""Every setting a mode reads, checked before any work starts (nothing compiled, nothing written).

`check(config, mode)` raises `ConfigError` with one line that names the key, its value and what
to use instead. Keys that may take any value (`seed`, `sample.cfg_scale`, `sample.seed`,
`probe.noise_seed`, split names, `init_from`) are not listed here; the README says so.
"""
import jax
from etils import epath
from PIL import Image

from configs import common
from umd_jax import corruption, data, diffusion, fid, geometry, images, inpainting, latent, methods, perceptual, rules
from umd_jax.methods import interface
from umd_jax.modes import MODES
from umd_jax.models import layers
from umd_jax.rules import ConfigError  # noqa: F401 (the error every check raises)

_require, _int, _fraction = rules.require, rules.integer, rules.fraction


# Modes whose shared code reads clips (data.frames > 1): all but --mode=encode (the SD VAE's latents
# are of images). FID (Inception on images) is refused for clips.
CLIP_MODES = ("pretrain", "finetune", "probe", "generate", "summary", "classify")


def _clips(config, method, mode: str) -> None:
  """Frames, tubelet and masking; a clip config needs a method and mode that read clips, and a
  source of clips (and an image config a source of images)."""
  d, m = config.data, config.model
  _int(config, "data.frames", 1, "must be >= 1 (1: images; more: clips of that many frames)")
  _int(config, "model.tubelet", 1, "must be >= 1 (frames per token)")
  _require(d.frames % m.tubelet == 0, "model.tubelet", m.tubelet,
           f"does not divide data.frames={d.frames}: use a tubelet that does"
           + (" (images: 1)" if d.frames == 1 else ""))
  _require(m.masking in corruption.MASKINGS, "model.masking", m.masking, f"use one of {corruption.MASKINGS}")
  clips = d.frames > 1
  _require(not (d.name in data.CLIP_SOURCES and not clips), "data.frames", d.frames,
           f"data.name={d.name!r} gives clips: set data.frames >= 2")
  _require(not (d.name in data.IMAGE_SOURCES and clips), "data.frames", d.frames,
           f"asks for clips but data.name={d.name!r} gives images: use one of {data.CLIP_SOURCES}, a TFDS video "
           "dataset, or data.frames=1")
  _int(config, "data.frame_stride", 1, "must be >= 1 (1: consecutive frames)")
  if d.video_csv:
    _require(epath.Path(d.video_csv).is_file(), "data.video_csv", d.video_csv, "is not a file: point it at Kinetics' CSV")
  if not clips:
    return
  _int(config, "classify.test_views", 1, "must be >= 1 (evenly spaced windows averaged at evaluation)")
  _require(method.clips, "data.frames", d.frames,
           f"method {config.method!r} reads images only: use data.frames=1, or a method that reads clips "
           f"({', '.join(n for n, x in methods.REGISTRY.items() if x.clips)})")
  _require(mode in CLIP_MODES, "--mode", mode, f"is not built for clips (data.frames={d.frames}): clips run in "
           f"{', '.join(CLIP_MODES)}")
  _require(d.space == "pixels", "data.space", d.space, "clips are read in pixels: use 'pixels'")
  _require(not config.sample.fid or mode != "generate", "sample.fid", config.sample.fid,
           "scores images with Inception, not clips: set it False (the classifier score and PSNR / SSIM remain)")
  _require(not config.fid_every or mode != "finetune", "fid_every", config.fid_every,
           "scores images with Inception, not clips: set it 0")


def _model_and_data(config, mode: str) -> None:
  d, m = config.data, config.model
  try:
    patch = methods.get(config).patch(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _require(patch >= 1, "model.variant", m.variant, "the patch size must be a positive integer ('B/4')")
  _int(config, "data.image_size", 1)
  _int(config, "data.channels", 1)
  _int(config, "data.num_classes", 0)
  _require(d.space in ("pixels", "latents"), "data.space", d.space, "use 'pixels' or 'latents'")
  if d.space == "latents":
    _int(config, "vae.downsample", 1)
    _int(config, "vae.latent_channels", 1)
    _require(d.channels == 3, "data.channels", d.channels, "must be 3: the VAE encodes RGB images")
    _require(d.image_size % config.vae.downsample == 0, "data.image_size", d.image_size,
             f"is not divisible by the VAE's downsampling vae.downsample={config.vae.downsample}")
  size = geometry.input_shape(config)[0]
  what = f"gives latents of size {size}, which are" if d.space == "latents" else "is"
  _require(size % patch == 0, "data.image_size", d.image_size,
           f"{what} not divisible by the patch size {patch} of model.variant={m.variant!r}")
  _clips(config, methods.get(config), mode)
  _int(config, "model.num_registers", 1, "must be >= 1 (rep is the mean of the register tokens)")
  _int(config, "model.num_classes", 0)
  try:
    layers.compute_dtype(m.dtype)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _require(m.remat in layers.REMAT_POLICIES, "model.remat", m.remat, f"use one of {sorted(layers.REMAT_POLICIES)}")
  _require(m.attention in layers.ATTENTION, "model.attention", m.attention, f"use one of {list(layers.ATTENTION)}")
  diffusion.check_schedule(config.diffusion.schedule, config.diffusion.noise_exponent, config.diffusion.rho_form)
  _int(config, "diffusion.num_timesteps", 2)
  _int(config, "mesh.fsdp", 1)
  _require(config.mesh.data == -1 or isinstance(config.mesh.data, int) and config.mesh.data >= 1, "mesh.data",
           config.mesh.data, "use -1 (all devices not used by fsdp) or a positive count")
  _int(config, "data.num_workers", 0)
  data.pipeline.check_read_threads(config.data.read_threads)
  _int(config, "data.synthetic_size", 1)


def _loop(config) -> None:
  """The training loop's checkpoint and non-finite settings (pre-training, fine-tuning, classify)."""
  _int(config, "keep_checkpoints", 1, "must be >= 1: a run must never end without its checkpoint")
  _int(config, "max_skips", 0)
  _require(config.nonfinite_policy in ("stop", "skip"), "nonfinite_policy", config.nonfinite_policy,
           "use 'stop' or 'skip'")


def _training(config) -> None:
  d, o = config.data, config.optim
  for key in ("batch_size", "total_steps", "log_every", "checkpoint_every", "image_every"):
    _int(config, key, 1)
  if config.grad_accum_steps != "auto":
    _int(config, "grad_accum_steps", 1, "must be 'auto' or an integer >= 1")
  _loop(config)
  _int(config, "probe_every", 0, "must be >= 0 (0: off)")
  _int(config, "profile.steps", 0, "must be >= 0 (0: no trace)")
  _int(config, "profile.first_step", 1)
  _int(config, "fid_every", 0, "must be >= 0 (0: off)")
  k, n = config.model.num_classes, config.data.num_classes
  _require(k == 0 or k == n, "model.num_classes", k,
           f"a class-conditional model needs one label row per data class: use data.num_classes={n} (or 0)")
  if config.fid_every:
    _int(config, "fid_samples", 1)
    _inception_weights(config)
  _int(config, "corruption.loss_buckets", 1)
  _require(0 < d.crop_area_min <= d.crop_area_max <= 1, "data.crop_area_min", (d.crop_area_min, d.crop_area_max),
           "need 0 < data.crop_area_min <= data.crop_area_max <= 1")
  _require(o.base_lr > 0, "optim.base_lr", o.base_lr, "must be > 0")
  for key in ("b1", "b2"):
    _fraction(o[key], f"optim.{key}", high_open=True)
  _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
  _fraction(o.warmup_fraction, "optim.warmup_fraction", high_open=True)
  _require(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0: no clipping)")
  _fraction(o.ema_rate, "optim.ema_rate")
  if config.probe_every:
    _probe(config, mode_probe=False)


def _probe(config, mode_probe: bool) -> None:
  p = config.probe
  _require(config.data.num_classes >= 2, "data.num_classes", config.data.num_classes,
           "probing needs labels: set the dataset's class count")
  methods.check_cut(config, [p.block], [p.t])
  for key in ("probe.batch_size", "probe.fewshot_seeds"):
    _int(config, key, 1)
  for key in ("probe.max_train_images", "probe.max_eval_images"):
    _int(config, key, 0, "must be >= 0 (0: the whole split)")
  _require(len(p.fewshot_shots) > 0 and all(isinstance(k, int) and k >= 1 for k in p.fewshot_shots),
           "probe.fewshot_shots", p.fewshot_shots, "must be shot counts >= 1")
  _require(p.fewshot_l2 > 0, "probe.fewshot_l2", p.fewshot_l2, "must be > 0")
  if not mode_probe:
    return
  if p.linear:
    for key in ("probe.linear_epochs", "probe.linear_batch_size"):
      _int(config, key, 1)
    _int(config, "probe.linear_warmup_epochs", 0)
    _require(p.linear_warmup_epochs < p.linear_epochs, "probe.linear_warmup_epochs", p.linear_warmup_epochs,
             f"must be below probe.linear_epochs={p.linear_epochs}")
    _require(p.linear_base_lr > 0, "probe.linear_base_lr", p.linear_base_lr, "must be > 0")
    _require(p.linear_weight_decay >= 0, "probe.linear_weight_decay", p.linear_weight_decay, "must be >= 0")
    _fraction(p.linear_crop_area_min, "probe.linear_crop_area_min", low_open=True)
  if p.sweep:
    _require(len(p.sweep_ts) > 0, "probe.sweep_ts", p.sweep_ts, "needs at least one timestep")
    methods.check_cut(config, [], list(p.sweep_ts), t_key="probe.sweep_ts")
    _int(config, "probe.sweep_shots", 1)


def _classify(config) -> None:
  """--mode=classify (METHOD.md §10): the loop's keys and every classify.* setting."""
  c = config.classify
  for key in ("batch_size", "log_every", "checkpoint_every", "classify.epochs", "classify.eval_every_epochs",
              "classify.eval_batch_size"):
    _int(config, key, 1)
  _loop(config)
  _require(config.data.num_classes >= 2, "data.num_classes", config.data.num_classes,
           "classification needs labels: set the dataset's class count")
  _require(not (c.scratch and config.init_from), "classify.scratch", c.scratch,
           f"trains from the initialisation, yet init_from={config.init_from!r} is set: leave one of them")
  blocks = methods.get(config).num_blocks(config)
  _require(c.block == -1 or isinstance(c.block, int) and 0 <= c.block < blocks, "classify.block", c.block,
           f"is not a block of this network: use -1 (after the encoder's last block) or 0..{blocks - 1}")
  methods.check_cut(config, [], [c.t], t_key="classify.t")
  _require(0 < c.layer_decay <= 1, "classify.layer_decay", c.layer_decay, "must be in (0, 1] (1: no decay)")
  _require(isinstance(c.warmup_epochs, (int, float)) and 0 <= c.warmup_epochs < c.epochs, "classify.warmup_epochs",
           c.warmup_epochs, f"must be in [0, classify.epochs={c.epochs})")
  _require(c.base_lr > 0, "classify.base_lr", c.base_lr, "must be > 0")
  _require(c.weight_decay >= 0, "classify.weight_decay", c.weight_decay, "must be >= 0")
  _require(c.grad_clip >= 0, "classify.grad_clip", c.grad_clip, "must be >= 0 (0: no clipping)")
  for key in ("b1", "b2", "drop_path", "label_smoothing"):
    _fraction(c[key], f"classify.{key}", high_open=True)
  for key in ("mix_switch_prob", "erase_prob", "ema_rate"):
    _fraction(c[key], f"classify.{key}")
  for key in ("mixup_alpha", "cutmix_alpha", "randaugment_magnitude_std"):
    _require(c[key] >= 0, f"classify.{key}", c[key], "must be >= 0 (0: off)")
  _int(config, "classify.randaugment_ops", 0, "must be an integer >= 0 (0: no RandAugment)")
  _require(0 <= c.randaugment_magnitude <= 10, "classify.randaugment_magnitude", c.randaugment_magnitude,
           "must be in [0, 10] (RandAugment's magnitude scale)")
  if config.data.space == "latents":
    for key in ("randaugment_ops", "erase_prob"):
      _require(c[key] == 0, f"classify.{key}", c[key], "is pixel-space augmentation: set it to 0 for "
               "data.space='latents' (the training records are pre-encoded latents)")
  if config.data.frames > 1:
    for key in ("randaugment_ops", "erase_prob"):
      _require(c[key] == 0, f"classify.{key}", c[key], "is image augmentation, not built for clips: set it to 0 "
               f"(data.frames={config.data.frames})")
  elif c.randaugment_ops:
    _require(config.data.channels in (1, 3), "data.channels", config.data.channels,
             "RandAugment takes grey or RGB images: set classify.randaugment_ops=0")


def _inception_weights(config) -> None:
  """The file exists and holds every Inception weight with its shape (opened, not only found)."""
  path = config.sample.inception_weights
  _require(bool(path) and epath.Path(path).is_file(), "sample.inception_weights", path,
           "is not a file: convert pytorch-fid's weights once with tools/convert_inception_weights.py and pass the .npz")
  try:
    fid.load_inception(path)
  except fid.FidError as e:
    raise ConfigError(str(e)) from None


def _generate(config) -> None:
  s, k = config.sample, config.model.num_classes
  _int(config, "sample.num_samples", 0)
  for key in ("sample.batch_size", "sample.grid_classes", "sample.grid_per_class", "sample.inpaint_resample"):
    _int(config, key, 1)
  method = methods.get(config)
  ours = getattr(method, "samplers", ())  # a Sampler's or an Inpainter's
  if s.sampler not in ours:
    others = [n for n, m in methods.REGISTRY.items() if s.sampler in getattr(m, "samplers", ())]
    raise ConfigError(f"sample.sampler={s.sampler!r} is not one of method {config.method!r}'s: use one of {ours}"
                      + (f" ({s.sampler!r} is method {' / '.join(others)}'s)" if others else ""))
  _require(s.prediction in diffusion.PREDICTIONS, "sample.prediction", s.prediction,
           "use 'eps' (the reference's evaluations) or 'x0'")
  _require(s.timesteps in diffusion.GRIDS, "sample.timesteps", s.timesteps, "use 'even' or 'strided' (the reference's grid)")
  _require(s.uint8 in images.UINT8_CONVENTIONS, "sample.uint8", s.uint8,
           "use 'round' (unbiased, the default) or 'truncate' (ADM's scripts)")
  diffusion.check_steps(s.steps, config.diffusion.num_timesteps)
  _require(s.eta >= 0, "sample.eta", s.eta, "must be >= 0 (0: deterministic DDIM, 1: DDPM-like)")
  _require(s.cfg_scale == 1.0 or k > 0, "sample.cfg_scale", s.cfg_scale,
           "needs a class-conditional model (model.num_classes=0): fine-tune with a ':finetune' config, or use 1")
  bad = [c for c in s.classes if not (isinstance(c, int) and 0 <= c < k)]
  _require(not bad, "sample.classes", tuple(s.classes), f"out of range: the model has {k} classes")
  _fraction(s.inpaint_ratio, "sample.inpaint_ratio", low_open=s.inpaint in ("random", "future"), high_open=True)
  _int(config, "sample.inpaint_images", 0, "must be >= 0 (0: the whole data.eval_split)")
  if s.inpaint == "future":
    _require(config.data.frames > 1, "sample.inpaint", s.inpaint,
             "predicts the last frames of clips: use it with data.frames > 1 (images: 'random', 'center' or a PNG)")
  if s.inpaint not in ("",) + inpainting.MASKS:
    path = epath.Path(s.inpaint)
    _require(path.is_file(), "sample.inpaint", s.inpaint,
             f"use one of {', '.join(map(repr, inpainting.MASKS))} or the path of a PNG mask file")
    try:
      with path.open("rb") as f, Image.open(f) as mask:
        mask.load()
    except Exception:  # noqa: BLE001 - any unreadable file
      raise ConfigError(f"sample.inpaint={s.inpaint!r} is not a readable image: use a PNG mask (white = fill)") from None
  if s.inpaint and config.data.space != "latents":
    try:  # a mask that leaves nothing to fill is found now, not after the samples were written
      inpainting.masked_patch_count(config, inpainting.inpaint_mask(config, s.inpaint, 1, jax.random.PRNGKey(0)))
    except inpainting.InpaintError as e:
      raise ConfigError(str(e)) from None
  if s.lpips_weights:
    _require(bool(s.inpaint), "sample.lpips_weights", s.lpips_weights,
             "scores inpainting: set sample.inpaint too (or leave it '')")
    try:
      perceptual.load(s.lpips_weights)
    except perceptual.LpipsError as e:
      raise ConfigError(str(e)) from None
  if s.fid:
    _require(s.num_samples >= 2 or s.num_samples == 0 and bool(s.inpaint), "sample.fid", s.fid,
             f"needs samples to score: sample.num_samples={s.num_samples} (use >= 2), or sample.inpaint for the "
             "FID of inpainted images")
    _inception_weights(config)


def _vae(config, mode: str) -> None:
  """Latent runs: the VAE file (every mode but summary) and, for training, the encoded latents."""
  d = config.data
  if mode == "encode":
    _require(d.space == "latents", "data.space", d.space, "--mode=encode is for latent configs: use 'latents'")
    _require(config.encode.views in (1, 2), "encode.views", config.encode.views, "use 2 (image and mirror) or 1")
    _require(config.encode.dtype in ("float32", "bfloat16"), "encode.dtype", config.encode.dtype,
             "use 'float32' or 'bfloat16'")
    _int(config, "encode.shard_records", 1)
  if d.space != "latents" or mode == "summary":
    return
  _int(config, "vae.batch_size", 1)
  try:
    latent.check_file(config)
  except latent.LatentError as e:
    raise ConfigError(str(e)) from None
  if mode in ("pretrain", "finetune", "classify"):
    _require(bool(d.latents), "data.latents", d.latents, "is not set: latent runs train on the latents that "
             "--mode=encode writes (see README, Latent diffusion); pass --config.data.latents=DIR")
    _require("://" not in d.latents, "data.latents", d.latents,
             "is a URL: latents are read with array_record's file I/O; use a path every host sees (e.g. a gcsfuse mount)")
  if mode == "generate":
    _require(not config.sample.inpaint, "sample.inpaint", config.sample.inpaint,
             "is for pixel-space models: use '' with data.space='latents'")


def _capabilities(config, method, mode: str) -> None:
  """What `mode` asks of the method (interface.MODE_NEEDS; generate: a Sampler for samples, an
  Inpainter for sample.inpaint), and no key only another method reads set."""
  for need in interface.MODE_NEEDS[mode]:
    interface.require(method, need, "--mode", mode)
  s = config.sample
  if mode == "generate":
    if s.num_samples:
      interface.require(method, interface.Sampler, "sample.num_samples", s.num_samples,
                        "set 0 and inpaint (sample.inpaint)")
    if s.inpaint:
      interface.require(method, interface.Inpainter, "sample.inpaint", s.inpaint, "use ''")
  defaults = common.base_config(config.method)
  for key, readers in methods.foreign_keys(method).items():
    value = rules.lookup(config, key)
    _require(value == rules.lookup(defaults, key), key, value,
             f"is read only by method {' / '.join(readers)}; this config's method is {config.method!r}: leave it unset")


def check(config, mode: str) -> None:
  """Raise ConfigError for the first setting `mode` reads that cannot work."""
  _require(mode in MODES, "--mode", mode, f"use one of {MODES}")
  rules.finite(config)
  try:
    method = methods.get(config)
  except methods.UnknownMethod as e:
    raise ConfigError(str(e)) from None
  _capabilities(config, method, mode)
  _model_and_data(config, mode)
  method.check(config, mode)
  _vae(config, mode)
  if mode in ("pretrain", "finetune", "summary"):
    _training(config)
  if mode == "finetune":
    _require(config.model.num_classes >= 1, "model.num_classes", config.model.num_classes,
             "fine-tuning is class-conditional: set it (the ':finetune' configs do)")
  if mode == "probe":
    _probe(config, mode_probe=True)
  if mode == "classify":
    _classify(config)
  if mode == "generate" or mode == "finetune" and config.fid_every:
    _generate(config)
  if mode == "generate":
    _require(config.sample.num_samples or config.sample.inpaint, "sample.num_samples", config.sample.num_samples,
             "with sample.inpaint='' leaves nothing to generate: set a sample count or an inpainting mask")
