"""Benchmark: each recurrent student's chunked form (common.students.attention.gla_chunked for `linear`,
common.students.delta.delta_chunked for `delta`) against the naive step-by-step recurrence it must equal, on the
same inputs in one run, forward and forward+backward. Not collected by pytest.

    ./.venv/bin/python tests/bench_attention.py [--seq-len 2048 --chunk-sizes 16,32,64,128 --kinds gla,delta]
"""

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.config import override  # noqa: E402
from common.students.attention import MAX_LOG_DECAY, gla_chunked, gla_recurrent  # noqa: E402
from common.students.delta import delta_chunked, delta_recurrent  # noqa: E402

BATCH = 1  # one sequence, as in a single-stream CPU run
SEQ_LEN = 2048  # SmolLM2's training context
HEADS = 9  # SmolLM2-135M: 9 query heads (linear and delta students expand the 3 KV heads to 9)
HEAD_DIM = 64  # SmolLM2-135M's head size
CHUNK_SIZES = [16, 32, 64, 128]  # chunk sizes compared; 64 is both students' default
KINDS = ["gla", "delta"]  # the recurrences compared: gla (linear's), delta (Gated DeltaNet, delta's)
REPEATS = 3  # timings are the best of this many runs
THREADS = 0  # torch threads; 0 = torch's default
SEED = 0

config = override(globals()).as_dict()
globals().update(config)  # the constants now hold the run's settings
if THREADS:
    torch.set_num_threads(THREADS)


def best_time(fn):
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def forward_backward(fn, inputs):
    xs = [t.clone().requires_grad_() for t in inputs]
    fn(*xs)[0].sum().backward()


torch.manual_seed(SEED)
shape = (BATCH, HEADS, SEQ_LEN, HEAD_DIM)
q, k, v = torch.randn(shape), torch.randn(shape), torch.randn(shape)
RECURRENCES = {  # kind: (the naive loop, the chunked form, their inputs before scale)
    "gla": (gla_recurrent, gla_chunked, [q, k, v, -MAX_LOG_DECAY * torch.rand(shape)]),
    "delta": (
        delta_recurrent,
        delta_chunked,
        [q, F.normalize(k, dim=-1), v, -MAX_LOG_DECAY * torch.rand(shape[:3]), torch.rand(shape[:3])],
    ),
}
scale = HEAD_DIM**-0.5
print(
    f"B={BATCH} T={SEQ_LEN} H={HEADS} K=V={HEAD_DIM}, fp32, {torch.get_num_threads()} threads, "
    f"torch {torch.__version__}, best of {REPEATS}"
)

rows = []
for kind in KINDS:
    recurrent, chunked, inputs = RECURRENCES[kind]
    reference = recurrent(*inputs, scale)[0]
    with torch.no_grad():
        naive_fwd = best_time(lambda: recurrent(*inputs, scale))
    naive_fb = best_time(lambda: forward_backward(lambda *x: recurrent(*x, scale), inputs))
    rows.append((f"{kind} recurrence (naive)", naive_fwd, naive_fb, 1.0, 1.0, 0.0))
    for c in CHUNK_SIZES:
        err = (chunked(*inputs, scale, c)[0] - reference).abs().max().item() / reference.abs().max().item()
        with torch.no_grad():
            fwd = best_time(lambda: chunked(*inputs, scale, c))
        fb = best_time(lambda: forward_backward(lambda *x: chunked(*x, scale, c), inputs))
        rows.append((f"{kind} chunked, chunk {c}", fwd, fb, naive_fwd / fwd, naive_fb / fb, err))

tokens = BATCH * SEQ_LEN
print(
    f"{'implementation':<26} {'fwd ms':>9} {'fwd tok/s':>10} {'speedup':>8} {'fwd+bwd ms':>11} {'speedup':>8} "
    f"{'max rel err':>12}"
)
for name, fwd, fb, speedup, fb_speedup, err in rows:
    print(
        f"{name:<26} {fwd * 1e3:>9.1f} {tokens / fwd:>10,.0f} {speedup:>7.1f}x {fb * 1e3:>11.1f} "
        f"{fb_speedup:>7.1f}x {err:>12.1e}"
    )
