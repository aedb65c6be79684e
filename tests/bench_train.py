"""Benchmark: train.py's training throughput against a bare loop, same model, same batch shape.

    ./.venv/bin/python tests/bench_train.py                       # a small Llama built here; CPU is fine
    ./.venv/bin/python tests/bench_train.py --init models/smolllm2_135m --batch-size 8 --seq-len 2048   # a GPU

  train.py   the script itself, run in this process (runpy, as `python train.py ARGS` would run it) on a
             shard of random tokens: 2 x STEPS steps, tokens/s of the last STEPS read from its
             metrics.jsonl (the first STEPS warm up: allocator, compile)
  bare loop  in this process: forward, cross-entropy, backward, AdamW step, zero_grad on one batch of
             random tokens; STEPS warm-up steps, then STEPS timed
The two alternate ROUNDS times in one process, each going first in turn, and the best of each
counts, so a busy machine slows both alike. Prints the tokens/s of both and their ratio (the goal
is >= 0.9), and the median of the per-round ratios, the steadier figure on a shared machine.
"""

import contextlib
import io
import json
import os
import runpy
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.checkpoint import load_model  # noqa: E402
from common.config import override  # noqa: E402
from common.runtime import Runtime  # noqa: E402
from common.shards import write_shard  # noqa: E402

INIT = ""  # model folder to benchmark; empty = a small Llama built here (d=128, 4 layers, 4k vocab)
BATCH_SIZE = 8  # sequences per step (one micro-step: the loop, not accumulation, is measured)
SEQ_LEN = 128  # tokens per sequence
STEPS = 10  # timed optimizer steps per measurement, after as many warm-up steps
ROUNDS = 5  # train.py and the bare loop alternate this many times; the best of each counts
COMPILE = True  # torch.compile on GPUs, in both loops (train.py's COMPILE)
DTYPE = "auto"  # bf16 autocast on GPUs, fp32 on CPU, in both loops (train.py's DTYPE)
THREADS = 0  # CPU threads of both loops; 0 = torch's default. 1 is steadier on a machine others share

config = override(globals()).as_dict()
globals().update(config)  # the constants now hold the run's settings


def small_llama(folder):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return folder


def train_py(model_dir, data_dir, out_dir):
    """tokens/s of train.py's loop over its last STEPS steps."""
    script = os.path.join(ROOT, "train.py")
    argv, sys.argv = (
        sys.argv,
        [
            script,
            "--init",
            model_dir,
            "--data-dir",
            data_dir,
            "--out-dir",
            out_dir,
            "--batch-size",
            str(BATCH_SIZE),
            "--seq-len",
            str(SEQ_LEN),
            "--grad-accum",
            "1",
            "--steps",
            str(2 * STEPS),
            "--log-every",
            str(STEPS),
            "--val-every",
            "0",
            "--save-every",
            "0",
            "--compile",
            str(COMPILE),
            "--dtype",
            DTYPE,
        ],
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = argv
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return next(r["tokens_per_s"] for r in records if r.get("step") == 2 * STEPS and "tokens_per_s" in r)


def bare_loop(rt, model, optimizer, x, y):
    """tokens/s of forward, loss, backward, optimizer step on one batch."""

    def step():
        with rt.autocast():
            logits = model(input_ids=x, use_cache=False).logits
        F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(STEPS):
        step()
    rt.synchronize()
    t0 = time.perf_counter()
    for _ in range(STEPS):
        step()
    rt.synchronize()
    return STEPS * BATCH_SIZE * SEQ_LEN / (time.perf_counter() - t0)


def main():
    if THREADS:
        torch.set_num_threads(THREADS)
    rt = Runtime(dtype=DTYPE)
    cuda = rt.device.type == "cuda"
    if cuda:
        torch.set_float32_matmul_precision("high")  # as train.py
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = INIT or small_llama(os.path.join(tmp, "model"))
        model = load_model(model_dir, device=rt.device).train()
        vocab = model.config.vocab_size
        data_dir = os.path.join(tmp, "data")  # random tokens, enough for every step of a train.py run
        os.makedirs(data_dir)
        tokens = np.random.default_rng(0).integers(0, vocab, 2 * STEPS * BATCH_SIZE * SEQ_LEN + 1)
        write_shard(os.path.join(data_dir, "train_000000.bin"), tokens)
        x, y = (torch.randint(0, vocab, (BATCH_SIZE, SEQ_LEN), device=rt.device) for _ in range(2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True if cuda else None)
        forward = torch.compile(model) if COMPILE and cuda else model
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"model {INIT or 'small Llama'}: {n_params / 1e6:.1f}M parameters; batch {BATCH_SIZE} x {SEQ_LEN} "
            f"tokens; {rt.device}, {str(rt.dtype).replace('torch.', '')}, compile {'on' if COMPILE and cuda else 'off'}"
            f", {torch.get_num_threads()} CPU threads; {STEPS} timed steps, best of {ROUNDS} rounds"
        )
        bare, train = [], []
        for r in range(ROUNDS):  # which loop goes first alternates too
            if r % 2 == 0:
                bare.append(bare_loop(rt, forward, optimizer, x, y))
            train.append(train_py(model_dir, data_dir, os.path.join(tmp, f"run{r}")))
            if r % 2 == 1:
                bare.append(bare_loop(rt, forward, optimizer, x, y))
            print(f"round {r + 1}: bare {bare[-1]:,.0f} tok/s, train.py {train[-1]:,.0f} tok/s", flush=True)
    print(f"\n{'loop':<10} {'tokens/s':>12}\n{'bare':<10} {max(bare):>12,.0f}\n{'train.py':<10} {max(train):>12,.0f}")
    print(
        f"ratio train.py / bare: {max(train) / max(bare):.3f} (goal >= 0.9); median of the rounds' ratios "
        f"{float(np.median(np.array(train) / np.array(bare))):.3f}"
    )


if __name__ == "__main__":
    main()
