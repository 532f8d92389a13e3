"""The benchmark harness: interleaved timing rounds and the train-step row (no timing is asserted).
The scripts under bench/ are importable here through pytest's `pythonpath` (pyproject.toml)."""
import contextlib
import io
import json
import sys

import common as bench_common
import input as bench_input
import numpy as np
import official as bench_official
import sampling as bench_sampling
import jax
import jax.numpy as jnp
import pytest
import train_step as bench_train_step
from conftest import tiny_config
from PIL import Image

from umd_jax import methods


def test_rounds_alternate_the_calls_and_ratios_pair_rounds():
  calls = []
  times = bench_common.time_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                   repeats=3, warmup=2)
  # warm-up calls of each, then one call of each per round, in turn
  assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
  assert [len(t) for t in times.values()] == [3, 3] and all(x >= 0 for t in times.values() for x in t)
  # per-round ratios: a machine twice as slow in round 2 leaves the ratio unchanged
  assert bench_common.median_ratio([2.0, 4.0, 2.0], [1.0, 2.0, 1.0]) == 2.0
  assert bench_common.median_ratio([1.0, 3.0, 10.0], [1.0, 1.0, 1.0]) == 3.0


def test_train_step_rows_are_consistent():
  config = tiny_config()
  rows = bench_train_step.measure_all([config, tiny_config(grad_accum_steps=2)], repeats=2, xla_check=False)
  for row in rows:
    assert row["model_gflop"] == pytest.approx(methods.get(config).train_flops_per_image(config) * config.batch_size / 1e9)
    assert row["images_per_s"] == pytest.approx(config.batch_size / (row["step_ms"] / 1e3))
    assert row["achieved_gflops"] == pytest.approx(row["model_gflop"] / (row["step_ms"] / 1e3))
    assert row["temp_mib"] > 0 and row["compile_s"] > 0 and row["roofline_gflops"] > 0
    assert 0 < row["mfu"] < 1  # a median of per-round ratios, so not exactly achieved / roofline
  assert rows[0]["vs_first"] == 1.0 and rows[1]["vs_first"] > 0
  assert [row["micro_batches"] for row in rows] == [1, 2]  # the demo's "auto" is one batch here
  # --set / --compare: a key that takes a word or a number ("auto" or 8) gets the number as a number
  assert bench_common.load_config("configs/demo.py", ["grad_accum_steps=8"]).grad_accum_steps == 8
  assert bench_common.load_config("configs/demo.py", ["grad_accum_steps=auto"]).grad_accum_steps == "auto"


def test_roofline_sweep_keeps_the_fastest_product_per_flop(capsys):
  fn, flops = bench_common.matmul_call("float32", sizes=(32, 256))
  assert flops == 2.0 * 256 ** 3 and fn().shape == (256, 256)  # a 256² product beats a 32² one per FLOP
  assert "roofline: 256² float32 jnp.dot" in capsys.readouterr().out
  fixed, flops = bench_common.matmul_call("float32", n=64)
  assert flops == 2.0 * 64 ** 3 and fixed().shape == (64, 64)


def test_dot_instructions_finds_the_fused_matmuls():
  a = jnp.ones((64, 64))
  with_dot = jax.jit(lambda a: jnp.tanh(a @ a) + 1).lower(a).compile().as_text()
  elementwise = jax.jit(lambda a: jnp.tanh(a) * 2 + 1).lower(a).compile().as_text()
  found = bench_common.dot_instructions(with_dot)
  assert found and all(f"%{name} = " in with_dot or f" {name} = " in with_dot for name in found)
  assert bench_common.dot_instructions(elementwise) == set()


def test_xla_options_split_from_config_overrides_and_reach_the_compiler():
  config_overrides, options = bench_train_step.split_options(
      ["batch_size=8", "xla_cpu_enable_fast_math=False", "xla_gpu_autotune_level=0",
       "xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"])
  assert config_overrides == ["batch_size=8"]
  assert options == {"xla_cpu_enable_fast_math": False, "xla_gpu_autotune_level": 0,
                     "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
  config = tiny_config()
  _, run_default, compiled_default = bench_train_step.build(config, xla_check=False)
  _, run_option, compiled_option = bench_train_step.build(
      config, xla_check=False, compiler_options={"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"})
  assert float(run_option()) == pytest.approx(float(run_default()), rel=1e-5)  # same step, other fusions
  if jax.default_backend() == "cpu":  # only XLA:CPU reads this option: dots alone in library fusions
    assert compiled_option.as_text().count("ynn_fusion") < compiled_default.as_text().count("ynn_fusion")
  with pytest.raises(Exception, match="No such compile option"):
    bench_train_step.build(config, xla_check=False, compiler_options={"xla_no_such_option": 1})


def test_photo_jpegs_are_deterministic_photo_sized_and_the_decode_rows_are_filled():
  jpegs = list(bench_input.photo_jpegs(3))
  assert jpegs == list(bench_input.photo_jpegs(3))  # the same files on every run
  assert [Image.open(io.BytesIO(j)).size for j, _ in jpegs] == list(bench_input.SIZES[:3])
  assert all(20_000 < len(j) < 400_000 for j, _ in jpegs)  # photo-like compression, not noise or flat
  rows = bench_input.decode_alone(jpegs, n=3)
  assert [r["decode"].split()[0] for r in rows] == ["whole", "1/8"] and all(r["ms_per_image"] > 0 for r in rows)


def test_classify_view_rows_time_both_views_on_the_same_images(capsys):
  parser = bench_common.make_parser("", "configs/demo.py", repeats=2)
  parser.add_argument("--classify", type=int, default=0)
  args = parser.parse_args(["--classify", "4", "--json", ""])
  bench_input.classify_views(args, rounds=1)
  out = capsys.readouterr().out
  assert "input_classify" in out and out.count("classify ") >= 2 and out.count("pretrain ") >= 2


def test_inpainting_row_times_both_methods_with_the_same_calls():
  parser = bench_common.make_parser("", "configs/demo.py", repeats=2)
  parser.add_argument("--diffmae", default="configs/demo.py:diffmae")
  args = parser.parse_args(["--repeats=2", "--set", "sample.steps=3", "--set", "sample.batch_size=8",
                            "--set", "model.variant=Mu/2"])
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    bench_sampling.inpainting_row(args)
  text = out.getvalue()
  assert "diffmae_over_umd" in text and "0.25" in text  # the centre box: 4 of 16 patches
  with pytest.raises(SystemExit, match="network calls"):
    args.set = ["sample.steps=3", "sample.inpaint_resample=2"]
    bench_sampling.inpainting_row(args)


# A stand-in for a small-vision checkout: the two modules bench/official.py imports, with the same
# call signatures (the real repository is the user's, never fetched by the tests).
FAKE_AE = '''
import flax.linen as nn
import jax
import jax.numpy as jnp


class _AE(nn.Module):
  num_classes: int = None
  channels: int = 3
  img_size: int = 8
  scan: bool = True
  adaln: bool = True
  remat_policy: str = "nothing_saveable"
  num_cls: int = 4
  dtype_mm: str = "float32"
  no_decay_list = ("bias",)

  @nn.compact
  def __call__(self, image, *, t=None, y=None, mask=0.0, train=False):
    n = image.shape[0]
    h = nn.Dense(16)(image.reshape(n, -1)) + nn.Embed(1001, 16)(t[:, 0])
    pred = nn.Dense(image[0].size * 2)(jax.nn.gelu(h)).reshape(image.shape[:-1] + (2 * self.channels,))
    out = {"mask": None}
    if mask > 0.0:
      out["mask"] = (jax.random.uniform(self.make_rng("mae_noise"), image.shape[:-1] + (1,)) < mask).astype(jnp.float32)
    return pred, out


def Model(*, variant=None, **kw):
  return _AE(**kw)
'''
FAKE_DIFFUSION = '''
import numpy as np


def create_gaussian_diffusion(beta_type="cosine", training_steps=1000):
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, training_steps))
  return dict(sqrt_alphas_cumprod=np.sqrt(abar), sqrt_one_minus_alphas_cumprod=np.sqrt(1 - abar))


def q_sample(*, gd, x_start, t, noise):
  a, s = gd["sqrt_alphas_cumprod"][t[:, 0]], gd["sqrt_one_minus_alphas_cumprod"][t[:, 0]]
  return a[:, None, None, None] * x_start + s[:, None, None, None] * noise
'''


@pytest.fixture
def fake_small_vision(tmp_path, monkeypatch):
  root = tmp_path / "small-vision"
  (root / "big_vision" / "models").mkdir(parents=True)
  for path, text in (("big_vision/__init__.py", ""), ("big_vision/models/__init__.py", ""),
                     ("big_vision/models/ae.py", FAKE_AE), ("big_vision/gaussian_diffusion.py", FAKE_DIFFUSION)):
    (root / path).write_text(text)
  yield str(root)
  for name in [n for n in sys.modules if n == "big_vision" or n.startswith("big_vision.")]:
    monkeypatch.delitem(sys.modules, name)


def test_official_harness_refuses_what_it_cannot_compare(tmp_path):
  with pytest.raises(SystemExit, match="has no big_vision/models/ae.py: give the root of a small-vision checkout"):
    bench_official.import_official(str(tmp_path))
  with pytest.raises(SystemExit, match="the official code trains the UMD family only"):
    bench_official.check_comparable(tiny_config(method="diffmae"))


def test_official_harness_times_both_steps_in_the_same_rounds(fake_small_vision, tmp_path, monkeypatch):
  """The side-by-side rows (the fake's step against ours on the demo config), with each contender's
  memory measured alone in a child process."""
  out = tmp_path / "rows.json"
  monkeypatch.setattr(sys, "argv", ["official.py", f"--small_vision={fake_small_vision}", "--config=configs/demo.py",
                                    "--set", "batch_size=8", "--repeats", "2", "--compare", "model.remat=full",
                                    "--rss", "--json", str(out)])
  bench_official.main()
  rows = json.loads(out.read_text())["rows"]
  assert [r["row"] for r in rows] == ["official (scanned, nothing_saveable)", "ours (batch_size=8)",
                                      "ours + model.remat=full"]
  assert rows[0]["vs_official"] == 1.0 and all(r["vs_official"] > 0 and r["step_ms"] > 0 for r in rows)
  for r in rows:
    assert r["temp_mib"] > 0 and r["xla_gb_accessed"] > 0 and r["fusions"] > 0
    assert r["rss_peak_mib"] >= r["rss_step_mib"] > 0
    assert r["micro_batches"] == 1  # the official's one value_and_grad; the demo's "auto"
  # remat recomputes the forward: more XLA FLOPs than the plain step of the same program
  assert rows[2]["xla_gflop"] > rows[1]["xla_gflop"]


def test_official_step_learns(fake_small_vision):
  """The restated official update trains the model it is given (its loss falls on a fixed batch)."""
  ae, diffusion = bench_official.import_official(fake_small_vision)
  config = tiny_config(total_steps=1000, **{"optim.warmup_fraction": 0.0, "optim.base_lr": 0.05})
  step, state = bench_official.official_step(config, ae, diffusion, scan=True, remat="nothing_saveable",
                                             mu_dtype="float32")
  batch = bench_official.random_batch(config)
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5])
