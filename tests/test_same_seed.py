"""The same config and seed give the state recorded in tests/fixtures/same_seed.json (written by
tests/make_same_seed_fixture.py): bitwise on the machine that wrote it, to float32 tolerances on
others (XLA:CPU's kernels, and so the last bits, depend on the CPU's vector extensions). Guards
refactors that must not change the numbers. Compiled with XLA's full optimizations, as training
runs (the suite's default, most optimizations off, moves the last bits of some products)."""
import json

import make_same_seed_fixture as fixture


def test_four_steps_give_the_recorded_parameters_optimizer_and_ema(tmp_path, optimized):
  with open(fixture.FIXTURE) as f:
    recorded = json.load(f)
  got = fixture.run(str(tmp_path / "run"))
  assert sorted(got) == sorted(recorded["arrays"])
  bitwise = fixture.machine() == recorded["machine"]
  for name, want in recorded["arrays"].items():
    have = got[name]
    if bitwise:
      assert have["fingerprint"] == want["fingerprint"], f"{name} differs bitwise from the recorded run"
    # Elsewhere: float32 summation-order differences, and at most an Adam step (<= the peak
    # learning rate, 1.25e-4) flipping sign on a few near-zero gradients.
    tol = 1e-3 * want["abs_sum"] + 1e-5 * want["size"]
    assert abs(have["sum"] - want["sum"]) <= tol, (name, have["sum"], want["sum"])
    assert abs(have["abs_sum"] - want["abs_sum"]) <= tol, (name, have["abs_sum"], want["abs_sum"])
