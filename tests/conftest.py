"""Tiny offline fixtures: a Llama-shaped model with its own small tokenizer, and token shards."""

import contextlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Tiny models run fastest on one thread; subprocesses (scripts, torchrun ranks) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from common.shards import MANIFEST, write_shard  # noqa: E402

VOCAB = 320
WORDS = (
    "the cat sat on a mat and the dog ran to the park while birds sang in trees "
    "water flows down hills into rivers that reach the sea under a bright sun"
).split()


def make_text(n_docs, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(20, 80))) + "." for _ in range(n_docs)]


def make_tokenizer(folder):
    """A byte-level BPE tokenizer (<|endoftext|>=0) saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_text(200, seed=1), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def tiny_config(layers=3, initializer_range=0.02):
    """initializer_range 0.2 gives blocks outputs of order 1, as in a trained model (0.02 gives ~1e-3)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=initializer_range,
    )


def make_model_folder(folder, layers=3, seed=0, initializer_range=0.02):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(layers, initializer_range), attn_implementation="sdpa")
    model.save_pretrained(folder)
    make_tokenizer(folder)
    return folder


def make_data_dir(folder, train_tokens=40_000, val_tokens=8_000, shards=2, seed=0):
    """Shards of a repetitive token stream (a small model can learn it) plus a manifest."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    phrase = rng.integers(1, VOCAB, size=97)
    splits = {}
    for split, total in (("train", train_tokens), ("val", val_tokens)):
        n = shards if split == "train" else 1
        entries = []
        for k in range(n):
            tokens = np.resize(np.roll(phrase, k + (split == "val")), total // n).astype(np.uint16)
            tokens[rng.random(tokens.size) < 0.05] = 0
            name = f"{split}_{k:06d}.bin"
            entries.append({"file": name, **write_shard(os.path.join(folder, name), tokens)})
        splits[split] = {"shards": entries, "tokens": sum(e["ntok"] for e in entries)}
    manifest = {"splits": splits, "tokenizer": {"name": "tiny", "vocab_size": VOCAB, "eos_id": 0}}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f)
    return folder


# distill.py at test size: batches of 2 x 32 tokens, little validation and calibration, a log line every step
TINY_DISTILL = [
    "--batch-size",
    "2",
    "--seq-len",
    "32",
    "--val-tokens",
    "512",
    "--log-every",
    "1",
    "--calib-tokens",
    "1024",
]


@contextlib.contextmanager
def signal_handlers_kept():
    """The SIGINT and SIGTERM handlers as they were before the block (a script run in this process installs its own)."""
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in kept.items():
            signal.signal(s, handler)


def run_distill(*args, check=True):
    """distill.py's main in this process, as `python distill.py ARGS` runs it (without a torch/transformers import per
    run): its settings come from ARGS alone. Returns its one-line exit message, None on success. With check, an exit
    fails the test."""
    import distill

    argv, sys.argv = sys.argv, ["distill.py", *args]  # fail() names sys.argv[0]
    try:
        with signal_handlers_kept():
            distill.main(list(args))
    except SystemExit as e:
        if check:
            raise AssertionError(f"distill.py {' '.join(args)} exited: {e.code}") from None
        return str(e.code)
    finally:
        sys.argv = argv


def run_tiny_distill(teacher, data_dir, out_dir, *args, check=True):
    """run_distill at test size (TINY_DISTILL) with a teacher, a data folder and a run folder."""
    paths = ["--teacher", teacher, "--data-dir", data_dir, "--out-dir", out_dir]
    return run_distill(*TINY_DISTILL, *paths, *args, check=check)


def read_metrics(out_dir, **match):
    """The records of a run folder's metrics.jsonl that hold every key=value of `match`."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def layer_rows(out_dir):
    """distill.py's per-layer table (OUT/layers.json)."""
    with open(os.path.join(out_dir, "layers.json")) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A tiny teacher whose blocks output values of order 1, like a trained model's."""
    return make_model_folder(str(tmp_path_factory.mktemp("teacher")), initializer_range=0.2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_model_folder(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    return make_data_dir(str(tmp_path_factory.mktemp("tiny_data")))


@pytest.fixture(scope="session")
def init_dir(teacher_dir, tmp_path_factory):
    """A layer-wise checkpoint to start distill.py's logits phase from: the teacher with half-width pruned students
    in every FFN."""
    from common.checkpoint import load_model, save_checkpoint
    from common.students import make_student
    from common.swap import get_block, set_block

    model = load_model(teacher_dir)
    for i in range(model.config.num_hidden_layers):
        set_block(model, i, "mlp", make_student("mlp", "pruned", get_block(model, i, "mlp"), model.config))
    folder = str(tmp_path_factory.mktemp("init") / "final")
    save_checkpoint(folder, model, {"phase": "layerwise", "step": 0})
    return folder


# A script run in a subprocess that sends itself a signal (SIGKILL: a kill) right after its metrics.jsonl gets a
# record for which an expression over `record` is true: a signal at a fixed point of the run, with no polling race.
_KILLED_RUN = """
import os, runpy, signal, sys
from common.runtime import RunLog
log = RunLog.log
def log_then_die(self, **record):
    log(self, **record)
    if {kill_when}:
        os.kill(os.getpid(), signal.{signal_name})
RunLog.log = log_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_killed(script_args, kill_when, signal_name="SIGKILL", launcher=(sys.executable,), **kwargs):
    """python SCRIPT ARGS (script_args) in a subprocess that gets the signal `signal_name` right after it logs a
    metrics record for which `kill_when` (a Python expression over `record`) is true; returns the CompletedProcess.
    `launcher`: the command that runs python (under torchrun: torchrun ... --no-python python, and every rank gets
    the signal there, as all ranks log the same records)."""
    code = _KILLED_RUN.format(kill_when=kill_when, signal_name=signal_name)
    return subprocess.run(
        [*launcher, "-c", code, *script_args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs
    )


@contextlib.contextmanager
def another_run_in(folder):
    """A separate process holding the run folder's lock (common.run_folder.lock_run), as a run still going there
    would; yields it. Leaving the block kills it with SIGKILL, as a crash would."""
    code = (
        "import sys; from common.run_folder import lock_run; lock_run(sys.argv[1]); print('locked', flush=True); "
        "sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "locked\n"  # blocks until the lock is held: no polling
        yield proc
    finally:
        proc.kill()
        proc.wait()
