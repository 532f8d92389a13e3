"""Flow matching with SiT's linear stochastic interpolant (METHOD.md §13): pure functions, no model.

SiT's conventions (transport/path.py ICPlan, transport/transport.py, transport/integrators.py of
github willisma/SiT): time t in [0, 1] runs from noise (t = 0) to data (t = 1); x_t = t·x + (1 - t)·ε;
the network predicts the velocity u = x - ε; the loss is the unweighted mean squared error. Samplers
integrate from t = 0 to 1 on SiT's grid of `steps` points (linspace(0, 1, steps): steps - 1 intervals):
* ODE, Euler: x += dt · v(x, t) on each interval; Heun (torchdiffeq's heun2): the Euler
  predictor, then the mean of the two slopes;
* SDE, Euler-Maruyama, SiT's defaults: diffusion coefficient w_t = norm · (1 - t) ("sigma"), drift
  v + w_t · score with score = (t·v - x) / (1 - t) from the velocity, grid linspace(0, 1 - h, steps)
  with h the last step's size (0.04), x += drift·dt + sqrt(2·w_t·dt)·z on each interval, then the
  "Mean" last step x + drift(x, 1 - h)·h without noise.
Every sampler is one `lax.scan`.
"""
import jax
import jax.numpy as jnp

ODE_METHODS = ("euler", "heun")


def _bcast(t, x):
  return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x, noise, t):
  """x_t = t·x + (1 - t)·noise for per-sample times t (B,)."""
  t = _bcast(t, x)
  return t * x + (1.0 - t) * noise


def velocity_target(x, noise):
  """What the network learns to predict: d x_t / dt = x - noise."""
  return x - noise


def score_from_velocity(v, x_t, t):
  """SiT's get_score_from_velocity for the linear path: (t·v - x_t) / (1 - t)."""
  t = _bcast(t, x_t)
  return (t * v - x_t) / (1.0 - t)


def grid(steps: int, end: float = 1.0) -> jnp.ndarray:
  """SiT's time grid: `steps` points from 0 to `end` (steps - 1 intervals)."""
  return jnp.linspace(0.0, end, steps, dtype=jnp.float32)


def _times(t, x):
  return jnp.full((x.shape[0],), t, jnp.float32)


def ode_sample(velocity, noise, *, steps: int, method: str = "euler"):
  """Integrate dx/dt = velocity(x, t) from noise at t = 0 to t = 1 (Euler or Heun) on SiT's grid."""
  ts = grid(steps)

  def body(x, interval):
    t, t_next = interval
    dt = t_next - t
    k1 = velocity(x, _times(t, x))
    if method == "euler":
      return x + dt * k1, None
    k2 = velocity(x + dt * k1, _times(t_next, x))
    return x + 0.5 * dt * (k1 + k2), None

  x, _ = jax.lax.scan(body, noise, (ts[:-1], ts[1:]))
  return x


def sde_drift(velocity, x, t, norm: float):
  """SiT's SDE drift v + w_t · score, w_t = norm·(1 - t), the score from the velocity."""
  v = velocity(x, t)
  return v + norm * (1.0 - _bcast(t, x)) * score_from_velocity(v, x, t)


def sde_sample(velocity, noise, key=None, *, steps: int, last_step_size: float = 0.04, norm: float = 1.0,
               increments=None):
  """Euler-Maruyama from t = 0 to 1 - last_step_size on `steps` grid points, then SiT's "Mean"
  last step. `increments` (steps - 1, *noise.shape): the standard normal draws of each step (for
  parity with a reference); by default drawn from `key`, one fold per step."""
  ts = grid(steps, 1.0 - last_step_size)
  dt = ts[1] - ts[0]

  def body(x, step):
    t, i = step
    # each step's draw made where it is used: all of them at once would be steps × the batch's size
    z = increments[i] if increments is not None else jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    w = norm * (1.0 - t)
    return x + sde_drift(velocity, x, _times(t, x), norm) * dt + jnp.sqrt(2.0 * w * dt) * z, None

  x, _ = jax.lax.scan(body, noise, (ts[:-1], jnp.arange(steps - 1)))
  return x + sde_drift(velocity, x, _times(ts[-1], x), norm) * last_step_size
