"""Parity with SiT's own code (github willisma/SiT) on a committed golden fixture that
tests/make_sit_fixture.py made with it: a tiny random SiT converted by tools/convert_dit_weights.py
--kind sit gives SiT's velocity at continuous t, SiT's training loss for the same (t, noise), and
the same trajectory ends of the ODE (Euler, Heun) and SDE (Euler-Maruyama, SiT's last step)
samplers with SiT's 3-channel classifier-free guidance, from the same noise (the SDE's increments
recorded in the fixture)."""
import json
import os

import convert_dit_weights as cdw
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_sit import converted_config
from umd_jax import flow, sharding, weights
from umd_jax.methods import dit_original, sit

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "sit_tiny")
GOLDEN = np.load(os.path.join(FIXTURE, "golden.npz"))
TOPOLOGY = json.load(open(os.path.join(FIXTURE, "topology.json")))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sit") / "w")
  info = cdw.convert(os.path.join(FIXTURE, "sit.safetensors"), workdir, kind="sit", config=converted_config())
  assert (info["variant"], info["learn_sigma"], info["num_classes"]) == ("Mu/2", True, 10)
  config = converted_config(**{"sample.cfg_scale": TOPOLOGY["cfg_scale"], "sample.steps": TOPOLOGY["steps"]})
  graphdef, params = weights.load(config, workdir, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  return config, graphdef, params


def _close(ours, theirs, rel=2e-5):
  scale = np.abs(theirs).max()
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=rel, atol=rel * scale)


def test_velocity_equals_sits(converted):
  config, graphdef, params = converted
  out = nnx.merge(graphdef, params)(jnp.asarray(GOLDEN["x"]), jnp.asarray(GOLDEN["t"]), jnp.asarray(GOLDEN["y"]))
  _close(out["eps"], GOLDEN["velocity"][..., :4])  # SiT's forward keeps the first C of its 2C channels


def test_training_loss_equals_sits_for_the_same_draws(converted):
  config, graphdef, params = converted
  model = nnx.merge(graphdef, params)
  data, noise, t = (jnp.asarray(GOLDEN[k]) for k in ("data", "noise", "t_loss"))
  v = model(flow.interpolate(data, noise, t), t, jnp.arange(4))["eps"]
  _close(jnp.mean(jnp.square(v - flow.velocity_target(data, noise)), axis=(1, 2, 3)), GOLDEN["loss"])


@pytest.mark.parametrize("sampler", sit.SAMPLERS)
def test_sampler_trajectory_ends_equal_sits(converted, sampler):
  config, graphdef, params = converted
  make_model = lambda: nnx.merge(graphdef, params)
  labels = jnp.asarray(GOLDEN["labels"])
  with config.unlocked():
    config.sample.sampler = sampler
  if sampler == "sde":  # SiT's recorded increments through the same drift, guidance and last step
    out = dit_original.cfg_outputs(config, make_model, labels)
    got = flow.sde_sample(lambda x, t: out(x, t)[0], jnp.asarray(GOLDEN["z"]), steps=TOPOLOGY["steps"],
                          increments=jnp.asarray(GOLDEN["increments"]))
  else:
    got = sit.METHOD.sample(config, None, make_model, labels, jnp.asarray(GOLDEN["z"]), jax.random.PRNGKey(0))
  _close(got, GOLDEN[sampler], rel=1e-4)  # a few network calls of float32 rounding, compounded
