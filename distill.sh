#!/usr/bin/env bash
# The one command line to edit. PRESET picks its arguments (default: pruned):
#   pruned   distill every FFN of the prepared SmolLM2-135M into a pruned half-width SwiGLU. Layer by layer,
#            each student is first calibrated in closed form on the latents of the model with the earlier
#            students in place (channels chosen by Optimal Brain Surgeon, down projection refit), then trained,
#            both toward the output that puts the teacher's hidden state back; the calibration, stream,
#            learning rates and validation are distill.py's defaults.
#   radlads  RADLADS (arXiv:2505.03005) on every attention: step 1 aligns every attention output with the
#            teacher's, all layers at once from one teacher pass a batch, LR 1e-3 cosine to 1e-5; step 2 is the
#            logits phase at a flat LR 1e-5. (Its optional step 3, fine-tuning, is not in it: train.py --init.)
#   hybrid   a hybrid of the measured best attention student, lolcats (docs/attention.md): --phase choose first
#            ranks the attention layers by what converting each alone costs (KL to the teacher), then the half
#            that cost least are distilled (--chosen; --convert N for another number) and the rest keep softmax.
# Then the logits phase trains all students together on KL to the teacher, in the same run folder. Extra
# arguments go to both phases (later arguments win), e.g.
#   ./distill.sh --teacher path/to/model --out-dir runs/mine      NPROC=8 ./distill.sh      PRESET=radlads ./distill.sh
#   PRESET=hybrid ./distill.sh --convert 8
set -euo pipefail
cd "$(dirname "$0")"
case "${PRESET:-pruned}" in
  pruned)
    args=(--target mlp --student-kind pruned --student-kwargs '{"scale": 0.5}'
          --steps-per-layer 100 --batch-size 8 --seq-len 512 --kd-steps 2000) ;;
  radlads)
    kind=delta  # the student: the gated delta rule, RADLADS' class (RWKV-7); linear (GLA) trained less far (docs)
    # RADLADS spends 100M tokens on step 1 and 250M on step 2 for a 7B teacher; for SmolLM2-135M a quarter of
    # that in the same 2:5 ratio, per GPU: 6,000 x 8 x 512 = 25M and 15,000 x 8 x 512 = 61M tokens
    args=(--target attn --student-kind "$kind" --schedule parallel --calib-tokens 65536 --batch-size 8 --seq-len 512
          --steps-per-layer 6000 --lr 1e-3 --min-lr-ratio 0.01 --val-every 500
          --kd-steps 15000 --kd-lr 1e-5 --kd-min-lr-ratio 1 --kd-warmup-steps 0 --kd-val-every 500
          --kd-save-every 1000 --keep-last 2) ;;
  hybrid)
    # trained at 1,024-token sequences: train at the context you serve (docs/attention.md)
    args=(--target attn --student-kind lolcats --steps-per-layer 100 --batch-size 8 --seq-len 1024 --kd-steps 2000) ;;
  *)
    echo "distill.sh: unknown PRESET '$PRESET'; use pruned, radlads or hybrid" >&2
    exit 1 ;;
esac
args+=(--out-dir "runs/distill_$(date +%Y%m%d_%H%M%S)" "$@")
run() { ./.venv/bin/torchrun --standalone --nproc_per_node "${NPROC:-1}" distill.py "${args[@]}" "$@"; }
if [ "${PRESET:-pruned}" = hybrid ]; then
  run --phase choose
  run --phase layerwise --chosen
else
  run --phase layerwise
fi
run --phase logits
