"""Bad settings and input files, as a user types them: `python main.py ...` must exit 1 with one
`error:` line that names the key or file and says what to change, and leave the disk as it was
(no workdir, no checkpoints/, no events file, no outputs). Cases run two at a time."""
import concurrent.futures
import os
import socket

import numpy as np
from PIL import Image

from test_main import run_main

DEMO = "--config=configs/demo.py"
FINETUNE = "--config=configs/demo.py:finetune"
CLASSIFY = "--config=configs/demo.py:classify"

# (name, extra arguments, text the error line must contain); {tmp} is the test's directory.
CASES = [
    ("keep_checkpoints", [DEMO, "--config.keep_checkpoints=0"], "keep_checkpoints=0 must be >= 1"),
    ("log_every", [DEMO, "--config.log_every=0"], "log_every=0 must be an integer >= 1"),
    ("checkpoint_every", [DEMO, "--config.checkpoint_every=0"], "checkpoint_every=0 must be an integer >= 1"),
    ("image_every", [DEMO, "--config.image_every=-5"], "image_every=-5 must be an integer >= 1"),
    ("num_timesteps", [DEMO, "--config.diffusion.num_timesteps=0"], "diffusion.num_timesteps=0 must be"),
    ("patch", [DEMO, "--config.model.variant=Ti/0"], "model.variant='Ti/0' is not NAME/PATCH"),
    ("negative patch", [DEMO, "--config.model.variant=Ti/-2"], "model.variant='Ti/-2' is not NAME/PATCH"),
    ("image size", [DEMO, "--config.data.image_size=9"], "data.image_size=9 is not divisible by the patch size 2"),
    ("b2", [DEMO, "--config.optim.b2=1.0"], "optim.b2=1.0 must be in [0, 1)"),
    ("label dropout", [DEMO, "--config.corruption.label_dropout=2.0"], "corruption.label_dropout=2.0 must be in"),
    ("crop", [DEMO, "--config.data.crop_area_min=0"], "need 0 < data.crop_area_min"),
    ("remat", [DEMO, "--config.model.remat=some"], "model.remat='some': use one of"),
    ("dtype", [DEMO, "--config.model.dtype=float16"], "model.dtype='float16': use 'auto' or one of"),
    ("fsdp", [DEMO, "--config.mesh.fsdp=3"], "mesh.fsdp=3 does not divide the 1 devices"),
    ("init_from", [DEMO, "--config.init_from={tmp}/no_such_run"], "has no checkpoint"),
    ("folder", [DEMO, "--config.data.name=folder", "--config.data.data_dir={tmp}/nowhere"],
     "data.data_dir='{tmp}/nowhere' does not exist"),
    ("classes", [DEMO, "--config.data.name=folder", "--config.data.data_dir={tmp}/eleven", "--config.data.channels=3"],
     "has 11 classes (c0, c1, c10, c2,"),
    ("finetune classes", [FINETUNE, "--mode=finetune", "--config.model.num_classes=5"], "model.num_classes=5"),
    ("probe shots", [DEMO, "--mode=probe", "--config.probe.fewshot_shots=(0,)"], "probe.fewshot_shots=(0,) must be"),
    ("probe workdir", [DEMO, "--mode=probe"], "has no checkpoint: pre-train there first"),
    ("inpaint missing", [FINETUNE, "--mode=generate", "--config.sample.inpaint={tmp}/mask.png"], "PNG mask file"),
    ("inpaint directory", [FINETUNE, "--mode=generate", "--config.sample.inpaint={tmp}"], "PNG mask file"),
    ("inpaint not an image", [FINETUNE, "--mode=generate", "--config.sample.inpaint={tmp}/notes.txt"],
     "is not a readable image"),
    ("inpaint nothing", [FINETUNE, "--mode=generate", "--config.sample.inpaint={tmp}/black.png"],
     "leaves nothing to fill"),
    ("steps", [FINETUNE, "--mode=generate", "--config.sample.steps=0"], "sample.steps=0 must be in [1, 1000]"),
    ("fid weights", [FINETUNE, "--mode=generate", "--config.sample.fid=True"], "sample.inception_weights='' is not"),
    ("fid not weights", [FINETUNE, "--mode=generate", "--config.sample.fid=True",
                         "--config.sample.inception_weights={tmp}/notes.txt"], "is not an .npz of arrays"),
    ("fid nothing to score", [FINETUNE, "--mode=generate", "--config.sample.fid=True", "--config.sample.num_samples=0"],
     "sample.fid=True needs samples to score"),
    ("inpaint ratio 0", [FINETUNE, "--mode=generate", "--config.sample.inpaint=random", "--config.sample.inpaint_ratio=0.0"],
     "sample.inpaint_ratio=0.0 must be in (0, 1)"),
    ("busy workdir", [DEMO, "--workdir={tmp}/busy"], "is in use by pid"),
    ("vae weights", ["--config=configs/latent_umd_l.py:B/2", "--mode=probe"], "vae.weights='' is not a file"),
    ("config missing", ["--config={tmp}/nope.py"], "no file '{tmp}/nope.py'"),
    ("config syntax", ["--config={tmp}/syntax.py"], "syntax.py line 2: invalid syntax"),
    ("config raises", ["--config={tmp}/raises.py"], "get_config raised RuntimeError: no such recipe"),
    ("config dict", ["--config={tmp}/plain.py"], "get_config returned a dict, not an ml_collections.ConfigDict"),
    ("empty workdir", [DEMO, "--workdir="], "--workdir is empty"),
    ("diffmae key on umd", [DEMO, "--config.diffmae.decoder=cross"], "diffmae.decoder='cross' is read only by method diffmae; this config's method is 'umd'"),
    ("umd key on diffmae", ["--config=configs/demo.py:diffmae", "--config.corruption.noised_mask_ratio=0.5"],
     "corruption.noised_mask_ratio=0.5 is read only by method umd / dit / maskdit / mae"),
    ("diffmae generates", ["--config=configs/demo.py:diffmae", "--mode=generate", "--config.sample.num_samples=8"],
     "sample.num_samples=8: method 'diffmae' does not sample (it is no Sampler"),
    ("classify without init_from", [CLASSIFY, "--mode=classify", "--config.init_from="],
     "classify fine-tunes a pre-trained network: pass --config.init_from=PRETRAINING_WORKDIR"),
    ("classify init_from missing", [CLASSIFY, "--mode=classify", "--config.init_from={tmp}/no_such_run"],
     "has no checkpoint"),
    ("layer decay", [CLASSIFY, "--mode=classify", "--config.classify.layer_decay=1.5"],
     "classify.layer_decay=1.5 must be in (0, 1]"),
    ("cut block", [CLASSIFY, "--mode=classify", "--config.classify.block=6"],
     "classify.block=6 is not a block of this network: use -1 (after the encoder's last block) or 0..5"),
    # One numeric rule: inf and nan are refused wherever a float is read (they pass `> 0`).
    ("noise exponent inf", [DEMO, "--config.diffusion.noise_exponent=inf"],
     "diffusion.noise_exponent=inf must be a finite number"),
    ("mixup inf", [CLASSIFY, "--mode=classify", "--config.classify.mixup_alpha=inf"],
     "classify.mixup_alpha=inf must be a finite number"),
    ("lr nan", [DEMO, "--config.optim.base_lr=nan"], "optim.base_lr=nan must be a finite number"),
    ("cfg inf", [FINETUNE, "--mode=generate", "--config.sample.cfg_scale=-inf"], "sample.cfg_scale=-inf must be"),
    ("flow sampler on umd", [FINETUNE, "--mode=generate", "--config.sample.sampler=sde"],
     "sample.sampler='sde' is not one of method 'umd''s: use one of ('ddim', 'ddpm')"),
    ("ddim on sit", ["--config=configs/demo.py:sit", "--mode=generate", "--config.sample.sampler=ddim"],
     "sample.sampler='ddim' is not one of method 'sit''s: use one of ('sde', 'ode_euler', 'ode_heun')"),
    ("sit inpaints", ["--config=configs/demo.py:sit", "--mode=generate", "--config.sample.num_samples=0",
                      "--config.sample.inpaint=center"], "method 'sit' does not inpaint (it is no Inpainter"),
    ("config argument", ["--config=configs/demo.py:abc"], "config argument 'abc' is not known: use 'umd', 'dit', 'maskdit', 'mae', 'diffmae', 'sit', 'sit_umd', 'finetune'"),
    ("config argument typo", ["--config=configs/umd_b.py:finetun"], "config argument 'finetun' is not known"),
    ("config None", ["--config={tmp}/none.py"], "get_config returned None (a missing `return`?)"),
    ("lpips not weights", [FINETUNE, "--mode=generate", "--config.sample.inpaint=center",
                           "--config.sample.lpips_weights={tmp}/notes.txt"], "is not an LPIPS weights file"),
    ("lpips without inpainting", [FINETUNE, "--mode=generate", "--config.sample.lpips_weights={tmp}/notes.txt"],
     "scores inpainting: set sample.inpaint too"),
]


def _snapshot(root):
  return {(p, os.path.getsize(os.path.join(d, p)), os.path.getmtime(os.path.join(d, p)))
          for d, _, files in os.walk(root) for p in files} | {d for d, _, _ in os.walk(root)}


def test_every_bad_input_is_one_error_line_and_writes_nothing(tmp_path):
  for c in range(11):  # an image folder with 11 classes where the demo has 10
    (tmp_path / "eleven" / f"c{c}").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "eleven" / f"c{c}" / "0.png")
  (tmp_path / "notes.txt").write_text("not an image")
  (tmp_path / "syntax.py").write_text("def get_config(arg=None):\n  return = 1\n")
  (tmp_path / "raises.py").write_text("def get_config(arg=None):\n  raise RuntimeError('no such recipe')\n")
  (tmp_path / "plain.py").write_text("def get_config(arg=None):\n  return {'batch_size': 8}\n")
  (tmp_path / "none.py").write_text("def get_config(arg=None):\n  c = 1\n")
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "black.png")  # a mask with nothing to fill
  (tmp_path / "busy").mkdir()  # a workdir another run (this test's process) holds
  (tmp_path / "busy" / ".lock").write_text(f"{socket.gethostname()} {os.getpid()}")
  before = _snapshot(tmp_path)

  def one(case):
    name, args, expected = case
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    workdir = tmp_path / f"work_{name.replace(' ', '_')}"
    if any(a.startswith("--workdir=") for a in args):  # the case names its own (existing) workdir
      return case, workdir, run_main(*args)
    return case, workdir, run_main(*args, f"--workdir={workdir}")

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(one, CASES))
  failures = []
  for (name, _, expected), workdir, proc in results:
    expected = expected.replace("{tmp}", str(tmp_path))
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    if proc.returncode != 1 or len(lines) != 1 or expected not in lines[0] or "Traceback" in proc.stderr:
      failures.append(f"{name}: exit {proc.returncode}, error lines {lines}, stderr tail {proc.stderr[-600:]!r}")
    elif workdir.exists():
      failures.append(f"{name}: created {workdir}: {sorted(os.listdir(workdir))}")
  assert not failures, "\n".join(failures)
  assert _snapshot(tmp_path) == before  # nothing else was created or changed either (init_from, inputs)
