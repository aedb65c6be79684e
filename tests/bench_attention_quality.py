"""Attention students side by side on a real model, each through the same recipe: one table (not part of pytest).

    ./.venv/bin/python tests/bench_attention_quality.py --teacher models/smolllm2_135m --data-dir data/fineweb_edu

For each kind in KINDS, distill.py runs as a user runs it (subprocesses writing the run folder OUT_DIR/KIND):
the layer-wise phase on LAYERS (calibration, then STEPS_PER_LAYER steps on SCHEDULE), then KD_STEPS of the
logits phase (skipped when 0). Then every kind's model is measured beside the teacher with common.evaluate's
functions, all models in one process on the same tokens:
  val CE, ppl x teacher, KL, top-1   on EVAL_TOKENS val tokens (evaluate_models): the hybrid's cross-entropy,
                                     its perplexity over the teacher's, KL(teacher || model), top-1 agreement
  x @n                               ppl x teacher on the same number of val tokens cut into sequences of n, for
                                     each n of QUALITY_CONTEXTS: students trained on SEQ_LEN tokens can fall
                                     apart beyond it (the README: lolcats trained on 1,024 reads 1.17x at
                                     2,048 tokens and 1.81x at 8,192 without decay, 1.11x and 1.16x with it,
                                     1.04x and 1.10x with today's defaults: window 256, decay 4, 4 sinks)
  decode tok/s, state MiB @ n        at each context n of CONTEXTS (speed_rows): a prefill of n - DECODE_STEPS
                                     val tokens, then DECODE_STEPS tokens decoded one at a time, the models in
                                     turns (1 / the median step); the decoding cache's bytes per sequence then
  recipe s                           the wall time of the kind's distill.py runs
Printed as one table, the teacher first, and written to OUT_DIR/results.json. A new attention kind is one more
name in KINDS.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from common.config import fail, override  # noqa: E402

TEACHER = "models/smolllm2_135m"  # a real model folder (prepare.py writes it)
DATA_DIR = "data/fineweb_edu"  # its prepared shards
OUT_DIR = "runs/bench_attention_quality"  # a run folder per kind and results.json (replaced on every run)
KINDS = ["linear", "delta", "lolcats", "window"]  # attention kinds (registered for attn), through one recipe
STUDENT_KWARGS = {}  # per kind, its --student-kwargs, JSON: '{"window": {"window": 512}}'; absent = defaults
LAYERS = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28]  # every second layer of SmolLM2's 30: a hybrid
KEEP_TEACHER_LAYERS = []  # distill.py's --keep-teacher-layers (removed from LAYERS)
SCHEDULE = "parallel"  # all layers per teacher pass, as RADLADS step 1; rotation: one layer at a time
CALIB_TOKENS = 32768  # calibration tokens per student (a kind without calibrate() has none)
STEPS_PER_LAYER = 200  # layer-wise steps (parallel: steps of all layers at once)
LR = 1e-3  # their peak LR (cosine to distill.py's MIN_LR_RATIO x LR)
KD_STEPS = 100  # logits-phase steps after the layer-wise phase; 0 = none
KD_LR = 1e-3  # its peak LR (distill.sh's)
BATCH_SIZE = 2  # sequences per step, both phases and the evaluation
SEQ_LEN = 512  # RADLADS' sequence length in steps 1 and 2
EVAL_TOKENS = 16384  # val tokens of the table's quality columns (the same for every model)
DISTILL_VAL_TOKENS = 2048  # distill.py's own validation (kept small: it is not the table's)
CONTEXTS = [2048, 8192]  # context lengths of the speed and state columns (the teacher's KV cache grows with them)
DECODE_STEPS = 8  # tokens decoded after each prefill: decode tok/s is 1 / their median step (bounded on a CPU)
QUALITY_CONTEXTS = [2048]  # also ppl x teacher on sequences this long (one a batch): quality beyond SEQ_LEN


def distill(out_dir, *args):
    """Run distill.py into `out_dir`; returns its wall time in seconds, or exits naming the run that failed."""
    cmd = [
        sys.executable,
        os.path.join(_ROOT, "distill.py"),
        "--teacher",
        TEACHER,
        "--data-dir",
        DATA_DIR,
        "--out-dir",
        out_dir,
        "--batch-size",
        str(BATCH_SIZE),
        "--seq-len",
        str(SEQ_LEN),
        "--val-tokens",
        str(DISTILL_VAL_TOKENS),
        "--keep-last",
        "1",
        *args,
    ]  # keep-last: only the last of a rotation's per-layer checkpoints (the table needs none of them)
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    if subprocess.run(cmd, cwd=_ROOT).returncode:
        fail(f"distill.py failed in {out_dir} (its message is above); the table needs every kind's run")
    return time.time() - t0


def recipe(kind):
    """The kind's whole recipe in OUT_DIR/kind: the layer-wise phase, then the logits phase. Returns the folder of
    the model it ends with and the recipe's wall time in seconds."""
    out_dir = os.path.join(OUT_DIR, kind)
    seconds = distill(
        out_dir,
        "--target",
        "attn",
        "--student-kind",
        kind,
        "--student-kwargs",
        json.dumps(STUDENT_KWARGS.get(kind, {})),
        "--layers",
        ",".join(map(str, LAYERS)),
        "--keep-teacher-layers",
        ",".join(map(str, KEEP_TEACHER_LAYERS)),
        "--schedule",
        SCHEDULE,
        "--calib-tokens",
        str(CALIB_TOKENS),
        "--steps-per-layer",
        str(STEPS_PER_LAYER),
        "--lr",
        str(LR),
        "--warmup-steps",
        str(max(1, STEPS_PER_LAYER // 10)),
    )
    if not KD_STEPS:
        return os.path.join(out_dir, "final"), seconds
    seconds += distill(
        out_dir,
        "--phase",
        "logits",
        "--kd-steps",
        str(KD_STEPS),
        "--kd-lr",
        str(KD_LR),
        "--kd-warmup-steps",
        str(max(1, KD_STEPS // 10)),
        "--kd-val-every",
        str(KD_STEPS),
        "--kd-save-every",
        str(KD_STEPS),
    )
    return os.path.join(out_dir, "logits_final"), seconds


def check_inputs():
    """One line for what would fail only after the recipes ran: kinds, contexts, the teacher's positions and the
    val tokens. Returns the val batches, {n: those as sequences of n} for QUALITY_CONTEXTS and the speed columns'
    one sequence of max(CONTEXTS) val tokens."""
    from transformers import AutoConfig

    from common.shards import ShardError, val_batches
    from common.students import STUDENTS

    known = ", ".join(k for t, k in STUDENTS if t == "attn")
    unknown = [k for k in KINDS if ("attn", k) not in STUDENTS]
    if not KINDS or unknown:
        fail(f"KINDS {KINDS} must name attention students, one or more of those registered: {known}")
    if not CONTEXTS or min(CONTEXTS) <= DECODE_STEPS or DECODE_STEPS < 1:
        fail(f"CONTEXTS {CONTEXTS} must each exceed DECODE_STEPS {DECODE_STEPS} (>= 1)")
    if any(n < 1 or n > EVAL_TOKENS for n in QUALITY_CONTEXTS):
        fail(f"QUALITY_CONTEXTS {QUALITY_CONTEXTS} must each be in 1..EVAL_TOKENS ({EVAL_TOKENS}): a sequence each")
    if not os.path.isfile(os.path.join(TEACHER, "config.json")):
        fail(f"{TEACHER}: not a model folder (no config.json); pass the model folder prepare.py wrote")
    try:
        config = AutoConfig.from_pretrained(TEACHER)
        positions = getattr(config, "max_position_embeddings", math.inf)
        if max(CONTEXTS + QUALITY_CONTEXTS) > positions:
            fail(
                f"CONTEXTS {CONTEXTS} or QUALITY_CONTEXTS {QUALITY_CONTEXTS} go beyond the teacher's {positions} "
                "positions; lower them"
            )
        batches = val_batches(DATA_DIR, EVAL_TOKENS, BATCH_SIZE, SEQ_LEN, vocab_size=config.vocab_size)
        long = {
            n: val_batches(DATA_DIR, EVAL_TOKENS // n * n, 1, n, vocab_size=config.vocab_size) for n in QUALITY_CONTEXTS
        }
        tokens = val_batches(DATA_DIR, max(CONTEXTS), 1, max(CONTEXTS), vocab_size=config.vocab_size)[0][0]
    except (OSError, ShardError, ValueError) as e:
        fail(str(e).splitlines()[0])
    return batches, long, tokens


def table(rows, n_tok):
    """The printed table: one line per model, the teacher first."""
    print(
        f"\nattention students in layers {','.join(map(str, LAYERS))} (keep teacher: "
        f"{','.join(map(str, KEEP_TEACHER_LAYERS)) or 'none'}); {SCHEDULE} schedule: calibration "
        f"{CALIB_TOKENS:,} tokens, {STEPS_PER_LAYER} steps at LR {LR}; {KD_STEPS} logits steps at KD_LR {KD_LR}; "
        f"{BATCH_SIZE} x {SEQ_LEN} tokens a step; {n_tok:,} val tokens. x @n: ppl x teacher on sequences of n; "
        f"tok/s @n: decode tokens/s at n tokens of "
        f"context ({DECODE_STEPS} steps after a prefill of n - {DECODE_STEPS}); MiB @n: the decoding state then"
    )
    width = max(len(r["model"]) for r in rows) + 2
    speed = "".join(f"{f'tok/s @{n}':>13}{f'MiB @{n}':>12}" for n in CONTEXTS)
    long = "".join(f"{f'x @{n}':>10}" for n in QUALITY_CONTEXTS)
    print(f"{'model':<{width}}{'val CE':>8}{'ppl x teacher':>15}{'KL':>9}{'top-1':>8}{long}{speed}{'recipe s':>10}")
    for r in rows:
        quality = f"{r['kl']:>9.4f}{r['agreement']:>8.3f}" if r["kl"] is not None else f"{'-':>9}{'-':>8}"
        long = "".join(f"{r['ppl_ratio_at'][n]:>10.3f}" for n in QUALITY_CONTEXTS)
        at = "".join(f"{s['decode_tok_s']:>13.1f}{s['state_bytes'] / 2**20:>12.2f}" for s in r["speed"])
        wall = f"{r['recipe_s']:>10.0f}" if r["recipe_s"] is not None else f"{'-':>10}"
        print(f"{r['model']:<{width}}{r['val_ce']:>8.4f}{r['ppl_ratio']:>15.3f}{quality}{long}{at}{wall}")


def main():
    config = override(globals()).as_dict()
    globals().update(config)  # the constants now hold the run's settings
    batches, long_batches, tokens = check_inputs()
    from common.checkpoint import load_model
    from common.evaluate import evaluate_models, speed_rows
    from common.files import write_json_atomic
    from common.runtime import Runtime

    if os.path.isdir(OUT_DIR):
        shutil.rmtree(OUT_DIR)
    finals, seconds = {}, {}
    for kind in KINDS:
        finals[kind], seconds[kind] = recipe(kind)
    rt = Runtime()
    teacher = load_model(TEACHER, rt.device).eval()
    models = {kind: load_model(folder, rt.device).eval() for kind, folder in finals.items()}
    results, teacher_result = evaluate_models(models, batches, teacher, rt, progress=True)
    at = {n: evaluate_models(models, b, teacher, rt, progress=True) for n, b in long_batches.items()}
    speed = speed_rows({"teacher": teacher, **models}, tokens.to(rt.device), rt, CONTEXTS, DECODE_STEPS)
    rows = []
    for name, r in {"teacher": teacher_result, **results}.items():
        rows.append(
            {
                "model": name,
                "val_ce": r["ce"],
                "ppl": r["ppl"],
                "ppl_ratio": math.exp(r["ce"] - teacher_result["ce"]),
                "ppl_ratio_at": {
                    n: math.exp((m[name] if name in m else t)["ce"] - t["ce"]) for n, (m, t) in at.items()
                },
                "kl": r.get("kl"),
                "agreement": r.get("agreement"),
                "speed": [{k: v for k, v in s.items() if k != "model"} for s in speed if s["model"] == name],
                "recipe_s": seconds.get(name),
                "folder": finals.get(name, TEACHER),
            }
        )
    n_tok = len(batches) * BATCH_SIZE * SEQ_LEN
    table(rows, n_tok)
    out = os.path.join(OUT_DIR, "results.json")
    write_json_atomic(out, {"config": config, "val_tokens": n_tok, "device": str(rt.device), "rows": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
