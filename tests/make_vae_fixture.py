"""Golden outputs of diffusers' PyTorch AutoencoderKL for the VAE parity tests (run once; needs torch).

  python -m venv /tmp/ref && /tmp/ref/bin/pip install torch diffusers safetensors numpy
  /tmp/ref/bin/python tests/make_vae_fixture.py tests/fixtures/vae_tiny            # committed (tiny topology)
  /tmp/ref/bin/python tests/make_vae_fixture.py /tmp/vae_sd --full                 # SD topology, 64x64, not committed
  UMD_VAE_FULL_FIXTURE=/tmp/vae_sd .venv/bin/python -m pytest tests/test_vae.py -k full

Every tensor of a freshly built model is perturbed (GroupNorm scales and all biases too, which
start at 1 and 0) so that each parameter shows up in the outputs. The folder gets the model as
`save_pretrained` writes it (config.json + diffusion_pytorch_model.safetensors) and `io.npz`:
NHWC images x in [-1, 1], the posterior mean and std, latents z and decode(z).
"""
import os
import sys

import numpy as np
import torch
from diffusers import AutoencoderKL

TINY = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
SD = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256)


def main(out, full=False):
  torch.manual_seed(0)
  model = AutoencoderKL(**(SD if full else TINY)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # GroupNorm scales (around 1) and biases (around 0)
        p.add_(0.1 * torch.randn_like(p))
      else:
        p.mul_(1 + 0.1 * torch.randn_like(p))
  size = 64 if full else 16
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  z = rng.standard_normal((2, size // 8 if full else size // 2, size // 8 if full else size // 2, 4)).astype(np.float32)
  nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  with torch.no_grad():
    posterior = model.encode(nchw(x)).latent_dist
    decoded = model.decode(nchw(z)).sample
  os.makedirs(out, exist_ok=True)
  model.save_pretrained(out, safe_serialization=True)
  np.savez(os.path.join(out, "io.npz"), x=x, mean=nhwc(posterior.mean), std=nhwc(posterior.std), z=z,
           decoded=nhwc(decoded))
  print(f"wrote {out} ({sum(p.numel() for p in model.parameters()):,} parameters)")


if __name__ == "__main__":
  main(sys.argv[1], full="--full" in sys.argv[2:])
