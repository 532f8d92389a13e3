"""The command line: modes, config overrides, and one-line errors."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


def test_summary_mode_with_overrides(tmp_path):
  proc = run_main("--config=configs/umd_b.py", "--mode=summary", f"--workdir={tmp_path}",
                  "--config.data.image_size=32")
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  from test_model import expected_param_count
  assert summary["params"] == expected_param_count(768, 12, 4, 4, 3, 64)  # 16 adaLN blocks: ~174M
  assert summary["train_flops_per_image"] > 1e9
  assert "parameters:" in proc.stdout


def test_unknown_config_key_fails_at_parse_time(tmp_path):
  proc = run_main("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.batch_sise=8")
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith("error: bad flag or config override:")
  assert "Did you mean \"batch_size\"" in proc.stderr


def test_bad_value_is_a_one_line_error(tmp_path):
  proc = run_main("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.data.image_size=9")
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: data.image_size=9 is not divisible by the patch size 2"), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
