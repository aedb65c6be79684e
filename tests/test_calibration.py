"""Student calibration: fp64 statistics over chunks, the closed-form fits, and how distill.py runs it."""

import json
import os

import pytest
import torch

from conftest import layer_rows, run_tiny_distill, tiny_config


def teacher_mlp(seed=0):
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(seed)
    mlp = LlamaMLP(tiny_config())
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return mlp.requires_grad_(False)


def latents(n_batches=6, seed=1, noise=0.1):
    """Structured latents: most variance in 8 fixed directions, as in a trained model's residual stream."""
    basis = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, 16, 8, generator=g) @ basis + noise * torch.randn(2, 16, 64, generator=g)
        for _ in range(n_batches)
    ]


def data(teacher, xs):
    return lambda targets=True: ((x, teacher(x) if targets else None) for x in xs)


def no_reduce(t):
    return t


def call(module, x):
    """How a layer calls its FFN block: module(x)."""
    return module(x)


def student(kind, teacher, **kwargs):
    from common.students import make_student

    torch.manual_seed(0)
    return make_student("mlp", kind, teacher, tiny_config(), **kwargs)


def rel_err(s, teacher, xs):
    with torch.no_grad():
        return sum((s(x) - teacher(x)).square().sum() for x in xs) / sum(teacher(x).square().sum() for x in xs)


@pytest.mark.parametrize("kind,kwargs", [("pruned", {"scale": 0.5}), ("prototype", {"scale": 0.5, "bias": True})])
def test_statistics_in_chunks_equal_one_shot(kind, kwargs):
    teacher, xs = teacher_mlp(), latents()
    chunked, whole = student(kind, teacher, **kwargs), student(kind, teacher, **kwargs)
    chunked.calibrate(teacher, data(teacher, xs), no_reduce, call)
    whole.calibrate(teacher, data(teacher, [torch.cat(xs)]), no_reduce, call)
    tol = 1e-4 if kind == "pruned" else 1e-6  # pruned: a batch's products are fp32 (common/students/ffn.py)
    for (name, a), b in zip(chunked.state_dict().items(), whole.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=10 * tol, atol=tol, msg=name)


def test_refit_solves_least_squares():
    """With ridge 0 the refit down projection is the least-squares solution on the kept channels."""
    teacher, xs = teacher_mlp(), latents()
    s = student("pruned", teacher, scale=0.5, ridge=0.0)
    s.calibrate(teacher, data(teacher, xs), no_reduce, call)
    x = torch.cat(xs).flatten(0, 1)
    a = (s.block.act_fn(s.block.gate_proj(x)) * s.block.up_proj(x)).double()
    want = torch.linalg.lstsq(a, teacher(x).double()).solution.T
    torch.testing.assert_close(s.block.down_proj.weight.double(), want, rtol=1e-4, atol=1e-5)


def test_activation_importance_keeps_the_channels_that_matter():
    """Channels with large weights that never fire on the data are dropped by activation importance
    (kept by weight norms): 8 channels whose gate and up rows are orthogonal to the data's span."""
    teacher, xs = teacher_mlp(), latents(noise=0.0)
    span = torch.linalg.qr(torch.cat(xs).flatten(0, 1).T).Q[:, :8]  # (64, 8): the data's directions
    silent = torch.linalg.qr(torch.randn(64, 16) - span @ (span.T @ torch.randn(64, 16))).Q[:, :16].T
    silent = silent - (silent @ span) @ span.T
    with torch.no_grad():
        teacher.gate_proj.weight[:8] = 5 * silent[:8] / silent[:8].norm(dim=1, keepdim=True)
        teacher.up_proj.weight[:8] = 5 * silent[8:] / silent[8:].norm(dim=1, keepdim=True)
    by_weight = student("pruned", teacher, scale=0.5, importance="weight", refit=False)
    by_activation = student("pruned", teacher, scale=0.5, refit=False)
    by_activation.calibrate(teacher, data(teacher, xs), no_reduce, call)

    def dropped(s):  # the student keeps none of the teacher's first 8 channels
        return not any(
            torch.allclose(row, teacher.gate_proj.weight[j]) for row in s.block.gate_proj.weight for j in range(8)
        )

    assert not dropped(by_weight) and dropped(by_activation)
    assert rel_err(by_activation, teacher, xs) < rel_err(by_weight, teacher, xs)


@pytest.mark.parametrize(
    "kind,kwargs",
    [
        ("pruned", {"scale": 0.5}),
        ("pruned", {"scale": 0.5, "importance": "weight"}),
        ("prototype", {"scale": 1.0}),
        ("prototype", {"gated": True}),
    ],
)
def test_calibration_lowers_held_out_error(kind, kwargs):
    teacher, xs, held_out = teacher_mlp(), latents(), latents(seed=2)
    s = student(kind, teacher, **kwargs)
    before = rel_err(s, teacher, held_out)
    s.calibrate(teacher, data(teacher, xs), no_reduce, call)
    assert rel_err(s, teacher, held_out) < 0.8 * before


def test_weight_importance_without_refit_is_todays_student():
    """importance='weight', refit=False: the channel choice and weights of the pre-calibration
    student, before and after calibrate()."""
    teacher, xs = teacher_mlp(), latents()
    g, u, d = teacher.gate_proj.weight, teacher.up_proj.weight, teacher.down_proj.weight
    keep = (g.norm(dim=1) * u.norm(dim=1) * d.norm(dim=0)).topk(64).indices.sort().values
    s = student("pruned", teacher, scale=0.5, importance="weight", refit=False)
    s.calibrate(teacher, data(teacher, xs), no_reduce, call)
    assert torch.equal(s.block.gate_proj.weight, g[keep]) and torch.equal(s.block.up_proj.weight, u[keep])
    assert torch.equal(s.block.down_proj.weight, d[:, keep])


def test_linear_attention_calibration_lowers_error():
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    from common.students import make_student

    config = tiny_config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    teacher = LlamaAttention(config, 0).requires_grad_(False)
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.2)
    xs, held_out = latents(), latents(seed=2)
    pe = LlamaRotaryEmbedding(config)(xs[0], torch.arange(16)[None])

    def run(block, x):
        return block(x, position_embeddings=pe, attention_mask=None)[0]

    def error(s):
        with torch.no_grad():
            return sum((run(s, x) - run(teacher, x)).square().sum() for x in held_out) / sum(
                run(teacher, x).square().sum() for x in held_out
            )

    s = make_student("attn", "linear", teacher, config)
    before = error(s)
    with torch.no_grad():
        s.calibrate(
            teacher, lambda targets=True: ((x, run(teacher, x) if targets else None) for x in xs), no_reduce, run
        )
    assert error(s) < before


TINY_RUN = ["--steps-per-layer", "2", "--calib-tokens", "2048", "--lr", "1e-3"]


@pytest.mark.parametrize("kind,kwargs", [("pruned", '{"scale": 0.5}'), ("prototype", "{}")])
def test_distill_logs_calibration_and_it_helps(teacher_dir, tiny_data_dir, tmp_path, kind, kwargs):
    out = str(tmp_path / "run")
    run_tiny_distill(teacher_dir, tiny_data_dir, out, "--student-kind", kind, "--student-kwargs", kwargs, *TINY_RUN)
    rows = layer_rows(out)
    assert len(rows) == 3 and all(r["calib_rel_err"] < r["start_rel_err"] for r in rows)


def test_student_stream_feeds_later_layers_the_students_output(teacher_dir, tiny_data_dir, tmp_path):
    """Layer 0's error is the same for both streams; later layers see other latents."""
    rows = {}
    for stream in ("teacher", "student"):
        out = str(tmp_path / stream)
        run_tiny_distill(
            teacher_dir,
            tiny_data_dir,
            out,
            "--student-kind",
            "pruned",
            "--student-kwargs",
            '{"scale": 0.5}',
            "--latent-stream",
            stream,
            *TINY_RUN,
        )
        rows[stream] = layer_rows(out)
    assert rows["teacher"][0]["calib_rel_err"] == rows["student"][0]["calib_rel_err"]
    assert rows["teacher"][1]["start_rel_err"] != rows["student"][1]["start_rel_err"]


@pytest.mark.parametrize(
    "target,kind,schedule,stream",
    [
        ("mlp", "pruned", "rotation", "corrected"),
        ("mlp", "pruned", "parallel", "teacher"),
        ("attn", "linear", "rotation", "teacher"),
    ],
)
def test_the_default_latent_stream_is_corrected_in_ffn_rotations(
    teacher_dir, tiny_data_dir, tmp_path, target, kind, schedule, stream
):
    """LATENT_STREAM=auto resolves by target and schedule, and the run records the resolved value."""
    out = str(tmp_path / "run")
    args = ["--target", target, "--student-kind", kind, "--schedule", schedule]
    run_tiny_distill(teacher_dir, tiny_data_dir, out, *args, *TINY_RUN)
    with open(os.path.join(out, "config_layerwise.json")) as f:
        assert json.load(f)["config"]["LATENT_STREAM"] == stream


def test_parallel_schedule_calibrates(teacher_dir, tiny_data_dir, tmp_path):
    out = str(tmp_path / "run")
    run_tiny_distill(
        teacher_dir,
        tiny_data_dir,
        out,
        "--student-kind",
        "pruned",
        "--student-kwargs",
        '{"scale": 0.5}',
        "--schedule",
        "parallel",
        *TINY_RUN,
    )
    assert all(r["calib_rel_err"] < r["start_rel_err"] for r in layer_rows(out))


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--student-kind", "pruned", "--student-kwargs", '{"importance": "random"}'],
            "importance must be 'activation', 'weight' or 'obs'",
        ),
        (["--student-kind", "pruned", "--student-kwargs", '{"ridge": -1}'], "ridge must be >= 0"),
        (["--calib-tokens", "-5"], "CALIB_TOKENS must be >= 0"),
        (["--calib-tokens", "10000000"], "is more than the 40,000 tokens of"),
        (["--latent-stream", "both"], "LATENT_STREAM must be auto, teacher, student or corrected"),
        (["--latent-stream", "corrected", "--schedule", "parallel"], "LATENT_STREAM=corrected keeps the teacher's"),
    ],
)
def test_bad_calibration_arguments_are_one_line(teacher_dir, tiny_data_dir, tmp_path, args, message):
    error = run_tiny_distill(teacher_dir, tiny_data_dir, str(tmp_path / "r"), *args, check=False)
    assert error is not None and message in error and "\n" not in error, error
