"""The original DiT (METHOD.md §11; models/dit.py, methods/dit_original.py, tools/convert_dit_weights.py):
parity with the reference code on a committed golden fixture (tests/make_dit_fixture.py makes it),
the converter's checks, DiT's sampling (ADM respacing, learned variance, 3-channel guidance), and
probing / sampling a converted network."""
import json
import os
import shutil

import convert_dit_weights as cdw
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from configs import common, dit_original
from umd_jax import checks, diffusion, generate, methods, probe, sharding, weights
from umd_jax.methods import dit_original as dit_original_method
from umd_jax.models import dit

from conftest import with_values
from test_latent import TINY as TINY_VAE, vae_file  # noqa: F401 (the tiny VAE fixture, converted per module)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "dit_tiny")


def tiny(vae_file="", **overrides):
  """configs/dit_original.py at the fixture's size: Mu/2 on 8×8×4 latents of 16 px digits (the
  tiny VAE downsamples by 2), 10 classes, float32."""
  c = dit_original.get_config("Mu/2")
  c.unlock()
  values = {"model.num_classes": 10, "model.dtype": "float32", "model.scan_layers": False, "data.name": "digits",
            "data.image_size": 16, "data.channels": 3, "data.num_classes": 10, "data.eval_split": "test",
            "data.num_workers": 0, "vae.weights": vae_file, "vae.downsample": 2, "vae.batch_size": 64,
            "probe.train_split": "train", "probe.eval_split": "test", "probe.linear": False,
            "probe.fewshot_shots": (1, 5), "probe.fewshot_seeds": 1, "probe.block": 1, "probe.t": 121,
            "sample.num_samples": 8, "sample.batch_size": 8, "sample.steps": 5, "sample.grid_classes": 2,
            "sample.grid_per_class": 2, "sample.inpaint_images": 0, **overrides}
  with_values(c, values)
  c.lock()
  return c


def _forward(config, workdir, x, t, y):
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  graphdef, params = weights.load(config, str(workdir), mesh)
  out = nnx.merge(graphdef, params)(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
  return np.concatenate([out["eps"], out["v"]], axis=-1)


@pytest.mark.parametrize("scan", [False, True])
def test_converted_diffusers_folder_equals_the_reference_code(tmp_path, scan):
  """diffusers folder -> this code's DiT -> the outputs of facebookresearch/DiT's model with the
  same weights, to float32 rounding (relative 1e-5 of the output scale)."""
  info = cdw.convert(FIXTURE, str(tmp_path / "w"), config=tiny(**{"model.scan_layers": scan}))
  assert (info["variant"], info["input_size"], info["channels"], info["num_classes"], info["learn_sigma"]) == (
      "Mu/2", 8, 4, 10, True)
  golden = np.load(os.path.join(FIXTURE, "golden.npz"))
  ours = _forward(tiny(**{"model.scan_layers": scan}), tmp_path / "w", golden["x"], golden["t"], golden["y"])
  scale = np.abs(golden["out"]).max()
  assert scale > 1.0  # the weights were perturbed: gates and outputs are not zero
  np.testing.assert_allclose(ours, golden["out"], rtol=1e-5, atol=1e-5 * scale)


def _original_keyed(tmp_path, pos=None):
  """The fixture's weights as a .safetensors of DiT's own key names (what a .pt holds)."""
  state, meta = cdw.read_source(FIXTURE)
  state["pos_embed"] = (dit.positions(32, 4) if pos is None else pos)[None]
  path = str(tmp_path / "dit_original.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
  return path


def test_dits_own_key_names_give_the_same_weights_and_positions_are_checked(tmp_path):
  cdw.convert(FIXTURE, str(tmp_path / "folder"), config=tiny())
  cdw.convert(_original_keyed(tmp_path), str(tmp_path / "own"), config=tiny())
  mesh = sharding.make_mesh(tiny().mesh, jax.devices()[:1])
  a, b = (weights.load(tiny(), str(tmp_path / d), mesh)[1] for d in ("folder", "own"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  shutil.rmtree(tmp_path / "own")
  wrong = dit.positions(32, 4)[::-1].copy()  # rows in another order: not DiT's table
  with pytest.raises(cdw.ConversionError, match="pos_embed is not DiT's sin-cos table"):
    cdw.convert(_original_keyed(tmp_path, wrong), str(tmp_path / "own"), config=tiny())


def test_the_pt_file_converts_like_the_folder(tmp_path):
  pytest.importorskip("torch")  # optional: the package does not need torch
  cdw.convert(os.path.join(FIXTURE, "dit.pt"), str(tmp_path / "pt"), config=tiny())
  cdw.convert(FIXTURE, str(tmp_path / "folder"), config=tiny())
  mesh = sharding.make_mesh(tiny().mesh, jax.devices()[:1])
  a, b = (weights.load(tiny(), str(tmp_path / d), mesh)[1] for d in ("pt", "folder"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _folder_copy(tmp_path, edit):
  target = tmp_path / "src" / "transformer"
  shutil.copytree(os.path.join(FIXTURE, "transformer"), target)
  path = str(target / "diffusion_pytorch_model.safetensors")
  state = load_file(path)
  edit(state)
  save_file(state, path)
  return str(tmp_path / "src")


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.pop("transformer_blocks.1.attn1.to_k.bias"), "lack 'transformer_blocks.1.attn1.to_k.bias'"),
    (lambda s: s.__setitem__("transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias",
                             s["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"] + 1),
     "differs from block 0's"),
    (lambda s: s.__setitem__("extra.weight", np.zeros(3, np.float32)), "unexpected diffusers keys ['extra.weight']"),
    (lambda s: s.__setitem__("transformer_blocks.0.ff.net.2.weight", np.zeros((32, 64), np.float32)),
     "blocks.0.mlp.fc2.weight has shape (32, 64) in the file, the model needs (32, 128)"),
    (lambda s: s.__setitem__("proj_out_2.weight", np.zeros((5, 32), np.float32)), "final_layer.linear has 5 outputs"),
])
def test_a_wrong_or_partial_file_is_one_clear_error_and_writes_nothing(tmp_path, edit, words):
  src = _folder_copy(tmp_path, edit)
  with pytest.raises(cdw.ConversionError) as e:
    cdw.convert(src, str(tmp_path / "out"), config=tiny())
  assert words in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "out").exists()


def test_converter_command_line_reports_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cdw.main([str(tmp_path), str(tmp_path / "out")])
  assert "is not a diffusers DiT folder" in str(e.value.code)
  cdw.convert(FIXTURE, str(tmp_path / "w"), config=tiny())
  with pytest.raises(cdw.ConversionError, match="is not empty .*convert into a new folder"):
    cdw.convert(FIXTURE, str(tmp_path / "w"), config=tiny())  # run twice


def _one_error_line(argv) -> str:
  with pytest.raises(SystemExit) as e:
    cdw.main(argv)
  message = str(e.value.code)
  assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
  return message


def test_every_converter_failure_is_one_line_and_writes_nothing(tmp_path):
  """A truncated .safetensors, an output that is a file or a pre-training workdir, a wrong tensor
  shape (named by its DiT key), each one `error:` line; the output is left as it was."""
  source = os.path.join(FIXTURE, "transformer", "diffusion_pytorch_model.safetensors")
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(open(source, "rb").read()[:5000])
  assert "could not be read as safetensors" in _one_error_line([str(truncated), str(tmp_path / "a")])
  assert not (tmp_path / "a").exists()
  (tmp_path / "file").write_text("x")
  assert "is a file" in _one_error_line([FIXTURE, str(tmp_path / "file")])
  pretraining = tmp_path / "pre"
  (pretraining / "checkpoints" / "4").mkdir(parents=True)
  assert "is not empty (checkpoints)" in _one_error_line([FIXTURE, str(pretraining)])
  assert sorted(os.listdir(pretraining)) == ["checkpoints"]
  src = _folder_copy(tmp_path, lambda s: s.__setitem__("transformer_blocks.1.attn1.to_out.0.weight",
                                                       np.zeros((32, 16), np.float32)))
  message = _one_error_line([src, str(tmp_path / "b")])
  assert "blocks.1.attn.proj.weight has shape (32, 16) in the file, the model needs (32, 32)" in message, message
  assert not (tmp_path / "b").exists()


class _Tensor:
  """What torch.load gives, as far as the converter reads it: .float().numpy()."""

  def __init__(self, array):
    self.array = array

  def float(self):
    return self

  def numpy(self):
    return self.array.astype(np.float32)


def test_what_a_pt_file_holds_is_a_state_dict_or_one_clear_error():
  """The .pt reader's second half (torch only opens the file): DiT's / REPA's training checkpoint
  with its argparse args takes "ema"; a list or a dict of non-tensors is one clear line."""
  import argparse
  weights_ = {"a.weight": _Tensor(np.ones((2, 2))), "a.bias": _Tensor(np.zeros(2))}
  checkpoint_ = {"model": {"a.weight": _Tensor(np.zeros((2, 2))), "a.bias": _Tensor(np.zeros(2))}, "ema": weights_,
                 "opt": {"state": {}}, "args": argparse.Namespace(model="DiT-XL/2"), "steps": 400000}
  got = cdw.state_dict_of(checkpoint_, "ckpt.pt")
  assert sorted(got) == ["a.bias", "a.weight"] and got["a.weight"].dtype == np.float32 and got["a.weight"].sum() == 4
  for held, words in (([1, 2], "holds a list, not a state dict"), ({"a": 1}, "entry 'a' is not a tensor"),
                      ({}, "holds a dict, not a state dict")):
    with pytest.raises(cdw.ConversionError, match=words):
      cdw.state_dict_of(held, "x.pt")


def test_xl2_has_the_published_parameter_count():
  """DiT-XL/2 at 256 px (32×32×4 latents): 675,129,632 with the fixed position table, as the
  reference code counts them (its pos_embed is a frozen nn.Parameter); a constant here."""
  config = dit_original.get_config()
  graphdef, params = weights.abstract_model(config)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert count + 256 * 1152 == 675_129_632
  assert methods.get(config).num_blocks(config) == 28 and config.probe.block == 13 and config.probe.t == 121


def test_respacing_is_adms():
  schedule = diffusion.make_schedule("linear", 1000)
  spaced, kept = diffusion.respaced(schedule, 250)
  assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
  assert list(kept[:6]) == [0, 4, 8, 12, 16, 20] and list(kept[-3:]) == [991, 995, 999]
  # round half to even, as ADM's space_timesteps: i·999/249
  assert list(kept) == [int(round(i * 999 / 249)) for i in range(250)]
  np.testing.assert_allclose(spaced.alphas_cumprod, np.asarray(schedule.alphas_cumprod)[kept], rtol=1e-6)
  np.testing.assert_allclose(np.cumprod(1 - np.asarray(spaced.betas, np.float64)), spaced.alphas_cumprod, rtol=1e-5)


def test_learned_variance_sampler_against_a_hand_written_adm_loop():
  """3 respaced steps of a fake network (eps = 0.3·x + t/1000, told the original timestep t; v =
  0.5): the sampler equals ADM's p_sample loop written out in float64 with the same noise."""
  schedule = diffusion.make_schedule("linear", 1000)
  key = jax.random.PRNGKey(3)
  noise = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 4, 1))

  def model_out(x, t):
    return 0.3 * x + t[:, None, None, None] / 1000.0, jnp.full_like(x, 0.5)
  got = np.asarray(diffusion.learned_variance_sample(model_out, schedule, noise, key, steps=3))
  kept = [0, 500, 999]  # round(i·999/2)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)[kept]
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  betas = 1 - abar / abar_prev
  post_var = betas * (1 - abar_prev) / (1 - abar)
  min_log = np.log(np.append(post_var[1], post_var[1:]))
  x = np.asarray(noise, np.float64)
  keys = jax.random.split(key, 3)
  for step, i in enumerate([2, 1, 0]):
    eps = 0.3 * x + kept[i] / 1000.0
    x0 = (x - np.sqrt(1 - abar[i]) * eps) / np.sqrt(abar[i])
    mean = (betas[i] * np.sqrt(abar_prev[i]) / (1 - abar[i])) * x0 + (
        (1 - abar_prev[i]) * np.sqrt(1 - betas[i]) / (1 - abar[i])) * x
    log_var = 0.75 * np.log(betas[i]) + 0.25 * min_log[i]
    z = np.asarray(jax.random.normal(keys[step], x.shape), np.float64)
    x = mean + (np.exp(0.5 * log_var) * z if i > 0 else 0)
  np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-5)


def test_guidance_follows_dits_forward_with_cfg():
  """Guidance on the first dit.cfg_channels eps channels; the others and v are the conditional half's."""
  config = tiny(**{"sample.cfg_scale": 3.0})

  class Fake:
    def __call__(self, x, t, labels):
      c = labels[:, None, None, None].astype(jnp.float32)
      return {"eps": jnp.concatenate([x * 0 + c] * 4, axis=-1), "v": x * 0 + 10 * c}
  out = dit_original_method.cfg_outputs(config, lambda: Fake(), jnp.array([2, 4]))
  eps, v = out(jnp.zeros((2, 1, 1, 1)), jnp.array([5, 5]))
  null = 10.0
  expected = np.array([null + 3 * (2 - null), null + 3 * (4 - null)])
  np.testing.assert_allclose(eps[:, 0, 0, :3], np.repeat(expected[:, None], 3, 1))
  np.testing.assert_allclose(eps[:, 0, 0, 3], [2, 4])          # the 4th channel unguided
  np.testing.assert_allclose(v[:, 0, 0, 0], [20, 40])          # the conditional half's variance


def test_sit_inputs_follow_the_linear_interpolant():
  config = tiny(**{"dit.time": "sit"})
  schedule = diffusion.make_schedule("linear", 1000)
  x, eps = jnp.ones((2, 2, 2, 1)), jnp.full((2, 2, 2, 1), -1.0)
  xt, told = methods.get(config).noised(config, schedule, x, jnp.array([0, 250]), eps)
  np.testing.assert_allclose(told, [1.0, 0.75])
  np.testing.assert_allclose(xt[:, 0, 0, 0], [1.0, 0.75 - 0.25])
  clean, told = methods.get(config).noised(config, schedule, x, None, None)
  assert np.all(np.asarray(told) == 1.0) and clean is x
  with pytest.raises(checks.ConfigError, match="SiT samples by integrating its velocity field: convert the weights "
                     "again with tools/convert_dit_weights.py --kind sit"):
    checks.check(config, "generate")


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_the_original_dit_is_not_trained_here(mode):
  with pytest.raises(checks.ConfigError, match="does not train"):
    checks.check(tiny(), mode)


def test_probe_sweep_and_dit_sampling_on_a_converted_network(tmp_path, vae_file):
  """A converted (tiny, random) DiT in latent space: the DDAE sweep with the null label, the probe
  of the configured cell, and DiT's sampling (learned-variance DDPM, guidance), decoded by the VAE."""
  config = tiny(vae_file, **{"probe.sweep": True, "probe.sweep_ts": (0, 121), "sample.cfg_scale": 1.5})
  cdw.convert(FIXTURE, str(tmp_path / "w"), config=config)
  results = probe.run(config, str(tmp_path / "w"), devices=jax.devices()[:2])
  assert results["feature"] == {"t": 121, "block": 1} and results["step"] == 0
  assert results["sweep"]["blocks"] == [-1, 0, 1] and np.asarray(results["sweep"]["accuracy"]).shape == (3, 2)
  assert 0 <= results["fewshot"][5]["mean"] <= 1
  out = generate.run(config, str(tmp_path / "w"), devices=jax.devices()[:2])
  samples = np.load(out["npz"])
  assert samples["arr_0"].shape == (8, 16, 16, 3) and samples["arr_0"].dtype == np.uint8
  with open(tmp_path / "w" / "samples" / "result.json") as f:
    assert json.load(f)["step"] == 0


def test_dit_original_config_is_dits_protocol():
  c = dit_original.get_config()
  assert (c.model.variant, c.data.space, c.data.image_size, c.model.num_classes) == ("XL/2", "latents", 256, 1000)
  assert (c.sample.sampler, c.sample.steps, c.sample.cfg_scale, c.sample.num_samples) == ("ddpm", 250, 1.5, 50_000)
  assert (c.dit.cfg_channels, c.dit.mlp_norm_eps, c.sample.clip, c.diffusion.schedule) == (3, 1e-6, False, "linear")
  cifar = dit_original.get_config("ddae_cifar10")
  assert (cifar.data.name, cifar.probe.block, cifar.probe.t, cifar.data.num_classes) == ("cifar10", 13, 121, 10)
  assert dit_original.get_config("ddae_tiny").probe.t == 81
  assert common.base_config("dit_original").classify.t == 0


def test_sit_weights_are_read_only_as_sit(tmp_path):
  """A workdir converted with --kind sit is method 'sit': a DiT config refuses it (another objective's
  numbers), and a SiT config with REPA's time refuses it too."""
  import test_sit
  cdw.convert(FIXTURE, str(tmp_path / "sit"), kind="sit", config=test_sit.converted_config())
  mesh = sharding.make_mesh(tiny().mesh, jax.devices()[:1])
  with pytest.raises(Exception, match="holds weights of method 'sit' .*read here as method 'dit_original'"):
    weights.load(tiny(), str(tmp_path / "sit"), mesh)
  with pytest.raises(Exception, match="written with sit.time='sit', read here with sit.time='repa'"):
    weights.load(test_sit.converted_config(**{"sit.time": "repa"}), str(tmp_path / "sit"), mesh)
  weights.load(test_sit.converted_config(), str(tmp_path / "sit"), mesh)
  with pytest.raises(cdw.ConversionError, match="--config's method is 'dit_original', but --kind sit weights are "
                     "method 'sit''s: use --config configs/sit.py"):
    cdw.convert(FIXTURE, str(tmp_path / "other"), kind="sit", config=tiny())


def test_a_converted_dit_fine_tunes_into_a_classifier(tmp_path, vae_file):
  """--mode=classify from a converted DiT: DDAE's cut (block 1 of the tiny one, t = 121), its
  blocks past the cut and its output layers untouched, the label table and time MLP decayed as
  embeddings."""
  from umd_jax import classify, classify_step, encode
  base = tiny(vae_file, **{"encode.shard_records": 1000})
  cdw.convert(FIXTURE, str(tmp_path / "w"), config=base)
  encode.run(base, str(tmp_path / "latents"))  # the training records: VAE latents of the digits
  config = tiny(vae_file, **{"init_from": str(tmp_path / "w"), "data.latents": str(tmp_path / "latents"),
                             "batch_size": 64, "classify.epochs": 1,
                             "classify.warmup_epochs": 0, "classify.eval_batch_size": 64, "classify.block": 0,
                             "classify.t": 121, "classify.randaugment_ops": 0, "classify.erase_prob": 0.0,
                             "checkpoint_every": 100, "log_every": 10})
  out = classify.run(config, str(tmp_path / "c"), devices=jax.devices()[:2])
  assert out["cut"] == {"block": 0, "t": 121} and 0 <= out["top1"] <= 1 and out["images"] == 297
  loaded = weights.load(base, str(tmp_path / "w"), sharding.make_mesh(base.mesh, jax.devices()[:1]))[1]
  after = out["state"].params["backbone"]
  for key in ("head", "final_modulation"):  # not read by the cut
    for a, b in zip(jax.tree.leaves(loaded[key]), jax.tree.leaves(after[key])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(loaded["blocks"]["blocks"][1]["mlp"]["fc1"]["kernel"]),
                                np.asarray(after["blocks"]["blocks"][1]["mlp"]["fc1"]["kernel"]))  # past the cut
  assert not np.array_equal(np.asarray(loaded["x_embedder"]["kernel"]), np.asarray(after["x_embedder"]["kernel"]))
  ids = classify_step.layer_ids(config, nnx.to_pure_dict(classify_step.abstract_classifier(config)[1]))
  assert ids["backbone"]["y_embedder"]["embedding"] == 0 and ids["head"]["kernel"] == 2
