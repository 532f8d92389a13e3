"""Train step and loop: sharded == single device, exact resume, signals, the demo, bad input."""
import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common, demo
from conftest import tiny_config
from umd_jax import checkpoint, data, loop, sharding, summary, train, train_step, weights


def _batches(config, mesh, n):
  source = data.make_source(config.data, "train")
  it = data.make_batches(config.data, source, global_batch=config.batch_size,
                         sharding=sharding.batch_sharding(mesh), seed=0, train=True)
  return [jax.device_get(next(it)) for _ in range(n)]


def _run_steps(config, devices, batches):
  mesh = sharding.make_mesh(config.mesh, devices)
  run = train_step.build(config, mesh)
  state, bs = run.state, sharding.batch_sharding(mesh)
  for b in batches:
    state, metrics = run.step(state, {k: jax.device_put(v, bs) for k, v in b.items()})
  return state, metrics


def test_sharded_step_equals_single_device_step_and_params_are_sharded(one_device):
  config = tiny_config(**{"mesh.data": 4, "mesh.fsdp": 2, "optim.ema_rate": 0.1})
  batches = _batches(config, sharding.make_mesh(tiny_config().mesh, one_device), 2)
  sharded, m8 = _run_steps(config, jax.devices(), batches)
  single, m1 = _run_steps(tiny_config(**{"optim.ema_rate": 0.1}), one_device, batches)
  np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
  for a, b in zip(jax.tree.leaves(sharded.ema_params), jax.tree.leaves(single.ema_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
  kernel = sharded.params["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"]  # (32, 128): ("embed", "mlp")
  assert kernel.sharding.spec == P("fsdp", None)
  assert kernel.addressable_shards[0].data.shape == (16, 128)
  mu = sharded.opt_state[1][0].mu["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"]
  assert mu.sharding.spec == P("fsdp", None)  # Adam moments follow their parameter


def test_logical_rules_map_to_mesh_axes():
  mesh = sharding.make_mesh(tiny_config(**{"mesh.fsdp": 2}).mesh)
  rules = (("embed", "fsdp"), ("mlp", None), ("layers", None))
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 256), rules, mesh) == P("fsdp", None)
  assert sharding.logical_to_spec(("layers", "mlp", "embed"), (12, 256, 64), rules, mesh) == P(None, None, "fsdp")
  assert sharding.logical_to_spec(("embed",), (63,), rules, mesh) == P(None)  # not divisible: replicated
  assert sharding.logical_to_spec((None, "seq", "embed"), (1, 16, 64), rules, mesh) == P(None, None, "fsdp")


def test_weight_decay_skips_biases_norms_registers_and_mask_token():
  config = tiny_config(**{"model.scan_layers": True})
  _, abstract = weights.abstract_model(config)
  from flax import nnx
  mask = train_step.weight_decay_mask(nnx.to_pure_dict(abstract))
  assert mask["encoder"]["blocks"]["mlp"]["fc1"]["kernel"] and mask["encoder_pos"]
  assert not mask["encoder"]["blocks"]["mlp"]["fc1"]["bias"]  # 2-D when scanned, still a bias
  assert not mask["encoder"]["blocks"]["norm1"]["scale"]
  assert not mask["registers"] and not mask["mask_token"]


def test_learning_rate_schedule_is_warmup_then_cosine():
  config = tiny_config(**{"total_steps": 100, "batch_size": 512, "optim.base_lr": 1e-3, "optim.warmup_fraction": 0.1})
  lr = train_step.learning_rate(config)
  peak = 1e-3 * 512 / 256
  np.testing.assert_allclose([float(lr(0)), float(lr(5)), float(lr(10))], [0.0, peak / 2, peak], rtol=1e-6)
  np.testing.assert_allclose(float(lr(55)), peak * 0.5 * (1 + np.cos(np.pi * 45 / 90)), rtol=1e-5)
  assert float(lr(100)) == pytest.approx(0.0, abs=1e-12)


def _params(state):
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_exact_resume(tmp_path, one_device, monkeypatch):
  config = tiny_config(**{"total_steps": 4, "checkpoint_every": 2, "optim.ema_rate": 0.5})
  monkeypatch.chdir(tmp_path)  # a relative --workdir, as `make demo` passes
  full = train.pretrain(config, "run", devices=one_device)
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4"]
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")  # as if the job died after step 2
  resumed = train.pretrain(config, "run", devices=one_device)
  assert resumed["start_step"] == 2 and resumed["step"] == 4
  for a, b in zip(_params(full["state"]), _params(resumed["state"])):
    np.testing.assert_array_equal(a, b)  # bitwise: same data order, RNG, optimizer and EMA
  for a, b in zip(jax.tree.leaves(full["state"].ema_params), jax.tree.leaves(resumed["state"].ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  saved = json.loads((tmp_path / "run" / "checkpoints" / "4" / "config" / "metadata").read_text())
  assert saved["model"]["variant"] == "Mu/2"
  assert list((tmp_path / "run" / "images").iterdir())  # the reconstruction grid of the last step
  assert any(f.name.startswith("events.out.tfevents") for f in (tmp_path / "run").iterdir())


def _damage(step_dir):
  for f in step_dir.glob("state/**/*"):
    if f.is_file() and f.stat().st_size > 0 and "METADATA" not in f.name:
      f.write_bytes(b"\0" * 7)  # truncated garbage in every data file of the state


def test_damaged_checkpoint_is_named_and_the_previous_one_is_used(tmp_path, one_device):
  config = tiny_config(**{"total_steps": 4, "checkpoint_every": 2})
  full = train.pretrain(config, tmp_path / "run", devices=one_device)
  _damage(tmp_path / "run" / "checkpoints" / "4")
  strict = tiny_config(**{"total_steps": 6, "checkpoint_every": 2, "restore_fallback": False})
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint step 4 .* could not be restored .*damaged; with "
                     r"restore_fallback=True the run resumes from the previous step, 2$") as error:
    train.pretrain(strict, tmp_path / "run", devices=one_device)
  assert "bound method" not in str(error.value)  # orbax's repr of its details method is not a cause
  resumed = train.pretrain(config, tmp_path / "run", devices=one_device)  # falls back to step 2
  assert resumed["start_step"] == 2 and resumed["step"] == 4
  for a, b in zip(_params(full["state"]), _params(resumed["state"])):
    np.testing.assert_array_equal(a, b)
  assert len(list((tmp_path / "run" / "damaged_checkpoints").iterdir())) == 1  # kept, not deleted
  # the only checkpoint damaged: no advice to fall back to a step that does not exist
  single = tiny_config(**{"total_steps": 2, "checkpoint_every": 2})
  train.pretrain(single, tmp_path / "one", devices=one_device)
  _damage(tmp_path / "one" / "checkpoints" / "2")
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint step 2 .*damaged; there is no earlier step to "
                     r"fall back to: move .*checkpoints aside to train from the start, or use a new --workdir$"):
    train.pretrain(tiny_config(**{"total_steps": 4, "checkpoint_every": 2}), tmp_path / "one", devices=one_device)


def test_resuming_with_a_different_model_lists_the_parameters_and_moves_nothing(tmp_path, one_device):
  train.pretrain(tiny_config(**{"total_steps": 4, "checkpoint_every": 2}), tmp_path / "run", devices=one_device)
  other = tiny_config(**{"total_steps": 6, "data.image_size": 12})  # more patches: position tables grow
  with pytest.raises(checkpoint.CheckpointError) as error:
    train.pretrain(other, tmp_path / "run", devices=one_device)
  message = str(error.value)
  assert message.startswith(f"checkpoint step 4 in {tmp_path / 'run' / 'checkpoints'} was written for a different model: "
                            "2 parameters do not match (decoder_pos: saved (1, 16, 32) float32, model (1, 36, 32) "
                            "float32; encoder_pos: saved (1, 16, 32) float32, model (1, 36, 32) float32); "
                            "changed config: data.image_size: 8 -> 12"), message
  wider = tiny_config(**{"total_steps": 6, "model.variant": "Ti/2", "model.conditioning": "in_context"})
  with pytest.raises(checkpoint.CheckpointError, match=r"parameters do not match \(.*decoder/blocks/0/attn/proj/"
                     r"kernel: saved \(32, 32\) float32, model \(64, 64\) float32.*; and \d+ more\); changed config: "
                     r"model.conditioning: 'adaln' -> 'in_context'; model.variant: 'Mu/2' -> 'Ti/2'"):
    train.pretrain(wider, tmp_path / "run", devices=one_device)
  with pytest.raises(checkpoint.CheckpointError, match=r"step 4: \d+ parameters do not match .*use the config"):
    checkpoint.restore_params(tmp_path / "run", _abstract_params(wider))  # init_from / probe / generate
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4"]
  assert not (tmp_path / "run" / "damaged_checkpoints").exists()
  # Same parameters, other compute settings: restores (with a warning).
  same = tiny_config(**{"model.dtype": "bfloat16", "model.remat": "full"})
  run = train_step.build(same, sharding.make_mesh(same.mesh, one_device))
  ckpt = checkpoint.Checkpointer(tmp_path / "run")
  restored, step = ckpt.restore_latest(train_step.abstract_state(run.state, run.shardings), config=same)
  ckpt.close()
  assert step == 4 and int(restored.step) == 4


def _abstract_params(config):
  state = train_step.build(config, sharding.make_mesh(config.mesh, jax.devices()[:1])).state
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.params)


def test_sigterm_saves_and_returns_then_resume_finishes(tmp_path, one_device, monkeypatch):
  make_step = train_step.make_train_step

  def step_that_is_preempted(*args, **kwargs):
    step = make_step(*args, **kwargs)
    calls = []

    def wrapped(state, batch):
      out = step(state, batch)
      calls.append(1)
      if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      return out
    return wrapped

  config = tiny_config(**{"total_steps": 6, "checkpoint_every": 100})
  monkeypatch.setattr(train_step, "make_train_step", step_that_is_preempted)
  stopped = train.pretrain(config, tmp_path / "run", devices=one_device)
  assert stopped["stopped_by"] == "SIGTERM" and stopped["step"] == 3
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["3"]
  monkeypatch.setattr(train_step, "make_train_step", make_step)
  finished = train.pretrain(config, tmp_path / "run", devices=one_device)
  assert finished["start_step"] == 3 and finished["step"] == 6
  reference = train.pretrain(config, tmp_path / "reference", devices=one_device)
  for a, b in zip(_params(finished["state"]), _params(reference["state"])):
    np.testing.assert_array_equal(a, b)


def test_demo_lowers_the_loss(tmp_path, one_device, optimized):
  config = demo.get_config("150")
  config.log_every = 50
  config.probe_every = 0  # the few-shot probe at the last step is tested in test_probe.py
  result = train.pretrain(config, tmp_path / "demo", devices=one_device)
  assert result["last_loss"] < 0.6 * result["first_loss"], result


def test_non_finite_loss_stops_without_writing_a_checkpoint(tmp_path, one_device):
  config = tiny_config(**{"optim.base_lr": 1e38, "checkpoint_every": 1})
  with pytest.raises(loop.TrainingError, match=r"non-finite loss or gradient at step 1 \(loss .*update_norm inf\)"):
    train.pretrain(config, tmp_path / "run", devices=one_device)
  assert not os.listdir(tmp_path / "run" / "checkpoints")


def test_skip_policy_drops_bad_updates_then_stops_after_max_skips(tmp_path, one_device):
  # An LR of 1e38 makes every update non-finite (its norm overflows): each is dropped, so the weights stay at init.
  config = tiny_config(**{"optim.base_lr": 1e38, "nonfinite_policy": "skip", "max_skips": 10,
                          "total_steps": 4, "checkpoint_every": 2})
  result = train.pretrain(config, tmp_path / "ok", devices=one_device)
  assert int(result["state"].nonfinite_steps) == 4
  assert sorted(os.listdir(tmp_path / "ok" / "checkpoints")) == ["2", "4"]  # skipped updates leave a good state
  init = train_step.build(config, sharding.make_mesh(config.mesh, one_device)).state
  for a, b in zip(_params(result["state"]), _params(init)):
    np.testing.assert_array_equal(a, b)
  config = tiny_config(**{"optim.base_lr": 1e38, "nonfinite_policy": "skip", "max_skips": 2,
                          "total_steps": 4, "checkpoint_every": 2, "log_every": 1})
  with pytest.raises(loop.TrainingError, match="3 updates skipped .* more than max_skips=2"):
    train.pretrain(config, tmp_path / "stop", devices=one_device)


def test_summary_reports_params_and_flops(tmp_path):
  config = tiny_config()
  result = summary.summarize(config, tmp_path)
  assert json.loads((tmp_path / "summary.json").read_text()) == result
  from test_model import expected_param_count
  assert result["params"] == expected_param_count(32, 2, 1, 2, 1, 16)
  dit = summary.summarize(tiny_config("dit"), tmp_path)["train_flops_per_image"]
  assert 0 < result["train_flops_per_image"] < dit  # UMD drops tokens; DiT runs all 16 in both halves


@pytest.mark.parametrize("overrides,message", [
    ({"data.image_size": 9}, "not divisible by the patch size"),
    ({"corruption.clean_mask_ratio": 1.0}, r"clean_mask_ratio=1.0 must be in \[0, 1\)"),
    ({"corruption.noised_mask_ratio": -0.1}, r"noised_mask_ratio=-0.1 must be in \[0, 1\)"),
    ({"corruption.clean_fraction": 1.5}, r"clean_fraction=1.5 must be in \[0, 1\]"),
    ({"model.variant": "X/2"}, "NAME/PATCH"),
    ({"batch_size": 12}, "not divisible by the 8 data shards"),
    ({"mesh.fsdp": 3}, "does not divide the 8 devices"),
    ({"nonfinite_policy": "ignore"}, "use 'stop' or 'skip'"),
    ({"data.name": "cifar10", "data.data_dir": "/nonexistent"}, "tfds build cifar10"),
    ({"data.name": "folder", "data.data_dir": "/nonexistent"}, "does not exist"),
])
def test_bad_input_is_a_clear_error(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train.pretrain(tiny_config(**overrides), tmp_path / "run")


def test_unknown_config_key_is_an_error():
  config = tiny_config()
  with pytest.raises(AttributeError):
    config.batch_sise = 8
  with pytest.raises(AttributeError):
    config.model.widht = 8


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(RuntimeError, match="is not writable"):
    train.pretrain(tiny_config(), blocker / "run")


def test_fsdp_holds_an_eighth_of_umd_l_per_device():
  from flax import nnx
  from configs import umd_l
  config = umd_l.get_config()
  config.mesh.fsdp = 8
  mesh = sharding.make_mesh(config.mesh)  # 8 fake devices: data 1 × fsdp 8
  _, abstract = weights.abstract_model(config)
  shapes, shards = nnx.to_pure_dict(abstract), sharding.param_shardings(abstract, config.mesh.rules, mesh)
  nbytes = lambda shape: 4 * int(np.prod(shape))
  total = sum(nbytes(x.shape) for x in jax.tree.leaves(shapes))
  per_device = sum(nbytes(s.shard_shape(x.shape)) for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shards)))
  assert total > 2e9  # UMD-L/4 with adaLN: ~600M float32 parameters
  assert per_device <= 1.01 * total / 8, per_device / total
  tx, _ = train_step.make_optimizer(config)
  opt_shapes = jax.eval_shape(tx.init, shapes)
  opt_shards = sharding.optimizer_shardings(tx, opt_shapes, shards, mesh)
  opt_total = sum(nbytes(x.shape) for x in jax.tree.leaves(opt_shapes))
  opt_device = sum(nbytes(s.shard_shape(x.shape)) for x, s in zip(jax.tree.leaves(opt_shapes), jax.tree.leaves(opt_shards)))
  assert opt_total > 2 * total * 0.99 and opt_device <= 1.01 * opt_total / 8  # Adam moments sharded too


def test_remat_lowers_temporary_memory(one_device):
  """Scanned layers (where a policy takes effect): the less a block keeps for its backward pass,
  the less temporary memory: its input only < + the dense outputs < + attention's products < all."""
  temp = {}
  for remat in ("none", "full", "dots", "matmuls"):
    config = tiny_config(**{"model.remat": remat, "model.scan_layers": True,
                            "batch_size": 64})
    run = train_step.build(config, sharding.make_mesh(config.mesh, one_device))
    batch = {"image": jax.ShapeDtypeStruct((64, 8, 8, 1), np.float32), "label": jax.ShapeDtypeStruct((64,), np.int32)}
    temp[remat] = run.step.lower(run.state, batch).compile().memory_analysis().temp_size_in_bytes
  assert temp["full"] < temp["dots"] < temp["matmuls"] < temp["none"], temp


def _one_update(config, devices, batch, tx=None):
  mesh = sharding.make_mesh(config.mesh, devices)
  run = train_step.build(config, mesh, tx)
  state, metrics = run.step(run.state, {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()})
  return state, jax.device_get(metrics), run.step


def test_gradient_accumulation_equals_the_full_batch_update(one_device):
  """Micro-batches draw each sample's mask, t and noise from its global index, so the mean of
  their gradients is the full-batch gradient (8 devices: micro-batches stay sharded)."""
  import optax
  config = tiny_config(**{"optim.ema_rate": 0.1, "corruption.clean_fraction": 0.25})
  micro = tiny_config(**{"optim.ema_rate": 0.1, "corruption.clean_fraction": 0.25, "grad_accum_steps": 2})
  batch = _batches(config, sharding.make_mesh(config.mesh, one_device), 1)[0]
  # Plain SGD with lr 1: the parameter change is the gradient itself.
  sgd = optax.sgd(1.0)
  full, m_full, _ = _one_update(config, jax.devices(), batch, sgd)
  acc, m_acc, _ = _one_update(micro, jax.devices(), batch, sgd)
  _assert_same_update(full, m_full, acc, m_acc)


def _assert_same_update(full, m_full, acc, m_acc):
  for name in ("loss", "loss_clean", "loss_noised", "grad_norm", "bucket_sum", "bucket_count"):
    np.testing.assert_allclose(m_acc[name], m_full[name], rtol=1e-5, atol=1e-7, err_msg=name)
  for a, b in zip(jax.tree.leaves((acc.params, acc.ema_params)), jax.tree.leaves((full.params, full.ema_params))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_on_one_device_same_update_less_memory_and_checks(one_device):
  import optax
  sgd = optax.sgd(1.0)
  batch = _batches(tiny_config(**{"batch_size": 64}), sharding.make_mesh(tiny_config().mesh, one_device), 1)[0]
  temp, runs = {}, {}
  for accum in (1, 4):  # one compile each: its memory analysis, then one update with it
    c = tiny_config(**{"batch_size": 64, "corruption.clean_fraction": 0.25, "grad_accum_steps": accum,
                       "optim.ema_rate": 0.1})
    mesh = sharding.make_mesh(c.mesh, one_device)
    run = train_step.build(c, mesh, sgd)
    state, on_mesh = run.state, {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
    compiled = run.step.lower(state, on_mesh).compile()
    temp[accum] = compiled.memory_analysis().temp_size_in_bytes
    state, metrics = compiled(state, on_mesh)
    runs[accum] = (state, jax.device_get(metrics))
  _assert_same_update(*runs[1], *runs[4])
  assert temp[4] < 0.5 * temp[1], temp
  with pytest.raises(ValueError, match="grad_accum_steps=3 must divide batch_size=64"):
    train.validate_config(tiny_config(**{"batch_size": 64, "grad_accum_steps": 3}))
  with pytest.raises(ValueError, match="16 clean"):  # 64 * 0.25 = 16 clean rows do not split in 32
    train_step.accumulation_order(64, 0.25, 32)
  order = train_step.accumulation_order(8, 0.25, 2)  # 2 clean rows then 6 noised
  np.testing.assert_array_equal(order, [[0, 2, 3, 4], [1, 5, 6, 7]])


def test_auto_gradient_accumulation_picks_cpu_micro_batches_that_split(one_device, monkeypatch, tmp_path, caplog):
  """grad_accum_steps="auto" (the default): one batch on accelerators; on a CPU the fewest micro-batches
  of <= CPU_MICRO_BATCH_ELEMENTS tokens × width per device that split the clean / noised rows and the
  devices (or the most that split), compiled as that explicit count."""
  auto = train_step.auto_accumulation_steps
  assert auto(64, 0.5, 256, 384, 1, "cpu") == 8      # UMD-S/4, 64 px: BENCHMARKS.md's fastest, 8 of 8
  assert auto(64, 0.5, 256, 384, 1, "gpu") == auto(64, 0.5, 256, 384, 1, "tpu") == 1
  assert auto(64, 0.5, 256, 384, 8, "cpu") == 1      # 8 devices: 8 images each already
  assert auto(64, 0.5, 256, 384, 2, "cpu") == 4      # 2 devices: 4 micro-batches of 2 × 8
  assert auto(48, 0.25, 256, 384, 1, "cpu") == 6     # 6 of 8: 2 clean + 6 noised each
  assert auto(80, 0.1, 256, 384, 1, "cpu") == 8      # 8 clean rows: no count that gives <= 8 images splits
  assert auto(16, 0.5, 10**6, 384, 1, "cpu") == 8    # nothing small enough: the most that split (8 clean rows)
  assert auto(128, 0.05, 16, 64, 1, "cpu") == 1      # the demo: one batch, its numbers unchanged
  s4 = common.finalize(common.base_config())  # the recipe's 64 px
  s4.model.variant, s4.batch_size = "S/4", 64
  mesh = sharding.make_mesh(s4.mesh, one_device)
  assert s4.grad_accum_steps == "auto" and train_step.accumulation_steps(s4, mesh) == 8
  s4.grad_accum_steps = 2
  assert train_step.accumulation_steps(s4, mesh) == 2
  # Through the step: with a budget of 4 tiny images per device, auto is 4 micro-batches, bitwise as 4.
  monkeypatch.setattr(train_step, "CPU_MICRO_BATCH_ELEMENTS", 4 * 16 * 32)  # Mu/2 on 8x8: 16 tokens, width 32
  config = tiny_config(**{"optim.ema_rate": 0.1})
  assert train_step.accumulation_steps(config, sharding.make_mesh(config.mesh, one_device)) == 4
  batch = _batches(config, sharding.make_mesh(config.mesh, one_device), 1)[0]
  got, explicit = (_one_update(c, one_device, batch)[:2] for c in (config, tiny_config(**{"optim.ema_rate": 0.1,
                                                                                             "grad_accum_steps": 4})))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(explicit)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with caplog.at_level("INFO"):
    train.pretrain(tiny_config(**{"total_steps": 1, "checkpoint_every": 1}), tmp_path / "auto", devices=one_device)
  assert "grad_accum_steps=auto: 4 micro-batches of 4" in caplog.text
  for bad in ("eight", 0, True):
    with pytest.raises(ValueError, match="grad_accum_steps.*must be 'auto' or an integer >= 1"):
      train.validate_config(tiny_config(**{"grad_accum_steps": bad}))


def test_resuming_with_another_objective_schedule_or_optimizer_is_refused(tmp_path, one_device, caplog):
  """A changed objective is another run: refused with the keys named, before anything is written;
  a longer run (total_steps) resumes with a warning that the LR schedule now spans the new length."""
  train.pretrain(tiny_config(**{"total_steps": 2, "checkpoint_every": 2}), tmp_path / "run", devices=one_device)
  for overrides, named in (({"diffusion.schedule": "linear"}, "diffusion.schedule: 'cosine' -> 'linear'"),
                           ({"corruption.clean_fraction": 0.25}, "corruption.clean_fraction: 0.5 -> 0.25"),
                           ({"optim.base_lr": 1e-3}, "optim.base_lr: 0.002 -> 0.001")):
    with pytest.raises(checkpoint.CheckpointError, match="written with another objective, schedule or optimizer") as e:
      train.pretrain(tiny_config(**{"total_steps": 4, **overrides}), tmp_path / "run", devices=one_device)
    assert named in str(e.value) and "use a new --workdir" in str(e.value)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
  with caplog.at_level("WARNING"):
    result = train.pretrain(tiny_config(**{"total_steps": 4, "checkpoint_every": 2}), tmp_path / "run",
                            devices=one_device)
  assert result["start_step"] == 2 and result["step"] == 4
  assert "total_steps 2 -> 4: the learning-rate schedule" in caplog.text


def test_micro_batch_and_init_from_are_checked_before_the_workdir_exists(tmp_path, one_device):
  with pytest.raises(sharding.ShardingError, match="micro-batch"):  # 16 / 4 = 4 rows on 8 devices
    train.pretrain(tiny_config(**{"grad_accum_steps": 4}), tmp_path / "accum")
  assert not (tmp_path / "accum").exists()
  train.pretrain(tiny_config(**{"total_steps": 2, "checkpoint_every": 2}), tmp_path / "source", devices=one_device)
  other = tiny_config(**{"init_from": str(tmp_path / "source"), "model.variant": "Ti/2"})
  with pytest.raises(checkpoint.CheckpointError, match=r"parameters do not match .*changed config: .*model.variant: "
                     r"'Mu/2' -> 'Ti/2'"):
    train.pretrain(other, tmp_path / "finetuned", devices=one_device)
  assert not (tmp_path / "finetuned").exists()
