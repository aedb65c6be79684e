"""common/evaluate.py and common/generate.py on the tiny model: metrics, the CLI table and JSON, generation."""
import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import common.evaluate
import common.generate
from common.checkpoint import load_model, save_checkpoint
from common.decoders import get_block, make_student, set_block
from common.evaluate import evaluate, evaluate_models, main as evaluate_main, val_batches
from common.generate import generate, main as generate_main
from common.kd import final_hidden


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def batches(tiny_data_dir):
    return val_batches(tiny_data_dir, 1024, 4, 64)


@pytest.fixture(scope="module")
def student_dir(teacher, tmp_path_factory):
    """A distill-style checkpoint folder: layer 1's FFN replaced by a pruned student, no tokenizer."""
    model = copy.deepcopy(teacher)
    set_block(model, 1, "mlp", make_student("mlp", "pruned", get_block(model, 1, "mlp"), model.config, scale=0.25))
    folder = str(tmp_path_factory.mktemp("ckpt") / "final")
    save_checkpoint(folder, model, meta={"script": "test", "phase": "layerwise", "step": 0})
    return folder


def test_val_batches_are_the_first_tokens_every_time(tiny_data_dir, batches):
    assert len(batches) == 4 and batches[0][0].shape == (4, 64)
    assert torch.equal(batches[1][0], val_batches(tiny_data_dir, 1024, 4, 64)[1][0])
    assert torch.equal(batches[0][0].flatten()[1:], batches[0][1].flatten()[:-1])
    with pytest.raises(ValueError, match="less than one batch"):
        val_batches(tiny_data_dir, 100, 4, 64)


def test_teacher_against_itself(teacher, batches):
    m = evaluate(teacher, batches, teacher=teacher)
    assert abs(m["kl"]) <= 1e-6 and m["agreement"] == 1.0
    assert m["ce"] == m["teacher_ce"] and m["ppl"] == pytest.approx(torch.exp(torch.tensor(m["ce"])).item())
    with torch.no_grad():
        ce = sum(F.cross_entropy(teacher(x).logits.flatten(0, 1), y.flatten()).item() for x, y in batches) / len(batches)
    assert m["ce"] == pytest.approx(ce, rel=1e-5)


def test_perturbed_student_and_shared_backbone_teacher(teacher, student_dir, batches):
    student = load_model(student_dir)
    m = evaluate(student, batches, teacher=teacher)
    assert m["kl"] > 1e-4 and 0 < m["agreement"] < 1 and m["ce"] != m["teacher_ce"]
    # the teacher as a function sharing the student's head (the decoders-only logits phase) gives the same numbers
    same = evaluate(student, batches, teacher=lambda x: final_hidden(teacher, x))
    assert same == pytest.approx(m, rel=1e-6)
    results, t = evaluate_models({"a": student, "b": teacher}, batches, teacher)
    assert results["a"] == pytest.approx({k: m[k] for k in results["a"]}, rel=1e-6)
    assert results["b"]["kl"] <= 1e-6 and t["ce"] == pytest.approx(m["teacher_ce"], rel=1e-6)


def keep_constants(module, monkeypatch):
    """The CLI's overrides change the module's constants; restore them after the test."""
    for name in [n for n in vars(module) if n.isupper()]:
        monkeypatch.setattr(module, name, getattr(module, name))


def test_cli_prints_table_and_writes_json(tiny_model_dir, tiny_data_dir, student_dir, tmp_path, capsys, monkeypatch):
    keep_constants(common.evaluate, monkeypatch)
    out = tmp_path / "eval" / "results.json"
    evaluate_main([student_dir, tiny_model_dir, "--teacher", tiny_model_dir, "--data-dir", tiny_data_dir,
                   "--val-tokens", "600", "--batch-size", "2", "--seq-len", "64", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert "512 val tokens" in stdout and "KL to teacher" in stdout and student_dir in stdout
    rows = json.loads(out.read_text())["results"]
    assert [r["role"] for r in rows] == ["teacher", "checkpoint", "checkpoint"]
    assert rows[1]["kl"] > 1e-4 and abs(rows[2]["kl"]) <= 1e-6 and rows[2]["ce"] == pytest.approx(rows[0]["ce"])


def test_cli_bad_checkpoint_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        evaluate_main([str(tmp_path / "missing")])
    assert "missing: not a model or checkpoint folder" in str(e.value) and "\n" not in str(e.value)


def cli_error(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
    return e.value.code


def test_cli_truncated_weights_and_bad_lengths_are_one_line(student_dir, tiny_model_dir, tiny_data_dir, tmp_path,
                                                           monkeypatch):
    keep_constants(common.evaluate, monkeypatch)
    keep_constants(common.generate, monkeypatch)
    cut = shutil.copytree(student_dir, tmp_path / "cut")
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    message = f"{cut / 'model.safetensors'}: not a complete safetensors file"
    assert message in cli_error(evaluate_main, [str(cut), "--teacher", tiny_model_dir, "--data-dir", tiny_data_dir])
    assert message in cli_error(generate_main, [str(cut), "--tokenizer", tiny_model_dir])
    assert "--max-new-tokens must be at least 1, got -3" in \
        cli_error(generate_main, [student_dir, "--tokenizer", tiny_model_dir, "--max-new-tokens", "-3"])


def test_greedy_generation_is_the_step_by_step_argmax(teacher):
    ids = torch.tensor([[5, 17, 42, 9]])
    out = generate(teacher, ids, 12)
    assert out.shape == (1, 16) and torch.equal(out, generate(teacher, ids, 12))
    with torch.no_grad():
        logits = teacher(out).logits
    assert torch.equal(logits[0, 3:-1].argmax(-1), out[0, 4:])
    tiny_p = generate(teacher, ids, 12, temperature=1.0, top_p=1e-9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(tiny_p, out)
    sampled = [generate(teacher, ids, 12, 1.0, 0.9, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])


def test_generate_cli_from_checkpoint(student_dir, tiny_model_dir, capsys, monkeypatch):
    keep_constants(common.generate, monkeypatch)
    generate_main([student_dir, "--prompt", "the cat sat", "--max-new-tokens", "6", "--temperature", "0.8",
                   "--top-p", "0.9", "--seed", "1", "--tokenizer", tiny_model_dir])
    text = capsys.readouterr()
    assert text.out.startswith("the cat sat") and len(text.out.strip()) > len("the cat sat")
    assert "new tokens" in text.err
