"""Evaluate checkpoints and their teacher on the fixed val tokens: cross-entropy and perplexity of
every model and, for each checkpoint, KL(teacher || checkpoint) and top-1 agreement with the teacher.

    python -m common.evaluate CHECKPOINT [CHECKPOINT ...] [--teacher DIR] [--data-dir DIR]
        [--val-tokens N] [--batch-size B] [--seq-len T] [--out FILE.json]
        [--speed [--contexts 512,2048,8192] [--decode-steps 16]]
        [--tasks lambada_openai,hellaswag,arc_easy,arc_challenge,piqa,winogrande [--limit N] [--task-dir DIR]]
    torchrun --standalone --nproc_per_node N -m common.evaluate CHECKPOINT ... (ranks split the tokens)

--speed adds, measured side by side in this run: parameters (total and per block kind), prefill and
decode tokens/s at each context length (decoding incrementally, common.generate) and the bytes of
decoding state per sequence (KV cache against linear-attention state). --tasks runs lm-evaluation-
harness tasks (the optional `lm_eval` package) on the loaded models. Either prints one comparison
table, each checkpoint beside the teacher with its ratio; --out FILE.json also writes it as FILE.png.

A checkpoint is any folder common.checkpoint.load_model accepts (a distill.py or train.py
checkpoint, or a Hugging Face model folder). Every model sees the same tokens: the first
VAL_TOKENS of the val shards, in whole batches, read from the start on every call. All models are
loaded together so that the teacher runs once per batch; the logits are reduced a chunk of tokens
at a time (common.kd.kd_metrics) and never held for a whole batch: common/quality.py, what train.py and distill.py
validate with.
"""

import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from common import swap
from common.checkpoint import check_has_config, load_model, tokenizer_folder
from common.config import Settings, check_ranges, fail, override
from common.files import check_writable, write_json_atomic
from common.generate import decoding_cache, forward_cached, generate, state_bytes
from common.plots import comparison_png
from common.quality import evaluate_models
from common.runtime import Runtime
from common.shards import ShardError, val_batches

# fmt: off
TEACHER = "models/smolllm2_135m"  # the reference model (prepare.py writes it); '' = no teacher, CE and ppl only
DATA_DIR = "data/fineweb_edu"     # prepare.py's output; its val split is read
VAL_TOKENS = 65536                # val tokens per model (all ranks together), rounded down to whole batches
BATCH_SIZE = 8                    # sequences per batch, per rank
SEQ_LEN = 512                     # tokens per sequence; distill.py's default, so its val CE is comparable
OUT = ""                          # JSON file for the results (written atomically); '' = print the table only
DEVICE = "auto"                   # auto: cuda when there is one, else cpu
DTYPE = "auto"                    # auto: bf16 autocast on GPUs, fp32 on CPU (bf16 is emulated there)
SPEED = False                     # also measure parameters, prefill/decode speed and decoding state (one process)
CONTEXTS = [512, 2048, 8192]      # --speed: context lengths in tokens (val tokens), each measured for every model
DECODE_STEPS = 16                 # --speed: tokens decoded one at a time after a prefill of context - DECODE_STEPS
TASKS = []                        # lm-evaluation-harness tasks (names, or paths of task YAML files); empty = none
TASK_DIR = ""                     # a folder of your own task YAML files (lm_eval's include_path), e.g. local data
LIMIT = 0                         # --tasks: examples per task (quick runs); 0 = all
TASK_BATCH_SIZE = 8               # --tasks: lm_eval's batch size
# fmt: on


# ---------------------------------------------------------------------------------------------- --speed
def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters by where they sit: total, embedding (input embeddings, and the head when untied),
    attention, ffn and other (norms, position embeddings). Tied weights count once."""
    counts = dict.fromkeys(("total", "embedding", "attention", "ffn", "other"), 0)
    blocks = {
        f"{swap.block_path(model, i, target)}.": "attention" if target == "attn" else "ffn"
        for i in range(len(swap.transformer_layers(model)))
        for target in swap.BLOCK_NAMES
    }
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    for name, p in model.named_parameters():
        part = next((part for prefix, part in blocks.items() if name.startswith(prefix)), None)
        part = part or ("embedding" if id(p) in embeddings else "other")
        counts[part] += p.numel()
        counts["total"] += p.numel()
    return counts


def timed(rt: Runtime, fn: Callable, *args: object) -> tuple[float, object]:
    """(seconds, result) of fn(*args), the device synchronized before and after."""
    rt.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    rt.synchronize()
    return time.perf_counter() - t0, out


@torch.no_grad()
def speed_at(models: dict[str, nn.Module], prompt: torch.Tensor, decode_steps: int, rt: Runtime) -> dict[str, dict]:
    """One context, side by side: each model prefills `prompt` (1, n) into a fresh decoding cache, one model
    after another; then they decode `decode_steps` greedy tokens in turns, one token each per turn, so that
    a change in the machine's load hits them alike. Returns {name: {prefill_tok_s, decode_tok_s (1 / the
    median step time), state_bytes, kv_bytes, recurrent_bytes}} (bytes held by the cache at the end)."""
    n = prompt.shape[1]
    caches = {name: decoding_cache(model) for name, model in models.items()}
    prefill_s, step_s, nxt = {}, {name: [] for name in models}, {}
    for name, model in models.items():
        with rt.autocast():
            prefill_s[name], logits = timed(rt, forward_cached, model, prompt, caches[name])
        nxt[name] = logits.argmax(-1, keepdim=True)
    for _ in range(decode_steps):
        for name, model in models.items():
            with rt.autocast():
                seconds, logits = timed(rt, forward_cached, model, nxt[name], caches[name])
            step_s[name].append(seconds)
            nxt[name] = logits.argmax(-1, keepdim=True)
    out = {}
    for name in models:
        held = state_bytes(caches[name])
        out[name] = {
            "prefill_tok_s": n / prefill_s[name],
            "decode_tok_s": 1 / statistics.median(step_s[name]),
            "state_bytes": sum(held.values()),
            "kv_bytes": held["kv"],
            "recurrent_bytes": held["recurrent"],
        }
    return out


def speed_rows(
    models: dict[str, nn.Module], tokens: torch.Tensor, rt: Runtime, contexts: list[int], decode_steps: int
) -> list[dict]:
    """speed_at every context n in `contexts` (a prefill of n - decode_steps tokens: the context ends at n),
    after a warm-up: [{context, model, prefill_tok_s, ...}]."""
    speed_at(models, tokens[:, :16], 2, rt)
    rows = []
    for n in tqdm(contexts, desc="speed", disable=not rt.master):
        at = speed_at(models, tokens[:, : n - decode_steps], decode_steps, rt)
        rows += [{"context": n, "model": name, **r} for name, r in at.items()]
    return rows


# ---------------------------------------------------------------------------------------------- --tasks
def harness_scores(
    args: Settings, models: dict[str, nn.Module], tokenizer: PreTrainedTokenizerBase, rt: Runtime
) -> dict[str, dict]:
    """Each model's accuracy on TASKS through lm-evaluation-harness: {name: {task: {metric, value}}}, the
    metric being acc_norm where the task reports it, else acc, else exact_match (generation tasks).
    The loaded models are wrapped as lm_eval's HFLM, so students of every kind run as they do here;
    text generation (generate_until tasks) goes through common.generate, which decodes every student
    kind incrementally."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError(
            "--tasks needs lm-evaluation-harness: ./.venv/bin/python -m pip install lm_eval==0.4.13 "
            "(./setup_amd.sh installs it from requirements-extra.txt)"
        )

    class CheckpointLM(HFLM):
        def _model_generate(self, context, max_length, stop, **kwargs):
            temperature = kwargs.get("temperature", 0.0) if kwargs.get("do_sample") else 0.0
            return generate(
                self.model,
                context,
                max_length - context.shape[1],
                temperature,
                kwargs.get("top_p", 1.0),
                eos_id=self.tokenizer.eos_token_id,
                real=kwargs["attention_mask"],
            )

    manager = TaskManager(include_path=args.TASK_DIR, include_defaults=False) if args.TASK_DIR else None
    if manager is None or not set(args.TASKS) <= set(manager.all_tasks):  # lm_eval's own tasks: a slower index
        manager = TaskManager(include_path=args.TASK_DIR or None)
    unknown = [t for t in args.TASKS if t not in manager.all_tasks and not os.path.isfile(t)]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {', '.join(unknown)}: use lm_eval's task names, a task YAML file, or "
            f"--task-dir with a folder of your own task YAML files"
        )
    mixed = None if rt.dtype == torch.float32 else rt.dtype
    scores = {}
    for name, model in models.items():
        lm = CheckpointLM(
            pretrained=model,
            backend="causal",
            tokenizer=tokenizer,
            batch_size=args.TASK_BATCH_SIZE,
            mixed_precision_dtype=mixed,
        )
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=args.TASKS,
            limit=args.LIMIT or None,
            task_manager=manager,
            bootstrap_iters=0,
            log_samples=False,
        )["results"]
        scores[name] = {}
        for task, metrics in results.items():
            key = next((k for m in ("acc_norm", "acc", "exact_match") for k in metrics if k.split(",")[0] == m), None)
            if key:
                scores[name][task] = {"metric": key.replace(",none", ""), "value": metrics[key]}
    return scores


# ---------------------------------------------------------------------------------------------- comparison table
def comparison(
    names: list[str], quality: dict[str, dict], params: dict[str, dict], speed: list[dict], tasks: dict[str, dict]
) -> list[dict]:
    """The comparison table as rows {metric, unit, values: {model: value}}, models in `names` order
    (the teacher first); sections that were not measured are left out."""

    def row(metric, unit, value_of):
        return {"metric": metric, "unit": unit, "values": {n: value_of(n) for n in names}}

    rows = [row("val ppl", "ppl", lambda n: quality[n]["ppl"])]
    for part in ("total", "embedding", "attention", "ffn", "other") if params else ():
        rows.append(row(f"parameters (M): {part}", "M", lambda n: params[n][part] / 1e6))
    for n_ctx in sorted({r["context"] for r in speed}):
        at = {r["model"]: r for r in speed if r["context"] == n_ctx}
        rows += [
            row(f"prefill tok/s @{n_ctx}", "tok/s", lambda n: at[n]["prefill_tok_s"]),
            row(f"decode tok/s @{n_ctx}", "tok/s", lambda n: at[n]["decode_tok_s"]),
            row(f"state MiB @{n_ctx}", "MiB", lambda n: at[n]["state_bytes"] / 2**20),
        ]
    for task in sorted({t for n in names for t in tasks.get(n, {})}):
        metric = next(tasks[n][task]["metric"] for n in names if task in tasks.get(n, {}))
        rows.append(
            {
                "metric": f"{task} ({metric})",
                "unit": "acc",
                "values": {n: tasks[n][task]["value"] for n in names if task in tasks.get(n, {})},
            }
        )
    return rows


def format_comparison(rows: list[dict], names: list[str], has_teacher: bool, markdown: bool = False) -> list[str]:
    """The comparison table as text lines: a column per model and, with a teacher (the first name), each
    checkpoint's ratio to it; a last row with the mean task-accuracy ratio. markdown=True: a Markdown table."""
    digits = {"ppl": ".2f", "M": ".4g", "tok/s": ".1f", "MiB": ".2f", "acc": ".4f"}
    header = ["metric"] + [h for k, n in enumerate(names) for h in ([n] if k == 0 or not has_teacher else [n, "ratio"])]
    cells, task_ratios = [], {n: [] for n in names[1:]}

    def ratio(value, reference):
        return f"{value / reference:.2f}x" if value is not None and reference else "-"

    for r in rows:
        line = [r["metric"]]
        for k, n in enumerate(names):
            value = r["values"].get(n)
            line.append("-" if value is None else f"{value:{digits[r['unit']]}}")
            if k and has_teacher:
                line.append(ratio(value, r["values"].get(names[0])))
                if r["unit"] == "acc" and value is not None and r["values"].get(names[0]):
                    task_ratios[n].append(value / r["values"][names[0]])
        cells.append(line)
    if has_teacher and any(task_ratios.values()):
        means = {n: sum(v) / len(v) for n, v in task_ratios.items() if v}
        cells.append(
            ["mean task ratio", ""] + [c for n in names[1:] for c in ("", f"{means[n]:.2f}x" if n in means else "-")]
        )
    if markdown:
        return ["| " + " | ".join(line) + " |" for line in [header, ["---"] * len(header), *cells]]
    widths = [max(len(line[k]) for line in [header, *cells]) for k in range(len(header))]
    return [
        "  ".join(v.ljust(w) if k == 0 else v.rjust(w) for k, (v, w) in enumerate(zip(line, widths)))
        for line in [header, *cells]
    ]


def main(argv: list[str]) -> None:
    usage = "python -m common.evaluate CHECKPOINT [CHECKPOINT ...] [--name value ...]"
    paths = []
    while argv and not argv[0].startswith("-"):
        paths.append(argv.pop(0))
    args = override(globals(), argv, usage)
    tok_dir = check_arguments(args, paths, usage)
    try:
        rt = Runtime(args.DEVICE, args.DTYPE)
    except ValueError as e:
        fail(str(e))
    if (args.SPEED or args.TASKS) and rt.ddp:
        fail("--speed and --tasks measure models in one process: run them with python, not torchrun")
    models = {path: _load(path, rt.device) for path in paths}
    teacher = _load(args.TEACHER, rt.device) if args.TEACHER else None
    every = {**({"teacher": teacher} if teacher else {}), **models}  # the comparison's columns, teacher first
    batches, tokens = read_val(args, every, rt)
    n_tok = len(batches) * args.BATCH_SIZE * args.SEQ_LEN * rt.world_size
    rt.print(
        f"{n_tok:,} val tokens from {args.DATA_DIR}: {len(batches)} batches of {args.BATCH_SIZE} x {args.SEQ_LEN} "
        f"x {rt.world_size} rank(s) on {rt.device} ({str(rt.dtype).replace('torch.', '')})"
    )
    results, teacher_result = evaluate_models(models, batches, teacher, rt, progress=rt.master)
    rows = [{"model": args.TEACHER, "role": "teacher", **teacher_result}] if teacher_result else []
    rows += [{"model": p, "role": "checkpoint", **r} for p, r in results.items()]
    print_quality(rt, rows)
    report = {"val_tokens": n_tok, "config": args.as_dict(), "results": rows}
    if args.SPEED or args.TASKS:
        quality = {**({"teacher": teacher_result} if teacher_result else {}), **results}
        report.update(compare(args, every, quality, tokens, tok_dir, rt))
    if args.OUT and rt.master:
        write_report(args, report, teacher is not None, rt)
    rt.close()


def check_arguments(args: Settings, paths: list[str], usage: str) -> str | None:
    """Exit with one line for arguments that cannot work, before any model loads; return the folder to take a
    tokenizer from (None: none has one)."""
    if not paths and not args.TEACHER:
        fail(f"usage: {usage}  (--help lists the options)")
    check_ranges(
        args.as_dict(),
        at_least={**dict.fromkeys("VAL_TOKENS BATCH_SIZE SEQ_LEN TASK_BATCH_SIZE".split(), 1), "LIMIT": 0},
    )
    check_out(args)
    for path in paths + ([args.TEACHER] if args.TEACHER else []):  # every folder, before loading any model
        try:
            check_has_config(path)
        except FileNotFoundError as e:
            fail(e)
    if args.SPEED and (not args.CONTEXTS or min(args.CONTEXTS) <= args.DECODE_STEPS or args.DECODE_STEPS < 1):
        fail(
            f"--contexts {args.CONTEXTS} must each exceed --decode-steps {args.DECODE_STEPS} (>= 1): each context is a "
            f"prefill of context - decode-steps tokens, then the decoded ones"
        )
    tok_dir = next(filter(None, (tokenizer_folder(p) for p in [args.TEACHER, *paths] if p)), None)
    if args.TASKS and tok_dir is None:
        fail("--tasks needs a tokenizer: neither the teacher nor any checkpoint folder has tokenizer files")
    return tok_dir


def check_out(args: Settings) -> None:
    """Exit with one line, before any model loads, when OUT cannot be written: it is a folder, or its folder is
    read-only (or a file)."""
    if args.OUT and os.path.isdir(args.OUT):
        fail(
            f"--out {args.OUT} is a folder; give the JSON file to write, such as {os.path.join(args.OUT, 'eval.json')}"
        )
    try:
        if args.OUT:
            check_writable(os.path.dirname(os.path.abspath(args.OUT)))
    except ValueError as e:
        fail(f"--out {args.OUT}: {e}; choose another --out")


def _load(path, device):
    try:
        return load_model(path, device)
    except (OSError, ValueError, RuntimeError) as e:
        fail(f"{path}: cannot load it as a model: {str(e).splitlines()[0]}")


def read_val(args: Settings, models: dict[str, nn.Module], rt: Runtime) -> tuple[list, torch.Tensor | None]:
    """The val batches for quality, and with --speed one sequence of max(CONTEXTS) val tokens; exits with one line
    when the models do not fit the data or the contexts."""
    vocab = {name: m.config.vocab_size for name, m in models.items()}
    if len(set(vocab.values())) > 1:
        fail(f"the models have different vocabularies ({vocab}); compare checkpoints of one teacher")
    limit = min(getattr(m.config, "max_position_embeddings", math.inf) for m in models.values())
    if args.SPEED and max(args.CONTEXTS) > limit:
        fail(f"--contexts {args.CONTEXTS} go beyond the models' {limit} positions; lower them")
    try:
        batches = val_batches(
            args.DATA_DIR,
            args.VAL_TOKENS,
            args.BATCH_SIZE,
            args.SEQ_LEN,
            rt.rank,
            rt.world_size,
            next(iter(vocab.values())),
        )
        tokens = (
            val_batches(args.DATA_DIR, max(args.CONTEXTS), 1, max(args.CONTEXTS))[0][0].to(rt.device)
            if args.SPEED
            else None
        )
    except (ShardError, ValueError) as e:
        fail(str(e))
    return batches, tokens


def print_quality(rt: Runtime, rows: list[dict]) -> None:
    """The quality table: val CE, perplexity, KL to the teacher and top-1 agreement of each model."""
    width = max(len(r["model"]) for r in rows) + 2
    rt.print(f"\n{'model':<{width}}{'role':<12}{'val CE':>10}{'ppl':>12}{'KL to teacher':>15}{'top-1 agree':>13}")
    for r in rows:
        kl = f"{r['kl']:>15.5f}{r['agreement']:>13.4f}" if "kl" in r else f"{'-':>15}{'-':>13}"
        rt.print(f"{r['model']:<{width}}{r['role']:<12}{r['ce']:>10.4f}{r['ppl']:>12.6g}{kl}")


def compare(
    args: Settings,
    models: dict[str, nn.Module],
    quality: dict[str, dict],
    tokens: torch.Tensor | None,
    tok_dir: str | None,
    rt: Runtime,
) -> dict:
    """--speed and --tasks: parameters, speed at each context and task scores of every model, printed as one
    comparison table; returns them for the report."""
    from transformers import AutoTokenizer

    params = {name: parameter_counts(m) for name, m in models.items()} if args.SPEED else {}
    speed = speed_rows(models, tokens, rt, args.CONTEXTS, args.DECODE_STEPS) if args.SPEED else []
    try:
        tasks = harness_scores(args, models, AutoTokenizer.from_pretrained(tok_dir), rt) if args.TASKS else {}
    except ValueError as e:
        fail(str(e))
    names = list(models)
    table = comparison(names, quality, params, speed, tasks)
    where = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else f"{torch.get_num_threads()} threads"
    rt.print(
        f"\ncomparison on {rt.device} ({where})"
        + (
            f"; at each context: a prefill of context - {args.DECODE_STEPS} tokens, then {args.DECODE_STEPS} tokens "
            f"decoded one at a time (median step); state = decoding cache per sequence"
            if args.SPEED
            else ""
        )
    )
    for line in format_comparison(table, names, "teacher" in models):
        rt.print(line)
    return {"parameters": params, "speed": speed, "tasks": tasks, "models": names, "comparison": table}


def write_report(args: Settings, report: dict, has_teacher: bool, rt: Runtime) -> None:
    """OUT (JSON), and beside it the comparison's plot when there is one."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.OUT)), exist_ok=True)
        write_json_atomic(args.OUT, report)
        rt.print(f"\nwrote {args.OUT}")
        if "comparison" in report:
            png = os.path.splitext(args.OUT)[0] + ".png"
            comparison_png(png, report["comparison"], report["models"], has_teacher)
            rt.print(f"wrote {png}")
    except OSError as e:  # the disk filled up during the evaluation, say
        fail(f"--out {args.OUT}: cannot write it ({e.strerror}); the results are printed above")


if __name__ == "__main__":
    main(sys.argv[1:])
