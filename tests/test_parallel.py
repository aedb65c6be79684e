"""PARALLEL=fsdp (FSDP2, common/parallel.py) and multi-node launches, on CPU with gloo and tiny models, through
torchrun: two sharded ranks give what one process gives with the same global batch (distill.py's logits phase with
KD_TRAINABLE decoders, all and body, and train.py); a sharded run killed with SIGKILL and resumed ends bit-identical to
the uninterrupted one; two single-process "nodes" meeting at a c10d rendezvous give what one node of two processes
gives; and bad settings stop with one line before a run folder exists."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_metrics, run_distill, run_killed
from test_train import run_train, steps_logged, train_error

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# 4 logits steps of 128 tokens: 2 ranks x 2 sequences, or one process x 4; validation at steps 0, 2 and 4
LOGITS = [
    *("--phase", "logits", "--seq-len", "32", "--val-tokens", "512", "--log-every", "1", "--kd-steps", "4"),
    *("--kd-val-every", "2", "--kd-save-every", "2", "--kd-lr", "1e-3", "--kd-warmup-steps", "1"),
]
# KD_TRAINABLE=all also accumulates 2 micro-batches, mixes in cross-entropy and checkpoints activations
MODES = {
    "decoders": ["--kd-trainable", "decoders"],
    "all": ["--kd-trainable", "all", "--grad-accum", "2", "--kd-ce-weight", "0.2", "--activation-checkpointing"],
    "body": ["--kd-trainable", "body"],  # the embeddings and head frozen in the root FSDP unit, beside the final norm
}
# 4 train.py steps of 256 tokens: 2 ranks x 2 x 32, or one process x 2 micro-steps; a checkpoint every 2
TRAIN = [
    *("--batch-size", "2", "--seq-len", "32", "--total-batch-tokens", "256", "--steps", "4", "--lr", "3e-3"),
    *("--warmup-steps", "1", "--val-every", "2", "--val-tokens", "512", "--log-every", "1", "--save-every", "2"),
]


def run(command):
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(out, name):
    return load_file(os.path.join(out, name, "model.safetensors"))


def assert_same_model(a, b):
    """Two model.safetensors dicts with the same keys and values equal to fp32 reduction-order tolerance."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def logits_args(teacher_dir, tiny_data_dir, init_dir):
    return [*LOGITS, "--teacher", teacher_dir, "--data-dir", tiny_data_dir, "--init", init_dir]


@pytest.fixture(scope="module")
def fsdp_logits(logits_args, tmp_path_factory):
    """{mode: run folder} of sharded logits-phase runs, made when a test first asks for one."""
    runs = {}

    def get(mode):
        if mode not in runs:
            runs[mode] = str(tmp_path_factory.mktemp("fsdp") / mode)
            distill = os.path.join(ROOT, "distill.py")
            run(
                [
                    *TORCHRUN,
                    distill,
                    *logits_args,
                    *MODES[mode],
                    "--batch-size",
                    "2",
                    "--parallel",
                    "fsdp",
                    "--out-dir",
                    runs[mode],
                ]
            )
        return runs[mode]

    return get


@pytest.mark.parametrize("mode", MODES)
def test_fsdp_logits_phase_matches_one_process(fsdp_logits, logits_args, tmp_path, mode):
    sharded, single = fsdp_logits(mode), str(tmp_path / "single")
    run_distill(*logits_args, *MODES[mode], "--batch-size", "4", "--out-dir", single)
    assert_same_model(weights(sharded, "logits_final"), weights(single, "logits_final"))
    assert_same_model(weights(sharded, "logits_step000002"), weights(single, "logits_step000002"))
    a, b = read_metrics(sharded, phase="logits"), read_metrics(single, phase="logits")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for r, s in zip(a, b):
        assert r.keys() == s.keys()
        for key in {"loss", "kl", "grad_norm", "val_ce", "agree"} & r.keys():
            assert r[key] == pytest.approx(s[key], rel=1e-5), (r["step"], key)


def test_fsdp_resume_after_kill_is_exact(fsdp_logits, logits_args, tmp_path):
    """Killed after step 3 (logits_step000002 saved): the resumed sharded run ends with the uninterrupted one's
    weights and losses, bit for bit (optimizer state gathered whole to state.pt, and sharded again at resume)."""
    whole, cut = fsdp_logits("all"), str(tmp_path / "cut")
    args = [os.path.join(ROOT, "distill.py"), *logits_args, *MODES["all"], "--batch-size", "2", "--parallel", "fsdp"]
    kill_when = 'record.get("step") == 3 and "loss" in record'
    proc = run_killed([*args, "--out-dir", cut], kill_when, launcher=[*TORCHRUN, "--no-python", sys.executable])
    assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in proc.stderr, proc.stderr[-3000:]
    assert sorted(n for n in os.listdir(cut) if n.startswith("logits")) == ["logits_step000002"]
    run([*TORCHRUN, *args, "--out-dir", cut, "--resume"])
    a, b = weights(whole, "logits_final"), weights(cut, "logits_final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = {r["step"]: r for r in read_metrics(cut, phase="logits") if "loss" in r}  # the resumed run's, logged last
    for r in read_metrics(whole, phase="logits"):
        if "loss" in r and r["step"] > 2:
            assert (last[r["step"]]["loss"], last[r["step"]]["grad_norm"]) == (r["loss"], r["grad_norm"])


@pytest.fixture(scope="module")
def fsdp_train(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train") / "fsdp")
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--init", tiny_model_dir, "--data-dir", tiny_data_dir]
    run([*TORCHRUN, *command[1:], *TRAIN, "--parallel", "fsdp", "--out-dir", out])
    return out, command


def test_fsdp_train_matches_one_process(fsdp_train, tiny_model_dir, tiny_data_dir, tmp_path):
    sharded, single = fsdp_train[0], str(tmp_path / "single")
    printed = run_train(TRAIN, tiny_model_dir, tiny_data_dir, single)
    assert "x 4 micro-steps x 1 rank(s) = 256 tokens/step" in printed
    for name in ("step000002", "step000004"):
        assert_same_model(weights(sharded, name), weights(single, name))
    (a_train, a_val), (b_train, b_val) = steps_logged(sharded), steps_logged(single)
    assert sorted(a_train) == sorted(b_train) == [1, 2, 3, 4] and sorted(a_val) == sorted(b_val) == [0, 2, 4]
    for s in a_train:
        for key in ("loss", "grad_norm"):
            assert a_train[s][key] == pytest.approx(b_train[s][key], rel=1e-5), (s, key)
    for s in a_val:
        assert a_val[s]["val_loss"] == pytest.approx(b_val[s]["val_loss"], rel=1e-5)


def test_two_nodes_match_one_node(fsdp_train, tmp_path):
    """torchrun --nnodes 2 on 127.0.0.1, one process per "node", meeting at a c10d rendezvous: the run of one node
    with two processes, bit for bit."""
    one_node, (python, *command) = fsdp_train
    out = str(tmp_path / "nodes")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [
        subprocess.Popen(
            [
                *(python, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank)),
                *("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--nproc-per-node", "1"),
                *command,
                *(*TRAIN, "--parallel", "fsdp", "--out-dir", out),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    a, b = weights(one_node, "step000004"), weights(out, "step000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [{s: (r["loss"], r["grad_norm"]) for s, r in steps_logged(o)[0].items()} for o in (one_node, out)]
    assert losses[0] == losses[1]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--parallel", "zero3"], "PARALLEL must be ddp or fsdp, got 'zero3'"),
        (["--parallel", "fsdp"], "PARALLEL=fsdp shards the model over torchrun's ranks, and this run has one process"),
    ],
)
def test_bad_parallel_settings_are_one_line_before_any_run_folder(
    logits_args, tiny_model_dir, tiny_data_dir, tmp_path, args, message
):
    out = tmp_path / "run"
    error = run_distill(*logits_args, "--out-dir", str(out), *args, check=False)
    assert error and message in error and "\n" not in error, error
    assert message in train_error(TRAIN + args, tiny_model_dir, tiny_data_dir, str(out))
    assert not out.exists()
