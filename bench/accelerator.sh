#!/usr/bin/env bash
# The accelerator rows of BENCHMARKS.md in one go (GPU or TPU host, bfloat16 compute).
#
#   bash bench/accelerator.sh [OUTDIR]        # JSON per benchmark in OUTDIR (default: bench_out/)
#   PART=train bash bench/accelerator.sh      # only the train-step rows; PART=scaling: masking + sampling
#
# Each script prints a table; the JSON files hold the rows plus machine facts (devices, jax, commit).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_out}
mkdir -p "$out"
part=${PART:-all}
bf16="--set model.dtype=bfloat16"
run() { echo "+ $*"; python "$@" || echo "FAILED ($?): $*"; }

if [[ $part == all || $part == train ]]; then
  # Target: UMD-B/4 at 64 px, global batch 256, MFU >= 45% of the device's best measured bf16 matmul
  # rate: the roofline is the fastest of a jnp.dot sweep (4096² .. 16384², bench/common.SWEEP), printed.
  # (XLA's cost_analysis() leaves out cuBLAS/cuDNN calls on GPU, so no XLA FLOP cross-check here.)
  # Unrolled (the default), scanned, and scanned with the remat policies that keep the matmul
  # outputs (model.remat=dots / matmuls) timed in the same rounds; the trace is of the first.
  run bench/train_step.py --config=configs/umd_b.py:B/4 --set batch_size=256 $bf16 \
    --compare model.scan_layers=true --compare model.scan_layers=true,model.remat=dots \
    --compare model.scan_layers=true,model.remat=matmuls --no_xla_check --profile "$out/trace_b4" \
    --json "$out/train_b4.json"
  # DiffMAE-B/4 at 64 px (75% masked, the 8 x 512 cross-self decoder), the same batch: its row
  # beside UMD's (issue 39: DiffMAE's step gets the same rows).
  run bench/train_step.py --config=configs/diffmae_b.py:umd64 --set batch_size=256 $bf16 --repeats 10 \
    --no_xla_check --json "$out/train_diffmae_b4.json"
  # The video presets (L/16, 16 x 224² clips, 1,568 tokens), 8 clips a step, remat `dots` (what
  # BENCHMARKS.md's CPU compile rows say to take on clips); cuDNN's attention by model.attention=auto.
  for method in umd mae diffmae; do
    run bench/train_step.py --config=configs/video_l.py:$method --set batch_size=8 --set model.remat=dots \
      $bf16 --repeats 5 --no_xla_check --json "$out/train_video_l16_$method.json"
  done
  # UMD-L/2 on 32x32x4 (latent-shaped) inputs; batch 256 with remat of everything but matmuls.
  run bench/train_step.py --config=configs/latent_umd_l.py:L/2 --set batch_size=256 \
    --set model.remat=dots $bf16 --no_xla_check \
    --json "$out/train_l2_latent.json"
fi
if [[ $part == all || $part == scaling ]]; then
  run bench/masking.py --config=configs/umd_b.py:B/4 --set batch_size=256 $bf16 --repeats 10 \
    --json "$out/masking_b4.json"
  run bench/sampling.py --config=configs/umd_b.py:B/4,finetune --set sample.batch_size=256 $bf16 \
    --set sample.steps=50 --json "$out/sampling_b4.json"
  # One DiffMAE-B/4 inpainting against one UMD-B/4 inpainting (64 px, centre box, 50 DDIM calls each).
  run bench/sampling.py --inpainting --config=configs/umd_b.py:B/4 --diffmae=configs/diffmae_b.py:umd64 \
    --set sample.batch_size=256 --set sample.steps=50 $bf16 --json "$out/inpainting_b4.json"
fi
