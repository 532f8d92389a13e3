"""DDPM noise schedules and the forward process (METHOD.md §4); pure functions of arrays.

Tables are computed in float64 on the host and stored as float32 device arrays.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from umd_jax.rules import ConfigError

SCHEDULES = ("cosine", "linear")
# Where the noise exponent ρ acts (METHOD.md §9): "variance": 1 - ᾱ_t -> (1 - ᾱ_t)^ρ (this code's
# reading); "beta": β_t -> β_t^ρ, ᾱ_t = Π(1 - β_s^ρ) (one unofficial DiffMAE re-implementation's).
RHO_FORMS = ("variance", "beta")


def check_schedule(name: str, noise_exponent: float = 1.0, rho_form: str = "variance") -> None:
  """The rule on diffusion.schedule, noise_exponent and rho_form (checks.py calls it before work)."""
  if name not in SCHEDULES:
    raise ConfigError(f"diffusion.schedule={name!r}: use 'cosine' (pixels) or 'linear' (latents)")
  if not noise_exponent > 0:
    raise ConfigError(f"diffusion.noise_exponent={noise_exponent!r} must be > 0 (1: the plain schedule)")
  if rho_form not in RHO_FORMS:
    raise ConfigError(f"diffusion.rho_form={rho_form!r}: use 'variance' (1 - abar -> (1 - abar)^rho) or "
                      "'beta' (beta -> beta^rho)")


def check_steps(steps: int, num_timesteps: int) -> None:
  """The rule on sample.steps: any count of timesteps from 1 to T."""
  if not 1 <= steps <= num_timesteps:
    raise ConfigError(f"sample.steps={steps} must be in [1, {num_timesteps}] (the number of timesteps T)")


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """abar(u) = cos²((u + s) / (1 + s) · π/2), betas clipped at `max_beta` (improved DDPM)."""
  f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  betas = np.minimum(1.0 - f(u[1:]) / f(u[:-1]), max_beta)
  return np.cumprod(1.0 - betas)


def linear_alphas_cumprod(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """Linear betas (DDPM), rescaled to T steps as in ADM / DiT."""
  scale = 1000 / num_timesteps
  betas = np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)
  return np.cumprod(1.0 - betas)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Per-timestep tables, index t in [0, T)."""
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_mean_coef_x0: jax.Array
  posterior_mean_coef_xt: jax.Array

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])


def make_schedule(name: str, num_timesteps: int = 1000, noise_exponent: float = 1.0,
                  rho_form: str = "variance") -> Schedule:
  """The tables of schedule `name` with the exponent ρ DiffMAE puts on the linear schedule
  (METHOD.md §9), read as `rho_form` says: "variance" raises the noise variance,
  1 - abar'_t = (1 - abar_t)^ρ; "beta" raises each step's beta, abar'_t = Π_{s<=t} (1 - β_s^ρ).
  ρ < 1 adds noise at every t under both; ρ = 1 is the schedule itself under both."""
  check_schedule(name, noise_exponent, rho_form)
  abar = cosine_alphas_cumprod(num_timesteps) if name == "cosine" else linear_alphas_cumprod(num_timesteps)
  if noise_exponent != 1.0 and rho_form == "variance":
    abar = 1.0 - (1.0 - abar) ** noise_exponent
  elif noise_exponent != 1.0:
    betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
    abar = np.cumprod(1.0 - betas ** noise_exponent)
  return schedule_from_alphas_cumprod(abar)


def schedule_from_alphas_cumprod(abar: np.ndarray) -> Schedule:
  """The tables of the process whose ᾱ_t are `abar` (float64, decreasing)."""
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  betas = 1.0 - abar / abar_prev
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return Schedule(
      betas=f32(betas), alphas_cumprod=f32(abar), alphas_cumprod_prev=f32(abar_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(abar)), sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1 - abar)),
      posterior_variance=f32(post_var),
      posterior_mean_coef_x0=f32(betas * np.sqrt(abar_prev) / (1.0 - abar)),
      posterior_mean_coef_xt=f32((1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)))


def from_config(config) -> Schedule:
  """The schedule of `config.diffusion` (every mode builds it here)."""
  d = config.diffusion
  return make_schedule(d.schedule, d.num_timesteps, d.noise_exponent, d.rho_form)


CLEAN_INDEX = 0  # the timestep index of the clean step (UMD, MAE); never used while sampling


def network_timestep(t: jax.Array) -> jax.Array:
  """Diffusion timestep t in [0, T) -> the index the network is told: t + 1, because index 0
  (CLEAN_INDEX) is the clean step's. The one place this convention is written."""
  return t + 1


def _bcast(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  return table[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per-sample t of shape (B,)."""
  return (_bcast(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + _bcast(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior(schedule: Schedule, x0: jax.Array, xt: jax.Array, t: jax.Array):
  """Mean and variance of q(x_{t-1} | x_t, x0)."""
  mean = (_bcast(schedule.posterior_mean_coef_x0, t, x0.ndim) * x0
          + _bcast(schedule.posterior_mean_coef_xt, t, x0.ndim) * xt)
  return mean, _bcast(schedule.posterior_variance, t, x0.ndim)


# --- sampling ---------------------------------------------------------------------------------
# `denoise(x_t, t)` -> (x0_hat, eps_hat) for integer timesteps t of shape (B,); the network
# behind it is told t + 1 (index 0 is the clean step). Guidance lives in `guided`.


GRIDS = ("even", "strided")
PREDICTIONS = ("eps", "x0")


def ddim_timesteps(num_timesteps: int, steps: int, grid: str = "even") -> np.ndarray:
  """The timesteps a sampler visits, from T-1 down. "even": `steps` evenly spaced ones ending at
  0 (any count from 1 to T). "strided" (the reference implementation's): T-1, T-1-s, ... with
  stride s = T // steps, `steps` of them, then 0 if not already there, so steps + 1 network
  calls (999, 991, ..., 7, 0 for 125 of 1000)."""
  check_steps(steps, num_timesteps)
  if grid == "strided":
    ts = num_timesteps - 1 - (num_timesteps // steps) * np.arange(steps)
    return (ts if ts[-1] == 0 else np.append(ts, 0)).astype(np.int32)
  if grid != "even":
    raise ValueError(f"sample.timesteps={grid!r}: use one of {GRIDS}")
  if steps == 1:
    return np.array([num_timesteps - 1])
  return np.unique(np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int32))[::-1].copy()


def parameterise(schedule, x, t, x0_head, eps_head, *, prediction: str = "eps", clip: bool = False):
  """(x0, eps) that drive a sampler step, from one head of the network. "eps" (the reference's
  evaluation default): x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar); "x0": the x0 head. x0 is
  clipped to [-1, 1] if asked, then eps is re-derived from it, so the update is consistent with
  the x0 it uses. The other head is ignored."""
  if prediction not in PREDICTIONS:
    raise ValueError(f"sample.prediction={prediction!r}: use one of {PREDICTIONS}")
  ab = _bcast(schedule.alphas_cumprod, t, x.ndim)
  if prediction == "eps":
    x0 = (x - jnp.sqrt(1.0 - ab) * eps_head) / jnp.sqrt(ab)
    if not clip:
      return x0, eps_head
  else:
    x0 = x0_head
  if clip:
    x0 = jnp.clip(x0, -1.0, 1.0)
  return x0, (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)


def ddim_step(denoise, schedule: Schedule, x, t, t_prev, key, *, eta: float = 1.0, clip: bool = False,
              prediction: str = "eps"):
  """One DDIM step from timestep t to t_prev (-1: return the x0 prediction). Returns (x_prev, x0_hat)."""
  tb = jnp.full((x.shape[0],), t)
  x0, eps = parameterise(schedule, x, tb, *denoise(x, tb), prediction=prediction, clip=clip)
  ab = schedule.alphas_cumprod[t]
  ab_prev = jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
  sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
  z = jax.random.normal(key, x.shape, x.dtype)
  x_prev = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(1 - ab_prev - sigma ** 2, 0.0)) * eps + sigma * z
  return jnp.where(t_prev >= 0, x_prev, x0), x0


def ddim_sample(denoise, schedule: Schedule, noise: jax.Array, key: jax.Array, *, steps: int, eta: float = 1.0,
                clip: bool = False, prediction: str = "eps", grid: str = "even"):
  """DDIM (eta 0: deterministic; eta 1: DDPM-like noise) over the timesteps of `grid`, one
  `lax.scan`; the last step returns the x0 prediction."""
  ts = jnp.asarray(ddim_timesteps(schedule.num_timesteps, steps, grid))
  t_prev = jnp.concatenate([ts[1:], jnp.array([-1])])

  def body(x, inputs):
    t, tp, k = inputs
    return ddim_step(denoise, schedule, x, t, tp, k, eta=eta, clip=clip, prediction=prediction)[0], None

  x, _ = jax.lax.scan(body, noise, (ts, t_prev, jax.random.split(key, len(ts))))
  return x


def ddpm_sample(denoise, schedule: Schedule, noise: jax.Array, key: jax.Array, *, clip: bool = False,
                prediction: str = "eps"):
  """Ancestral DDPM over all T steps: x_{t-1} ~ q(x_{t-1} | x_t, x0_hat) with the posterior variance."""
  ts = jnp.arange(schedule.num_timesteps - 1, -1, -1)
  b = noise.shape[0]

  def body(x, inputs):
    t, k = inputs
    tb = jnp.full((b,), t)
    x0, _ = parameterise(schedule, x, tb, *denoise(x, tb), prediction=prediction, clip=clip)
    mean, var = q_posterior(schedule, x0, x, tb)
    return mean + jnp.where(t > 0, jnp.sqrt(var), 0.0) * jax.random.normal(k, x.shape, x.dtype), None

  x, _ = jax.lax.scan(body, noise, (ts, jax.random.split(key, len(ts))))
  return x


def respaced(schedule: Schedule, steps: int):
  """ADM's `space_timesteps(T, str(steps))` (DiT's 250-step sampling): `steps` timesteps evenly
  spaced over [0, T-1] (rounded half to even, as ADM), and the process on them alone, whose
  betas are 1 - ᾱ_{t_i}/ᾱ_{t_{i-1}}. Returns (the respaced Schedule, the original timestep of each
  of its steps, what the network is told)."""
  T = schedule.num_timesteps
  check_steps(steps, T)
  stride = (T - 1) / (steps - 1) if steps > 1 else 0.0
  kept = sorted({int(round(i * stride)) for i in range(steps)})
  abar = np.asarray(schedule.alphas_cumprod, np.float64)[kept]
  return schedule_from_alphas_cumprod(abar), np.asarray(kept, np.int32)


def learned_variance_sample(model_out, schedule: Schedule, noise: jax.Array, key: jax.Array, *, steps: int,
                            clip: bool = False):
  """Ancestral DDPM with a learned variance (improved DDPM / ADM / DiT) over `steps` respaced
  timesteps: model_out(x_t, t) -> (eps, v), t the original timestep; x0 from eps; the variance
  exp(frac·log β_i + (1 - frac)·log β̃_i) with frac = (v + 1)/2 on the respaced process (β̃ the
  posterior variance, its first entry replaced by the second, as ADM clips it)."""
  spaced, timesteps = respaced(schedule, steps)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)[timesteps]  # host tables (not traced)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  betas = 1.0 - abar / abar_prev
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  min_log = jnp.asarray(np.log(np.append(post_var[1] if len(post_var) > 1 else post_var[0], post_var[1:])),
                        jnp.float32)
  max_log = jnp.asarray(np.log(betas), jnp.float32)
  b = noise.shape[0]

  def body(x, inputs):
    i, t, k = inputs
    ib = jnp.full((b,), i)
    eps, v = model_out(x, jnp.full((b,), t))
    x0, _ = parameterise(spaced, x, ib, eps, eps, prediction="eps", clip=clip)
    mean, _ = q_posterior(spaced, x0, x, ib)
    frac = (v + 1.0) / 2.0
    log_var = frac * max_log[i] + (1.0 - frac) * min_log[i]
    z = jax.random.normal(k, x.shape, x.dtype)
    return mean + jnp.where(i > 0, jnp.exp(0.5 * log_var), 0.0) * z, None

  order = np.arange(len(timesteps) - 1, -1, -1)
  x, _ = jax.lax.scan(body, noise, (jnp.asarray(order), jnp.asarray(timesteps[order]),
                                    jax.random.split(key, len(order))))
  return x


def inpaint_sample(denoise, schedule: Schedule, images, known, noise, key, *, steps: int, eta: float = 1.0,
                   clip: bool = False, resample: int = 1, prediction: str = "eps", grid: str = "even"):
  """Fill the unknown region (known == 0) by DDIM sampling with the known region held to its
  ground truth noised to the current timestep (RePaint); each step is redone `resample` times,
  re-noising one step back in between. The known pixels of the result equal `images` exactly."""
  ts = jnp.asarray(ddim_timesteps(schedule.num_timesteps, steps, grid))
  t_prev = jnp.concatenate([ts[1:], jnp.array([-1])])

  def merge(x, t, k):  # known region at the noise level of timestep t (t = -1: clean)
    tb = jnp.full((x.shape[0],), jnp.maximum(t, 0))
    noised = jnp.where(t >= 0, q_sample(schedule, images, tb, jax.random.normal(k, x.shape, x.dtype)), images)
    return known * noised + (1 - known) * x

  def body(x, inputs):
    t, tp, k = inputs

    def once(r, x):
      kr = jax.random.fold_in(k, r)
      k_step, k_known, k_back = jax.random.split(kr, 3)
      x_prev = merge(ddim_step(denoise, schedule, x, t, tp, k_step, eta=eta, clip=clip, prediction=prediction)[0],
                     tp, k_known)
      # Back to t (q(x_t | x_t_prev)) for another pass, except after the last one.
      ab_ratio = schedule.alphas_cumprod[t] / jnp.where(tp >= 0, schedule.alphas_cumprod[jnp.maximum(tp, 0)], 1.0)
      back = jnp.sqrt(ab_ratio) * x_prev + jnp.sqrt(1 - ab_ratio) * jax.random.normal(k_back, x.shape, x.dtype)
      return jnp.where(r < resample - 1, back, x_prev)

    return jax.lax.fori_loop(0, resample, once, x), None

  x, _ = jax.lax.scan(body, merge(noise, ts[0], key), (ts, t_prev, jax.random.split(key, len(ts))))
  return known * images + (1 - known) * x


def guided(apply, labels: jax.Array, null_label: int, scale: float):
  """Classifier-free guidance: conditional and null-label halves in one doubled batch,
  out = uncond + scale · (cond - uncond) on both heads. apply(x, t_index, labels) -> (x0, eps)."""
  def denoise(x, t):
    if scale == 1.0:
      return apply(x, network_timestep(t), labels)
    both = apply(jnp.concatenate([x, x]), network_timestep(jnp.concatenate([t, t])),
                 jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    b = x.shape[0]
    return tuple(u[b:] + scale * (u[:b] - u[b:]) for u in both)
  return denoise
