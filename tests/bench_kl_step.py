"""What a DECODER_LOSS=kl step costs, measured side by side in one run (not a test): distill.py's step (the model
run on from layer i's input, which the latent cache holds, against the teacher's final hidden states kept once a
rotation) against two whole-model passes a step (the teacher's for the target, then the model with the student
in), at a few layers; forward and backward, the same loss checked equal.

    ./.venv/bin/python tests/bench_kl_step.py [--layers-to-time 0,15,29 --batch-size 2 --seq-len 512]

A SmolLM2-135M-shaped model (30 layers) with random weights and a half-width pruned FFN student, on the CPU or
the GPU; the median of REPEATS interleaved timings per variant.
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_distill import smollm2_shaped  # noqa: E402
from common.config import override  # noqa: E402

LAYERS_TO_TIME = [0, 15, 29]  # early, middle, last: the run-on forward and backward shrink with the layer
BATCH_SIZE = 2  # sequences per step
SEQ_LEN = 512
REPEATS = 3  # timings per variant and layer (interleaved; the median is reported)


def main():
    globals().update(override(globals()).as_dict())
    from transformers import AutoModelForCausalLM

    from common.kd import final_hidden, kd_loss, lm_head
    from common.latent_cache import LatentCache
    from common.runtime import Runtime
    from common.students import make_student
    from common.swap import LayerCalls, get_block, starting_at, swapped

    rt = Runtime()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(smollm2_shaped(30), attn_implementation="sdpa")
    model = model.to(rt.device).eval().requires_grad_(False)
    calls = LayerCalls(model, "mlp")
    ids = torch.randint(0, model.config.vocab_size, (BATCH_SIZE, SEQ_LEN), device=rt.device)
    cache = LatentCache(rt, model, ids, calls, BATCH_SIZE, "device", "", final_sequences=BATCH_SIZE)

    def timed(step):
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        loss = step()
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        return time.time() - t0, loss

    rows = []
    for i in sorted(LAYERS_TO_TIME):
        cache.advance_to(i)
        student = make_student("mlp", "pruned", get_block(model, i, "mlp"), model.config, scale=0.5).to(rt.device)
        slot = {(i, "mlp"): student}

        def two_passes():
            with torch.no_grad(), rt.autocast():
                teacher_hidden = final_hidden(model, ids)
            with swapped(model, slot), rt.autocast():
                loss, _ = kd_loss(final_hidden(model, ids), teacher_hidden, lm_head(model))
            loss.backward()
            return loss.item()

        def run_on():
            with swapped(model, slot), starting_at(calls, i, cache.h), rt.autocast():
                loss, _ = kd_loss(final_hidden(model, ids), cache.final, lm_head(model))
            loss.backward()
            return loss.item()

        times = {"two_passes": [], "run_on": []}
        losses = {}
        for _ in range(REPEATS):
            for name, step in (("two_passes", two_passes), ("run_on", run_on)):
                seconds, losses[name] = timed(step)
                times[name].append(seconds)
        a, b = losses["two_passes"], losses["run_on"]
        assert abs(a - b) <= 1e-3 * abs(a), f"layer {i}: the two losses differ ({a} against {b})"
        two, on = (statistics.median(times[k]) for k in ("two_passes", "run_on"))
        rows.append((i, two, on))

    print(
        f"DECODER_LOSS=kl step, {BATCH_SIZE} x {SEQ_LEN} tokens, SmolLM2-135M shape, {rt.device}, median of {REPEATS}"
    )
    print(f"{'layer':>5} {'two passes (s)':>15} {'run on (s)':>11} {'ratio':>7}")
    for i, two, on in rows:
        print(f"{i:>5} {two:>15.3f} {on:>11.3f} {two / on:>6.2f}x")
    two, on = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"{'all':>5} {two:>15.3f} {on:>11.3f} {two / on:>6.2f}x")


if __name__ == "__main__":
    main()
