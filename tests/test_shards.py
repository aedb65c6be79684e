"""common/shards.py: the shard format, its errors, the distributed loader and manifest verification."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.shards import HEADER_BYTES, ShardError, TokenLoader, read_shard, shard_files, verify, write_shard
from common.shards import main as shards_main
from conftest import ROOT, make_data_dir


def test_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=5000).astype(np.uint16)
    path = tmp_path / "train_000000.bin"
    info = write_shard(path, tokens)
    data = path.read_bytes()
    assert info == {"ntok": 5000, "bytes": 1024 + 2 * 5000, "sha256": hashlib.sha256(data).hexdigest()}
    header = np.frombuffer(data[:HEADER_BYTES], dtype=np.int32)
    assert list(header[:3]) == [20240520, 1, 5000] and not header[3:].any()
    back = read_shard(path)
    assert isinstance(back, np.memmap) and np.array_equal(back, tokens)  # memory-mapped, not read into RAM
    write_shard(tmp_path / "empty.bin", [])
    assert len(read_shard(tmp_path / "empty.bin")) == 0
    assert sorted(os.listdir(tmp_path)) == ["empty.bin", "train_000000.bin"]  # no temp files left behind


def test_ids_beyond_uint16_are_refused_and_nothing_written(tmp_path):
    with pytest.raises(ShardError, match="uint16"):
        write_shard(tmp_path / "a.bin", np.array([1, 70000]))
    assert os.listdir(tmp_path) == []


def corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:-7]
    elif how == "short header":
        data = data[:100]
    elif how == "wrong magic":
        data[0:4] = np.int32(12345).tobytes()
    elif how == "wrong version":
        data[4:8] = np.int32(2).tobytes()
    elif how == "trailing bytes":
        data += b"\0\0"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how,message",
    [
        ("truncated", "truncated"),
        ("short header", "truncated header"),
        ("wrong magic", "wrong magic 12345"),
        ("wrong version", "version 2"),
        ("trailing bytes", "trailing bytes"),
    ],
)
def test_bad_shards_are_named(tmp_path, how, message):
    path = tmp_path / "val_000000.bin"
    write_shard(path, np.arange(100))
    corrupt(path, how)
    with pytest.raises(ShardError) as e:
        read_shard(path)
    assert str(path) in str(e.value) and message in str(e.value) and "prepare.py" in str(e.value)


def arange_shards(folder, sizes, start=0):
    """Shards holding consecutive integers, so a token's value is its position in the stream."""
    paths, pos = [], start
    for k, n in enumerate(sizes):
        path = os.path.join(folder, f"train_{k:06d}.bin")
        write_shard(path, np.arange(pos, pos + n))
        paths.append(path)
        pos += n
    return paths


def test_windows_are_shifted_by_one(tmp_path):
    loader = TokenLoader(arange_shards(tmp_path, [1000]), batch_size=2, seq_len=8)
    for step in range(3):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (2, 8) and x.dtype == y.dtype == torch.int64
        want = np.arange(step * 16, step * 16 + 17)
        assert np.array_equal(x.numpy().ravel(), want[:-1]) and np.array_equal(y.numpy().ravel(), want[1:])


def test_ranks_take_disjoint_windows_across_shards(tmp_path):
    files = arange_shards(tmp_path, [100, 70, 90])
    ranks = [TokenLoader(files, batch_size=2, seq_len=5, rank=r, world_size=2) for r in range(2)]
    seen = []
    for _ in range(12):  # several passes over the three shards
        xs = [loader.next_batch()[0].numpy().ravel() for loader in ranks]
        assert not set(xs[0]) & set(xs[1])
        assert xs[1][0] == xs[0][0] + 10  # rank 1 takes the window right after rank 0's
        assert all(np.array_equal(np.diff(x), np.ones(9)) for x in xs)  # a window never straddles two shards
        seen.append(xs[0][0])
    # a step takes 20 tokens + 1; shard 0 gives 4 steps, shard 1 gives 3, shard 2 gives 4, then it wraps
    assert seen == [0, 20, 40, 60, 100, 120, 140, 170, 190, 210, 230, 0]


def test_state_restores_the_exact_position(tmp_path):
    files = arange_shards(tmp_path, [300, 200])
    loader = TokenLoader(files, batch_size=3, seq_len=7)
    for _ in range(15):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state()))  # survives a round trip through a checkpoint
    expected = [loader.next_batch() for _ in range(10)]
    resumed = TokenLoader(files, batch_size=3, seq_len=7)
    resumed.load_state(state)
    for (x, y), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(10))):
        assert x.equal(rx) and y.equal(ry)


def test_loader_refuses_shards_too_small_or_from_another_tokenizer(tmp_path):
    files = arange_shards(tmp_path, [50])
    with pytest.raises(ShardError, match="fewer than one step needs"):
        TokenLoader(files, batch_size=4, seq_len=16)
    with pytest.raises(ShardError, match="outside the model's vocabulary"):
        TokenLoader(files, batch_size=2, seq_len=4, vocab_size=10)


def test_shard_files_from_manifest_or_glob(tmp_path):
    data = make_data_dir(str(tmp_path / "data"), train_tokens=4000, val_tokens=1000)
    assert [os.path.basename(f) for f in shard_files(data, "train")] == ["train_000000.bin", "train_000001.bin"]
    os.remove(os.path.join(data, "manifest.json"))
    assert [os.path.basename(f) for f in shard_files(data, "val")] == ["val_000000.bin"]
    with pytest.raises(ShardError, match="no test shards"):
        shard_files(data, "test")


def test_verify_detects_a_corrupted_shard(tmp_path):
    data = make_data_dir(str(tmp_path / "data"), train_tokens=4000, val_tokens=1000)
    cmd = [sys.executable, "-m", "common.shards", "verify", data]
    ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert verify(data) == [] and ok.returncode == 0 and "all shards match" in ok.stdout
    path = os.path.join(data, "train_000001.bin")
    with open(path, "r+b") as f:  # flip one token, same size: only the hash can tell
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 1]))
    problems = verify(data)
    assert len(problems) == 1 and path in problems[0] and "sha256" in problems[0]
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "sha256" in bad.stderr and "1 problem" in bad.stderr
    os.remove(os.path.join(data, "val_000000.bin"))
    assert any("val_000000.bin" in p for p in verify(data))


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"splits": {"train": {"shards": [', "manifest.json: unreadable (not JSON"),
        ("[1, 2]", "manifest.json: no 'splits' object"),
        ('{"splits": {"val": []}}', "split 'val' has no 'shards' list"),
        ('{"splits": {"val": {"shards": [{"file": "val_000000.bin"}]}}}', "shard 0 of split 'val' is not a"),
    ],
)
def test_a_damaged_manifest_is_one_line(tmp_path, text, message):
    data = make_data_dir(str(tmp_path / "data"), train_tokens=4000, val_tokens=1000)
    with open(os.path.join(data, "manifest.json"), "w") as f:
        f.write(text)
    with pytest.raises(SystemExit) as e:
        shards_main(["verify", data])
    error = str(e.value.code)
    assert message in error and f"delete {data} and run prepare.py again" in error and "\n" not in error, error
    with pytest.raises(ShardError, match="manifest is damaged"):
        shard_files(data, "train")
