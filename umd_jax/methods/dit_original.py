"""The original DiT (METHOD.md §11; models/dit.py) as a method of this code: public checkpoints
converted by tools/convert_dit_weights.py, probed DDAE-style, fine-tuned for recognition and
sampled as DiT samples -- ancestral DDPM with the learned variance over sample.steps respaced
timesteps (250 in DiT's evaluation), or DDIM; classifier-free guidance on the eps channels with
DiT's convention (`dit.cfg_channels`: its `forward_with_cfg` guides the first 3 of the 4 latent
channels). It is not trained here: DiT's objective adds a variational bound for the variance.
"""
import jax
import jax.numpy as jnp

from umd_jax import diffusion, flops, flow, rules
from umd_jax.methods.common import pick, section
from umd_jax.models import dit as model_lib
from umd_jax.geometry import input_shape

class DiTNetwork:
  """What the methods on Peebles' DiT network share (the original DiT, SiT): building it, its
  geometry and FLOPs, and reading its blocks (a Backbone's features and classifier cut)."""

  def build(self, config, rngs):
    return model_lib.from_config(config, rngs)

  def patch(self, config) -> int:
    return model_lib.parse_variant(config.model.variant)["patch"]

  def width(self, config) -> int:
    return model_lib.parse_variant(config.model.variant)["width"]

  def train_flops_per_image(self, config) -> float:
    return train_flops(config)

  def num_blocks(self, config) -> int:
    return model_lib.parse_variant(config.model.variant)["depth"]

  def features(self, model, x, t_index, blocks):
    """Every block's mean-pooled tokens told t_index with the null label; rep is the last block's."""
    return pick(model.features(x, model.condition(t_index)), blocks)

  def encoder_depth(self, config) -> int:
    return self.num_blocks(config)

  def classify_tokens(self, model, x, t_index, block, drop=None):
    return model.tokens(x, model.condition(t_index), block, drop)

  def classify_layers(self, config, block) -> dict:
    return {"x_embedder": 0, "t_embedder": 0, "y_embedder": 0, "blocks": ("stack", 1)}


class OriginalDiT(DiTNetwork):
  clips = False  # images only
  samplers = ("ddim", "ddpm")  # sample.sampler: DDIM over sample.steps, or ancestral DDPM
  name = "dit_original"
  # What a checkpoint's numbers mean (METHOD.md §12): dit.time tells DiT's weights from SiT's.
  meaning = ("model.variant", "dit.time", "dit.learn_sigma", "dit.mlp_norm_eps", "diffusion.schedule",
             "diffusion.num_timesteps", "diffusion.noise_exponent", "diffusion.rho_form")

  objective = ("dit.",)

  def add_keys(self, c) -> None:
    d = add_network_keys(c)
    d.time = "dit"                   # "dit": DDPM timesteps; "sit": SiT's weights converted before method
                                     # 'sit' existed (probed only; convert again with --kind sit to sample)

  def configure(self, c) -> None:
    c.classify.t = 0  # DiT never saw the clean index: DDAE's image noised to t = 0

  def noised(self, config, schedule, images, t, eps):
    """Probe / classifier input. DiT: the image noised to t (q_sample) told t itself, the clean
    image told 0. SiT (dit.time = "sit"): the linear interpolant at s = 1 - t/T, s·x + (1 - s)·ε,
    told s (continuous, 1 = data), the clean image told 1."""
    b = images.shape[0]
    if config.dit.time == "sit":
      return interpolant_noised(schedule, images, t, eps)
    if t is None:
      return images, jnp.zeros((b,), jnp.int32)
    return diffusion.q_sample(schedule, images, t, eps), t

  def _denoiser(self, config, make_model, labels):
    out = cfg_outputs(config, make_model, labels)

    def denoise(x, t):
      eps, _ = out(x, t)
      return eps, eps  # one head: parameterise reads it as eps (sample.prediction = "eps")
    return denoise

  def sample(self, config, schedule, make_model, labels, noise, key):
    """"ddpm": the learned-variance DDPM over sample.steps respaced timesteps (DiT's 250); "ddim":
    DDIM over sample.steps with the eps head."""
    s = config.sample
    if s.sampler == "ddpm":
      return diffusion.learned_variance_sample(cfg_outputs(config, make_model, labels), schedule, noise, key,
                                               steps=s.steps, clip=s.clip)
    return diffusion.ddim_sample(self._denoiser(config, make_model, labels), schedule, noise, key, steps=s.steps,
                                 eta=s.eta, clip=s.clip, prediction="eps", grid=s.timesteps)

  def inpaint(self, config, schedule, make_model, images, known, labels, key, num_masked: int):
    s = config.sample
    k_noise, k_sample = jax.random.split(key)
    return diffusion.inpaint_sample(self._denoiser(config, make_model, labels), schedule, images, known,
                                    jax.random.normal(k_noise, images.shape), k_sample, steps=s.steps, eta=s.eta,
                                    clip=s.clip, resample=s.inpaint_resample, prediction="eps", grid=s.timesteps)

  def inpainter(self, config) -> str:
    return "repaint"

  def inpaint_steps(self, config) -> int:
    return config.sample.steps * config.sample.inpaint_resample

  def check(self, config, mode) -> None:
    try:
      model_lib.parse_variant(config.model.variant)
    except ValueError as e:
      raise rules.ConfigError(str(e)) from None
    rules.require(config.model.num_classes >= 1, "model.num_classes", config.model.num_classes,
                  "the original DiT is class-conditional: the label table of the checkpoint (1000 for ImageNet)")
    rules.require(config.dit.cfg_channels >= 1, "dit.cfg_channels", config.dit.cfg_channels,
                  "must be >= 1 (DiT guides 3 of the 4 latent channels)")
    rules.require(config.dit.time in ("dit", "sit"), "dit.time", config.dit.time, "use 'dit' or 'sit'")
    if mode == "generate":
      rules.require(config.dit.time == "dit", "dit.time", config.dit.time, "is SiT's: SiT samples by integrating "
                    "its velocity field: convert the weights again with tools/convert_dit_weights.py --kind sit "
                    "(method 'sit', configs/sit.py, samples them)")
      rules.require(config.sample.prediction == "eps", "sample.prediction", config.sample.prediction,
                    "must be 'eps': the original DiT predicts eps (and its variance)")
      rules.require(config.dit.learn_sigma or config.sample.sampler == "ddim", "sample.sampler",
                    config.sample.sampler, "needs dit.learn_sigma=True for 'ddpm' (the learned variance): use 'ddim'")


def train_flops(config) -> float:
  """Forward + backward FLOPs of one image through Peebles' DiT (flops.py's unit)."""
  v = model_lib.parse_variant(config.model.variant)
  size, channels = input_shape(config)
  tokens = (size // v["patch"]) ** 2
  p_dim = v["patch"] ** 2 * channels
  forward = 2 * tokens * p_dim * v["width"] + v["depth"] * flops.block_flops(tokens, v["width"], adaln=True)
  forward += 2 * tokens * v["width"] * p_dim * (2 if config.dit.learn_sigma else 1)
  return 3.0 * forward


def interpolant_noised(schedule, images, t, eps):
  """SiT's probe / classifier input: the clean image told 1 (data), or the linear interpolant at
  s = 1 - t/T (t a DDPM step index, as probes and DDAE name noise levels) told s."""
  if t is None:
    return images, jnp.ones((images.shape[0],), jnp.float32)
  s = 1.0 - t.astype(jnp.float32) / schedule.num_timesteps
  return flow.interpolate(images, eps, s), s


def add_network_keys(c):
  """Peebles' DiT network's keys (section dit), shared with SiT (methods/sit.py): same network."""
  d = section(c, "dit")
  d.learn_sigma = True             # 2C output channels: eps (SiT: velocity) and DiT's variance interpolation v
  d.mlp_norm_eps = 1e-6            # the MLP branch's LayerNorm eps: 1e-6 (DiT's code); diffusers' port 1e-5
  d.cfg_channels = 3               # guidance on the first 3 channels (DiT's and SiT's forward_with_cfg); 4: all
  return d


def cfg_outputs(config, make_model, labels, channels: int = 0):
  """(x_t, t) -> (eps, v) with classifier-free guidance as DiT's forward_with_cfg: the conditional
  and null-label halves in one batch, guidance on the first `channels` (0: dit.cfg_channels) eps
  channels, the rest (other eps channels, v) the conditional half's."""
  scale, null, k = config.sample.cfg_scale, config.model.num_classes, channels or config.dit.cfg_channels

  def out(x, t):
    if scale == 1.0:
      o = make_model()(x, t, labels)
      return o["eps"], o.get("v")
    b = x.shape[0]
    o = make_model()(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                     jnp.concatenate([labels, jnp.full_like(labels, null)]))
    cond, uncond = o["eps"][:b], o["eps"][b:]
    guided = uncond[..., :k] + scale * (cond[..., :k] - uncond[..., :k])
    return jnp.concatenate([guided, cond[..., k:]], axis=-1), None if o.get("v") is None else o["v"][:b]
  return out


METHOD = OriginalDiT()
