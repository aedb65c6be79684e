"""Benchmark: the memory of each phase measured on this CPU against common/memory.py's estimate, the activation
coefficient fitted to the measurements, and the estimate projected to teachers of 135M to 70B parameters on 1 and 8
GPUs of 80 and 192 GB (not a test).

    ./.venv/bin/python tests/bench_memory.py          # 5 to 9 minutes on 2 shared CPU cores

Measured: the scripts themselves (distill.py's layer-wise phase with the teacher on the device and streamed, its
logits phase under ddp in one process and fsdp on FSDP_RANKS gloo ranks, train.py under both), on a model of each
shape in SHAPES (random weights, random tokens), at each of BATCH_SIZES x SEQ_LEN tokens per micro-batch, STEPS
optimizer steps. Each run is a process of its own: forked from a server that has imported torch, transformers and
the scripts' modules (torchrun ranks: new processes), it runs a few steps of a tiny model (the kernels' code and
buffers), takes its resident set as the baseline, then runs the script as `python SCRIPT ARGS` would. Its peak is
the most resident (VmHWM) over that baseline, counted from the moment the script has its models in place (the
peak is reset, /proc/self/clear_refs, when it opens its metrics log and after each FSDP shard) until its checkpoint
(here at the end of the run) starts to gather and write weights on the host; hashing the teacher's files (16 MiB
reads) is set aside too. glibc hands every freed block over 64 KiB back to the system (MALLOC_MMAP_THRESHOLD_), so
freed tensors leave the resident set. Under fsdp the pages of the weight file a rank had read that are still
mapped after sharding (train.py keeps them) are host memory on a GPU and are subtracted, and printed. The peak of
an fsdp run is its largest rank's. On a CPU the device and the host are one memory: the streamed teacher's
resident set is the whole teacher's, and what the streamed run does measure is offload's bookkeeping, the most
teacher bytes on the device at once.
The estimate of a distill.py run is the one it prints itself (its terms read as it prints them); train.py's is
common.memory.train. ACTIVATION_BYTES and each process's own bytes that no term counts are fitted to all the runs
by least squares on the relative error, and every run is printed beside its estimate.

Projected: common.memory's estimate per GPU for SmolLM2-135M, SmolLM2-1.7B, Llama-3.1-8B and Llama-3.1-70B shapes
with distill.sh's plan (pruned half-width FFN students, PROJECT_BATCH_SIZE x PROJECT_SEQ_LEN tokens per micro-batch
and GPU) and train.py's, frozen weights in bf16, fp32 trained ones, the latent cache in host memory, a streamed
teacher's idle students in host memory; ACTIVATION_BYTES as fitted here in fp32 (under bf16 autocast most saved
activations are bf16: an upper bound there). `--measure False` skips the measurements and projects at common/memory.py's
ACTIVATION_BYTES (seconds).
"""

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [ROOT, TESTS]
DISTILL, TRAIN = os.path.join(ROOT, "distill.py"), os.path.join(ROOT, "train.py")

from common import memory  # noqa: E402
from common.config import override  # noqa: E402
from common.students import make_student  # noqa: E402
from common.swap import get_block, set_block  # noqa: E402
from conftest import make_data_dir  # noqa: E402

SHAPES = ["small", "smollm2_135m", "deep"]  # model shapes measured (CONFIGS below)
BATCH_SIZES = [2, 4]  # sequences per micro-batch: two token counts per shape
SEQ_LEN = 64  # tokens per sequence
STEPS = 2  # optimizer steps per run: the second's backward is the first with AdamW's moments in memory
THREADS = 2  # CPU threads of each run (of all its ranks together)
FSDP_RANKS = 2  # torchrun ranks (gloo) of the fsdp runs
PROJECT_BATCH_SIZE = 8  # the projection's plan: distill.sh's micro-batch per GPU
PROJECT_SEQ_LEN = 512
GPU_GIB = [80, 192]  # GPU memory sizes the projection marks what fits in
GPU_COUNTS = [1, 8]  # GPUs per run in the projection
USABLE = 0.95  # of a GPU's memory a run gets: the CUDA context and the allocator's slack take the rest
MEASURE = True  # False: only the projection, at common/memory.py's ACTIVATION_BYTES

# Llama-family shapes: measured here (the first three), and the teachers projected
# name: (hidden, FFN width, layers, attention heads, KV heads, vocabulary, tied embeddings)
CONFIGS = {
    "small": (128, 344, 4, 4, 2, 4096, True),
    "smollm2_135m": (576, 1536, 30, 9, 3, 49152, True),
    "deep": (128, 344, 64, 4, 2, 4096, True),
    "SmolLM2-1.7B": (2048, 8192, 24, 32, 32, 49152, True),
    "Llama-3.1-8B": (4096, 14336, 32, 32, 8, 128256, False),
    "Llama-3.1-70B": (8192, 28672, 80, 64, 8, 128256, False),
}
TEACHERS = {"SmolLM2-135M": "smollm2_135m", **{name: name for name in list(CONFIGS)[3:]}}
STUDENT = {"target": "mlp", "kind": "pruned", "kwargs": {"scale": 0.5}}  # distill.sh's student


def llama_config(name):
    from transformers import LlamaConfig

    hidden, ffn, layers, heads, kv_heads, vocab, tied = CONFIGS[name]
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=0,
    )


# ---------------------------------------------------------------------------------------------- in a measured process
def status(field):
    """A /proc/self/status figure in bytes (VmRSS: resident now, VmHWM: the most resident since the last reset)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM <- VmRSS


def warm_up():
    """A few steps of a tiny model: the kernels' code and buffers this process needs whatever the model, in memory
    before the baseline."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters())
    for _ in range(2):
        model(input_ids=torch.randint(0, 256, (2, 64)), labels=torch.randint(0, 256, (2, 64))).loss.backward()
        optimizer.step()


def measure(script, args, out):
    """Run `script ARGS` in this process, as `python SCRIPT ARGS` would, and write its memory figures to
    OUT/rank{RANK}.json (see the docstring at the top)."""
    import runpy

    from common import checkpoint, offload, parallel, runtime

    warm_up()
    baseline, mapped_baseline = status("VmRSS"), status("RssFile")
    peaks, estimates, teacher, left_mapped = [], [], {}, [0]
    open_log, shard, teacher_ref = runtime.RunLog.__init__, parallel.shard, checkpoint.teacher_ref
    runtime.RunLog.__init__ = lambda *a, **k: (open_log(*a, **k), reset_peak())[0]  # the models in place

    def sharded(*args, **kwargs):  # the models in place, sharded; what stays mapped of the weight files they were
        model = shard(*args, **kwargs)  # read from (memory-mapped) is a host copy on a GPU: not counted
        left_mapped[0] = status("RssFile") - mapped_baseline
        reset_peak()
        return model

    parallel.shard = sharded

    def hashed_aside(folder):  # hashing the teacher's files, 16 MiB at a time: host work, not counted
        peaks.append(status("VmHWM"))
        ref = teacher_ref(folder)
        reset_peak()
        return ref

    def counted_until(function):  # a checkpoint (here at the end of the run) gathers and writes the weights on
        def wrapped(*args, **kwargs):  # the host: the peak is read before it starts
            if not checkpointed:
                peaks.append(status("VmHWM"))
                checkpointed.append(True)
            return function(*args, **kwargs)

        return wrapped

    checkpointed = []
    checkpoint.teacher_ref = hashed_aside
    for module, name in (
        (checkpoint, "training_state"),
        (checkpoint, "save_checkpoint"),
        (parallel, "full_state_dict"),
    ):
        setattr(module, name, counted_until(getattr(module, name)))
    describe = memory.describe
    memory.describe = lambda terms: (estimates.append(dict(terms)), describe(terms))[1]
    offload_layers, enter = offload.offload_layers, offload._LayerHome.enter

    def counted_offload(model, device):  # the streamed teacher: its bytes, and those outside its layers
        offload_layers(model, device)
        layers = offload.transformer_layers(model)
        teacher.update(bytes=memory.model_bytes(model), outside=memory.model_bytes(model) - memory.model_bytes(layers))
        teacher["homes"], teacher["most"] = [layer._home for layer in layers], 0
        return model

    def counted_enter(home):  # the most teacher layer bytes on the device at once
        enter(home)
        on_device = sum(memory.model_bytes(h.layer) for h in teacher["homes"] if h.users > 0)
        teacher["most"] = max(teacher["most"], on_device)

    offload.offload_layers, offload._LayerHome.enter = counted_offload, counted_enter
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
    if not checkpointed:
        peaks.append(status("VmHWM"))
    figures = {"peak": max(peaks) - baseline - left_mapped[0], "estimate": estimates[-1] if estimates else None}
    figures["left_mapped"] = left_mapped[0]
    if teacher:
        figures.update(teacher_bytes=teacher["bytes"], teacher_on_device=teacher["outside"] + teacher["most"])
    with open(os.path.join(out, f"rank{os.environ.get('RANK', 0)}.json"), "w") as f:
        json.dump(figures, f)


def forked(script, args, out, threads):
    """measure() in a process forked from the fork server (modules imported already), its output in OUT/log.txt."""
    log = os.open(os.path.join(out, "log.txt"), os.O_WRONLY | os.O_CREAT)
    os.dup2(log, 1)
    os.dup2(log, 2)
    torch.set_num_threads(threads)
    measure(script, args, out)


# ---------------------------------------------------------------------------------------------- measurements
FORKS = multiprocessing.get_context("forkserver")  # one process imports torch, transformers and the scripts' modules
FORKS.set_forkserver_preload(["distill", "transformers.models.llama.modeling_llama"])  # once; each run forks it


def run_measured(script, *args, ranks=1):
    """Run `script ARGS` under measure(): forked from the fork server, or on `ranks` torchrun ranks (gloo), each a
    new process. Returns rank 0's figures with the largest peak of any rank."""
    with tempfile.TemporaryDirectory() as out:
        if ranks == 1:
            process = FORKS.Process(target=forked, args=(script, list(args), out, THREADS))
            process.start()
            process.join()
            failed = process.exitcode
        else:
            code = f"import os, sys; sys.path[:0] = {[ROOT, TESTS]!r}; from bench_memory import measure; "
            code += "measure(sys.argv[1], sys.argv[2:], os.environ['BENCH_MEMORY_OUT'])"
            torchrun = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--no-python"]
            command = [*torchrun, f"--nproc-per-node={ranks}", sys.executable, "-c", code, script, *args]
            env = {**os.environ, "BENCH_MEMORY_OUT": out, "OMP_NUM_THREADS": str(max(1, THREADS // ranks))}
            with open(os.path.join(out, "log.txt"), "w") as log:
                failed = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=log).returncode
        if failed:
            with open(os.path.join(out, "log.txt")) as f:
                sys.exit(f"{script} {' '.join(args)} failed:\n{f.read()[-3000:]}")
        figures = []
        for rank in range(ranks):
            with open(os.path.join(out, f"rank{rank}.json")) as f:
                figures.append(json.load(f))
    return {**figures[0], "peak": max(f["peak"] for f in figures)}


def make_model(name, folder):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(llama_config(name), attn_implementation="sdpa").save_pretrained(folder)
    return folder


def measure_shape(name, tmp):
    """Every phase on a model of shape `name` at each token count. Returns the resident-set rows [(label, measured
    bytes, estimate terms)], the streamed teacher's rows [(label, its most bytes on the device, estimated, its
    bytes)] and notes on what was not counted."""
    teacher = make_model(name, os.path.join(tmp, name))
    shape = memory.shape_of(memory.meta_model(teacher))
    student = ["--target", STUDENT["target"], "--student-kind", STUDENT["kind"]]
    student += ["--student-kwargs", json.dumps(STUDENT["kwargs"])]
    rows, streamed, notes = [], [], []
    for batch in BATCH_SIZES:
        tokens, label = batch * SEQ_LEN, f"{name} {batch}x{SEQ_LEN}"
        data = make_data_dir(os.path.join(tmp, f"data{tokens}"), train_tokens=40 * tokens, val_tokens=4 * tokens)
        shared = ["--data-dir", data, "--batch-size", str(batch), "--seq-len", str(SEQ_LEN), "--log-every", "1"]
        layerwise = [*shared, "--teacher", teacher, *student, "--layers", "0", "--steps-per-layer", str(STEPS)]
        layerwise += ["--calib-tokens", str(tokens), "--val-tokens", str(tokens)]
        run = {where: os.path.join(tmp, f"{name}_{tokens}_{where}") for where in ("device", "host")}
        for where in ("device", "host"):
            figures = run_measured(DISTILL, *layerwise, "--teacher-on", where, "--out-dir", run[where])
            terms = figures["estimate"]
            if where == "host":  # on a CPU the streamed teacher's layers are all in its one memory
                on_device = figures["teacher_on_device"]
                streamed.append((f"{label} layer-wise", on_device, terms["teacher"], figures["teacher_bytes"]))
                terms = {**terms, "teacher": figures["teacher_bytes"]}
            rows.append((f"{label} layer-wise, teacher on {where}", figures["peak"], terms))
        for parallel, ranks in (("ddp", 1), ("fsdp", FSDP_RANKS)):
            on = f"{label} %s, {parallel}, {ranks} rank{'s' * (ranks > 1)}"
            out = os.path.join(tmp, f"{name}_{tokens}_logits_{parallel}")
            logits = [
                *shared,
                "--teacher",
                teacher,
                "--phase",
                "logits",
                "--init",
                os.path.join(run["device"], "final"),
            ]
            logits += ["--kd-steps", str(STEPS), "--kd-val-every", str(STEPS), "--val-tokens", str(tokens * ranks)]
            figures = run_measured(DISTILL, *logits, "--parallel", parallel, "--out-dir", out, ranks=ranks)
            rows.append((on % "logits", figures["peak"], figures["estimate"]))
            out = os.path.join(tmp, f"{name}_{tokens}_train_{parallel}")
            train = [*shared, "--init", teacher, "--steps", str(STEPS), "--val-every", "0", "--out-dir", out]
            train += ["--total-batch-tokens", str(tokens * ranks), "--parallel", parallel]
            figures = run_measured(TRAIN, *train, ranks=ranks)
            plan = memory.Plan(tokens, shape.params, world_size=ranks, parallel=parallel)
            rows.append((on % "train.py", figures["peak"], memory.train(shape, plan)))
            if figures["left_mapped"] > 2**24:
                notes.append(f"{on % 'train.py'}: {gib(figures['left_mapped'])} GiB of the weight file it loaded")
        print(f"measured {label}", flush=True)
    return rows, streamed, notes


def fit(rows):
    """(ACTIVATION_BYTES, this process's own bytes that no term counts), by least squares on the relative error of
    the estimate plus those bytes over the rows."""
    units = np.array([terms["activations"] / memory.ACTIVATION_BYTES for _, _, terms in rows])
    rest = np.array([sum(terms.values()) - terms["activations"] for _, _, terms in rows])
    measured = np.array([m for _, m, _ in rows])
    design = np.stack([units, np.ones_like(units)], axis=1) / measured[:, None]
    (coefficient, overhead), *_ = np.linalg.lstsq(design, (measured - rest) / measured, rcond=None)
    return float(coefficient), float(overhead)


def with_activation_bytes(terms, coefficient):
    """Estimate terms with their activations at `coefficient` bytes per token, hidden unit and layer."""
    return {**terms, "activations": round(terms["activations"] * coefficient / memory.ACTIVATION_BYTES)}


# ---------------------------------------------------------------------------------------------- projection
def meta_models(name):
    """The teacher CONFIGS[name] on the meta device, and its student model: every FFN a distill.sh student."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        teacher, student = (AutoModelForCausalLM.from_config(llama_config(name)) for _ in range(2))
        for i in range(teacher.config.num_hidden_layers):
            block = get_block(student, i, STUDENT["target"])
            new = make_student(STUDENT["target"], STUDENT["kind"], block, student.config, **STUDENT["kwargs"])
            set_block(student, i, STUDENT["target"], new)
    return teacher, student


def projected(name):
    """{phase: {gpus: bytes per GPU}} of distill.sh's plan and of train.py on the teacher CONFIGS[name]: frozen weights
    in bf16, trained ones in fp32, a streamed teacher's idle students on the host (distill.layerwise_memory); fsdp only
    on several GPUs (PARALLEL=fsdp refuses one)."""
    teacher_model, student_model = meta_models(name)
    teacher, student = memory.shape_of(teacher_model), memory.shape_of(student_model)
    students = sum(p.numel() for i in range(student.layers) for p in get_block(student_model, i, "mlp").parameters())
    tokens, rows = PROJECT_BATCH_SIZE * PROJECT_SEQ_LEN, {}
    for gpus in GPU_COUNTS:

        def plan(trained, parallel="ddp", checkpointing=False, frozen_bytes=2):
            return memory.Plan(tokens, trained, frozen_bytes, gpus, parallel, checkpointing)

        one_student = plan(students // teacher.layers)
        phases = {
            "layer-wise, teacher on device": memory.layerwise(teacher, one_student, students, "device", 0),
            "layer-wise, streamed": memory.layerwise(teacher, one_student, 2 * one_student.trained, "host", 0),
            "logits, ddp": memory.logits(teacher, student, plan(students), shared_backbone=True),
            "train.py, ddp": memory.train(teacher, plan(teacher.params)),
        }
        if gpus > 1:
            phases["logits, fsdp"] = memory.logits(teacher, student, plan(students, "fsdp"), shared_backbone=False)
            checkpointed = plan(students, "fsdp", True)
            phases["logits, fsdp + act. ckpt"] = memory.logits(teacher, student, checkpointed, shared_backbone=False)
            phases["train.py, fsdp"] = memory.train(teacher, plan(teacher.params, "fsdp"))
            phases["train.py, fsdp + act. ckpt"] = memory.train(teacher, plan(teacher.params, "fsdp", True))
        for phase, terms in phases.items():
            rows.setdefault(phase, {})[gpus] = sum(terms.values())
    return rows


# ---------------------------------------------------------------------------------------------- main
def gib(n):
    return f"{n / memory.GiB:.2f}"


def mib(n):
    return f"{n / 2**20:.0f}"


def main():
    globals().update(override(globals()).as_dict())  # the constants now hold the run's settings
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # for every process started from now on: the fork server, torchrun
    if MEASURE:
        measure_all()
    print_projection()


def measure_all():
    """Measure every phase on every shape, fit ACTIVATION_BYTES (set in common.memory for the projection), print."""
    rows, streamed, notes = [], [], []
    for name in SHAPES:
        with tempfile.TemporaryDirectory() as tmp:
            measured = measure_shape(name, tmp)
        rows, streamed, notes = rows + measured[0], streamed + measured[1], notes + measured[2]
    coefficient, overhead = fit(rows)
    print(
        f"\nfitted: ACTIVATION_BYTES {coefficient:.1f} bytes per token, hidden unit and layer kept for backward (fp32; "
        f"common/memory.py has {memory.ACTIVATION_BYTES}), and {mib(overhead)} MiB of each process's own that no "
        f"term counts (Python objects, allocator arenas: not on a GPU)"
    )
    print("\npeak memory per process on this CPU, MiB: its resident set over the imports, against the estimate")
    print(f"{'run':<46} {'measured':>8} {'estimate':>8} {'ratio':>6}  largest terms of the estimate")
    for label, measured, terms in rows:
        terms = with_activation_bytes(terms, coefficient)
        estimate = sum(terms.values())
        largest = ", ".join(f"{k} {mib(v)}" for k, v in sorted(terms.items(), key=lambda t: -t[1])[:3])
        print(f"{label:<46} {mib(measured):>8} {mib(estimate):>8} {(estimate + overhead) / measured:>6.2f}  {largest}")
    print(f"(estimate at the fitted coefficient; ratio: (estimate + {mib(overhead)} MiB) / measured)")
    print("not counted: the weight file train.py had read, still mapped after sharding (host memory on a GPU):")
    print("\n".join(notes) or "nothing")
    print("\nstreamed teacher (TEACHER_ON=host): its most bytes on the device at once (offload's bookkeeping), MiB")
    print(f"{'run':<46} {'measured':>8} {'estimate':>8} {'ratio':>6}  {'whole teacher':>13}")
    for label, measured, estimate, whole in streamed:
        print(f"{label:<46} {mib(measured):>8} {mib(estimate):>8} {estimate / measured:>6.2f}  {mib(whole):>13}")
    memory.ACTIVATION_BYTES = coefficient


def print_projection():
    print(
        f"\nprojected GiB per GPU at ACTIVATION_BYTES {memory.ACTIVATION_BYTES:.1f}, distill.sh's plan: "
        f"{STUDENT['kind']} {STUDENT['kwargs']} {STUDENT['target']} students, {PROJECT_BATCH_SIZE}x{PROJECT_SEQ_LEN} "
        f"tokens per micro-batch and GPU, frozen weights in bf16, trained ones in fp32, latent cache on the host, a "
        f"streamed teacher's idle students on the host; 'fits': the smallest of {GPU_GIB} GB it fits "
        f"({USABLE:.0%} of it usable)"
    )
    header = "".join(f" {f'{g} GPU' + 's' * (g > 1):>9} {'fits':>5}" for g in GPU_COUNTS)
    print(f"{'teacher':<14} {'phase':<30}{header}")
    for teacher, name in TEACHERS.items():
        for phase, per_gpus in projected(name).items():
            cells = ""
            for gpus in GPU_COUNTS:
                total = per_gpus.get(gpus)
                fits = [size for size in GPU_GIB if total is not None and total <= USABLE * size * memory.GiB]
                cells += f" {gib(total):>9} {fits[0] if fits else 'no':>5}" if total else f" {'-':>9} {'':>5}"
            print(f"{teacher:<14} {phase:<30}{cells}")


if __name__ == "__main__":
    main()
