"""Next-token language-model training on the token shards that prepare.py writes.

    torchrun --standalone --nproc_per_node 1 train.py                  # the README command
    python train.py --init runs/distill_x/final --steps 200             # plain python works too
    torchrun --standalone --nproc_per_node 8 train.py --resume --out-dir runs/train_x

It starts from a Hugging Face model folder (default: the snapshot prepare.py downloads), from a
checkpoint folder of distill.py or of this script (student decoders are rebuilt from the folder
alone), or from INIT's config with fresh weights (--from-scratch). Every UPPER_CASE constant below
can be set from the command line: --batch-size 8 sets BATCH_SIZE (common/config.py).
Rank 0 writes the run folder OUT_DIR: run.json (the resolved config), metrics.jsonl (a line per
step, per validation and per launch, with versions and device) and checkpoints OUT_DIR/step000500/
from which --resume continues exactly as if the run had never stopped.
"""

import contextlib
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from common import parallel, students
from common.checkpoint import (
    check_has_config,
    load_model,
    load_state,
    restore_training,
    save_checkpoint,
    training_state,
)
from common.config import check_ranges, exit_on_stop_signals, exit_when_disk_full, fail, override
from common.optim import adamw, lr_at, step_optimizer
from common.quality import evaluate
from common.run_folder import (
    check_unchanged,
    folder_name,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    start_run,
)
from common.runtime import RunLog, Runtime, due, environment
from common.shards import ShardError, TokenLoader, shard_files
from common.swap import transformer_layers

# fmt: off
# ---------------------------------------------------------------------------------------------- run constants
INIT = "models/smolllm2_135m"   # model folder, or checkpoint folder (distill.py's OUT/final, a train.py step folder)
FROM_SCRATCH = False            # use only INIT's config.json, with freshly initialised weights (small experiments)
DATA_DIR = "data/fineweb_edu"   # train_*/val_* shards and manifest.json from prepare.py
OUT_DIR = ""                    # run folder; empty = runs/train_<date>_<time>
RESUME = False                  # continue the run in OUT_DIR from its latest checkpoint
# batch
BATCH_SIZE = 8                  # sequences per micro-step on each rank: raise it until device memory is full
SEQ_LEN = 2048                  # tokens per sequence (SmolLM2's context length)
TOTAL_BATCH_TOKENS = 524288     # tokens per optimizer step over all ranks (0.5M, as GPT-2 small); gives GRAD_ACCUM
GRAD_ACCUM = 0                  # micro-steps per optimizer step on each rank; 0 = TOTAL_BATCH_TOKENS / (B*T*ranks)
# optimization
STEPS = 2000                    # optimizer steps: ~1B tokens at 0.5M per step, about one pass over prepare.py's data
LR = 3e-4                       # peak AdamW learning rate (continued pretraining of a trained model wants a low one)
MIN_LR_RATIO = 0.1              # the schedule ends at LR * MIN_LR_RATIO
WARMUP_STEPS = 100              # linear warmup to LR while Adam's moment estimates fill
SCHEDULE = "cosine"             # cosine, wsd (hold LR, decay linearly over the last 20% of steps) or constant
WEIGHT_DECAY = 0.1              # decoupled AdamW decay, on matrices only (not on norms and biases)
BETAS = [0.9, 0.95]             # AdamW betas; beta2 0.95 is steadier than 0.999 for LM training
GRAD_CLIP = 1.0                 # clip the global gradient norm to this; 0 = no clipping (the norm is still logged)
# validation, logging, checkpoints
VAL_EVERY = 250                 # validate at the start, every this many steps and at the end; 0 = never
VAL_TOKENS = 2**20              # tokens per validation: the first VAL_TOKENS of the val split, the same every time
LOG_EVERY = 10                  # print the loss at step 1 and every N steps (metrics.jsonl gets all); 0 = at val/save/end
SAVE_EVERY = 500                # checkpoint every this many steps and at the end; 0 = only at the end
KEEP_LAST = 3                   # keep the newest this many checkpoints; 0 = keep all
# system
PARALLEL = "ddp"                # ddp: each rank holds the whole model; fsdp: FSDP2 shards it over the ranks (torchrun)
ACTIVATION_CHECKPOINTING = False  # recompute each layer's activations in backward: less memory, ~1/3 more compute
COMPILE = True                  # torch.compile the model on GPUs under ddp (CPU stays eager: compiling costs more)
DTYPE = "auto"                  # auto: bf16 autocast with fp32 master weights on GPUs, fp32 on CPU; float32, bfloat16
SEED = 1337                     # weight initialisation (--from-scratch) and any randomness in the model
# fmt: on

config = override(globals()).as_dict()
globals().update(config)  # the constants now hold the run's settings


def check_constants():
    """Every constant that can be checked without the model or the data, before anything is loaded or written."""
    at_least_1 = "BATCH_SIZE SEQ_LEN TOTAL_BATCH_TOKENS STEPS".split()
    at_least_0 = "GRAD_ACCUM WARMUP_STEPS WEIGHT_DECAY GRAD_CLIP VAL_EVERY LOG_EVERY SAVE_EVERY KEEP_LAST".split()
    check_ranges(
        globals(),
        choices={"SCHEDULE": ("cosine", "wsd", "constant"), "PARALLEL": parallel.MODES},
        at_least={**dict.fromkeys(at_least_1, 1), **dict.fromkeys(at_least_0, 0)},
        notes={
            "GRAD_ACCUM": " (0: TOTAL_BATCH_TOKENS / (BATCH_SIZE x SEQ_LEN x ranks))",
            "GRAD_CLIP": " (0 turns clipping off)",
            "KEEP_LAST": " (0 keeps every checkpoint)",
        },
        positive=["LR"],
        fractions=["MIN_LR_RATIO"],
    )
    if len(BETAS) != 2 or not all(0 <= b < 1 for b in BETAS):
        fail(f"BETAS must be two numbers in [0, 1), got {BETAS}")


# ---------------------------------------------------------------------------------------------- setup
check_constants()
try:
    rt = Runtime(dtype=DTYPE)
    parallel.check(PARALLEL, rt.world_size)
except ValueError as e:
    fail(e)
cuda = rt.device.type == "cuda"
if rt.dtype == torch.float16:
    fail("DTYPE float16 needs a gradient scaler, which train.py does not have; use bfloat16")
if cuda:
    torch.set_float32_matmul_precision("high")  # TF32 for whatever autocast leaves in fp32
torch.manual_seed(SEED)
if RESUME and not OUT_DIR:
    fail("--resume needs --out-dir RUN_FOLDER, the run to continue")
OUT_DIR = config["OUT_DIR"] = folder_name(rt, OUT_DIR, "train")
exit_on_stop_signals(OUT_DIR)

# the batch: derived numbers, computed once
micro_tokens = BATCH_SIZE * SEQ_LEN * rt.world_size  # tokens per micro-step over all ranks
grad_accum = GRAD_ACCUM or TOTAL_BATCH_TOKENS // micro_tokens
if grad_accum < 1 or (not GRAD_ACCUM and grad_accum * micro_tokens != TOTAL_BATCH_TOKENS):
    fail(
        f"TOTAL_BATCH_TOKENS={TOTAL_BATCH_TOKENS:,} is not a multiple of BATCH_SIZE x SEQ_LEN x ranks "
        f"= {BATCH_SIZE} x {SEQ_LEN} x {rt.world_size} = {micro_tokens:,}; change one of them or set --grad-accum"
    )
tokens_per_step = BATCH_SIZE * SEQ_LEN * grad_accum * rt.world_size
assert GRAD_ACCUM or tokens_per_step == TOTAL_BATCH_TOKENS
config["grad_accum"], config["tokens_per_step"] = grad_accum, tokens_per_step

# the run folder. Constants a resumed run may change (listed when they do): the optimisation schedule (steering a
# run, e.g. a lower LR after a loss spike, or more steps), how a step's tokens are split into micro-steps, how it
# runs, and when it validates, logs and saves. A change to any other (INIT, DATA_DIR, SEQ_LEN, the tokens per step,
# SEED) would not continue this run, so it is refused.
may_change = {
    "OUT_DIR",
    "RESUME",
    "STEPS",
    "LR",
    "MIN_LR_RATIO",
    "WARMUP_STEPS",
    "SCHEDULE",
    "WEIGHT_DECAY",
    "BETAS",
    "GRAD_CLIP",
    "BATCH_SIZE",
    "GRAD_ACCUM",
    "grad_accum",
    "ACTIVATION_CHECKPOINTING",
    "COMPILE",
    "DTYPE",
    "VAL_EVERY",
    "VAL_TOKENS",
    "LOG_EVERY",
    "SAVE_EVERY",
    "KEEP_LAST",
}


def open_run():
    """Rank 0 creates or reopens OUT_DIR (locked for the life of this process) and checks a resumed run's constants
    against those it started with; a refusal ends every rank with one line. Returns the run id on rank 0."""

    def start():
        run = start_run(OUT_DIR, RESUME, "train.py", config)
        if RESUME:
            changed = check_unchanged(run["config"], config, may_change, os.path.join(OUT_DIR, "run.json"))
            changed = [c for c in changed if c.split()[0] not in ("RESUME", "OUT_DIR")]
            if changed:
                print("train.py: resuming with changed constants (the run is no longer exact): " + ", ".join(changed))
        return run["run_id"]

    try:
        return rt.master_only(start)
    except ValueError as e:
        if not rt.master:
            sys.exit(1)  # rank 0 says why
        fail(e)


# a resumed run locks its folder before reading its checkpoints: a run still going there would change them
run_id = open_run() if RESUME else None

# the model: from the run's latest checkpoint when resuming, else INIT (under fsdp on the host: sharding moves it)
ckpt = latest_checkpoint(OUT_DIR, phase="train") if RESUME else None
load_on = parallel.load_device(rt, PARALLEL)
try:
    if ckpt:
        model = load_model(ckpt, device=load_on)
        state = load_state(ckpt)
    elif FROM_SCRATCH:
        from transformers import AutoConfig, AutoModelForCausalLM

        check_has_config(INIT)
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(INIT), dtype=torch.float32, attn_implementation="sdpa"
        ).to(load_on)
    else:
        model = load_model(INIT, device=load_on)
    transformer_layers(model)  # every checkpoint records the model's students: a model the swap does not know fails now
except (OSError, ValueError) as e:
    fail(e)
model.train()
cfg = model.config
n_params = sum(p.numel() for p in model.parameters())
n_students = sum(isinstance(m, tuple(students.STUDENTS.values())) for m in model.modules())
# FLOPs per trained token for MFU: 6 per matmul weight (forward + backward; the input embedding is a lookup,
# not a matmul, unless tied to the head) plus attention's 12 * layers * width * context (PaLM, appendix B)
embedding = model.get_input_embeddings().weight
head = model.get_output_embeddings()
matmul_params = n_params - (0 if head is not None and head.weight is embedding else embedding.numel())
attn_width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
flops_per_token = 6 * matmul_params + 12 * cfg.num_hidden_layers * attn_width * SEQ_LEN


# the data: every shard is opened and checked now (header, size, token ids < vocab), not hours into the run
def checked_loader(split):
    loader = TokenLoader(shard_files(DATA_DIR, split), BATCH_SIZE, SEQ_LEN, rt.rank, rt.world_size, cfg.vocab_size)
    total = 0
    for i in range(len(loader.files)):
        loader.load_state({"shard": i, "pos": 0})
        total += len(loader.tokens)
    loader.reset()
    return loader, total


try:
    train_loader, train_total = checked_loader("train")
    val_loader, val_total = checked_loader("val") if VAL_EVERY else (None, 0)
except ShardError as e:
    fail(e)
val_steps = VAL_TOKENS // micro_tokens if VAL_EVERY else 0
if VAL_EVERY and not 1 <= val_steps <= val_total // micro_tokens:
    fail(
        f"VAL_TOKENS={VAL_TOKENS:,} must hold at least one micro-step ({micro_tokens:,} tokens) and "
        f"at most the val split ({val_total:,} tokens); change --val-tokens"
    )
val_batches = [val_loader.next_batch() for _ in range(val_steps)]  # the same tokens at every validation

# the model as it trains: fsdp shards it (so its parameters change: the optimizer comes after), ddp compiles it on
# GPUs and replicates it; raw_model is the module itself, for validation and checkpoints
raw_model = model
compiled = COMPILE and cuda and PARALLEL == "ddp"
if ACTIVATION_CHECKPOINTING:
    parallel.checkpoint_layers(model)
if PARALLEL == "fsdp":
    parallel.shard(model, rt)
else:
    if compiled:
        model = torch.compile(model)
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if cuda else None)
        model.broadcast_buffers = False  # the only buffers, rotary tables, never change: no broadcast every forward

# the optimizer: AdamW with weight decay on matrices only; fused kernels on GPUs
params = [p for p in raw_model.parameters() if p.requires_grad]
optimizer = adamw(params, LR, WEIGHT_DECAY, tuple(BETAS), matrices_only=True, fused=True if cuda else None)

# resume: optimizer moments, the step, the data position and RNG (the LR is a pure function of the step)
start_step = restore_training(state, train_loader, optimizer, raw_model) if ckpt else 0

# a new run's folder is created only now that the model and the data are known to be good
if not RESUME:
    run_id = open_run()
log = RunLog(rt, OUT_DIR)

rt.print(
    f"model: {ckpt or INIT}{' (fresh weights)' if FROM_SCRATCH and not ckpt else ''}: {n_params / 1e6:.1f}M "
    f"parameters, {cfg.num_hidden_layers} layers, {n_students} student decoders; {rt.device} x {rt.world_size} "
    f"rank(s), {PARALLEL}, {str(rt.dtype).replace('torch.', '')}, compile {'on' if compiled else 'off'}, "
    f"activation checkpointing {'on' if ACTIVATION_CHECKPOINTING else 'off'}"
)
rt.print(
    f"batch: {BATCH_SIZE} seqs x {SEQ_LEN} tokens x {grad_accum} micro-steps x {rt.world_size} rank(s) = "
    f"{tokens_per_step:,} tokens/step; {STEPS} steps = {STEPS * tokens_per_step:,} tokens "
    f"= {STEPS * tokens_per_step / train_total:.2f} passes over {train_total:,} train tokens"
)
rt.print(
    f"run folder: {OUT_DIR}"
    + (
        f" (resuming at step {start_step} from {ckpt})"
        if ckpt
        else " (no checkpoint yet: from step 0)"
        if RESUME
        else ""
    )
)


# ---------------------------------------------------------------------------------------------- helpers
def get_batch(loader):
    x, y = loader.next_batch()
    if cuda:
        x, y = x.pin_memory().to(rt.device, non_blocking=True), y.pin_memory().to(rt.device, non_blocking=True)
    return x, y


def loss_on(x, y):
    with rt.autocast():
        logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def log_validation(step):
    """Mean loss over the first VAL_TOKENS val tokens (the same batches every time), over all ranks."""
    loss = evaluate(raw_model, val_batches, rt=rt)["ce"]
    log.log(step=step, val_loss=loss, val_ppl=math.exp(loss))
    rt.print(f"step {step:>6}/{STEPS} | val loss {loss:.4f} | val ppl {math.exp(loss):.2f}")


def log_pending_steps(pending, started):
    """Read the pending steps' numbers back from the device (losses averaged over ranks), stop at a
    non-finite one, write a metrics line per step and print the last. `started`: when the first began."""
    losses = torch.stack([loss for _, _, loss, _ in pending])
    if rt.ddp:
        dist.all_reduce(losses)
        losses /= rt.world_size
    losses, norms = losses.tolist(), torch.stack([norm for _, _, _, norm in pending]).tolist()  # waits for the device
    tok_s = len(pending) * tokens_per_step / (time.perf_counter() - started)
    peak = rt.peak_flops()
    speed = {"tokens_per_s": tok_s, **({"mfu": tok_s * flops_per_token / (peak * rt.world_size)} if peak else {})}
    for i, ((step, lr, _, _), loss, norm) in enumerate(zip(pending, losses, norms)):
        if not (math.isfinite(loss) and math.isfinite(norm)):
            last = latest_checkpoint(OUT_DIR, phase="train") if rt.master else None
            if not rt.master:
                sys.exit(1)  # rank 0 says why
            fail(
                f"non-finite loss {loss} / grad norm {norm} at step {step}; stopped. Last good "
                f"checkpoint: {last or 'none yet'} (continue it with --resume --out-dir {OUT_DIR}, "
                f"perhaps with a lower --lr)"
            )
        log.log(
            step=step,
            loss=loss,
            lr=lr,
            grad_norm=norm,
            tokens=step * tokens_per_step,
            **(speed if i == len(pending) - 1 else {}),
        )
    rt.print(
        f"step {step:>6}/{STEPS} | loss {loss:.4f} | lr {lr:.2e} | grad norm {norm:.3f} | {tok_s:,.0f} tok/s"
        + (f" | mfu {speed['mfu']:.1%}" if peak else "")
    )


def out_of_memory(step):
    """One line for running out of device memory. A new run with no checkpoint yet leaves no run folder behind, so
    that the same command with a smaller batch starts cleanly."""
    fresh = not RESUME and rt.master and not list_checkpoints(OUT_DIR, phase="train")
    if fresh:
        shutil.rmtree(OUT_DIR)
    again = "run again" if fresh else f"continue with --resume --out-dir {OUT_DIR}"
    fail(
        f"out of memory at step {step} ({BATCH_SIZE} x {SEQ_LEN} tokens per micro-step on {rt.device}); "
        f"{again} and a lower --batch-size (more micro-steps then make up TOTAL_BATCH_TOKENS)"
    )


def save(step):
    """Rank 0 writes OUT_DIR/stepNNNNNN and keeps the newest KEEP_LAST; every rank calls this, as under fsdp the
    weights and optimizer state are gathered to rank 0 from all of them first. Returns the folder."""
    folder = os.path.join(OUT_DIR, f"step{step:06d}")
    state = training_state(step, optimizer, train_loader, raw_model)
    weights = parallel.full_state_dict(raw_model) if parallel.is_sharded(raw_model) else None
    if rt.master:
        meta = {"script": "train.py", "phase": "train", "step": step, "run_id": run_id, "init": INIT}
        save_checkpoint(folder, raw_model, meta, state, keep_tokenizer_from=INIT, weights=weights)
        prune_checkpoints(OUT_DIR, "train", KEEP_LAST)
    return folder


# ---------------------------------------------------------------------------------------------- training
with exit_when_disk_full(OUT_DIR):  # one line saying how to continue, not a traceback
    if rt.master:
        if RESUME:  # what the interrupted run logged after its checkpoint is redone, so dropped
            log.trim(lambda record: ckpt is not None and record["step"] <= start_step)
        log.log(
            step=start_step,
            event="resume" if RESUME else "start",
            checkpoint=ckpt,
            config=config,
            environment=environment(rt),
        )
    if start_step >= STEPS:
        rt.print(f"nothing to do: the run is at step {start_step} of STEPS={STEPS}")
    if VAL_EVERY and start_step == 0:
        log_validation(0)
    pending = []  # (step, lr, loss, grad norm) of the steps whose numbers are still on the device
    t_last = time.perf_counter()
    for s in range(start_step, STEPS):
        lr = lr_at(s, STEPS, LR, WARMUP_STEPS, SCHEDULE, MIN_LR_RATIO)
        try:
            step_loss = torch.zeros((), device=rt.device)
            for micro in range(grad_accum):
                # DDP all-reduces the gradients on the last micro-step only; FSDP reduce-scatters them at every
                # one, keeping only its shard of their sum
                skip_sync = isinstance(model, DDP) and micro < grad_accum - 1
                with model.no_sync() if skip_sync else contextlib.nullcontext():
                    loss = loss_on(*get_batch(train_loader)) / grad_accum
                    loss.backward()
                step_loss += loss.detach()
            (norm,) = step_optimizer(rt, optimizer, [params], lr, GRAD_CLIP, reduced=True)  # DDP or FSDP reduced them
        except torch.OutOfMemoryError:
            out_of_memory(s + 1)
        step = s + 1  # optimizer steps done: the step number in logs and checkpoint names
        pending.append((step, lr, step_loss, norm))
        validate = VAL_EVERY > 0 and due(step, VAL_EVERY, STEPS)
        checkpoint = due(step, SAVE_EVERY, STEPS)
        # the pending steps are checked finite before anything is saved
        if due(step, LOG_EVERY, first=True) or validate or checkpoint:
            log_pending_steps(pending, t_last)
            pending = []
            if validate:
                log_validation(step)
            if checkpoint:
                rt.print(f"saved {save(step)}")
            t_last = time.perf_counter()  # tokens/s counts training only, not validation or saving
rt.close()
