"""Layer-wise distillation of a decoder-only LM's decoders, then full-model logits distillation.

Phase 'layerwise' (default). A decoder is the swappable block of a layer (TARGET: the FFN 'mlp' or
self-attention 'attn'). For layer i, the teacher's input latent to its decoder is fed to both the
teacher's decoder and the student; only the student trains, to match the teacher's output.
  - SCHEDULE=rotation: one layer at a time, STEPS_PER_LAYER steps each, in layer order. The teacher's
    residual stream for the rotation's tokens is cached and advanced one layer at a time, so a
    rotation costs O(L) teacher layer-forwards per token and never runs layers after i or the head.
  - SCHEDULE=parallel: one teacher pass per batch gives every layer its input and target and all
    students train at once, each on its own teacher input (RADLADS step 1, LoLCATs attention transfer).
A checkpoint follows each layer (rotation) or every SAVE_EVERY steps (parallel); OUT/final/ is the
teacher with every visited decoder replaced by its student.

Phase 'logits' (--phase logits): the student model's next-token distribution is trained toward the
teacher's, KL(teacher || student) at KD_TEMPERATURE plus KD_CE_WEIGHT x cross-entropy (RADLADS step 2),
with its own optimizer and LR schedule.

    python distill.py [--name value ...]
    torchrun --standalone --nproc_per_node N distill.py [--name value ...]
"""
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from common.checkpoint import (check_unchanged, latest_checkpoint, list_checkpoints, load_model, load_state,
                               save_checkpoint, start_run)
from common.config import override
from common.decoders import (check_layers, check_target, decoder_input, decoder_layers, finish_layer, get_block,
                             make_student, position_embeddings, run_block, student_specs, swapped)
from common.evaluate import evaluate, val_batches
from common.kd import final_hidden, head_weight, kd_loss
from common.plots import run_png
from common.runtime import Runtime, RunLog, environment, get_rng_state, lr_at, set_rng_state
from common.shards import ShardError, TokenLoader, read_json, read_shard, shard_files, write_json_atomic

# ---------------------------------------------------------------------------------------------- run constants
TEACHER = "models/smolllm2_135m"  # teacher model folder (prepare.py writes it); a checkpoint folder works too
DATA_DIR = "data/fineweb_edu"     # shards and manifest from prepare.py
OUT_DIR = ""                      # run folder; empty = runs/distill_<date>_<time>
RESUME = False                    # continue the run in OUT_DIR from its latest checkpoint of this phase
PHASE = "layerwise"               # layerwise: match each decoder's output; logits: match next-token distributions
# layer-wise phase
TARGET = "mlp"                    # the block each layer swaps: mlp (FFN) or attn (self-attention)
STUDENT_KIND = "prototype"        # a registered student: mlp: copy/prototype/pruned; attn: linear/window
STUDENT_KWARGS = {}               # the student's arguments, JSON: '{"scale": 0.5, "activation": "relu2"}'
CALIB_TOKENS = 32768              # tokens (all ranks) each student calibrates on before its first step; 0 = off
LATENT_STREAM = "teacher"         # what feeds layer i: the teacher's layers, or the students already trained
LAYERS = []                       # layer indices to distill; empty = every layer
KEEP_TEACHER_LAYERS = []          # layers that keep the teacher's block (hybrids); removed from LAYERS
SCHEDULE = "rotation"             # rotation (one layer at a time) or parallel (all layers per teacher pass)
ROTATIONS = 1                     # passes over LAYERS, each on fresh tokens
STEPS_PER_LAYER = 100             # optimizer steps each layer gets per rotation; 0 = calibration only
BATCH_SIZE = 8                    # sequences per micro-batch, per rank
SEQ_LEN = 512                     # tokens per sequence
GRAD_ACCUM = 1                    # micro-batches per optimizer step
LR = 1e-3                         # peak learning rate of each layer's schedule
WARMUP_STEPS = 10                 # linear warmup at the start of each layer's schedule
MIN_LR_RATIO = 0.1                # cosine decay ends at this fraction of the peak
WEIGHT_DECAY = 0.0                # students start at or near the teacher: no pull toward zero by default
GRAD_CLIP = 1.0                   # max gradient norm per optimizer step; 0 turns clipping off
DECODER_LOSS = "mse"              # mse, nmse (squared error / squared teacher norm, per token) or cosine
TRAINABLE = []                    # train only student parameters whose names contain one of these; empty = all
LOG_EVERY = 10                    # log the loss every N steps (a host sync on GPUs)
VAL_TOKENS = 8192                 # held-out val tokens (all ranks together), the same ones every time
VAL_EVERY = 0                     # also validate every N steps inside a layer (parallel: the whole run); 0 = off
SAVE_EVERY = 0                    # parallel schedule: checkpoint every N steps; 0 = only the final one
KEEP_LAST = 0                     # delete all but the newest K checkpoints of the phase (disk); 0 = keep all
LATENT_CACHE = "auto"             # where the rotation's latent cache lives: auto, device, host or disk
# logits phase
INIT = ""                         # checkpoint to start from; empty = this run's latest layer-wise checkpoint
KD_TRAINABLE = "decoders"         # decoders: only the students train; all: the whole student model trains
KD_STEPS = 100                    # optimizer steps of the logits phase
KD_LR = 1e-4                      # its own peak LR: never inherited from the layer-wise phase
KD_WARMUP_STEPS = 10              # its own warmup, then cosine decay to MIN_LR_RATIO x KD_LR
KD_TEMPERATURE = 1.0              # softens both distributions; the loss is scaled by T^2
KD_CE_WEIGHT = 0.0                # weight of next-token cross-entropy mixed into the KL loss
KD_VAL_EVERY = 50                 # validate (val CE, KL to the teacher) every N steps
KD_SAVE_EVERY = 50                # checkpoint every N steps
KD_FRESH_TOKENS = True            # continue after the tokens the init checkpoint consumed, not from the start
DTYPE = "auto"                    # auto: bf16 autocast with fp32 master weights on GPU, fp32 on CPU
SEED = 1337                       # student initialisation (layer i uses SEED + i) and any sampling


# ---------------------------------------------------------------------------------------------- helpers
def fail(message):
    sys.exit(f"distill.py: {message}")


def decoder_loss(student_out, teacher_out):
    s, t = student_out.float(), teacher_out.float()
    if DECODER_LOSS == "mse":
        return F.mse_loss(s, t)
    if DECODER_LOSS == "nmse":
        return ((s - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)).mean()
    return 1 - F.cosine_similarity(s, t, dim=-1).mean()


def sync_grads(rt, params, bucket_numel=2**24):
    """Average gradients over ranks once per optimizer step, in flat buckets of ~64 MB (fp32)."""
    if not rt.ddp:
        return
    grads = [p.grad for p in params]
    while grads:
        n, size = 0, 0
        while n < len(grads) and (n == 0 or size + grads[n].numel() <= bucket_numel):
            size += grads[n].numel()
            n += 1
        bucket, grads = grads[:n], grads[n:]
        flat = torch.cat([g.flatten() for g in bucket])
        dist.all_reduce(flat)
        flat /= rt.world_size
        for g, f in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(f.view_as(g))


def trainable_params(student, name):
    """The student's parameters to train (all, or those whose names contain a TRAINABLE entry)."""
    named = list(student.named_parameters())
    if TRAINABLE:
        chosen = [(n, p) for n, p in named if any(t in n for t in TRAINABLE)]
        if not chosen:
            fail(f"TRAINABLE {TRAINABLE} matches no parameter of the {name} student; its parameters: "
                 + ", ".join(n for n, _ in named))
    else:
        chosen = named
    for n, p in named:
        p.requires_grad_(any(p is q for _, q in chosen))
    return [p for _, p in chosen]


def step_optimizer(rt, opt, groups, lr):
    """Average grads over ranks, clip each student's grads on their own, set the LR, step.
    Returns each group's grad norm (a tensor: no host sync here)."""
    sync_grads(rt, [p for g in groups for p in g])
    norms = [torch.nn.utils.clip_grad_norm_(g, GRAD_CLIP if GRAD_CLIP > 0 else float("inf")) for g in groups]
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norms


def new_optimizer(params, lr):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)


def free_bytes(where, rt):
    if where == "device" and rt.device.type == "cuda":
        return torch.cuda.mem_get_info(rt.device)[0]
    if where in ("device", "host"):
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    st = os.statvfs(OUT_DIR)
    return st.f_bavail * st.f_frsize


def place_cache(rt, nbytes):
    """Choose where the latent cache lives: the device when it fits, else host memory, else a disk
    memory map in the run folder. Exits with a clear message when it fits nowhere."""
    size = f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
    options = ["device", "host", "disk"] if LATENT_CACHE == "auto" else [LATENT_CACHE]
    for where in options:
        if nbytes < 0.7 * free_bytes(where, rt):
            rt.print(f"latent cache: {size} per rank on {where}" + (f" ({rt.device})" if where == "device" else ""))
            return where
    fail(f"the latent cache needs {size} per rank and fits in none of: {', '.join(options)}; "
         f"lower STEPS_PER_LAYER x GRAD_ACCUM x BATCH_SIZE x SEQ_LEN, or free memory/disk")


def cache_tensor(rt, where, shape, path):
    if where == "device":
        return torch.empty(shape, device=rt.device)
    if where == "host":
        return torch.empty(shape, pin_memory=rt.device.type == "cuda")
    return torch.from_numpy(np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape))


class LatentCache:
    """The teacher's residual stream h for a fixed set of sequences, advanced one layer at a time,
    and the latent x that layer's target block sees. Batches of BATCH_SIZE sequences move to the
    device as they are used, so the cache may live in host memory or on disk."""

    def __init__(self, rt, model, tokens, where, name):
        self.rt, self.model = rt, model
        n, d = tokens.shape[0], model.config.hidden_size
        self.paths = [os.path.join(OUT_DIR, f".latent_{name}_{part}_rank{rt.rank}.npy") for part in "hx"]
        self.h, self.x = (cache_tensor(rt, where, (n, SEQ_LEN, d), path) for path in self.paths)
        self.layer = 0  # h is the input to this layer
        with torch.no_grad():
            for s in range(0, n, BATCH_SIZE):
                self.h[s:s + BATCH_SIZE].copy_(model.model.embed_tokens(tokens[s:s + BATCH_SIZE].to(rt.device)))
        self.pe = position_embeddings(model, self.h[:1].to(rt.device))

    def batches(self, buffer):
        """(start, batch on the device) over a cache buffer."""
        for s in range(0, len(buffer), BATCH_SIZE):
            yield s, buffer[s:s + BATCH_SIZE].to(self.rt.device, non_blocking=True)

    @torch.no_grad()
    def split(self):
        """x <- latent into this layer's target block; h <- the residual beside it."""
        layer = decoder_layers(self.model)[self.layer]
        for s, hb in self.batches(self.h):
            with self.rt.autocast():
                lat, res = decoder_input(layer, hb, TARGET, self.pe)
            self.x[s:s + len(hb)].copy_(lat)
            self.h[s:s + len(hb)].copy_(res)

    @torch.no_grad()
    def finish(self, block=None):
        """h <- this layer's output with `block` (default: the teacher's); move to the next layer."""
        layer = decoder_layers(self.model)[self.layer]
        block = block or get_block(self.model, self.layer, TARGET)
        for s, xb in self.batches(self.x):
            hb = self.h[s:s + len(xb)].to(self.rt.device)
            with self.rt.autocast():
                out = finish_layer(layer, hb, run_block(block, xb, TARGET, self.pe), TARGET)
            self.h[s:s + len(xb)].copy_(out)
        self.layer += 1

    def advance_to(self, layer_index, blocks=None):
        """Advance to layer_index through the teacher's blocks, or those in `blocks` ({layer: block})."""
        while self.layer < layer_index:
            self.split()
            self.finish((blocks or {}).get(self.layer))

    def close(self):
        """Free the buffers and delete their files when the cache lives on disk."""
        del self.h, self.x
        for path in self.paths:
            if os.path.exists(path):
                os.remove(path)


def read_tokens(loader, n_batches):
    return torch.cat([torch.empty(0, SEQ_LEN, dtype=torch.long)] + [loader.next_batch()[0] for _ in range(n_batches)])


@torch.no_grad()
def layer_error(rt, student, teacher_block, cache):
    """Val MSE and relative error ||s - t||^2 / ||t||^2 of a student against the teacher block,
    on the latents of a (val) cache split at this layer."""
    se = sq = count = 0.0
    for _, xb in cache.batches(cache.x):
        with rt.autocast():
            t = run_block(teacher_block, xb, TARGET, cache.pe).float()
            s = run_block(student, xb, TARGET, cache.pe).float()
        se += (s - t).square().sum().item()
        sq += t.square().sum().item()
        count += t.numel()
    se, sq, count = rt.all_mean(se), rt.all_mean(sq), rt.all_mean(count)
    return {"val_mse": se / count, "val_rel_err": se / max(sq, 1e-30)}


def hybrid_ce(rt, model, val, blocks=None):
    """Val cross-entropy of the model with `blocks` ({(layer, target): student}) swapped in."""
    with swapped(model, blocks or {}):
        return evaluate(model, val, rt=rt)["ce"]


def val_inputs(val):
    return torch.cat([x for x, _ in val])


def make_students(model, layers):
    students = {}
    for i in layers:
        torch.manual_seed(SEED + i)
        students[i] = make_student(TARGET, STUDENT_KIND, get_block(model, i, TARGET), model.config, **STUDENT_KWARGS)
    return students


def write_checkpoint(rt, name, model, blocks, meta, state):
    """Rank 0 writes OUT/name with `blocks` ({(layer, target): student}) swapped into the model."""
    if rt.master:
        folder = os.path.join(OUT_DIR, name)
        with swapped(model, blocks):
            save_checkpoint(folder, model, meta={"script": "distill.py", **meta}, state=state)
        if KEEP_LAST > 0:
            for old in list_checkpoints(OUT_DIR, meta["phase"])[:-KEEP_LAST]:
                if os.path.basename(old) != "final":
                    shutil.rmtree(old)
    rt.barrier()


def print_table(rows, columns):
    cells = [[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[k]) for row in cells)) for k, c in enumerate(columns)]
    for row in [columns, *cells]:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def stream_blocks(students):
    """The blocks that carry the latent stream past distilled layers: with LATENT_STREAM=student the
    students ({layer: block}), so that later layers learn on (and correct) earlier students' outputs."""
    return students if LATENT_STREAM == "student" else {}


def fresh_errors(rt, model, students, val, where):
    """Val error of every student, from one pass of the stream over the val tokens (O(L))."""
    cache = LatentCache(rt, model, val_inputs(val), where, "val")
    errors = {}
    for i in sorted(students):
        cache.advance_to(i, stream_blocks(students))
        cache.split()
        errors[i] = layer_error(rt, students[i], get_block(model, i, TARGET), cache)
        cache.finish(stream_blocks(students).get(i))
    cache.close()
    return errors


def calib_batches(rt):
    """Batches per rank that hold CALIB_TOKENS (all ranks together), rounded up to whole steps."""
    return -(-CALIB_TOKENS // (BATCH_SIZE * SEQ_LEN * rt.world_size))


@torch.no_grad()
def calibrate(rt, student, teacher_block, cache, n_seq):
    """Fit a student that defines calibrate() to the first n_seq sequences of `cache` (split at its
    layer) and their teacher outputs, in fp32 with fp64 statistics summed over ranks: deterministic,
    and the same student on every rank. Returns the seconds it took, or None when nothing ran."""
    if not hasattr(student, "calibrate") or n_seq == 0:
        return None
    t0 = time.time()

    def batches(targets=True):
        for s in range(0, n_seq, BATCH_SIZE):
            xb = cache.x[s:min(s + BATCH_SIZE, n_seq)].to(rt.device)
            yield xb, run_block(teacher_block, xb, TARGET, cache.pe) if targets else None

    student.calibrate(teacher_block, batches, rt.all_sum_, cache.pe)
    rt.synchronize()
    return time.time() - t0


# ---------------------------------------------------------------------------------------------- layer-wise phase
def train_rotation(rt, model, log, visit, val, teacher_ce):
    """One layer at a time over a cached teacher stream; a checkpoint after each layer."""
    # per rank: one layer's steps, each token once, extended when calibration wants more tokens
    n_seq = max(STEPS_PER_LAYER * GRAD_ACCUM, calib_batches(rt)) * BATCH_SIZE
    n_calib = calib_batches(rt) * BATCH_SIZE
    d = model.config.hidden_size
    where = place_cache(rt, 2 * 4 * d * SEQ_LEN * (n_seq + len(val) * BATCH_SIZE))
    loader = TokenLoader(shard_files(DATA_DIR, "train"), BATCH_SIZE, SEQ_LEN, rt.rank, rt.world_size,
                         vocab_size=model.config.vocab_size)
    students = make_students(model, visit)
    rotation, done, step, rows = 0, 0, 0, []
    ckpt = latest_checkpoint(OUT_DIR, "layerwise") if RESUME else None
    if ckpt:
        state = load_state(ckpt)
        rotation, done, step, rows = state["rotation"], state["done"], state["step"], state["rows"]
        loader.load_state(state["loader"])
        set_rng_state(state["rng"])
        saved = load_model(ckpt, rt.device)
        for spec in student_specs(saved):
            students[spec["layer"]] = get_block(saved, spec["layer"], TARGET)
        del saved
        rt.print(f"resuming from {ckpt}: rotation {rotation}, {done} of {len(visit)} layers done, step {step}")
    trained = {r["layer"] for r in rows}
    while rotation < ROTATIONS:
        rotation_start = loader.state()
        t0 = time.time()
        tokens = read_tokens(loader, n_seq // BATCH_SIZE)
        assert tokens.shape == (n_seq, SEQ_LEN), tokens.shape
        cache = LatentCache(rt, model, tokens, where, "train")
        vcache = LatentCache(rt, model, val_inputs(val), where, "val")
        for k in range(done, len(visit)):
            i = visit[k]
            stream = stream_blocks({j: students[j] for j in trained})
            vcache.advance_to(i, stream)
            vcache.split()
            teacher_block, student = get_block(model, i, TARGET), students[i]
            start_err = layer_error(rt, student, teacher_block, vcache)
            t_train = time.time()  # the rotation's teacher and student compute on training tokens
            cache.advance_to(i, stream)
            cache.split()
            calib_s = calibrate(rt, student, teacher_block, cache, n_calib) if rotation == 0 else None
            calib_err = layer_error(rt, student, teacher_block, vcache) if calib_s is not None else start_err
            params = trainable_params(student, f"layer {i}")
            opt = new_optimizer(params, LR)
            bar = tqdm(range(STEPS_PER_LAYER), desc=f"rot {rotation} layer {i}", disable=not rt.master, leave=False)
            rt.synchronize()
            t_steps = time.time()
            for s in bar:
                lr = lr_at(s, STEPS_PER_LAYER, LR, WARMUP_STEPS, "cosine", MIN_LR_RATIO)
                loss_sum = 0.0
                for m in range(GRAD_ACCUM):
                    j = (s * GRAD_ACCUM + m) * BATCH_SIZE
                    xb = cache.x[j:j + BATCH_SIZE].to(rt.device, non_blocking=True)
                    with torch.no_grad(), rt.autocast():
                        target = run_block(teacher_block, xb, TARGET, cache.pe)
                    with rt.autocast():
                        loss = decoder_loss(run_block(student, xb, TARGET, cache.pe), target) / GRAD_ACCUM
                    loss.backward()
                    loss_sum += loss.detach()
                (norm,) = step_optimizer(rt, opt, [params], lr)
                step += 1
                if s % LOG_EVERY == 0 or s == STEPS_PER_LAYER - 1:
                    loss_val = rt.all_mean(loss_sum.item())
                    bar.set_postfix(loss=f"{loss_val:.4g}")
                    log.log(phase="layerwise", rotation=rotation, layer=i, step=step, layer_step=s + 1,
                            loss=loss_val, lr=lr, grad_norm=norm.item())
                if VAL_EVERY and (s + 1) % VAL_EVERY == 0:
                    err = layer_error(rt, student, teacher_block, vcache)
                    log.log(phase="layerwise", rotation=rotation, layer=i, step=step, layer_step=s + 1, **err)
            rt.synchronize()
            step_ms = 1000 * (time.time() - t_steps) / max(1, STEPS_PER_LAYER)
            cache.finish(stream_blocks({i: student}).get(i))
            rt.synchronize()
            train_s = time.time() - t_train - (calib_s or 0)
            end_err = layer_error(rt, student, teacher_block, vcache)
            trained.add(i)
            ce = hybrid_ce(rt, model, val, {(j, TARGET): students[j] for j in trained})
            row = {"rotation": rotation, "layer": i, "mse_start": start_err["val_mse"], "mse_end": end_err["val_mse"],
                   "start_rel_err": start_err["val_rel_err"], "calib_rel_err": calib_err["val_rel_err"],
                   "rel_err": end_err["val_rel_err"], "hybrid_ce": ce, "hybrid_ppl": float(np.exp(ce)),
                   "teacher_ce": teacher_ce, "step_ms": step_ms, "calib_s": calib_s or 0.0, "train_s": train_s,
                   "seconds": time.time() - t0}
            rows.append(row)
            if rt.master:
                run_png(OUT_DIR, rows)
            log.log(phase="layerwise", step=step, **row)
            calibrated = f"calibrated {row['calib_rel_err']:.4g}, " if calib_s is not None else ""
            rt.print(f"rot {rotation} layer {i:3d} | val rel err {row['start_rel_err']:.4g} -> {calibrated}"
                     f"trained {row['rel_err']:.4g} | hybrid val ce {ce:.4f} (teacher {teacher_ce:.4f}) "
                     f"| {step_ms:.0f} ms/step, {row['seconds']:.1f}s")
            vcache.finish(stream_blocks({i: student}).get(i))
            state = {"rotation": rotation, "done": k + 1, "step": step, "loader": rotation_start,
                     "rng": get_rng_state(), "rows": rows}
            if k + 1 == len(visit):  # the next rotation starts after this one's tokens
                state.update(rotation=rotation + 1, done=0, loader=loader.state())
            write_checkpoint(rt, f"rot{rotation}_layer{i:03d}", model,
                             {(j, TARGET): students[j] for j in trained},
                             {"phase": "layerwise", "schedule": "rotation", "step": step, "rotation": rotation,
                              "layer": i}, state)
            t0 = time.time()
        cache.close()
        vcache.close()
        rotation, done = rotation + 1, 0
    return students, rows, step, state


def calibrate_all(rt, model, students):
    """Parallel schedule: calibrate every student, layer by layer, on the first CALIB_TOKENS of the
    training stream (the tokens the first steps train on), through a latent cache of those tokens.
    Returns whether any student calibrated."""
    if not CALIB_TOKENS or not any(hasattr(s, "calibrate") for s in students.values()):
        return False
    loader = TokenLoader(shard_files(DATA_DIR, "train"), BATCH_SIZE, SEQ_LEN, rt.rank, rt.world_size,
                         vocab_size=model.config.vocab_size)
    tokens = read_tokens(loader, calib_batches(rt))
    where = place_cache(rt, 2 * 4 * model.config.hidden_size * tokens.numel())
    cache = LatentCache(rt, model, tokens, where, "calib")
    for i in tqdm(sorted(students), desc="calibrate", disable=not rt.master, leave=False):
        cache.advance_to(i, stream_blocks(students))
        cache.split()
        calibrate(rt, students[i], get_block(model, i, TARGET), cache, len(tokens))
        cache.finish(stream_blocks(students).get(i))
    cache.close()
    return True


def train_parallel(rt, model, log, visit, val, teacher_ce):
    """Every layer per teacher pass: each student trains on its own teacher input and target."""
    loader = TokenLoader(shard_files(DATA_DIR, "train"), BATCH_SIZE, SEQ_LEN, rt.rank, rt.world_size,
                         vocab_size=model.config.vocab_size)
    students = make_students(model, visit)
    groups = [trainable_params(students[i], f"layer {i}") for i in visit]
    opt = new_optimizer([p for g in groups for p in g], LR)
    total, step = STEPS_PER_LAYER * ROTATIONS, 0
    ckpt = latest_checkpoint(OUT_DIR, "layerwise") if RESUME else None
    if ckpt:
        state = load_state(ckpt)
        saved = load_model(ckpt, rt.device)
        for i in visit:
            students[i].load_state_dict(get_block(saved, i, TARGET).state_dict())
        del saved
        opt.load_state_dict(state["optimizer"])
        loader.load_state(state["loader"])
        set_rng_state(state["rng"])
        step = state["step"]
        rt.print(f"resuming from {ckpt} at step {step}")
    layers = decoder_layers(model)
    pe = position_embeddings(model, torch.zeros(1, SEQ_LEN, model.config.hidden_size, device=rt.device))
    blocks = {(i, TARGET): students[i] for i in visit}

    def state():
        return {"step": done, "optimizer": opt.state_dict(), "loader": loader.state(), "rng": get_rng_state()}

    done = step
    start_errors = calib_errors = fresh_errors(rt, model, students, val, "device")
    if step == 0 and calibrate_all(rt, model, students):
        calib_errors = fresh_errors(rt, model, students, val, "device")
    bar = tqdm(range(step, total), desc="parallel", disable=not rt.master)
    for step in bar:
        lr = lr_at(step, total, LR, WARMUP_STEPS, "cosine", MIN_LR_RATIO)
        losses = torch.zeros(len(visit), device=rt.device)
        for m in range(GRAD_ACCUM):
            x = loader.next_batch()[0].to(rt.device)
            with torch.no_grad():
                h = model.model.embed_tokens(x)
            for i in range(visit[-1] + 1):
                with torch.no_grad(), rt.autocast():
                    lat, res = decoder_input(layers[i], h, TARGET, pe)
                    target = run_block(get_block(model, i, TARGET), lat, TARGET, pe)
                out = target
                if i in students:
                    with rt.autocast():
                        student_out = run_block(students[i], lat, TARGET, pe)
                        loss = decoder_loss(student_out, target) / GRAD_ACCUM
                    loss.backward()
                    losses[visit.index(i)] += loss.detach()
                    if LATENT_STREAM == "student":
                        out = student_out.detach()
                with torch.no_grad(), rt.autocast():
                    h = finish_layer(layers[i], res, out, TARGET)
        norms = step_optimizer(rt, opt, groups, lr)
        done = step + 1
        if step % LOG_EVERY == 0 or done == total:
            mean_loss = rt.all_mean(losses.mean().item())
            bar.set_postfix(loss=f"{mean_loss:.4g}")
            log.log(phase="layerwise", step=done, loss=mean_loss, lr=lr,
                    layer_loss={i: rt.all_mean(v) for i, v in zip(visit, losses.tolist())},
                    grad_norm={i: n.item() for i, n in zip(visit, norms)})
        if VAL_EVERY and done % VAL_EVERY == 0 and done < total:
            errors = fresh_errors(rt, model, students, val, "device")
            log.log(phase="layerwise", step=done, hybrid_ce=hybrid_ce(rt, model, val, blocks),
                    layer_val_mse={i: e["val_mse"] for i, e in errors.items()})
        if SAVE_EVERY and done % SAVE_EVERY == 0 and done < total:
            write_checkpoint(rt, f"parallel_step{done:06d}", model, blocks,
                             {"phase": "layerwise", "schedule": "parallel", "step": done}, state())
    errors = fresh_errors(rt, model, students, val, "device")
    ce = hybrid_ce(rt, model, val, blocks)
    rows = [{"rotation": "all", "layer": i, "mse_start": start_errors[i]["val_mse"], "mse_end": errors[i]["val_mse"],
             "start_rel_err": start_errors[i]["val_rel_err"], "calib_rel_err": calib_errors[i]["val_rel_err"],
             "rel_err": errors[i]["val_rel_err"], "hybrid_ce": ce, "hybrid_ppl": float(np.exp(ce)),
             "teacher_ce": teacher_ce}
            for i in visit]
    if rt.master:
        run_png(OUT_DIR, rows)
    log.log(phase="layerwise", step=total, hybrid_ce=ce, layer_val_mse={r["layer"]: r["mse_end"] for r in rows})
    return students, rows, total, state()


def check_data(rt, vocab_size):
    """Open the first train shard (header, size, ids inside the vocabulary), check that the train split holds
    the calibration tokens, and return the val batches."""
    TokenLoader(shard_files(DATA_DIR, "train"), BATCH_SIZE, SEQ_LEN, rt.rank, rt.world_size, vocab_size=vocab_size)
    val = val_batches(DATA_DIR, VAL_TOKENS, BATCH_SIZE, SEQ_LEN, rt.rank, rt.world_size, vocab_size)
    if PHASE != "layerwise" or not CALIB_TOKENS:
        return val
    calib = calib_batches(rt) * BATCH_SIZE * SEQ_LEN * rt.world_size
    train_tokens = sum(len(read_shard(f)) for f in shard_files(DATA_DIR, "train"))
    if calib > train_tokens:
        raise ValueError(f"CALIB_TOKENS={CALIB_TOKENS:,} (rounded up to whole batches: {calib:,}) is more than the "
                         f"{train_tokens:,} tokens of {DATA_DIR}'s train split; lower --calib-tokens or prepare more data")
    return val


def layerwise_inputs(rt):
    """The teacher, the layers to distill and the val batches, with a student of the kind asked for built once
    and the data opened: everything the phase needs, checked before the run folder exists."""
    model = load_model(TEACHER, rt.device).eval().requires_grad_(False)
    check_target(model, TARGET)
    layers = LAYERS if LAYERS else list(range(len(decoder_layers(model))))
    check_layers(model, layers)
    check_layers(model, KEEP_TEACHER_LAYERS, "KEEP_TEACHER_LAYERS")
    visit = sorted(set(layers) - set(KEEP_TEACHER_LAYERS))
    if not visit:
        fail(f"no layer left to distill: LAYERS={LAYERS or 'all'} minus KEEP_TEACHER_LAYERS={KEEP_TEACHER_LAYERS}")
    with torch.random.fork_rng(devices=[]):  # STUDENT_KIND, STUDENT_KWARGS and TRAINABLE; the RNG is left as it was
        trainable_params(make_students(model, visit[:1])[visit[0]], f"layer {visit[0]}")
    return model, visit, check_data(rt, model.config.vocab_size)


def layerwise_phase(rt, model, log, visit, val):
    tokens_per_step = BATCH_SIZE * SEQ_LEN * GRAD_ACCUM * rt.world_size
    rt.print(f"layer-wise {SCHEDULE}: target {TARGET}, student {STUDENT_KIND} {STUDENT_KWARGS}, "
             f"layers {visit} (keep teacher: {KEEP_TEACHER_LAYERS or 'none'})")
    rt.print(f"tokens per step: {BATCH_SIZE} batch x {SEQ_LEN} seq x {GRAD_ACCUM} accum x {rt.world_size} ranks = "
             f"{tokens_per_step:,}; per layer per rotation: {STEPS_PER_LAYER} steps = "
             f"{tokens_per_step * STEPS_PER_LAYER:,} tokens; {ROTATIONS} rotation(s)")
    if CALIB_TOKENS:
        rt.print(f"calibration: {calib_batches(rt) * BATCH_SIZE * SEQ_LEN * rt.world_size:,} tokens per student "
                 f"(CALIB_TOKENS rounded up to whole batches), {LATENT_STREAM} stream")
    teacher_ce = hybrid_ce(rt, model, val)
    rt.print(f"teacher val ce {teacher_ce:.4f} (ppl {np.exp(teacher_ce):.2f}) on "
             f"{len(val) * BATCH_SIZE * SEQ_LEN * rt.world_size:,} tokens")
    train = train_rotation if SCHEDULE == "rotation" else train_parallel
    students, rows, step, state = train(rt, model, log, visit, val, teacher_ce)
    write_checkpoint(rt, "final", model, {(i, TARGET): students[i] for i in visit},
                     {"phase": "layerwise", "schedule": SCHEDULE, "step": step}, state)
    if rt.master:
        print(f"\nper-layer validation ({TARGET} -> {STUDENT_KIND}); teacher val ce {teacher_ce:.4f}")
        print_table(rows, ["rotation", "layer", "start_rel_err", "calib_rel_err", "rel_err", "mse_end", "hybrid_ce",
                           "hybrid_ppl"])
        write_json_atomic(os.path.join(OUT_DIR, "layers.json"), rows)
        print(f"final model: {os.path.join(OUT_DIR, 'final')}")


# ---------------------------------------------------------------------------------------------- logits phase
def backbone_differs(teacher, model, blocks):
    """Names of non-student weights where `model` differs from the teacher (empty: shared backbone)."""
    prefixes = tuple(f"model.layers.{i}.{'mlp' if t == 'mlp' else 'self_attn'}." for i, t in blocks)
    theirs = model.state_dict()
    return [k for k, v in teacher.state_dict().items()
            if not k.startswith(prefixes) and (k not in theirs or not torch.equal(v, theirs[k]))]


def logits_models(rt):
    """The logits phase's init checkpoint, the checkpoint it resumes from (None: it starts at step 0), the teacher,
    the model to train, its student blocks and the parameters to train: loaded and checked before the run folder
    exists."""
    init = INIT or os.path.join(OUT_DIR, "final")
    if not INIT and not os.path.isdir(init):
        init = latest_checkpoint(OUT_DIR, "layerwise")
        if init is None:
            fail(f"{OUT_DIR} has no layer-wise checkpoint to start the logits phase from; "
                 f"run the layer-wise phase first or pass --init CHECKPOINT")
    resume_from = latest_checkpoint(OUT_DIR, "logits") if RESUME else None
    teacher = load_model(TEACHER, rt.device).eval().requires_grad_(False)
    source = load_model(resume_from or init, rt.device)
    if KD_TRAINABLE == "decoders":
        # one backbone: the teacher's, with the students swapped in for the student pass
        blocks = {(s["layer"], s["target"]): get_block(source, s["layer"], s["target"]) for s in student_specs(source)}
        if not blocks:
            fail(f"{init} has no student decoders, so KD_TRAINABLE=decoders would train nothing; use --kd-trainable all")
        differs = backbone_differs(teacher, source, blocks)
        if differs:
            fail(f"{init}: its backbone differs from the teacher's ({differs[0]}, ...), so they cannot share it; "
                 f"use --kd-trainable all, or the --teacher the checkpoint was distilled from")
        model = teacher
        params = [p for b in blocks.values() for p in b.parameters()]
    else:
        model, blocks = source, {}
        params = list(model.parameters())
    del source
    for p in params:
        p.requires_grad_(True)
    return init, resume_from, teacher, model, blocks, params


def logits_phase(rt, log, val, models):
    """KL(teacher || student) on next-token distributions, with its own optimizer and LR schedule."""
    init, resume_from, teacher, model, blocks, params = models
    loader = TokenLoader(shard_files(DATA_DIR, "train"), BATCH_SIZE, SEQ_LEN, rt.rank, rt.world_size,
                         vocab_size=model.config.vocab_size)
    opt = new_optimizer(params, KD_LR)
    step = 0
    if resume_from:
        state = load_state(resume_from)
        opt.load_state_dict(state["optimizer"])
        loader.load_state(state["loader"])
        set_rng_state(state["rng"])
        step = state["step"]
        rt.print(f"resuming the logits phase from {resume_from} at step {step}")
    elif KD_FRESH_TOKENS and os.path.exists(os.path.join(init, "state.pt")) and "loader" in load_state(init):
        loader.load_state(load_state(init)["loader"])
        rt.print(f"reading fresh tokens after those {init} consumed (shard {loader.shard}, position {loader.pos:,})")
    tokens_per_step = BATCH_SIZE * SEQ_LEN * GRAD_ACCUM * rt.world_size
    rt.print(f"logits phase from {init}: trainable {KD_TRAINABLE} ({sum(p.numel() for p in params):,} parameters), "
             f"{KD_STEPS} steps x {tokens_per_step:,} tokens, lr {KD_LR} (warmup {KD_WARMUP_STEPS}, cosine), "
             f"temperature {KD_TEMPERATURE}, ce weight {KD_CE_WEIGHT}")
    results = []

    def state():
        return {"step": step, "optimizer": opt.state_dict(), "loader": loader.state(), "rng": get_rng_state()}

    def meta():
        return {"phase": "logits", "step": step, "init": init, "kd_trainable": KD_TRAINABLE}

    teacher_blocks = {key: get_block(model, *key) for key in blocks}

    def teacher_hidden(ids):  # decoders mode: the shared backbone with the teacher's own blocks
        with swapped(model, teacher_blocks):
            return final_hidden(model, ids)

    def validate():
        with swapped(model, blocks):
            m = evaluate(model, val, teacher_hidden if blocks else teacher, rt)
        row = {"step": step, "val_ce": m["ce"], "val_ppl": m["ppl"], "kl": m["kl"], "agree": m["agreement"],
               "teacher_ce": m["teacher_ce"]}
        results.append(row)
        if rt.master:
            run_png(OUT_DIR, logits_rows=results)
        log.log(phase="logits", **row)
        rt.print(f"step {step:5d} | val ce {m['ce']:.4f} (teacher {m['teacher_ce']:.4f}) | kl {m['kl']:.4g} "
                 f"| top-1 agreement {m['agreement']:.3f}")

    if step == 0:
        validate()
    first, t0 = step, time.time()
    bar = tqdm(range(step, KD_STEPS), desc="logits", disable=not rt.master)
    for s in bar:
        lr = lr_at(s, KD_STEPS, KD_LR, KD_WARMUP_STEPS, "cosine", MIN_LR_RATIO)
        kl_sum = loss_sum = 0.0
        for m in range(GRAD_ACCUM):
            x, y = loader.next_batch()
            x, y = x.to(rt.device), y.to(rt.device)
            with torch.no_grad(), rt.autocast():
                ht = final_hidden(teacher, x)
            with swapped(model, blocks), rt.autocast():
                loss, parts = kd_loss(final_hidden(model, x), ht, head_weight(model), y, KD_TEMPERATURE, KD_CE_WEIGHT,
                                      teacher_weight=head_weight(teacher))
                (loss / GRAD_ACCUM).backward()
            loss_sum += loss.detach() / GRAD_ACCUM
            kl_sum += parts["kl"] / GRAD_ACCUM
        (norm,) = step_optimizer(rt, opt, [params], lr)
        step = s + 1
        if s % LOG_EVERY == 0 or step == KD_STEPS:
            rec = {"loss": rt.all_mean(loss_sum.item()), "kl": rt.all_mean(kl_sum.item()), "lr": lr,
                   "grad_norm": norm.item(), "tokens_per_s": tokens_per_step * (step - first) / (time.time() - t0)}
            bar.set_postfix(loss=f"{rec['loss']:.4g}")
            log.log(phase="logits", step=step, **rec)
        if step % KD_VAL_EVERY == 0 or step == KD_STEPS:
            validate()
        if step % KD_SAVE_EVERY == 0 and step < KD_STEPS:
            write_checkpoint(rt, f"logits_step{step:06d}", model, blocks, meta(), state())
    write_checkpoint(rt, "logits_final", model, blocks, meta(), state())
    if rt.master:
        print(f"\nlogits phase ({KD_TRAINABLE}) from {init}")
        print_table(results, ["step", "val_ce", "val_ppl", "kl", "agree", "teacher_ce"])
        print(f"final model: {os.path.join(OUT_DIR, 'logits_final')}")


# ---------------------------------------------------------------------------------------------- main
def may_change_on_resume():
    """Constants a resumed phase may change: where and how often it reports and saves, and the other phase's own
    constants. Every other constant (one added later too, until it is listed here) defines the phase's result,
    so a resume that changes it is refused."""
    reporting = {"OUT_DIR", "RESUME", "LOG_EVERY", "VAL_EVERY", "SAVE_EVERY", "KEEP_LAST", "LATENT_CACHE",
                 "KD_VAL_EVERY", "KD_SAVE_EVERY"}
    layerwise_only = {"TARGET", "STUDENT_KIND", "STUDENT_KWARGS", "LAYERS", "KEEP_TEACHER_LAYERS", "SCHEDULE",
                      "ROTATIONS", "STEPS_PER_LAYER", "LR", "WARMUP_STEPS", "DECODER_LOSS", "TRAINABLE",
                      "CALIB_TOKENS", "LATENT_STREAM"}
    logits_only = {"INIT", "KD_TRAINABLE", "KD_STEPS", "KD_LR", "KD_WARMUP_STEPS", "KD_TEMPERATURE", "KD_CE_WEIGHT",
                   "KD_FRESH_TOKENS"}
    return reporting | (logits_only if PHASE == "layerwise" else layerwise_only)


def open_run(rt, config, reopen):
    """Rank 0 creates the run folder, or reopens it (reopen: --resume, or the logits phase after the layer-wise
    one), locked for the life of this process; a resumed phase must keep the constants its checkpoints were made
    with (config_PHASE.json). Raises ValueError on every rank when rank 0 refuses."""
    def start():
        if PHASE == "logits" and not INIT and not RESUME:  # phase 2 of the layer-wise run in OUT_DIR
            if not os.path.exists(os.path.join(OUT_DIR, "run.json")):
                raise ValueError(f"{OUT_DIR}: no distill run here to continue; run the layer-wise phase into it "
                                 f"first, or pass --init CHECKPOINT")
            if list_checkpoints(OUT_DIR, "logits"):
                raise ValueError(f"{OUT_DIR} already holds logits-phase checkpoints; pass --resume to continue them")
        start_run(OUT_DIR, reopen, "distill.py", config)
        saved = os.path.join(OUT_DIR, f"config_{PHASE}.json")
        if RESUME and os.path.exists(saved):
            first = read_json(saved, "the run folder is damaged; start a new run in another --out-dir")["config"]
            check_unchanged(first, config, may_change_on_resume(), saved)
    rt.master_only(start)


def main():
    global OUT_DIR
    config = override(globals())
    if PHASE not in ("layerwise", "logits"):
        fail(f"PHASE must be layerwise or logits, got {PHASE!r}")
    if SCHEDULE not in ("rotation", "parallel"):
        fail(f"SCHEDULE must be rotation or parallel, got {SCHEDULE!r}")
    if DECODER_LOSS not in ("mse", "nmse", "cosine"):
        fail(f"DECODER_LOSS must be mse, nmse or cosine, got {DECODER_LOSS!r}")
    if LATENT_STREAM not in ("teacher", "student"):
        fail(f"LATENT_STREAM must be teacher or student, got {LATENT_STREAM!r}")
    if CALIB_TOKENS < 0:
        fail(f"CALIB_TOKENS must be >= 0 (0 turns calibration off), got {CALIB_TOKENS}")
    if KD_TRAINABLE not in ("decoders", "all"):
        fail(f"KD_TRAINABLE must be decoders or all, got {KD_TRAINABLE!r}")
    if LATENT_CACHE not in ("auto", "device", "host", "disk"):
        fail(f"LATENT_CACHE must be auto, device, host or disk, got {LATENT_CACHE!r}")
    rt = Runtime(dtype=DTYPE)
    if not OUT_DIR:
        OUT_DIR = os.path.join("runs", time.strftime("distill_%Y%m%d_%H%M%S"))
    if rt.ddp:  # every rank uses rank 0's folder name
        box = [OUT_DIR]
        dist.broadcast_object_list(box)
        OUT_DIR = config["OUT_DIR"] = box[0]
    if ROTATIONS < 1 or KD_STEPS < 1 or BATCH_SIZE < 1 or GRAD_ACCUM < 1:
        fail("ROTATIONS, KD_STEPS, BATCH_SIZE and GRAD_ACCUM must be at least 1")
    if STEPS_PER_LAYER < 0:
        fail(f"STEPS_PER_LAYER must be >= 0 (0: calibration only), got {STEPS_PER_LAYER}")
    reopen = RESUME or (PHASE == "logits" and not INIT)
    torch.manual_seed(SEED)
    try:
        if reopen:  # lock the run before reading its checkpoints: a run still going in it would change them
            open_run(rt, config, reopen)
        if PHASE == "layerwise":
            model, visit, val = layerwise_inputs(rt)
        else:
            models = logits_models(rt)
            val = check_data(rt, models[3].config.vocab_size)
        if not reopen:  # a new run's folder appears only once everything it needs has been checked
            open_run(rt, config, reopen)
    except (ShardError, ValueError, OSError) as e:
        fail(str(e))
    if rt.master:
        write_json_atomic(os.path.join(OUT_DIR, f"config_{PHASE}.json"), {"config": config, "environment": environment(rt)})
    log = RunLog(rt, OUT_DIR)
    rt.print(f"run folder {OUT_DIR} | device {rt.device} | dtype {str(rt.dtype).replace('torch.', '')} | "
             f"world size {rt.world_size}")
    try:
        if PHASE == "layerwise":
            layerwise_phase(rt, model, log, visit, val)
        else:
            logits_phase(rt, log, val, models)
    except (ShardError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    rt.close()


if __name__ == "__main__":
    main()
