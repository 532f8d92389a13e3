"""DiffMAE (Wei et al., arXiv 2304.03283; METHOD.md §9) as a method of this code.

Training: per image, a random `diffmae.mask_ratio` of the patches is masked; only those are
noised, to one t ~ U{0..T-1} per image; the encoder sees the clean visible patches (no t), the
decoder the noisy masked patches told t, and the loss is the MSE of its prediction (x0 by
default, or eps) over the masked patches. Inpainting: the encoder runs once per image, then only
the masked patches are denoised step by step (ancestral DDPM over all T steps, or DDIM); the
visible pixels are copied. It is not a class-conditional generator.
"""
import jax
import jax.numpy as jnp
import ml_collections

from umd_jax import corruption, diffusion, flops, geometry, rules
from umd_jax.methods.common import REP, ddpm_noised, pick
from umd_jax.models import diffmae as model_lib
from umd_jax.geometry import input_shape
from umd_jax.models.umd import parse_variant

TARGETS = ("x0", "eps")


def diffmae_loss(model, schedule: diffusion.Schedule, x0, key, *, grid: geometry.Grid, mask_ratio: float,
                 target: str = "x0", num_buckets: int = 10, sample_ids=None, tube: int = 1):
  """The DiffMAE loss and its parts. model(x, xt_patches, t_index, mask) -> prediction for the
  masked patches (B, M, p*p*C). Every draw of a sample (mask, t, noise) comes from fold_in(key,
  its `sample_ids` entry; default its row), as in corruption.umd_loss, so gradient accumulation
  draws what the full batch draws. All images mask the same number of patches, so the mean over
  the batch's masked pixels is the mean of per-image losses."""
  batch = x0.shape[0]
  ids = jnp.arange(batch) if sample_ids is None else sample_ids
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
  per_sample = lambda purpose, draw: jax.vmap(lambda k: draw(jax.random.fold_in(k, purpose)))(keys)
  patches = grid.patchify(x0)                                                     # (B, L, P)
  mask = corruption.sample_mask(per_sample(0, lambda k: k), patches.shape[1], mask_ratio, tube)
  clean = jnp.take_along_axis(patches, mask.masked_ids[..., None], axis=1)        # (B, M, P)
  t = per_sample(1, lambda k: jax.random.randint(k, (), 0, schedule.num_timesteps))
  eps = per_sample(2, lambda k: jax.random.normal(k, clean.shape[1:], clean.dtype))
  pred = model(x0, diffusion.q_sample(schedule, clean, t, eps), diffusion.network_timestep(t), mask)
  per_image = jnp.mean(jnp.square(pred - (clean if target == "x0" else eps)), axis=(1, 2))
  loss = per_image.mean()
  onehot = jax.nn.one_hot(t * num_buckets // schedule.num_timesteps, num_buckets)
  return loss, dict(loss_masked=loss, bucket_sum=onehot.T @ per_image, bucket_count=onehot.sum(axis=0))


# Where each DiffMAE default comes from, in one wording (METHOD.md §9's table, add_keys'
# comments and the README say the same; tests/test_docs.py checks it). "read in the paper" is used
# only with the passage quoted in METHOD.md; the paper's text could not be re-read here, so what was
# recalled from it is labelled as such and counts as chosen.
RECALLED = "chosen (recalled from the paper, its text not re-read)"
CHOSEN = "chosen"
MAE_CODE = "from MAE's reference code (facebookresearch/mae)"
SOURCES = {
    "diffmae.mask_ratio": RECALLED, "diffmae.decoder": RECALLED, "diffmae.links": RECALLED,
    "diffmae.target": RECALLED, "diffmae.decoder_width": MAE_CODE, "diffmae.decoder_depth": MAE_CODE,
    "diffmae.decoder_heads": MAE_CODE, "model.num_registers": MAE_CODE, "diffusion.schedule": RECALLED,
    "diffusion.num_timesteps": RECALLED, "diffusion.noise_exponent": RECALLED, "diffusion.rho_form": CHOSEN,
    "sample.sampler": RECALLED,
}
TAGS = {RECALLED: "recalled", CHOSEN: "chosen", MAE_CODE: "MAE's"}  # the word each comment carries


class DiffMAEMethod:
  label_params = ()  # no labels
  samplers = ("ddim", "ddpm")  # sample.sampler: DDIM over sample.steps, or ancestral DDPM
  name = "diffmae"
  # What a checkpoint's numbers mean (METHOD.md §12): every reader of weights uses the writer's values.
  meaning = ("model.variant", "diffmae.target", "diffmae.links", "diffmae.decoder", "diffmae.decoder_width",
             "diffmae.decoder_depth", "diffmae.decoder_heads", "diffusion.schedule", "diffusion.num_timesteps",
             "diffusion.noise_exponent", "diffusion.rho_form") + geometry.MEANING

  objective = ("diffmae.",)
  clips = True  # tubelet tokens and 3-D sin-cos positions (geometry.Grid)

  def add_keys(self, c) -> None:
    """DiffMAE's own keys (METHOD.md §9). Sources (METHOD.md §9's table): "recalled" = chosen,
    recalled from the paper, its text not re-read."""
    c.diffmae = d = ml_collections.ConfigDict()
    d.mask_ratio = 0.75              # share of patches masked, noised and denoised (recalled)
    d.decoder = "cross_self"         # "cross_self" | "cross" | "joint" (MAE-like self-attention) (recalled)
    d.links = "top_down"             # "top_down" (block i <- encoder block E-1-i·E/D) | "last" (recalled)
    d.target = "x0"                  # what the decoder predicts: "x0" (pixels) | "eps" (recalled)
    d.decoder_width = 512            # MAE's decoder: 8 blocks of width 512, 16 heads (MAE's code)
    d.decoder_depth = 8              # (MAE's code)
    d.decoder_heads = 16             # (MAE's code)

  def configure(self, c) -> None:
    c.model.num_registers = 1              # MAE's single class token (MAE's code): rep is its output
    c.diffusion.schedule = "linear"        # a linear β schedule (recalled)
    c.diffusion.noise_exponent = 0.8       # with the exponent ρ = 0.8 (recalled; where it acts: rho_form, chosen)
    c.diffusion.num_timesteps = 1000       # (recalled)
    c.sample.num_samples = 0               # not a class-conditional generator: --mode=generate inpaints
    c.sample.inpaint = "center"
    c.sample.sampler = "ddpm"              # ancestral DDPM over all T steps (recalled)

  def build(self, config, rngs):
    return model_lib.from_config(config, rngs)

  def patch(self, config) -> int:
    return parse_variant(config.model.variant)["patch"]

  def width(self, config) -> int:
    return parse_variant(config.model.variant)["width"]

  def row_split(self, config) -> float:
    return 0.0  # one kind of row

  def loss_fn(self, config, schedule):
    d, grid = config.diffmae, model_grid(config)
    tube = corruption.tube_frames(config, grid)

    def loss(model, images, labels, key, sample_ids=None):
      del labels  # self-supervised
      return diffmae_loss(model, schedule, images, key, grid=grid, mask_ratio=d.mask_ratio, target=d.target,
                          num_buckets=config.corruption.loss_buckets, sample_ids=sample_ids, tube=tube)
    return loss

  def num_blocks(self, config) -> int:
    return parse_variant(config.model.variant)["encoder_depth"]  # the encoder's: the decoder needs a mask

  def features(self, model, x, t_index, blocks):
    """The encoder on the whole image (it has no timestep: t_index is ignored; a t >= 0 probe
    feeds it the noised image)."""
    del t_index
    if tuple(blocks) == (REP,):
      return model.encode(x)["rep"][None]
    return pick(model.features(x), blocks)

  def noised(self, config, schedule, images, t, eps):
    """Probe / classifier input: clean told index 0, or noised to t told t + 1."""
    return ddpm_noised(config, schedule, images, t, eps, diffusion.network_timestep)

  def encoder_depth(self, config) -> int:
    return parse_variant(config.model.variant)["encoder_depth"]

  def classify_tokens(self, model, x, t_index, block, drop=None):
    del t_index  # the encoder has no timestep
    return model.tokens(x, block, drop)

  def classify_layers(self, config, block) -> dict:
    """Layer ids of what the classifier reads (the encoder): embeddings 0, block j j + 1."""
    return {"patch_embed": 0, "registers": 0, "encoder": ("stack", 1)}

  def preview(self, config, schedule, model, x0, key):
    """Visible patches, and the decoder's one-step x0 guess for the masked ones from pure noise
    (t = T - 1, where inpainting starts), the visible ones copied."""
    b, grid = x0.shape[0], model.geometry
    k_mask, k_eps = jax.random.split(key)
    mask = corruption.random_mask(k_mask, b, model.num_patches, config.diffmae.mask_ratio,
                                  corruption.tube_frames(config, grid))
    m = mask.masked_ids.shape[1]
    noise = jax.random.normal(k_eps, (b, m, grid.token_dim(model.channels)))
    t = jnp.full((b,), schedule.num_timesteps - 1, jnp.int32)
    pred = model(x0, noise, diffusion.network_timestep(t), mask)
    x0_pred = diffusion.parameterise(schedule, noise, t, pred, pred, prediction=config.diffmae.target)[0]
    visible = 1 - grid.pixel_mask(mask.mask)
    filled = _fill(x0, x0_pred, mask, grid)
    return x0 * visible, filled

  def inpaint(self, config, schedule, make_model, images, known, labels, key, num_masked: int):
    """Encoder once on the known patches; the `num_masked` unknown patches of every image (those
    with any unknown pixel) start from Gaussian noise and are denoised alone, ancestral DDPM over
    all T steps (sample.sampler="ddpm") or DDIM over sample.steps; known pixels are copied."""
    del labels
    grid = model_grid(config)
    mask = corruption.mask_from_patches(grid.known_tokens(known), num_masked)
    context = make_model().context(images, mask.keep_ids)  # the encoder, once
    return self._sample(config, schedule, make_model, images, known, mask, context, key, grid)

  def _sample(self, config, schedule, make_model, images, known, mask, context, key, grid):
    """The masked patches of `mask`, denoised given the encoder's `context`, put into `images`."""
    s = config.sample
    k_noise, k_sample = jax.random.split(key)
    noise = jax.random.normal(k_noise, mask.masked_ids.shape + (grid.token_dim(images.shape[-1]),))

    def denoise(x, t):
      pred = make_model().decode(context, x, mask.masked_ids, mask.keep_ids, diffusion.network_timestep(t))
      return pred, pred  # the one head: parameterise reads it as x0 or eps (prediction=target)

    kw = dict(clip=s.clip, prediction=config.diffmae.target)
    if s.sampler == "ddpm":
      x = diffusion.ddpm_sample(denoise, schedule, noise, k_sample, **kw)
    else:
      x = diffusion.ddim_sample(denoise, schedule, noise, k_sample, steps=s.steps, eta=s.eta, grid=s.timesteps, **kw)
    return known * images + (1 - known) * _fill(images, x, mask, grid)

  def inpainter(self, config) -> str:
    """Only the masked patches denoised, given the clean encoder's context."""
    return "masked-patch diffusion"

  def inpaint_steps(self, config) -> int:
    return config.diffusion.num_timesteps if config.sample.sampler == "ddpm" else config.sample.steps

  def train_flops_per_image(self, config) -> float:
    return 3.0 * forward_flops(config)

  def check(self, config, mode) -> None:
    d = config.diffmae
    rules.require(config.model.num_classes == 0, "model.num_classes", config.model.num_classes,
                  "must be 0: DiffMAE is self-supervised (no label embedding)")
    rules.require(d.decoder in model_lib.DECODERS, "diffmae.decoder", d.decoder, f"use one of {model_lib.DECODERS}")
    rules.require(d.links in model_lib.LINKS, "diffmae.links", d.links, f"use one of {model_lib.LINKS}")
    rules.require(d.target in TARGETS, "diffmae.target", d.target, f"use one of {TARGETS}")
    rules.fraction(d.mask_ratio, "diffmae.mask_ratio", low_open=True, high_open=True)
    variant, grid = parse_variant(config.model.variant), model_grid(config)
    num_patches = grid.num_tokens
    kept = corruption.num_kept(num_patches, d.mask_ratio, corruption.tube_frames(config, grid))
    rules.require(1 <= kept < num_patches, "diffmae.mask_ratio", d.mask_ratio,
                  f"must keep at least one and mask at least one of {num_patches} patches")
    for key in ("diffmae.decoder_depth", "diffmae.decoder_heads"):
      rules.integer(config, key, 1)
    rules.integer(config, "diffmae.decoder_width", 4)
    rules.require(d.decoder_width % 4 == 0 and d.decoder_width % d.decoder_heads == 0, "diffmae.decoder_width", d.decoder_width,
                  f"must be divisible by 4 (sin-cos positions) and by diffmae.decoder_heads={d.decoder_heads}")
    sincos = 16 if grid.clip else 4  # clips: a quarter of the channels for time, then 2-D
    rules.require(variant["width"] % sincos == 0, "model.variant", config.model.variant,
                  f"needs a width divisible by {sincos} ({'3-D' if grid.clip else '2-D'} sin-cos positions)")
    rules.require(d.decoder_width % sincos == 0, "diffmae.decoder_width", d.decoder_width,
                  f"must be divisible by {sincos} ({'3-D' if grid.clip else '2-D'} sin-cos positions)")


def model_grid(config) -> geometry.Grid:
  """The token grid of the encoder's input (geometry.grid at the variant's patch)."""
  return geometry.grid(config, parse_variant(config.model.variant)["patch"])


def _fill(images, masked_patches, mask, grid):
  """`images` with the tokens of `mask.masked_ids` replaced by `masked_patches` (B, M, P)."""
  patches = grid.patchify(images)
  kept = jnp.take_along_axis(patches, mask.keep_ids[..., None], axis=1)
  return grid.unpatchify(jnp.take_along_axis(jnp.concatenate([kept, masked_patches.astype(patches.dtype)], axis=1),
                                             mask.restore_ids[..., None], axis=1))


def forward_flops(config) -> float:
  """Analytic FLOPs of one training forward (multiply-add = 2), as flops.py counts UMD's."""
  d, m = config.diffmae, config.model
  _, channels = input_shape(config)
  v, grid = parse_variant(m.variant), model_grid(config)
  w, dw, p_dim = v["width"], d.decoder_width, grid.token_dim(channels)
  num_patches = grid.num_tokens
  kept = corruption.num_kept(num_patches, d.mask_ratio, corruption.tube_frames(config, grid))
  masked, context = num_patches - kept, m.num_registers + kept
  total = 2 * kept * p_dim * w + v["encoder_depth"] * flops.block_flops(context, w, adaln=False)
  total += 2 * masked * p_dim * dw + 8 * dw * dw + 2 * dw * 2 * dw + 2 * masked * dw * p_dim  # embed, t MLP, final, head
  if d.decoder == "joint":
    total += 2 * context * w * dw + d.decoder_depth * flops.block_flops(context + masked, dw, adaln=True)
    return float(total)
  cross = 2 * masked * dw * dw * 2 + 2 * context * w * 2 * dw + 2 * 2 * masked * context * dw  # q, proj; kv; q·k, p·v
  mlp = 2 * masked * dw * 8 * dw
  self_attn = 2 * masked * dw * 4 * dw + 2 * 2 * masked * masked * dw if d.decoder == "cross_self" else 0
  branches = 3 if d.decoder == "cross_self" else 2
  total += d.decoder_depth * (cross + mlp + self_attn + 2 * dw * 3 * branches * dw)
  return float(total)


METHOD = DiffMAEMethod()
