"""SiT (Ma et al., arXiv 2401.08740; METHOD.md §13): flow matching with the linear stochastic
interpolant and velocity prediction (umd_jax/flow.py) on Peebles' DiT network (models/dit.py, the
same network as SiT's models.py). Trained here from scratch, sampled by ODE (Euler, Heun) or SDE
(Euler-Maruyama with SiT's last step), and the converted public SiT-XL/2 and REPA SiT-XL/2 weights
(tools/convert_dit_weights.py --kind sit | repa) sample and probe through the same code. The
network's first C output channels are the velocity (the other C, with dit.learn_sigma, are unused,
as in SiT's forward).
"""
import jax
import jax.numpy as jnp

from umd_jax import flow, geometry, rules
from umd_jax.methods import dit_original, umd
from umd_jax.methods.common import section

SAMPLERS = ("sde", "ode_euler", "ode_heun")
TIMES = ("sit", "repa")  # what the network is told: SiT's t (0 noise -> 1 data) or REPA's (1 noise -> 0 data)


def flow_loss(model, x, labels, key, *, null_label: int, label_dropout: float = 0.0, num_buckets: int = 10,
              sample_ids=None):
  """SiT's training loss and its parts. model(x_t, t, labels) -> dict(eps=first C channels). Per
  sample: t ~ U[0, 1), noise ~ N(0, I), the label dropped to `null_label` with `label_dropout` (labels
  None: unconditional); each drawn from fold_in(key, its `sample_ids` entry; default its row), so
  gradient accumulation draws what the full batch draws. Loss: mean over all of (v - (x - noise))²."""
  ids = jnp.arange(x.shape[0]) if sample_ids is None else sample_ids
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
  per_sample = lambda purpose, draw: jax.vmap(lambda k: draw(jax.random.fold_in(k, purpose)))(keys)
  t = per_sample(0, lambda k: jax.random.uniform(k, (), jnp.float32))
  noise = per_sample(1, lambda k: jax.random.normal(k, x.shape[1:], x.dtype))
  if labels is not None and label_dropout > 0:
    drop = per_sample(2, lambda k: jax.random.uniform(k, ())) < label_dropout
    labels = jnp.where(drop, null_label, labels)
  v = model(flow.interpolate(x, noise, t), t, labels)["eps"]
  per_image = jnp.mean(jnp.square(v - flow.velocity_target(x, noise)), axis=(1, 2, 3))
  loss = per_image.mean()
  onehot = jax.nn.one_hot(jnp.minimum((t * num_buckets).astype(jnp.int32), num_buckets - 1), num_buckets)
  return loss, dict(loss_velocity=loss, bucket_sum=onehot.T @ per_image, bucket_count=onehot.sum(axis=0))


class SiTObjective:
  """SiT's objective, whichever network carries it: the flow loss, its preview, probe inputs told
  SiT's time, and the samplers. A method is this and a network (DiTNetwork, UMDNetwork)."""
  objective = ("sit.",)
  samplers = SAMPLERS
  clips = False  # images only

  def add_keys(self, c) -> None:
    c.corruption.label_dropout = 0.0   # class-conditional training: P(label -> null class) (SiT: 0.1)
    s = section(c, "sit")
    s.time = "sit"                     # the time the network was trained with: "sit" (SiT's code: t = 0 noise,
                                       # 1 data, v = x - noise) | "repa" (REPA's code: t = 1 noise, 0 data,
                                       # v = noise - x); samplers integrate in SiT's time either way
    s.last_step_size = 0.04            # SDE: the last step's size, a step without noise (SiT's "Mean")
    s.diffusion_norm = 1.0             # SDE: w_t = norm · (1 - t) (SiT's "sigma" form)

  def configure(self, c) -> None:
    c.sample.sampler = "sde"           # SiT's FID setting: Euler-Maruyama on 250 grid points
    c.sample.steps = 250
    c.sample.clip = False
    c.classify.t = -1                  # the clean image, told t = 1 (data)

  # Trainable
  def loss_fn(self, config, schedule):
    conditional = config.model.num_classes > 0

    def loss(model, images, labels, key, sample_ids=None):
      return flow_loss(model, images, labels if conditional else None, key, null_label=config.model.num_classes,
                       label_dropout=config.corruption.label_dropout, num_buckets=config.corruption.loss_buckets,
                       sample_ids=sample_ids)
    return loss

  def row_split(self, config) -> float:
    return 0.0  # one kind of row

  def preview(self, config, schedule, model, x0, key):
    """The interpolant at t = 1/2 and the one-step data guess x_t + (1 - t)·v."""
    t = jnp.full((x0.shape[0],), 0.5, jnp.float32)
    x_t = flow.interpolate(x0, jax.random.normal(key, x0.shape), t)
    return x_t, x_t + 0.5 * model(x_t, t, None)["eps"]

  # Backbone (DDAE probing and recognition fine-tuning at the noise level a user chooses): the
  # network's blocks as its network mixin reads them, told SiT's time
  def noised(self, config, schedule, images, t, eps):
    """The clean image, or the interpolant at s = 1 - t/T (t a DDPM step, as probes name noise
    levels), told the network's own time for it (SiT: s; REPA: 1 - s)."""
    x, s = dit_original.interpolant_noised(schedule, images, t, eps)
    return x, (1.0 - s if config.sit.time == "repa" else s)

  # Sampler
  def sample(self, config, schedule, make_model, labels, noise, key):
    """sample.sampler: "sde" (Euler-Maruyama, SiT's last step), "ode_euler" or "ode_heun", on
    sample.steps grid points; classifier-free guidance as SiT's forward_with_cfg on the first
    `guided_channels` channels."""
    out = dit_original.cfg_outputs(config, make_model, labels if config.model.num_classes else None,
                                   self.guided_channels(config))
    velocity = lambda x, t: out(x, t)[0]
    if config.sit.time == "repa":  # told REPA's time 1 - t; its velocity points the other way
      velocity = lambda x, t, told=velocity: -told(x, 1.0 - t)
    s = config.sample
    if s.sampler == "sde":
      return flow.sde_sample(velocity, noise, key, steps=s.steps, last_step_size=config.sit.last_step_size,
                             norm=config.sit.diffusion_norm)
    return flow.ode_sample(velocity, noise, steps=s.steps, method=s.sampler.removeprefix("ode_"))

  def check(self, config, mode) -> None:
    try:
      self.patch(config)
    except ValueError as e:
      raise rules.ConfigError(str(e)) from None
    rules.require(config.sit.time in TIMES, "sit.time", config.sit.time, f"use one of {TIMES}")
    rules.require(mode not in ("pretrain", "finetune") or config.sit.time == "sit", "sit.time", config.sit.time,
                  "is for converted REPA weights (sampled and probed here); training here uses SiT's time: 'sit'")
    rules.fraction(config.corruption.label_dropout, "corruption.label_dropout")
    rules.fraction(config.sit.last_step_size, "sit.last_step_size", high_open=True)
    rules.require(config.sit.diffusion_norm >= 0, "sit.diffusion_norm", config.sit.diffusion_norm, "must be >= 0")
    if mode == "generate":
      rules.require(config.sample.steps >= 2, "sample.steps", config.sample.steps,
                    "must be >= 2: SiT's grid has steps points, steps - 1 intervals")


class SiT(SiTObjective, dit_original.DiTNetwork):
  """SiT as published: its objective on Peebles' DiT network (SiT's and REPA's weights convert to it)."""
  name = "sit"
  label_params = ("y_embedder",)
  # What a checkpoint's numbers mean (METHOD.md §12): the path and prediction are fixed (linear, velocity).
  meaning = ("model.variant", "dit.learn_sigma", "dit.mlp_norm_eps", "sit.time")

  def add_keys(self, c) -> None:
    super().add_keys(c)
    dit_original.add_network_keys(c)   # the network's keys (section dit), shared with the original DiT

  def guided_channels(self, config) -> int:
    return config.dit.cfg_channels     # SiT's forward_with_cfg: 3 of the 4 latent channels

  def check(self, config, mode) -> None:
    super().check(config, mode)
    rules.require(config.dit.cfg_channels >= 1, "dit.cfg_channels", config.dit.cfg_channels,
                  "must be >= 1 (SiT guides 3 of the 4 latent channels)")


class SiTOnUMD(SiTObjective, umd.UMDNetwork):
  """SiT's objective on the UMD auto-encoder, unmasked: the velocity is its eps head (its x0 head
  is unused), t enters as the UMD family's timestep does (the frequency embedding of the real t)."""
  name = "sit_umd"
  label_params = ("label_embed",)
  meaning = ("model.variant", "model.conditioning", "sit.time")

  def add_keys(self, c) -> None:
    super().add_keys(c)
    c.model.conditioning = "adaln"     # "adaln" | "in_context" (the UMD network's)

  def guided_channels(self, config) -> int:
    return geometry.input_shape(config)[1]  # all (chosen: the standard guidance)

  def train_flops_per_image(self, config) -> float:
    m = config.model
    size, channels = geometry.input_shape(config)
    return 3.0 * umd.forward_flops(image_size=size, channels=channels, num_registers=m.num_registers,
                                   adaln=m.conditioning == "adaln", num_classes=m.num_classes,
                                   **umd.parse_variant(m.variant))

  def check(self, config, mode) -> None:
    super().check(config, mode)
    umd.model_lib.check_conditioning(config.model.conditioning)
    rules.require(config.sit.time == "sit", "sit.time", config.sit.time, "must be 'sit': REPA's weights are a DiT network's")


METHOD = SiT()
ON_UMD = SiTOnUMD()
