"""Export a checkpoint as a plain Hugging Face model folder, which transformers.AutoModelForCausalLM
.from_pretrained(DIR) loads with no code from this repo (and so can vLLM, TGI and llama.cpp's converter).

    python -m common.export CHECKPOINT --out DIR [--tokenizer DIR] [--eval FILE.json] [--pad-to-widest]

A standard class holds, exactly:
  - no students, or `copy` FFN students: the teacher's architecture and config;
  - FFNs of one width in every layer, of the teacher's own gated form (`pruned` students, or gated
    `prototype` students without biases): the teacher's class with intermediate_size set to that width
    (and hidden_act to the prototypes' activation).
Every other mix is refused with one line naming the layers: attention students (no transformers class
mixes gated linear or sink-and-window attention with softmax layers), ungated prototypes, FFNs of
different widths (teacher FFNs kept among pruned ones included). With --pad-to-widest, narrower FFNs
are zero-padded to the widest: exact, but the zeros are stored and computed, so it saves nothing.

The folder holds model.safetensors, config.json, generation_config.json, the tokenizer and README.md, a
model card with the provenance (checkpoint, run, teacher, students) and the evaluation table of
--eval (a JSON file common.evaluate --out wrote). It is written under a temp name, reloaded with plain
transformers and checked to give the checkpoint's logits, then renamed: a folder with its final name
is complete.
"""

import copy
import json
import os
import shutil
import sys

import torch
import torch.nn as nn
from transformers import PreTrainedConfig

from common.checkpoint import load_model, run_record, tokenizer_folder
from common.config import check_ranges, fail, override
from common.evaluate import format_comparison
from common.files import read_json
from common.swap import get_block, student_specs, transformer_layers

# fmt: off
OUT = ""                            # the folder to write (must not exist yet)
TOKENIZER = "models/smolllm2_135m"  # tokenizer and generation config if the checkpoint and its run's teacher lack them
EVAL = ""                           # a JSON file from `python -m common.evaluate ... --out`: its table goes in the card
PAD_TO_WIDEST = False               # FFNs of different widths: zero-pad each to the widest (exact, but saves nothing)
CHECK_TOKENS = 64                   # tokens of the logits check between the checkpoint and the reloaded folder
# fmt: on
_HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "relu2": "relu2"}  # prototype activation -> transformers' name


def spans(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for k, i in enumerate(layers):
        if start is None:
            start = i
        if k + 1 == len(layers) or layers[k + 1] != i + 1:
            out.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ", ".join(out)


def ffn_weights(block: nn.Module, config: PreTrainedConfig) -> tuple[str, int, str, dict[str, torch.Tensor]]:
    """A gated FFN as (what it is, width, activation, {gate_proj/up_proj/down_proj .weight/.bias: tensor}),
    or ValueError saying why the teacher's FFN class cannot hold it."""
    kind = getattr(block, "kind", None)
    if kind in (None, "copy", "pruned"):
        inner = block if kind is None else block.block
        return kind or "teacher", inner.gate_proj.out_features, config.hidden_act, inner.state_dict()
    if kind == "prototype" and block.gated and block.fc_in.bias is None and block.activation in _HF_ACTIVATION:
        gate, up = block.fc_in.weight.chunk(2)
        return (
            "prototype",
            block.width,
            _HF_ACTIVATION[block.activation],
            {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": block.fc_out.weight},
        )
    why = "ungated or with biases" if kind == "prototype" else "an unknown kind"
    raise ValueError(f"{kind} FFN students ({why}) have no standard transformers class")


def export_state(model: nn.Module) -> tuple[PreTrainedConfig, dict[str, torch.Tensor], str]:
    """The exported config, its state dict and a description of the FFNs; or ValueError, one line saying
    which layers differ and why."""
    config = model.config
    attention = [s for s in student_specs(model) if s["target"] == "attn"]
    if attention:
        kinds = sorted({s["kind"] for s in attention})
        raise ValueError(
            f"layers {spans([s['layer'] for s in attention])} have {'/'.join(kinds)} attention students: "
            f"no transformers class mixes gated linear or sink-and-window attention with the teacher's "
            f"softmax layers; export needs the teacher's attention in every layer"
        )
    ffns = []
    for i in range(len(transformer_layers(model))):
        try:
            ffns.append(ffn_weights(get_block(model, i, "mlp"), config))
        except ValueError as e:
            raise ValueError(f"layer {i}: {e}") from None
    groups = {}
    for i, (what, width, act, _) in enumerate(ffns):
        groups.setdefault((what, width, act), []).append(i)
    described = "; ".join(
        f"layer{'s' * (len(ls) > 1)} {spans(ls)}: {what} FFN, width {w}, {a}" for (what, w, a), ls in groups.items()
    )
    if len({act for _, _, act, _ in ffns}) > 1:
        raise ValueError(f"the FFN activations differ ({described}): the config has one hidden_act for every layer")
    widest = max(width for _, width, _, _ in ffns)
    if len({width for _, width, _, _ in ffns}) > 1 and not PAD_TO_WIDEST:
        raise ValueError(
            f"the FFN widths differ ({described}): the config has one intermediate_size for every layer; "
            f"--pad-to-widest zero-pads them to {widest} (exact, but saves nothing)"
        )
    if len({width for _, width, _, _ in ffns}) > 1:
        described += f"; zero-padded to width {widest} (--pad-to-widest: exact, saves nothing)"
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    for i, (_, width, _, weights) in enumerate(ffns):
        extra = widest - width  # zero rows of gate and up (and their biases), zero columns of down
        for name, w in weights.items():
            pad = {"down_proj.weight": (0, extra), "down_proj.bias": (0, 0)}.get(
                name, (0, 0) * (w.dim() - 1) + (0, extra)
            )
            state[f"model.layers.{i}.mlp.{name}"] = torch.nn.functional.pad(w.detach(), pad)
    exported = copy.deepcopy(config)
    exported.intermediate_size, exported.hidden_act = widest, ffns[0][2]
    exported.architectures = [type(model).__name__]
    return exported, state, described


def model_card(checkpoint: str, config: PreTrainedConfig, described: str, n_params: int, max_diff: float) -> str:
    """README.md: where the model comes from (checkpoint, run, teacher, students) and, with --eval, its table."""
    meta_file = os.path.join(checkpoint, "meta.json")
    meta = read_json(meta_file, "the checkpoint is damaged; use another one") if os.path.exists(meta_file) else {}
    run = run_record(checkpoint)
    teacher = run.get("config", {}).get("TEACHER", "unknown")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [distillation, layerwise-decoder-distillation]",
        "---",
        "",
        f"# {os.path.basename(os.path.abspath(OUT))}",
        "",
        f"A {config.architectures[0]} with {n_params / 1e6:.2f}M parameters (FFN width {config.intermediate_size}), "
        f"exported by `python -m common.export` of layerwise-decoder-distillation from the checkpoint "
        f"`{checkpoint}`. It loads with `transformers.AutoModelForCausalLM.from_pretrained` alone.",
        "",
        f"- teacher: `{teacher}`",
        f"- run: `{run.get('run_id', 'unknown')}` ({run.get('script', 'unknown script')}), checkpoint meta: "
        f"`{json.dumps(meta)}`",
        f"- FFNs: {described}",
        f"- check: reloaded with transformers, its logits differ from the checkpoint's by at most {max_diff:.2e} "
        f"over {CHECK_TOKENS} tokens",
    ]
    if EVAL:
        with open(EVAL) as f:
            report = json.load(f)
        lines += ["", "## Evaluation", "", f"`python -m common.evaluate` ({report['val_tokens']:,} val tokens):", ""]
        if "comparison" in report:
            lines += format_comparison(
                report["comparison"], report["models"], "teacher" in report["models"], markdown=True
            )
        else:
            lines += ["| model | role | val CE | ppl |", "|---|---|---|---|"]
            lines += [f"| {r['model']} | {r['role']} | {r['ce']:.4f} | {r['ppl']:.2f} |" for r in report["results"]]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def export(checkpoint: str, out: str) -> tuple[float, str]:
    """Write the export of `checkpoint` to `out` (temp folder, check, rename). Returns the max logit difference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = load_model(checkpoint).eval()
    config, state, described = export_state(model)
    tok_dir = tokenizer_folder(checkpoint, TOKENIZER)
    if tok_dir is None:
        raise ValueError(
            f"{checkpoint} has no tokenizer files, nor has the teacher its run folder's run.json names, nor "
            f"{TOKENIZER}; pass --tokenizer with the teacher's model folder"
        )
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp_{os.path.basename(out)}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        exported = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        exported.load_state_dict(state, strict=True)
        if os.path.isfile(os.path.join(tok_dir, "generation_config.json")):
            exported.generation_config = GenerationConfig.from_pretrained(tok_dir)
        exported.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        ids = torch.randint(0, config.vocab_size, (2, CHECK_TOKENS), generator=torch.Generator().manual_seed(0))
        expected = model(ids, use_cache=False).logits
        max_diff = (reloaded(ids, use_cache=False).logits - expected).abs().max().item()
        if max_diff > 1e-4 * max(1.0, expected.abs().max().item()):
            raise RuntimeError(
                f"the reloaded export's logits differ from the checkpoint's by {max_diff:.3g}: a bug in "
                f"common/export.py; nothing was written"
            )
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(checkpoint, config, described, sum(p.numel() for p in reloaded.parameters()), max_diff))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return max_diff, described


def main(argv: list[str]) -> None:
    usage = "python -m common.export CHECKPOINT --out DIR [--name value ...]"
    if not argv or argv[0].startswith("-"):
        override(globals(), argv, usage)  # --help prints the options and exits
        fail(f"usage: {usage}  (--help lists the options)")
    checkpoint = argv.pop(0)
    override(globals(), argv, usage)
    if not OUT:
        fail("--out DIR is needed: the folder to write the exported model to")
    if os.path.exists(OUT):
        fail(f"{OUT} already exists; choose a new --out (an export never overwrites a folder)")
    check_ranges(globals(), at_least={"CHECK_TOKENS": 1})
    if EVAL and not os.path.isfile(EVAL):
        fail(f"--eval {EVAL}: no such file; write one with python -m common.evaluate ... --out FILE.json")
    try:
        max_diff, described = export(checkpoint, OUT)
    except (OSError, ValueError, RuntimeError) as e:
        fail(f"{checkpoint}: cannot export: {str(e).splitlines()[0]}")
    print(f"wrote {OUT}: {described}; reloaded with plain transformers, max |logit difference| {max_diff:.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
