#!/usr/bin/env bash
# The one command line to edit: layer-wise distillation of every FFN of the prepared SmolLM2-135M
# into a pruned half-width SwiGLU, one layer at a time. Extra arguments are passed on to distill.py
# (e.g. ./distill.sh --teacher path/to/model --out-dir runs/mine). Set NPROC for more GPUs.
set -euo pipefail
cd "$(dirname "$0")"
exec ./.venv/bin/torchrun --standalone --nproc_per_node "${NPROC:-1}" distill.py \
  --target mlp --student-kind pruned --student-kwargs '{"scale": 0.5}' \
  --steps-per-layer 200 --batch-size 8 --seq-len 512 --lr 1e-3 "$@"
