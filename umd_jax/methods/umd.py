"""The UMD method (METHOD.md §1-§4) and its presets DiT, MaskDiT and MAE: one auto-encoder, the
mask-then-noise corruption and the UMD loss (umd_loss.py), sampled by DDIM / DDPM over the whole
image and inpainted RePaint-style (MAE: its one-shot fill). The presets differ only in the values
of `corruption.*` and the conditioning: four registered methods, one class.
"""
import jax
import jax.numpy as jnp

from umd_jax import corruption, diffusion, flops, geometry, rules
from umd_jax.geometry import input_shape
from umd_jax.methods import umd_loss
from umd_jax.methods.common import REP, ddpm_noised, pick, sample_with
from umd_jax.models import umd as model_lib
from umd_jax.models.umd import parse_variant

# METHOD.md §1 table: the baselines are values of the same corruption, not code paths.
PRESETS = {
    "umd": dict(clean_fraction=0.5, clean_mask_ratio=0.75, noised_mask_ratio=0.375, conditioning="adaln"),
    "dit": dict(clean_fraction=0.0, clean_mask_ratio=0.0, noised_mask_ratio=0.0, conditioning="adaln"),
    "maskdit": dict(clean_fraction=0.0, clean_mask_ratio=0.0, noised_mask_ratio=0.5, conditioning="adaln"),
    "mae": dict(clean_fraction=1.0, clean_mask_ratio=0.75, noised_mask_ratio=0.0, conditioning="in_context"),
}
# What a checkpoint's numbers mean (METHOD.md §12): every reader of weights uses the writer's values.
SCHEDULE = ("diffusion.schedule", "diffusion.num_timesteps", "diffusion.noise_exponent", "diffusion.rho_form")


class UMDNetwork:
  """What the methods on the UMD auto-encoder share (the UMD family; SiT on this network): building
  it, its geometry, and reading its blocks (a Backbone's features and classifier cut)."""

  def patch(self, config) -> int:
    return parse_variant(config.model.variant)["patch"]

  def width(self, config) -> int:
    return parse_variant(config.model.variant)["width"]

  def build(self, config, rngs):
    return model_lib.from_config(config, rngs)

  def num_blocks(self, config) -> int:
    v = parse_variant(config.model.variant)
    return v["encoder_depth"] + v["decoder_depth"]

  def features(self, model, x, t_index, blocks):
    """rep, and each encoder then decoder block's mean-pooled tokens, at timestep index t_index."""
    cond = model.condition(t_index)
    if tuple(blocks) == (REP,):  # the encoder alone gives rep
      return model.encode(x, cond)[1].astype(jnp.float32)[None]
    return pick(model.features(x, t_index), blocks)

  def encoder_depth(self, config) -> int:
    return parse_variant(config.model.variant)["encoder_depth"]

  def classify_tokens(self, model, x, t_index, block, drop=None):
    """Patch tokens after `block` of the unmasked forward told t_index (the null label for a
    class-conditional network)."""
    return model.tokens(x, model.condition(t_index), block, drop)

  def classify_layers(self, config, block) -> dict:
    """Layer ids (MAE's layer-wise decay) of what the classifier cut after `block` reads: the
    embeddings 0, encoder block j j + 1, and past the encoder its final norm, the decoder's
    positions (both with decoder block 0) and decoder block j E + 1 + j."""
    e = self.encoder_depth(config)
    layers_ = {k: 0 for k in ("patch_embed", "encoder_pos", "registers", "time_embed", "label_embed")}
    layers_["encoder"] = ("stack", 1)
    if block >= e:
      layers_.update(encoder_norm=e + 1, decoder_pos=e + 1, decoder=("stack", e + 1))
    return layers_


class UMDFamily(UMDNetwork):
  label_params = ("label_embed",)
  samplers = ("ddim", "ddpm")  # sample.sampler: DDIM over sample.steps, or ancestral DDPM
  meaning = ("model.variant", "model.conditioning") + SCHEDULE + geometry.MEANING
  objective = ("corruption.",)
  clips = True  # tubelet tokens (geometry.Grid)

  def __init__(self, name: str):
    self.name, self.preset = name, PRESETS[name]

  def add_keys(self, c) -> None:
    """The corruption of METHOD.md §1 (values: the presets) and the conditioning."""
    c.corruption.clean_fraction = 0.0        # share of the batch in the clean sub-batch (no noise, index 0)
    c.corruption.clean_mask_ratio = 0.0      # its mask ratio (loss on the masked patches)
    c.corruption.noised_mask_ratio = 0.0     # the noised sub-batch's mask ratio
    c.corruption.label_dropout = 0.0         # class-conditional training: P(label -> null class)
    c.model.conditioning = "adaln"           # "adaln" | "in_context"

  def configure(self, c) -> None:
    p = self.preset
    c.corruption.clean_fraction = p["clean_fraction"]
    c.corruption.clean_mask_ratio = p["clean_mask_ratio"]
    c.corruption.noised_mask_ratio = p["noised_mask_ratio"]
    c.model.conditioning = p["conditioning"]
    # Recognition fine-tuning's input: the clean image (timestep index 0), or for a network that never
    # saw index 0 (DiT, MaskDiT: no clean sub-batch) DDAE's image noised to t = 0, told 1.
    c.classify.t = -1 if p["clean_fraction"] > 0 else 0

  def row_split(self, config) -> float:
    return config.corruption.clean_fraction

  def loss_fn(self, config, schedule):
    c = config.corruption
    grid = model_grid(config)
    tube = corruption.tube_frames(config, grid)
    conditional = bool(config.model.num_classes)

    def loss(model, images, labels, key, sample_ids=None):
      return umd_loss.loss(model, schedule, images, key, grid=grid, tube=tube,
                                 clean_fraction=c.clean_fraction, clean_mask_ratio=c.clean_mask_ratio,
                                 noised_mask_ratio=c.noised_mask_ratio, num_buckets=c.loss_buckets,
                                 labels=labels if conditional else None, label_dropout=c.label_dropout,
                                 null_label=config.model.num_classes, sample_ids=sample_ids)
    return loss

  def noised(self, config, schedule, images, t, eps):
    """Probe / classifier input: clean told index 0, or noised to t told t + 1."""
    return ddpm_noised(config, schedule, images, t, eps, diffusion.network_timestep)

  def preview(self, config, schedule, model, x0, key):
    """The clean step at its mask ratio (UMD, MAE), else the noised step at t = T/2."""
    c = config.corruption
    clean = c.clean_fraction > 0
    k_mask, k_eps = jax.random.split(key)
    b = x0.shape[0]
    t = jnp.full((b,), schedule.num_timesteps // 2, jnp.int32)
    x_in = x0 if clean else diffusion.q_sample(schedule, x0, t, jax.random.normal(k_eps, x0.shape))
    mask = corruption.random_mask(k_mask, b, model.num_patches, c.clean_mask_ratio if clean else c.noised_mask_ratio,
                                  corruption.tube_frames(config, model.geometry))
    t_index = jnp.full((b,), diffusion.CLEAN_INDEX, jnp.int32) if clean else diffusion.network_timestep(t)
    out = model(x_in, t_index, None, mask)
    shown = x_in if mask is None else x_in * (1 - model.geometry.pixel_mask(mask.mask))
    return shown, out["x0"]

  def _denoiser(self, config, make_model, labels):
    def apply(x, t_index, y):
      out = make_model()(x, t_index, y)
      return out["x0"], out["eps"]
    if config.model.num_classes == 0:
      return lambda x, t: apply(x, diffusion.network_timestep(t), None)
    return diffusion.guided(apply, labels, config.model.num_classes, config.sample.cfg_scale)

  def sample(self, config, schedule, make_model, labels, noise, key):
    return sample_with(self._denoiser(config, make_model, labels), config, schedule, noise, key)

  def inpaint(self, config, schedule, make_model, images, known, labels, key, num_masked: int):
    """RePaint-style: the whole network samples the whole image, the known region held to its
    ground truth noised to the current timestep (diffusion.inpaint_sample). A network that never
    trained on noise (MAE: clean_fraction 1) cannot denoise; its inpainter is MAE's one-shot fill:
    the `num_masked` patches with an unknown pixel dropped, the clean step's x0 prediction for them."""
    if one_shot(config):
      return self._one_shot_fill(make_model(), images, known, num_masked)
    s = config.sample
    k_noise, k_sample = jax.random.split(key)
    return diffusion.inpaint_sample(self._denoiser(config, make_model, labels), schedule, images, known,
                                    jax.random.normal(k_noise, images.shape), k_sample, steps=s.steps, eta=s.eta,
                                    clip=s.clip, resample=s.inpaint_resample, prediction=s.prediction,
                                    grid=s.timesteps)

  @staticmethod
  def _one_shot_fill(model, images, known, num_masked):
    mask = corruption.mask_from_patches(model.geometry.known_tokens(known), num_masked)
    t_index = jnp.full((images.shape[0],), diffusion.CLEAN_INDEX, jnp.int32)
    x0 = model(images, t_index, None, mask)["x0"]  # the clean step: the null label, as in training
    return known * images + (1 - known) * x0

  def inpainter(self, config) -> str:
    """RePaint (diffusion.inpaint_sample) over the whole image, or MAE's one-shot fill."""
    return "one-shot fill" if one_shot(config) else "repaint"

  def inpaint_steps(self, config) -> int:
    """Network calls of one inpainting (DDIM over sample.steps, each redone inpaint_resample times;
    one for the one-shot fill)."""
    return 1 if one_shot(config) else config.sample.steps * config.sample.inpaint_resample

  def train_flops_per_image(self, config) -> float:
    return train_flops_per_image(config)

  def check(self, config, mode) -> None:
    c = config.corruption
    rules.fraction(c.clean_fraction, "corruption.clean_fraction")
    grid = model_grid(config)
    num_patches, tube = grid.num_tokens, corruption.tube_frames(config, grid)
    for name in ("clean_mask_ratio", "noised_mask_ratio"):
      rules.fraction(c[name], f"corruption.{name}", high_open=True)
      rules.require(corruption.num_kept(num_patches, c[name], tube) >= 1, f"corruption.{name}", c[name],
                    f"keeps no token of {num_patches}: lower it")
    rules.fraction(c.label_dropout, "corruption.label_dropout")
    model_lib.check_conditioning(config.model.conditioning)


def model_grid(config):
  """The token grid of the UMD network's input (geometry.grid at the variant's patch)."""
  return geometry.grid(config, parse_variant(config.model.variant)["patch"])


def one_shot(config) -> bool:
  """Inpaint by one clean-step forward: the network never trained on noised images (MAE)."""
  return config.corruption.clean_fraction == 1.0


# Analytic FLOPs (flops.py's unit): patch embedding, every dense layer and both attention matmuls of
# the encoder (on registers + kept tokens) and decoder (on rep + all tokens), adaLN modulations,
# condition MLPs and the output head.
def forward_flops(*, width, encoder_depth, decoder_depth, heads, patch, image_size, channels,
                  mask_ratio=0.0, num_registers=4, adaln=True, num_classes=0, frames=1, tubelet=1,
                  tube=1) -> float:
  """One forward of an input of `frames` frames (1: an image) cut into tubelet × patch² tokens."""
  del heads  # FLOPs do not depend on the head split
  num_patches = (frames // tubelet) * (image_size // patch) ** 2
  token_dim = tubelet * patch * patch * channels
  kept = corruption.num_kept(num_patches, mask_ratio, tube)
  extra = 0 if adaln else 1  # the in-context condition token
  total = 2 * num_patches * token_dim * width                                # patch embedding
  total += encoder_depth * flops.block_flops(num_registers + kept + extra, width, adaln)
  total += decoder_depth * flops.block_flops(num_patches + 1 + extra, width, adaln)
  total += 2 * num_patches * width * 2 * token_dim                           # x0 + eps head
  total += 8 * width * width * (2 if num_classes else 1)                      # condition MLPs
  total += 2 * width * 2 * width if adaln else 0                              # final modulation
  return float(total)


def train_flops_per_image(config) -> float:
  """UMD: forward + backward FLOPs of one training image, averaged over the clean and noised sub-batches."""
  c, m = config.corruption, config.model
  size, channels = input_shape(config)
  grid = model_grid(config)
  shared = dict(image_size=size, channels=channels, num_registers=m.num_registers, frames=config.data.frames,
                tubelet=grid.tubelet, tube=corruption.tube_frames(config, grid),
                adaln=m.conditioning == "adaln", num_classes=m.num_classes, **parse_variant(m.variant))
  n_clean, n_noised = corruption.split_sizes(config.batch_size, c.clean_fraction)
  per_batch = (n_clean * forward_flops(mask_ratio=c.clean_mask_ratio, **shared)
               + n_noised * forward_flops(mask_ratio=c.noised_mask_ratio, **shared))
  return 3.0 * per_batch / config.batch_size


UMD, DIT, MASKDIT, MAE = (UMDFamily(name) for name in PRESETS)
