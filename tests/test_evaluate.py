"""common/quality.py, common/evaluate.py and common/generate.py on the tiny model: metrics, the CLI table and JSON,
generation."""

import copy
import json
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from common.checkpoint import load_model, save_checkpoint
from common.evaluate import main as evaluate_main
from common.generate import generate
from common.generate import main as generate_main
from common.kd import final_hidden
from common.quality import evaluate, evaluate_models
from common.shards import val_batches
from common.students import make_student
from common.swap import get_block, set_block


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
        ce = sum(F.cross_entropy(teacher(x).logits.flatten(0, 1), y.flatten()).item() for x, y in batches) / len(
            batches
        )
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


def test_cli_prints_table_and_writes_json(tiny_model_dir, tiny_data_dir, student_dir, tmp_path, capsys):
    out = tmp_path / "eval" / "results.json"
    evaluate_main(
        [
            student_dir,
            tiny_model_dir,
            "--teacher",
            tiny_model_dir,
            "--data-dir",
            tiny_data_dir,
            "--val-tokens",
            "600",
            "--batch-size",
            "2",
            "--seq-len",
            "64",
            "--out",
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    assert "512 val tokens" in stdout and "KL to teacher" in stdout and student_dir in stdout
    rows = json.loads(out.read_text())["results"]
    assert [r["role"] for r in rows] == ["teacher", "checkpoint", "checkpoint"]
    assert rows[1]["kl"] > 1e-4 and abs(rows[2]["kl"]) <= 1e-6 and rows[2]["ce"] == pytest.approx(rows[0]["ce"])


def test_cli_bad_checkpoint_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        evaluate_main([str(tmp_path / "missing")])
    assert "missing: no config.json, so not a model or checkpoint folder" in str(e.value) and "\n" not in str(e.value)


def cli_error(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
    return e.value.code


def test_cli_truncated_weights_and_bad_lengths_are_one_line(student_dir, tiny_model_dir, tiny_data_dir, tmp_path):
    cut = shutil.copytree(student_dir, tmp_path / "cut")
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    message = f"{cut / 'model.safetensors'}: not a complete safetensors file"
    assert message in cli_error(evaluate_main, [str(cut), "--teacher", tiny_model_dir, "--data-dir", tiny_data_dir])
    assert message in cli_error(generate_main, [str(cut), "--tokenizer", tiny_model_dir])
    assert "--max-new-tokens must be at least 1, got -3" in cli_error(
        generate_main, [student_dir, "--tokenizer", tiny_model_dir, "--max-new-tokens", "-3"]
    )


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


def test_generate_cli_from_checkpoint(student_dir, tiny_model_dir, capsys):
    generate_main(
        [
            student_dir,
            "--prompt",
            "the cat sat",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            "1",
            "--tokenizer",
            tiny_model_dir,
        ]
    )
    text = capsys.readouterr()
    assert text.out.startswith("the cat sat") and len(text.out.strip()) > len("the cat sat")
    assert "new tokens" in text.err


# --- --speed and --tasks: the comparison table ---------------------------------------------------

MC_DOCS = [
    {"context": "the cat sat on a", "choices": ["mat", "sea", "park"], "label": 0},
    {"context": "water flows down hills into", "choices": ["birds", "rivers", "the"], "label": 1},
    {"context": "the dog ran to the", "choices": ["sun", "trees", "park"], "label": 2},
    {"context": "birds sang in", "choices": ["trees", "water", "a"], "label": 0},
    {"context": "rivers that reach the", "choices": ["cat", "sea", "dog"], "label": 1},
    {"context": "under a bright", "choices": ["mat", "hills", "sun"], "label": 2},
]


def write_mc_task(folder):
    """A multiple-choice lm-eval task of our own, from a local JSON-lines file: no hub, no network."""
    folder.mkdir()
    (folder / "tiny_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'tiny_mc.jsonl'}\n  cache_dir: {folder / 'cache'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n"
    )


@torch.no_grad()
def direct_accuracy(model, tokenizer, docs):
    """The task's accuracy computed here: the choice with the highest log-likelihood after its context
    (' ' + choice, its tokens split off the tokenized whole as lm_eval does) must be the label."""
    correct = 0
    for d in docs:
        n_ctx = len(tokenizer(d["context"])["input_ids"])
        scores = []
        for choice in d["choices"]:
            whole = tokenizer(d["context"] + " " + choice)["input_ids"]
            logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logp[j - 1, whole[j]].item() for j in range(n_ctx, len(whole))))
        correct += max(range(len(scores)), key=scores.__getitem__) == d["label"]
    return correct / len(docs)


def test_cli_speed_and_local_lm_eval_task(tiny_model_dir, tiny_data_dir, teacher, tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = copy.deepcopy(teacher)  # linear attention in layer 0, a window in layer 1, pruned FFNs everywhere
    set_block(model, 0, "attn", make_student("attn", "linear", get_block(model, 0, "attn"), model.config))
    set_block(model, 1, "attn", make_student("attn", "window", get_block(model, 1, "attn"), model.config, window=8))
    for i in range(3):
        set_block(model, i, "mlp", make_student("mlp", "pruned", get_block(model, i, "mlp"), model.config, scale=0.5))
    ckpt = str(tmp_path / "hybrid")
    save_checkpoint(ckpt, model, meta={"script": "test", "phase": "layerwise", "step": 0})
    write_mc_task(tmp_path / "tasks")
    out = tmp_path / "eval" / "report.json"
    evaluate_main(
        [
            ckpt,
            "--teacher",
            tiny_model_dir,
            "--data-dir",
            tiny_data_dir,
            "--val-tokens",
            "256",
            "--batch-size",
            "2",
            "--seq-len",
            "64",
            "--speed",
            "--contexts",
            "24,48",
            "--decode-steps",
            "4",
            "--tasks",
            "tiny_mc",
            "--task-dir",
            str(tmp_path / "tasks"),
            "--limit",
            "0",
            "--out",
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    assert "decode tok/s @48" in stdout and "tiny_mc (acc)" in stdout and "mean task ratio" in stdout
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # parameters: the blocks add up, the pruned FFNs hold half the teacher's
    params = report["parameters"]
    assert params["teacher"]["total"] == sum(p.numel() for p in teacher.parameters())
    assert sum(v for k, v in params[ckpt].items() if k != "total") == params[ckpt]["total"]
    assert params[ckpt]["ffn"] == params["teacher"]["ffn"] // 2
    # decoding state, measured from the caches: the teacher's KV cache doubles with the context; the hybrid
    # keeps KV only in layer 2 (teacher) and layer 1 (bounded by its window: 8 + 4 sinks - 1 slots, plus
    # their positions), and layer 0's recurrent state has one size at every context
    speed = {(r["model"], r["context"]): r for r in report["speed"]}
    assert set(speed) == {(m, n) for m in ("teacher", ckpt) for n in (24, 48)}
    kv_token = 2 * 4 * teacher.config.num_key_value_heads * get_block(teacher, 0, "attn").head_dim
    assert [speed["teacher", n]["kv_bytes"] for n in (24, 48)] == [3 * 24 * kv_token, 3 * 48 * kv_token]
    assert [speed[ckpt, n]["kv_bytes"] for n in (24, 48)] == [(n + 11) * kv_token + 11 * 8 for n in (24, 48)]
    heads = teacher.config.num_attention_heads
    assert speed[ckpt, 24]["recurrent_bytes"] == speed[ckpt, 48]["recurrent_bytes"] == 4 * heads * 16 * 16
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in report["speed"])
    # lm-eval on the loaded models: the accuracies are the ones computed directly, for the teacher and the hybrid
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    task_row = next(r for r in report["comparison"] if r["metric"] == "tiny_mc (acc)")
    assert task_row["values"] == {
        "teacher": direct_accuracy(teacher, tokenizer, MC_DOCS),
        ckpt: direct_accuracy(load_model(ckpt).eval(), tokenizer, MC_DOCS),
    }


def test_tasks_without_lm_eval_is_one_line(tiny_model_dir, tiny_data_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the package were not installed
    with pytest.raises(SystemExit) as e:
        evaluate_main(
            [
                "--teacher",
                tiny_model_dir,
                "--data-dir",
                tiny_data_dir,
                "--val-tokens",
                "128",
                "--batch-size",
                "2",
                "--seq-len",
                "64",
                "--tasks",
                "hellaswag",
            ]
        )
    assert "pip install lm_eval" in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_values_and_folders_are_one_line_before_loading(student_dir, tiny_model_dir, tiny_data_dir, tmp_path):
    import common.export

    data = ["--teacher", tiny_model_dir, "--data-dir", tiny_data_dir]
    for argv, message in (
        ([student_dir, *data, "--batch-size", "0"], "BATCH_SIZE must be >= 1, got 0"),
        ([student_dir, *data, "--seq-len", "-1"], "SEQ_LEN must be >= 1, got -1"),
        (
            [student_dir, *data, "--out", str(tmp_path)],
            f"--out {tmp_path} is a folder; give the JSON file to write, such as {tmp_path / 'eval.json'}",
        ),
        ([student_dir, *data, "--out", f"{student_dir}/config.json/eval.json"], "config.json is a file, not a folder"),
    ):
        assert message in cli_error(evaluate_main, argv)
    error = cli_error(common.export.main, [student_dir, "--out", str(tmp_path / "x"), "--check-tokens", "0"])
    assert "CHECK_TOKENS must be >= 1, got 0" in error
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    (broken / "config.json").write_text('{"model_type": "llama", ')
    assert f"{broken}: cannot load its tokenizer: " in cli_error(generate_main, [str(broken)])
    assert f"{broken / 'config.json'}: unreadable (not JSON" in cli_error(
        evaluate_main, [str(broken), "--teacher", "", "--data-dir", tiny_data_dir]
    )
