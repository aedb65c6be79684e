"""Fetch the teacher model and turn a text corpus into token shards for train.py and distill.py.

    python prepare.py                  # SmolLM2-135M + ~4 GiB / 256 MiB of fineweb-edu, from the hub
    python prepare.py --smoke-test     # the same, a few MiB
    python prepare.py --model SmolLM2-135M-Instruct.Q4_1.gguf --dataset my_texts/   # offline

The model (a hub id, a local snapshot folder or a local .gguf file) is saved to MODEL_DIR as an
ordinary Hugging Face folder (safetensors + tokenizer). The text (a hub dataset or local .txt,
.jsonl/.json, .parquet files, all read through `datasets` streaming) is tokenized by WORKERS
processes into shards in OUT_DIR (format in common/shards.py): every document is EOT_TOKEN followed
by its tokens, a shard holds whole documents, validation documents come first in the stream so no
document is in both splits. manifest.json lists the shards with their sha256; while the run is
going progress.json records finished shards, so an interrupted run resumes where it stopped and
ends byte-identical to an uninterrupted one.
"""

import collections
import contextlib
import fnmatch
import hashlib
import logging
import multiprocessing as mp
import os
import re
import resource
import shutil
import signal
import sys
import time
from collections import deque

import numpy as np
from tqdm import tqdm

from common import files, shards
from common.config import exit_when_disk_full, fail, override

# fmt: off
MODEL = "HuggingFaceTB/SmolLM2-135M"     # teacher: a hub id, a local snapshot folder or a local .gguf file
MODEL_DIR = "models/smolllm2_135m"        # where the teacher is saved (safetensors + tokenizer)
DATASET = "HuggingFaceFW/fineweb-edu"     # text: a hub id, or local .txt/.jsonl/.json/.parquet (file, folder or glob)
DATASET_CONFIG = "sample-10BT"            # hub dataset config; a 10B-token sample is far more than we take
TEXT_FIELD = "text"                       # the field holding a document (a .txt file is one document)
OUT_DIR = "data/fineweb_edu"              # shards, manifest.json (and progress.json while running)
TRAIN_BYTES = 4 * 2**30                   # UTF-8 text for train: ~1B SmolLM2 tokens, ample for distillation
VAL_BYTES = 256 * 2**20                   # UTF-8 text for val, taken first from the stream
SHARD_TOKENS = 100_000_000                # most tokens in one shard: 200 MB files, as nanoGPT's fineweb.py
EOT_TOKEN = "<|endoftext|>"               # document separator: the end-of-text token SmolLM2 was pretrained with
WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # tokenizer processes
TASK_BYTES = 256 * 2**10                  # text per tokenizer task: amortises IPC, keeps workers busy on small runs
SMOKE_TEST = False                        # quick end-to-end check: at most 8 MiB train, 1 MiB val, 1M-token shards
# fmt: on
config = override(globals()).as_dict()
globals().update(config)  # the constants now hold the run's settings
if SMOKE_TEST:
    TRAIN_BYTES, VAL_BYTES, SHARD_TOKENS = min(TRAIN_BYTES, 8 * 2**20), min(VAL_BYTES, 2**20), min(SHARD_TOKENS, 10**6)
    config.update(TRAIN_BYTES=TRAIN_BYTES, VAL_BYTES=VAL_BYTES, SHARD_TOKENS=SHARD_TOKENS)

MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")  # config, weights, tokenizer; no code
TEXT_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
OFFLINE_HINT = (
    "offline, pass --model with a local snapshot folder or .gguf file and --dataset with local "
    ".txt/.jsonl/.parquet files (a file, a folder or a glob)"
)
PROGRESS = "progress.json"
JSON_CHUNK_BYTES = 2**20  # .jsonl text per parse: datasets' default, 10 MB, delays the first batch to the workers
SPLITS = ("val", "train")


class InputError(Exception):
    """Bad input found while reading the stream; the message says what and where."""


def is_local(source, suffixes):
    return os.path.exists(source) or source.startswith(("/", ".", "~")) or source.endswith(suffixes) or "*" in source


def hub_call(what, fn, *args, **kwargs):
    """Run a hub request; any failure becomes one line naming the offline options."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return fn(*args, **kwargs)
    except HfHubHTTPError as e:
        fail(f"the hub refused {what} ({str(e).splitlines()[0]}); check the name, or {OFFLINE_HINT}")
    except Exception as e:  # connection errors come in many types (httpx, OSError, hub wrappers)
        fail(f"cannot reach the Hugging Face hub for {what} ({type(e).__name__}); {OFFLINE_HINT}")


# ----------------------------------------------------------------------------- model


def fetch_model():
    """Put the teacher in MODEL_DIR (once; a marker file records its source). Returns that source and its tokenizer
    (load_tokenizer), which is checked before a new MODEL_DIR takes its name."""
    local = is_local(MODEL, (".gguf",))
    source = os.path.abspath(os.path.expanduser(MODEL)) if local else MODEL
    if local and not (os.path.isdir(source) or os.path.isfile(source) and source.endswith(".gguf")):
        fail(f"--model {MODEL}: not a folder or a .gguf file; give a hub id, a snapshot folder or a .gguf file")
    if local and os.path.isdir(source) and os.path.isdir(MODEL_DIR) and os.path.samefile(source, MODEL_DIR):
        check_model_folder(MODEL_DIR)
        return source, load_tokenizer(MODEL_DIR, MODEL_DIR)
    marker = os.path.join(MODEL_DIR, "prepare_source.json")
    if os.path.exists(marker):
        try:
            recorded = files.read_json(marker, f"delete {MODEL_DIR} and run again")
        except ValueError as e:
            fail(str(e))
        if isinstance(recorded, dict) and recorded.get("model") == source:
            print(f"model: {MODEL_DIR} already holds {source}")
            return source, load_tokenizer(MODEL_DIR, MODEL_DIR)
    if os.path.isdir(MODEL_DIR) and os.listdir(MODEL_DIR):
        fail(f"{MODEL_DIR} holds another model; delete it or choose another --model-dir")
    tmp = MODEL_DIR.rstrip("/") + ".partial"  # a hub download resumes here; local sources start it afresh
    if not local:
        from huggingface_hub import snapshot_download

        print(f"model: downloading {MODEL} into {MODEL_DIR}")
        hub_call(f"model {MODEL}", snapshot_download, MODEL, local_dir=tmp, allow_patterns=list(MODEL_FILES))
        shutil.rmtree(os.path.join(tmp, ".cache"), ignore_errors=True)
        check_model_folder(tmp, MODEL)
        tokenizer = load_tokenizer(tmp, MODEL)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            if source.endswith(".gguf"):
                print(f"model: dequantizing {source} into {MODEL_DIR} (safetensors, fp32)")
                convert_gguf(source, tmp)
            else:
                print(f"model: copying {source} into {MODEL_DIR}")
                for path in sorted(os.path.join(source, name) for name in os.listdir(source)):
                    if os.path.isfile(path) and any(fnmatch.fnmatch(os.path.basename(path), p) for p in MODEL_FILES):
                        shutil.copy(path, tmp)
            check_model_folder(tmp, MODEL)
            tokenizer = load_tokenizer(tmp, MODEL)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    files.write_json_atomic(os.path.join(tmp, "prepare_source.json"), {"model": source})
    if os.path.isdir(MODEL_DIR):
        os.rmdir(MODEL_DIR)  # empty, checked above
    os.replace(tmp, MODEL_DIR)
    return source, tokenizer


def convert_gguf(path, out):
    """Dequantize a GGUF model with transformers and save it as a plain safetensors snapshot."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:
        fail(
            f"{path}: transformers cannot read this GGUF file ({error_line(e)}); "
            f"it needs the gguf and accelerate packages and a supported architecture"
        )
    config = gguf_model.config
    del config.quantization_config  # the GGUF-loaded model refuses save_pretrained; a plain one does not
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def check_model_folder(folder, source=None):
    names = os.listdir(folder)
    missing = [
        what
        for what, ok in (
            ("config.json", "config.json" in names),
            ("*.safetensors weights", any(n.endswith(".safetensors") for n in names)),
            ("tokenizer files", "tokenizer.json" in names or "tokenizer_config.json" in names),
        )
        if not ok
    ]
    if missing:
        fail(
            f"{source or folder}: no {', no '.join(missing)}; a model source needs a Hugging Face config, "
            f"safetensors weights and a tokenizer (re-save it with save_pretrained)"
        )


def load_tokenizer(folder, name):
    """The fast tokenizer of a model folder as JSON (what the workers rebuild it from) and its manifest entry,
    checked to load and to fit uint16 shards; `name` is what messages call the model."""
    from tokenizers import Tokenizer

    path = os.path.join(folder, "tokenizer.json")
    try:
        if os.path.exists(path):
            tokenizer = Tokenizer.from_file(path)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder).backend_tokenizer
    except Exception as e:  # a damaged file fails in the Rust parser or in transformers, with many error types
        fail(
            f"{name}: its tokenizer does not load ({error_line(e)}); replace the damaged tokenizer files with good "
            f"ones (save_pretrained writes them)"
        )
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    top = max(vocab.values())
    if top > 65535:
        fail(
            f"{name}: the tokenizer has ids up to {top:,}, but shards store uint16 (at most 65,535); "
            f"use a model whose vocabulary has at most 65,536 tokens"
        )
    if EOT_TOKEN not in vocab:
        fail(f"{name}: the tokenizer has no {EOT_TOKEN!r}; pass --eot-token with its end-of-text token")
    text = tokenizer.to_str()
    return text, {
        "name_or_path": MODEL_DIR,
        "vocab_size": top + 1,
        "eos_id": vocab[EOT_TOKEN],
        "eos_token": EOT_TOKEN,
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }


# ----------------------------------------------------------------------------- text


def local_files(pattern):
    """The sorted files a local --dataset names (file, folder or glob), checked readable and of one kind."""
    import glob

    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
        files = sorted(
            os.path.join(d, n)
            for d, _, names in os.walk(pattern)
            for n in names
            if os.path.splitext(n)[1] in TEXT_BUILDERS
        )
    else:
        files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        fail(f"--dataset {pattern}: no such file, or no .txt/.jsonl/.json/.parquet files there")
    kinds = {TEXT_BUILDERS.get(os.path.splitext(f)[1]) for f in files}
    if None in kinds or len(kinds) > 1:
        fail(
            f"--dataset {pattern}: files must all be .txt, all .jsonl/.json or all .parquet, got "
            f"{', '.join(sorted({os.path.splitext(f)[1] or f for f in files}))}"
        )
    for f in files:
        try:
            with open(f, "rb") as fh:
                if not fh.read(1):
                    fail(f"{f}: empty file; remove it from the dataset")
        except OSError as e:
            fail(f"{f}: cannot read it ({e.strerror}); fix its permissions or remove it from the dataset")
    return [os.path.abspath(f) for f in files], kinds.pop()


def dataset_source():
    """What --dataset names, checked as far as possible before anything is downloaded or written."""
    if is_local(DATASET, tuple(TEXT_BUILDERS)):
        files, builder = local_files(DATASET)
        return {
            "dataset": os.path.abspath(os.path.expanduser(DATASET)),
            "config": None,
            "builder": builder,
            "files": files,
            "text_field": TEXT_FIELD,
        }
    from huggingface_hub import HfApi

    hub_call(f"dataset {DATASET}", HfApi().dataset_info, DATASET)  # fails at once; load_dataset retries for ~30 s
    return {"dataset": DATASET, "config": DATASET_CONFIG or None, "text_field": TEXT_FIELD}


def open_stream(source):
    """The text as a `datasets` stream (the same path for the hub and for local files), and the handler
    that catches the errors `datasets` logs."""
    os.environ.setdefault("USE_TORCH", "0")  # else `datasets` imports torch or TensorFlow (seconds) for
    os.environ.setdefault("USE_TF", "0")  # features that streaming text does not use
    import datasets

    log = LastLogError()
    logger = logging.getLogger("datasets")
    logger.handlers, logger.propagate = [log], False  # its read errors come back in our one-line messages
    if "files" in source:
        args, kwargs = (source["builder"],), {"data_files": source["files"]}
        if source["builder"] == "text":
            kwargs["sample_by"] = "document"
        if source["builder"] == "json":
            kwargs["chunksize"] = JSON_CHUNK_BYTES
    else:
        args, kwargs = (source["dataset"],), {"name": source["config"]}
    try:
        return datasets.load_dataset(*args, split="train", streaming=True, **kwargs), log
    except Exception as e:
        fail(f"cannot read --dataset {DATASET}: {log.message or error_line(e)}")


def error_line(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__


class LastLogError(logging.Handler):
    """Keeps the last error `datasets` logged: it names the file a read failed on."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.message = None

    def emit(self, record):
        self.message = record.getMessage()


def documents(stream, log, skip, txt_files):
    """Yield (index, text) for each document of the stream from index `skip` on, validated. `txt_files`: the
    files of a .txt dataset (a file is a document), to name the one that is not UTF-8."""
    index = 0
    batches = stream.iter(batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:
            if isinstance(e, UnicodeDecodeError) and txt_files:
                for path in txt_files[index:]:  # the batch that failed starts at document `index`
                    try:
                        with open(path, encoding="utf-8") as f:
                            f.read()
                    except UnicodeDecodeError as bad:
                        raise InputError(
                            f"{path}: not UTF-8 text ({bad.reason} at byte {bad.start:,}); convert it "
                            f"to UTF-8 or remove it from the dataset"
                        ) from None
            raise InputError(f"cannot read {DATASET} after document {index}: {log.message or error_line(e)}") from None
        if batch is None:
            return
        if TEXT_FIELD not in batch:
            raise InputError(
                f"{DATASET}: no {TEXT_FIELD!r} field in the documents (fields: {', '.join(batch)}); "
                f"pass --text-field with the one holding the text"
            )
        for text in batch[TEXT_FIELD]:
            if index >= skip:
                if not isinstance(text, str):
                    raise InputError(
                        f"{DATASET}: document {index} has no text ({TEXT_FIELD!r} is "
                        f"{type(text).__name__}, not a string); fix or drop that record"
                    )
                if not text:
                    raise InputError(
                        f"{DATASET}: document {index} has an empty {TEXT_FIELD!r}; fix or drop that record"
                    )
                yield index, text
            index += 1


def tasks(docs, split_bytes):
    """Group documents into tokenizer tasks (split, first document index, texts, UTF-8 sizes). Documents go to
    val until it has VAL_BYTES of text, then to train until TRAIN_BYTES: a pure function of the stream."""
    budget = {"val": VAL_BYTES, "train": TRAIN_BYTES}
    split, first, texts, sizes, task_bytes = None, 0, [], [], 0
    while (to := next((s for s in SPLITS if split_bytes[s] < budget[s]), None)) is not None:
        item = next(docs, None)
        if item is None:
            break
        index, text = item
        if texts and (to != split or task_bytes >= TASK_BYTES):
            yield split, first, texts, sizes
            texts, sizes, task_bytes = [], [], 0
        if not texts:
            split, first = to, index
        size = len(text) if text.isascii() else len(text.encode("utf-8"))  # isascii() is O(1) in CPython
        split_bytes[to] += size
        task_bytes += size
        texts.append(text)
        sizes.append(size)
    if texts:
        yield split, first, texts, sizes


# ----------------------------------------------------------------------------- tokenizer workers

_TOKENIZER, _EOT = None, None


def init_worker(tokenizer_json, eot_id):
    global _TOKENIZER, _EOT
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: WORKERS processes use WORKERS cores
    from tokenizers import Tokenizer

    _TOKENIZER, _EOT = Tokenizer.from_str(tokenizer_json), eot_id


def tokenize(texts):
    """[EOT, tokens of doc 0, EOT, tokens of doc 1, ...] as uint16, each document's length in tokens, and the
    seconds it took."""
    t0 = time.perf_counter()
    ids = [e.ids for e in _TOKENIZER.encode_batch_fast(texts, add_special_tokens=False)]
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    tokens = np.empty(int(lengths.sum()), dtype=np.uint16)
    pos = 0
    for x in ids:
        tokens[pos] = _EOT
        tokens[pos + 1 : pos + 1 + len(x)] = x
        pos += len(x) + 1
    return tokens, lengths, time.perf_counter() - t0


@contextlib.contextmanager
def tokenizer_workers(tokenizer_json, eot_id):
    """A pool of WORKERS tokenizer processes. When the caller fails (a full disk, Ctrl-C) the workers finish the
    tasks already queued and exit: the pool's own terminate() can hang for good when it kills them while a task
    larger than a pipe's buffer is half sent (here, once in a few hundred failures)."""
    with mp.get_context().Pool(WORKERS, init_worker, (tokenizer_json, eot_id)) as pool:
        try:
            yield pool
        except BaseException:
            pool.close()
            pool.join()
            raise


# ----------------------------------------------------------------------------- output


def start_output(head):
    """The run's progress, and whether it is a finished one: fresh, resumed from progress.json, or manifest.json's
    when OUT_DIR already holds this dataset. Refuses a folder holding shards of a different run (other source,
    tokenizer or sizes)."""
    for name in (shards.MANIFEST, PROGRESS):
        path = os.path.join(OUT_DIR, name)
        if not os.path.exists(path):
            continue
        try:
            old = (
                shards.load_manifest(OUT_DIR)
                if name == shards.MANIFEST
                else files.read_json(path, f"delete {OUT_DIR} and run again")
            )
        except ValueError as e:
            fail(str(e))
        diff = [
            f"{k}.{kk}: {old.get(k, {}).get(kk)!r} -> {head[k].get(kk)!r}"
            for k in head
            for kk in sorted(set(head[k]) | set(old.get(k, {})))
            if differs(k, kk, old.get(k, {}).get(kk), head[k].get(kk))
        ]
        if diff:
            fail(
                f"{OUT_DIR} holds shards of a different run ({name}: {'; '.join(diff)}); "
                f"choose another --out-dir or delete that folder"
            )
        if name == shards.MANIFEST:  # as the progress of a run whose splits are all done
            splits = {k: {**v, "done": True} for k, v in old["splits"].items()}
            return {**old, "splits": splits, "next_doc": sum(v["documents"] for v in splits.values())}, True
        print(f"resuming: {sum(len(s['shards']) for s in old['splits'].values())} finished shards in {OUT_DIR}")
        return old, False
    if os.path.isdir(OUT_DIR) and any(n.endswith(".bin") for n in os.listdir(OUT_DIR)):
        fail(
            f"{OUT_DIR} holds .bin shards but no {shards.MANIFEST} or {PROGRESS}, so from a different run; "
            f"choose another --out-dir or delete them"
        )
    empty = {"shards": [], "documents": 0, "text_bytes": 0, "tokens": 0, "done": False}
    return {**head, "splits": {s: dict(empty, shards=[]) for s in SPLITS}, "next_doc": 0}, False


def differs(section, key, old, new):
    """Whether a setting recorded in OUT_DIR differs from this run's. The model folder is a path: models/x, models/x/
    and its absolute spelling are one folder."""
    if (section, key) == ("tokenizer", "name_or_path") and old and new:
        return os.path.realpath(old) != os.path.realpath(new)
    return old != new


def damaged_shards(progress):
    """(split, index, problem) of every finished shard whose file is missing or differs from its recorded size
    or sha256, in stream order."""
    found = []
    for split in SPLITS:
        for k, shard in enumerate(progress["splits"][split]["shards"]):
            path = os.path.join(OUT_DIR, shard["file"])
            if not os.path.isfile(path):
                found.append((split, k, f"{path}: missing"))
            elif os.path.getsize(path) != shard["bytes"] or shards.file_sha256(path) != shard["sha256"]:
                found.append((split, k, f"{path}: differs from its recorded size or sha256"))
    return found


def redo_from(progress, split, index):
    """The progress as it was when shard `index` of `split` began: that shard and all after it are redone,
    byte-identical to the first time since the text, tokenizer and settings are the same."""
    if any("documents" not in s for info in progress["splits"].values() for s in info["shards"]):
        fail(
            f"{OUT_DIR}: an older prepare.py wrote it, without the document counts needed to redo single shards; "
            f"delete {OUT_DIR} and run again"
        )
    for name in SPLITS[SPLITS.index(split) :]:
        info = progress["splits"][name]
        kept = info["shards"][:index] if name == split else []
        info.update(
            shards=kept,
            documents=sum(s["documents"] for s in kept),
            tokens=sum(s["ntok"] for s in kept),
            text_bytes=sum(s["text_bytes"] for s in kept),
            done=False,
        )
    progress["next_doc"] = sum(info["documents"] for info in progress["splits"].values())
    return progress


class ShardWriter:
    """Cuts the tokenized stream into shards of whole documents (at most SHARD_TOKENS tokens, a longer
    document alone) and records each finished shard in progress.json with the index of the next document."""

    def __init__(self, progress):
        self.progress, self.end = progress, progress["next_doc"]
        self.split = next((s for s in SPLITS if not progress["splits"][s]["done"]), SPLITS[-1])
        self.parts, self.ntok, self.docs, self.bytes = [], 0, 0, 0

    def add(self, split, first, tokens, lengths, sizes):
        if split != self.split:
            self.end_split()
            self.split = split
        starts = np.concatenate(([0], np.cumsum(lengths)))
        lo = 0
        for d, n in enumerate(lengths.tolist()):
            if self.ntok and self.ntok + n > SHARD_TOKENS:
                self.take(tokens[starts[lo] : starts[d]], d - lo, sum(sizes[lo:d]))
                self.write(first + d)
                lo = d
            self.ntok += n
        self.take(tokens[starts[lo] :], len(lengths) - lo, sum(sizes[lo:]))
        self.end = first + len(lengths)

    def take(self, tokens, docs, nbytes):
        self.parts.append(tokens)
        self.docs += docs
        self.bytes += nbytes

    def write(self, next_doc):
        info = self.progress["splits"][self.split]
        name = f"{self.split}_{len(info['shards']):06d}.bin"
        os.makedirs(OUT_DIR, exist_ok=True)
        shard = shards.write_shard(os.path.join(OUT_DIR, name), np.concatenate(self.parts))
        info["shards"].append({"file": name, **shard, "documents": self.docs, "text_bytes": self.bytes})
        info["documents"] += self.docs
        info["text_bytes"] += self.bytes
        info["tokens"] += self.ntok
        self.parts, self.ntok, self.docs, self.bytes = [], 0, 0, 0
        self.progress["next_doc"] = next_doc
        self.save()

    def end_split(self):
        if self.ntok:
            self.write(self.end)
        self.progress["splits"][self.split]["done"] = True
        if any(s["shards"] for s in self.progress["splits"].values()):  # else there is nothing to resume
            self.save()

    def save(self):
        os.makedirs(OUT_DIR, exist_ok=True)
        files.write_json_atomic(os.path.join(OUT_DIR, PROGRESS), self.progress)


def tokenize_stream(progress, source, tokenizer_json, eot_id, started, clock):
    """Tokenize the text in WORKERS processes, in order, into shards. The workers start first and load the tokenizer
    while this process opens the stream. Returns the text bytes and tokens done, and the seconds and CPU seconds
    (this process and its workers) from the stream's opening on. `clock` gets the seconds from `started` to the
    stream's opening ("start-up"), this process's seconds of reading the stream, waiting for the workers and
    writing shards, and the workers' seconds of tokenizing."""
    writer = ShardWriter(progress)
    split_bytes = {s: progress["splits"][s]["text_bytes"] for s in SPLITS}  # documents before next_doc
    nbytes, tokens = 0, 0
    with tokenizer_workers(tokenizer_json, eot_id) as pool:
        stream, log = open_stream(source)
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        clock["start-up"] = t0 - started
        with tqdm(
            total=VAL_BYTES + TRAIN_BYTES,
            initial=sum(split_bytes.values()),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="tokenizing",
            dynamic_ncols=True,
        ) as bar:
            inflight = deque()

            def collect():
                nonlocal nbytes, tokens
                split, first, sizes, result = inflight.popleft()
                with timed(clock, "wait"):
                    out, lengths, seconds = result.get()
                clock["tokenize"] += seconds
                with timed(clock, "write"):
                    writer.add(split, first, out, lengths, sizes)
                nbytes, tokens = nbytes + sum(sizes), tokens + len(out)
                bar.update(sum(sizes))
                bar.set_postfix_str(
                    f"{tokens:,} tokens, {tokens / (time.perf_counter() - t0):,.0f} tok/s", refresh=False
                )

            txt_files = source["files"] if source.get("builder") == "text" else []
            work = tasks(documents(stream, log, progress["next_doc"], txt_files), split_bytes)
            while True:
                with timed(clock, "read"):
                    task = next(work, None)
                if task is None:
                    break
                split, first, texts, sizes = task
                inflight.append((split, first, sizes, pool.apply_async(tokenize, (texts,))))
                if len(inflight) > 4 * WORKERS:  # bounded read-ahead: enough to keep every worker busy, no more
                    collect()
            while inflight:
                collect()
    with timed(clock, "write"):
        writer.end_split()
    if not progress["splits"]["train"]["shards"]:
        raise InputError(
            f"{DATASET} ran out after {split_bytes['val']:,} bytes of text, leaving none for train; "
            f"lower --val-bytes or add text"
        )
    # the pool's processes have ended and been reaped by now
    return nbytes, tokens, time.perf_counter() - t0, cpu_seconds() - cpu0


@contextlib.contextmanager
def timed(clock, part):
    t = time.perf_counter()
    yield
    clock[part] += time.perf_counter() - t


def breakdown(clock, seconds):
    """One line: where the time went, and the part that limits the run."""
    busy = clock["tokenize"] / (WORKERS * seconds)
    limit = (
        "tokenizing: more cores (--workers) would help"
        if busy > 0.85
        else "reading the stream in one process"
        if clock["read"] > clock["write"]
        else "writing the shards"
    )
    return (
        f"time: start-up {clock['start-up']:.2f} s; then {seconds:.2f} s in which this process read the stream for "
        f"{clock['read']:.2f} s, wrote shards for {clock['write']:.2f} s and waited for the tokenizers for "
        f"{clock['wait']:.2f} s, and {WORKERS} workers tokenized for {clock['tokenize']:.2f} s "
        f"({busy:.0%} busy); limited by {limit}"
    )


def cpu_seconds():
    """CPU time of this process and its ended child processes."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def summary(splits):
    print(f"{'split':<6} {'documents':>10} {'text MiB':>10} {'tokens':>13} {'shards':>7} {'bytes/token':>12}")
    for name, s in splits.items():
        print(
            f"{name:<6} {s['documents']:>10,} {s['text_bytes'] / 2**20:>10.2f} {s['tokens']:>13,} "
            f"{len(s['shards']):>7} {s['text_bytes'] / max(1, s['tokens']):>12.2f}"
        )


def main():
    started = time.perf_counter()
    if min(TRAIN_BYTES, VAL_BYTES, SHARD_TOKENS, WORKERS, TASK_BYTES) <= 0:
        fail("--train-bytes, --val-bytes, --shard-tokens, --workers and --task-bytes must be positive")
    try:
        files.check_writable(OUT_DIR)  # before the model is fetched and the text tokenized, not after
    except ValueError as e:
        fail(f"--out-dir {OUT_DIR}: {e}; choose another --out-dir")
    print("config: " + " ".join(f"{k}={v}" for k, v in config.items()))
    source = dataset_source()
    model_source, (tokenizer_json, tokenizer) = fetch_model()
    source = {"model": model_source, **source}
    head = {
        "format": {
            "magic": shards.MAGIC,
            "version": shards.VERSION,
            "header_int32": shards.HEADER_INTS,
            "token_dtype": "uint16",
        },
        "source": source,
        "tokenizer": tokenizer,
        "settings": {"train_bytes": TRAIN_BYTES, "val_bytes": VAL_BYTES, "shard_tokens": SHARD_TOKENS},
    }
    progress, finished = start_output(head)
    damaged = damaged_shards(progress)
    clear_temp_files()
    if finished and not damaged:
        summary(progress["splits"])
        print(f"{OUT_DIR}: already complete; every shard matches its sha256 in {shards.MANIFEST}")
        return
    redo_damaged(progress, finished, damaged)
    clock = collections.Counter()
    try:
        nbytes, tokens, seconds, cpu = tokenize_stream(
            progress, source, tokenizer_json, tokenizer["eos_id"], started, clock
        )
    except InputError as e:
        kept = sum(len(s["shards"]) for s in progress["splits"].values())
        fail(
            f"{e}"
            + (f" ({kept} finished shards kept in {OUT_DIR}: fix the input and re-run to resume)" if kept else "")
        )
    manifest = write_manifest(progress)
    summary(manifest["splits"])
    if manifest["splits"]["train"]["text_bytes"] < TRAIN_BYTES:
        print(f"note: {DATASET} ended before --train-bytes {TRAIN_BYTES:,}; train has all the text there was")
    print(
        f"wrote {os.path.join(OUT_DIR, shards.MANIFEST)}; this run tokenized {nbytes / 1e6:.2f} MB of text into "
        f"{tokens:,} tokens in {seconds:.2f} s ({cpu:.2f} CPU s) with {WORKERS} workers: "
        f"{nbytes / 1e6 / seconds:.3f} MB/s, {tokens / seconds:,.0f} tokens/s"
    )
    print(breakdown(clock, seconds))


def redo_damaged(progress: dict, finished: bool, damaged: list) -> None:
    """Resume: the shards from the first damaged one on are redone (progress.json says so before anything else
    happens)."""
    if damaged:
        split, index, problem = damaged[0]
        print(
            f"{problem}"
            + (f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else "")
            + f"; redoing the {split} shards from {index} on"
        )
        files.write_json_atomic(os.path.join(OUT_DIR, PROGRESS), redo_from(progress, split, index))
        if finished:  # the same command resumes from progress.json if this one is stopped too
            os.remove(os.path.join(OUT_DIR, shards.MANIFEST))


def clear_temp_files() -> None:
    """Remove the temp files a killed run left in OUT_DIR, complete or not: their shards are redone or done."""
    for name in os.listdir(OUT_DIR) if os.path.isdir(OUT_DIR) else []:
        if re.fullmatch(r"((train|val)_\d+\.bin|progress\.json|manifest\.json)\.tmp\d+", name):
            os.remove(os.path.join(OUT_DIR, name))


def write_manifest(progress: dict) -> dict:
    """progress.json becomes manifest.json: the run is complete."""
    manifest = {k: v for k, v in progress.items() if k != "next_doc"}
    for split in manifest["splits"].values():
        del split["done"]
    files.write_json_atomic(os.path.join(OUT_DIR, shards.MANIFEST), manifest)
    os.remove(os.path.join(OUT_DIR, PROGRESS))
    return manifest


if __name__ == "__main__":
    try:
        with exit_when_disk_full(OUT_DIR, "re-run the same command: it keeps the finished shards and goes on"):
            main()
    except KeyboardInterrupt:
        print(
            f"prepare.py: interrupted; finished shards stay in {OUT_DIR}, re-run the same command to resume",
            file=sys.stderr,
        )
        sys.exit(130)
