"""SiT (METHOD.md §13; flow.py, methods/sit.py): the interpolant and samplers against closed forms
(a Gaussian data distribution has an exact velocity field and flow map), the loss against a hand
computation, training and sampling through the shared modes, REPA's time, the converter's SiT /
REPA kinds and the bad inputs; parity with SiT's own code is test_sit_parity.py's."""
import json
import os

import convert_dit_weights as cdw
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import sit as sit_config
from conftest import tiny_config, with_values
from umd_jax import checks, flow, generate, methods, probe, train
from umd_jax.methods import sit

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "dit_tiny")
M, S = 0.7, 0.5  # data ~ N(M, S²) in every dimension


def converted_config(**overrides):
  """configs/sit.py at the DiT fixture's size: Mu/2 on 8×8×4 inputs (pixels here: no VAE needed), 10 classes."""
  values = {"model.num_classes": 10, "model.dtype": "float32", "model.scan_layers": False, "data.space": "pixels",
            "data.name": "digits", "data.image_size": 8, "data.channels": 4, "data.num_classes": 10,
            "data.eval_split": "test", "data.num_workers": 0, "sample.num_samples": 8, "sample.batch_size": 8,
            "sample.steps": 5, "sample.grid_classes": 2, "sample.grid_per_class": 2, **overrides}
  c = sit_config.get_config("Mu/2")
  with c.unlocked():
    return with_values(c, values)


def gaussian_velocity(x, t):
  """The exact velocity of the linear interpolant for data N(M, S²): m + (t S² - (1 - t)) / σ_t² · (x - t m)."""
  t = t[:, None]
  var = t ** 2 * S ** 2 + (1 - t) ** 2
  return M + (t * S ** 2 - (1 - t)) / var * (x - t * M)


def test_interpolant_target_and_score_follow_sits_linear_path():
  x, noise, t = jnp.array([[2.0]]), jnp.array([[-1.0]]), jnp.array([0.25])
  np.testing.assert_allclose(flow.interpolate(x, noise, t), [[0.25 * 2 - 0.75]])
  np.testing.assert_allclose(flow.velocity_target(x, noise), [[3.0]])
  # the score of N(t M, σ_t²) from the exact velocity
  xt, tt = jnp.linspace(-2, 2, 5)[:, None], jnp.full((5,), 0.3)
  var = 0.3 ** 2 * S ** 2 + 0.7 ** 2
  np.testing.assert_allclose(flow.score_from_velocity(gaussian_velocity(xt, tt), xt, tt), -(xt - 0.3 * M) / var,
                             rtol=1e-5, atol=1e-6)


def test_ode_samplers_reach_the_exact_flow_map_at_their_order():
  """The flow map of N(0, 1) -> N(M, S²) is x -> M + S·x: Euler converges at first order, Heun at second."""
  z = jax.random.normal(jax.random.PRNGKey(0), (64, 3))
  exact = M + S * z
  err = {(m, n): float(jnp.abs(flow.ode_sample(gaussian_velocity, z, steps=n, method=m) - exact).max())
         for m in flow.ODE_METHODS for n in (21, 41)}
  assert err["heun", 41] < 5e-4 and err["euler", 41] < 6e-2
  assert 1.7 < err["euler", 21] / err["euler", 41] < 2.3      # first order: half the step, half the error
  assert 3.4 < err["heun", 21] / err["heun", 41] < 4.6        # second order: a quarter


def test_sde_step_is_sits_euler_maruyama_and_samples_the_data_distribution():
  steps, h = 4, 0.04
  x0, z = jnp.array([[0.3]]), jnp.array([[[0.5]], [[-1.0]], [[2.0]]])
  ts = np.linspace(0, 1 - h, steps)
  x, dt = 0.3, ts[1] - ts[0]
  v = lambda x, t: float(gaussian_velocity(jnp.array([[x]]), jnp.array([t]))[0, 0])
  for t, zi in zip(ts[:-1], [0.5, -1.0, 2.0]):                 # by hand, SiT's integrators.py
    drift = v(x, t) + (1 - t) * (t * v(x, t) - x) / (1 - t)   # v + w_t · score, w_t = 1 - t
    x = x + drift * dt + np.sqrt(2 * (1 - t) * dt) * zi
  x = x + (v(x, ts[-1]) + (ts[-1] * v(x, ts[-1]) - x)) * h    # the "Mean" last step
  got = flow.sde_sample(gaussian_velocity, x0, steps=steps, last_step_size=h, increments=z)
  np.testing.assert_allclose(got, [[x]], rtol=1e-5)
  samples = flow.sde_sample(gaussian_velocity, jax.random.normal(jax.random.PRNGKey(1), (20000, 1)),
                            jax.random.PRNGKey(2), steps=250)
  assert abs(float(samples.mean()) - M) < 0.02 and abs(float(samples.std()) - S) < 0.02


def test_loss_equals_the_hand_computation():
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 2, 2, 1))
  labels = jnp.array([1, 2, 3, 4])
  seen = {}

  def model(xt, t, y):
    seen.update(xt=xt, t=t, y=y)
    return dict(eps=0.5 * xt)

  key = jax.random.PRNGKey(5)
  loss, metrics = sit.flow_loss(model, x, labels, key, null_label=10, label_dropout=0.5, num_buckets=4)
  keys = [jax.random.fold_in(key, i) for i in range(4)]
  t = np.array([jax.random.uniform(jax.random.fold_in(k, 0), ()) for k in keys])
  noise = np.stack([jax.random.normal(jax.random.fold_in(k, 1), (2, 2, 1)) for k in keys])
  drop = np.array([jax.random.uniform(jax.random.fold_in(k, 2), ()) < 0.5 for k in keys])
  xt = t[:, None, None, None] * np.asarray(x) + (1 - t[:, None, None, None]) * noise
  np.testing.assert_allclose(seen["t"], t)
  np.testing.assert_allclose(seen["xt"], xt, rtol=1e-6)
  np.testing.assert_array_equal(seen["y"], np.where(drop, 10, [1, 2, 3, 4]))
  per = ((0.5 * xt - (np.asarray(x) - noise)) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(loss, per.mean(), rtol=1e-6)
  buckets = np.minimum((t * 4).astype(int), 3)
  np.testing.assert_allclose(metrics["bucket_sum"], [per[buckets == b].sum() for b in range(4)], rtol=1e-6)


class _Fake:
  """A 'network' whose first channels are f(x, t) = x · t + 1 (labels ignored)."""

  def __call__(self, x, t, labels=None):
    return dict(eps=x * t[:, None, None, None] + 1.0, v=None)


def test_repas_time_is_turned_into_sits():
  """sit.time = "repa": the network is told 1 - t and its velocity points the other way."""
  noise = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 2, 1))
  for sampler in ("ode_euler", "sde"):
    config = converted_config(**{"sit.time": "repa", "sample.sampler": sampler, "sample.steps": 6,
                                 "model.num_classes": 0, "sample.cfg_scale": 1.0})
    got = sit.METHOD.sample(config, None, _Fake, None, noise, jax.random.PRNGKey(1))
    velocity = lambda x, t: -(x * (1.0 - t)[:, None, None, None] + 1.0)
    if sampler == "sde":
      want = flow.sde_sample(velocity, noise, jax.random.PRNGKey(1), steps=6)
    else:
      want = flow.ode_sample(velocity, noise, steps=6, method="euler")
    np.testing.assert_allclose(got, want, rtol=1e-6)
  _, told = sit.METHOD.noised(config, _Schedule(), noise, jnp.array([0, 500]), noise)
  np.testing.assert_allclose(told, [0.0, 0.5])  # REPA's time of s = 1 - t/T


class _Schedule:
  num_timesteps = 1000


def test_sit_trains_samples_with_every_sampler_and_probes(tmp_path):
  config = tiny_config("sit", **{"model.num_classes": 10, "corruption.label_dropout": 0.1})
  out = train.pretrain(config, str(tmp_path / "w"), devices=jax.devices()[:2])
  assert np.isfinite(out["last_loss"])
  results = {}
  for sampler in sit.SAMPLERS:
    c = tiny_config("sit", **{"model.num_classes": 10, "sample.num_samples": 8, "sample.batch_size": 8,
                              "sample.steps": 4, "sample.cfg_scale": 2.0, "sample.sampler": sampler,
                              "sample.grid_classes": 2, "sample.grid_per_class": 2})
    r = generate.run(c, str(tmp_path / "w"), devices=jax.devices()[:2])
    results[sampler] = np.load(r["npz"])["arr_0"]
    again = np.load(generate.run(c, str(tmp_path / "w"), devices=jax.devices()[:2])["npz"])["arr_0"]
    np.testing.assert_array_equal(results[sampler], again)  # same seed, same samples
    with open(tmp_path / "w" / "samples" / "result.json") as f:
      assert json.load(f)["sampler"] == sampler
  assert not np.array_equal(results["sde"], results["ode_euler"])
  p = probe.run(tiny_config("sit", **{"model.num_classes": 10, "probe.eval_split": "test", "probe.linear": False,
                                      "probe.fewshot_shots": (1,), "probe.fewshot_seeds": 1, "probe.t": 100,
                                      "probe.block": 1}), str(tmp_path / "w"), devices=jax.devices()[:2])
  assert p["feature"] == {"t": 100, "block": 1} and 0 <= p["fewshot"][1]["mean"] <= 1


@pytest.mark.parametrize("method,overrides,message", [
    ("umd", {"sample.sampler": "sde"}, "sample.sampler='sde' is not one of method 'umd''s: use one of ('ddim', "
     "'ddpm') ('sde' is method sit / sit_umd's)"),
    ("sit", {"sample.sampler": "ddim"}, "sample.sampler='ddim' is not one of method 'sit''s: use one of ('sde', "
     "'ode_euler', 'ode_heun') ('ddim' is method umd / dit / maskdit / mae / diffmae / dit_original's)"),
    ("sit", {"sample.cfg_scale": 2.0}, "sample.cfg_scale=2.0 needs a class-conditional model"),
    ("sit", {"sample.inpaint": "center"}, "method 'sit' does not inpaint (it is no Inpainter"),
    ("sit", {"sample.steps": 1}, "sample.steps=1 must be >= 2"),
    ("sit", {"sit.last_step_size": 1.0}, "sit.last_step_size=1.0"),
    ("sit", {"sit.time": "edm"}, "sit.time='edm': use one of ('sit', 'repa')"),
])
def test_bad_sampling_requests_are_one_clear_line(method, overrides, message):
  config = tiny_config(method, **{"sample.num_samples": 8, **overrides})
  with pytest.raises(checks.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    checks.check(config, "generate")


def test_repa_weights_cannot_train_here():
  with pytest.raises(checks.ConfigError, match="sit.time='repa' is for converted REPA weights"):
    checks.check(tiny_config("sit", **{"sit.time": "repa"}), "pretrain")


def _with_projectors(tmp_path):
  """The DiT fixture's weights plus a REPA-like projector head (3 linear layers), as DiT's key names."""
  state, _ = cdw.read_source(FIXTURE)
  state["pos_embed"] = cdw.dit.positions(32, 4)[None]
  rng = np.random.default_rng(0)
  for i, (a, b) in enumerate(((32, 16), (16, 16), (16, 8))):
    state[f"projectors.0.{2 * i}.weight"] = rng.normal(size=(b, a)).astype(np.float32)
    state[f"projectors.0.{2 * i}.bias"] = np.zeros(b, np.float32)
  path = str(tmp_path / "repa.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
  return path


def test_the_converter_tells_repa_from_sit(tmp_path):
  src = _with_projectors(tmp_path)
  with pytest.raises(cdw.ConversionError, match="holds REPA's projector heads .*convert it with --kind repa"):
    cdw.convert(src, str(tmp_path / "a"), kind="sit", config=converted_config())
  assert not os.path.exists(tmp_path / "a")
  with pytest.raises(cdw.ConversionError, match="has no projector heads .*--kind sit"):
    cdw.convert(FIXTURE, str(tmp_path / "b"), kind="repa", config=converted_config(**{"sit.time": "repa"}))
  info = cdw.convert(src, str(tmp_path / "c"), kind="repa", config=converted_config(**{"sit.time": "repa"}))
  assert info["method"] == "sit" and info["dropped"].startswith("REPA's projector heads: 6 tensors (936 parameters)")
  from umd_jax import checkpoint
  assert checkpoint.load_config(str(tmp_path / "c")).sit.time == "repa"


def test_a_converted_sit_samples_and_its_weights_say_sit(tmp_path):
  info = cdw.convert(FIXTURE, str(tmp_path / "w"), kind="sit", config=converted_config())
  assert (info["method"], info["learn_sigma"]) == ("sit", True)
  config = converted_config(**{"sample.cfg_scale": 1.5})
  out = generate.run(config, str(tmp_path / "w"), devices=jax.devices()[:1])
  assert np.load(out["npz"])["arr_0"].shape == (8, 8, 8, 4)
  assert methods.get(config).name == "sit"


def test_class_conditional_fine_tuning_from_an_unconditional_sit(tmp_path):
  """--mode=finetune from a self-supervised SiT: its label table (1 row) is made anew with 11."""
  train.pretrain(tiny_config("sit"), str(tmp_path / "pre"), devices=jax.devices()[:1])
  config = tiny_config("sit", **{"model.num_classes": 10, "corruption.label_dropout": 0.1,
                                 "init_from": str(tmp_path / "pre")})
  out = train.finetune(config, str(tmp_path / "ft"), devices=jax.devices()[:1])
  assert np.isfinite(out["last_loss"])
  assert out["state"].params["y_embedder"]["embedding"].shape == (11, 32)


def test_sit_on_the_umd_network_trains_samples_probes_and_counts_its_flops(tmp_path):
  """Method sit_umd: SiT's objective on the UMD auto-encoder (unmasked), through the same modes."""
  config = tiny_config("sit_umd", **{"model.num_classes": 10, "corruption.label_dropout": 0.1})
  out = train.pretrain(config, str(tmp_path / "w"), devices=jax.devices()[:2])
  assert np.isfinite(out["last_loss"]) and set(out["state"].params) >= {"encoder", "decoder", "label_embed"}
  c = tiny_config("sit_umd", **{"model.num_classes": 10, "sample.num_samples": 8, "sample.batch_size": 8,
                                "sample.steps": 4, "sample.cfg_scale": 2.0, "sample.sampler": "ode_heun",
                                "sample.grid_classes": 2, "sample.grid_per_class": 2})
  samples = np.load(generate.run(c, str(tmp_path / "w"), devices=jax.devices()[:2])["npz"])["arr_0"]
  assert samples.shape == (8, 8, 8, 1)
  p = probe.run(tiny_config("sit_umd", **{"model.num_classes": 10, "probe.eval_split": "test", "probe.linear": False,
                                          "probe.fewshot_shots": (1,), "probe.fewshot_seeds": 1, "probe.t": 100}),
                str(tmp_path / "w"), devices=jax.devices()[:2])
  assert p["feature"] == {"t": 100, "block": -1}
  # the UMD network unmasked: every token through encoder and decoder, as UMD's noised step without masking
  dit_preset = tiny_config("dit", **{"model.num_classes": 10})
  assert methods.get(config).train_flops_per_image(config) == methods.get(dit_preset).train_flops_per_image(dit_preset)
