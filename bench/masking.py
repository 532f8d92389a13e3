"""Masking scaling: step time against mask ratio and method at equal batch. Dropping tokens must pay.

  python bench/masking.py --config=configs/umd_s.py:S/4 --set batch_size=32 --set data.image_size=32

Rows: MaskDiT-style steps (no clean sub-batch) with noised mask ratio 0, 0.25, 0.5, 0.75,
then the DiT / MaskDiT / MAE / UMD presets. `token_blocks` counts the tokens every
transformer block processes per image (encoder: registers + kept; decoder: rep + all), the
work that masking removes; time per token-block should stay flat across ratios:
`per_token_vs_first` is it relative to ratio 0, as the median of per-round ratios (every
case's step takes a turn in each round, so a shared machine's slow spells cancel out).
Attention grows with tokens², so the analytic-FLOP column is given too. All eight compiled
steps and their train states are held at once (UMD-B/4: ~17 GB of float32 parameters and
AdamW moments, besides one step's temporaries).
"""
import statistics

from common import load_config, make_parser, matmul_call, median_ratio, report, time_rounds
from train_step import build, timing

from configs import common as presets
from umd_jax import corruption
from umd_jax.models.umd import num_patches as num_patches_of, parse_variant


def token_blocks(config) -> float:
  v, c, m = parse_variant(config.model.variant), config.corruption, config.model
  num_patches = num_patches_of(config)
  extra = 0 if m.conditioning == "adaln" else 1
  n_clean, n_noised = corruption.split_sizes(config.batch_size, c.clean_fraction)

  def per_image(ratio):
    return (v["encoder_depth"] * (m.num_registers + corruption.num_kept(num_patches, ratio) + extra)
            + v["decoder_depth"] * (num_patches + 1 + extra))
  return (n_clean * per_image(c.clean_mask_ratio) + n_noised * per_image(c.noised_mask_ratio)) / config.batch_size


def main():
  parser = make_parser(__doc__, "configs/umd_s.py:S/4", repeats=10)
  args = parser.parse_args()
  cases = [(f"noised ratio {r}", dict(method="maskdit", clean_fraction=0.0, noised_mask_ratio=r))
           for r in (0.0, 0.25, 0.5, 0.75)]
  cases += [(name, dict(method=name, **{k: v for k, v in presets.METHODS[name].items() if k != "conditioning"}))
            for name in ("dit", "maskdit", "mae", "umd")]
  built = {}
  for label, values in cases:
    config = load_config(args.config, args.set)
    config.corruption.clean_fraction = values["clean_fraction"]
    config.corruption.noised_mask_ratio = values["noised_mask_ratio"]
    config.corruption.clean_mask_ratio = values.get("clean_mask_ratio", config.corruption.clean_mask_ratio)
    config.model.conditioning = presets.METHODS[values["method"]]["conditioning"]
    built[label] = (config, *build(config, xla_check=False))
  first = cases[0][0]
  matmul, matmul_flops = matmul_call(built[first][0].model.dtype)
  # Every case's step and the roofline matmul take turns in each round (see common.time_rounds).
  times = time_rounds({**{label: run for label, (_, _, run, _) in built.items()}, "matmul": matmul},
                      repeats=args.repeats, best_of={"matmul": 3})
  first_blocks = token_blocks(built[first][0])
  rows = []
  for label, (config, row, _, _) in built.items():
    t = timing(row, times[label], times["matmul"], matmul_flops)
    blocks = token_blocks(config)
    rows.append({"case": label, "token_blocks": blocks, "step_ms": t["step_ms"], "model_gflop": row["model_gflop"],
                 "us_per_token_block": t["step_ms"] * 1e3 / (blocks * config.batch_size),
                 # time per token-block relative to the first case, as a median of per-round ratios
                 "per_token_vs_first": median_ratio(times[label], times[first]) * first_blocks / blocks,
                 "mfu": t["mfu"]})
  sweep = [row["per_token_vs_first"] for row in rows[:4]]
  report("masking", rows, {"config": args.config,
                           "roofline_gflops": matmul_flops / statistics.median(times["matmul"]) / 1e9,
                           "per_token_spread": max(sweep) / min(sweep) - 1}, args.json)


if __name__ == "__main__":
  main()
