"""Layer-wise distillation of a decoder-only LM's decoders, then full-model logits distillation.

Phase 'layerwise' (default). A decoder is the swappable block of a layer (TARGET: the FFN 'mlp' or
self-attention 'attn'). For layer i, the input latent to its decoder is fed to both the teacher's decoder and
the student; only the student trains, to match the teacher's output (LATENT_STREAM: the teacher's latent, or by
default in FFN rotations the latent of the model with the earlier students in, and the output that puts the
teacher's hidden state back).
  - SCHEDULE=rotation: one layer at a time, STEPS_PER_LAYER steps each, in layer order. The teacher's
    residual stream for the rotation's tokens is cached and advanced one layer at a time, so a
    rotation costs O(L) teacher layer-forwards per token and never runs layers after i or the head.
  - SCHEDULE=parallel: one teacher pass per batch gives every layer its input and target and all
    students train at once, each on its own teacher input (RADLADS step 1, LoLCATs attention transfer).
Before its first step a student that can calibrate fits itself to CALIB_TOKENS tokens (least squares).
A checkpoint follows each layer (rotation) or every SAVE_EVERY steps (parallel); OUT/final/ is the
teacher with every distilled decoder replaced by its student.

Phase 'logits' (--phase logits): the student model's next-token distribution is trained toward the
teacher's, KL(teacher || student) at KD_TEMPERATURE plus KD_CE_WEIGHT x cross-entropy (RADLADS step 2),
with its own optimizer and LR schedule.

    python distill.py [--name value ...]        (--help lists the constants below)
    torchrun --standalone --nproc_per_node N distill.py [--name value ...]

Map of this file: main() resolves the constants below and the command line into one read-only Settings (`args`,
carried on Run: no function reads the constants themselves), checks them, loads and checks the inputs, opens the
run folder and runs one phase. layerwise_phase() -> train_rotation() -> distill_layer() -> train_layer(), or
train_parallel(); logits_phase() -> logits_losses() and validate_logits(). The pieces both phases share follow them.
"""

import copy
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import memory, parallel
from common.checkpoint import (
    built_with,
    load_model,
    load_state,
    load_swapped_students,
    read_student_specs,
    restore_training,
    run_record,
    save_checkpoint,
    teacher_ref,
    training_state,
)
from common.config import Settings, check_ranges, exit_on_stop_signals, exit_when_disk_full, fail, override
from common.files import read_json, write_json_atomic
from common.kd import final_hidden, kd_loss, lm_head
from common.latent_cache import LatentCache, cache_bytes, free_bytes, place_cache
from common.offload import home_device, offload_layers, resident
from common.optim import adamw, lr_at, step_optimizer
from common.plots import run_png
from common.quality import evaluate
from common.run_folder import (
    check_unchanged,
    folder_name,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    start_run,
)
from common.runtime import RunLog, Runtime, due, environment, get_rng_state
from common.shards import ShardError, TokenLoader, read_shard, shard_files, val_batches
from common.students import make_student
from common.swap import (
    LayerCalls,
    block_path,
    check_layers,
    check_target,
    embed,
    get_block,
    run_layer,
    starting_at,
    student_specs,
    swapped,
    transformer_layers,
)

# fmt: off
# ---------------------------------------------------------------------------------------------- run constants
TEACHER = "models/smolllm2_135m"  # teacher model folder (prepare.py writes it); a checkpoint folder works too
DATA_DIR = "data/fineweb_edu"     # shards and manifest from prepare.py
OUT_DIR = ""                      # run folder; empty = runs/distill_<date>_<time>
RESUME = False                    # continue the run in OUT_DIR from its latest checkpoint of this phase
PHASE = "layerwise"               # layerwise: match decoder outputs; logits: next-token distributions; choose: layers
# data and batch (both phases)
BATCH_SIZE = 8                    # sequences per micro-batch, per rank
SEQ_LEN = 512                     # tokens per sequence
GRAD_ACCUM = 1                    # micro-batches per optimizer step
VAL_TOKENS = 8192                 # held-out val tokens (all ranks together), the same ones every time
# optimizer (both phases; each has its own LR schedule, below)
WEIGHT_DECAY = 0.0                # students start at or near the teacher: no pull toward zero by default
GRAD_CLIP = 1.0                   # max gradient norm per optimizer step; 0 turns clipping off
# logging and checkpoints (both phases)
LOG_EVERY = 10                    # log the loss at step 1 and every N steps (a host sync on GPUs); 0 = at val/save/end
KEEP_LAST = 0                     # keep the newest K checkpoints of the phase, delete the rest (disk); 0 = keep all
# layer-wise phase
TARGET = "mlp"                    # the block each layer swaps: mlp (FFN) or attn (self-attention)
STUDENT_KIND = "prototype"        # a registered student: mlp: copy/prototype/pruned; attn: linear/delta/lolcats/window
STUDENT_KWARGS = {}               # the student's arguments, JSON: '{"scale": 0.5, "activation": "relu2"}'
CALIB_TOKENS = 262144             # tokens (all ranks) each student fits on first; fewer miss rare tokens; 0 = off
LATENT_STREAM = "auto"            # teacher, student or corrected (docs); auto: corrected in FFN rotations, else teacher
LAYERS = []                       # layer indices to distill; empty = every layer
KEEP_TEACHER_LAYERS = []          # layers that keep the teacher's block (hybrids); removed from LAYERS
SCHEDULE = "rotation"             # rotation (one layer at a time) or parallel (all layers per teacher pass)
ROTATIONS = 1                     # passes over LAYERS, each on fresh tokens
STEPS_PER_LAYER = 100             # optimizer steps each layer gets per rotation; 0 = calibration only
LR = 3e-3                         # peak learning rate of each layer's schedule (best measured: docs/distill.md)
WARMUP_STEPS = 10                 # linear warmup at the start of each layer's schedule
MIN_LR_RATIO = 0.1                # each layer's cosine decay ends at this fraction of LR
DECODER_LOSS = "mse"              # mse, nmse (per token, / teacher's squared norm), cosine, or kl (model KL, slow)
TRAINABLE = []                    # train only student parameters whose names contain one of these; empty = all
VAL_EVERY = 0                     # also validate every N steps inside a layer (parallel: the whole run); 0 = off
SAVE_EVERY = 0                    # parallel schedule: checkpoint every N steps; 0 = only the final one
# choose phase: which layers to convert
CONVERT = 0                       # layers to convert, those whose conversion alone costs the least KL; 0 = half
CHOSEN = False                    # layer-wise: distill the layers this run's choose phase converts (OUT/choice.json)
# logits phase
INIT = ""                         # checkpoint to start from; empty = this run's latest layer-wise checkpoint
KD_TRAINABLE = "decoders"         # decoders: students train; all: the whole student model; body: all but the embeddings
KD_STEPS = 100                    # optimizer steps of the logits phase
KD_LR = 1e-3                      # its own peak LR: never inherited from the layer-wise phase
KD_WARMUP_STEPS = 10              # its own warmup, then cosine decay to KD_MIN_LR_RATIO x KD_LR
KD_MIN_LR_RATIO = 0.1             # where its cosine ends, as a fraction of KD_LR; 1 = a flat KD_LR (RADLADS step 2)
KD_TEMPERATURE = 1.0              # softens both distributions; the loss is scaled by T^2
KD_CE_WEIGHT = 0.0                # weight of next-token cross-entropy mixed into the KL loss
KD_VAL_EVERY = 50                 # validate (val CE, KL to the teacher) every N steps
KD_SAVE_EVERY = 50                # checkpoint every N steps
KD_FRESH_TOKENS = True            # continue after the tokens the init checkpoint consumed, not from the start
# system (memory: layer-wise phase; GPUs: logits phase; precision and seed: both)
LATENT_CACHE = "auto"             # where the latent caches live: auto, device, host or disk
TEACHER_ON = "auto"               # teacher layers on the device, or in host memory one at a time on it; auto: by fit
PARALLEL = "ddp"                  # ddp: each rank holds the whole models; fsdp: FSDP2 shards them over the ranks
ACTIVATION_CHECKPOINTING = False  # recompute each layer's activations in backward: less memory, ~1/3 more compute
DTYPE = "auto"                    # auto: bf16 autocast on GPU (fp32 master weights, bf16 frozen ones), fp32 on CPU
SEED = 1337                       # student initialisation (layer i uses SEED + i) and any sampling
# fmt: on


# ---------------------------------------------------------------------------------------------- main
class Batch(NamedTuple):
    """The numbers the batch constants and the world size give, computed once (batch_numbers) and carried on Run."""

    batch_tokens: int  # tokens per micro-batch on each rank: BATCH_SIZE x SEQ_LEN
    tokens_per_step: int  # tokens per optimizer step over all ranks: batch_tokens x GRAD_ACCUM x ranks
    calib_batches: int  # micro-batches per rank that hold CALIB_TOKENS (all ranks together), rounded up
    calib_tokens: int  # the tokens (all ranks) a student calibrates on: CALIB_TOKENS rounded up to whole batches


def batch_numbers(args, world_size):
    """The Batch of the settings `args` on `world_size` ranks."""
    batch_tokens = args.BATCH_SIZE * args.SEQ_LEN
    calib_batches = -(-args.CALIB_TOKENS // (batch_tokens * world_size))
    batch = Batch(
        batch_tokens,
        batch_tokens * args.GRAD_ACCUM * world_size,
        calib_batches,
        calib_batches * batch_tokens * world_size,
    )
    assert batch.tokens_per_step == args.BATCH_SIZE * args.SEQ_LEN * args.GRAD_ACCUM * world_size
    assert args.CALIB_TOKENS <= batch.calib_tokens < args.CALIB_TOKENS + batch_tokens * world_size
    return batch


@dataclass
class Run:
    """What the phases share: the settings, the ranks and device, the run folder, the batch's numbers, and the
    metrics log (rank 0 writes)."""

    args: Settings  # the run's constants, resolved (override): args.BATCH_SIZE
    rt: Runtime
    out_dir: str
    batch: Batch
    log: RunLog | None = None
    teacher: dict | None = None  # teacher_ref(TEACHER), for checkpoints of the students alone (rank 0)


def main(argv=None):
    """distill.py with the command line `argv` (default: sys.argv[1:])."""
    args = override(globals(), argv)
    check_constants(args)
    args = resolve_latent_stream(args)
    try:
        rt = Runtime(dtype=args.DTYPE)
        if args.PHASE == "logits":
            parallel.check(args.PARALLEL, rt.world_size)
    except ValueError as e:
        fail(str(e))
    run = Run(args, rt, folder_name(rt, args.OUT_DIR, "distill"), batch_numbers(args, rt.world_size))
    exit_on_stop_signals(run.out_dir)
    config = {**args.as_dict(), "OUT_DIR": run.out_dir}  # what the run folder records
    # reopened: a resumed run, the logits phase after the layer-wise one, the layer-wise phase after the choose one
    reopen = args.RESUME or (args.PHASE == "logits" and not args.INIT) or (args.PHASE == "layerwise" and args.CHOSEN)
    torch.manual_seed(args.SEED)
    try:
        if reopen:  # lock the run before reading its checkpoints: a run still going in it would change them
            open_run(run, config, reopen)
        if args.PHASE in ("layerwise", "choose"):
            model, layers, val = layerwise_inputs(run)
        else:
            models = logits_inputs(run)
            val = check_data(run, models.model.config.vocab_size)
        if not reopen:  # a new run's folder appears only once everything it needs has been checked
            open_run(run, config, reopen)
    except (ShardError, ValueError, OSError) as e:
        fail(str(e))
    with exit_when_disk_full(run.out_dir):
        start_log(run, config, reopen)
        run.teacher = teacher_ref(args.TEACHER) if rt.master else None
        try:
            if args.PHASE == "logits":
                logits_phase(run, models, val)
            else:
                (layerwise_phase if args.PHASE == "layerwise" else choose_phase)(run, model, layers, val)
        except (ShardError, ValueError, FileNotFoundError) as e:
            fail(str(e))
    rt.close()


def resolve_latent_stream(args):
    """LATENT_STREAM=auto: corrected in a rotation of the layer-wise phase on FFNs (it measured best there,
    docs/distill.md), teacher elsewhere: attention students (every attention of SmolLM2 converted, the corrected
    targets asked the layers after 11 to rebuild a 23,000-sized activation and the model collapsed; the teacher
    stream did not), and where each layer trains or is measured on its own teacher input (the parallel schedule,
    the choose phase). The run's records hold the resolved value."""
    if args.LATENT_STREAM != "auto":
        return args
    ffn_rotation = args.PHASE == "layerwise" and args.SCHEDULE == "rotation" and args.TARGET == "mlp"
    return Settings({**args.as_dict(), "LATENT_STREAM": "corrected" if ffn_rotation else "teacher"})


def check_constants(args):
    """Every setting that can be checked without the model or the data, before anything runs."""
    choices = {
        "PHASE": ("layerwise", "logits", "choose"),
        "SCHEDULE": ("rotation", "parallel"),
        "DECODER_LOSS": ("mse", "nmse", "cosine", "kl"),
        "LATENT_STREAM": ("auto", "teacher", "student", "corrected"),
        "LATENT_CACHE": ("auto", "device", "host", "disk"),
        "TEACHER_ON": ("auto", "device", "host"),
        "KD_TRAINABLE": ("decoders", "all", "body"),
        "PARALLEL": parallel.MODES,
    }
    at_least_1 = "ROTATIONS KD_STEPS BATCH_SIZE SEQ_LEN GRAD_ACCUM KD_VAL_EVERY KD_SAVE_EVERY".split()
    at_least_0 = (
        "STEPS_PER_LAYER CALIB_TOKENS WARMUP_STEPS KD_WARMUP_STEPS LOG_EVERY VAL_EVERY SAVE_EVERY KEEP_LAST WEIGHT_DECAY "
        "GRAD_CLIP CONVERT".split()
    )
    check_ranges(
        args.as_dict(),
        choices,
        at_least={**dict.fromkeys(at_least_1, 1), **dict.fromkeys(at_least_0, 0)},
        notes={
            "STEPS_PER_LAYER": " (0: calibration only)",
            "CALIB_TOKENS": " (0 turns calibration off)",
            "GRAD_CLIP": " (0 turns clipping off)",
            "LOG_EVERY": " (0: only where it validates or saves, and at the end)",
            "KEEP_LAST": " (0 keeps every checkpoint)",
        },
        positive=["KD_TEMPERATURE", "LR", "KD_LR"],
        fractions=["MIN_LR_RATIO", "KD_MIN_LR_RATIO", "KD_CE_WEIGHT"],
    )
    if args.PHASE == "choose" and args.RESUME:
        choice = os.path.join(args.OUT_DIR, "choice.json")
        if not (args.OUT_DIR and os.path.exists(choice)):
            fail("the choose phase does not resume (it saves no training state): run it again in a new --out-dir")
        if int(os.environ.get("RANK", "0")) == 0:  # a resumed hybrid recipe (distill.sh) passes over it
            print(f"the choose phase is finished: {choice}")
        raise SystemExit(0)
    if args.DECODER_LOSS == "kl" and args.SCHEDULE == "parallel":
        fail(
            "DECODER_LOSS=kl swaps one layer's student in at a time (the rotation); for the KL of the model with "
            "every student in, train them with --phase logits after this phase"
        )
    if args.LATENT_STREAM == "corrected" and args.SCHEDULE == "parallel":
        fail(
            "LATENT_STREAM=corrected keeps the teacher's stream beside the students' layer by layer (the rotation's "
            "cache); with --schedule parallel use --latent-stream teacher or student"
        )
    if args.DECODER_LOSS == "kl" and args.TEACHER_ON == "host":
        fail(
            "DECODER_LOSS=kl runs the whole model every step, so it keeps the teacher on the device: --teacher-on auto"
        )


def open_run(run, config, reopen):
    """Rank 0 creates the run folder, or reopens it (reopen: --resume, the logits phase after the layer-wise one,
    or the layer-wise phase of the layers the choose phase chose: CHOSEN), locked for the life of this process; a
    resumed phase must keep the constants its checkpoints were made with (config_PHASE.json). Raises ValueError on
    every rank when rank 0 refuses."""
    args = run.args

    def start():
        # the logits phase as phase 2 of the layer-wise run in the run folder
        if args.PHASE == "logits" and not args.INIT and not args.RESUME:
            if not os.path.exists(os.path.join(run.out_dir, "run.json")):
                raise ValueError(
                    f"{run.out_dir}: no distill run here to continue; run the layer-wise phase into "
                    f"it first, or pass --init CHECKPOINT"
                )
            if list_checkpoints(run.out_dir, "logits"):
                raise ValueError(
                    f"{run.out_dir} already holds logits-phase checkpoints; pass --resume to continue them"
                )
        if args.PHASE == "layerwise" and args.CHOSEN and not args.RESUME:
            if not os.path.exists(os.path.join(run.out_dir, "choice.json")):
                raise ValueError(
                    f"{run.out_dir}: no choice.json here, so no layers chosen; run --phase choose into this "
                    f"--out-dir first, or drop --chosen and pass --layers"
                )
            if list_checkpoints(run.out_dir, "layerwise"):
                raise ValueError(f"{run.out_dir} already holds layer-wise checkpoints; pass --resume to continue them")
        start_run(run.out_dir, reopen, "distill.py", config, scratch=[".latent_*"])  # disk latent caches
        saved = os.path.join(run.out_dir, f"config_{args.PHASE}.json")
        if args.RESUME and os.path.exists(saved):
            first = read_json(saved, "the run folder is damaged; start a new run in another --out-dir")["config"]
            check_unchanged(first, config, may_change_on_resume(args.PHASE), saved)

    run.rt.master_only(start)


def start_log(run, config, reopen):
    """Rank 0 records the phase's config and environment (OUT/config_PHASE.json) and opens metrics.jsonl, from which a
    reopened run first drops what it will redo."""
    args, rt = run.args, run.rt
    run.log = RunLog(rt, run.out_dir)
    if rt.master:
        write_json_atomic(
            os.path.join(run.out_dir, f"config_{args.PHASE}.json"), {"config": config, "environment": environment(rt)}
        )
        if reopen:
            run.log.trim(logged_by(args.PHASE, latest_checkpoint(run.out_dir, args.PHASE)))
    rt.print(
        f"run folder {run.out_dir} | device {rt.device} | dtype {str(rt.dtype).replace('torch.', '')} | "
        f"world size {rt.world_size}"
    )


def logged_by(phase, checkpoint):
    """Which metrics records a reopened run keeps: those of the other phase, and those `phase` logged up to its
    checkpoint `checkpoint` (None: none, the phase starts over); the rest are redone. A record's place is its step
    and, in a rotation (where layers of 0 steps share a step), its rotation and layer."""
    meta = read_json(os.path.join(checkpoint, "meta.json"), "") if checkpoint else None
    fields = ("step", "rotation", "layer") if meta and "layer" in meta else ("step",)

    def keep(record):
        if record.get("phase") != phase:
            return True
        return meta is not None and [record[f] for f in fields] <= [meta[f] for f in fields]

    return keep


def may_change_on_resume(phase):
    """Constants a resumed `phase` may change: where and how often it reports and saves, where it keeps its teacher,
    latents and activations, and the other phase's own constants. Every other constant (one added later too, until
    it is listed here) defines the phase's result, so a resume that changes it is refused."""
    reporting = set(
        "OUT_DIR RESUME LOG_EVERY VAL_EVERY SAVE_EVERY KEEP_LAST LATENT_CACHE TEACHER_ON KD_VAL_EVERY KD_SAVE_EVERY "
        "ACTIVATION_CHECKPOINTING".split()
    )
    layerwise_only = set(
        "TARGET STUDENT_KIND STUDENT_KWARGS LAYERS KEEP_TEACHER_LAYERS SCHEDULE ROTATIONS STEPS_PER_LAYER LR "
        "WARMUP_STEPS MIN_LR_RATIO DECODER_LOSS TRAINABLE CALIB_TOKENS LATENT_STREAM CHOSEN".split()
    )
    logits_only = set(
        "INIT KD_TRAINABLE KD_STEPS KD_LR KD_WARMUP_STEPS KD_MIN_LR_RATIO KD_TEMPERATURE KD_CE_WEIGHT "
        "KD_FRESH_TOKENS PARALLEL ACTIVATION_CHECKPOINTING".split()
    )
    return reporting | {"CONVERT"} | (logits_only if phase == "layerwise" else layerwise_only)


# ---------------------------------------------------------------------------------------------- layer-wise phase
def layerwise_inputs(run):
    """The teacher, the layers to distill and the val batches, with a student of the kind asked for built once
    and the data opened: everything the phase needs, checked before the run folder exists. The teacher is read into
    host memory, in the frozen dtype (bf16 on GPUs), and placed once the phase's memory estimate is found to fit."""
    args, rt = run.args, run.rt
    model = load_model(args.TEACHER, dtype=rt.frozen_dtype).eval().requires_grad_(False)
    try:
        check_target(model, args.TARGET)
    except ValueError as e:
        fail(f"TARGET={args.TARGET!r}: {e}")
    layers = args.LAYERS if args.LAYERS else list(range(len(transformer_layers(model))))
    if args.PHASE == "layerwise" and args.CHOSEN:  # the run folder is open: its choice.json was checked there
        choice = os.path.join(run.out_dir, "choice.json")
        layers = read_json(choice, "the run folder is damaged; run --phase choose in a new --out-dir")["convert"]
    check_layers(model, layers)
    check_layers(model, args.KEEP_TEACHER_LAYERS, "KEEP_TEACHER_LAYERS")
    layers = sorted(set(layers) - set(args.KEEP_TEACHER_LAYERS))
    if not layers:
        fail(
            f"no layer left to distill: LAYERS={args.LAYERS or 'all'} minus "
            f"KEEP_TEACHER_LAYERS={args.KEEP_TEACHER_LAYERS}"
        )
    if args.PHASE == "choose" and not 1 <= (args.CONVERT or len(layers) // 2) <= len(layers):
        fail(f"CONVERT must be 1..{len(layers)} (of the layers to choose from; 0 = half of them), got {args.CONVERT}")
    check_no_students(args, model, layers)
    with torch.random.fork_rng(devices=[]):  # STUDENT_KIND, STUDENT_KWARGS and TRAINABLE; the RNG is left as it was
        student = make_students(args, model, layers[:1], "cpu")[layers[0]]
        trainable_params(student, f"layer {layers[0]}", args.TRAINABLE)
    val = check_data(run, model.config.vocab_size)
    model = place_teacher(run, model, lambda where: layerwise_memory(run, model, layers, student, len(val), where))
    return model, layers, val


def place_teacher(run, model, estimate):
    """The teacher on the device, or (TEACHER_ON=host) with its decoder layers in host memory, each visiting the
    device while it computes (common/offload.py); TEACHER_ON=auto keeps it on the device when the phase fits there.
    `estimate(where)` is the phase's memory estimate with the teacher's layers there, printed and checked first."""
    args, rt = run.args, run.rt
    held = memory.model_bytes(model) if rt.device.type == "cpu" else 0  # on a CPU the teacher takes device memory
    free = free_bytes("device", rt, ".") + held  # already: free is what the phase has, the teacher counted in it
    where = "device" if args.DECODER_LOSS == "kl" else args.TEACHER_ON  # kl: every layer in every step
    if where == "auto":
        where = "host" if rt.device.type == "cuda" and sum(estimate("device").values()) > free else "device"
    terms = estimate(where)
    cuda = rt.device.type == "cuda"
    remedies = ["--teacher-on host"] if cuda and where == "device" else []
    remedies += [f"--latent-cache {'host' if cuda else 'disk'}"] if terms["latent cache"] else []
    check_memory(run, terms, free, [*remedies, "a smaller --batch-size or --seq-len"])
    if where == "host":
        rt.print(f"teacher layers in host memory, one at a time on {rt.device} (TEACHER_ON={args.TEACHER_ON})")
        return offload_layers(model, rt.device)
    return model.to(rt.device)


def layerwise_memory(run, model, layers, student, n_val, teacher_on):
    """common.memory's estimate of the layer-wise phase on one GPU with the teacher's layers on `teacher_on`: a
    student like `student` in each of `layers`, one training at a time in a rotation and all at once in the parallel
    schedule, and the latent cache where it is sure to be on the device (LATENT_CACHE=auto on a GPU puts it there
    only when it fits what the rest leaves)."""
    args = run.args
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    plan = memory.Plan(
        tokens=run.batch.batch_tokens,
        trained=trained * (len(layers) if args.SCHEDULE == "parallel" else 1),
        frozen_bytes=next(model.parameters()).element_size(),
    )
    cache_on_device = args.LATENT_CACHE == "device" or (run.rt.device.type == "cpu" and args.LATENT_CACHE != "disk")
    corrected = args.LATENT_STREAM == "corrected"
    n_tokens, final = latent_tokens(run, n_val), kl_tokens(run)
    cache = cache_bytes(n_tokens, model.config.hidden_size, corrected, final) if cache_on_device else 0
    # streamed, one layer at a time: the students live on the host beside their layers; on the device the one
    # training and one visiting with the layer the stream advances through
    held = 2 if teacher_on == "host" and (args.SCHEDULE == "rotation" or args.PHASE == "choose") else len(layers)
    students = min(held, len(layers)) * sum(p.numel() for p in student.parameters())
    whole_model = args.DECODER_LOSS == "kl"
    return memory.layerwise(memory.shape_of(model), plan, students, teacher_on, cache, whole_model)


def check_memory(run, terms, free, remedies):
    """Print the phase's memory estimate per GPU ({term: bytes}, common/memory.py) beside the `free` bytes of the
    device, and stop in one line that names the `remedies` when it is more."""
    args, rt = run.args, run.rt
    estimate, free_on = memory.describe(terms), f"{memory.size(free)} free on {rt.device}"
    rt.print(f"memory estimate of the {args.PHASE} phase: {estimate} ({free_on})")
    if sum(terms.values()) > free:
        remedy = " or ".join([", ".join(remedies[:-1]), remedies[-1]] if len(remedies) > 1 else remedies)
        fail(f"the {args.PHASE} phase needs about {estimate}, and there are {free_on}; use {remedy}")


def check_no_students(args, teacher, layers):
    """A teacher that is a checkpoint may hold students of its own; one in a layer to distill would be the teacher
    of the new student there: refused, saying what to do instead."""
    held = [s for s in student_specs(teacher) if s["target"] == args.TARGET and s["layer"] in layers]
    if held:
        origin = run_record(args.TEACHER).get("config", {}).get("TEACHER")
        numbers = ",".join(str(s["layer"]) for s in held)
        fail(
            f"--teacher {args.TEACHER} already holds {'/'.join(sorted({s['kind'] for s in held}))} students in layers "
            f"{numbers} ({args.TARGET}), which would teach the new ones: pass the model they were distilled from as "
            f"--teacher{f' ({origin}, its run.json says)' if origin else ''}, keep them with --keep-teacher-layers "
            f"{numbers}, or train them on with --phase logits --init {args.TEACHER}"
        )


def layerwise_phase(run, model, layers, val):
    """Print what the phase will do, distill `layers` on the schedule, write OUT/final and layers.json."""
    args, rt, batch = run.args, run.rt, run.batch
    rt.print(
        f"layer-wise {args.SCHEDULE}: target {args.TARGET}, student {args.STUDENT_KIND} {args.STUDENT_KWARGS}, "
        f"layers {layers} (keep teacher: {args.KEEP_TEACHER_LAYERS or 'none'})"
    )
    rt.print(
        f"tokens per step: {args.BATCH_SIZE} batch x {args.SEQ_LEN} seq x {args.GRAD_ACCUM} accum x "
        f"{rt.world_size} ranks = "
        f"{batch.tokens_per_step:,}; per layer per rotation: {args.STEPS_PER_LAYER} steps = "
        f"{batch.tokens_per_step * args.STEPS_PER_LAYER:,} tokens; {args.ROTATIONS} rotation(s)"
    )
    if args.CALIB_TOKENS:
        rt.print(
            f"calibration: {batch.calib_tokens:,} tokens per student "
            f"(CALIB_TOKENS rounded up to whole batches), {args.LATENT_STREAM} stream"
        )
    teacher_ce = hybrid_ce(rt, model, val)
    rt.print(
        f"teacher val ce {teacher_ce:.4f} (ppl {np.exp(teacher_ce):.2f}) on "
        f"{len(val) * batch.batch_tokens * rt.world_size:,} tokens"
    )
    train = train_rotation if args.SCHEDULE == "rotation" else train_parallel
    calls = LayerCalls(model, args.TARGET)  # how the model's own forward calls each layer and block, per batch shape
    students, rows, step, state = train(run, calls, layers, val, teacher_ce)
    meta = {"phase": "layerwise", "schedule": args.SCHEDULE, "step": step}
    write_checkpoint(run, "final", model, {(i, args.TARGET): students[i] for i in layers}, meta, state, complete=True)
    if rt.master:
        print(f"\nper-layer validation ({args.TARGET} -> {args.STUDENT_KIND}); teacher val ce {teacher_ce:.4f}")
        print_table(
            rows,
            ["rotation", "layer", "start_rel_err", "calib_rel_err", "rel_err", "mse_end", "hybrid_ce", "hybrid_ppl"],
        )
        write_json_atomic(os.path.join(run.out_dir, "layers.json"), rows)
        print(f"final model: {os.path.join(run.out_dir, 'final')}")


def train_rotation(run, calls, layers, val, teacher_ce):
    """One layer at a time over a cached teacher stream; a checkpoint after each layer. Returns the students,
    the per-layer rows, the step count and the last checkpoint's training state."""
    args, rt, model = run.args, run.rt, calls.model
    n_seq = rotation_sequences(run)
    where = place_latents(run, latent_tokens(run, len(val)), model.config.hidden_size, kl_tokens(run))
    loader = train_loader(run, model.config.vocab_size)
    students = make_students(args, model, layers, rt.device, with_layers=True)
    state = resume_rotation(run, model, loader, students, len(layers))
    calibrated_in = chosen_calibration(run)  # None: each student calibrates in its turn
    rows, step = state["rows"], state["step"]
    trained = {r["layer"] for r in rows}
    for rotation in range(state["rotation"], args.ROTATIONS):
        first_layer = state["done"] if rotation == state["rotation"] else 0
        rotation_start = loader.state()
        t0 = time.time()
        tokens = read_tokens(loader, n_seq // args.BATCH_SIZE)
        assert tokens.shape == (n_seq, args.SEQ_LEN), tokens.shape
        files = os.path.join(run.out_dir, ".latent")  # where=disk: the memory maps' names
        corrected = args.LATENT_STREAM == "corrected"
        kl = kl_tokens(run) // args.SEQ_LEN  # DECODER_LOSS=kl: the teacher's side for the sequences steps read
        cache = LatentCache(rt, model, tokens, calls, args.BATCH_SIZE, where, f"{files}_train", corrected, kl)
        vcache = LatentCache(rt, model, val_inputs(val), calls, args.BATCH_SIZE, where, f"{files}_val", corrected)
        for k in range(first_layer, len(layers)):
            i = layers[k]
            # a streamed teacher keeps layer i and its student on the device for its turn
            with resident(transformer_layers(model)[i], students[i]):
                errors, times, calibrated, step = distill_layer(
                    run, model, i, students, cache, vcache, rotation, step, calibrated_in
                )
            trained.add(i)
            trained_blocks = {(j, args.TARGET): students[j] for j in trained}
            ce = hybrid_ce(rt, model, val, trained_blocks)
            hybrid = {"hybrid_ce": ce, "hybrid_ppl": float(np.exp(ce)), "teacher_ce": teacher_ce}
            rows.append({"rotation": rotation, "layer": i, **errors, **hybrid, **times, "seconds": time.time() - t0})
            report_layer(run, rows, step, calibrated)
            vcache.finish(stream_students(args, students).get(i))
            last = k + 1 == len(layers)  # then the next rotation starts after this one's tokens
            position = {"loader": loader.state() if last else rotation_start, "rng": get_rng_state()}
            progress = {"rotation": rotation + 1, "done": 0} if last else {"rotation": rotation, "done": k + 1}
            state = {**progress, "step": step, "rows": rows, **position}
            meta = {"phase": "layerwise", "schedule": "rotation", "step": step, "rotation": rotation, "layer": i}
            write_checkpoint(run, f"rot{rotation}_layer{i:03d}", model, trained_blocks, meta, state)
            t0 = time.time()
        cache.close()
        vcache.close()
    return students, rows, step, state


def rotation_sequences(run):
    """Sequences per rank each layer of a rotation reads: its steps' tokens, each once, extended when calibration
    wants more."""
    args = run.args
    return max(args.STEPS_PER_LAYER * args.GRAD_ACCUM, run.batch.calib_batches) * args.BATCH_SIZE


def place_latents(run, n_tokens, hidden_size, final_tokens=0):
    """Where a latent cache of n_tokens per rank (with the teacher's final hidden states for final_tokens of them)
    lives (LATENT_CACHE; common.latent_cache.place_cache); when it fits nowhere, the error names the constants that
    size it."""
    args = run.args
    try:
        corrected = args.LATENT_STREAM == "corrected"
        return place_cache(run.rt, n_tokens, hidden_size, args.LATENT_CACHE, run.out_dir, corrected, final_tokens)
    except ValueError as e:
        raise ValueError(
            f"{e}; lower STEPS_PER_LAYER x GRAD_ACCUM x BATCH_SIZE x SEQ_LEN, or free memory/disk"
        ) from None


def kl_tokens(run):
    """Tokens per rank whose teacher final hidden states a rotation's cache keeps: those its steps read, with
    DECODER_LOSS=kl (else 0)."""
    args = run.args
    if args.DECODER_LOSS != "kl" or args.SCHEDULE != "rotation":
        return 0
    return args.STEPS_PER_LAYER * args.GRAD_ACCUM * args.BATCH_SIZE * args.SEQ_LEN


def latent_tokens(run, n_val):
    """Tokens per rank in the latent caches that live at once: the rotation's and the val cache (n_val batches), or
    in the parallel schedule the larger of the val and the calibration cache."""
    args = run.args
    val = n_val * run.batch.batch_tokens
    if args.SCHEDULE == "rotation":
        return rotation_sequences(run) * args.SEQ_LEN + val
    return max(val, run.batch.calib_batches * run.batch.batch_tokens)


def chosen_calibration(run):
    """CHOSEN: the choose phase's calibrated students (OUT/calibrated), where they are what this phase's calibration
    would give (the teacher stream, and the student, tokens, seed and ranks of the choose phase), else None."""
    args, rt = run.args, run.rt
    folder, saved = os.path.join(run.out_dir, "calibrated"), os.path.join(run.out_dir, "config_choose.json")
    ready = os.path.exists(saved) and os.path.isdir(folder)
    if not (args.CHOSEN and args.CALIB_TOKENS and args.LATENT_STREAM == "teacher" and ready):
        return None
    choose = read_json(saved, "the run folder is damaged; run --phase choose in a new --out-dir")
    keys = "TEACHER DATA_DIR TARGET STUDENT_KIND STUDENT_KWARGS CALIB_TOKENS BATCH_SIZE SEQ_LEN SEED DTYPE".split()
    differs = [k for k in keys if choose["config"].get(k) != args.as_dict()[k]]
    differs += ["ranks"] if choose["environment"].get("world_size") != rt.world_size else []
    if differs:
        rt.print(f"calibrating again: the choose phase ran with another {', '.join(differs)}")
        return None
    rt.print(f"calibration: the choose phase's students ({folder}), calibrated on the same tokens")
    return folder


def resume_rotation(run, model, loader, students, n_layers):
    """The rotation's progress to start from: a new run's, or with RESUME that of the latest layer-wise checkpoint
    (its state.pt: rotation, done = layers of that rotation finished, step, rows), whose data position, RNG and
    students are restored."""
    args = run.args
    ckpt = latest_checkpoint(run.out_dir, "layerwise") if args.RESUME else None
    if ckpt is None:
        return {"rotation": 0, "done": 0, "step": 0, "rows": []}
    state = load_state(ckpt)
    restore_training(state, loader)
    load_students(ckpt, model, students, args.TARGET)
    run.rt.print(
        f"resuming from {ckpt}: rotation {state['rotation']}, {state['done']} of {n_layers} layers done, "
        f"step {state['step']}"
    )
    return state


def distill_layer(run, model, i, students, cache, vcache, rotation, step, calibrated_in=None):
    """Layer i's turn in a rotation: split both caches at layer i, calibrate its student (first rotation only; or
    read it calibrated from the checkpoint `calibrated_in`, see chosen_calibration), train it, then move the
    training cache past the layer. Returns its val errors (before, after calibration, after training), its timings,
    whether it calibrated and the step count."""
    args, rt, student = run.args, run.rt, students[i]
    teacher_block = get_block(model, i, args.TARGET)
    vcache.split_at(i, stream_students(args, students))
    start_err = layer_error(rt, student, teacher_block, vcache)
    t_train = time.time()  # the rotation's teacher and student compute on training tokens
    blocks = stream_students(args, students)
    if args.DECODER_LOSS == "kl":  # kl runs the model on from h, the layer's input: splitting must leave h there
        blocks = {i: teacher_block, **blocks}
    cache.split_at(i, blocks)
    n_calib = run.batch.calib_batches * args.BATCH_SIZE
    if rotation == 0 and calibrated_in and hasattr(student, "calibrate"):
        t0 = time.time()
        load_students(calibrated_in, model, {i: student}, args.TARGET)
        calib_s = time.time() - t0
    else:
        calib_s = calibrate(rt, student, teacher_block, cache, n_calib) if rotation == 0 else None
    calib_err = layer_error(rt, student, teacher_block, vcache) if calib_s is not None else start_err
    rt.synchronize()
    t_steps = time.time()
    step = train_layer(run, student, teacher_block, cache, vcache, rotation, i, step)
    rt.synchronize()
    step_ms = 1000 * (time.time() - t_steps) / max(1, args.STEPS_PER_LAYER)
    cache.finish(stream_students(args, students).get(i))
    rt.synchronize()
    train_s = time.time() - t_train - (calib_s or 0)
    end_err = layer_error(rt, student, teacher_block, vcache)
    errors = {
        "mse_start": start_err["val_mse"],
        "mse_end": end_err["val_mse"],
        "start_rel_err": start_err["val_rel_err"],
        "calib_rel_err": calib_err["val_rel_err"],
        "rel_err": end_err["val_rel_err"],
    }
    return errors, {"step_ms": step_ms, "calib_s": calib_s or 0.0, "train_s": train_s}, calib_s is not None, step


def train_layer(run, student, teacher_block, cache, vcache, rotation, layer, step):
    """STEPS_PER_LAYER optimizer steps of one student on the cache's latents, each token once. Returns the step
    count."""
    args, rt = run.args, run.rt
    params = trainable_params(student, f"layer {layer}", args.TRAINABLE)
    opt = adamw(params, args.LR, args.WEIGHT_DECAY)
    bar = tqdm(range(args.STEPS_PER_LAYER), desc=f"rot {rotation} layer {layer}", disable=not rt.master, leave=False)
    for s in bar:
        lr = lr_at(s, args.STEPS_PER_LAYER, args.LR, args.WARMUP_STEPS, "cosine", args.MIN_LR_RATIO)
        loss_sum = 0.0
        for m in range(args.GRAD_ACCUM):
            j = (s * args.GRAD_ACCUM + m) * args.BATCH_SIZE
            if args.DECODER_LOSS == "kl":
                loss = swapped_kl(run, cache, student, j)
            else:
                xb = cache.x[j : j + args.BATCH_SIZE].to(rt.device, non_blocking=True)
                with torch.no_grad(), rt.autocast():
                    target = cache.target(teacher_block, j, xb)
                with rt.autocast():
                    loss = decoder_loss(cache.run_block(student, xb), target, args.DECODER_LOSS)
            loss = loss / args.GRAD_ACCUM
            loss.backward()
            loss_sum += loss.detach()
        (norm,) = step_optimizer(rt, opt, [params], lr, args.GRAD_CLIP)
        step, layer_step = step + 1, s + 1  # steps done: of the run, of this layer
        record = {"phase": "layerwise", "rotation": rotation, "layer": layer, "step": step, "layer_step": layer_step}
        validate = due(layer_step, args.VAL_EVERY)
        if due(layer_step, args.LOG_EVERY, args.STEPS_PER_LAYER, first=True) or (not args.LOG_EVERY and validate):
            loss_val = rt.all_mean(loss_sum.item())
            bar.set_postfix(loss=f"{loss_val:.4g}")
            run.log.log(**record, loss=loss_val, lr=lr, grad_norm=norm.item())
        if validate:
            run.log.log(**record, **layer_error(rt, student, teacher_block, vcache))
    return step


def swapped_kl(run, cache, student, j):
    """DECODER_LOSS=kl on the batch of sequences from j: KL(teacher || the model with `student` in this layer's
    slot) of the next-token distributions, a mean per token (common.kd's chunked loss). The model runs on from the
    layer's input in the cache, h: the teacher's stream, or with LATENT_STREAM student or corrected the stream
    through the students before it, so they count as swapped in too; every later block is the teacher's. The
    teacher's side is the cache's `final`, computed once a rotation. Backward runs from the head to the layer."""
    rt, model, n = run.rt, cache.model, run.args.BATCH_SIZE
    ids = cache.tokens[j : j + n].to(rt.device)
    h, teacher_hidden = (buf[j : j + n].to(rt.device, non_blocking=True) for buf in (cache.h, cache.final))
    with swapped(model, {(cache.layer, cache.calls.target): student}), starting_at(cache.calls, cache.layer, h):
        with rt.autocast():
            loss, _ = kd_loss(final_hidden(model, ids), teacher_hidden, lm_head(model))
    return loss


def report_layer(run, rows, step, calibrated):
    """Log, plot and print the row of the layer just distilled (the last of `rows`)."""
    row = rows[-1]
    if run.rt.master:
        run_png(run.out_dir, rows)
    run.log.log(phase="layerwise", step=step, **row)
    calibration = f"calibrated {row['calib_rel_err']:.4g}, " if calibrated else ""
    run.rt.print(
        f"rot {row['rotation']} layer {row['layer']:3d} | val rel err {row['start_rel_err']:.4g} -> "
        f"{calibration}trained {row['rel_err']:.4g} | hybrid val ce {row['hybrid_ce']:.4f} (teacher "
        f"{row['teacher_ce']:.4f}) | {row['step_ms']:.0f} ms/step, {row['seconds']:.1f}s"
    )


def train_parallel(run, calls, layers, val, teacher_ce):
    """Every layer per teacher pass: each student trains on its own teacher input and target. Returns what
    train_rotation returns."""
    args, rt, model = run.args, run.rt, calls.model
    loader = train_loader(run, model.config.vocab_size)
    students = make_students(args, model, layers, rt.device)  # all train at once
    groups = [trainable_params(students[i], f"layer {i}", args.TRAINABLE) for i in layers]
    opt = adamw([p for g in groups for p in g], args.LR, args.WEIGHT_DECAY)
    total, step = args.STEPS_PER_LAYER * args.ROTATIONS, 0
    blocks = {(i, args.TARGET): students[i] for i in layers}
    val_tokens = len(val) * run.batch.batch_tokens
    where = place_latents(run, val_tokens, model.config.hidden_size)
    # a resumed run calibrates its new students again (deterministic) before it loads the trained ones, so that its
    # table reports the same start and calibrated errors as the run had
    start_errors = calib_errors = student_val_errors(run, calls, students, val, where)
    if calibrate_all(run, calls, students):
        calib_errors = student_val_errors(run, calls, students, val, where)
    ckpt = latest_checkpoint(run.out_dir, "layerwise") if args.RESUME else None
    if ckpt:
        load_students(ckpt, model, students, args.TARGET)
        step = restore_training(load_state(ckpt), loader, opt)
        rt.print(f"resuming from {ckpt} at step {step}")
    bar = tqdm(range(step, total), desc="parallel", disable=not rt.master)
    for s in bar:
        lr = lr_at(s, total, args.LR, args.WARMUP_STEPS, "cosine", args.MIN_LR_RATIO)
        losses = parallel_losses(run, calls, loader, students, layers)
        norms = step_optimizer(rt, opt, groups, lr, args.GRAD_CLIP)
        step = s + 1  # steps done
        validate = due(step, args.VAL_EVERY) and step < total  # the end validates after the loop
        checkpoint = due(step, args.SAVE_EVERY) and step < total  # the end is OUT/final
        if due(step, args.LOG_EVERY, total, first=True) or (not args.LOG_EVERY and (validate or checkpoint)):
            mean_loss = rt.all_mean(losses.mean().item())
            bar.set_postfix(loss=f"{mean_loss:.4g}")
            run.log.log(
                phase="layerwise",
                step=step,
                loss=mean_loss,
                lr=lr,
                layer_loss={i: rt.all_mean(v) for i, v in zip(layers, losses.tolist())},
                grad_norm={i: n.item() for i, n in zip(layers, norms)},
            )
        if validate:
            errors = student_val_errors(run, calls, students, val, where)
            run.log.log(
                phase="layerwise",
                step=step,
                hybrid_ce=hybrid_ce(rt, model, val, blocks),
                layer_val_mse={i: e["val_mse"] for i, e in errors.items()},
            )
        if checkpoint:
            meta = {"phase": "layerwise", "schedule": "parallel", "step": step}
            write_checkpoint(run, f"parallel_step{step:06d}", model, blocks, meta, training_state(step, opt, loader))
    errors = student_val_errors(run, calls, students, val, where)
    ce = hybrid_ce(rt, model, val, blocks)
    rows = [parallel_row(i, start_errors[i], calib_errors[i], errors[i], ce, teacher_ce) for i in layers]
    if rt.master:
        run_png(run.out_dir, rows)
    run.log.log(phase="layerwise", step=total, hybrid_ce=ce, layer_val_mse={r["layer"]: r["mse_end"] for r in rows})
    return students, rows, total, training_state(total, opt, loader)


def parallel_row(layer, start, calibrated, end, ce, teacher_ce):
    """A layer's row of the parallel schedule's table, from its val errors (layer_error) at the start, after
    calibration and at the end, and the hybrid model's val CE."""
    return {
        "rotation": "all",
        "layer": layer,
        "mse_start": start["val_mse"],
        "mse_end": end["val_mse"],
        "start_rel_err": start["val_rel_err"],
        "calib_rel_err": calibrated["val_rel_err"],
        "rel_err": end["val_rel_err"],
        "hybrid_ce": ce,
        "hybrid_ppl": float(np.exp(ce)),
        "teacher_ce": teacher_ce,
    }


def parallel_losses(run, calls, loader, students, layers):
    """GRAD_ACCUM micro-batches through the teacher, layer by layer, each student's loss on its own layer's teacher
    input and output (taken where the layer computes them) back-propagated on the way: the per-layer losses (a
    tensor: no host sync)."""
    args, rt, model = run.args, run.rt, calls.model
    losses = torch.zeros(len(layers), device=rt.device)

    def train_student(i, x, y):  # on_block for layer i: x, y are the teacher block's input and output
        with torch.enable_grad(), rt.autocast():
            student_out = calls.block(i, x.shape[:2])(students[i], x)
            loss = decoder_loss(student_out, y, args.DECODER_LOSS) / args.GRAD_ACCUM
        loss.backward()
        losses[layers.index(i)] += loss.detach()
        return student_out.detach() if args.LATENT_STREAM == "student" else None

    for _ in range(args.GRAD_ACCUM):
        h = embed(model, loader.next_batch()[0].to(rt.device))
        for i in range(layers[-1] + 1):
            on_block = (lambda x, y, i=i: train_student(i, x, y)) if i in students else None
            with torch.no_grad(), rt.autocast():
                h = run_layer(model, calls, i, h, on_block)
    return losses


def calibrate_all(run, calls, students):
    """Parallel schedule: calibrate every student, layer by layer, on the first CALIB_TOKENS of the
    training stream (the tokens the first steps train on), through a latent cache of those tokens.
    Returns whether any student calibrated."""
    args, rt, model = run.args, run.rt, calls.model
    if not args.CALIB_TOKENS or not any(hasattr(s, "calibrate") for s in students.values()):
        return False
    tokens = read_tokens(train_loader(run, model.config.vocab_size), run.batch.calib_batches)
    where = place_latents(run, tokens.numel(), model.config.hidden_size)
    files = os.path.join(run.out_dir, ".latent_calib")
    cache = LatentCache(rt, model, tokens, calls, args.BATCH_SIZE, where, files, args.LATENT_STREAM == "corrected")
    for i in tqdm(sorted(students), desc="calibrate", disable=not rt.master, leave=False):
        with resident(transformer_layers(model)[i], students[i]):
            cache.split_at(i, stream_students(args, students))
            calibrate(rt, students[i], get_block(model, i, args.TARGET), cache, len(tokens))
            cache.finish(stream_students(args, students).get(i))
    cache.close()
    return True


# ---------------------------------------------------------------------------------------------- choose phase
def choose_phase(run, model, layers, val):
    """Which layers to convert: each layer's student, calibrated on CALIB_TOKENS, swapped in alone; the KL of the
    model's next-token distribution to the teacher's on the val tokens is what converting that layer costs.
    Prints the layers by that cost and the --layers / --keep-teacher-layers that convert the CONVERT cheapest;
    writes OUT/choice.json and the calibrated students (OUT/calibrated, a start for the layer-wise phase)."""
    args, rt = run.args, run.rt
    n_convert = args.CONVERT or len(layers) // 2
    calls = LayerCalls(model, args.TARGET)
    students = make_students(args, model, layers, rt.device, with_layers=True)
    calibrate_all(run, calls, students)
    with torch.no_grad(), rt.autocast():  # the teacher's, once: every layer's KL is to these
        teacher_hidden = [final_hidden(model, x.to(rt.device)) for x, _ in val]
    rows = []
    for i in tqdm(layers, desc="choose", disable=not rt.master, leave=False):
        hidden = iter(teacher_hidden)  # evaluate asks for the teacher's once per batch, in order
        with swapped(model, {(i, args.TARGET): students[i]}):
            m = evaluate(model, val, lambda ids, hidden=hidden: next(hidden), rt)
        row = {"layer": i, "kl": m["kl"], "val_ce": m["ce"], "agree": m["agreement"], "teacher_ce": m["teacher_ce"]}
        rows.append(row)
    rows.sort(key=lambda r: r["kl"])
    convert = sorted(r["layer"] for r in rows[:n_convert])
    keep = sorted(set(range(len(transformer_layers(model)))) - set(convert))
    write_checkpoint(
        run, "calibrated", model, {(i, args.TARGET): students[i] for i in layers}, {"phase": "choose", "step": 0}, None
    )
    if rt.master:
        write_json_atomic(os.path.join(run.out_dir, "choice.json"), {"rows": rows, "convert": convert, "keep": keep})
        print(
            f"\nwhat converting each layer alone costs ({args.TARGET} -> {args.STUDENT_KIND}, calibrated), "
            "cheapest first"
        )
        print_table(rows, ["layer", "kl", "val_ce", "agree", "teacher_ce"])
        print(
            f"convert the {n_convert} cheapest: --layers {','.join(map(str, convert))} "
            f"--keep-teacher-layers {','.join(map(str, keep)) or 'none'}"
        )


# ---------------------------------------------------------------------------------------------- logits phase
class LogitsModels(NamedTuple):
    """The logits phase's models. `model` is the student model, `teacher` the frozen teacher (its weights in
    Runtime.frozen_dtype). With KD_TRAINABLE=decoders and PARALLEL=ddp they share one backbone: `model` is the
    teacher itself and the students (`blocks`, {(layer, target): block}) are swapped in for the student pass.
    FSDP cannot shard one module for two models, so under fsdp the student model is a module of its own (the
    init's backbone, frozen in the frozen dtype, with the students in place) and `blocks` is empty, as with
    KD_TRAINABLE=all. Whatever requires grad trains: the students (decoders) or the whole student model (all)."""

    init: str  # the checkpoint the phase starts from
    resume_from: str | None  # the logits checkpoint it continues from (None: it starts at step 0)
    teacher: torch.nn.Module
    model: torch.nn.Module
    blocks: dict

    def params(self):
        """The parameters that train (under fsdp the sharded ones: call it after wrap_logits_models)."""
        return [p for m in (self.model, *self.blocks.values()) for p in m.parameters() if p.requires_grad]


def logits_inputs(run):
    """The logits phase's models, loaded and checked before the run folder exists."""
    args, rt = run.args, run.rt
    init = args.INIT or os.path.join(run.out_dir, "final")
    if not args.INIT and not os.path.isdir(init):
        init = latest_checkpoint(run.out_dir, "layerwise")
        if init is None:
            fail(
                f"{run.out_dir} has no layer-wise checkpoint to start the logits phase from; "
                f"run the layer-wise phase first or pass --init CHECKPOINT"
            )
    resume_from = latest_checkpoint(run.out_dir, "logits") if args.RESUME else None
    check_memory(run, logits_memory(run, resume_from or init), free_bytes("device", rt, "."), logits_remedies(args))
    load_on = parallel.load_device(rt, args.PARALLEL)
    teacher = load_model(args.TEACHER, load_on, dtype=rt.frozen_dtype).eval().requires_grad_(False)
    # decoders: the checkpoint is read on the host, whence only what trains moves to the device as it is (fp32)
    source = load_model(resume_from or init, "cpu" if args.KD_TRAINABLE == "decoders" else load_on)
    if source.config.vocab_size != teacher.config.vocab_size:
        fail(
            f"{init} has a vocabulary of {source.config.vocab_size:,} tokens and --teacher {args.TEACHER} one of "
            f"{teacher.config.vocab_size:,}: the KL compares their next-token distributions, which needs one "
            f"vocabulary; pass the teacher {init} was distilled from"
        )
    if args.KD_TRAINABLE == "body":
        for p in embedding_params(source):
            p.requires_grad_(False)
    if args.KD_TRAINABLE != "decoders":
        return LogitsModels(init, resume_from, teacher, source, {})
    blocks = {(s["layer"], s["target"]): get_block(source, s["layer"], s["target"]) for s in student_specs(source)}
    if not blocks:
        fail(f"{init} has no student decoders, so KD_TRAINABLE=decoders would train nothing; use --kd-trainable all")
    differs = backbone_differs(teacher, source, blocks)
    if differs:
        fail(
            f"{init}: its backbone differs from the teacher's ({differs[0]}, ...), so they cannot share it; "
            f"use --kd-trainable all, or the --teacher the checkpoint was distilled from"
        )
    if args.PARALLEL == "fsdp":  # the student model of its own: the teacher's backbone cast and frozen, students out
        with swapped(source, {key: torch.nn.Module() for key in blocks}):
            source.requires_grad_(False).to(rt.frozen_dtype)
        return LogitsModels(init, resume_from, teacher, source, {})
    for block in blocks.values():
        block.to(rt.device)
    return LogitsModels(init, resume_from, teacher, teacher, blocks)


def embedding_params(model):
    """The token embeddings' and the LM head's parameters (a tied one once): what KD_TRAINABLE=body keeps frozen."""
    modules = (model.get_input_embeddings(), model.get_output_embeddings())
    return list({id(p): p for m in modules for p in m.parameters()}.values())


def logits_memory(run, source):
    """common.memory's estimate of the logits phase on one GPU, from the teacher and the student model (the folder
    `source`) built on the meta device, before either is read."""
    args = run.args
    teacher, student = memory.meta_model(args.TEACHER), memory.meta_model(source)
    if args.KD_TRAINABLE == "decoders":
        blocks = [get_block(student, s["layer"], s["target"]) for s in student_specs(student)]
        trained = sum(p.numel() for b in blocks for p in b.parameters())
    else:
        trained = sum(p.numel() for p in student.parameters())
    kept_fp32 = 0  # body: the student's embeddings and head, frozen as loaded (fp32)
    if args.KD_TRAINABLE == "body":
        kept_fp32 = sum(p.numel() for p in embedding_params(student))
        trained -= kept_fp32
    plan = memory.Plan(
        tokens=run.batch.batch_tokens,
        trained=trained,
        frozen_bytes=run.rt.frozen_dtype.itemsize,
        world_size=run.rt.world_size,
        parallel=args.PARALLEL,
        checkpointing=args.ACTIVATION_CHECKPOINTING,
    )
    # the students swapped into the teacher's own backbone
    shared = args.KD_TRAINABLE == "decoders" and args.PARALLEL == "ddp"
    return memory.logits(memory.shape_of(teacher), memory.shape_of(student), plan, shared, kept_fp32)


def logits_remedies(args):
    """What makes the logits phase take less memory per GPU, of what this run does not do already."""
    remedies = [] if args.KD_TRAINABLE == "decoders" else ["--kd-trainable decoders"]
    remedies += ["more GPUs with --parallel fsdp" if args.PARALLEL == "ddp" else "more GPUs"]
    remedies += [] if args.ACTIVATION_CHECKPOINTING else ["--activation-checkpointing"]
    return [*remedies, "a smaller --batch-size or --seq-len"]


def backbone_differs(teacher, model, blocks):
    """Names of non-student weights where `model` differs from the teacher, compared in the teacher's dtype (empty:
    shared backbone)."""
    prefixes = tuple(f"{block_path(model, i, t)}." for i, t in blocks)
    theirs = model.state_dict()
    return [
        k
        for k, v in teacher.state_dict().items()
        if not k.startswith(prefixes) and (k not in theirs or not torch.equal(v, theirs[k].to(v.device, v.dtype)))
    ]


def wrap_logits_models(run, models):
    """ACTIVATION_CHECKPOINTING on the student model's layers; PARALLEL=fsdp shards the student model and the
    teacher (each layer, then the root) over the ranks."""
    args = run.args
    if args.ACTIVATION_CHECKPOINTING:
        parallel.checkpoint_layers(models.model)
    if args.PARALLEL == "fsdp":
        parallel.shard(models.teacher, run.rt)
        parallel.shard(models.model, run.rt)


def logits_phase(run, models, val):
    """KL(teacher || student) on next-token distributions, with its own optimizer and LR schedule."""
    args, rt, init = run.args, run.rt, models.init
    loader = train_loader(run, models.model.config.vocab_size)
    wrap_logits_models(run, models)
    params = models.params()
    opt = adamw(params, args.KD_LR, args.WEIGHT_DECAY)
    step = 0
    if models.resume_from:
        step = restore_training(load_state(models.resume_from), loader, opt, models.model)
        if step >= args.KD_STEPS:
            rt.print(
                f"the logits phase is finished: {models.resume_from} is at step {step} of KD_STEPS={args.KD_STEPS}"
            )
            return
        rt.print(f"resuming the logits phase from {models.resume_from} at step {step}")
    elif args.KD_FRESH_TOKENS and os.path.exists(os.path.join(init, "state.pt")) and "loader" in load_state(init):
        loader.load_state(load_state(init)["loader"])
        rt.print(f"reading fresh tokens after those {init} consumed (shard {loader.shard}, position {loader.pos:,})")
    describe_logits_phase(run, init, params)
    results = []  # one row per validation
    if step == 0:
        validate_logits(run, models, val, step, results)
    first, t0 = step, time.time()
    bar = tqdm(range(step, args.KD_STEPS), desc="logits", disable=not rt.master)
    for s in bar:
        lr = lr_at(s, args.KD_STEPS, args.KD_LR, args.KD_WARMUP_STEPS, "cosine", args.KD_MIN_LR_RATIO)
        loss_sum, kl_sum = logits_losses(run, models, loader)
        (norm,) = step_optimizer(rt, opt, [params], lr, args.GRAD_CLIP, reduced=args.PARALLEL == "fsdp")
        step = s + 1  # steps done
        validate = due(step, args.KD_VAL_EVERY, args.KD_STEPS)
        checkpoint = due(step, args.KD_SAVE_EVERY) and step < args.KD_STEPS  # the end is OUT/logits_final
        if due(step, args.LOG_EVERY, args.KD_STEPS, first=True) or (not args.LOG_EVERY and (validate or checkpoint)):
            rec = {
                "loss": rt.all_mean(loss_sum.item()),
                "kl": rt.all_mean(kl_sum.item()),
                "lr": lr,
                "grad_norm": norm.item(),
                "tokens_per_s": run.batch.tokens_per_step * (step - first) / (time.time() - t0),
            }
            bar.set_postfix(loss=f"{rec['loss']:.4g}")
            run.log.log(phase="logits", step=step, **rec)
        if validate:
            validate_logits(run, models, val, step, results)
        if checkpoint:
            logits_checkpoint(run, models, f"logits_step{step:06d}", step, opt, loader)
    logits_checkpoint(run, models, "logits_final", step, opt, loader)
    if rt.master:
        print(f"\nlogits phase ({args.KD_TRAINABLE}) from {init}")
        print_table(results, ["step", "val_ce", "val_ppl", "kl", "agree", "teacher_ce"])
        print(f"final model: {os.path.join(run.out_dir, 'logits_final')}")


def describe_logits_phase(run, init, params):
    """Print what the logits phase will do: its start, what trains, its tokens, schedule, loss and precision."""
    args, rt = run.args, run.rt
    rt.print(
        f"logits phase from {init}: trainable {args.KD_TRAINABLE} ({sum(p.numel() for p in params):,} parameters), "
        f"{args.KD_STEPS} steps x {run.batch.tokens_per_step:,} tokens, lr {args.KD_LR} (warmup "
        f"{args.KD_WARMUP_STEPS}, cosine to {args.KD_MIN_LR_RATIO * args.KD_LR:g}), temperature "
        f"{args.KD_TEMPERATURE}, ce weight {args.KD_CE_WEIGHT}; frozen weights in "
        f"{str(rt.frozen_dtype).replace('torch.', '')}, trained ones in float32"
    )
    rt.print(
        f"{f'{args.PARALLEL} over {rt.world_size} ranks' if rt.ddp else 'one process'}; activation checkpointing "
        f"{'on' if args.ACTIVATION_CHECKPOINTING else 'off'}"
    )


def logits_checkpoint(run, models, name, step, opt, loader):
    """OUT/name: the student model (students swapped into the teacher with KD_TRAINABLE=decoders under ddp) and
    what resumes the phase (under fsdp gathered from every rank)."""
    args = run.args
    meta = {"phase": "logits", "step": step, "init": models.init, "kd_trainable": args.KD_TRAINABLE}
    state = training_state(step, opt, loader, models.model)
    complete = name == "logits_final" or args.KD_TRAINABLE != "decoders"  # else the students alone, on the teacher
    write_checkpoint(run, name, models.model, models.blocks, meta, state, complete)


def logits_losses(run, models, loader):
    """GRAD_ACCUM micro-batches of the KD loss, back-propagated: the step's loss and KL (tensors: no host sync)."""
    args, rt = run.args, run.rt
    kl_sum = loss_sum = 0.0
    for _ in range(args.GRAD_ACCUM):
        x, y = loader.next_batch()
        x, y = x.to(rt.device), y.to(rt.device)
        with torch.no_grad(), rt.autocast():
            ht = final_hidden(models.teacher, x)
        # final_hidden before lm_head: under fsdp a model's forward gathers its root's weights, the head's among them
        with swapped(models.model, models.blocks), rt.autocast():
            loss, parts = kd_loss(
                final_hidden(models.model, x),
                ht,
                lm_head(models.model),
                y,
                args.KD_TEMPERATURE,
                args.KD_CE_WEIGHT,
                teacher_head=lm_head(models.teacher),
            )
            (loss / args.GRAD_ACCUM).backward()
        loss_sum += loss.detach() / args.GRAD_ACCUM
        kl_sum += parts["kl"] / args.GRAD_ACCUM
    return loss_sum, kl_sum


def validate_logits(run, models, val, step, results):
    """Val CE, KL to the teacher and top-1 agreement of the student model; appended to `results`, logged,
    plotted and printed."""
    model, blocks = models.model, models.blocks
    teacher_blocks = {key: get_block(model, *key) for key in blocks}

    def teacher_hidden(ids):  # decoders mode: the shared backbone with the teacher's own blocks
        with swapped(model, teacher_blocks):
            return final_hidden(model, ids)

    with swapped(model, blocks):
        m = evaluate(model, val, teacher_hidden if blocks else models.teacher, run.rt)
    row = {
        "step": step,
        "val_ce": m["ce"],
        "val_ppl": m["ppl"],
        "kl": m["kl"],
        "agree": m["agreement"],
        "teacher_ce": m["teacher_ce"],
    }
    results.append(row)
    if run.rt.master:
        run_png(run.out_dir, logits_rows=results)
    run.log.log(phase="logits", **row)
    run.rt.print(
        f"step {step:5d} | val ce {m['ce']:.4f} (teacher {m['teacher_ce']:.4f}) | kl {m['kl']:.4g} "
        f"| top-1 agreement {m['agreement']:.3f}"
    )


# ---------------------------------------------------------------------------------------------- shared pieces
def check_data(run, vocab_size):
    """Open the first train shard (header, size, ids inside the vocabulary), check that the train split holds
    the calibration tokens, and return the val batches."""
    args, rt = run.args, run.rt
    train_loader(run, vocab_size)
    val = val_batches(args.DATA_DIR, args.VAL_TOKENS, args.BATCH_SIZE, args.SEQ_LEN, rt.rank, rt.world_size, vocab_size)
    if args.PHASE != "layerwise" or not args.CALIB_TOKENS:
        return val
    calib = run.batch.calib_tokens
    train_tokens = sum(len(read_shard(f)) for f in shard_files(args.DATA_DIR, "train"))
    if calib > train_tokens:
        raise ValueError(
            f"CALIB_TOKENS={args.CALIB_TOKENS:,} (rounded up to whole batches: {calib:,}) is more than the "
            f"{train_tokens:,} tokens of {args.DATA_DIR}'s train split; lower --calib-tokens or prepare more data"
        )
    return val


def train_loader(run, vocab_size):
    """This rank's loader over the train shards, from their start (the first shard opened and checked)."""
    args, rt = run.args, run.rt
    return TokenLoader(
        shard_files(args.DATA_DIR, "train"),
        args.BATCH_SIZE,
        args.SEQ_LEN,
        rt.rank,
        rt.world_size,
        vocab_size=vocab_size,
    )


def read_tokens(loader, n_batches):
    return torch.cat([torch.empty(0, loader.T, dtype=torch.long)] + [loader.next_batch()[0] for _ in range(n_batches)])


def val_inputs(val):
    return torch.cat([x for x, _ in val])


def make_students(args, model, layers, device, with_layers=False):
    """{layer: a new student for its TARGET block} in fp32 (master weights, whatever the teacher's dtype) on `device`;
    `with_layers`: a streamed teacher's student lives in host memory beside its layer and visits the device with it
    (the schedules that use one layer at a time). Layer i's initialisation uses seed SEED + i."""
    students, kwargs = {}, resumed_kwargs(args, model)
    for i in layers:
        torch.manual_seed(args.SEED + i)
        teacher_block = get_block(model, i, args.TARGET)
        try:
            student = make_student(args.TARGET, args.STUDENT_KIND, teacher_block, model.config, **kwargs)
        except ValueError as e:  # the library says what it knows; these are the options that chose it
            raise ValueError(f"STUDENT_KIND={args.STUDENT_KIND!r} STUDENT_KWARGS={args.STUDENT_KWARGS}: {e}") from None
        home = home_device(transformer_layers(model)[i], device) if with_layers else device
        students[i] = student.to(home, torch.float32)
    return students


def resumed_kwargs(args, model):
    """STUDENT_KWARGS; resuming, the arguments the run's latest layer-wise checkpoint built its students with, so
    that a default changed since the run began (a student argument added later) does not change its students."""
    ckpt = latest_checkpoint(args.OUT_DIR, "layerwise") if args.RESUME else None
    specs = read_student_specs(os.path.join(ckpt, "students.json"), model) if ckpt else []
    return built_with(specs[0]) if specs else args.STUDENT_KWARGS


def load_students(ckpt, model, students, target):
    """Resume: the weights of every student the checkpoint holds, loaded exactly into `students` ({layer: student})
    from its file (common.checkpoint.load_swapped_students)."""
    specs = read_student_specs(os.path.join(ckpt, "students.json"), model)
    held = [s["layer"] for s in specs if s["target"] == target and s["layer"] in students]
    with swapped(model, {(i, target): students[i] for i in held}):
        load_swapped_students(model, ckpt)


def stream_students(args, students):
    """The students that carry the latent stream past their layers: all of them with LATENT_STREAM=student or
    corrected (later layers learn on earlier students' outputs; corrected also fits them to undo their drift), none
    with teacher ({layer: student})."""
    return students if args.LATENT_STREAM != "teacher" else {}


def trainable_params(student, name, trainable):
    """The student's parameters to train (all, or those whose names contain an entry of `trainable`, TRAINABLE)."""
    named = list(student.named_parameters())
    if trainable:
        chosen = [(n, p) for n, p in named if any(t in n for t in trainable)]
        if not chosen:
            fail(
                f"TRAINABLE {trainable} matches no parameter of the {name} student; its parameters: "
                + ", ".join(n for n, _ in named)
            )
    else:
        chosen = named
    for n, p in named:
        p.requires_grad_(any(p is q for _, q in chosen))
    return [p for _, p in chosen]


def decoder_loss(student_out, teacher_out, kind):
    """DECODER_LOSS `kind` (mse, nmse or cosine) of a student's output against its teacher block's."""
    s, t = student_out.float(), teacher_out.float()
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "nmse":
        return ((s - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)).mean()
    return 1 - F.cosine_similarity(s, t, dim=-1).mean()


@torch.no_grad()
def calibrate(rt, student, teacher_block, cache, n_seq):
    """Fit a student that defines calibrate() to the first n_seq sequences of `cache` (split at its
    layer) and their teacher outputs, in fp32 with fp64 statistics summed over ranks: deterministic,
    and the same student on every rank. Returns the seconds it took, or None when nothing ran."""
    if not hasattr(student, "calibrate") or n_seq == 0:
        return None
    t0 = time.time()
    if next(teacher_block.parameters()).dtype != torch.float32:  # a frozen bf16 teacher: its block in fp32 for this
        teacher_block = copy.deepcopy(teacher_block).float()

    def batches(targets=True):
        for s, xb in cache.batches(cache.x, n_seq):
            yield xb, cache.target(teacher_block, s, xb) if targets else None

    student.calibrate(teacher_block, batches, rt.all_sum_, cache.run_block)
    rt.synchronize()
    return time.time() - t0


@torch.no_grad()
def layer_error(rt, student, teacher_block, cache):
    """Val MSE and relative error ||s - t||^2 / ||t||^2 of a student against its target (the teacher block's
    output, corrected with LATENT_STREAM=corrected), on the latents of a (val) cache split at this layer."""
    se = sq = count = 0.0
    for start, xb in cache.batches(cache.x):
        with rt.autocast():
            t = cache.target(teacher_block, start, xb).float()
            s = cache.run_block(student, xb).float()
        se += (s - t).square().sum().item()
        sq += t.square().sum().item()
        count += t.numel()
    se, sq, count = rt.all_mean(se), rt.all_mean(sq), rt.all_mean(count)
    return {"val_mse": se / count, "val_rel_err": se / max(sq, 1e-30)}


def student_val_errors(run, calls, students, val, where):
    """Val error of every student ({layer: layer_error}), from one pass of the stream over the val tokens (O(L))."""
    args, model = run.args, calls.model
    cache = LatentCache(
        run.rt, model, val_inputs(val), calls, args.BATCH_SIZE, where, os.path.join(run.out_dir, ".latent_val")
    )
    errors = {}
    for i in sorted(students):
        cache.split_at(i, stream_students(args, students))
        errors[i] = layer_error(run.rt, students[i], get_block(model, i, args.TARGET), cache)
        cache.finish(stream_students(args, students).get(i))
    cache.close()
    return errors


def hybrid_ce(rt, model, val, blocks=None):
    """Val cross-entropy of the model with `blocks` ({(layer, target): student}) swapped in."""
    with swapped(model, blocks or {}):
        return evaluate(model, val, rt=rt)["ce"]


def write_checkpoint(run, name, model, blocks, meta, state, complete=False):
    """Rank 0 writes OUT/name with `blocks` ({(layer, target): student}) swapped into the model: every weight when
    `complete` (final, logits_final, a model whose backbone trained), else the students alone on the teacher. A
    sharded model's weights are gathered to rank 0 from every rank first."""
    weights = parallel.full_state_dict(model) if parallel.is_sharded(model) else None
    if run.rt.master:
        teacher = None if complete else run.teacher
        with swapped(model, blocks):
            folder = os.path.join(run.out_dir, name)
            save_checkpoint(folder, model, {"script": "distill.py", **meta}, state, teacher=teacher, weights=weights)
        prune_checkpoints(run.out_dir, meta["phase"], run.args.KEEP_LAST, spare={"final"})
    run.rt.barrier()


def print_table(rows, columns):
    cells = [[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[k]) for row in cells)) for k, c in enumerate(columns)]
    for row in [columns, *cells]:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
