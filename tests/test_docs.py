"""The method document: every "§n" cited in code, configs, tests, README.md, RESULTS.md and
BENCHMARKS.md resolves to a section of docs/METHOD.md, and the README links it."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cited():
  paths = [os.path.join(ROOT, n) for n in ("README.md", "RESULTS.md", "BENCHMARKS.md", "main.py")]
  for folder in ("umd_jax", "configs", "tests", "bench", "tools", "experiments", "notebooks"):
    paths += [p for p in glob.glob(os.path.join(ROOT, folder, "**", "*"), recursive=True)
              if p.endswith((".py", ".md", ".ipynb")) and "results/runs" not in p]
  for path in paths:
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        for number in re.findall(r"§(\d+)", line):
          yield os.path.relpath(path, ROOT), n, int(number), line


def test_every_cited_section_exists_in_docs_method():
  with open(os.path.join(ROOT, "docs", "METHOD.md"), encoding="utf-8") as f:
    sections = {int(m) for m in re.findall(r"^## (\d+)\. ", f.read(), re.M)}
  cited = list(_cited())
  assert len(cited) > 50  # the code cites the document throughout
  missing = [f"{p}:{n}: §{s}" for p, n, s, _ in cited if s not in sections]
  assert not missing, missing
  assert not [f"{p}:{n}" for p, n, _, line in cited if "SPEC" in line]  # no citation of a file the repo lacks


def test_readme_points_to_the_method_document():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    assert "docs/METHOD.md" in f.read()
