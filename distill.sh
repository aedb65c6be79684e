#!/usr/bin/env bash
# The one command line to edit: distill every FFN of the prepared SmolLM2-135M into a pruned
# half-width SwiGLU. Layer by layer, each student is first calibrated in closed form on the
# teacher's latents (channels chosen by activation, down projection refit), then trained to match
# its teacher block; then the logits phase trains all students together on KL to the teacher,
# in the same run folder. Extra arguments go to both phases (later arguments win), e.g.
#   ./distill.sh --teacher path/to/model --out-dir runs/mine      NPROC=8 ./distill.sh
set -euo pipefail
cd "$(dirname "$0")"
args=(--target mlp --student-kind pruned --student-kwargs '{"scale": 0.5}' --calib-tokens 65536
      --steps-per-layer 100 --lr 1e-4 --batch-size 8 --seq-len 512 --kd-steps 2000 --kd-lr 1e-3
      --out-dir "runs/distill_$(date +%Y%m%d_%H%M%S)" "$@")
run() { ./.venv/bin/torchrun --standalone --nproc_per_node "${NPROC:-1}" distill.py "${args[@]}" "$@"; }
run --phase layerwise
run --phase logits
