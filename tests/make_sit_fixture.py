"""Regenerates tests/fixtures/sit_tiny/ for tests/test_sit_parity.py: a tiny SiT built with SiT's own
code (github willisma/SiT: models.py, and transport/ for the path, the loss and the samplers), every
weight random; its state dict (`sit.safetensors`, SiT's key names = DiT's) and, on fixed inputs,
SiT's velocity, its training loss for a fixed (t, noise), and one trajectory end of each sampler
this code has -- ODE Euler, ODE Heun (torchdiffeq's heun2), SDE Euler-Maruyama with SiT's "sigma"
diffusion and "Mean" last step (its Gaussian increments recorded) -- with SiT's classifier-free
guidance (forward_with_cfg, 3 channels). The suite only reads the files (no torch). To regenerate:

  python3.11 -m venv /tmp/sitenv && /tmp/sitenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
  /tmp/sitenv/bin/pip install torchdiffeq safetensors numpy
  git -C /path/to/SiT archive HEAD models.py transport | tar -x -C /tmp/sit_ref   # github.com/willisma/SiT
  /tmp/sitenv/bin/python tests/make_sit_fixture.py --sit /tmp/sit_ref

SiT's models.py imports PatchEmbed, Attention and Mlp from timm, whose current release needs a
torchvision matching torch; when timm cannot be imported this script installs a stand-in module
with the three classes as timm's vision_transformer defines them (conv patch embedding, fused-qkv
softmax attention with scale head_dim^-1/2, fc1 -> act -> fc2), the same parameter names. The
network itself is already checked against DiT's code with the real timm (tests/make_dit_fixture.py);
what this fixture adds is SiT's time embedding of t in [0, 1], its transport and its samplers.
"""
import argparse
import json
import os
import sys
import types

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sit_tiny")


def _timm_stand_in():
  """timm.models.vision_transformer's PatchEmbed, Attention, Mlp (their forward and parameter names)."""

  class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
      super().__init__()
      self.patch_size = (patch_size, patch_size)
      self.num_patches = (img_size // patch_size) ** 2
      self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
      return self.proj(x).flatten(2).transpose(1, 2)

  class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, **_):
      super().__init__()
      self.num_heads, self.head_dim = num_heads, dim // num_heads
      self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
      self.proj = nn.Linear(dim, dim)

    def forward(self, x):
      b, n, c = x.shape
      q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
      attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
      return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))

  class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0):
      super().__init__()
      self.fc1, self.act, self.fc2 = nn.Linear(in_features, hidden_features), act_layer(), nn.Linear(hidden_features, in_features)

    def forward(self, x):
      return self.fc2(self.act(self.fc1(x)))

  vit = types.ModuleType("timm.models.vision_transformer")
  vit.PatchEmbed, vit.Attention, vit.Mlp = PatchEmbed, Attention, Mlp
  for name, module in (("timm", types.ModuleType("timm")), ("timm.models", types.ModuleType("timm.models")),
                       ("timm.models.vision_transformer", vit)):
    sys.modules[name] = module


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sit", required=True, help="a folder with SiT's models.py and transport/")
  args = ap.parse_args()
  try:
    import timm.models.vision_transformer  # noqa: F401
    stand_in = False
  except Exception:  # noqa: BLE001 - timm missing, or its torchvision does not match torch
    _timm_stand_in()
    stand_in = True
  sys.path.insert(0, args.sit)
  import models
  from transport import Sampler, create_transport

  torch.manual_seed(0)
  cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
  model = models.SiT(**cfg, learn_sigma=True).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != "pos_embed":
        p.add_(0.2 * torch.randn_like(p) + 0.05)
  g = torch.Generator().manual_seed(1)
  x = torch.randn(4, 4, 8, 8, generator=g)
  t = torch.tensor([0.0, 0.3, 0.71, 1.0])
  y = torch.tensor([1, 10, 7, 3])  # 10: the null label
  with torch.no_grad():
    velocity = model(x, t, y)

  transport = create_transport("Linear", "velocity")  # SiT's defaults
  data, noise, t_loss = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, generator=g)
  transport.sample = lambda x1: (t_loss, noise, x1)  # the draws of Transport.sample, fixed
  with torch.no_grad():
    loss = transport.training_losses(model, data, dict(y=torch.tensor([0, 1, 2, 3])))["loss"]

  z, labels, steps = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([2, 5]), 6
  zz, yy = torch.cat([z, z]), torch.cat([labels, torch.full_like(labels, 10)])  # SiT's sample.py
  sampler = Sampler(transport)
  out = {}
  with torch.no_grad():
    for name, method in (("ode_euler", "euler"), ("ode_heun", "heun2")):
      fn = sampler.sample_ode(sampling_method=method, num_steps=steps)
      out[name] = fn(zz, model.forward_with_cfg, y=yy, cfg_scale=1.5)[-1][:2]
    increments = torch.randn(steps - 1, *zz.shape, generator=g)
    draws = iter(increments)
    real_randn = torch.randn
    torch.randn = lambda *a, **k: next(draws) if a and tuple(a[0]) == tuple(zz.shape) else real_randn(*a, **k)
    try:
      fn = sampler.sample_sde(sampling_method="Euler", diffusion_form="sigma", num_steps=steps)
      out["sde"] = fn(zz, model.forward_with_cfg, y=yy, cfg_scale=1.5)[-1][:2]
    finally:
      torch.randn = real_randn

  os.makedirs(HERE, exist_ok=True)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(HERE, "sit.safetensors"))
  nhwc = lambda a: a.permute(0, 2, 3, 1).numpy()
  np.savez(os.path.join(HERE, "golden.npz"), x=nhwc(x), t=t.numpy(), y=y.numpy(), velocity=nhwc(velocity),
           data=nhwc(data), noise=nhwc(noise), t_loss=t_loss.numpy(), loss=loss.numpy(),
           z=nhwc(z), labels=labels.numpy(), increments=increments[:, :2].permute(0, 1, 3, 4, 2).numpy(),
           **{name: nhwc(v) for name, v in out.items()})
  with open(os.path.join(HERE, "topology.json"), "w") as f:
    json.dump({**cfg, "learn_sigma": True, "steps": steps, "cfg_scale": 1.5, "timm_stand_in": stand_in}, f, indent=2)
  print(f"wrote {HERE}: {sum(p.numel() for p in model.parameters()):,} parameters; timm stand-in: {stand_in}; "
        f"sde end |x| {float(out['sde'].abs().max()):.3f}")


if __name__ == "__main__":
  main()
