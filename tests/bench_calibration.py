"""What calibration costs, measured side by side in one run (not a test).

1. time: a student's calibration on CALIB_TOKENS tokens (teacher outputs included) against the
   training one layer gets at distill.py's defaults (STEPS_PER_LAYER steps of BATCH_SIZE x SEQ_LEN
   tokens: a few steps are timed and scaled up); goal <= 10%.
2. memory: the peak resident memory a calibration adds (sampled every 2 ms), in a fresh process per
   token count, with the latents made batch by batch (as the latent cache hands them over); it should
   not grow with the number of tokens, since only fp64 statistics of fixed size are kept.

    ./.venv/bin/python tests/bench_calibration.py [--kind pruned] [--kwargs '{"scale": 0.5}']

One layer of SmolLM2-135M's shape (d=576, FFN 1536) with random weights, on the CPU or the GPU.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distill  # noqa: E402
from bench_distill import ideal_step_ms, smollm2_shaped  # noqa: E402


def layer_and_student(kind, kwargs, device):
    from transformers import AutoModelForCausalLM

    from common.students import make_student
    from common.swap import get_block

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(smollm2_shaped(1), attn_implementation="sdpa").to(device)
    teacher = get_block(model, 0, "mlp").requires_grad_(False)
    return model, teacher, make_student("mlp", kind, teacher, model.config, **kwargs)


def calibrate_seconds(kind, kwargs, tokens, batch, seq, device):
    """Wall time of one calibration on `tokens` tokens, latents made batch by batch (not timed)."""
    _, teacher, student = layer_and_student(kind, kwargs, device)
    n_batches = -(-tokens // (batch * seq))
    gen = torch.Generator(device).manual_seed(0)
    latents = [
        torch.randn(batch, seq, teacher.gate_proj.in_features, device=device, generator=gen) for _ in range(n_batches)
    ]
    with torch.no_grad():
        t0 = time.time()
        student.calibrate(
            teacher,
            lambda targets=True: ((x, teacher(x) if targets else None) for x in latents),
            lambda t: t,
            lambda module, x: module(x),
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.time() - t0


def peak_memory_child(kind, kwargs, tokens, batch, seq):
    """In this (fresh) process: peak RSS added by a calibration whose latents are made on the fly."""
    _, teacher, student = layer_and_student(kind, kwargs, torch.device("cpu"))
    n_batches = -(-tokens // (batch * seq))
    d = teacher.gate_proj.in_features

    def batches(targets=True):
        gen = torch.Generator().manual_seed(0)
        for _ in range(n_batches):
            x = torch.randn(batch, seq, d, generator=gen)
            yield x, teacher(x) if targets else None

    peak, done = [0], threading.Event()

    def sample():  # the resident set, every few ms: ru_maxrss cannot be reset, so it would hide the rise
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    with torch.no_grad():
        before = rss_bytes()
        sampler = threading.Thread(target=sample)
        sampler.start()
        student.calibrate(teacher, batches, lambda t: t, lambda module, x: module(x))
        done.set()
        sampler.join()
    print(json.dumps({"added_mib": (peak[0] - before) / 2**20, "peak_mib": peak[0] / 2**20}))


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="pruned")
    ap.add_argument("--kwargs", default='{"scale": 0.5}')
    ap.add_argument("--timed-steps", type=int, default=3, help="training steps timed to estimate a layer's time")
    ap.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    kwargs = json.loads(args.kwargs)
    if args.child:
        return peak_memory_child(args.kind, kwargs, *args.child)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, seq, steps, tokens = distill.BATCH_SIZE, distill.SEQ_LEN, distill.STEPS_PER_LAYER, distill.CALIB_TOKENS
    model, _, _ = layer_and_student(args.kind, kwargs, device)
    step_ms = ideal_step_ms(model, 0, args.timed_steps, batch, seq, device)
    calib_s = calibrate_seconds(args.kind, kwargs, tokens, batch, seq, device)
    layer_s = steps * step_ms / 1000
    print(f"\n{args.kind} {kwargs}, one layer of SmolLM2-135M's shape, device {device}")
    print(f"{'measure':<58} {'value':>10}")
    print(f"{f'training step at the defaults, {batch} x {seq} tokens (ms)':<58} {step_ms:>10.1f}")
    print(f"{f'one layer: {steps} steps (s)':<58} {layer_s:>10.1f}")
    print(f"{f'calibration on CALIB_TOKENS={tokens:,} (s)':<58} {calib_s:>10.2f}")
    print(f"{'  calibration / layer time (goal <= 0.10)':<58} {calib_s / layer_s:>10.3f}")
    print(f"\n{'calibration tokens':>18} {'peak RSS added (MiB)':>22} {'peak RSS (MiB)':>16}")
    # glibc raises its mmap threshold after large frees, so freed per-batch buffers stay in a growing heap
    # and RSS creeps up with the batch count whatever the program keeps; a fixed threshold shows the program's own
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    for n in (16384, 65536, 262144):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--kind",
                args.kind,
                "--kwargs",
                args.kwargs,
                "--child",
                str(n),
                str(batch),
                str(seq),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        m = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{n:>18,} {m['added_mib']:>22.1f} {m['peak_mib']:>16.1f}")


if __name__ == "__main__":
    main()
