"""common/export.py: checkpoints as plain Hugging Face folders (loaded by transformers alone, equal logits,
model.generate), and one-line refusals for what no standard class expresses."""

import json
import os

import pytest
import torch

from common.checkpoint import load_model, save_checkpoint
from common.export import export_model
from common.export import main as export_main
from common.generate import generate
from common.students import make_student
from common.swap import get_block, set_block, student_specs
from conftest import make_model_folder
from families import FAMILIES, family_model


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_model_folder(str(tmp_path_factory.mktemp("export_teacher")), initializer_range=0.2)


def checkpoint(teacher_dir, folder, ffn=None, attn=None):
    """A distill-style run folder (run.json naming the teacher) with students swapped in: ffn and attn map
    layer -> (kind, kwargs). The students' new weights are moved off their initial values."""
    model = load_model(teacher_dir)
    torch.manual_seed(0)
    for target, students in (("mlp", ffn or {}), ("attn", attn or {})):
        for i, (kind, kwargs) in students.items():
            set_block(model, i, target, make_student(target, kind, get_block(model, i, target), model.config, **kwargs))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    os.makedirs(folder)
    with open(os.path.join(folder, "run.json"), "w") as f:
        json.dump({"run_id": "r1", "script": "distill.py", "config": {"TEACHER": teacher_dir}}, f)
    save_checkpoint(
        os.path.join(folder, "final"), model, meta={"script": "distill.py", "phase": "layerwise", "step": 7}
    )
    return os.path.join(folder, "final")


def run_export(*args):
    """export's main; returns its one-line exit message, or None when it wrote the folder."""
    try:
        export_main(list(args))
    except SystemExit as e:
        return str(e)


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize(
    "ffn, width",
    [
        ({i: ("pruned", {"scale": 0.5}) for i in range(3)}, 64),
        ({i: ("copy", {}) for i in (0, 2)}, 128),
        ({i: ("prototype", {"scale": 0.25, "gated": True, "activation": "silu"}) for i in range(3)}, 32),
    ],
)
def test_export_loads_with_plain_transformers(teacher_dir, tmp_path, ffn, width):
    from transformers import AutoModelForCausalLM

    ckpt = checkpoint(teacher_dir, str(tmp_path / "run"), ffn=ffn)
    out = str(tmp_path / "hf")
    assert run_export(ckpt, "--out", out, "--tokenizer", teacher_dir) is None
    assert not os.path.exists(os.path.join(out, "students.json"))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= set(
        os.listdir(out)
    )
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported).__module__.startswith("transformers.models.llama.")  # no code from this repo
    assert exported.config.intermediate_size == width and exported.config.hidden_act == "silu"
    ids = torch.randint(1, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    original = load_model(ckpt).eval()
    expected = logits(original, ids)
    assert expected.abs().max() > 1
    torch.testing.assert_close(logits(exported, ids), expected, rtol=0, atol=1e-5)  # fp32 rounding
    greedy = exported.generate(ids[:1, :8], max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(greedy, generate(original, ids[:1, :8], 10))
    card = open(os.path.join(out, "README.md")).read()
    assert ckpt in card and teacher_dir in card and '"step": 7' in card and f"width {width}" in card


def test_refusals_are_one_line_and_write_nothing(teacher_dir, tmp_path):
    pruned = {i: ("pruned", {"scale": 0.5}) for i in range(3)}
    cases = {
        "attention": (
            {},
            {0: ("lolcats", {}), 1: ("linear", {}), 2: ("delta", {})},
            "layers 0-2 have delta/linear/lolcats attention students",
        ),
        "widths": ({**pruned, 2: ("pruned", {"scale": 0.25})}, {}, "widths differ (layers 0-1: pruned FFN, width 64"),
        "kept teacher": ({0: ("pruned", {"scale": 0.5})}, {}, "layers 1-2: teacher FFN, width 128"),
        "ungated": ({i: ("prototype", {}) for i in range(3)}, {}, "layer 0: prototype FFN students (ungated"),
    }
    for name, (ffn, attn, message) in cases.items():
        ckpt = checkpoint(teacher_dir, str(tmp_path / name.replace(" ", "_")), ffn=ffn, attn=attn)
        error = run_export(ckpt, "--out", str(tmp_path / "out"), "--tokenizer", teacher_dir)
        assert error and message in error and "\n" not in error, (name, error)
        assert not os.path.exists(tmp_path / "out") and not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    ckpt = os.path.join(str(tmp_path / "widths"), "final")
    assert "already exists" in run_export(ckpt, "--out", teacher_dir)


def test_pad_to_widest_is_exact(teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ffn = {0: ("pruned", {"scale": 0.5}), 1: ("pruned", {"scale": 0.25})}  # layer 2 keeps the teacher's FFN
    ckpt = checkpoint(teacher_dir, str(tmp_path / "run"), ffn=ffn)
    assert "--pad-to-widest zero-pads them to 128" in run_export(ckpt, "--out", str(tmp_path / "hf"))
    report = {
        "val_tokens": 512,
        "models": ["teacher", "ckpt"],
        "results": [],  # as common.evaluate --out writes it
        "comparison": [{"metric": "val ppl", "unit": "ppl", "values": {"teacher": 10.0, "ckpt": 12.5}}],
    }
    (tmp_path / "eval.json").write_text(json.dumps(report))
    assert (
        run_export(
            ckpt,
            "--out",
            str(tmp_path / "hf"),
            "--pad-to-widest",
            "--tokenizer",
            teacher_dir,
            "--eval",
            str(tmp_path / "eval.json"),
        )
        is None
    )
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert exported.config.intermediate_size == 128
    ids = torch.randint(1, 320, (2, 40), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(exported, ids), logits(load_model(ckpt).eval(), ids), rtol=0, atol=1e-5)
    card = open(str(tmp_path / "hf" / "README.md")).read()
    assert "zero-padded to width 128" in card and "| val ppl | 10.00 | 12.50 | 1.25x |" in card


def pruned_family_model(family, layers=(0, 1), scale=0.5):
    """The family's tiny model (tests/families.py) with pruned FFN students in `layers`."""
    model = family_model(family)
    for i in layers:
        set_block(model, i, "mlp", make_student("mlp", "pruned", get_block(model, i, "mlp"), model.config, scale=scale))
    return model


def assert_reloads_with_equal_logits(folder, model):
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(exported) is type(model) and not student_specs(exported)
    ids = torch.randint(1, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    expected = logits(model, ids)
    assert (logits(exported, ids) - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_ffns_export_for_every_family(teacher_dir, tmp_path, family):
    """The width attribute is found per family (intermediate_size, GPT-2 n_inner, Falcon ffn_hidden_size,
    Qwen-MoE moe_intermediate_size): the export is the teacher's class at the students' width."""
    model = pruned_family_model(family)
    out = str(tmp_path / "hf")
    _, described = export_model(model, str(tmp_path / "ckpt"), out, teacher_dir)
    width = get_block(model, 0, "mlp").width
    assert f"layers 0-1: pruned FFN, width {width}" in described
    assert_reloads_with_equal_logits(out, model)


@pytest.mark.parametrize("family", ["phi3", "gpt2", "qwen3_moe"])
def test_pad_to_widest_pads_every_ffn_shape(teacher_dir, tmp_path, family):
    """A fused gate_up is padded half by half, a Conv1D along its input rows, experts one by one."""
    model = pruned_family_model(family, layers=[0])  # layer 1 keeps the teacher's FFN
    out = str(tmp_path / "hf")
    _, described = export_model(model, str(tmp_path / "ckpt"), out, teacher_dir, pad_to_widest=True)
    assert "zero-padded to width" in described
    assert_reloads_with_equal_logits(out, model)


@pytest.mark.parametrize("family", ["phi3", "gpt2", "qwen3_moe"])
def test_gated_prototypes_of_other_ffn_shapes_are_refused_in_one_line(teacher_dir, tmp_path, family):
    model = family_model(family)
    for i in range(2):
        kwargs = {"gated": True, "activation": "silu"}
        set_block(model, i, "mlp", make_student("mlp", "prototype", get_block(model, i, "mlp"), model.config, **kwargs))
    with pytest.raises(ValueError) as e:
        export_model(model, str(tmp_path / "ckpt"), str(tmp_path / "hf"), teacher_dir)
    assert str(e.value).startswith("layer 0: gated prototype FFN students map only to") and "\n" not in str(e.value)
    assert not os.listdir(tmp_path)


def test_a_run_finds_its_teacher_for_the_tokenizer(teacher_dir, tmp_path, capsys):
    """A checkpoint without tokenizer files in a run made with --teacher elsewhere: export, generate and evaluate take
    the tokenizer (and generation config) from the teacher its run.json names, not from models/smolllm2_135m."""
    import common.evaluate
    from common.config import override
    from common.evaluate import check_arguments
    from common.generate import main as generate_main

    ckpt = checkpoint(teacher_dir, str(tmp_path / "run"), ffn={i: ("pruned", {"scale": 0.5}) for i in range(3)})
    assert not [f for f in os.listdir(ckpt) if f.startswith("tokenizer")]
    out = tmp_path / "hf"
    assert run_export(ckpt, "--out", str(out)) is None
    assert {"tokenizer.json", "generation_config.json"} <= set(os.listdir(out))
    capsys.readouterr()
    generate_main([ckpt, "--prompt", "the cat", "--max-new-tokens", "3"])
    assert capsys.readouterr().out.startswith("the cat")
    assert check_arguments(override(vars(common.evaluate), ["--teacher", ""]), [ckpt], "usage") == teacher_dir
