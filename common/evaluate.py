"""Evaluate checkpoints and their teacher on the fixed val tokens: cross-entropy and perplexity of
every model and, for each checkpoint, KL(teacher || checkpoint) and top-1 agreement with the teacher.

    python -m common.evaluate CHECKPOINT [CHECKPOINT ...] [--teacher DIR] [--data-dir DIR]
        [--val-tokens N] [--batch-size B] [--seq-len T] [--out FILE.json]
    torchrun --standalone --nproc_per_node N -m common.evaluate CHECKPOINT ... (ranks split the tokens)

A checkpoint is any folder common.checkpoint.load_model accepts (a distill.py or train.py
checkpoint, or a Hugging Face model folder). Every model sees the same tokens: the first
VAL_TOKENS of the val shards, in whole batches, read from the start on every call. All models are
loaded together so that the teacher runs once per batch; the logits are reduced a chunk of tokens
at a time (common.kd.kd_metrics) and never held for a whole batch.
"""
import contextlib
import math
import os
import sys

import torch
from tqdm import tqdm

from common.checkpoint import load_model
from common.config import override
from common.kd import final_hidden, head_weight, kd_metrics
from common.runtime import Runtime
from common.shards import ShardError, TokenLoader, shard_files, write_json_atomic

TEACHER = "models/smolllm2_135m"  # the reference model (prepare.py writes it); '' = no teacher, CE and ppl only
DATA_DIR = "data/fineweb_edu"     # prepare.py's output; its val split is read
VAL_TOKENS = 65536                # val tokens per model (all ranks together), rounded down to whole batches
BATCH_SIZE = 8                    # sequences per batch, per rank
SEQ_LEN = 512                     # tokens per sequence; distill.py's default, so its val CE is comparable
OUT = ""                          # JSON file for the results (written atomically); '' = print the table only
DEVICE = "auto"                   # auto: cuda when there is one, else cpu
DTYPE = "auto"                    # auto: bf16 autocast on GPUs, fp32 on CPU (bf16 is emulated there)


def val_batches(data_dir, val_tokens, batch_size, seq_len, rank=0, world_size=1, vocab_size=None):
    """The first `val_tokens` of the val shards as this rank's (x, y) batches, on the CPU."""
    per_step = batch_size * seq_len * world_size
    if val_tokens < per_step:
        raise ValueError(f"VAL_TOKENS={val_tokens} is less than one batch ({batch_size} x {seq_len} x {world_size} "
                         f"rank(s) = {per_step} tokens); raise --val-tokens or lower --batch-size/--seq-len")
    loader = TokenLoader(shard_files(data_dir, "val"), batch_size, seq_len, rank, world_size, vocab_size)
    return [loader.next_batch() for _ in range(val_tokens // per_step)]


@torch.no_grad()
def evaluate_models(models, batches, teacher=None, rt=None, progress=False):
    """Evaluate {name: model} on `batches` ((x, y) pairs) in one pass, the teacher once per batch.
    `teacher` is a model, or a function ids -> final hidden states whose logits use each model's
    own LM head (the logits phase with decoders only, where teacher and student share a backbone).
    Returns ({name: {'ce', 'ppl'[, 'kl', 'agreement']}}, the teacher's {'ce', 'ppl'} or None);
    with `rt` the numbers are means over the ranks and bf16 autocast is used where rt uses it."""
    teacher_model = teacher if isinstance(teacher, torch.nn.Module) else None
    if teacher is not None and teacher_model is None and not models:
        raise ValueError("a teacher given as a function needs at least one model (its LM head scores the teacher)")
    modules = list(models.values()) + ([teacher_model] if teacher_model is not None else [])
    if not modules:
        raise ValueError("nothing to evaluate: give at least one model or a teacher model")
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    device = next(modules[0].parameters()).device
    sums = {name: {} for name in models}
    teacher_sums = {}
    try:
        for x, y in tqdm(batches, desc="eval", disable=not progress, leave=False):
            x, y = x.to(device), y.to(device)
            with rt.autocast() if rt else contextlib.nullcontext():
                ht = None
                if teacher_model is not None:
                    ht = final_hidden(teacher_model, x)
                    if not models:
                        _add(teacher_sums, kd_metrics(ht, head_weight(teacher_model), y))
                elif teacher is not None:
                    ht = teacher(x)
                for k, (name, model) in enumerate(models.items()):
                    m = kd_metrics(final_hidden(model, x), head_weight(model), y, ht,
                                   None if teacher_model is None else head_weight(teacher_model))
                    teacher_ce = m.pop("teacher_ce", None)
                    if teacher_ce is not None and k == 0:
                        _add(teacher_sums, {"tokens": m["tokens"], "ce": teacher_ce})
                    _add(sums[name], m)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    results = {name: _finish(s, rt) for name, s in sums.items()}
    return results, (_finish(teacher_sums, rt) if teacher_sums else None)


def evaluate(model, batches, teacher=None, rt=None):
    """One model's {'ce', 'ppl'} and, with a teacher, 'kl', 'agreement', 'teacher_ce', 'teacher_ppl'."""
    results, t = evaluate_models({"model": model}, batches, teacher, rt)
    out = results["model"]
    if t:
        out.update(teacher_ce=t["ce"], teacher_ppl=t["ppl"])
    return out


def _add(sums, m):
    for k, v in m.items():
        sums[k] = sums.get(k, 0) + v


def _finish(sums, rt):
    """Per-token means (rank means under DDP: every rank has the same number of tokens)."""
    mean = {k: float(v) / float(sums["tokens"]) for k, v in sums.items() if k != "tokens"}
    if rt:
        mean = {k: rt.all_mean(v) for k, v in mean.items()}
    out = {"ce": mean["ce"], "ppl": math.exp(mean["ce"])}
    if "kl" in mean:
        out.update(kl=mean["kl"], agreement=mean["agree"])
    return out


def _check_folder(path):
    if not os.path.isfile(os.path.join(path, "config.json")):
        sys.exit(f"{path}: not a model or checkpoint folder (no config.json); pass a checkpoint folder such as "
                 f"runs/NAME/final, or the model folder prepare.py wrote")


def _load(path, device):
    try:
        return load_model(path, device)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"{path}: cannot load it as a model: {str(e).splitlines()[0]}")


def main(argv):
    paths = []
    while argv and not argv[0].startswith("--"):
        paths.append(argv.pop(0))
    config = override(globals(), argv)
    if not paths and not TEACHER:
        sys.exit("usage: python -m common.evaluate CHECKPOINT [CHECKPOINT ...] [--teacher DIR] [--data-dir DIR] ...")
    for path in paths + ([TEACHER] if TEACHER else []):  # every folder, before loading any model
        _check_folder(path)
    rt = Runtime(DEVICE, DTYPE)
    models = {path: _load(path, rt.device) for path in paths}
    teacher = _load(TEACHER, rt.device) if TEACHER else None
    vocab = {p: m.config.vocab_size for p, m in [*models.items(), *([(TEACHER, teacher)] if teacher else [])]}
    if len(set(vocab.values())) > 1:
        sys.exit(f"the models have different vocabularies ({vocab}); compare checkpoints of one teacher")
    try:
        batches = val_batches(DATA_DIR, VAL_TOKENS, BATCH_SIZE, SEQ_LEN, rt.rank, rt.world_size, next(iter(vocab.values())))
    except (ShardError, ValueError) as e:
        sys.exit(str(e))
    n_tok = len(batches) * BATCH_SIZE * SEQ_LEN * rt.world_size
    rt.print(f"{n_tok:,} val tokens from {DATA_DIR}: {len(batches)} batches of {BATCH_SIZE} x {SEQ_LEN} "
             f"x {rt.world_size} rank(s) on {rt.device} ({str(rt.dtype).replace('torch.', '')})")
    results, teacher_result = evaluate_models(models, batches, teacher, rt, progress=rt.master)
    rows = ([{"model": TEACHER, "role": "teacher", **teacher_result}] if teacher_result else [])
    rows += [{"model": p, "role": "checkpoint", **r} for p, r in results.items()]
    width = max(len(r["model"]) for r in rows) + 2
    rt.print(f"\n{'model':<{width}}{'role':<12}{'val CE':>10}{'ppl':>10}{'KL to teacher':>15}{'top-1 agree':>13}")
    for r in rows:
        kl = f"{r['kl']:>15.5f}{r['agreement']:>13.4f}" if "kl" in r else f"{'-':>15}{'-':>13}"
        rt.print(f"{r['model']:<{width}}{r['role']:<12}{r['ce']:>10.4f}{r['ppl']:>10.2f}{kl}")
    if OUT and rt.master:
        os.makedirs(os.path.dirname(os.path.abspath(OUT)), exist_ok=True)
        write_json_atomic(OUT, {"val_tokens": n_tok, "config": config, "results": rows})
        rt.print(f"\nwrote {OUT}")
    rt.close()


if __name__ == "__main__":
    main(sys.argv[1:])
