"""The method interface (umd_jax/methods/interface.py) and the registry: every registered method
satisfies what it claims, refusals come from the protocols, and everything method-specific in
shared code is derived from the registry."""
import ast
import inspect
import os
import re
import textwrap

import ml_collections
import pytest

from configs import common, demo
from conftest import tiny_config
from umd_jax import checkpoint, checks, methods
from umd_jax.methods import interface

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, B, S, I = interface.Trainable, interface.Backbone, interface.Sampler, interface.Inpainter
CLAIMS = {"umd": {T, B, S, I}, "dit": {T, B, S, I}, "maskdit": {T, B, S, I}, "mae": {T, B, S, I},
          "diffmae": {T, B, I}, "dit_original": {B, S, I}, "sit": {T, B, S},
          "sit_umd": {T, B, S}}


def _members(protocol):
  return [n for n, v in vars(protocol).items() if inspect.isfunction(v) and not n.startswith("_")]


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_every_method_has_the_core_and_exactly_its_capabilities(name):
  method = methods.named(name)
  assert isinstance(method, interface.Method) and method.name == name
  assert {c for c in interface.CAPABILITIES if isinstance(method, c)} == CLAIMS[name]
  for protocol in [interface.Method, *CLAIMS[name]]:
    for member in _members(protocol):
      want = list(inspect.signature(getattr(protocol, member)).parameters)[1:]
      got = list(inspect.signature(getattr(method, member)).parameters)
      assert got == want, (name, member, got, want)
      # no entry that only raises: a capability a method lacks is absent, not a stub
      source = textwrap.dedent(inspect.getsource(getattr(type(method), member)))
      body = [s for s in ast.parse(source).body[0].body if not isinstance(s, ast.Expr)]
      assert not (len(body) == 1 and isinstance(body[0], ast.Raise)), (name, member)


def test_all_registered_methods_are_listed_here():
  assert set(methods.REGISTRY) == set(CLAIMS)


@pytest.mark.parametrize("name,mode,key,message", [
    ("dit_original", "pretrain", "--mode", "--mode='pretrain': method 'dit_original' does not train (it is no "
     "Trainable; it can give probe features or a classifier cut, sample, inpaint: --mode=summary|probe|classify|"
     "encode|generate)"),
    ("dit_original", "finetune", "--mode", "does not train (it is no Trainable"),
    ("diffmae", "finetune", "--mode", "--mode='finetune': method 'diffmae' does not sample (it is no Sampler"),
])
def test_a_missing_capability_is_refused_by_the_protocol(name, mode, key, message):
  config = common.base_config(name)
  with pytest.raises(checks.ConfigError, match=re.escape(message)):
    checks.check(config, mode)


def test_modes_of_follow_the_capabilities():
  assert interface.modes_of(methods.named("dit_original")) == ["summary", "probe", "classify", "encode", "generate"]
  assert "finetune" not in interface.modes_of(methods.named("diffmae"))
  assert interface.modes_of(methods.named("umd"))[:2] == ["pretrain", "finetune"]


class _Toy(type(methods.named("dit"))):
  """A UMD-family method with a section of its own: what registering a new method gives for free."""

  def __init__(self):
    super().__init__("dit")
    self.name = "toy"

  objective = ("toy.",)

  def add_keys(self, c):
    c.toy = ml_collections.ConfigDict()
    c.toy.alpha = 0.5

  def configure(self, c):
    c.toy.alpha = 0.25
    c.classify.t = 3


def test_one_registry_line_gives_config_section_preset_refusal_and_objective(monkeypatch):
  monkeypatch.setitem(methods.REGISTRY, "toy", _Toy())
  toy = common.base_config("toy")
  assert (toy.toy.alpha, toy.classify.t) == (0.25, 3)             # its keys and its preset
  assert common.base_config("umd").toy.alpha == 0.5                # every config holds every method's keys
  assert "toy.alpha" in methods.foreign_keys(methods.named("umd"))
  assert "toy.alpha" not in methods.foreign_keys(methods.named("toy"))
  assert "toy." in methods.objective_prefixes()
  umd = tiny_config("umd")
  umd.toy.alpha = 0.9
  with pytest.raises(checks.ConfigError, match=r"toy.alpha=0.9 is read only by method toy; this config's method is 'umd'"):
    checks.check(umd, "pretrain")
  assert "toy" in methods.trainable() and "toy" in demo.get_config("toy").method


def test_objective_prefixes_come_from_the_registry():
  assert checkpoint.OBJECTIVE == methods.objective_prefixes()
  assert set(checkpoint.OBJECTIVE) == {"diffusion.", "optim.", "corruption.", "diffmae.", "dit.", "sit."}


@pytest.mark.parametrize("path", ["configs/common.py", "umd_jax/checkpoint.py", "umd_jax/flops.py",
                                  "experiments/reproduce.py", "umd_jax/checks.py", "umd_jax/train.py"])
def test_shared_modules_name_no_method(path):
  text = open(os.path.join(ROOT, path), encoding="utf-8").read()
  named = [n for n in methods.REGISTRY if re.search(rf"""["']{n}["']""", text)]
  assert not named, (path, named)


def test_every_method_base_config_passes_the_checks_of_its_modes():
  for name, method in methods.REGISTRY.items():
    config = tiny_config(name) if isinstance(method, interface.Trainable) else common.base_config(name)
    for mode in interface.modes_of(method):
      if mode in ("encode", "finetune", "generate") or not isinstance(method, interface.Trainable):
        continue  # need a VAE, init_from's labels, or converted weights' settings: tested in their modules
      checks.check(config, mode)


def test_every_mode_says_what_it_needs():
  from umd_jax.modes import MODES
  assert set(interface.MODE_NEEDS) == set(MODES)
