"""Every model family the README claims, on tiny random models built from transformers' own config classes
(tests/families.py), against transformers' own forward: the layer-by-layer stream the project computes, a copy
student, the CE of evaluation, distill.py end to end (pruned FFNs, linear attention, then the logits phase),
incremental generation and export."""

import os

import pytest
import torch
import torch.nn.functional as F

from common.checkpoint import load_model
from common.latent_cache import LatentCache
from common.quality import evaluate
from common.runtime import Runtime
from common.shards import val_batches
from common.students import make_student
from common.swap import LayerCalls, get_block, swapped, transformer_layers
from conftest import make_data_dir, make_tokenizer, run_distill
from families import FAMILIES, SEQ_LEN, family_model

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One prepared shard folder for every family (all share the tests' 320-id vocabulary)."""
    return make_data_dir(str(tmp_path_factory.mktemp("family_data")), train_tokens=12_000, val_tokens=2_000)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> a model folder (weights, config, tokenizer), written on first use."""
    made = {}

    def folder(family):
        if family not in made:
            path = str(tmp_path_factory.mktemp(family))
            family_model(family).save_pretrained(path)
            make_tokenizer(path)
            made[family] = path
        return made[family]

    return folder


def _hidden(args, kwargs):
    return (args[0] if args else kwargs["hidden_states"]).clone()


def reference_stream(model, ids, target):
    """What the model's own forward computes: each layer's input and each target block's input and output,
    taken with hooks on its own modules."""
    layer_in, block_io, handles = [], [], []

    def keep_input(module, args, kwargs):
        layer_in.append(_hidden(args, kwargs))

    def keep_block(module, args, kwargs, out):
        block_io.append((_hidden(args, kwargs), (out[0] if isinstance(out, tuple) else out).clone()))

    for i, layer in enumerate(transformer_layers(model)):
        handles.append(layer.register_forward_pre_hook(keep_input, with_kwargs=True))
        handles.append(get_block(model, i, target).register_forward_hook(keep_block, with_kwargs=True))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return layer_in, block_io


@pytest.mark.parametrize("family", FAMILIES)
def test_the_stream_is_what_the_models_own_forward_computes(family, tmp_path):
    """The latent cache (the rotation's O(L) stream) holds, at every layer, the residual the model's own forward
    feeds that layer, and the latent its target block sees; a block run on that latent as the layer calls it gives
    the block's output in the model's forward. Both targets, on the host and on disk."""
    model = family_model(family)
    ids = torch.randint(1, 320, (3, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    for target, where in (("mlp", "host"), ("attn", "disk")):
        layer_in, block_io = reference_stream(model, ids, target)
        calls = LayerCalls(model, target)
        cache = LatentCache(Runtime(), model, ids, calls, 2, where, str(tmp_path / f".latent_{target}"))
        for i in range(len(transformer_layers(model))):
            torch.testing.assert_close(cache.h, layer_in[i], rtol=0, atol=1e-5)
            cache.split()
            x, y = block_io[i]
            torch.testing.assert_close(cache.x, x, rtol=0, atol=1e-5)
            with torch.no_grad():
                out = torch.cat([cache.run_block(get_block(model, i, target), xb) for _, xb in cache.batches(cache.x)])
            torch.testing.assert_close(out, y, rtol=0, atol=1e-5)
            cache.finish()
        cache.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_forward_started_at_a_layer_from_its_input_is_the_models_own(family):
    """swap.starting_at: the model's forward run on from layer i's input residual (as the stream holds it) gives
    the final hidden states of the model's own whole forward, at every layer; and a student swapped in layer i
    is seen (DECODER_LOSS=kl's forward)."""
    from common.kd import final_hidden
    from common.swap import starting_at

    model = family_model(family)
    ids = torch.randint(1, 320, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    layer_in, _ = reference_stream(model, ids, "mlp")
    calls = LayerCalls(model, "mlp")
    with torch.no_grad():
        whole = final_hidden(model, ids)
        for i in range(len(transformer_layers(model))):
            with starting_at(calls, i, layer_in[i]):
                torch.testing.assert_close(final_hidden(model, ids), whole, rtol=0, atol=1e-5)
        last = len(layer_in) - 1
        student = make_student("mlp", "prototype", get_block(model, last, "mlp"), model.config)
        with swapped(model, {(last, "mlp"): student}):
            swapped_whole = final_hidden(model, ids)
            with starting_at(calls, last, layer_in[last]):
                torch.testing.assert_close(final_hidden(model, ids), swapped_whole, rtol=0, atol=1e-5)
    assert not torch.allclose(swapped_whole, whole)


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluation_ce_is_transformers_own_and_a_copy_student_is_exact(family, folders, data_dir):
    """common.quality's CE equals the cross-entropy of transformers' own logits (the model's logit transform
    included), and the teacher with a copy student in every FFN gives the teacher's CE exactly."""
    model = load_model(folders(family))
    val = val_batches(data_dir, 256, 2, SEQ_LEN)
    with torch.no_grad():
        theirs = sum(F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item() for x, y in val) / len(val)
    ours = evaluate(model, val)["ce"]
    assert abs(ours - theirs) < 1e-5 * max(1.0, theirs), (ours, theirs)
    copies = {(i, "mlp"): make_student("mlp", "copy", get_block(model, i, "mlp"), model.config) for i in range(2)}
    with swapped(model, copies):
        assert evaluate(model, val)["ce"] == ours


@pytest.mark.parametrize("family", FAMILIES)
def test_distill_pruned_and_linear_then_logits_then_evaluate_generate_export(family, folders, data_dir, tmp_path):
    """distill.py end to end on the family: pruned half-width FFNs (calibrated, a few steps), then the logits phase;
    linear attention in layer 0; the distilled checkpoints evaluate to transformers' own CE, generate incrementally
    as a full re-run does, and the pruned model exports to plain transformers with equal logits."""
    from transformers import AutoModelForCausalLM

    from common import export
    from common.config import override
    from common.generate import generate

    teacher = folders(family)
    tiny = ["--teacher", teacher, "--data-dir", data_dir, "--batch-size", "2", "--seq-len", str(SEQ_LEN)]
    tiny += ["--val-tokens", "128", "--calib-tokens", "256", "--steps-per-layer", "2", "--log-every", "1"]
    ffn, attn = str(tmp_path / "ffn"), str(tmp_path / "attn")
    run_distill(*tiny, "--out-dir", ffn, "--student-kind", "pruned", "--student-kwargs", '{"scale": 0.5}')
    run_distill(*tiny, "--out-dir", ffn, "--phase", "logits", "--kd-steps", "2", "--kd-val-every", "2")
    run_distill(*tiny, "--out-dir", attn, "--target", "attn", "--student-kind", "linear", "--layers", "0")
    val = val_batches(data_dir, 128, 2, SEQ_LEN)
    prompt = torch.randint(1, 320, (2, 5), generator=torch.Generator().manual_seed(1))
    for checkpoint in (os.path.join(ffn, "logits_final"), os.path.join(attn, "final")):
        model = load_model(checkpoint).eval()
        with torch.no_grad():
            theirs = sum(F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item() for x, y in val) / len(val)
            incremental = generate(model, prompt, 8, return_logits=True)
            rerun = generate(model, prompt, 8, rerun=True, return_logits=True)
        assert abs(evaluate(model, val)["ce"] - theirs) < 1e-5 * max(1.0, theirs)
        assert torch.equal(incremental[0], rerun[0])
        torch.testing.assert_close(incremental[1], rerun[1], rtol=1e-4, atol=1e-4)
    out = str(tmp_path / "exported")
    export.export(override(vars(export), ["--out", out, "--tokenizer", teacher]), os.path.join(ffn, "logits_final"))
    model = load_model(os.path.join(ffn, "logits_final")).eval()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(prompt).logits, model(prompt).logits, rtol=1e-5, atol=1e-5)
