"""Benchmark of distill.py's layer-wise phase, measured side by side in one run (not a test).

1. step ratio: distill.py's per-step time on layer i against the ideal step (teacher decoder
   forward, student forward and backward, optimizer step, on a latent already in memory); goal <= 1.25.
2. rotation scaling: the teacher and student compute of a rotation over L layers (latent cache
   advance, split, steps; validation and checkpoints excluded) against L times that of a one-layer
   run; O(L) gives about 1, re-running layers 0..i-1 for layer i (O(L^2)) would give about (L+1)/2.
3. schedules: time to give every layer the same number of steps, parallel against rotation.

    ./.venv/bin/python tests/bench_distill.py [--layers 6] [--steps 10] [--batch 2] [--seq 256]

The model has SmolLM2-135M's shape (d=576, FFN 1536, 9 heads / 3 KV heads) with random weights and
fewer layers, so it runs anywhere; the student is distill.sh's (pruned SwiGLU at half width).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common.shards import write_shard  # noqa: E402
from common.students import make_student  # noqa: E402
from common.swap import get_block  # noqa: E402
from conftest import make_tokenizer, run_distill  # noqa: E402


def smollm2_shaped(layers):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        bos_token_id=0,
        eos_token_id=0,
    )


def timed_distill(*args):
    """Seconds distill.py ARGS takes, run in this process."""
    t0 = time.time()
    run_distill(*args)
    return time.time() - t0


def ideal_step_ms(model, layer, steps, batch, seq, device):
    """Teacher decoder forward + student forward/backward + AdamW step on a latent in memory."""
    teacher = get_block(model, layer, "mlp")
    torch.manual_seed(0)
    student = make_student("mlp", "pruned", teacher, model.config, scale=0.5)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    latents = torch.randn(steps + 1, batch, seq, model.config.hidden_size, device=device)
    times = []
    for s in range(steps + 1):  # the first step warms up
        t0 = time.time()
        with torch.no_grad():
            target = teacher(latents[s])  # a Llama FFN: its layer calls it on the latent alone
        loss = torch.nn.functional.mse_loss(student(latents[s]), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
    return 1000 * float(np.mean(times[1:]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from transformers import AutoModelForCausalLM

    work = tempfile.mkdtemp(prefix="bench_distill_")
    model_dir, data_dir = os.path.join(work, "model"), os.path.join(work, "data")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(smollm2_shaped(args.layers), attn_implementation="sdpa")
    model.save_pretrained(model_dir)
    make_tokenizer(model_dir)
    os.makedirs(data_dir)
    rng = np.random.default_rng(0)
    n_train = (args.steps + 2) * args.batch * args.seq * 4
    write_shard(os.path.join(data_dir, "train_000000.bin"), rng.integers(0, 49152, n_train))
    write_shard(os.path.join(data_dir, "val_000000.bin"), rng.integers(0, 49152, 4 * args.seq + 1))

    common = [
        "--teacher",
        model_dir,
        "--data-dir",
        data_dir,
        "--student-kind",
        "pruned",
        "--student-kwargs",
        '{"scale": 0.5}',
        "--steps-per-layer",
        str(args.steps),
        "--batch-size",
        str(args.batch),
        "--seq-len",
        str(args.seq),
        "--val-tokens",
        str(2 * args.seq),
        "--log-every",
        "10",
    ]
    one = os.path.join(work, "one")
    t_one = timed_distill(*common, "--layers", "0", "--out-dir", one)
    rot = os.path.join(work, "rotation")
    t_rot = timed_distill(*common, "--out-dir", rot)
    par = os.path.join(work, "parallel")
    t_par = timed_distill(*common, "--schedule", "parallel", "--out-dir", par)
    ideal = ideal_step_ms(model.to(device), args.layers // 2, args.steps, args.batch, args.seq, device)

    rows = json.load(open(os.path.join(rot, "layers.json")))
    one_rows = json.load(open(os.path.join(one, "layers.json")))
    step_ms = float(np.median([r["step_ms"] for r in rows]))
    layer_seconds = one_rows[0]["train_s"]
    rotation_seconds = sum(r["train_s"] for r in rows)
    L = args.layers
    print(
        f"\ndevice {device}, {L} layers of SmolLM2-135M's shape, {args.steps} steps/layer, "
        f"batch {args.batch} x seq {args.seq}, student pruned 0.5"
    )
    print(f"{'measure':<44} {'value':>10}")
    print(f"{'ideal step (ms)':<44} {ideal:>10.1f}")
    print(f"{'distill.py step, median over layers (ms)':<44} {step_ms:>10.1f}")
    print(f"{'  ratio (goal <= 1.25)':<44} {step_ms / ideal:>10.3f}")
    print(f"{'one-layer run: teacher + student compute (s)':<44} {layer_seconds:>10.2f}")
    print(f"{'L-layer rotation: teacher + student compute (s)':<44} {rotation_seconds:>10.2f}")
    print(f"{'  rotation / (L x one layer) (O(L): ~1)':<44} {rotation_seconds / (L * layer_seconds):>10.3f}")
    print(f"{'rotation run, end to end (s)':<44} {t_rot:>10.2f}")
    print(f"{'parallel run, end to end (s)':<44} {t_par:>10.2f}")
    print(f"{'  parallel / rotation':<44} {t_par / t_rot:>10.3f}")
    print(f"(one-layer run end to end: {t_one:.2f} s; run folders in {work})")


if __name__ == "__main__":
    main()
