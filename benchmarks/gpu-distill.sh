#!/usr/bin/env bash
# The distillation checks that need a GPU, in one command (not run yet: no GPU was lent since the
# trainers were written). On a CUDA machine with this repo installed:
#
#     bash benchmarks/gpu-distill.sh [OUT]        # OUT defaults to runs/gpu-distill
#
# 1. DMD with bf16 autocast through `accelerate launch` (one process per visible GPU), 2000 steps;
# 2. the same with half the captions partial (the student NCT needs), then an NCT layout adapter on
#    it (2 noise levels, 3 injected blocks), 1000 steps;
# 3. the one-step and NCT benches on the results (the benches run on the CPU: their latency
#    columns are CPU figures; the quality columns are what the GPU-trained students score).
# Compare with docs/distillation.md § Measured (CPU, fp32): DMD 0.941 adherence, NCT 0.890 exact.
set -euo pipefail
OUT=${1:-runs/gpu-distill}
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "no CUDA device visible" >&2; exit 2; }
MULTI=""; [ "$GPUS" -gt 1 ] && MULTI="--multi_gpu"
accelerate launch $MULTI --num_processes "$GPUS" --mixed_precision bf16 -m distill.run dmd \
  --teacher shapes-t2i --output-dir "$OUT/dmd" --steps 2000 --batch 8 --mixed-precision bf16 \
  --validate-prompts 32 --checkpoint-every 250
accelerate launch $MULTI --num_processes "$GPUS" --mixed_precision bf16 -m distill.run dmd \
  --teacher shapes-t2i --partial-captions 0.5 --output-dir "$OUT/dmd_partial" --steps 2000 --batch 8 \
  --mixed-precision bf16 --checkpoint-every 250
python -m distill.run nct --teacher "$OUT/dmd_partial/pipeline" --control layout --nct-levels 2 --nct-blocks 3 \
  --output-dir "$OUT/nct" --steps 1000 --batch 8 --mixed-precision bf16
accel bench one-step --path "dmd-gpu=$OUT/dmd/pipeline" --prompts 200 --out "$OUT/bench"
accel bench nct-control --path "$OUT/dmd_partial/pipeline" --adapter "$OUT/nct/adapter" --prompts 200 --out "$OUT/bench"
