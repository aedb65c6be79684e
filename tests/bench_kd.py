"""Peak memory and time of the logits-distillation loss + backward: common.kd's chunked loss against
the naive one (full logits of both models, log_softmax, F.kl_div), measured side by side in one run.

    ./.venv/bin/python tests/bench_kd.py [--batch-size 4 --seq-len 512 --chunks 128,512]

Each variant runs in its own subprocess. On CPU the figure is the rise of peak RSS (ru_maxrss)
over the process's peak after building the inputs; on a GPU it is torch.cuda.max_memory_allocated
over the memory allocated after building them, under bf16 autocast with an fp32 head as in training.
The head requires a gradient (the whole-model case: its fp32 gradient is in both figures).
"""

import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.config import override  # noqa: E402
from common.kd import kd_loss  # noqa: E402

BATCH_SIZE = 4  # sequences per batch
SEQ_LEN = 512  # tokens per sequence
VOCAB = 49152  # SmolLM2's vocabulary
HIDDEN = 576  # SmolLM2-135M's width
TEMPERATURE = 2.0  # KD temperature (T != 1 exercises the scaled path)
CE_WEIGHT = 0.1  # cross-entropy share, so the CE gradient is part of the work too
CHUNKS = [128, 512]  # chunk sizes (tokens) of the chunked variant to measure; 512 is common.kd's default
REPEATS = 2  # timed runs per variant (the fastest is reported)
VARIANT = ""  # set by the parent for a child process: 'naive' or a chunk size


def naive_kd(hs, ht, w, wt, y):
    zs, zt = hs @ w.T, ht @ wt.T
    kl = F.kl_div(
        F.log_softmax(zs / TEMPERATURE, -1), F.log_softmax(zt / TEMPERATURE, -1), log_target=True, reduction="batchmean"
    )
    return (1 - CE_WEIGHT) * TEMPERATURE**2 * kl + CE_WEIGHT * F.cross_entropy(zs, y)


def child():
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    act = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device).manual_seed(0)
    n = BATCH_SIZE * SEQ_LEN
    hs = torch.randn(n, HIDDEN, generator=g, device=device).to(act).requires_grad_()
    ht = torch.randn(n, HIDDEN, generator=g, device=device).to(act)
    w = (0.05 * torch.randn(VOCAB, HIDDEN, generator=g, device=device)).requires_grad_()
    wt = 0.05 * torch.randn(VOCAB, HIDDEN, generator=g, device=device)
    y = torch.randint(0, VOCAB, (n,), generator=g, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(REPEATS):
        hs.grad = w.grad = None
        t0 = time.perf_counter()
        with autocast:
            if VARIANT == "naive":
                loss = naive_kd(hs, ht, w, wt, y)
            else:
                loss, _ = kd_loss(hs, ht, w, y, TEMPERATURE, CE_WEIGHT, teacher_weight=wt, chunk_tokens=int(VARIANT))
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "peak": peak - base,
                "time": min(times),
                "loss": loss.item(),
                "device": torch.cuda.get_device_name() if cuda else "cpu",
            }
        )
    )


def run(variant, argv):
    out = subprocess.run([sys.executable, __file__, *argv, "--variant", str(variant)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"variant {variant} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
    n = BATCH_SIZE * SEQ_LEN
    print(
        f"{BATCH_SIZE}x{SEQ_LEN} = {n} tokens, vocab {VOCAB}, hidden {HIDDEN}: one fp32 copy of the logits is "
        f"{n * VOCAB * 4 / 2**20:.0f} MiB; T={TEMPERATURE}, ce_weight={CE_WEIGHT}, best of {REPEATS}"
    )
    naive = run("naive", argv)
    print(f"device: {naive['device']}\n")
    print(f"{'variant':<16}{'peak extra MiB':>16}{'time s':>10}{'loss':>12}{'memory ratio':>14}{'time ratio':>12}")
    print(f"{'naive':<16}{naive['peak'] / 2**20:>16.0f}{naive['time']:>10.3f}{naive['loss']:>12.6f}")
    for chunk in CHUNKS:
        r = run(chunk, argv)
        print(
            f"{f'chunked {chunk}':<16}{r['peak'] / 2**20:>16.0f}{r['time']:>10.3f}{r['loss']:>12.6f}"
            f"{naive['peak'] / r['peak']:>13.1f}x{r['time'] / naive['time']:>11.2f}x"
        )
    print("\nmemory ratio = naive peak / chunked peak; time ratio = chunked time / naive time")


if __name__ == "__main__":
    args = sys.argv[1:]
    globals().update(override(globals(), args).as_dict())  # the constants now hold the run's settings
    child() if VARIANT else main(args)
