"""train.py end to end on a tiny model (CPU, offline): the loss falls, resume after a kill is exact,
two-process DDP equals one process with the same global batch, a distill checkpoint with student
decoders loads and trains, and bad inputs get one-line errors."""

import contextlib
import errno
import io
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from common.checkpoint import load_model, save_checkpoint
from common.shards import TokenLoader, shard_files, write_shard
from common.students import make_student
from common.swap import get_block, set_block
from conftest import ROOT, another_run_in, read_metrics, run_killed, signal_handlers_kept

TRAIN = os.path.join(ROOT, "train.py")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun sets this too
# 40 steps of 8 x 64 tokens: enough for the tiny model to learn much of the repeated phrase
BASE = [
    "--batch-size",
    "8",
    "--seq-len",
    "64",
    "--grad-accum",
    "1",
    "--steps",
    "40",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "5",
    "--val-every",
    "20",
    "--val-tokens",
    "2048",
    "--log-every",
    "10",
    "--save-every",
    "5",
    "--keep-last",
    "2",
]


def train_cmd(args, model, data, out, nproc=None):
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        if nproc
        else [sys.executable]
    )
    return launcher + [TRAIN, "--init", model, "--data-dir", data, "--out-dir", out, *args]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops run fastest on one thread (on a shared machine by far); the subprocesses get the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_train(args, model, data, out):
    """Run train.py in this process, as `python train.py ARGS` would (saves a torch/transformers import per
    run); return what it printed. Its one-line errors arrive as SystemExit."""
    argv, sys.argv = sys.argv, train_cmd(args, model, data, out)[1:]
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed, signal_handlers_kept():
            runpy.run_path(TRAIN, run_name="__main__")
    finally:
        sys.argv = argv
    return printed.getvalue()


def train_error(args, model, data, out):
    """The message train.py exits with: one line, no traceback."""
    with pytest.raises(SystemExit) as e:
        run_train(args, model, data, out)
    message = str(e.value.code)
    assert message and "\n" not in message
    return message


def steps_logged(out):
    """{step: record} of the train lines and of the val lines in a run's metrics.jsonl (each step once)."""
    train, val = {}, {}
    for r in read_metrics(out):
        for key, table in (("loss", train), ("val_loss", val)):
            if key in r:
                assert r["step"] not in table, f"step {r['step']} logged twice"
                table[r["step"]] = r
    return train, val


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """One uninterrupted run that other tests compare against."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    run_train(BASE, tiny_model_dir, tiny_data_dir, out)
    return out


def test_loss_falls_and_run_folder_is_complete(reference):
    train, val = steps_logged(reference)
    assert sorted(train) == list(range(1, 41))
    losses = [train[s]["loss"] for s in range(1, 41)]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert sorted(val) == [0, 20, 40] and val[40]["val_loss"] < 0.6 * val[0]["val_loss"]
    assert all("tokens_per_s" in train[s] for s in (10, 20, 30, 40))
    # KEEP_LAST=2 of the checkpoints every 5 steps; they load with the shared loader
    assert sorted(n for n in os.listdir(reference) if n.startswith("step")) == ["step000035", "step000040"]
    with open(os.path.join(reference, "run.json")) as f:
        run = json.load(f)
    assert run["script"] == "train.py" and run["config"]["tokens_per_step"] == 512
    model = load_model(os.path.join(reference, "step000040"))
    assert os.path.exists(os.path.join(reference, "step000040", "tokenizer.json"))
    # the saved weights reproduce the logged final val loss
    loader = TokenLoader(shard_files(run["config"]["DATA_DIR"], "val"), 8, 64)
    with torch.no_grad():
        loss = (
            sum(
                F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten()).item()
                for x, y in (loader.next_batch() for _ in range(4))
            )
            / 4
        )
    assert abs(loss - val[40]["val_loss"]) < 1e-4


KILL_AT = 10  # BASE logs every 10 steps and saves every 5: steps 6-10 are logged, then step000010 would be saved


def test_resume_after_kill_is_exact(reference, tiny_model_dir, tiny_data_dir, tmp_path):
    out = str(tmp_path / "run")
    # killed right after step KILL_AT's metrics line: steps logged after the last checkpoint, which a resume drops
    kill_when = f'record.get("step") == {KILL_AT} and "loss" in record'
    proc = run_killed(train_cmd(BASE, tiny_model_dir, tiny_data_dir, out)[1:], kill_when, env=ONE_THREAD)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert max(steps_logged(out)[0]) == KILL_AT
    assert sorted(n for n in os.listdir(out) if n.startswith("step")) == ["step000005"]

    printed = run_train(BASE + ["--resume"], tiny_model_dir, tiny_data_dir, out)
    assert "resuming at step 5 " in printed
    ref_train, ref_val = steps_logged(reference)
    train, val = steps_logged(out)
    assert sorted(train) == sorted(ref_train) and sorted(val) == sorted(ref_val)
    for s in ref_train:
        for key in ("loss", "grad_norm", "lr"):
            assert train[s][key] == pytest.approx(ref_train[s][key], rel=1e-6, abs=1e-7), (s, key)
    assert val[40]["val_loss"] == pytest.approx(ref_val[40]["val_loss"], rel=1e-6)
    a = load_file(os.path.join(out, "step000040", "model.safetensors"))
    b = load_file(os.path.join(reference, "step000040", "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in b)


def test_two_ranks_match_one_process_with_the_same_global_batch(tiny_model_dir, tiny_data_dir, tmp_path):
    # 256 tokens per step: 2 ranks x 1 micro-step of 2 x 64, or 1 process x 2 micro-steps
    args = [
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--total-batch-tokens",
        "256",
        "--steps",
        "3",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "1",
        "--val-every",
        "3",
        "--val-tokens",
        "512",
        "--log-every",
        "1",
    ]
    ddp, single, rank0_only = (str(tmp_path / n) for n in ("ddp", "single", "rank0"))
    proc = subprocess.run(
        train_cmd(args, tiny_model_dir, tiny_data_dir, ddp, nproc=2),
        cwd=ROOT,
        env=ONE_THREAD,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 1 micro-steps x 2 rank(s) = 256 tokens/step" in proc.stdout
    assert "x 2 micro-steps x 1 rank(s) = 256 tokens/step" in run_train(args, tiny_model_dir, tiny_data_dir, single)
    run_train(args + ["--total-batch-tokens", "128"], tiny_model_dir, tiny_data_dir, rank0_only)

    (d_train, d_val), (s_train, s_val), (r_train, _) = steps_logged(ddp), steps_logged(single), steps_logged(rank0_only)
    for s in (1, 2, 3):
        assert d_train[s]["loss"] == pytest.approx(s_train[s]["loss"], rel=1e-5)
        assert d_train[s]["grad_norm"] == pytest.approx(s_train[s]["grad_norm"], rel=1e-4)
    for s in (0, 3):  # validation covers the same tokens split over ranks, averaged
        assert d_val[s]["val_loss"] == pytest.approx(s_val[s]["val_loss"], rel=1e-5)
    # rank 1 saw other tokens than rank 0: the DDP loss is not rank 0's loss alone
    assert abs(d_train[1]["loss"] - r_train[1]["loss"]) > 1e-3
    a = load_file(os.path.join(ddp, "step000003", "model.safetensors"))
    b = load_file(os.path.join(single, "step000003", "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in b)


def test_distill_checkpoint_with_students_loads_and_trains(tiny_model_dir, tiny_data_dir, tmp_path):
    # what distill.py writes: the teacher backbone with student decoders swapped in
    model = load_model(tiny_model_dir)
    torch.manual_seed(0)
    for i, kind, kwargs in ((0, "pruned", {"scale": 0.5}), (1, "prototype", {"scale": 0.5, "gated": True})):
        set_block(model, i, "mlp", make_student("mlp", kind, get_block(model, i, "mlp"), model.config, **kwargs))
    torch.nn.init.normal_(get_block(model, 1, "mlp").fc_out.weight, std=0.02)
    ckpt = str(tmp_path / "distill" / "final")
    save_checkpoint(ckpt, model, meta={"script": "distill.py", "phase": "final", "step": 0})

    out = str(tmp_path / "run")
    printed = run_train(
        [
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--grad-accum",
            "1",
            "--steps",
            "4",
            "--val-every",
            "0",
            "--log-every",
            "1",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "1",
        ],
        ckpt,
        tiny_data_dir,
        out,
    )
    assert "2 student decoders" in printed
    train, _ = steps_logged(out)
    # the first logged loss is the checkpoint model's own loss on the first batch: the students were in place
    x, y = TokenLoader(shard_files(tiny_data_dir, "train"), 4, 32).next_batch()
    with torch.no_grad():
        expected = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten()).item()
    assert train[1]["loss"] == pytest.approx(expected, rel=1e-5)
    trained = load_model(os.path.join(out, "step000004"))
    with open(os.path.join(out, "step000004", "students.json")) as f:
        assert [(s["layer"], s["kind"]) for s in json.load(f)] == [(0, "pruned"), (1, "prototype")]
    assert not torch.equal(get_block(trained, 1, "mlp").fc_out.weight, get_block(model, 1, "mlp").fc_out.weight)


def test_from_scratch_uses_only_the_config(tiny_model_dir, tiny_data_dir, tmp_path):
    out = str(tmp_path / "run")
    run_train(
        [
            "--from-scratch",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--grad-accum",
            "1",
            "--steps",
            "1",
            "--val-every",
            "0",
        ],
        tiny_model_dir,
        tiny_data_dir,
        out,
    )
    fresh = load_file(os.path.join(out, "step000001", "model.safetensors"))
    given = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert not torch.allclose(
        fresh["model.layers.0.mlp.up_proj.weight"], given["model.layers.0.mlp.up_proj.weight"], atol=1e-2
    )


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path):
    out = str(tmp_path / "run")
    message = train_error(
        [
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--grad-accum",
            "1",
            "--steps",
            "6",
            "--val-every",
            "0",
            "--lr",
            "1e30",
            "--warmup-steps",
            "0",
            "--save-every",
            "1",
            "--keep-last",
            "0",
        ],
        tiny_model_dir,
        tiny_data_dir,
        out,
    )
    assert "non-finite" in message
    bad = int(message.split("at step ")[1].split(";")[0])
    saved = sorted(n for n in os.listdir(out) if n.startswith("step"))
    assert bad > 1 and saved == [f"step{s:06d}" for s in range(1, bad)] and f"step{bad - 1:06d}" in message


def test_bad_inputs_give_one_line_errors(tiny_model_dir, tiny_data_dir, tmp_path):
    wide = str(tmp_path / "wide")  # token ids beyond the tiny model's 320-token vocabulary
    os.makedirs(wide)
    for split in ("train", "val"):
        write_shard(os.path.join(wide, f"{split}_000000.bin"), np.arange(5000) % 500)
    torn = str(tmp_path / "torn")  # the second train shard cut short: found at start, not when reached
    shutil.copytree(tiny_data_dir, torn)
    with open(os.path.join(torn, "train_000001.bin"), "r+b") as f:
        f.truncate(3000)
    cut = shutil.copytree(tiny_model_dir, tmp_path / "cut_model")  # its weights cut short
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    small = ["--batch-size", "2", "--seq-len", "32", "--grad-accum", "1", "--steps", "2", "--val-tokens", "64"]
    out = str(tmp_path / "out")
    for model, data, extra, expected in [
        (str(cut), tiny_data_dir, [], "model.safetensors: not a complete safetensors file"),
        (tiny_model_dir, str(tmp_path / "nowhere"), [], "no train shards found"),
        (tiny_model_dir, wide, [], "outside the model's vocabulary"),
        (tiny_model_dir, torn, [], "train_000001.bin: truncated"),
        (tiny_model_dir, tiny_data_dir, ["--batch-size", "1000"], "fewer than one step needs"),
        (tiny_model_dir, tiny_data_dir, ["--grad-accum", "0", "--total-batch-tokens", "100"], "is not a multiple of"),
        (tiny_model_dir, tiny_data_dir, ["--val-tokens", "10000000"], "VAL_TOKENS"),
        (str(tmp_path / "no_model"), tiny_data_dir, [], "no config.json"),
        (str(tmp_path / "no_model"), tiny_data_dir, ["--from-scratch"], "no config.json"),
        (tiny_model_dir, tiny_data_dir, ["--resume"], "no run.json"),
    ]:
        assert expected in train_error(small + extra, model, data, out)
        assert not os.path.exists(out), "a failed start must not leave a run folder behind"


def copy_of(reference, tmp_path):
    """A copy of the finished reference run (its own folder: this process holds no lock on it)."""
    return str(shutil.copytree(reference, tmp_path / "run"))


def test_resume_refuses_changed_defining_constants_and_lists_the_others(
    reference, tiny_model_dir, tiny_data_dir, tmp_path
):
    out = copy_of(reference, tmp_path)
    for extra, model, message in (
        (["--seq-len", "32"], tiny_model_dir, "SEQ_LEN 64 -> 32"),
        ([], str(tmp_path), f"INIT {tiny_model_dir!r} -> {str(tmp_path)!r}"),
    ):
        error = train_error(BASE + ["--resume"] + extra, model, tiny_data_dir, out)
        assert "run.json: this run's result depends on constants changed since it started" in error and message in error
    printed = run_train(BASE + ["--resume", "--lr", "1e-3", "--log-every", "5"], tiny_model_dir, tiny_data_dir, out)
    assert (
        "resuming with changed constants (the run is no longer exact): LOG_EVERY 10 -> 5, LR 0.003 -> 0.001" in printed
        and "nothing to do" in printed
    )


def test_a_run_in_use_is_refused_until_its_holder_dies(reference, tiny_model_dir, tiny_data_dir, tmp_path):
    out = copy_of(reference, tmp_path)
    with another_run_in(out) as holder:
        error = train_error(BASE + ["--resume"], tiny_model_dir, tiny_data_dir, out)
        assert f"{out}: in use by another run (pid {holder.pid})" in error
        os.mkdir(tmp_path / "new")
        with another_run_in(tmp_path / "new") as starting:  # a new run that has just created its folder
            error = train_error(BASE, tiny_model_dir, tiny_data_dir, str(tmp_path / "new"))
            assert f"in use by another run (pid {starting.pid})" in error
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # nothing moved aside or half-written
    assert "nothing to do" in run_train(BASE + ["--resume"], tiny_model_dir, tiny_data_dir, out)


def test_resume_passes_over_a_checkpoint_with_unreadable_meta(
    reference, tiny_model_dir, tiny_data_dir, tmp_path, capsys
):
    out = copy_of(reference, tmp_path)
    bad = os.path.join(out, "step000040")
    with open(os.path.join(bad, "meta.json"), "w") as f:
        f.write('{"script": "train.py", "ph')
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:  # and a last line torn by a kill mid-append
        f.write('{"step": 41, "loss": 0.')
    printed = run_train(BASE + ["--resume"], tiny_model_dir, tiny_data_dir, out)
    assert f"{bad}: unreadable meta.json, so this checkpoint is passed over" in capsys.readouterr().err
    assert "resuming at step 35" in printed
    assert sorted(steps_logged(out)[0]) == list(range(1, 41))  # every line parses; steps 36-40 were logged once, again
    a = load_file(os.path.join(out, "step000040", "model.safetensors"))
    b = load_file(os.path.join(reference, "step000040", "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in b)


def test_truncated_training_state_is_one_line(reference, tiny_model_dir, tiny_data_dir, tmp_path):
    out = copy_of(reference, tmp_path)
    state = os.path.join(out, "step000040", "state.pt")
    with open(state, "r+b") as f:
        f.truncate(1000)
    error = train_error(BASE + ["--resume"], tiny_model_dir, tiny_data_dir, out)
    assert f"{state}: unreadable training state" in error and "delete" in error


def test_out_of_memory_at_the_first_step_leaves_no_run_folder(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    args = ["--batch-size", "4", "--seq-len", "32", "--total-batch-tokens", "128", "--steps", "1", "--val-every", "0"]

    def out_of_memory(*args, **kwargs):  # as the device would at the first forward of a batch too large for it
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 GiB")

    with monkeypatch.context() as m:
        m.setattr(F, "cross_entropy", out_of_memory)
        error = train_error(args, tiny_model_dir, tiny_data_dir, out)
    assert "out of memory at step 1 (4 x 32 tokens per micro-step" in error and "run again" in error
    assert not os.path.exists(out)
    assert "x 2 micro-steps" in run_train(args + ["--batch-size", "2"], tiny_model_dir, tiny_data_dir, out)


SMALL = ["--batch-size", "2", "--seq-len", "32", "--grad-accum", "1", "--steps", "2", "--val-every", "0"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--keep-last", "-1"], "KEEP_LAST must be >= 0 (0 keeps every checkpoint), got -1"),  # it deleted them all
        (["--grad-clip", "-1"], "GRAD_CLIP must be >= 0 (0 turns clipping off), got -1.0"),  # gradient ascent
        (["--min-lr-ratio", "-1"], "MIN_LR_RATIO must be in [0, 1], got -1.0"),  # a negative LR late in the run
        (["--weight-decay", "-1"], "WEIGHT_DECAY must be >= 0, got -1.0"),
        (["--batch-size", "0"], "BATCH_SIZE must be >= 1, got 0"),
        (["--seq-len", "-1"], "SEQ_LEN must be >= 1, got -1"),
        (["--lr", "-1"], "LR must be > 0, got -1.0"),
        (["--lr", "nan"], "LR must be > 0, got nan"),
        (["--betas", "-1,2"], "BETAS must be two numbers in [0, 1), got [-1.0, 2.0]"),
        (["--schedule", "linear"], "SCHEDULE must be cosine, wsd or constant, got 'linear'"),
        (["--grad-accum", "-1"], "GRAD_ACCUM must be >= 0 (0: TOTAL_BATCH_TOKENS / (BATCH_SIZE x SEQ_LEN x ranks))"),
        (["--steps", "0"], "STEPS must be >= 1, got 0"),  # it left a run folder without a checkpoint
    ],
)
def test_constants_out_of_range_are_one_line_before_the_run_folder(
    tiny_model_dir, tiny_data_dir, tmp_path, extra, message
):
    out = str(tmp_path / "run")
    assert message in train_error(SMALL + extra, tiny_model_dir, tiny_data_dir, out)
    assert not os.path.exists(out)


def test_gpt2_trains_and_checkpoints_and_a_non_decoder_is_refused_at_the_start(tiny_data_dir, tmp_path):
    """Checkpoints record the model's students, which the swap finds in any family: a GPT-2 trained until its first
    checkpoint and then crashed. A model that is not a decoder-only LM is refused before anything runs."""
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config

    from common.checkpoint import load_model

    folder = str(tmp_path / "gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=2)).save_pretrained(folder)
    out = str(tmp_path / "run")
    run_train(SMALL, folder, tiny_data_dir, out)
    assert type(load_model(os.path.join(out, "step000002"))).__name__ == "GPT2LMHeadModel"
    t5 = str(tmp_path / "t5")
    T5Config().save_pretrained(t5)
    out = str(tmp_path / "run_t5")
    assert "t5 is an encoder-decoder model" in train_error(SMALL, t5, tiny_data_dir, out)
    assert not os.path.exists(out)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda specs: [{**specs[0], "layer": 7}], "students.json: a student's layer [7] out of range"),
        (lambda specs: [{**specs[0], "target": "ffn"}], "students.json: unknown block target 'ffn'"),
        (lambda specs: specs[0], "students.json: it is not a list of {layer, target, kind, kwargs}"),
        (lambda specs: [[1, "mlp"]], "students.json: it is not a list of {layer, target, kind, kwargs}"),
        (lambda specs: [{**specs[0], "kwargs": {"scale": 0.25}}], "model.safetensors: its tensors do not fit"),
    ],
)
def test_a_malformed_students_json_is_one_line(tiny_model_dir, tiny_data_dir, tmp_path, damage, message):
    import common.evaluate

    model = load_model(tiny_model_dir)
    set_block(model, 1, "mlp", make_student("mlp", "pruned", get_block(model, 1, "mlp"), model.config, scale=0.5))
    ckpt = str(tmp_path / "final")
    save_checkpoint(ckpt, model, meta={"script": "distill.py", "phase": "layerwise", "step": 0})
    with open(os.path.join(ckpt, "students.json")) as f:
        specs = json.load(f)
    with open(os.path.join(ckpt, "students.json"), "w") as f:
        json.dump(damage(specs), f)
    out = str(tmp_path / "run")
    assert message in train_error(SMALL, ckpt, tiny_data_dir, out)
    assert not os.path.exists(out)
    with pytest.raises(SystemExit) as e:
        common.evaluate.main([ckpt, "--teacher", "", "--data-dir", tiny_data_dir])
    assert message in e.value.code and "\n" not in e.value.code


def test_a_full_disk_is_one_line_and_resume_continues(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    import common.checkpoint

    out = str(tmp_path / "run")
    args = SMALL + ["--steps", "4", "--save-every", "2"]

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def torch_save_on_a_full_disk(*args, **kwargs):  # how torch.save's zip writer reports a short write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9280 vs 9172")

    for writer, fault in ((common.checkpoint, "save_safetensors_model"), (torch, "save")):
        with monkeypatch.context() as m:
            m.setattr(writer, fault, disk_full if fault != "save" else torch_save_on_a_full_disk)
            error = train_error(
                args + (["--resume"] if os.path.exists(out) else []), tiny_model_dir, tiny_data_dir, out
            )
        assert f"the disk holding {out} is full" in error, error
        assert f"free some space, then the same command with --resume --out-dir {out} continues" in error
        assert sorted(os.listdir(out)) == ["metrics.jsonl", "run.json", "run.lock"]  # nothing half-written
    assert "(no checkpoint yet: from step 0)" in run_train(args + ["--resume"], tiny_model_dir, tiny_data_dir, out)
    assert sorted(n for n in os.listdir(out) if n.startswith("step")) == ["step000002", "step000004"]


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_is_one_line_saying_where_to_resume(tiny_model_dir, tiny_data_dir, tmp_path, signal_name):
    """Ctrl-C and a scheduler's SIGTERM, right after step 10 is logged (step000005 saved): one line, no traceback,
    exit status 128 + the signal, nothing torn; the line's command continues the run."""
    out = str(tmp_path / "run")
    kill_when = 'record.get("step") == 10 and "loss" in record'
    proc = run_killed(train_cmd(BASE, tiny_model_dir, tiny_data_dir, out)[1:], kill_when, signal_name, env=ONE_THREAD)
    assert proc.returncode == 128 + getattr(signal, signal_name), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and [line for line in proc.stderr.splitlines() if "stopped" in line] == [
        f"train.py: stopped by {signal_name}; the same command with --resume --out-dir {out} continues from its "
        f"latest checkpoint"
    ]
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "run.json", "run.lock", "step000005"]
    if signal_name == "SIGINT":
        assert "resuming at step 5 " in run_train(BASE + ["--resume"], tiny_model_dir, tiny_data_dir, out)
        assert sorted(steps_logged(out)[0]) == list(range(1, 41))
