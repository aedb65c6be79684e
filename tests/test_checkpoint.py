"""common/checkpoint.py's load_model on Hugging Face folders that would load wrong: weights that do not fit the
config (missing, unexpected, another shape), pickled weights that could run code, code the config asks to run. Each
is one line (ValueError); a model whose config ties its head to its embeddings still loads."""

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.checkpoint import load_model


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A copy of the tiny model folder (its config ties lm_head to the embeddings, so the weights hold no lm_head)."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def one_line_error(folder):
    with pytest.raises(ValueError) as e:
        load_model(str(folder))
    message = str(e.value)
    assert "\n" not in message, message
    return message


def test_weights_that_do_not_fit_the_config_are_refused(model_copy):
    weights = load_file(model_copy / "model.safetensors")
    assert "lm_head.weight" not in weights  # tied, as the config says: loads
    load_model(str(model_copy))

    kept = dict(list(weights.items())[:3])  # most tensors gone: they would be random
    save_file(kept, model_copy / "model.safetensors", metadata={"format": "pt"})
    message = one_line_error(model_copy)
    assert f"{model_copy}: its weights do not fit its config.json, tensors 26 missing from the weights (" in message

    save_file({**weights, "model.extra.weight": torch.zeros(3)}, model_copy / "model.safetensors")
    assert "1 in the weights but not in the model (model.extra.weight)" in one_line_error(model_copy)

    weights["model.norm.weight"] = torch.ones(5)
    save_file(weights, model_copy / "model.safetensors", metadata={"format": "pt"})
    assert "1 of another shape (model.norm.weight)" in one_line_error(model_copy)


def test_a_config_of_another_architecture_is_refused(model_copy):
    """A GPT-2 config.json over Llama weights gave a fully random model."""
    from transformers import GPT2Config

    GPT2Config(vocab_size=320, n_embd=64, n_layer=3, n_head=4).save_pretrained(model_copy)
    message = one_line_error(model_copy)
    assert "missing from the weights (lm_head.weight, transformer.h.0.attn.c_attn.bias, " in message
    assert "29 in the weights but not in the model (model.embed_tokens.weight, " in message


def test_pickled_weights_with_objects_are_one_line(model_copy):
    weights = load_file(model_copy / "model.safetensors")
    (model_copy / "model.safetensors").unlink()
    torch.save({**weights, "extra": argparse.Namespace(x=1)}, model_copy / "pytorch_model.bin")
    message = one_line_error(model_copy)
    assert "pickled weights (*.bin) hold Python objects besides tensors" in message and "safetensors" in message


def test_code_shipped_with_a_model_is_refused_in_one_line(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (model_copy / "config.json").write_text(json.dumps({**config, "model_type": "x_model", "auto_map": auto_map}))
    message = one_line_error(model_copy)
    assert "asks to run Python code shipped in the model folder (auto_map) for model type 'x_model'" in message
    assert "could do anything with your permissions" in message and "trust_remote_code" in message
    # with a model type transformers has, the auto_map is not needed and not used
    (model_copy / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    load_model(str(model_copy))
