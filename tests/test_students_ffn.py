"""FFN students on every family's FFN shape (tests/families.py: gated with separate or fused gate/up, plain
MLPs with Linear or Conv1D projections and biases, a mixture of experts): pruned, copy and prototype, built
and calibrated on random latents."""

import functools

import pytest
import torch

from common.students import make_student
from common.students.fit import linear_weight
from common.swap import get_block
from families import FAMILIES, family_model
from test_calibration import call, data, latents, no_reduce, rel_err

DENSE = [f for f in FAMILIES if f != "qwen3_moe"]


@functools.cache
def teacher(family):
    """Layer 0's FFN block of the family's tiny model, and the model's config."""
    model = family_model(family)
    return get_block(model, 0, "mlp").requires_grad_(False), model.config


def student(family, kind, **kwargs):
    block, config = teacher(family)
    torch.manual_seed(0)
    return make_student("mlp", kind, block, config, **kwargs)


def calibrated(family, kind, **kwargs):
    s, xs = student(family, kind, **kwargs), latents()
    with torch.no_grad():
        s.calibrate(teacher(family)[0], data(teacher(family)[0], xs), no_reduce, call)
    return s


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_at_full_scale_is_the_teacher(family):
    x = latents(n_batches=1)[0]
    with torch.no_grad():
        assert torch.equal(student(family, "pruned", scale=1.0)(x), teacher(family)[0](x))


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_state_dict_has_the_teacher_blocks_keys(family):
    s = student(family, "pruned", scale=0.5)
    assert list(s.state_dict()) == [f"block.{k}" for k in teacher(family)[0].state_dict()]


def test_pruned_checkpoints_of_the_old_llama_student_load():
    """The keys and shapes the Llama-only pruned student wrote (a fresh LlamaMLP of the narrow width under
    `block.`) load into today's, strictly."""
    s = student("llama", "pruned", scale=0.25)
    old = {f"block.{n}.weight": torch.randn(shape) for n, shape in [("gate_proj", (32, 64)), ("up_proj", (32, 64))]}
    old["block.down_proj.weight"] = torch.randn(64, 32)
    s.load_state_dict(old, strict=True)
    assert torch.equal(s.block.down_proj.weight, old["block.down_proj.weight"])


@pytest.mark.parametrize("family", DENSE)
def test_calibration_lowers_the_pruned_error(family):
    """Activation importance plus refit, against the data-blind student (weight importance, no refit), on
    held-out latents."""
    t, held_out = teacher(family)[0], latents(seed=2)
    blind = calibrated(family, "pruned", scale=0.5, importance="weight", refit=False)
    fitted = calibrated(family, "pruned", scale=0.5)
    assert rel_err(fitted, t, held_out) < 0.5 * rel_err(blind, t, held_out)


def test_pruned_mixture_of_experts_halves_each_expert_and_keeps_the_router():
    t = teacher("qwen3_moe")[0]
    s = student("qwen3_moe", "pruned", scale=0.5, importance="weight")
    assert s.block.gate is not t.gate and torch.equal(s.block.gate.weight, t.gate.weight)
    experts, full = s.block.experts, t.experts
    assert experts.gate_up_proj.shape == (4, 32, 64) and experts.down_proj.shape == (4, 64, 16)
    assert experts.intermediate_dim == 16 and full.intermediate_dim == 32
    gate, up = full.gate_up_proj.chunk(2, dim=1)
    importance = gate.norm(dim=2) * up.norm(dim=2) * full.down_proj.norm(dim=1)  # (experts, channels)
    for e, keep in enumerate(importance.topk(16, dim=1).indices.sort(dim=1).values):  # each expert its own
        assert torch.equal(experts.gate_up_proj[e], torch.cat([gate[e, keep], up[e, keep]]))
        assert torch.equal(experts.down_proj[e], full.down_proj[e][:, keep])
    held_out = latents(seed=2)
    by_activation = calibrated("qwen3_moe", "pruned", scale=0.5)  # the teacher's routing, hooked
    assert rel_err(by_activation, t, held_out) < rel_err(s, t, held_out)


@pytest.mark.parametrize("family", ["gpt2", "phi3", "qwen3_moe"])
def test_pruned_statistics_in_chunks_equal_one_shot(family):
    t, xs = teacher(family)[0], latents()
    chunked, whole = student(family, "pruned", scale=0.5), student(family, "pruned", scale=0.5)
    with torch.no_grad():
        chunked.calibrate(t, data(t, xs), no_reduce, call)
        whole.calibrate(t, data(t, [torch.cat(xs)]), no_reduce, call)
    for (name, a), b in zip(chunked.state_dict().items(), whole.state_dict().values()):
        # a batch's products are fp32 (output_statistics), so chunks round differently: within fp32 steps of
        # these random tiny blocks' ill-conditioned refits (condition numbers near 1e5)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_copy_is_the_teacher(family):
    x = latents(n_batches=1)[0]
    with torch.no_grad():
        assert torch.equal(student(family, "copy")(x), teacher(family)[0](x))


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_lowers_the_prototype_error(family):
    t, held_out = teacher(family)[0], latents(seed=2)
    before = rel_err(student(family, "prototype"), t, held_out)
    assert rel_err(calibrated(family, "prototype"), t, held_out) < 0.9 * before


@pytest.mark.parametrize(
    "kind,kwargs,message",
    [
        ("pruned", {"scale": 0}, "scale must be in (0, 1]"),
        ("pruned", {"scale": -1}, "scale must be in (0, 1]"),
        ("pruned", {"scale": 1.5}, "scale must be in (0, 1]"),
        ("pruned", {"scale": float("nan")}, "scale must be in (0, 1]"),
        ("pruned", {"importance": "random"}, "importance must be 'activation', 'weight' or 'obs'"),
        ("prototype", {"scale": 0}, "scale must be > 0"),
        ("prototype", {"scale": float("nan")}, "scale must be > 0"),
    ],
)
def test_bad_arguments_are_one_line(kind, kwargs, message):
    with pytest.raises(ValueError) as e:
        student("gpt2", kind, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_block_of_no_known_ffn_shape_is_refused_in_one_line():
    model = family_model("llama")
    with pytest.raises(ValueError, match=r"^LlamaAttention is no FFN of a known shape [^\n]*$"):
        make_student("mlp", "pruned", get_block(model, 0, "attn"), model.config)


@pytest.mark.parametrize("family,corrected", [("llama", False), ("gpt2", False), ("llama", True)])
def test_obs_removes_channels_as_a_brute_force_greedy_search_over_refits_does(family, corrected):
    """importance='obs' (common/students/ffn.py): each channel it removes is the one whose removal, with the output
    projection ridge-refit on the rest (and its bias, gpt2), leaves the least refit objective: checked against every
    candidate's refit solved directly, for the first removals, for the teacher's output as the target and for a
    corrected one (the teacher's output plus a drift to undo, LATENT_STREAM=corrected); and the student keeps the
    channels it did not remove, refit on them."""
    from common.students.ffn import _projection_input, ffn_layout, obs_importance, output_statistics

    t, config = teacher(family)
    xs, ridge = latents(n_batches=12), 1e-3
    drift = [0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(k)) for k, x in enumerate(xs)]
    batches = lambda targets=True: ((x, t(x) + (d if corrected else 0)) for x, d in zip(xs, drift))  # noqa: E731
    s = student(family, "pruned", scale=0.5, importance="obs", ridge=ridge)
    layout = ffn_layout(t, config.hidden_size)
    with torch.no_grad():
        rank = obs_importance(*output_statistics(t, layout, batches, no_reduce, call), layout.width, s.width, ridge)[0]
        a = torch.cat([_projection_input(t, layout.output, call, x).flatten(0, -2) for x in xs]).double()
        y = torch.cat([y.flatten(0, -2) for _, y in batches()]).double()
    a = torch.cat([a, torch.ones_like(a[:, :1])], 1) if getattr(t, layout.output).bias is not None else a
    lam = ridge * (a.T @ a).diagonal().mean()

    def fit(kept, lam=lam):  # argmin over W of ||y - a_kept W||^2 + lam ||W||^2, and that minimum
        ak = a[:, kept]
        w = torch.linalg.solve(ak.T @ ak + lam * torch.eye(len(kept), dtype=a.dtype), ak.T @ y)
        return w, ((y - ak @ w).square().sum() + lam * w.square().sum()).item()

    kept = list(range(a.shape[1]))
    for step in range(4):
        candidates = [j for j in kept if j < layout.width]
        best = min(candidates, key=lambda j: fit([k for k in kept if k != j])[1])
        assert rank[best] == step
        kept.remove(best)
    with torch.no_grad():
        s.calibrate(t, batches, no_reduce, call)
        seen = _projection_input(s.block, layout.output, call, xs[0])
    keep = (rank == layout.width).nonzero()[:, 0]
    torch.testing.assert_close(seen, _projection_input(t, layout.output, call, xs[0])[..., keep])
    rows = [*keep.tolist(), *range(layout.width, a.shape[1])]  # the refit: kept channels, bias last, its own ridge
    w, _ = fit(rows, ridge * (a[:, rows].T @ a[:, rows]).diagonal().mean())
    output = s.block.c_proj if family == "gpt2" else s.block.down_proj
    torch.testing.assert_close(linear_weight(output).double(), w[: len(keep)].T, rtol=1e-4, atol=1e-5)
    if output.bias is not None:
        torch.testing.assert_close(output.bias.double(), w[-1], rtol=1e-4, atol=1e-5)
