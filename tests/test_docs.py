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


BANNED = r"(?i)(taken|certain) from the paper|from the paper:|as the paper samples|the paper's (linear|setting)|x0\" \(pixels, the paper's\)"


def test_diffmae_defaults_say_where_they_come_from_in_one_wording():
  """methods/diffmae.SOURCES is the one table: METHOD.md §9 lists every default with its value and
  source word for word, the line that sets each (configs/common.py, or the method's add_keys /
  configure) carries its tag, and no DiffMAE text claims
  "from the paper" what was only recalled (the paper's text was not re-read)."""
  from configs import common
  from umd_jax import rules
  from umd_jax.methods import diffmae
  read = lambda *p: open(os.path.join(ROOT, *p), encoding="utf-8").read()
  method_md, readme = read("docs", "METHOD.md"), read("README.md")
  section9 = method_md[method_md.index("## 9. DiffMAE"):method_md.index("## 10.")]
  base = common.base_config("diffmae")
  for key, source in diffmae.SOURCES.items():
    row = f"| `{key}` | {rules.lookup(base, key)} | {source} |"
    assert row in section9, row
  config_lines = (read("configs", "common.py") + read("umd_jax", "methods", "diffmae.py")).splitlines()
  for key, source in diffmae.SOURCES.items():
    section, name = key.split(".")
    own = "|d" if section == "diffmae" else ""  # add_keys: d = c.diffmae
    lines = [l for l in config_lines if re.match(rf"\s*(c\.{section}{own})\.{name} = ", l)]
    assert any(diffmae.TAGS[source] in l.split("#", 1)[-1] for l in lines), (key, lines)
  readme_diffmae = readme[readme.index("### DiffMAE"):readme.index("### Latent diffusion")]
  for where, text in (("METHOD.md §9", section9), ("README DiffMAE", readme_diffmae),
                      ("configs/diffmae_b.py", read("configs", "diffmae_b.py")),
                      ("configs/common.py", read("configs", "common.py")),
                      ("methods/diffmae.py", read("umd_jax", "methods", "diffmae.py"))):
    assert not re.search(BANNED, text), (where, re.search(BANNED, text))
  assert "chosen (recalled from the paper, its text not re-read)" in readme_diffmae.replace("Chosen (", "chosen (")
