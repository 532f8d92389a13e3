"""experiments/reproduce.py: the scorers against hand cases, and `--quick` end to end (so the
script that makes RESULTS.md cannot rot)."""
import json
import os

import numpy as np
import pytest

import reproduce  # experiments/reproduce.py, through pytest's pythonpath (pyproject.toml)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_precision_recall_and_frechet_on_hand_cases():
  rng = np.random.default_rng(0)
  real = rng.standard_normal((200, 4))
  assert reproduce.DigitsScorer.precision_recall(real, real) == (1.0, 1.0)
  far = real + 100.0  # nothing generated lies near the real data, and nothing real is covered
  assert reproduce.DigitsScorer.precision_recall(real, far) == (0.0, 0.0)
  collapsed = np.repeat(real[:1], 50, axis=0)  # mode collapse: precise, no recall
  precision, recall = reproduce.DigitsScorer.precision_recall(real, collapsed)
  assert precision == 1.0 and recall < 0.1
  assert reproduce.DigitsScorer.frechet(real, real) == pytest.approx(0.0, abs=1e-6)
  # a shift of the mean by d adds |d|² to the distance
  assert reproduce.DigitsScorer.frechet(real, real + 2.0) == pytest.approx(4 * 4.0, rel=1e-6)


def test_mean_std_over_seeds():
  assert reproduce.mean_std([0.5, 0.7, None]) == pytest.approx((0.6, np.std([0.5, 0.7], ddof=1)))
  assert reproduce.mean_std([0.5]) == (0.5, 0.0) and reproduce.mean_std([None]) is None


def test_configs_differ_only_in_the_corruption_and_finetune_follows_spec():
  args = reproduce.parse_args([])
  umd, dit, mae = (reproduce.make_config(args, m, 1) for m in ("umd", "dit", "mae"))
  preset = ("method", "corruption", "model", "probe", "classify")  # classify.t: the method's preset (DiT: 0)
  same = lambda a, b: {k: v for k, v in a.to_dict().items() if k not in preset} == \
      {k: v for k, v in b.to_dict().items() if k not in preset}
  assert same(umd, dit) and same(umd, mae) and umd.seed == 1 and umd.total_steps == 2000
  assert umd.model.variant == dit.model.variant == mae.model.variant == "Ti/2"
  assert (dit.corruption.clean_fraction, dit.corruption.noised_mask_ratio) == (0.0, 0.0)
  assert mae.model.conditioning == "in_context" and umd.model.conditioning == "adaln"
  assert {k: v for k, v in umd.classify.to_dict().items() if k != "t"} == {
      k: v for k, v in dit.classify.to_dict().items() if k != "t"} and (umd.classify.t, dit.classify.t) == (-1, 0)
  family = ("umd", "dit", "maskdit", "mae")  # DiffMAE is not fine-tuned: it does not generate
  ft = {m: reproduce.make_config(args, m, 0, finetune=True, init_from="x") for m in family}
  assert [ft[m].corruption.clean_fraction for m in family] == [0.05, 0.0, 0.0, 0.05]
  diffmae = reproduce.make_config(args, "diffmae", 1)  # the same data, batch, steps, seed and probes
  for key in ("batch_size", "total_steps", "seed", "data", "optim"):
    assert diffmae[key] == umd[key], key
  assert diffmae.probe.to_dict() == {**umd.probe.to_dict(), "baselines": False}  # baselines beside UMD's runs only
  assert diffmae.method == "diffmae" and diffmae.sample.num_samples == 0 and diffmae.model.variant == "Ti/2"
  assert all(c.corruption.noised_mask_ratio == 0.0 and c.model.num_classes == 10 and c.total_steps == 800
             and c.sample.cfg_scale == 2.0 and c.sample.steps == 50 for c in ft.values())


def test_quick_run_writes_the_table_plot_and_numbers(tmp_path):
  result = reproduce.main(["--quick", "--methods=umd,diffmae", "--out", str(tmp_path)])
  for name in ("reproduce.json", "summary.md", "probe_vs_generation.png"):
    assert (tmp_path / name).exists(), name
  saved = json.loads((tmp_path / "reproduce.json").read_text())
  assert [(r["method"], r["seed"]) for r in saved["runs"]] == [("umd", 0), ("diffmae", 0)]
  for r in saved["runs"]:
    assert 0 <= r["linear_top1"] <= 1 and 0 <= r["fewshot"]["10"] <= 1 and 0 <= r["classify_top1"] <= 1
    for kind in ("center", "random"):  # every method inpaints the same 297 test digits
      assert r["inpaint"][kind]["images"] == 297 and 0 < r["inpaint"][kind]["psnr"] < 60, (r["method"], kind)
  umd, diffmae = saved["runs"]
  assert 0 <= umd["classifier_accuracy"] <= 1 and umd["digits_fd"] > 0 and 0 <= umd["precision"] <= 1
  assert "classifier_accuracy" not in diffmae and "digits_fd" not in diffmae  # DiffMAE does not generate
  assert diffmae["inpaint"]["center"]["inpainter"] == "masked-patch diffusion" and umd["inpaint"]["center"]["inpainter"] == "repaint"
  assert diffmae["inpaint"]["center"]["sampler"] == "ddim" and diffmae["inpaint"]["center"]["steps"] == 4  # quick
  reference = saved["step_cost"]["umd"]["reference"]  # the method of most FLOPs per image among those run
  assert reference == max(("umd", "diffmae"), key=lambda m: saved["runs"][m == "diffmae"]["train_gflop_per_image"])
  assert saved["step_cost"][reference]["step_vs_reference"] == 1.0 and set(umd["baselines"]) == {"pixels", "random_init"}
  ref = saved["real_reference"]  # real digits scored like samples: close, precise, covering
  assert ref["digits_fd"] < 10 and ref["precision"] > 0.7 and ref["recall"] > 0.7 and ref["mlp_test_accuracy"] > 0.9
  table = (tmp_path / "summary.md").read_text()
  assert "| 10-shot (rep) |" in table and "| digits-FD ↓ |" in table and "| pixels |" in table
  assert "| centre inpainting PSNR (dB) |" in table and "| fine-tuned top-1 (end to end, METHOD.md §10) |" in table
  again = reproduce.main(["--quick", "--methods=umd,diffmae", "--out", str(tmp_path)])  # resumes: nothing retrained
  assert [r["linear_top1"] for r in again["runs"]] == [r["linear_top1"] for r in result["runs"]]


def test_the_paper_setting_builds_the_imagenet_recipes():
  """`--dataset=imagenet2012 --image_size=64 --variant=B/4`: the configs/<method>_b.py recipes
  (METHOD.md §5) on that data, every setting valid for its mode."""
  from umd_jax import checks
  args = reproduce.parse_args(["--dataset=imagenet2012", "--data_dir=/data/tfds", "--image_size=64", "--variant=B/4",
                               "--pretrain_steps=1000", "--finetune_steps=100", "--inception_weights="])
  for m in reproduce.METHODS:
    pre = reproduce.make_config(args, m, 0)
    checks.check(pre, "pretrain")
    if m == "diffmae":  # configs/diffmae_b.py:umd64, the setting comparable with umd_b.py
      assert (pre.data.image_size, pre.model.variant, pre.batch_size, pre.optim.b2) == (64, "B/4", 1024, 0.95)
      continue
    ft = reproduce.make_config(args, m, 0, finetune=True, init_from="/ckpt")
    assert (pre.data.name, pre.data.data_dir, pre.data.image_size, pre.model.variant) == ("imagenet2012", "/data/tfds", 64, "B/4")
    assert (pre.batch_size, pre.optim.b2, pre.corruption.clean_fraction) == (1024, 0.95, {"umd": 0.5, "mae": 1.0}.get(m, 0.0))
    assert (ft.batch_size, ft.optim.b2, ft.model.num_classes, ft.total_steps) == (256, 0.999, 1000, 100)
    assert pre.probe.max_train_images == 200_000 and not pre.sample.classifier_score and not pre.sample.fid
    checks.check(pre, "pretrain")
    checks.check(ft, "finetune")


def test_an_ablation_setting_and_lpips_weights_reach_every_stage():
  """--set KEY=VALUE (the ρ ablation: --set diffusion.rho_form=beta) goes into the pre-training and
  the recognition fine-tuning configs alike; --lpips_weights into the inpainting; an unknown key or
  a malformed item is an error."""
  args = reproduce.parse_args(["--set", "diffusion.rho_form=beta", "--set", "diffusion.noise_exponent=1.0",
                               "--lpips_weights=w.npz"])
  pre, cls = reproduce.make_config(args, "diffmae", 0), reproduce.make_classify_config(args, "diffmae", 0, "x")
  assert pre.diffusion.rho_form == cls.diffusion.rho_form == "beta"
  assert pre.diffusion.noise_exponent == cls.diffusion.noise_exponent == 1.0 and pre.sample.lpips_weights == "w.npz"
  fine = reproduce.make_config(args, "umd", 0, finetune=True, init_from="x")  # samples: no inpainting to score
  assert fine.sample.lpips_weights == "" and fine.diffusion.rho_form == "beta"
  with pytest.raises(SystemExit, match="the config has no key 'diffusion.rho'"):
    reproduce.make_config(reproduce.parse_args(["--set", "diffusion.rho=1"]), "umd", 0)
  with pytest.raises(SystemExit):
    reproduce.parse_args(["--set", "diffusion.rho_form"])
