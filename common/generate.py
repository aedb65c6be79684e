"""Generate text from a checkpoint: greedy (temperature 0) or sampling with temperature and top-p.

    python -m common.generate CHECKPOINT --prompt "Once upon a time" [--max-new-tokens 64]
        [--temperature 0.8] [--top-p 0.95] [--seed 0] [--tokenizer DIR]

A checkpoint is any folder common.checkpoint.load_model accepts. The tokenizer comes from the
checkpoint folder when it holds tokenizer files, else from --tokenizer (the prepared model folder).
"""
import os
import sys
import time

import torch

from common.checkpoint import load_model
from common.config import override
from common.runtime import Runtime

PROMPT = "Once upon a time"            # text to continue; a default so a bare run shows something
MAX_NEW_TOKENS = 64                    # tokens to add (fewer when the model ends the text)
TEMPERATURE = 0.0                      # 0 = greedy (deterministic: best for comparing checkpoints)
TOP_P = 0.95                           # nucleus sampling: sample from the smallest set of tokens holding this mass
SEED = 0                               # sampling seed: the same seed gives the same text
TOKENIZER = "models/smolllm2_135m"     # tokenizer folder for checkpoints that carry none (prepare.py writes it)
DEVICE = "auto"                        # auto: cuda when there is one, else cpu
DTYPE = "auto"                         # auto: bf16 autocast on GPUs, fp32 on CPU


def has_tokenizer(folder):
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def sample_top_p(logits, top_p, generator=None):
    """One token per row from softmax(logits) restricted to the smallest set of most likely tokens
    whose probability reaches top_p (the most likely token is always kept)."""
    probs = logits.float().softmax(-1)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    sorted_p = sorted_p * (sorted_p.cumsum(-1) - sorted_p < top_p)
    choice = torch.multinomial(sorted_p, 1, generator=generator)
    return order.gather(-1, choice)[:, 0]


@torch.no_grad()
def generate(model, ids, max_new_tokens, temperature=0.0, top_p=1.0, generator=None, eos_id=None):
    """Continue ids (B, n) by up to max_new_tokens tokens; returns (B, n + new). Each step re-runs the
    whole sequence with use_cache=False: this project's attention students may have no KV cache, and
    this is for inspecting checkpoints, not for speed. Stops once every row has produced eos_id
    (rows that ended are padded with it)."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
        nxt = logits.argmax(-1) if temperature == 0 else sample_top_p(logits / temperature, top_p, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(done, eos_id)
            done |= nxt == eos_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if done.all():
            break
    return ids


def main(argv):
    if not argv or argv[0].startswith("--"):
        sys.exit('usage: python -m common.generate CHECKPOINT --prompt "..." [--max-new-tokens N] [--temperature T] '
                 '[--top-p P] [--seed S] [--tokenizer DIR]')
    folder = argv.pop(0)
    override(globals(), argv)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        sys.exit(f"{folder}: not a model or checkpoint folder (no config.json); pass a checkpoint folder such as "
                 f"runs/NAME/final, or the model folder prepare.py wrote")
    if TEMPERATURE < 0 or not 0 < TOP_P <= 1:
        sys.exit(f"--temperature must be >= 0 (0 = greedy) and --top-p in (0, 1]; got {TEMPERATURE} and {TOP_P}")
    if MAX_NEW_TOKENS < 1:
        sys.exit(f"--max-new-tokens must be at least 1, got {MAX_NEW_TOKENS}")
    tok_dir = folder if has_tokenizer(folder) else TOKENIZER
    if not has_tokenizer(tok_dir):
        sys.exit(f"{folder} has no tokenizer files and neither has {tok_dir}; pass --tokenizer with the teacher's "
                 f"model folder (run prepare.py to write models/smolllm2_135m)")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    rt = Runtime(DEVICE, DTYPE)
    try:
        model = load_model(folder, rt.device).eval()
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"{folder}: cannot load it as a model: {str(e).splitlines()[0]}")
    if len(tokenizer) > model.config.vocab_size:
        sys.exit(f"the tokenizer from {tok_dir} has {len(tokenizer)} ids but the model only {model.config.vocab_size}; "
                 f"pass the --tokenizer of the model this checkpoint was distilled from")
    prompt_ids = tokenizer(PROMPT)["input_ids"] or [tokenizer.bos_token_id or tokenizer.eos_token_id]
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and len(prompt_ids) + MAX_NEW_TOKENS > limit:
        sys.exit(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {MAX_NEW_TOKENS} exceeds the model's "
                 f"{limit} positions; shorten the prompt or lower --max-new-tokens")
    ids = torch.tensor([prompt_ids], device=rt.device)
    generator = torch.Generator(rt.device).manual_seed(SEED)
    t0 = time.perf_counter()
    with rt.autocast():
        out = generate(model, ids, MAX_NEW_TOKENS, TEMPERATURE, TOP_P, generator, tokenizer.eos_token_id)
    seconds = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    mode = "greedy" if TEMPERATURE == 0 else f"temperature {TEMPERATURE}, top-p {TOP_P}, seed {SEED}"
    print(PROMPT + tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
    print(f"\n[{folder}: {new} new tokens, {mode}, {new / seconds:.1f} tokens/s on {rt.device}]", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
