"""Export a checkpoint as a plain Hugging Face model folder, which transformers.AutoModelForCausalLM
.from_pretrained(DIR) loads with no code from this repo (and so can vLLM, TGI and llama.cpp's converter).

    python -m common.export CHECKPOINT --out DIR [--tokenizer DIR] [--eval FILE.json] [--pad-to-widest]

A standard class holds, exactly, for any family of decoder-only model:
  - no students, or `copy` FFN students: the teacher's architecture and config;
  - FFNs of one width in every layer, of the teacher's own form (`pruned` students, whatever the FFN's shape:
    gated, fused, plain, Conv1D, or a mixture of experts pruned expert by expert): the teacher's class with
    its width attribute set to that width. The attribute is found, not listed per family: of _WIDTH_ATTRIBUTES,
    the one that, set to the width, gives a model (built on the meta device) whose weights have the shapes of
    the students'; with none, the export is refused;
  - gated `prototype` students without biases, where the teacher's FFN is gate_proj/up_proj/down_proj
    without biases: likewise, with the config's activation set to the prototypes'.
Every other mix is refused with one line naming the layers: attention students (no transformers class
mixes gated linear, delta-rule, LoLCATs (window + linear) or sink-and-window attention with softmax layers:
Qwen3-Next's Gated DeltaNet layers have their own projections, a short convolution and no rotary), other
prototypes, FFNs of different widths (teacher FFNs kept among pruned ones included). With --pad-to-widest,
narrower FFNs are zero-padded to the widest: exact, but the zeros are stored and computed, so it saves nothing.

The folder holds model.safetensors, config.json, generation_config.json, the tokenizer and README.md, a
model card with the provenance (checkpoint, run, teacher, students) and the evaluation table of
--eval (a JSON file common.evaluate --out wrote). It is written under a temp name, reloaded with plain
transformers and checked to give the checkpoint's logits, then renamed: a folder with its final name
is complete.
"""

import copy
import json
import os
import sys

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, PreTrainedConfig

from common.checkpoint import load_model, run_record, tokenizer_folder
from common.config import Settings, check_ranges, fail, override
from common.evaluate import format_comparison
from common.files import folder_written_whole, read_json
from common.students.ffn import ffn_layout
from common.swap import get_block, student_specs, transformer_layers

# fmt: off
OUT = ""                            # the folder to write (must not exist yet)
TOKENIZER = "models/smolllm2_135m"  # tokenizer and generation config if the checkpoint and its run's teacher lack them
EVAL = ""                           # a JSON file from `python -m common.evaluate ... --out`: its table goes in the card
PAD_TO_WIDEST = False               # FFNs of different widths: zero-pad each to the widest (exact, but saves nothing)
CHECK_TOKENS = 64                   # tokens of the logits check between the checkpoint and the reloaded folder
# fmt: on
# The config attributes that may hold a family's FFN width (Llama and most: intermediate_size; GPT-2 n_inner,
# Falcon ffn_hidden_size, Qwen-MoE moe_intermediate_size) or its activation; export_state finds which one does.
_WIDTH_ATTRIBUTES = ("intermediate_size", "n_inner", "ffn_hidden_size", "moe_intermediate_size", "ffn_dim")
_ACTIVATION_ATTRIBUTES = ("hidden_act", "hidden_activation", "activation_function", "activation")
_PROTOTYPE_KEYS = {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}


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


def activation_attribute(config: PreTrainedConfig) -> str | None:
    """The config attribute that names the FFN activation, or None."""
    return next((a for a in _ACTIVATION_ATTRIBUTES if getattr(config, a, None) is not None), None)


def ffn_weights(block: nn.Module, config: PreTrainedConfig) -> tuple[str, int, str, dict[str, torch.Tensor]]:
    """A layer's FFN as (what it is, width, activation, its weights under the keys of the teacher's FFN
    block): the teacher's own, or what its student's as_teacher_ffn() says; ValueError saying why the teacher's
    FFN class cannot hold it."""
    kind, activation = getattr(block, "kind", None), getattr(config, activation_attribute(config) or "", None)
    if kind is None:
        return "teacher", ffn_layout(block, config.hidden_size).width, activation, block.state_dict()
    if not hasattr(block, "as_teacher_ffn"):
        raise ValueError(f"{kind} FFN students have no standard transformers class")
    width, own_activation, weights = block.as_teacher_ffn()
    return kind, width, own_activation or activation, weights


def meta_shapes(config: PreTrainedConfig) -> dict[str, torch.Size]:
    """The state dict shapes of the model `config` builds, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}


def _pad(t: torch.Tensor, shape: torch.Size, extra: int) -> torch.Tensor | None:
    """t zero-padded to `shape` where their sizes differ by `extra` channels (appended) or by 2 x extra (a
    fused gate_up: each half padded); None when they differ otherwise."""
    if t.dim() != len(shape):
        return None
    for dim, (n, m) in enumerate(zip(t.shape, shape)):
        parts = {n: 0, n + extra: 1, n + 2 * extra: 2}.get(m) if extra > 0 else {n: 0}.get(m)
        if parts is None:
            return None
        if parts:
            zeros = t.new_zeros(t.shape[:dim] + (extra,) + t.shape[dim + 1 :])
            t = torch.cat([piece for half in t.chunk(parts, dim) for piece in (half, zeros)], dim)
    return t


def layer_ffns(model: nn.Module) -> list[tuple[str, tuple]]:
    """[(the name of layer i's FFN block in the model, its ffn_weights)] for every layer; ValueError naming the
    first layer whose FFN no standard class holds."""
    names = {id(m): n for n, m in model.named_modules()}
    ffns = []
    for i in range(len(transformer_layers(model))):
        block = get_block(model, i, "mlp")
        try:
            ffns.append((names[id(block)], ffn_weights(block, model.config)))
        except ValueError as e:
            raise ValueError(f"layer {i}: {e}") from None
    return ffns


def check_prototypes(config: PreTrainedConfig, ffns: list[tuple[str, tuple]]) -> None:
    """ValueError unless every prototype's layer holds, in the teacher's class, gate_proj, up_proj and down_proj
    without biases (the weights a gated prototype maps to), and the config names the activation."""
    teacher = meta_shapes(config)
    for i, (prefix, (what, *_)) in enumerate(ffns):
        keys = {k[len(prefix) + 1 :] for k in teacher if k.startswith(prefix + ".")}
        if what == "prototype" and (keys != _PROTOTYPE_KEYS or activation_attribute(config) is None):
            raise ValueError(
                f"layer {i}: gated prototype FFN students map only to a teacher FFN of gate_proj, up_proj and "
                f"down_proj without biases, whose activation the config names; this teacher's FFN has "
                f"{', '.join(sorted(keys))}"
            )


def padded_state(config: PreTrainedConfig, width: int, state: dict, ffns: list[tuple[str, tuple]]) -> dict | None:
    """`state` with every layer's FFN weights, narrower ones zero-padded to `width`: the state dict of the model
    `config` builds; None when that model's weights have other keys or shapes."""
    shapes = meta_shapes(config)
    full = dict(state)
    for prefix, (_, w, _, weights) in ffns:
        for name, t in weights.items():
            key = f"{prefix}.{name}"
            full[key] = _pad(t.detach(), shapes[key], width - w) if key in shapes else None
    if full.keys() != shapes.keys() or any(v is None or v.shape != shapes[k] for k, v in full.items()):
        return None
    return full


def export_state(
    model: nn.Module, pad_to_widest: bool = False
) -> tuple[PreTrainedConfig, dict[str, torch.Tensor], str]:
    """The exported config, its state dict and a description of the FFNs; or ValueError, one line saying
    which layers differ and why. `pad_to_widest` (PAD_TO_WIDEST): FFNs of different widths zero-padded to the
    widest."""
    config = model.config
    attention = [s for s in student_specs(model) if s["target"] == "attn"]
    if attention:
        kinds = sorted({s["kind"] for s in attention})
        raise ValueError(
            f"layers {spans([s['layer'] for s in attention])} have {'/'.join(kinds)} attention students: "
            f"no transformers class mixes gated linear, delta-rule, LoLCATs or sink-and-window attention with the "
            f"teacher's softmax layers; export needs the teacher's attention in every layer"
        )
    ffns = layer_ffns(model)
    groups = {}
    for i, (_, (what, width, act, _)) in enumerate(ffns):
        groups.setdefault((what, width, act), []).append(i)
    described = "; ".join(
        f"layer{'s' * (len(ls) > 1)} {spans(ls)}: {what} FFN, width {w}, {a}" for (what, w, a), ls in groups.items()
    )
    activations = {act for _, (_, _, act, _) in ffns}
    if len(activations) > 1:
        raise ValueError(f"the FFN activations differ ({described}): the config has one activation for every layer")
    widths = {width for _, (_, width, _, _) in ffns}
    widest = max(widths)
    if len(widths) > 1 and not pad_to_widest:
        raise ValueError(
            f"the FFN widths differ ({described}): the config has one FFN width for every layer; "
            f"--pad-to-widest zero-pads them to {widest} (exact, but saves nothing)"
        )
    if len(widths) > 1:
        described += f"; zero-padded to width {widest} (--pad-to-widest: exact, saves nothing)"
    check_prototypes(config, ffns)
    exported = copy.deepcopy(config)
    exported.architectures = [type(model).__name__]
    attribute, activation = activation_attribute(config), activations.pop()
    if attribute:
        setattr(exported, attribute, activation)
        read_back = getattr(type(exported).from_dict(exported.to_dict()), attribute)
        if read_back != activation:  # Gemma's config reads "gelu" as its legacy name of the tanh approximation
            raise ValueError(
                f"the {config.model_type} config reads {attribute}={activation!r} back as {read_back!r}; the "
                f"prototypes need another activation to be exported to this family"
            )
    # The FFN width's attribute: none when the teacher's width fits, else the first that, set to it, fits.
    state = {k: v for k, v in model.state_dict().items() if not any(k.startswith(p + ".") for p, _ in ffns)}
    candidates = [a for a in _WIDTH_ATTRIBUTES if hasattr(config, a)]
    for attribute in (None, *candidates):
        trial = copy.deepcopy(exported)
        if attribute:
            setattr(trial, attribute, widest)
        full = padded_state(trial, widest, state, ffns)
        if full is not None:
            return trial, full, described + (f"; config {attribute} = {widest}" if attribute else "")
    raise ValueError(
        f"no FFN width attribute of the {config.model_type} config ({', '.join(_WIDTH_ATTRIBUTES)}), set to {widest}, "
        f"gives a model with the shapes of the students' weights; add this family's to _WIDTH_ATTRIBUTES"
    )


def model_card(
    out: str,
    checkpoint: str,
    config: PreTrainedConfig,
    described: str,
    n_params: int,
    max_diff: float,
    check_tokens: int,
    eval_file: str,
) -> str:
    """README.md of the export `out`: where the model comes from (checkpoint, run, teacher, students), its logits
    check (max_diff over check_tokens tokens) and, given an evaluation report (`eval_file`, --eval), its table."""
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
        f"# {os.path.basename(os.path.abspath(out))}",
        "",
        f"A {config.architectures[0]} with {n_params / 1e6:.2f}M parameters, exported by `python -m common.export` of layerwise-decoder-distillation from the checkpoint "
        f"`{checkpoint}`. It loads with `transformers.AutoModelForCausalLM.from_pretrained` alone.",
        "",
        f"- teacher: `{teacher}`",
        f"- run: `{run.get('run_id', 'unknown')}` ({run.get('script', 'unknown script')}), checkpoint meta: "
        f"`{json.dumps(meta)}`",
        f"- FFNs: {described}",
        f"- check: reloaded with transformers, its logits differ from the checkpoint's by at most {max_diff:.2e} "
        f"over {check_tokens} tokens",
    ]
    if eval_file:
        with open(eval_file) as f:
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
def export(args: Settings, checkpoint: str) -> tuple[float, str]:
    """Write the export of `checkpoint` to args.OUT. Returns the max logit difference and the FFNs' description."""
    model = load_model(checkpoint).eval()
    tok_dir = tokenizer_folder(checkpoint, args.TOKENIZER)
    if tok_dir is None:
        raise ValueError(
            f"no tokenizer files, nor has the teacher its run folder's run.json names, nor {args.TOKENIZER}; pass "
            f"--tokenizer with the teacher's model folder"
        )
    return export_model(model, checkpoint, args.OUT, tok_dir, args.PAD_TO_WIDEST, args.CHECK_TOKENS, args.EVAL)


@torch.no_grad()
def export_model(
    model: nn.Module,
    checkpoint: str,
    out: str,
    tok_dir: str,
    pad_to_widest: bool = False,
    check_tokens: int = 64,
    eval_file: str = "",
) -> tuple[float, str]:
    """Write the export of `model` (loaded from `checkpoint`, students in place) to `out`, with tok_dir's
    tokenizer: a temp folder, reloaded with plain transformers and checked to give the model's logits over
    `check_tokens` tokens, then renamed; its README holds the evaluation report `eval_file` when given. Returns the
    max logit difference and the FFNs' description."""
    from transformers import AutoTokenizer, GenerationConfig

    config, state, described = export_state(model, pad_to_widest)
    with folder_written_whole(out) as tmp:
        exported = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        exported.load_state_dict(state, strict=True)
        if os.path.isfile(os.path.join(tok_dir, "generation_config.json")):
            exported.generation_config = GenerationConfig.from_pretrained(tok_dir)
        exported.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        ids = torch.randint(0, config.vocab_size, (2, check_tokens), generator=torch.Generator().manual_seed(0))
        expected = model(ids, use_cache=False).logits
        max_diff = (reloaded(ids, use_cache=False).logits - expected).abs().max().item()
        if max_diff > 1e-4 * max(1.0, expected.abs().max().item()):
            raise RuntimeError(
                f"the reloaded export's logits differ from the checkpoint's by {max_diff:.3g}: a bug in "
                f"common/export.py; nothing was written"
            )
        with open(os.path.join(tmp, "README.md"), "w") as f:
            n_params = sum(p.numel() for p in reloaded.parameters())
            f.write(model_card(out, checkpoint, config, described, n_params, max_diff, check_tokens, eval_file))
    return max_diff, described


def main(argv: list[str]) -> None:
    usage = "python -m common.export CHECKPOINT --out DIR [--name value ...]"
    if not argv or argv[0].startswith("-"):
        override(globals(), argv, usage)  # --help prints the options and exits
        fail(f"usage: {usage}  (--help lists the options)")
    checkpoint = argv.pop(0)
    args = override(globals(), argv, usage)
    if not args.OUT:
        fail("--out DIR is needed: the folder to write the exported model to")
    if os.path.exists(args.OUT):
        fail(f"{args.OUT} already exists; choose a new --out (an export never overwrites a folder)")
    check_ranges(args.as_dict(), at_least={"CHECK_TOKENS": 1})
    if args.EVAL and not os.path.isfile(args.EVAL):
        fail(f"--eval {args.EVAL}: no such file; write one with python -m common.evaluate ... --out FILE.json")
    try:
        max_diff, described = export(args, checkpoint)
    except (OSError, ValueError, RuntimeError) as e:
        fail(f"{checkpoint}: cannot export: {str(e).splitlines()[0]}")
    print(f"wrote {args.OUT}: {described}; reloaded with plain transformers, max |logit difference| {max_diff:.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
