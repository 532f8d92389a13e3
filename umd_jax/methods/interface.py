"""The method interface, typed: a core every method has, and capabilities a method has or lacks.

Shared modules ask for a capability (`require`), and a method without it is refused in one line
that this module derives from the protocols: which capability is missing and which modes the
method does have. tests/test_methods.py checks every registered method against what it claims.
"""
from typing import Any, Callable, Protocol, runtime_checkable

from umd_jax import rules

Loss = Callable[..., tuple]  # loss(model, images, labels, key, sample_ids) -> (loss, metrics)


@runtime_checkable
class Method(Protocol):
  """What every method has. `meaning`: the keys whose values give saved weights their meaning
  (METHOD.md §12; every reader of weights refuses other values). `objective`: key prefixes a
  resumed training may not change, beside the shared `diffusion.` and `optim.`. `clips`: whether its
  networks read clips (data.frames > 1; geometry.py) as well as images."""
  name: str
  meaning: tuple
  objective: tuple
  clips: bool

  def add_keys(self, c) -> None:
    """Its own config keys with their defaults. Every base config holds every method's keys; a
    method refuses another's keys changed (checks.py derives which from this). A section of its
    own is made with methods.common.section, which methods sharing a section may each extend."""

  def configure(self, c) -> None:
    """Its preset: the values it gives shared keys and its own (base_config(name) applies it)."""

  def build(self, config, rngs) -> Any:
    """The nnx model (every leaf an nnx.Param)."""

  def check(self, config, mode: str) -> None:
    """Its own settings (raises rules.ConfigError)."""

  def patch(self, config) -> int:
    """The network's patch size (ValueError for a model.variant it cannot read)."""

  def width(self, config) -> int:
    """The width of its tokens (a classifier head's input)."""

  def train_flops_per_image(self, config) -> float:
    """Analytic forward + backward FLOPs of one training image (flops.py's unit)."""


@runtime_checkable
class Trainable(Protocol):
  """Trained here: --mode=pretrain (and, with a Sampler, class-conditional --mode=finetune).
  `label_params`: the top-level parameters of its label table, made anew when a class-conditional
  run starts from a self-supervised checkpoint."""
  label_params: tuple

  def loss_fn(self, config, schedule) -> Loss:
    """loss(model, images, labels, key, sample_ids) -> (loss, metrics); the metrics hold "loss_*"
    parts (one log line) and per-timestep buckets (bucket_sum, bucket_count)."""

  def row_split(self, config) -> float:
    """Share of the batch in its first sub-batch: gradient accumulation gives every micro-batch an
    equal part of each sub-batch."""

  def preview(self, config, schedule, model, x0, key) -> tuple:
    """(input shown to the model, its prediction) for the reconstruction grid."""


@runtime_checkable
class Backbone(Protocol):
  """Its blocks are read by --mode=probe (linear, few-shot, DDAE sweep) and cut by --mode=classify."""

  def num_blocks(self, config) -> int:
    """Blocks a probe may read (features' block indices 0 .. n-1)."""

  def features(self, model, x, t_index, blocks) -> Any:
    """(len(blocks), B, D) probe features; REP (-1) for the representation."""

  def noised(self, config, schedule, images, t, eps) -> tuple:
    """(input, what the network is told): the clean images (t None) or noised to timesteps t (B,)."""

  def encoder_depth(self, config) -> int:
    """Blocks of its encoder (the classifier's default cut: after the last)."""

  def classify_tokens(self, model, x, t_index, block, drop=None) -> Any:
    """(B, L, D) tokens after `block` of the unmasked forward; drop (block + 1, 2, B) stochastic depth."""

  def classify_layers(self, config, block) -> dict:
    """{top-level parameter: layer id, or ("stack", id of its block 0)} of what that cut reads
    (MAE's layer-wise LR decay); the others stay frozen."""


@runtime_checkable
class Sampler(Protocol):
  """Samples class-conditionally: --mode=generate's grid, .npz and FID; --mode=finetune trains it.
  `samplers`: the values of sample.sampler it integrates with."""
  samplers: tuple

  def sample(self, config, schedule, make_model, labels, noise, key) -> Any:
    """Samples from `noise` with sample.sampler. make_model() merges the weights where it is called
    (inside a sampling scan: Flax refuses a module built at an outer trace level there)."""


@runtime_checkable
class Inpainter(Protocol):
  """Fills unknown pixels: --mode=generate with sample.inpaint (with one of `samplers`)."""
  samplers: tuple

  def inpaint(self, config, schedule, make_model, images, known, labels, key, num_masked: int) -> Any:
    """Images with the unknown pixels (known == 0) filled, known ones copied; num_masked: patches
    with an unknown pixel, the same in every image."""

  def inpaint_steps(self, config) -> int:
    """Network calls of one inpainting (the sampling benchmark's unit)."""

  def inpainter(self, config) -> str:
    """What the inpainting does, in a result's words ("repaint", "one-shot fill", ...)."""


CAPABILITIES = (Trainable, Backbone, Sampler, Inpainter)
# What a mode needs, beside the core. generate needs a Sampler for samples (sample.num_samples > 0)
# and an Inpainter for sample.inpaint: checks.py asks for those by setting.
MODE_NEEDS = {"pretrain": (Trainable,), "finetune": (Trainable, Sampler), "summary": (), "probe": (Backbone,),
              "classify": (Backbone,), "generate": (), "encode": ()}
DOES = {Trainable: "train", Backbone: "give probe features or a classifier cut", Sampler: "sample",
        Inpainter: "inpaint"}


def has(method, capability) -> bool:
  return isinstance(method, capability)


def modes_of(method) -> list:
  """The modes `method` has every capability for (generate: a Sampler or an Inpainter)."""
  modes = [m for m, needs in MODE_NEEDS.items() if m != "generate" and all(has(method, n) for n in needs)]
  if has(method, Sampler) or has(method, Inpainter):
    modes.append("generate")
  return modes


def require(method, capability, key: str, value, action: str = "") -> None:
  """Refuse `key`=`value` in one line when `method` lacks `capability`, naming what it can do."""
  if not has(method, capability):
    does = [DOES[c] for c in CAPABILITIES if has(method, c)]
    raise rules.ConfigError(
        f"{key}={value!r}: method {method.name!r} does not {DOES[capability]} (it is no {capability.__name__}; it can "
        f"{', '.join(does) or 'nothing'}: --mode={'|'.join(modes_of(method))}){': ' + action if action else ''}")
