"""Regenerates tests/fixtures/dit_tiny/ for tests/test_dit.py: a tiny DiT built with the reference
code (facebookresearch/DiT's models.py, which needs torch and timm), every weight random; its
state dict (`dit.pt`, DiT's key names), the same weights as a diffusers `transformer/` folder
(config.json + safetensors, diffusers' key names), and the reference model's outputs on fixed
inputs (`golden.npz`). The suite only reads the files (no torch). To regenerate:

  python3.11 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm diffusers
  git -C /path/to/DiT show HEAD:models.py > /tmp/dit_models.py     # github.com/facebookresearch/DiT
  /tmp/torchenv/bin/python tests/make_dit_fixture.py --dit_models /tmp/dit_models.py
  /tmp/torchenv/bin/python tests/make_dit_fixture.py --dit_models /tmp/dit_models.py --xl /tmp/dit_xl --scale 0.02
                                                                           # XL/2 (2.7 GB), not committed

Weights are perturbed away from DiT's initialisation (which zeroes the adaLN-Zero gates and the
output layer: a parity test of it would compare zeros); the fixed position table is kept. The
diffusers copy is checked here against the reference: diffusers' port differs from DiT's code in
two places -- its timestep frequencies use exp(-ln(10⁴)·k/(half-1)) (`downscale_freq_shift=1`)
and its MLP-branch LayerNorm eps is 1e-5 -- so its forward is compared with both set to DiT's.
"""
import argparse
import importlib.util
import json
import os

import numpy as np
import torch
from diffusers import DiTTransformer2DModel

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "dit_tiny")


def load_reference(path):
  spec = importlib.util.spec_from_file_location("dit_models", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def to_diffusers(state: dict, depth: int) -> dict:
  """DiT's names -> diffusers' DiTTransformer2DModel names (qkv split; the one embedder copied
  into every block, as diffusers' conversion script does)."""
  out = {"pos_embed.proj.weight": state["x_embedder.proj.weight"], "pos_embed.proj.bias": state["x_embedder.proj.bias"]}
  for b in range(depth):
    p = f"transformer_blocks.{b}."
    for i, name in ((0, "linear_1"), (2, "linear_2")):
      for kind in ("weight", "bias"):
        out[f"{p}norm1.emb.timestep_embedder.{name}.{kind}"] = state[f"t_embedder.mlp.{i}.{kind}"]
    out[f"{p}norm1.emb.class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
    for kind in ("weight", "bias"):
      q, k, v = state[f"blocks.{b}.attn.qkv.{kind}"].chunk(3)
      out[f"{p}attn1.to_q.{kind}"], out[f"{p}attn1.to_k.{kind}"], out[f"{p}attn1.to_v.{kind}"] = q, k, v
      out[f"{p}attn1.to_out.0.{kind}"] = state[f"blocks.{b}.attn.proj.{kind}"]
      out[f"{p}ff.net.0.proj.{kind}"] = state[f"blocks.{b}.mlp.fc1.{kind}"]
      out[f"{p}ff.net.2.{kind}"] = state[f"blocks.{b}.mlp.fc2.{kind}"]
      out[f"{p}norm1.linear.{kind}"] = state[f"blocks.{b}.adaLN_modulation.1.{kind}"]
  for kind in ("weight", "bias"):
    out[f"proj_out_1.{kind}"] = state[f"final_layer.adaLN_modulation.1.{kind}"]
    out[f"proj_out_2.{kind}"] = state[f"final_layer.linear.{kind}"]
  return {k: v.clone().contiguous() for k, v in out.items()}


def inputs(size, channels, classes, batch):
  g = torch.Generator().manual_seed(1)
  x = torch.randn(batch, channels, size, size, generator=g)
  t = torch.tensor([0, 121, 500, 999][:batch])
  y = torch.tensor([1, classes, 7, 3][:batch])  # `classes` is the null label
  return x, t, y


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dit_models", required=True, help="facebookresearch/DiT's models.py")
  ap.add_argument("--xl", default="", help="write the full XL/2 topology (256 px latents) here instead")
  ap.add_argument("--scale", type=float, default=0.2, help="std of the perturbation of every weight (shift: scale/4)")
  args = ap.parse_args()
  ref = load_reference(args.dit_models)
  if args.xl:
    cfg = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, num_classes=1000)
    out_dir, batch = args.xl, 2
  else:
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    out_dir, batch = HERE, 4
  torch.manual_seed(0)
  model = ref.DiT(**cfg, learn_sigma=True).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != "pos_embed":
        p.add_(args.scale * torch.randn_like(p) + args.scale / 4)
  x, t, y = inputs(cfg["input_size"], cfg["in_channels"], cfg["num_classes"], batch)
  with torch.no_grad():
    out = model(x, t, y)
  state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}

  port = DiTTransformer2DModel(num_attention_heads=cfg["num_heads"], attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
                               in_channels=cfg["in_channels"], out_channels=2 * cfg["in_channels"], num_layers=cfg["depth"],
                               sample_size=cfg["input_size"], patch_size=cfg["patch_size"],
                               num_embeds_ada_norm=cfg["num_classes"]).eval()
  missing, unexpected = port.load_state_dict(to_diffusers(state, cfg["depth"]), strict=False)
  assert not unexpected and all("pos_embed.pos_embed" in k for k in missing), (missing, unexpected)
  os.makedirs(out_dir, exist_ok=True)
  port.save_pretrained(os.path.join(out_dir, "transformer"))
  for block in port.transformer_blocks:  # DiT's own settings where the port differs, then compare
    block.norm1.emb.time_proj.downscale_freq_shift = 0
    block.norm3.eps = 1e-6
  with torch.no_grad():
    port_out = port(x, timestep=t, class_labels=y).sample
  err = float((port_out - out).abs().max() / out.abs().max())
  assert err < 1e-5, f"diffusers' port (DiT's settings) differs from the reference by {err}"

  torch.save(state, os.path.join(out_dir, "dit.pt"))
  nhwc = lambda a: a.permute(0, 2, 3, 1).numpy()
  np.savez(os.path.join(out_dir, "golden.npz"), x=nhwc(x), t=t.numpy(), y=y.numpy(), out=nhwc(out))
  with open(os.path.join(out_dir, "topology.json"), "w") as f:
    json.dump({**cfg, "learn_sigma": True, "port_vs_reference_max_rel": err}, f, indent=2)
  print(f"wrote {out_dir}: {sum(p.numel() for p in model.parameters()):,} parameters (the reference's count); "
        f"diffusers' port within {err:.1e} of the reference")


if __name__ == "__main__":
  main()
