"""What the whole recipe hands back, stage by stage, on a real model: one table (not part of pytest).

    ./.venv/bin/python tests/bench_quality.py --teacher models/smolllm2_135m --data-dir data/fineweb_edu

distill.py runs as a user runs it (subprocesses writing run folders under OUT_DIR), then every
stage's model is evaluated beside the teacher on the same val tokens (common.evaluate):
  weight-norm start   students from the data-blind channel choice (no calibration, no steps)
  calibrated start    the same students after calibration alone (only with STEPS_PER_LAYER=0: else the
                      layer-wise stage calibrates, and its per-layer table in the run folder has the errors)
  layer-wise          calibration, then STEPS_PER_LAYER steps per layer (skipped when 0)
  logits              then KD_STEPS of the logits phase (KL to the teacher)
Each row: val CE, perplexity, its ratio to the teacher's, KL(teacher || model), top-1 agreement,
parameters, and the wall time of the stage. The defaults (all 30 FFNs of SmolLM2-135M at half
width) take about 30 minutes on a 2-core CPU; on a GPU raise the budgets (see the README).
"""

import math
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.config import override  # noqa: E402

TEACHER = "models/smolllm2_135m"  # a real model folder (prepare.py writes it)
DATA_DIR = "data/fineweb_edu"  # its prepared shards
OUT_DIR = "runs/bench_quality"  # the stages' run folders (replaced on every run)
LAYERS = ""  # distill.py's --layers; '' = every layer
STUDENT_KIND = "pruned"  # distill.py's student and its arguments
STUDENT_KWARGS = '{"scale": 0.5}'
CALIB_TOKENS = 65536  # per student: 1.289x after the logits steps (32,768: 1.302x), in 11 min of calibration
LATENT_STREAM = "corrected"  # the start 1.381x against the teacher stream's 1.439x; then 1.211x against 1.219x
STEPS_PER_LAYER = 40  # layer-wise steps: 1.267x after the logits steps, against 1.289x with none, for ~2 min
LR = 3e-3  # their peak LR, distill.py's default (docs/distill.md: the layer-wise learning rate)
KD_STEPS = 140  # logits-phase steps: where the remaining gap closes (7 s each on 2 cores)
KD_LR = 3e-4  # all at 3e-4: 1.348x, at 1e-3: 1.445x; decoders at 1e-3: 1.390x, at 2e-3: 1.496x (same start, tokens)
# (later, a second corpus, one start: 3e-4 1.219x, 1.5e-4 1.217x with KL 0.339 against 0.363: flat between them)
KD_TRAINABLE = "body"  # all but embeddings and head (attention, norms make up for narrow FFNs): 7.0 s a step, all 8.1
BATCH_SIZE = 2  # sequences per step, both phases
SEQ_LEN = 512
EVAL_TOKENS = 16384  # val tokens of the final table (the same for every model)
DISTILL_VAL_TOKENS = 2048  # distill.py's own per-layer validation (kept small: it runs per layer)


def distill_argv(out_dir, *args):
    """distill.py's command line for one stage, after the bench's shared settings."""
    return [
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
        "--layers",
        LAYERS,
        "--latent-stream",
        LATENT_STREAM,
        "--student-kind",
        STUDENT_KIND,
        "--keep-last",
        "1",
        *args,
    ]  # keep-last: a checkpoint per layer is a whole model


def distill(argv):
    """Run distill.py with argv; returns its wall time in seconds."""
    cmd = [sys.executable, os.path.join(ROOT, "distill.py"), *argv]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.time() - t0


def with_kwargs(**extra):
    import json

    return json.dumps({**json.loads(STUDENT_KWARGS), **extra})


def main():
    globals().update(override(globals()).as_dict())  # the constants now hold the run's settings
    import torch

    import distill as distill_script
    from common.checkpoint import load_model
    from common.quality import evaluate_models
    from common.shards import val_batches

    weight = os.path.join(OUT_DIR, "weight")
    # the recipe's layer-wise run calibrates and then steps; with no steps it is the calibrated start
    stage = "layer-wise" if STEPS_PER_LAYER else "calibrated start"
    recipe = os.path.join(OUT_DIR, "layerwise" if STEPS_PER_LAYER else "calibrated")
    weight_args = ["--steps-per-layer", "0", "--calib-tokens", "0"]
    weight_args += ["--student-kwargs", with_kwargs(importance="weight", refit=False)]
    recipe_args = ["--steps-per-layer", str(STEPS_PER_LAYER), "--lr", str(LR), "--calib-tokens", str(CALIB_TOKENS)]
    recipe_args += ["--student-kwargs", STUDENT_KWARGS]
    logits_args = ["--phase", "logits", "--kd-steps", str(KD_STEPS), "--kd-lr", str(KD_LR)]
    logits_args += ["--kd-warmup-steps", str(max(1, KD_STEPS // 10)), "--kd-val-every", str(KD_STEPS)]
    logits_args += ["--kd-save-every", str(KD_STEPS), "--kd-trainable", KD_TRAINABLE]
    stages = {
        "weight-norm start": distill_argv(weight, *weight_args),
        stage: distill_argv(recipe, *recipe_args),
        "logits": distill_argv(recipe, *logits_args),
    }
    for argv in stages.values():  # distill.py's own checks, before any stage runs or OUT_DIR is cleared
        distill_script.check_constants(override(vars(distill_script), argv))
    if os.path.isdir(OUT_DIR):
        shutil.rmtree(OUT_DIR)
    seconds = {name: distill(argv) for name, argv in stages.items()}
    folders = {"weight-norm start": os.path.join(weight, "final"), stage: os.path.join(recipe, "final")}
    folders["logits"] = os.path.join(recipe, "logits_final")
    torch.manual_seed(0)
    teacher = load_model(TEACHER).eval()
    models = {stage: load_model(folder).eval() for stage, folder in folders.items()}
    batches = val_batches(DATA_DIR, EVAL_TOKENS, BATCH_SIZE, SEQ_LEN, vocab_size=teacher.config.vocab_size)
    results, teacher_result = evaluate_models(models, batches, teacher, progress=True)

    def params(model):
        return sum(p.numel() for p in model.parameters())

    n_tok = len(batches) * BATCH_SIZE * SEQ_LEN
    print(
        f"\n{STUDENT_KIND} {STUDENT_KWARGS} in layers {LAYERS or 'all'}; calibration {CALIB_TOKENS:,} tokens, "
        f"{STEPS_PER_LAYER} layer-wise steps, {KD_STEPS} logits steps of {BATCH_SIZE} x {SEQ_LEN}; "
        f"{n_tok:,} val tokens"
    )
    print(
        f"{'stage':<20} {'val CE':>8} {'ppl':>9} {'x teacher':>11} {'KL':>8} {'top-1':>6} {'params':>13} {'wall s':>7}"
    )
    print(
        f"{'teacher':<20} {teacher_result['ce']:>8.4f} {teacher_result['ppl']:>9.4g} {1:>11.3f} {'-':>8} {'-':>6} "
        f"{params(teacher):>13,} {'-':>7}"
    )
    for stage, r in results.items():
        ratio = math.exp(r["ce"] - teacher_result["ce"])
        print(
            f"{stage:<20} {r['ce']:>8.4f} {r['ppl']:>9.4g} {ratio:>11,.3f} {r['kl']:>8.4f} {r['agreement']:>6.3f} "
            f"{params(models[stage]):>13,} {seconds[stage]:>7.0f}"
        )


if __name__ == "__main__":
    main()
