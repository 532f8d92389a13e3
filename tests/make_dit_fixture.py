"""Regenerates tests/fixtures/dit_tiny/: a tiny DiT in diffusers' format (the `transformer/` folder
of a DiT pipeline: config.json + diffusion_pytorch_model.safetensors), the same weights as the
original code's state dict (`dit_tiny.pt`, key names of facebookresearch/DiT's models.py), and the
diffusers model's outputs on fixed inputs (`golden.npz`), for tests/test_dit.py. Needs torch and
diffusers (not requirements of the package; the suite only reads the files):

  python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 diffusers safetensors
  /tmp/torchenv/bin/python tests/make_dit_fixture.py            # tiny topology, written to the fixture
  /tmp/torchenv/bin/python tests/make_dit_fixture.py --xl /tmp/dit_xl   # the full XL/2 topology (not committed)

Every weight is random (seeded) and perturbed away from DiT's initialisation, which zeroes the
adaLN-Zero gates and the output layer (a parity test of an initialised model would compare zeros).
The per-block timestep and label embedders of diffusers' port hold one shared copy, as in a
converted checkpoint (the original model has one embedder).
"""
import argparse
import json
import os

import numpy as np
import torch
from diffusers import DiTTransformer2DModel

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "dit_tiny")


def original_state(diffusers_state: dict, depth: int) -> dict:
  """The same weights under facebookresearch/DiT's names (models.py): one t / y embedder, fused qkv."""
  d, out = diffusers_state, {}
  emb = "transformer_blocks.0.norm1.emb."
  out["x_embedder.proj.weight"], out["x_embedder.proj.bias"] = d["pos_embed.proj.weight"], d["pos_embed.proj.bias"]
  for i, name in ((0, "linear_1"), (2, "linear_2")):
    for kind in ("weight", "bias"):
      out[f"t_embedder.mlp.{i}.{kind}"] = d[f"{emb}timestep_embedder.{name}.{kind}"]
  out["y_embedder.embedding_table.weight"] = d[f"{emb}class_embedder.embedding_table.weight"]
  for b in range(depth):
    p = f"transformer_blocks.{b}."
    for kind in ("weight", "bias"):
      out[f"blocks.{b}.attn.qkv.{kind}"] = torch.cat([d[f"{p}attn1.to_{x}.{kind}"] for x in "qkv"])
      out[f"blocks.{b}.attn.proj.{kind}"] = d[f"{p}attn1.to_out.0.{kind}"]
      out[f"blocks.{b}.mlp.fc1.{kind}"] = d[f"{p}ff.net.0.proj.{kind}"]
      out[f"blocks.{b}.mlp.fc2.{kind}"] = d[f"{p}ff.net.2.{kind}"]
      out[f"blocks.{b}.adaLN_modulation.1.{kind}"] = d[f"{p}norm1.linear.{kind}"]
  for kind in ("weight", "bias"):
    out[f"final_layer.adaLN_modulation.1.{kind}"] = d[f"proj_out_1.{kind}"]
    out[f"final_layer.linear.{kind}"] = d[f"proj_out_2.{kind}"]
  return {k: v.clone().contiguous() for k, v in out.items()}


def build(depth, heads, head_dim, channels, size, patch, classes, seed=0):
  torch.manual_seed(seed)
  model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels,
                                out_channels=2 * channels, num_layers=depth, sample_size=size, patch_size=patch,
                                num_embeds_ada_norm=classes).eval()
  with torch.no_grad():
    shared = {}
    for name, p in model.named_parameters():
      key = name.split("norm1.emb.", 1)[1] if "norm1.emb." in name else None
      if key is not None and key in shared:
        p.copy_(shared[key])  # one embedder, copied into every block (as a converted checkpoint)
        continue
      p.add_(0.2 * torch.randn_like(p) + 0.05)
      if key is not None:
        shared[key] = p.detach().clone()
  return model


def outputs(model, size, channels, classes, batch=4):
  g = torch.Generator().manual_seed(1)
  x = torch.randn(batch, channels, size, size, generator=g)
  t = torch.tensor([0, 121, 500, 999][:batch])
  y = torch.tensor([1, classes, 7, 3][:batch])  # `classes` is the null label
  with torch.no_grad():
    out = model(x, timestep=t, class_labels=y).sample
  return x.permute(0, 2, 3, 1).numpy(), t.numpy(), y.numpy(), out.permute(0, 2, 3, 1).numpy()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--xl", default="", help="write the full XL/2 topology (256 px latents) here instead")
  args = ap.parse_args()
  if args.xl:
    cfg = dict(depth=28, heads=16, head_dim=72, channels=4, size=32, patch=2, classes=1000)
    out_dir = args.xl
  else:
    cfg = dict(depth=2, heads=2, head_dim=16, channels=4, size=8, patch=2, classes=10)
    out_dir = HERE
  model = build(**cfg)
  os.makedirs(out_dir, exist_ok=True)
  model.save_pretrained(os.path.join(out_dir, "transformer"))
  state = original_state(model.state_dict(), cfg["depth"])
  torch.save(state, os.path.join(out_dir, "dit.pt"))
  x, t, y, out = outputs(model, cfg["size"], cfg["channels"], cfg["classes"], batch=2 if args.xl else 4)
  np.savez(os.path.join(out_dir, "golden.npz"), x=x, t=t, y=y, out=out)
  with open(os.path.join(out_dir, "topology.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  print(f"wrote {out_dir}: {sum(p.numel() for p in model.parameters()):,} parameters (diffusers' count, "
        "per-block embedders included)")


if __name__ == "__main__":
  main()
