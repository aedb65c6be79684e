"""prepare.py end to end, offline: local .jsonl/.parquet/.txt through the datasets streaming path, a tiny model
folder, shards checked by a reader written only from the README's format, resume after Ctrl-C and kill, bad inputs."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import ROOT, make_text

PREPARE = os.path.join(ROOT, "prepare.py")
DOCS = make_text(3000, seed=3)  # ~690 kB of text, ~230k tokens with the tiny tokenizer
SIZES = ["--val-bytes", "50000", "--shard-tokens", "5000"]  # ~50 shards: room to interrupt a run between them


def prepare(*args, cwd=ROOT, env=None):
    return subprocess.run(
        [sys.executable, PREPARE, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def fails(result, *phrases):
    """A bad-input run: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout
    err = "\n".join(line for line in result.stderr.splitlines() if line.strip() and not line.startswith("tokenizing"))
    assert "Traceback" not in err and len(err.splitlines()) == 1, result.stderr
    for phrase in phrases:
        assert phrase in err, err
    return err


def read_shard_independently(path):
    """The README's format and nothing else: 256 int32 header (magic, version, ntok), then ntok uint16."""
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[0] == 20240520 and header[1] == 1, path
    tokens = np.fromfile(path, dtype="<u2", offset=1024)
    assert tokens.size == header[2], path
    return tokens


def file_hashes(folder):
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in os.listdir(folder)}


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir  # used in place (--model-dir is --model) it is never written to


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    records = [{"text": d, "id": i} for i, d in enumerate(DOCS)]
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", records)


@pytest.fixture(scope="module")
def reference(model, corpus, tmp_path_factory):
    """An uninterrupted run; the model is copied into its own --model-dir."""
    base = tmp_path_factory.mktemp("reference")
    result = prepare(
        "--model",
        model,
        "--model-dir",
        base / "model",
        "--dataset",
        corpus,
        "--out-dir",
        base / "data",
        "--workers",
        2,
        *SIZES,
    )
    assert result.returncode == 0, result.stderr
    return base


def split_documents(data_dir, tokenizer, split):
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    eot = manifest["tokenizer"]["eos_id"]
    docs = []
    for shard in manifest["splits"][split]["shards"]:
        tokens = read_shard_independently(os.path.join(data_dir, shard["file"]))
        assert tokens[0] == eot and shard["ntok"] <= manifest["settings"]["shard_tokens"]  # whole documents
        cuts = np.flatnonzero(tokens == eot)
        docs += [tokenizer.decode(tokens[a + 1 : b].tolist()) for a, b in zip(cuts, list(cuts[1:]) + [len(tokens)])]
    return docs


def test_prepare_offline_jsonl(reference, corpus, model):
    data = reference / "data"
    manifest = json.load(open(data / "manifest.json"))
    tokenizer = Tokenizer.from_file(str(reference / "model" / "tokenizer.json"))
    assert file_hashes(reference / "model")["model.safetensors"] == file_hashes(model)["model.safetensors"]
    # every shard: the manifest's sha256, size and token count match the file
    for split in ("train", "val"):
        info = manifest["splits"][split]
        assert info["tokens"] == sum(s["ntok"] for s in info["shards"])
        for s in info["shards"]:
            path = data / s["file"]
            assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert s["bytes"] == path.stat().st_size == 1024 + 2 * s["ntok"]
    assert len(manifest["splits"]["train"]["shards"]) > 30
    # the shards hold exactly the documents, in stream order, val first: train and val share none
    val, train = split_documents(data, tokenizer, "val"), split_documents(data, tokenizer, "train")
    assert val + train == DOCS and set(val).isdisjoint(train)
    assert manifest["splits"]["val"]["documents"] == len(val) and manifest["splits"]["train"]["documents"] == len(train)
    assert manifest["splits"]["val"]["text_bytes"] == sum(len(d.encode()) for d in val) >= 50000
    assert manifest["tokenizer"]["eos_token"] == "<|endoftext|>" and manifest["tokenizer"]["eos_id"] == 0
    assert manifest["source"]["files"] == [str(corpus)]
    check = subprocess.run(
        [sys.executable, "-m", "common.shards", "verify", str(data)], cwd=ROOT, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    again = prepare(
        "--model", model, "--model-dir", reference / "model", "--dataset", corpus, "--out-dir", data, *SIZES
    )  # a finished run is left alone
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr


@pytest.mark.parametrize("kind", ["parquet", "txt"])
def test_prepare_parquet_and_txt_through_the_same_path(kind, model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = DOCS[:300]
    if kind == "parquet":
        pq.write_table(pa.table({"text": docs[:150]}), tmp_path / "a.parquet")
        pq.write_table(pa.table({"text": docs[150:]}), tmp_path / "b.parquet")
        source = tmp_path / "*.parquet"
    else:  # a .txt file is one document; a folder is read in sorted order
        os.makedirs(tmp_path / "txt")
        for i, d in enumerate(docs):
            (tmp_path / "txt" / f"doc_{i:04d}.txt").write_text(d)
        source = tmp_path / "txt"
    result = prepare(
        "--model",
        model,
        "--model-dir",
        model,
        "--dataset",
        source,
        "--out-dir",
        tmp_path / "data",
        "--val-bytes",
        5000,
        "--workers",
        1,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"^time: start-up [\d.]+ s; then [\d.]+ s in which this process read the stream for [\d.]+ s, "
        r"wrote shards for [\d.]+ s .* 1 workers tokenized for [\d.]+ s \(\d+% busy\); limited by ",
        result.stdout,
        re.M,
    ), result.stdout
    tokenizer = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    data = tmp_path / "data"
    assert split_documents(data, tokenizer, "val") + split_documents(data, tokenizer, "train") == docs


def wait_for_shards(proc, progress, count, timeout=120):
    """Block until progress.json lists `count` finished shards (the run must still be going)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "prepare.py finished before it could be interrupted"
        try:
            if sum(len(s["shards"]) for s in json.load(open(progress))["splits"].values()) >= count:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    raise AssertionError("no progress")


def test_resume_after_ctrl_c_and_kill_is_byte_identical(reference, model, corpus, tmp_path):
    """Interrupted twice, with another worker count and task size: the same bytes as the reference run."""
    args = [
        sys.executable,
        PREPARE,
        "--model",
        model,
        "--model-dir",
        reference / "model",
        "--dataset",
        corpus,
        "--out-dir",
        tmp_path,
        "--workers",
        1,
        "--task-bytes",
        4096,
        *SIZES,
    ]
    args = list(map(str, args))
    progress = tmp_path / "progress.json"
    # Ctrl-C's SIGINT, even where this test runs in a background job (which starts with SIGINT ignored)
    sigint = dict(
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    proc = subprocess.Popen(args, **sigint)
    wait_for_shards(proc, progress, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    assert proc.returncode == 130 and "re-run the same command to resume" in err, err
    done = json.load(open(progress))
    kept = {s["file"]: s["sha256"] for v in done["splits"].values() for s in v["shards"]}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_shards(proc, progress, len(kept) + 2)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.communicate()
    after_kill = file_hashes(tmp_path)
    assert all(after_kill[f] == h for f, h in kept.items())  # finished shards were not redone
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0 and "resuming" in result.stdout, result.stderr
    assert file_hashes(tmp_path) == file_hashes(reference / "data")  # shards and manifest, byte for byte


@pytest.mark.parametrize(
    "records,phrases",
    [
        ([{"text": "fine"}, {"text": ""}], ["document 1", "empty 'text'"]),
        ([{"text": "fine"}, {"text": None}], ["document 1", "not a string"]),
        ([{"body": "no text field"}], ["no 'text' field", "fields: body", "--text-field"]),
    ],
)
def test_bad_documents_are_refused_and_nothing_is_written(records, phrases, model, tmp_path):
    source = write_jsonl(tmp_path / "bad.jsonl", records)
    fails(prepare("--model", model, "--model-dir", model, "--dataset", source, "--out-dir", tmp_path / "out"), *phrases)
    assert not os.path.exists(tmp_path / "out")


def test_unreadable_files_are_named(model, tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n')
    err = fails(
        prepare(
            "--model",
            model,
            "--model-dir",
            model,
            "--dataset",
            tmp_path / "broken.jsonl",
            "--out-dir",
            tmp_path / "out",
        ),
        "cannot read",
    )
    assert "broken.jsonl" in err
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file")
    err = fails(
        prepare(
            "--model",
            model,
            "--model-dir",
            model,
            "--dataset",
            tmp_path / "junk.parquet",
            "--out-dir",
            tmp_path / "out",
        ),
        "junk.parquet",
    )
    assert not os.path.exists(tmp_path / "out")
    os.symlink(tmp_path / "gone.txt", tmp_path / "dangling.txt")
    fails(
        prepare(
            "--model",
            model,
            "--model-dir",
            model,
            "--dataset",
            tmp_path / "dangling.txt",
            "--out-dir",
            tmp_path / "out",
        ),
        "dangling.txt",
        "cannot read",
    )


def test_tokenizer_beyond_uint16_is_refused_before_writing(model, tmp_path, corpus):
    from tokenizers import models

    big = tmp_path / "big_vocab_model"
    os.makedirs(big)
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(model, name), big / name)
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(70000)}, unk_token="w0")).save(str(big / "tokenizer.json"))
    fails(
        prepare("--model", big, "--model-dir", big, "--dataset", corpus, "--out-dir", tmp_path / "out"),
        "69,999",
        "65,535",
    )
    assert not os.path.exists(tmp_path / "out")


def test_damaged_shards_are_redone_by_the_same_command(reference, model, corpus, tmp_path):
    """verify's advice holds: after a flipped byte (or a lost shard), the command that wrote the folder re-hashes
    every shard and redoes the damaged ones, and the folder is byte-identical to a clean run again."""
    data = shutil.copytree(reference / "data", tmp_path / "data")
    flipped = data / "train_000010.bin"
    body = bytearray(flipped.read_bytes())
    body[2000] ^= 1
    flipped.write_bytes(bytes(body))
    os.remove(data / "train_000020.bin")
    check = subprocess.run(
        [sys.executable, "-m", "common.shards", "verify", str(data)], cwd=ROOT, capture_output=True, text=True
    )
    assert check.returncode == 1 and "re-run the prepare.py command that wrote them" in check.stderr
    older = shutil.copytree(data, tmp_path / "older")  # as an older prepare.py wrote it: no per-shard counts
    manifest = json.loads((older / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["documents"], shard["text_bytes"]
    (older / "manifest.json").write_text(json.dumps(manifest))

    def same_command(out):
        return prepare(
            "--model", model, "--model-dir", reference / "model", "--dataset", corpus, "--out-dir", out, *SIZES
        )

    fails(same_command(older), f"delete {older} and run again")
    result = same_command(data)
    assert result.returncode == 0, result.stderr
    assert (
        f"{flipped}: differs from its recorded size or sha256 (and 1 more); redoing the train shards from 10 on"
        in result.stdout
    )
    assert file_hashes(data) == file_hashes(reference / "data")
    assert "already complete; every shard matches its sha256" in same_command(data).stdout


def test_damaged_tokenizer_is_refused_before_the_model_folder_is_written(model, corpus, tmp_path):
    source = shutil.copytree(model, tmp_path / "source")
    (source / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    fails(
        prepare(
            "--model", source, "--model-dir", tmp_path / "model", "--dataset", corpus, "--out-dir", tmp_path / "out"
        ),
        f"{source}: its tokenizer does not load",
    )
    assert sorted(os.listdir(tmp_path)) == ["source"]  # no model folder, no .partial, no data


def test_undecodable_txt_is_named(model, tmp_path):
    os.makedirs(tmp_path / "txt")
    (tmp_path / "txt" / "a.txt").write_text("a fine document. " * 20)
    (tmp_path / "txt" / "b.txt").write_bytes(b"caf\xe9 in Latin-1, not UTF-8")
    (tmp_path / "txt" / "c.txt").write_text("another fine document. " * 20)
    fails(
        prepare(
            "--model",
            model,
            "--model-dir",
            model,
            "--dataset",
            tmp_path / "txt",
            "--out-dir",
            tmp_path / "out",
            "--val-bytes",
            10,
        ),
        f"{tmp_path / 'txt' / 'b.txt'}: not UTF-8 text (invalid continuation byte",
    )
    assert not os.path.exists(tmp_path / "out")


def test_out_dir_of_a_different_run_is_refused_untouched(reference, corpus, tmp_path):
    before = file_hashes(reference / "data")
    fails(
        prepare(
            "--model",
            reference / "model",
            "--model-dir",
            reference / "model",
            "--dataset",
            corpus,
            "--out-dir",
            reference / "data",
            "--val-bytes",
            60000,
            "--shard-tokens",
            5000,
        ),
        "different run",
        "settings.val_bytes: 50000 -> 60000",
    )
    stray = tmp_path / "stray"
    os.makedirs(stray)
    (stray / "train_000000.bin").write_bytes(b"x")
    fails(
        prepare(
            "--model", reference / "model", "--model-dir", reference / "model", "--dataset", corpus, "--out-dir", stray
        ),
        "different run",
    )
    assert file_hashes(reference / "data") == before and os.listdir(stray) == ["train_000000.bin"]


def test_hub_unreachable_names_the_offline_options(tmp_path):
    err = fails(prepare("--smoke-test", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"}), "cannot reach the Hugging Face hub")
    assert "--model" in err and "--dataset" in err and ".gguf" in err
    assert os.listdir(tmp_path) == []


def test_the_model_folder_is_one_folder_however_it_is_spelled(reference, model, corpus, tmp_path):
    """models/x, models/x/ and the absolute path name one folder: the finished data is not "of a different run"."""
    data = shutil.copytree(reference / "data", tmp_path / "data")
    result = prepare(
        "--model", model, "--model-dir", "model/", "--dataset", corpus, "--out-dir", data, *SIZES, cwd=reference
    )
    assert result.returncode == 0 and "already complete" in result.stdout, result.stderr


def test_a_complete_folder_loses_the_temp_files_of_a_killed_run(reference, model, corpus, tmp_path):
    data = shutil.copytree(reference / "data", tmp_path / "data")
    for name in ("train_000031.bin.tmp4242", "progress.json.tmp4242", "manifest.json.tmp77"):
        (data / name).write_bytes(b"torn")
    result = prepare(
        "--model", model, "--model-dir", reference / "model", "--dataset", corpus, "--out-dir", data, *SIZES
    )
    assert result.returncode == 0 and "already complete" in result.stdout, result.stderr
    assert file_hashes(data) == file_hashes(reference / "data")


def test_an_out_dir_that_cannot_be_written_and_a_damaged_marker_are_one_line(model, corpus, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "data"):  # found before the text is tokenized
        fails(
            prepare("--model", model, "--model-dir", model, "--dataset", corpus, "--out-dir", out),
            f"--out-dir {out}: {tmp_path / 'a_file'} is a file, not a folder; choose another --out-dir",
        )
    copy = shutil.copytree(model, tmp_path / "model")
    (copy / "prepare_source.json").write_text('{"model": ')
    fails(
        prepare("--model", model, "--model-dir", copy, "--dataset", corpus, "--out-dir", tmp_path / "out"),
        f"{copy / 'prepare_source.json'}: unreadable (not JSON",
        f"delete {copy} and run again",
    )
    assert not os.path.exists(tmp_path / "out")


def test_a_full_disk_is_one_line(model, corpus, tmp_path):
    full = (
        "import errno, runpy, sys\nimport common.shards\n"
        "def full(*args, **kwargs):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "common.shards.write_shard = full\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    out = tmp_path / "out"
    args = ["--model", model, "--model-dir", model, "--dataset", corpus, "--out-dir", out, *SIZES]
    result = subprocess.run(
        [sys.executable, "-c", full, PREPARE, *map(str, args)], cwd=ROOT, capture_output=True, text=True
    )
    fails(result, f"the disk holding {out} is full", "free some space, then re-run the same command")
