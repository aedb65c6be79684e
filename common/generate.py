"""Generate text from a checkpoint: greedy (temperature 0) or sampling with temperature and top-p.

    python -m common.generate CHECKPOINT --prompt "Once upon a time" [--max-new-tokens 64]
        [--temperature 0.8] [--top-p 0.95] [--seed 0] [--tokenizer DIR] [--prompts-file FILE]

A checkpoint is any folder common.checkpoint.load_model accepts. The tokenizer comes from the
checkpoint folder when it holds tokenizer files, else from the teacher its run folder's run.json names, else
from --tokenizer (the prepared model folder).
Decoding is incremental, through the model's own forward: the prompt runs once, then each new token alone,
with transformers' KV cache layers for the teacher's attention and the students' own (common/students/attention.py).
"""

import sys
import time

import torch
import torch.nn as nn
from transformers.cache_utils import Cache, DynamicCache

from common.checkpoint import check_has_config, load_model, tokenizer_folder
from common.config import Settings, fail, override
from common.runtime import Runtime
from common.students.attention import RecurrentLayer
from common.swap import get_block, transformer_layers

# fmt: off
PROMPT = "Once upon a time"            # text to continue; a default so a bare run shows something
PROMPTS_FILE = ""                      # a text file of prompts, one per line, generated as one batch (replaces PROMPT)
MAX_NEW_TOKENS = 64                    # tokens to add (fewer when the model ends the text)
TEMPERATURE = 0.0                      # 0 = greedy (deterministic: best for comparing checkpoints)
TOP_P = 0.95                           # nucleus sampling: sample from the smallest set of tokens holding this mass
SEED = 0                               # sampling seed: the same seed gives the same text
TOKENIZER = "models/smolllm2_135m"     # tokenizer folder when neither the checkpoint nor its run's teacher has one
DEVICE = "auto"                        # auto: cuda when there is one, else cpu
DTYPE = "auto"                         # auto: bf16 autocast on GPUs, fp32 on CPU
# fmt: on


def sample_top_p(logits: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from softmax(logits) restricted to the smallest set of most likely tokens
    whose probability reaches top_p (the most likely token is always kept)."""
    probs = logits.float().softmax(-1)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    sorted_p = sorted_p * (sorted_p.cumsum(-1) - sorted_p < top_p)
    choice = torch.multinomial(sorted_p, 1, generator=generator)
    return order.gather(-1, choice)[:, 0]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists of different lengths as one left-padded batch: ids (B, n) and real (B, n), False on the padding."""
    n = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (n - len(p)) + list(p) for p in prompts])
    real = torch.tensor([[False] * (n - len(p)) + [True] * len(p) for p in prompts])
    return ids, real


class DecodingCache(Cache):
    """A transformers Cache that also carries `real` (B, L): which of the tokens so far are real, False on left
    padding. The model's masks keep padding out of softmax attention; students' cache layers read `real` so
    that padding never enters a recurrent state or a window."""

    def __init__(self, layers: list) -> None:
        super().__init__(layers=layers)
        self.real = None


def decoding_cache(model: nn.Module) -> DecodingCache:
    """A cache for incremental decoding, one layer per decoder layer: transformers' own (DynamicCache's layer
    for the teacher's config: full or sliding-window) where the attention is the teacher's, whatever the FFN;
    the student's own where the attention is a student (`new_cache`, given that teacher layer to answer the
    model's mask bookkeeping as it would: common/students/attention.py)."""
    layers = DynamicCache(config=model.config).layers
    for i in range(len(transformer_layers(model))):
        block = get_block(model, i, "attn")
        if hasattr(block, "new_cache"):
            layers[i] = block.new_cache(layers[i])
    return DecodingCache(layers)


def state_bytes(cache: Cache) -> dict[str, int]:
    """{'kv': bytes of keys and values (window students' slot indices too, lolcats students' window), 'recurrent':
    bytes of linear-attention states (a RecurrentLayer's `state`)} held by a decoding cache (a student layer's shadow
    holds meta tensors only: no bytes)."""
    held = {"kv": 0, "recurrent": 0}
    for layer in cache.layers:
        for name, t in vars(layer).items():
            if isinstance(t, torch.Tensor) and not t.is_meta:
                recurrent = isinstance(layer, RecurrentLayer) and name == "state"
                held["recurrent" if recurrent else "kv"] += t.numel() * t.element_size()
    return held


@torch.no_grad()
def forward_cached(
    model: nn.Module, ids: torch.Tensor, cache: DecodingCache, real: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token logits (B, V) after ids (B, T), continuing `cache` (decoding_cache) through the model's own
    forward: its masks (sliding windows, padding), rotary embeddings and logit transform (scaling, softcapping).
    real (B, T): False on left padding (None: all real); positions count real tokens only."""
    real = torch.ones_like(ids, dtype=torch.bool) if real is None else real
    cache.real = real if cache.real is None else torch.cat([cache.real, real], 1)
    positions = (cache.real.long().cumsum(1) - 1)[:, -ids.shape[1] :].clamp(min=0)  # GPT-2 looks positions up
    out = model(
        input_ids=ids,
        attention_mask=cache.real.long(),
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1]


@torch.no_grad()
def generate(
    model: nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    real: torch.Tensor | None = None,
    rerun: bool = False,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Continue ids (B, n) by up to max_new_tokens tokens; returns (B, n + new), and with return_logits also the
    logits each new token was chosen from (B, new, V). Prompts of different lengths come left-padded, with
    real (B, n) False on the padding (left_pad makes both). Stops once every row has produced eos_id (rows
    that ended are padded with it).
    Incremental: the prompt runs once and fills decoding_cache(model), then each new token runs alone.
    rerun=True re-runs the whole sequence for every token (use_cache=False), the reference that tests
    compare the incremental path against; it takes prompts of one length only."""
    real = torch.ones_like(ids, dtype=torch.bool) if real is None else real.to(ids.device, torch.bool)
    if rerun and not real.all():
        raise ValueError("rerun=True takes prompts of one length: re-running does not handle padding")
    cache = None if rerun else decoding_cache(model)
    new, new_real, steps = ids, real, []
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        if rerun:
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
        else:
            logits = forward_cached(model, new, cache, new_real)
        steps.append(logits)
        nxt = logits.argmax(-1) if temperature == 0 else sample_top_p(logits / temperature, top_p, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(done, eos_id)
            done |= nxt == eos_id
        new, new_real = nxt[:, None], None  # a new token is real
        ids = torch.cat([ids, new], 1)
        if done.all():
            break
    return (ids, torch.stack(steps, 1)) if return_logits else ids


def main(argv: list[str]) -> None:
    usage = 'python -m common.generate CHECKPOINT --prompt "..." [--name value ...]'
    if not argv or argv[0].startswith("-"):
        override(globals(), argv, usage)  # --help prints the options and exits
        fail(f"usage: {usage}  (--help lists the options)")
    folder = argv.pop(0)
    args = override(globals(), argv, usage)
    tok_dir = check_arguments(args, folder)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError) as e:
        fail(f"{tok_dir}: cannot load its tokenizer: {str(e).splitlines()[0]}")
    try:
        rt = Runtime(args.DEVICE, args.DTYPE)
    except ValueError as e:
        fail(str(e))
    try:
        model = load_model(folder, rt.device).eval()
    except (OSError, ValueError, RuntimeError) as e:
        fail(f"{folder}: cannot load it as a model: {str(e).splitlines()[0]}")
    if len(tokenizer) > model.config.vocab_size:
        fail(
            f"the tokenizer from {tok_dir} has {len(tokenizer)} ids but the model only {model.config.vocab_size}; "
            f"pass the --tokenizer of the model this checkpoint was distilled from"
        )
    prompts = read_prompts(args)
    prompt_ids = [tokenizer(p)["input_ids"] or [tokenizer.bos_token_id or tokenizer.eos_token_id] for p in prompts]
    longest = max(len(p) for p in prompt_ids)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and longest + args.MAX_NEW_TOKENS > limit:
        fail(
            f"prompt ({longest} tokens) + --max-new-tokens {args.MAX_NEW_TOKENS} exceeds the model's "
            f"{limit} positions; shorten the prompt or lower --max-new-tokens"
        )
    ids, real = left_pad(prompt_ids, pad_id=0)  # the padding is never attended to, so any id will do
    ids, real = ids.to(rt.device), real.to(rt.device)
    generator = torch.Generator(rt.device).manual_seed(args.SEED)
    t0 = time.perf_counter()
    with rt.autocast():
        sampling = (args.TEMPERATURE, args.TOP_P, generator)
        out = generate(model, ids, args.MAX_NEW_TOKENS, *sampling, tokenizer.eos_token_id, real)
    seconds = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    mode = f"temperature {args.TEMPERATURE}, top-p {args.TOP_P}, seed {args.SEED}" if args.TEMPERATURE else "greedy"
    print(
        "\n\n".join(
            p + tokenizer.decode(row[ids.shape[1] :].tolist(), skip_special_tokens=True) for p, row in zip(prompts, out)
        )
    )
    print(
        f"\n[{folder}: {len(prompts)} x {new} new tokens, {mode}, {len(prompts) * new / seconds:.1f} tokens/s "
        f"on {rt.device}]",
        file=sys.stderr,
    )


def check_arguments(args: Settings, folder: str) -> str:
    """Exit with one line for arguments that cannot work, before the model loads; return the tokenizer's folder."""
    try:
        check_has_config(folder)
    except FileNotFoundError as e:
        fail(e)
    if args.TEMPERATURE < 0 or not 0 < args.TOP_P <= 1:
        fail(f"--temperature must be >= 0 (0 = greedy) and --top-p in (0, 1]; got {args.TEMPERATURE} and {args.TOP_P}")
    if args.MAX_NEW_TOKENS < 1:
        fail(f"--max-new-tokens must be at least 1, got {args.MAX_NEW_TOKENS}")
    tok_dir = tokenizer_folder(folder, args.TOKENIZER)
    if tok_dir is None:
        fail(
            f"{folder} has no tokenizer files, nor has the teacher its run folder's run.json names, nor "
            f"{args.TOKENIZER}; pass --tokenizer with the teacher's model folder (run prepare.py to write "
            "models/smolllm2_135m)"
        )
    return tok_dir


def read_prompts(args: Settings) -> list[str]:
    """PROMPT, or the lines of PROMPTS_FILE that hold text; exits with one line when the file has none."""
    if not args.PROMPTS_FILE:
        return [args.PROMPT]
    try:
        with open(args.PROMPTS_FILE) as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        fail(f"--prompts-file {args.PROMPTS_FILE}: {e.strerror}")
    if not prompts:
        fail(f"--prompts-file {args.PROMPTS_FILE} holds no prompt; write one prompt per line")
    return prompts


if __name__ == "__main__":
    main(sys.argv[1:])
