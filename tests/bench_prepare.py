"""Tokenization throughput: prepare.py end to end against the raw `tokenizers` batch encoder, same text, same cores.

    ./.venv/bin/python tests/bench_prepare.py                 # SmolLM2's tokenizer if prepared, else a tiny one
    ./.venv/bin/python tests/bench_prepare.py --text docs.jsonl --mb 48 --repeats 5

The raw figures are Tokenizer.encode_batch and encode_batch_fast over texts already in memory, on every core (their
Rust threads). The prepare.py figure is the whole process, from its start to its exit: start-up, reading the
`datasets` stream, tokenizing in WORKERS processes, writing and hashing shards (its CPU seconds include the
workers'). Runs are interleaved and the best of REPEATS is kept, so load from other processes hits all alike.
The ratio to raw encode_batch_fast is the goal (>= 0.8); prepare.py's own breakdown of its best run follows.
"""

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT, make_model_folder, make_text  # noqa: E402, I001 (conftest puts the repo on sys.path)
from common.config import override  # noqa: E402

MODEL_DIR = "models/smolllm2_135m"  # the tokenizer to measure; a tiny one is built when this folder is missing
TEXT = ""  # a .jsonl with a "text" field; empty: generated text
MB = 32  # text per run, in MB: enough that start-up costs weigh as little as in real runs
REPEATS = 3  # interleaved repeats; the best of each is reported
config = override(globals()).as_dict()
globals().update(config)  # the constants now hold the run's settings


def corpus(folder):
    """The benchmark text as a list and as a .jsonl file, MB megabytes of it."""
    texts, size = [], 0
    generated = (text for seed in range(10**6) for text in make_text(1000, seed=seed))
    source = (json.loads(line)["text"] for line in open(TEXT)) if TEXT else generated
    for text in source:
        texts.append(text)
        size += len(text.encode())
        if size >= MB * 1e6:
            break
    path = os.path.join(folder, "bench.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return texts, size, path


def raw(tokenizer, texts, method):
    t0, cpu0 = time.perf_counter(), time.process_time()
    n = sum(len(e.ids) for e in getattr(tokenizer, method)(texts, add_special_tokens=False))
    return time.perf_counter() - t0, time.process_time() - cpu0, n


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pipeline(model_dir, path, out, workers, breakdowns):
    """prepare.py as a whole process: (wall seconds, CPU seconds with its workers, tokens); its breakdown line
    goes to `breakdowns`."""
    shutil.rmtree(out, ignore_errors=True)
    t0, cpu0 = time.perf_counter(), children_cpu()
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "prepare.py"),
            "--model",
            model_dir,
            "--model-dir",
            model_dir,
            "--dataset",
            path,
            "--out-dir",
            out,
            "--val-bytes",
            "100000",
            "--workers",
            str(workers),
        ],
        capture_output=True,
        text=True,
    )
    seconds, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    assert result.returncode == 0, result.stderr
    tokens = int(re.search(r"tokenized .* into ([\d,]+) tokens", result.stdout).group(1).replace(",", ""))
    breakdowns += [(seconds, line) for line in result.stdout.splitlines() if line.startswith("time:")]
    return seconds, cpu, tokens


def main():
    from tokenizers import Tokenizer

    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = (
            MODEL_DIR
            if os.path.exists(os.path.join(MODEL_DIR, "tokenizer.json"))
            else make_model_folder(os.path.join(tmp, "tiny_model"))
        )
        tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        texts, size, path = corpus(tmp)
        print(
            f"{len(texts):,} documents, {size / 1e6:.1f} MB of text, tokenizer {model_dir}, {cores} cores, "
            f"best of {REPEATS}"
        )
        breakdowns = []  # (seconds, prepare.py's breakdown line) of the runs with all cores
        runs = {
            f"raw encode_batch ({cores} threads)": lambda: raw(tokenizer, texts, "encode_batch"),
            f"raw encode_batch_fast ({cores} threads)": lambda: raw(tokenizer, texts, "encode_batch_fast"),
            "prepare.py --workers 1": lambda: pipeline(model_dir, path, os.path.join(tmp, "out1"), 1, []),
            f"prepare.py --workers {cores}": lambda: pipeline(
                model_dir, path, os.path.join(tmp, "outN"), cores, breakdowns
            ),
        }
        best, tokens = {}, {}
        for _ in range(REPEATS):
            for name, run in runs.items():
                seconds, cpu, tokens[name] = run()
                best[name] = min(best.get(name, (float("inf"), 0)), (seconds, cpu))
    first = next(iter(runs))
    for name, n in tokens.items():  # the same tokens everywhere; prepare.py adds one end-of-text per document
        assert n == tokens[first] + (len(texts) if name.startswith("prepare") else 0), (name, n, tokens[first])
    base = best[f"raw encode_batch_fast ({cores} threads)"][0]
    print(f"{'':<38} {'seconds':>8} {'CPU s':>7} {'MB/s':>7} {'tokens/s':>10} {'vs encode_batch_fast':>21}")
    for name, (seconds, cpu) in best.items():
        label = name + (" (whole process)" if name.startswith("prepare") else "")
        print(
            f"{label:<38} {seconds:>8.2f} {cpu:>7.2f} {size / 1e6 / seconds:>7.3f} {tokens[name] / seconds:>10,.0f} "
            f"{base / seconds:>20.2f}x"
        )
    one, all_ = best["prepare.py --workers 1"][0], best[f"prepare.py --workers {cores}"][0]
    print(
        f"prepare.py whole process / raw encode_batch_fast, both on {cores} cores: {base / all_:.2f}x (goal >= 0.8);  "
        f"scaling 1 -> {cores} workers: {one / all_:.2f}x"
    )
    if breakdowns:  # prepare.py's own line, from its fastest run with all cores
        print(f"prepare.py --workers {cores}, best run: {min(breakdowns)[1]}")


if __name__ == "__main__":
    main()
