"""distill.py on a tiny model, on CPU: the method, checkpoints, resume, DDP, the logits phase, errors."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import (
    ROOT,
    TINY_DISTILL,
    VOCAB,
    another_run_in,
    layer_rows,
    read_metrics,
    run_distill,
    run_killed,
    run_tiny_distill,
    tiny_config,
)


def distill_command(*args, launcher=(sys.executable,)):
    return [*launcher, os.path.join(ROOT, "distill.py"), *TINY_DISTILL, *args]


def test_latent_cache_is_the_teachers_hidden_state(teacher_dir, tiny_data_dir, tmp_path):
    from common.checkpoint import load_model
    from common.latent_cache import LatentCache
    from common.runtime import Runtime
    from common.shards import TokenLoader, shard_files
    from common.swap import LayerCalls, transformer_layers

    model = load_model(teacher_dir).eval()
    tokens = TokenLoader(shard_files(tiny_data_dir, "train"), 5, 16).next_batch()[0]
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
    for target, where in (("mlp", "host"), ("attn", "disk")):
        calls = LayerCalls(model, target)
        cache = LatentCache(Runtime(), model, tokens, calls, 2, where, str(tmp_path / f".latent_{target}"))
        for i, layer in enumerate(transformer_layers(model)):
            assert cache.layer == i
            torch.testing.assert_close(cache.h, hidden[i], rtol=0, atol=1e-5)
            cache.split()
            if target == "attn":
                torch.testing.assert_close(cache.x, layer.input_layernorm(hidden[i]), rtol=0, atol=1e-5)
            cache.finish()
        assert (where == "disk") == bool(list(tmp_path.glob(f".latent_{target}_*.npy")))
        cache.close()
        assert not list(tmp_path.glob("*.npy"))


def test_corrected_targets_give_back_the_teachers_hidden_state(teacher_dir, tiny_data_dir, tmp_path):
    """LATENT_STREAM=corrected: with students carrying the stream, a block that outputs the cache's target makes
    the layer's output the teacher's own hidden state (transformers' forward), at every layer: the target undoes
    the earlier students' drift. Without the correction it does not."""
    from common.checkpoint import load_model
    from common.latent_cache import LatentCache
    from common.runtime import Runtime
    from common.shards import TokenLoader, shard_files
    from common.students import make_student
    from common.swap import LayerCalls, get_block, run_layer, transformer_layers

    model = load_model(teacher_dir).eval()
    tokens = TokenLoader(shard_files(tiny_data_dir, "train"), 4, 16).next_batch()[0]
    seen = []  # the last layer's output, before the final norm that transformers' last hidden state includes
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        hidden = [*model(tokens, output_hidden_states=True).hidden_states[:-1], *seen]
    handle.remove()
    n_layers = len(transformer_layers(model))
    students = {i: make_student("mlp", "prototype", get_block(model, i, "mlp"), model.config) for i in range(n_layers)}
    calls = LayerCalls(model, "mlp")
    for where in ("host", "disk"):
        cache = LatentCache(Runtime(), model, tokens, calls, 3, where, str(tmp_path / ".latent"), corrected=True)
        plain = LatentCache(Runtime(), model, tokens, calls, 3, "host", str(tmp_path / ".plain"))
        for i in range(n_layers):
            teacher_block = get_block(model, i, "mlp")
            for c in (cache, plain):
                c.split(students[i])
                with torch.no_grad():
                    target = torch.cat([c.target(teacher_block, s, xb) for s, xb in c.batches(c.x)])
                    out = run_layer(model, calls, i, c.h.clone(), lambda x, y: target)
                if c is cache:
                    torch.testing.assert_close(out, hidden[i + 1], rtol=0, atol=1e-5)
                elif i > 0:  # the students' drift stays
                    assert (out - hidden[i + 1]).abs().max() > 1e-2
                c.finish(students[i])
        cache.close()
        plain.close()
        assert not list(tmp_path.glob("*.npy"))


def test_copy_student_is_exact_and_checkpoints_keep_the_backbone(teacher_dir, tiny_data_dir, tmp_path):
    out = str(tmp_path / "run")
    run_tiny_distill(teacher_dir, tiny_data_dir, out, "--student-kind", "copy", "--steps-per-layer", "3")
    first = read_metrics(out, phase="layerwise", layer_step=1)
    assert len(first) == 3 and all(r["loss"] == 0.0 for r in first)
    from common.checkpoint import load_model

    teacher = load_model(teacher_dir).state_dict()
    backbone = [k for k in teacher if ".mlp." not in k]
    for name in ("rot0_layer000", "rot0_layer001", "rot0_layer002", "final"):
        weights = load_model(os.path.join(out, name)).state_dict()
        assert all(torch.equal(weights[k], teacher[k]) for k in backbone)
    with open(os.path.join(out, "final", "students.json")) as f:
        assert [s["layer"] for s in json.load(f)] == [0, 1, 2]
    ids = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        assert torch.equal(load_model(os.path.join(out, "final"))(ids).logits, load_model(teacher_dir)(ids).logits)


@pytest.mark.parametrize("kind,schedule", [("prototype", "rotation"), ("pruned", "rotation"), ("pruned", "parallel")])
def test_student_mse_falls(teacher_dir, tiny_data_dir, tmp_path, kind, schedule):
    out = str(tmp_path / "run")
    run_tiny_distill(
        teacher_dir,
        tiny_data_dir,
        out,
        "--student-kind",
        kind,
        "--schedule",
        schedule,
        "--steps-per-layer",
        "25",
        "--lr",
        "1e-3",
        "--val-every",
        "10",
        "--keep-last",
        "1",
    )
    rows = layer_rows(out)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert all(r["mse_end"] < r["mse_start"] for r in rows), rows
    checkpoints = sorted(n for n in os.listdir(out) if os.path.isfile(os.path.join(out, n, "meta.json")))
    assert checkpoints == (["final", "rot0_layer002"] if schedule == "rotation" else ["final"])
    periodic = [r for r in read_metrics(out, phase="layerwise") if "val_mse" in r or "layer_val_mse" in r]
    assert len(periodic) == (6 if schedule == "rotation" else 3)  # steps 10, 20 (and the end, parallel)


def test_resume_after_kill_is_exact(teacher_dir, tiny_data_dir, tmp_path):
    """Killed after the first (calibrated) layer: the resumed run calibrates the next one the same way."""
    args = [
        "--teacher",
        teacher_dir,
        "--data-dir",
        tiny_data_dir,
        "--student-kind",
        "prototype",
        "--steps-per-layer",
        "20",
        "--rotations",
        "2",
        "--layers",
        "0,2",
    ]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    run_distill(
        *TINY_DISTILL, "--out-dir", whole, "--latent-cache", "disk", *args
    )  # same numbers wherever the cache lives
    assert not [n for n in os.listdir(whole) if n.startswith(".latent")]

    # killed at layer 2's first step of rotation 0: after rot0_layer000 is saved, at a fixed point (no polling race)
    kill_when = 'record.get("rotation") == 0 and record.get("layer") == 2 and record.get("layer_step") == 1'
    proc = run_killed(distill_command("--out-dir", cut, *args)[1:], kill_when)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(n for n in os.listdir(cut) if n.startswith(("rot", "final"))) == ["rot0_layer000"]
    assert "--resume" in run_distill(*TINY_DISTILL, "--out-dir", cut, *args, check=False)
    run_distill(*TINY_DISTILL, "--out-dir", cut, "--resume", *args)

    a = load_file(os.path.join(whole, "final", "model.safetensors"))
    b = load_file(os.path.join(cut, "final", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_timing(layer_rows(whole)) == without_timing(layer_rows(cut))


@pytest.mark.parametrize(
    "kind,kwargs",
    [
        ("linear", '{"chunk_size": 16}'),
        ("delta", '{"chunk_size": 16}'),
        ("lolcats", '{"window": 16, "chunk_size": 16}'),
    ],
)
def test_attention_students_resume_exactly(kind, kwargs, teacher_dir, tiny_data_dir, tmp_path):
    """A rotation of recurrent attention students (several chunks per sequence, a window shorter than it), cut after
    its first layer's checkpoint (the later ones removed, as a kill leaves it), resumes to the same students and
    table as the run that was not cut."""
    args = ["--teacher", teacher_dir, "--data-dir", tiny_data_dir, "--target", "attn", "--student-kind", kind]
    args += ["--student-kwargs", kwargs, "--layers", "0,2", "--steps-per-layer", "3", "--seq-len", "64"]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    run_distill(*TINY_DISTILL, "--out-dir", whole, *args)
    run_distill(*TINY_DISTILL, "--out-dir", cut, *args)
    for name in ("final", "rot0_layer002"):
        shutil.rmtree(os.path.join(cut, name))
    run_distill(*TINY_DISTILL, "--out-dir", cut, "--resume", *args)
    a = load_file(os.path.join(whole, "final", "model.safetensors"))
    b = load_file(os.path.join(cut, "final", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_timing(layer_rows(whole)) == without_timing(layer_rows(cut))


def test_a_run_begun_before_a_student_argument_resumes_as_it_began(teacher_dir, tiny_data_dir, tmp_path):
    """A lolcats run cut after its first layer by code that had no `sink` (its students.json and config without it)
    resumes, under a default of 4 sinks, with the students it began with: the same as the run never cut."""
    args = ["--teacher", teacher_dir, "--data-dir", tiny_data_dir, "--target", "attn", "--student-kind", "lolcats"]
    args += ["--layers", "0,2", "--steps-per-layer", "3", "--seq-len", "64"]
    old = '{"window": 16, "chunk_size": 16, "decay": null}'  # the command line of the run begun before sinks
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    run_distill(*TINY_DISTILL, "--out-dir", whole, *args, "--student-kwargs", old[:-1] + ', "sink": 0}')
    run_distill(*TINY_DISTILL, "--out-dir", cut, *args, "--student-kwargs", old[:-1] + ', "sink": 0}')
    for name in ("final", "rot0_layer002"):
        shutil.rmtree(os.path.join(cut, name))

    def edit(name, change):  # a JSON file of the run as the code before sinks wrote it
        with open(os.path.join(cut, name)) as f:
            record = json.load(f)
        change(record)
        with open(os.path.join(cut, name), "w") as f:
            json.dump(record, f)

    edit("rot0_layer000/students.json", lambda specs: specs[0]["kwargs"].pop("sink"))
    edit("config_layerwise.json", lambda record: record["config"].update(STUDENT_KWARGS=json.loads(old)))
    run_distill(*TINY_DISTILL, "--out-dir", cut, "--resume", *args, "--student-kwargs", old)
    a = load_file(os.path.join(whole, "final", "model.safetensors"))
    b = load_file(os.path.join(cut, "final", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_timing(layer_rows(whole)) == without_timing(layer_rows(cut))
    with open(os.path.join(cut, "final", "students.json")) as f:
        assert [s["kwargs"]["sink"] for s in json.load(f)] == [0, 0]


def test_the_kl_objective_is_the_models_kl_with_only_that_layer_swapped(teacher_dir, tiny_data_dir, tmp_path):
    """DECODER_LOSS=kl: each step's loss is KL(teacher || the model with only layer i's student in) of next-token
    distributions, checked at step 1 against transformers' own logits (the calibrated student, the first batch);
    its steps lower that KL on held-out tokens."""
    from common.checkpoint import load_model
    from common.shards import TokenLoader, shard_files, val_batches
    from common.swap import get_block, swapped

    base = ["--layers", "1", "--student-kind", "pruned", "--student-kwargs", '{"scale": 0.5}', "--lr", "1e-2"]
    calibrated, trained = str(tmp_path / "calibrated"), str(tmp_path / "kl")
    run_tiny_distill(teacher_dir, tiny_data_dir, calibrated, *base, "--steps-per-layer", "0")
    run_tiny_distill(teacher_dir, tiny_data_dir, trained, *base, "--steps-per-layer", "8", "--decoder-loss", "kl")
    teacher = load_model(teacher_dir).eval()
    x, _ = TokenLoader(shard_files(tiny_data_dir, "train"), 2, 32).next_batch()  # TINY_DISTILL's first batch

    def kl(folder, ids):  # mean per token, from the two models' logits
        student = get_block(load_model(os.path.join(folder, "final")), 1, "mlp")
        with torch.no_grad(), swapped(teacher, {(1, "mlp"): student}):
            log_q = teacher(ids).logits.log_softmax(-1)
        with torch.no_grad():
            log_p = teacher(ids).logits.log_softmax(-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()

    first = read_metrics(trained, phase="layerwise", layer_step=1)[0]["loss"]
    assert abs(first - kl(calibrated, x)) < 1e-5 * max(1.0, first), (first, kl(calibrated, x))
    val = torch.cat([b[0] for b in val_batches(tiny_data_dir, 512, 2, 32)])
    assert kl(trained, val) < kl(calibrated, val)


@pytest.mark.parametrize("stream", ["teacher", "corrected"])
def test_the_kl_objective_swaps_in_the_students_that_feed_the_layer(teacher_dir, tiny_data_dir, tmp_path, stream):
    """DECODER_LOSS=kl with a student stream: layer 1's loss is the model's KL with layer 0's student in too (what
    feeds layer 1); with the teacher stream, with layer 1's alone. A negligible LR keeps the students as they start,
    so the final model holds the students the first step saw."""
    from common.checkpoint import load_model
    from common.shards import TokenLoader, shard_files
    from common.swap import get_block, swapped

    out = str(tmp_path / "kl")
    args = ["--layers", "0,1", "--student-kind", "pruned", "--student-kwargs", '{"scale": 0.5}', "--lr", "1e-12"]
    run_tiny_distill(
        teacher_dir,
        tiny_data_dir,
        out,
        *args,
        "--steps-per-layer",
        "2",
        "--decoder-loss",
        "kl",
        "--latent-stream",
        stream,
    )
    teacher, final = load_model(teacher_dir).eval(), load_model(os.path.join(out, "final"))
    x, _ = TokenLoader(shard_files(tiny_data_dir, "train"), 2, 32).next_batch()  # each layer's first batch

    def kl(swap):  # mean per token, from transformers' logits
        with torch.no_grad():
            log_p = teacher(x).logits.log_softmax(-1)
            with swapped(teacher, {(i, "mlp"): get_block(final, i, "mlp") for i in swap}):
                log_q = teacher(x).logits.log_softmax(-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()

    both, alone = kl([0, 1]), kl([1])
    assert abs(both - alone) > 1e-3 * alone  # the two objectives differ on this batch
    expected = both if stream == "corrected" else alone
    first = read_metrics(out, phase="layerwise", layer=1, layer_step=1)[0]["loss"]
    assert abs(first - expected) < 1e-5 * max(1.0, expected), (first, both, alone)


def without_timing(records):
    """Records (table rows, metrics lines) without what depends on the machine's speed."""
    timing = ("seconds", "train_s", "step_ms", "calib_s", "tokens_per_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in records]


def test_parallel_resume_is_exact(teacher_dir, tiny_data_dir, tmp_path):
    args = [
        "--teacher",
        teacher_dir,
        "--data-dir",
        tiny_data_dir,
        "--student-kind",
        "prototype",
        "--schedule",
        "parallel",
        "--steps-per-layer",
        "6",
    ]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    run_distill(*TINY_DISTILL, "--out-dir", whole, *args)
    run_distill(*TINY_DISTILL, "--out-dir", cut, *args, "--save-every", "3")
    shutil.rmtree(os.path.join(cut, "final"))  # as if killed after the step-3 checkpoint, steps 4-6 logged
    run_distill(*TINY_DISTILL, "--out-dir", cut, "--resume", *args, "--save-every", "3")
    a = load_file(os.path.join(whole, "final", "model.safetensors"))
    b = load_file(os.path.join(cut, "final", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # each step logged once, as in the uninterrupted run; and the table keeps the start and calibrated errors
    assert [r["loss"] for r in read_metrics(whole, phase="layerwise") if "loss" in r] == [
        r["loss"] for r in read_metrics(cut, phase="layerwise") if "loss" in r
    ]
    assert without_timing(layer_rows(cut)) == without_timing(layer_rows(whole))


def test_two_process_ddp_matches_one_process(teacher_dir, tiny_data_dir, tmp_path):
    """Same global batch: the same calibration (statistics summed over ranks) and the same training."""
    args = [
        "--teacher",
        teacher_dir,
        "--data-dir",
        tiny_data_dir,
        "--student-kind",
        "pruned",
        "--steps-per-layer",
        "4",
        "--layers",
        "1",
        "--seq-len",
        "32",
        "--calib-tokens",
        "2048",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    proc = subprocess.run(
        distill_command("--out-dir", ddp, *args, launcher=torchrun),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_distill(*TINY_DISTILL, "--out-dir", single, *args, "--batch-size", "4")
    a = load_file(os.path.join(ddp, "final", "model.safetensors"))
    b = load_file(os.path.join(single, "final", "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    for key in ("calib_rel_err", "hybrid_ce"):
        assert layer_rows(ddp)[0][key] == pytest.approx(layer_rows(single)[0][key], rel=1e-5)


def test_logits_phase_has_its_own_lr_and_kl_falls(teacher_dir, tiny_data_dir, tmp_path):
    out = str(tmp_path / "run")
    common = ["--teacher", teacher_dir, "--data-dir", tiny_data_dir, "--out-dir", out]
    run_distill(
        *TINY_DISTILL,
        *common,
        "--student-kind",
        "pruned",
        "--student-kwargs",
        '{"scale": 0.25}',
        "--steps-per-layer",
        "5",
        "--lr",
        "0.5",
        "--warmup-steps",
        "1",
    )
    run_distill(
        *TINY_DISTILL,
        *common,
        "--phase",
        "logits",
        "--kd-steps",
        "30",
        "--kd-lr",
        "2e-3",
        "--kd-warmup-steps",
        "3",
        "--kd-val-every",
        "30",
        "--kd-save-every",
        "15",
    )
    from common.optim import lr_at

    steps = read_metrics(out, phase="logits")
    lrs = [(r["step"], r["lr"]) for r in steps if "lr" in r]
    assert lrs and all(lr == pytest.approx(lr_at(s - 1, 30, 2e-3, 3, "cosine", 0.1)) for s, lr in lrs)
    vals = [r for r in steps if "kl" in r and "val_ce" in r]
    assert vals[0]["step"] == 0 and vals[-1]["step"] == 30 and vals[-1]["kl"] < vals[0]["kl"]
    assert os.path.isdir(os.path.join(out, "logits_step000015")) and os.path.isdir(os.path.join(out, "logits_final"))


def test_logits_phase_on_cpu_keeps_fp32_and_its_numbers(teacher_dir, tiny_data_dir, init_dir, tmp_path):
    """On CPU frozen weights stay fp32 and the logits phase computes what it did before they could be bf16: its
    students, losses and grad norms equal, bit for bit, a plain fp32 loop of the same steps (the students swapped
    into the teacher, hidden states from its base model, the chunked KD loss, clipping, AdamW)."""
    from common.checkpoint import load_model
    from common.kd import kd_loss, lm_head
    from common.optim import lr_at
    from common.runtime import Runtime
    from common.shards import TokenLoader, shard_files
    from common.swap import get_block, student_specs, swapped

    assert Runtime("cpu").frozen_dtype == torch.float32
    out = str(tmp_path / "run")
    kd = ["--kd-steps", "3", "--kd-lr", "1e-3", "--kd-warmup-steps", "1", "--kd-val-every", "3", "--kd-save-every", "3"]
    run_tiny_distill(teacher_dir, tiny_data_dir, out, "--phase", "logits", "--init", init_dir, *kd)

    teacher = load_model(teacher_dir).eval().requires_grad_(False)
    source = load_model(init_dir)
    blocks = {(s["layer"], s["target"]): get_block(source, s["layer"], s["target"]) for s in student_specs(source)}
    params = [p for b in blocks.values() for p in b.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    loader = TokenLoader(shard_files(tiny_data_dir, "train"), 2, 32, vocab_size=320)
    logged = []
    for step in range(3):
        x, y = loader.next_batch()
        with torch.no_grad():
            ht = teacher.base_model(input_ids=x, use_cache=False).last_hidden_state
        with swapped(teacher, blocks):
            hs = teacher.base_model(input_ids=x, use_cache=False).last_hidden_state
            loss, _ = kd_loss(hs, ht, lm_head(teacher), y, 1.0, 0.0, teacher_head=lm_head(teacher))
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 3, 1e-3, 1, "cosine", 0.1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        logged.append((loss.item(), norm.item()))
    assert [(r["loss"], r["grad_norm"]) for r in read_metrics(out, phase="logits") if "loss" in r] == logged
    with swapped(teacher, blocks):
        expected = teacher.state_dict()
    saved = load_file(os.path.join(out, "logits_final", "model.safetensors"))
    assert all(torch.equal(saved[k], expected[k]) for k in saved)


@pytest.fixture
def frozen_in_bf16(monkeypatch):
    """Runtime.frozen_dtype forced to bf16, as on a GPU computing in bf16 (on CPU it is fp32)."""
    from common.runtime import Runtime

    init = Runtime.__init__

    def bf16_frozen(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.frozen_dtype = torch.bfloat16

    monkeypatch.setattr(Runtime, "__init__", bf16_frozen)


def test_frozen_weights_in_bf16_and_students_in_fp32(teacher_dir, tiny_data_dir, init_dir, tmp_path, frozen_in_bf16):
    """The GPU path, on CPU under bf16 autocast with Runtime.frozen_dtype forced to bf16: the teacher (and the
    backbone the students share with it) is held in bf16, the students keep fp32 weights and train, and the
    checkpoint holds both as they were and loads."""
    from common.checkpoint import load_model

    out = str(tmp_path / "run")
    kd = ["--kd-steps", "2", "--kd-lr", "1e-2", "--kd-val-every", "2", "--dtype", "bfloat16"]
    run_tiny_distill(teacher_dir, tiny_data_dir, out, "--phase", "logits", "--init", init_dir, *kd)
    saved = load_file(os.path.join(out, "logits_final", "model.safetensors"))
    before = load_file(os.path.join(init_dir, "model.safetensors"))
    teacher = load_model(teacher_dir).state_dict()
    students = {k for k in saved if ".mlp." in k}
    assert students and all(saved[k].dtype == torch.float32 for k in students)
    assert all(not torch.equal(saved[k], before[k]) for k in students if k.endswith("down_proj.weight"))
    assert all(torch.equal(saved[k], teacher[k].bfloat16()) for k in saved.keys() - students)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(out, phase="logits") if "loss" in r)
    load_model(os.path.join(out, "logits_final"))
    assert {p.dtype for p in load_model(init_dir, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def test_layerwise_teacher_in_bf16_and_students_in_fp32(teacher_dir, tiny_data_dir, tmp_path, frozen_in_bf16):
    """The GPU path of the layer-wise phase, on CPU under bf16 autocast with Runtime.frozen_dtype forced to bf16 and
    the teacher streamed: the teacher is held in bf16, each student is built from it in fp32, calibrates against an
    fp32 copy of its teacher block and trains; final/ holds the students in fp32 on the bf16 backbone, and resumes."""
    from common.checkpoint import load_model

    out = str(tmp_path / "run")
    args = ["--student-kind", "pruned", "--student-kwargs", '{"scale": 0.5}', "--steps-per-layer", "3"]
    args += ["--lr", "1e-2", "--calib-tokens", "2048", "--dtype", "bfloat16", "--teacher-on", "host"]
    run_tiny_distill(teacher_dir, tiny_data_dir, out, *args)
    saved = load_file(os.path.join(out, "final", "model.safetensors"))
    teacher = load_model(teacher_dir).state_dict()
    students = {k for k in saved if ".mlp." in k}
    assert students and all(saved[k].dtype == torch.float32 for k in students)
    assert all(torch.equal(saved[k], teacher[k].bfloat16()) for k in saved.keys() - students)
    rows = layer_rows(out)
    assert len(rows) == 3 and all(r["calib_rel_err"] < r["start_rel_err"] for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(out, phase="layerwise") if "loss" in r)
    shutil.rmtree(os.path.join(out, "final"))
    shutil.rmtree(os.path.join(out, "rot0_layer002"))
    run_tiny_distill(teacher_dir, tiny_data_dir, out, "--resume", *args)
    resumed = load_file(os.path.join(out, "final", "model.safetensors"))
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--student-kind", "nope"], "STUDENT_KIND='nope' STUDENT_KWARGS={}: unknown student kind 'nope'"),
        (["--layers", "0,7"], "LAYERS [7] out of range"),
        (["--keep-teacher-layers", "9"], "KEEP_TEACHER_LAYERS [9] out of range"),
        (["--target", "ffn"], "TARGET='ffn': unknown block target 'ffn'"),
        (["--student-kwargs", '{"width": 3}'], "do not fit student"),
        (["--trainable", "nothing_like_this"], "matches no parameter"),
        (["--latent-cache", "gpu"], "LATENT_CACHE must be auto, device, host or disk"),
        (["--steps-per-layr", "3"], "unknown option --steps-per-layr"),
        (["--data-dir", "/nonexistent"], "/nonexistent: no train shards found; run `python prepare.py"),
        (["--teacher", "/nonexistent"], "/nonexistent: no config.json"),
        (["--phase", "logits", "--init", "/nonexistent"], "/nonexistent: no config.json"),
        (["--grad-clip", "-1"], "GRAD_CLIP must be >= 0 (0 turns clipping off), got -1.0"),  # was gradient ascent
        (["--min-lr-ratio", "-1"], "MIN_LR_RATIO must be in [0, 1], got -1.0"),  # was a negative LR
        (["--weight-decay", "-1"], "WEIGHT_DECAY must be >= 0, got -1.0"),  # these were refused in the run folder
        (["--lr", "-1"], "LR must be > 0, got -1.0"),
        (["--kd-lr", "nan"], "KD_LR must be > 0, got nan"),
        (["--kd-ce-weight", "1.5"], "KD_CE_WEIGHT must be in [0, 1], got 1.5"),
        (["--kd-ce-weight", "-0.5"], "KD_CE_WEIGHT must be in [0, 1], got -0.5"),
        (["--kd-min-lr-ratio", "1.5"], "KD_MIN_LR_RATIO must be in [0, 1], got 1.5"),
        (["--student-kwargs", '{"scale": 0}'], "prototype student: scale must be > 0"),  # were one channel wide
        (["--student-kind", "pruned", "--student-kwargs", '{"scale": -1}'], "pruned student: scale must be in (0, 1]"),
        (
            ["--target", "attn", "--student-kind", "delta", "--student-kwargs", '{"gate_rank": 0}'],
            "delta student: gate_rank must be a whole number >= 1, got 0",
        ),
        (
            ["--target", "attn", "--student-kind", "delta", "--student-kwargs", '{"decay_rank": 8}'],
            "do not fit student 'delta'",
        ),
        (
            ["--target", "attn", "--student-kind", "lolcats", "--student-kwargs", '{"window": 0}'],
            "lolcats student: window must be a whole number >= 1, got 0",
        ),
        (["--decoder-loss", "kl", "--schedule", "parallel"], "DECODER_LOSS=kl swaps one layer's student in at a time"),
        (["--decoder-loss", "kl", "--teacher-on", "host"], "it keeps the teacher on the device: --teacher-on auto"),
    ],
)
def test_bad_input_is_one_clear_line(teacher_dir, tiny_data_dir, tmp_path, args, message):
    """Each mistake ends the run with one line that says what to do (a SystemExit, not a traceback), before the
    run folder exists: the corrected command is not refused for a folder that "already holds files"."""
    out = tmp_path / "r"
    error = run_tiny_distill(teacher_dir, tiny_data_dir, str(out), "--student-kind", "prototype", *args, check=False)
    assert error is not None and message in error and "\n" not in error, error
    assert not out.exists()


def test_truncated_teacher_is_one_line_and_no_run_folder(teacher_dir, tiny_data_dir, tmp_path):
    cut = shutil.copytree(teacher_dir, tmp_path / "teacher")
    weights = cut / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    error = run_tiny_distill(str(cut), tiny_data_dir, str(tmp_path / "r"), check=False)
    assert f"{weights}: not a complete safetensors file" in error and "\n" not in error, error
    assert not (tmp_path / "r").exists()


RUN = ["--student-kind", "prototype", "--steps-per-layer", "2", "--layers", "0,1,2"]


@pytest.fixture(scope="module")
def stopped_run(teacher_dir, tiny_data_dir, tmp_path_factory):
    """A rotation run over layers 0, 1, 2 as if killed after its checkpoint of layer 1, and the final weights of
    the same run uninterrupted. Tests resume copies of it."""
    base = tmp_path_factory.mktemp("stopped")
    out = str(base / "run")
    run_tiny_distill(teacher_dir, tiny_data_dir, out, *RUN)
    whole = load_file(os.path.join(out, "final", "model.safetensors"))
    for name in ("final", "rot0_layer002"):
        shutil.rmtree(os.path.join(out, name))
    return out, whole


@pytest.mark.parametrize(
    "change,message",
    [
        (["--layers", "2"], "LAYERS [0, 1, 2] -> [2]"),
        (["--student-kind", "pruned"], "STUDENT_KIND 'prototype' -> 'pruned'"),
        (["--student-kwargs", '{"scale": 0.5}'], "STUDENT_KWARGS {} -> {'scale': 0.5}"),
        (["--steps-per-layer", "3", "--seq-len", "16"], "SEQ_LEN 32 -> 16; STEPS_PER_LAYER 2 -> 3"),
        (["--data-dir", "ELSEWHERE"], "DATA_DIR"),
    ],
)
def test_resume_refuses_changed_constants(stopped_run, teacher_dir, tiny_data_dir, tmp_path, change, message):
    """Resuming with another layer list, student or schedule would mix two runs in one model: refused, naming
    each changed constant with its old and new value, before anything is loaded or written."""
    out = shutil.copytree(stopped_run[0], tmp_path / "run")
    before = sorted(os.listdir(out))
    change = [str(tmp_path) if c == "ELSEWHERE" else c for c in change]
    error = run_tiny_distill(teacher_dir, tiny_data_dir, str(out), "--resume", *RUN, *change, check=False)
    assert error and message in error and "config_layerwise.json" in error and "\n" not in error, error
    assert sorted(os.listdir(out)) == before


def test_resume_clears_torn_files_and_may_change_reporting(stopped_run, teacher_dir, tiny_data_dir, tmp_path):
    """What a kill mid-write leaves is cleared at resume; constants that only say where and how often the run
    reports and saves may change, and the result is that of the uninterrupted run."""
    out = shutil.copytree(stopped_run[0], tmp_path / "run")
    os.makedirs(out / ".tmp_rot0_layer002_4242")  # a checkpoint being written (a whole model on a real run)
    (out / ".tmp_rot0_layer002_4242" / "model.safetensors").write_bytes(b"torn")
    (out / ".latent_train_h_rank0.npy").write_bytes(b"a disk latent cache")
    (out / "layers.json.tmp4242").write_bytes(b"[")
    os.rename(out / "rot0_layer001", out / ".old_rot0_layer001_4242")  # killed while replacing it: put back
    run_tiny_distill(
        teacher_dir,
        tiny_data_dir,
        str(out),
        "--resume",
        *RUN,
        "--log-every",
        "5",
        "--keep-last",
        "0",
        "--latent-cache",
        "disk",
        "--val-every",
        "1",
    )
    assert sorted(n for n in os.listdir(out) if n.startswith(".") or "tmp" in n) == []
    assert os.path.isdir(out / "rot0_layer001")
    resumed = load_file(os.path.join(out, "final", "model.safetensors"))
    whole = stopped_run[1]
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_a_run_in_use_is_refused_until_its_holder_dies(stopped_run, teacher_dir, tiny_data_dir, tmp_path):
    """Two runs on one folder: the second is refused with one line naming the first's pid, whether it resumes
    (with the same or other constants) or starts in a folder the first has just created. A killed holder's lock
    is gone with it."""
    out = shutil.copytree(stopped_run[0], tmp_path / "run")
    fresh = tmp_path / "fresh"
    os.mkdir(fresh)
    common = ["--teacher", teacher_dir, "--data-dir", tiny_data_dir, *RUN]
    with another_run_in(out) as holder, another_run_in(fresh) as starting:
        for folder, extra, pid in (
            (out, ["--resume"], holder.pid),
            (out, ["--resume", "--student-kind", "pruned"], holder.pid),
            (fresh, [], starting.pid),
        ):
            error = run_distill(*TINY_DISTILL, *common, "--out-dir", str(folder), *extra, check=False)
            assert error and f"{folder}: in use by another run (pid {pid})" in error and "\n" not in error, error
    assert not os.path.exists(out / "final") and sorted(os.listdir(fresh)) == ["run.lock"]
    run_distill(*TINY_DISTILL, *common, "--out-dir", str(out), "--resume")
    run_distill(*TINY_DISTILL, *common, "--out-dir", str(fresh))
    assert os.path.isdir(out / "final") and os.path.isdir(fresh / "final")


def test_parallel_and_logits_resumes_refuse_changed_constants(teacher_dir, tiny_data_dir, tmp_path):
    out = str(tmp_path / "run")
    common = ["--teacher", teacher_dir, "--data-dir", tiny_data_dir, "--out-dir", out, "--student-kind", "prototype"]
    parallel = ["--schedule", "parallel", "--steps-per-layer", "2", "--save-every", "1"]
    run_distill(*TINY_DISTILL, *common, *parallel)
    shutil.rmtree(os.path.join(out, "final"))  # as if killed after the step-1 checkpoint
    error = run_distill(*TINY_DISTILL, *common, *parallel, "--resume", "--rotations", "2", check=False)
    assert error and "ROTATIONS 1 -> 2" in error, error
    run_distill(*TINY_DISTILL, *common, *parallel, "--resume")
    logits = ["--phase", "logits", "--kd-steps", "2", "--kd-save-every", "1", "--kd-val-every", "2"]
    run_distill(*TINY_DISTILL, *common, *logits)
    shutil.rmtree(os.path.join(out, "logits_final"))
    error = run_distill(*TINY_DISTILL, *common, *logits, "--resume", "--kd-lr", "0.5", check=False)
    assert error and "KD_LR 0.001 -> 0.5" in error and "config_logits.json" in error, error
    # the layer-wise phase's own constants do not bear on the logits phase
    run_distill(*TINY_DISTILL, *common, *logits, "--resume", "--student-kind", "pruned", "--steps-per-layer", "7")
    assert os.path.isdir(os.path.join(out, "logits_final"))


def test_what_is_not_a_decoder_only_lm_is_refused_in_one_line(tiny_data_dir, tmp_path):
    from transformers import T5Config, ViTConfig

    for config, why in ((T5Config(), "t5 is an encoder-decoder model"), (ViTConfig(), "vit has no causal LM head")):
        folder = tmp_path / config.model_type
        config.save_pretrained(folder)
        error = run_tiny_distill(str(folder), tiny_data_dir, str(tmp_path / "r"), check=False)
        assert why in error and "\n" not in error
        assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "kind,cls,kwargs",
    [
        ("linear", "LinearAttention", "{}"),
        ("delta", "DeltaAttention", "{}"),
        ("lolcats", "LolcatsAttention", '{"window": 8}'),  # shorter than the 32 tokens: linear terms too
    ],
    ids=["linear", "delta", "lolcats"],
)
def test_attention_students_rotation_then_logits_then_evaluation(
    teacher_dir, tiny_data_dir, tmp_path, kind, cls, kwargs
):
    out = str(tmp_path / "run")
    common = ["--teacher", teacher_dir, "--data-dir", tiny_data_dir, "--out-dir", out]
    run_distill(
        *TINY_DISTILL,
        *common,
        "--target",
        "attn",
        "--student-kind",
        kind,
        "--student-kwargs",
        kwargs,
        "--steps-per-layer",
        "15",
        "--keep-teacher-layers",
        "1",
        "--lr",
        "3e-3",
    )
    rows = layer_rows(out)
    assert [r["layer"] for r in rows] == [0, 2] and all(r["mse_end"] < r["mse_start"] for r in rows)
    assert all(r["calib_rel_err"] < r["start_rel_err"] for r in rows)  # on the val tokens: calibration helps
    run_distill(
        *TINY_DISTILL, *common, "--phase", "logits", "--kd-steps", "6", "--kd-val-every", "6", "--kd-lr", "1e-3"
    )

    from common.checkpoint import load_model
    from common.quality import evaluate
    from common.shards import val_batches

    model = load_model(os.path.join(out, "logits_final"))
    assert [type(layer.self_attn).__name__ for layer in model.model.layers] == [cls, "LlamaAttention", cls]
    result = evaluate(model, val_batches(tiny_data_dir, 512, 2, 32), teacher=load_model(teacher_dir))
    assert result["kl"] > 0 and 0 < result["agreement"] <= 1 and result["ce"] > 0


def test_trainable_trains_only_the_named_parameters(teacher_dir, tiny_data_dir, tmp_path):
    out = str(tmp_path / "run")
    run_tiny_distill(
        teacher_dir,
        tiny_data_dir,
        out,
        "--student-kind",
        "prototype",
        "--student-kwargs",
        '{"gated": true}',
        "--trainable",
        "fc_out",
        "--steps-per-layer",
        "5",
        "--layers",
        "1",
    )
    from common.checkpoint import load_model
    from common.students import make_student

    trained = load_model(os.path.join(out, "final")).model.layers[1].mlp
    teacher = load_model(teacher_dir)
    torch.manual_seed(1337 + 1)  # distill.py seeds layer i's student with SEED + i
    initial = make_student("mlp", "prototype", teacher.model.layers[1].mlp, teacher.config, gated=True)
    assert torch.equal(trained.fc_in.weight, initial.fc_in.weight)
    assert not torch.equal(trained.fc_out.weight, initial.fc_out.weight)
    assert "matches no parameter" in run_tiny_distill(
        teacher_dir, tiny_data_dir, str(tmp_path / "r2"), "--trainable", "nothing_like_this", check=False
    )


def run_distill_sh(teacher_dir, data_dir, *args, preset=None):
    """./distill.sh --teacher ... --data-dir ... ARGS as a user runs it (PRESET=preset when given); the finished
    process, its output captured."""
    command = [os.path.join(ROOT, "distill.sh"), "--teacher", teacher_dir, "--data-dir", data_dir, *args]
    env = {**os.environ, **({"PRESET": preset} if preset else {})}
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_distill_sh_runs_both_phases(teacher_dir, tiny_data_dir, tmp_path):
    """./distill.sh: calibrated layer-wise phase, then the logits phase in the same run folder."""
    out = str(tmp_path / "run")
    tiny = [*TINY_DISTILL, "--steps-per-layer", "2", "--calib-tokens", "1024", "--kd-steps", "2"]
    tiny += ["--warmup-steps", "1", "--kd-warmup-steps", "1", "--kd-val-every", "2"]
    proc = run_distill_sh(teacher_dir, tiny_data_dir, "--out-dir", out, *tiny)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(r["calib_rel_err"] < r["start_rel_err"] for r in layer_rows(out))
    assert os.path.isdir(os.path.join(out, "final")) and os.path.isdir(os.path.join(out, "logits_final"))


def test_distill_sh_radlads_preset_runs_its_lr_shapes(teacher_dir, tiny_data_dir, tmp_path):
    """PRESET=radlads ./distill.sh at test size: delta-rule attention students aligned all at once (the parallel
    schedule) at LR 1e-3 cosine to 1e-5, then the logits phase at a flat 1e-5, as metrics.jsonl logs them. An
    unknown preset is one line."""
    proc = run_distill_sh(teacher_dir, tiny_data_dir, preset="nope")
    assert proc.returncode == 1 and proc.stderr == "distill.sh: unknown PRESET 'nope'; use pruned, radlads or hybrid\n"
    out = str(tmp_path / "run")
    tiny = [*TINY_DISTILL, "--steps-per-layer", "8", "--warmup-steps", "0", "--val-every", "0", "--kd-steps", "3"]
    tiny += ["--kd-val-every", "3", "--kd-save-every", "3"]
    proc = run_distill_sh(teacher_dir, tiny_data_dir, "--out-dir", out, *tiny, preset="radlads")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "config_layerwise.json")) as f:
        config = json.load(f)["config"]
    assert (config["TARGET"], config["STUDENT_KIND"], config["SCHEDULE"]) == ("attn", "delta", "parallel")
    assert [r["layer"] for r in layer_rows(out)] == [0, 1, 2]
    step1 = [r["lr"] for r in read_metrics(out, phase="layerwise") if "lr" in r]
    assert step1 == pytest.approx([1e-5 + (1e-3 - 1e-5) / 2 * (1 + math.cos(math.pi * s / 8)) for s in range(8)])
    assert [r["lr"] for r in read_metrics(out, phase="logits") if "lr" in r] == [1e-5] * 3
    assert os.path.isdir(os.path.join(out, "logits_final"))


def test_distill_sh_hybrid_preset_distills_the_layers_choose_chose(teacher_dir, tiny_data_dir, tmp_path):
    """PRESET=hybrid ./distill.sh at test size: --phase choose ranks the attention layers, the layer-wise phase
    distills the ones it converts (--chosen) and the logits phase follows, in one run folder. A resumed choose phase
    with its choice.json is finished; --chosen without one is one line and leaves the folder as it was."""
    out = str(tmp_path / "run")
    tiny = [*TINY_DISTILL, "--student-kwargs", '{"window": 8}', "--steps-per-layer", "2", "--convert", "2"]
    tiny += ["--kd-steps", "2", "--kd-val-every", "2", "--kd-save-every", "2"]
    proc = run_distill_sh(teacher_dir, tiny_data_dir, "--out-dir", out, *tiny, preset="hybrid")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "choice.json")) as f:
        choice = json.load(f)
    assert len(choice["convert"]) == 2 and [r["layer"] for r in layer_rows(out)] == choice["convert"]
    with open(os.path.join(out, "config_layerwise.json")) as f:
        config = json.load(f)["config"]
    assert (config["TARGET"], config["STUDENT_KIND"], config["CHOSEN"]) == ("attn", "lolcats", True)
    assert os.path.isdir(os.path.join(out, "logits_final"))
    args = ["--target", "attn", "--student-kind", "lolcats"]
    assert run_tiny_distill(teacher_dir, tiny_data_dir, out, *args, "--phase", "choose", "--resume", check=False) == "0"
    fresh = tmp_path / "fresh"
    error = run_tiny_distill(teacher_dir, tiny_data_dir, str(fresh), *args, "--chosen", check=False)
    assert error == (
        f"distill.py: {fresh}: no choice.json here, so no layers chosen; run --phase choose into this --out-dir "
        "first, or drop --chosen and pass --layers"
    )
    assert not fresh.exists()


def test_chosen_layers_start_from_the_students_the_choose_phase_calibrated(
    teacher_dir, tiny_data_dir, tmp_path, capsys
):
    """--phase layerwise --chosen reads each student calibrated from OUT/calibrated (the choose phase calibrated it
    on the same tokens) instead of calibrating it again, and ends with the students a calibration gives; after a
    choose phase with other calibration settings it calibrates again."""
    args = ["--target", "attn", "--student-kind", "lolcats", "--student-kwargs", '{"window": 8}', "--convert", "2"]
    out, again, other = (str(tmp_path / name) for name in ("run", "again", "other"))
    run_tiny_distill(teacher_dir, tiny_data_dir, out, *args, "--phase", "choose")
    run_tiny_distill(teacher_dir, tiny_data_dir, other, *args, "--phase", "choose", "--calib-tokens", "2048")
    shutil.copytree(out, again)
    shutil.rmtree(os.path.join(again, "calibrated"))  # nothing to read: each student calibrates in its turn
    printed = {}
    for folder in (out, again, other):
        capsys.readouterr()
        run_tiny_distill(teacher_dir, tiny_data_dir, folder, *args, "--chosen", "--steps-per-layer", "2")
        printed[folder] = capsys.readouterr().out
    assert f"calibration: the choose phase's students ({out}/calibrated)" in printed[out]
    assert "the choose phase's students" not in printed[again] + printed[other]
    assert "calibrating again: the choose phase ran with another CALIB_TOKENS" in printed[other]
    rows = layer_rows(out)
    assert [r["layer"] for r in rows] == [r["layer"] for r in layer_rows(again)]
    for key in ("calib_rel_err", "rel_err"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in layer_rows(again)], rel=1e-5)
    ours, theirs = (load_file(os.path.join(f, "final", "model.safetensors")) for f in (out, again))
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_layer_checkpoints_hold_the_students_alone_on_a_checked_teacher(teacher_dir, tiny_data_dir, tmp_path):
    """A per-layer checkpoint is the students trained so far plus a reference to the teacher (path and weights'
    hash); load_model rebuilds the same model a complete checkpoint gives, and refuses a teacher that is missing or
    has changed. final/ stays complete."""
    from common.checkpoint import load_model
    from common.swap import get_block, swapped

    teacher = str(tmp_path / "teacher")
    shutil.copytree(teacher_dir, teacher)
    out = tmp_path / "run"
    run_tiny_distill(teacher, tiny_data_dir, str(out), "--student-kind", "pruned", "--steps-per-layer", "2")
    layer1, final = out / "rot0_layer001", out / "final"
    assert (layer1 / "teacher.json").exists() and not (final / "teacher.json").exists()
    assert (layer1 / "model.safetensors").stat().st_size < (final / "model.safetensors").stat().st_size / 3
    complete = load_model(str(final))
    expected = load_model(teacher)
    with swapped(expected, {(i, "mlp"): get_block(complete, i, "mlp") for i in (0, 1)}):
        want = expected.state_dict()
    got = load_model(str(layer1)).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    model = load_model(teacher)
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] += 1
    model.save_pretrained(teacher)
    with pytest.raises(ValueError, match="has changed since"):
        load_model(str(layer1))
    shutil.rmtree(teacher)
    with pytest.raises(ValueError, match="is missing; put that teacher back, or use the run's final/"):
        load_model(str(layer1))


def test_a_teacher_streamed_from_host_memory_gives_the_same_students_one_layer_at_a_time(
    teacher_dir, tiny_data_dir, tmp_path, monkeypatch
):
    """TEACHER_ON=host: the teacher's layers live in host memory and visit the device one at a time (two while the
    stream advances past a layer during another's turn); the students are bit-identical to those of a teacher
    held on the device. (On a CPU device and host are one memory: this checks the bookkeeping and the results.)"""
    from safetensors.torch import load_file

    import distill
    from common import offload

    most = []
    enter = offload._LayerHome.enter

    def counting_enter(home):
        enter(home)
        most.append(sum(h.users > 0 for h in homes))

    homes = []
    init = offload._LayerHome.__init__
    monkeypatch.setattr(offload._LayerHome, "__init__", lambda h, *a: (init(h, *a), homes.append(h))[0])
    monkeypatch.setattr(offload._LayerHome, "enter", counting_enter)
    visits = []  # (layer, its companions) of each resident() stretch
    real_resident = offload.resident
    counting_resident = lambda layer, *c: (visits.append((layer, c)), real_resident(layer, *c))[1]  # noqa: E731
    monkeypatch.setattr(distill, "resident", counting_resident)  # the name distill.py calls
    runs = {}
    for where in ("device", "host"):
        runs[where] = str(tmp_path / where)
        args = ["--student-kind", "pruned", "--steps-per-layer", "3", "--teacher-on", where]
        run_tiny_distill(teacher_dir, tiny_data_dir, runs[where], *args, "--latent-stream", "student")
    assert len(homes) == 3 and len(most) > 100 and max(most) == 2 and all(h.users == 0 for h in homes)
    # each student visits the device with its own layer, for that layer's turn only; between turns it is at home
    layers = [h.layer for h in homes]
    assert [layers.index(layer) for layer, _ in visits[3:]] == [0, 1, 2] and all(len(c) == 1 for _, c in visits)
    assert all(offload.home_device(layer, torch.device("cuda")).type == "cpu" for layer in layers)
    a, b = (load_file(os.path.join(runs[w], "final", "model.safetensors")) for w in ("device", "host"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_drops_the_metrics_it_redoes(stopped_run, teacher_dir, tiny_data_dir, tmp_path):
    """stopped_run's metrics.jsonl holds layer 2's records, logged after its last checkpoint: a resume redoes them,
    so it logs each once, as the uninterrupted run did."""
    out = shutil.copytree(stopped_run[0], tmp_path / "run")
    logged = read_metrics(out)
    assert [r["layer"] for r in logged if r.get("layer_step") == 1] == [0, 1, 2]
    run_tiny_distill(teacher_dir, tiny_data_dir, str(out), "--resume", *RUN)
    assert without_timing(read_metrics(out)) == without_timing(logged)


def test_calibration_only_resume_drops_the_metrics_it_redoes(teacher_dir, tiny_data_dir, tmp_path):
    """With --steps-per-layer 0 every layer's record has step 0: the rotation and layer say which are redone."""
    out = str(tmp_path / "run")
    args = ["--student-kind", "prototype", "--steps-per-layer", "0"]
    run_tiny_distill(teacher_dir, tiny_data_dir, out, *args)
    logged = read_metrics(out)
    for name in ("final", "rot0_layer002", "rot0_layer001"):  # as if killed after the checkpoint of layer 0
        shutil.rmtree(os.path.join(out, name))
    run_tiny_distill(teacher_dir, tiny_data_dir, out, "--resume", *args)
    assert without_timing(read_metrics(out)) == without_timing(logged)


@pytest.fixture(scope="module")
def logits_run(teacher_dir, tiny_data_dir, tmp_path_factory):
    """A finished layer-wise then logits run (logits checkpoints at steps 1, 2 and logits_final at 3)."""
    out = str(tmp_path_factory.mktemp("logits") / "run")
    run_tiny_distill(teacher_dir, tiny_data_dir, out, *RUN)
    run_tiny_distill(teacher_dir, tiny_data_dir, out, *LOGITS)
    return out


LOGITS = ["--phase", "logits", "--kd-steps", "3", "--kd-save-every", "1", "--kd-val-every", "3"]


def test_logits_resume_drops_the_metrics_it_redoes(logits_run, teacher_dir, tiny_data_dir, tmp_path):
    out = shutil.copytree(logits_run, tmp_path / "run")
    logged = read_metrics(out)
    shutil.rmtree(out / "logits_final")  # as if killed after the step-2 checkpoint, step 3 logged
    run_tiny_distill(teacher_dir, tiny_data_dir, str(out), *LOGITS, "--resume")
    assert without_timing(read_metrics(out)) == without_timing(logged)


def test_a_finished_logits_phase_says_so(logits_run, teacher_dir, tiny_data_dir, tmp_path, capsys):
    """A re-queued finished job, or a kill after logits_final was written: --resume has nothing to do."""
    out = shutil.copytree(logits_run, tmp_path / "run")
    assert run_tiny_distill(teacher_dir, tiny_data_dir, str(out), *LOGITS, "--resume") is None
    final = os.path.join(out, "logits_final")
    assert f"the logits phase is finished: {final} is at step 3 of KD_STEPS=3" in capsys.readouterr().out


def test_a_full_disk_is_one_line_and_resume_continues(teacher_dir, tiny_data_dir, tmp_path, monkeypatch):
    import common.checkpoint

    out = str(tmp_path / "run")

    def disk_full(*args, **kwargs):  # as safetensors reports it
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as m:
        m.setattr(common.checkpoint, "save_safetensors_model", disk_full)  # complete checkpoints
        m.setattr(common.checkpoint, "save_safetensors_file", disk_full)  # students-only checkpoints
        error = run_tiny_distill(teacher_dir, tiny_data_dir, out, *RUN, check=False)
    assert f"the disk holding {out} is full" in error and "\n" not in error, error
    assert f"free some space, then the same command with --resume --out-dir {out} continues" in error
    assert not [n for n in os.listdir(out) if n.startswith((".tmp", "rot"))]  # nothing half-written
    run_tiny_distill(teacher_dir, tiny_data_dir, out, *RUN, "--resume")
    assert os.path.isdir(os.path.join(out, "final"))


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_is_one_line_saying_where_to_resume(teacher_dir, tiny_data_dir, tmp_path, signal_name):
    out = str(tmp_path / "run")
    args = ["--teacher", teacher_dir, "--data-dir", tiny_data_dir, "--out-dir", out, *RUN]
    proc = run_killed(distill_command(*args)[1:], 'record.get("layer") == 1', signal_name)
    assert proc.returncode == 128 + getattr(signal, signal_name), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and [line for line in proc.stderr.splitlines() if "stopped" in line] == [
        f"distill.py: stopped by {signal_name}; the same command with --resume --out-dir {out} continues from its "
        f"latest checkpoint"
    ]
    assert not [n for n in os.listdir(out) if n.startswith(".") or "tmp" in n]


def test_a_logits_teacher_of_another_vocabulary_is_refused(tiny_data_dir, teacher_dir, tmp_path):
    """The data check used the student's vocabulary: a smaller teacher met the data's ids in its embedding."""
    from transformers import AutoModelForCausalLM

    config = tiny_config()
    config.vocab_size = 200
    small = str(tmp_path / "small_vocab")
    AutoModelForCausalLM.from_config(config).save_pretrained(small)
    out = tmp_path / "r"
    logits = ["--phase", "logits", "--init", teacher_dir, "--kd-trainable", "all", "--kd-steps", "1"]
    error = run_tiny_distill(small, tiny_data_dir, str(out), *logits, check=False)
    assert f"{teacher_dir} has a vocabulary of 320 tokens and --teacher {small} one of 200" in error, error
    assert not out.exists()


@pytest.mark.parametrize("tied", [True, False])
def test_kd_trainable_body_trains_all_but_the_embeddings_and_head(teacher_dir, tiny_data_dir, tmp_path, capsys, tied):
    """--kd-trainable body: the logits phase moves every weight of the model but the token embeddings and the LM
    head (one tensor when tied, two when not), which end as they began; its memory estimate counts them frozen in
    fp32 (4 bytes each) where --kd-trainable all counts them trained (16)."""
    from transformers import AutoModelForCausalLM

    from common.checkpoint import load_model

    teacher = teacher_dir
    if not tied:
        config = tiny_config()
        config.tie_word_embeddings = False
        teacher = str(tmp_path / "untied")
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(teacher)
    init = str(tmp_path / "init")  # the teacher with noise in every weight: a start whose KL has a gradient
    model = load_model(teacher)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(0.05 * torch.randn_like(w))
    model.save_pretrained(init)
    estimates = {}
    for mode in ("all", "body"):
        logits = ["--phase", "logits", "--init", init, "--kd-trainable", mode, "--kd-steps", "2", "--kd-lr", "1e-2"]
        capsys.readouterr()
        run_tiny_distill(teacher, tiny_data_dir, str(tmp_path / mode), *logits)
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("memory estimate of the logits"))
        estimates[mode] = {t: float(v) for t, v in re.findall(r"([a-z]+) ([0-9.]+)", line.split(" = ")[1])}
    embedding_mib = VOCAB * 64 * (1 if tied else 2) / 2**20
    assert estimates["all"]["trained"] - estimates["body"]["trained"] == pytest.approx(16 * embedding_mib, abs=0.011)
    assert estimates["body"]["frozen"] - estimates["all"]["frozen"] == pytest.approx(4 * embedding_mib, abs=0.011)
    out = str(tmp_path / "body")
    before = load_model(init).state_dict()
    after = load_model(os.path.join(out, "logits_final")).state_dict()
    frozen = {"model.embed_tokens.weight", "lm_head.weight"}
    assert set(after) == set(before) and frozen <= set(after)
    moved = {name for name, w in after.items() if not torch.equal(w, before[name])}
    assert moved == set(after) - frozen, sorted(set(after) - frozen - moved)


def test_a_teacher_that_holds_students_is_refused(stopped_run, tiny_data_dir, teacher_dir, tmp_path):
    """RUN/rot0_layer001 holds prototype students in layers 0 and 1."""
    checkpoint = os.path.join(stopped_run[0], "rot0_layer001")
    out = tmp_path / "r"
    error = run_tiny_distill(checkpoint, tiny_data_dir, str(out), "--student-kind", "pruned", check=False)
    assert error == (
        f"distill.py: --teacher {checkpoint} already holds prototype students in layers 0,1 (mlp), which would "
        f"teach the new ones: pass the model they were distilled from as --teacher ({teacher_dir}, its run.json "
        f"says), keep them with --keep-teacher-layers 0,1, or train them on with --phase logits --init {checkpoint}"
    )
    assert not out.exists()


def test_choose_ranks_layers_by_the_kl_of_converting_each_alone(teacher_dir, tiny_data_dir, tmp_path):
    """--phase choose: the KL each layer's calibrated student costs when it alone is swapped in equals a direct
    computation from transformers' own logits, the table is ranked by it, and the cheapest CONVERT layers are
    converted while the rest keep the teacher's attention."""
    from common.checkpoint import load_model
    from common.shards import val_batches
    from common.swap import get_block, swapped

    out = str(tmp_path / "choose")
    args = ["--phase", "choose", "--target", "attn", "--student-kind", "linear", "--convert", "2"]
    run_tiny_distill(teacher_dir, tiny_data_dir, out, *args)
    with open(os.path.join(out, "choice.json")) as f:
        choice = json.load(f)
    assert [r["kl"] for r in choice["rows"]] == sorted(r["kl"] for r in choice["rows"])
    assert choice["convert"] == sorted(r["layer"] for r in choice["rows"][:2]) and len(choice["keep"]) == 1
    teacher, calibrated = load_model(teacher_dir).eval(), load_model(os.path.join(out, "calibrated")).eval()
    val = val_batches(tiny_data_dir, 512, 2, 32)  # TINY_DISTILL's val tokens
    with torch.no_grad():
        reference = [teacher(x).logits.log_softmax(-1).flatten(0, 1) for x, _ in val]
        for row in choice["rows"]:
            with swapped(teacher, {(row["layer"], "attn"): get_block(calibrated, row["layer"], "attn")}):
                hybrid = [teacher(x).logits.log_softmax(-1).flatten(0, 1) for x, _ in val]
            kl = sum(F.kl_div(q, p, log_target=True, reduction="sum") for q, p in zip(hybrid, reference)).item() / 512
            assert abs(kl - row["kl"]) < 1e-5 * max(1.0, kl), (row, kl)


def test_choose_refuses_more_layers_than_it_has_before_any_folder(teacher_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "choose"
    error = run_tiny_distill(teacher_dir, tiny_data_dir, str(out), "--phase", "choose", "--convert", "4", check=False)
    assert error == "distill.py: CONVERT must be 1..3 (of the layers to choose from; 0 = half of them), got 4"
    assert not out.exists()


def test_each_phase_prints_its_memory_estimate_and_refuses_a_plan_that_cannot_fit(
    teacher_dir, tiny_data_dir, tmp_path, monkeypatch, capsys
):
    """Each phase prints its memory estimate per GPU (common/memory.py) before it starts; a plan whose estimate is
    more than the device has free stops with one line that says what to change, before the run folder (and so any
    latent cache) exists."""
    import distill
    from common import latent_cache

    out = tmp_path / "r"
    run_tiny_distill(teacher_dir, tiny_data_dir, str(out), "--layers", "0", "--steps-per-layer", "1")
    printed = capsys.readouterr().out
    assert "memory estimate of the layerwise phase: " in printed and " MiB per GPU = teacher " in printed, printed
    for module in (latent_cache, distill):  # where the memory checks read it
        monkeypatch.setattr(module, "free_bytes", lambda where, rt, disk_dir: 1000)
    for phase, advice in (("layerwise", "--latent-cache disk"), ("logits", "--kd-trainable decoders")):
        refused = tmp_path / phase
        args = ["--phase", "logits", "--init", teacher_dir, "--kd-trainable", "all"] if phase == "logits" else []
        error = run_tiny_distill(teacher_dir, tiny_data_dir, str(refused), *args, check=False)
        assert error.startswith(f"distill.py: the {phase} phase needs about ") and "\n" not in error, error
        assert f"; use {advice}" in error and error.endswith(" or a smaller --batch-size or --seq-len"), error
        assert not refused.exists()


def test_a_latent_cache_that_fits_nowhere_names_the_constants_that_size_it(monkeypatch):
    """common.latent_cache says the size and the places it tried; distill.py adds its constants that set the size."""
    import distill
    from common import latent_cache
    from common.config import override
    from common.runtime import Runtime

    monkeypatch.setattr(latent_cache, "free_bytes", lambda where, rt, disk_dir: 0)
    rt = Runtime("cpu", "float32")
    with pytest.raises(ValueError) as e:
        latent_cache.place_cache(rt, 1024, 64, "auto", ".")
    assert str(e.value) == "the latent cache needs 0.5 MiB per rank and fits in none of: device, host, disk"
    args = override(vars(distill), [])  # the defaults: LATENT_CACHE=auto
    run = distill.Run(args, rt, ".", distill.batch_numbers(args, 1))
    with pytest.raises(ValueError) as e:
        distill.place_latents(run, 1024, 64)
    assert str(e.value) == (
        "the latent cache needs 0.5 MiB per rank and fits in none of: device, host, disk; "
        "lower STEPS_PER_LAYER x GRAD_ACCUM x BATCH_SIZE x SEQ_LEN, or free memory/disk"
    )


def test_log_every_0_logs_the_loss_where_it_validates_or_saves_and_at_the_end(teacher_dir, tiny_data_dir, tmp_path):
    """LOG_EVERY=0 means what it means in train.py: a loss record only at a step that validates or saves, and at the
    last step (of each layer in a rotation, of the parallel schedule, of the logits phase)."""
    common = ["--teacher", teacher_dir, "--data-dir", tiny_data_dir, "--log-every", "0", "--calib-tokens", "0"]

    def loss_steps(out, phase, key="step"):
        records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        return [r[key] for r in records if r.get("phase") == phase and "loss" in r]

    rotation = str(tmp_path / "rotation")
    layers = ["--layers", "0,1", "--steps-per-layer", "5", "--val-every", "2"]
    run_distill(*TINY_DISTILL, *common, "--out-dir", rotation, *layers)
    assert loss_steps(rotation, "layerwise", "layer_step") == [2, 4, 5, 2, 4, 5]
    out = str(tmp_path / "parallel")
    parallel = ["--schedule", "parallel", "--steps-per-layer", "7", "--val-every", "2", "--save-every", "3"]
    run_distill(*TINY_DISTILL, *common, "--out-dir", out, *parallel)
    assert loss_steps(out, "layerwise") == [2, 3, 4, 6, 7]
    logits = ["--phase", "logits", "--kd-steps", "7", "--kd-val-every", "5", "--kd-save-every", "3"]
    run_distill(*TINY_DISTILL, *common, "--out-dir", out, *logits)
    assert loss_steps(out, "logits") == [3, 5, 6, 7]


def test_the_batch_numbers_are_computed_once_from_the_settings():
    import distill
    from common.config import override

    argv = ["--batch-size", "2", "--seq-len", "32", "--grad-accum", "3"]
    args = override(vars(distill), [*argv, "--calib-tokens", "1000"])
    assert distill.batch_numbers(args, 2) == distill.Batch(
        batch_tokens=64, tokens_per_step=384, calib_batches=8, calib_tokens=1024
    )
    assert distill.batch_numbers(override(vars(distill), [*argv, "--calib-tokens", "0"]), 1).calib_tokens == 0


def test_help_groups_the_constants_by_concern(capsys):
    """--help lists each constant under its source's section: the shared ones apart from each phase's own."""
    assert run_distill("--help", check=False) == "0"
    section, where = None, {}
    for line in capsys.readouterr().out.splitlines()[2:]:
        if line.startswith("  "):
            where[line.split()[0]] = section
        else:
            section = line
    assert where["--batch-size"] == where["--val-tokens"] == "data and batch (both phases):"
    assert where["--log-every"] == where["--keep-last"] == "logging and checkpoints (both phases):"
    assert where["--lr"] == where["--val-every"] == where["--save-every"] == "layer-wise phase:"
    assert where["--kd-lr"] == where["--kd-val-every"] == "logits phase:"
    assert where["--dtype"] == where["--seed"] == where["--parallel"] == where["--latent-cache"]
    assert where["--seed"].startswith("system")
