"""Checkpoint folders and run folders, shared by train.py, distill.py and evaluation.

A checkpoint folder holds:
  config.json        the teacher's (backbone's) Hugging Face config
  model.safetensors  every weight: backbone plus student blocks
  students.json      [{layer, target, kind, kwargs}] for each swapped-in student (may be empty)
  meta.json          what wrote it: script, phase, step, rotation, layer, run id
  state.pt           training state (optimizer, step, data position, RNG), tensors and plain types only
A Hugging Face model folder (no students.json) loads too. Folders are written to a temp name
and renamed, so a folder with its final name is always complete.
"""
import json
import os
import shutil
import sys
import uuid

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from common.decoders import decoder_layers, get_block, make_student, set_block, student_specs
from common.shards import read_json, write_json_atomic


def load_model(folder, device="cpu", trust_remote_code=False):
    """A ready fp32 model from a checkpoint folder or a Hugging Face model folder, students in place."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder}: no config.json, so not a model or checkpoint folder; "
                                f"run prepare.py to fetch the model, or point to a checkpoint folder (OUT/final)")
    check_weights(folder)
    students_path = os.path.join(folder, "students.json")
    if not os.path.exists(students_path):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa",
                                                     trust_remote_code=trust_remote_code)
        return model.to(device)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa",
                                             trust_remote_code=trust_remote_code)
    decoder_layers(model)
    specs = read_json(students_path, "the checkpoint is damaged; use another one")
    for s in specs:
        teacher = get_block(model, s["layer"], s["target"])
        set_block(model, s["layer"], s["target"], make_student(s["target"], s["kind"], teacher, config, **s["kwargs"]))
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights}: missing; the checkpoint is incomplete, use another one")
    load_safetensors_model(model, weights, strict=True)
    return model.to(device)


def check_weights(folder):
    """Raise ValueError naming a safetensors file of the folder that is truncated or not safetensors at all.
    Reads only each file's header: it must describe tensors that exactly fill the file."""
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            path = os.path.join(folder, name)
            try:
                with safe_open(path, "pt"):
                    pass
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{path}: not a complete safetensors file ({str(e).splitlines()[0]}); "
                                 f"it was cut short or damaged: copy it again, or use another checkpoint") from None


def load_state(folder):
    """The training state saved with a checkpoint (weights_only: tensors and plain types)."""
    path = os.path.join(folder, "state.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no training state in this checkpoint; it can initialise a run but not resume one")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged zip or pickle surfaces as any of several types
        raise ValueError(f"{path}: unreadable training state ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"delete {folder} to resume from the checkpoint before it") from None


def save_checkpoint(folder, model, meta, state=None, keep_tokenizer_from=None):
    """Write a checkpoint folder atomically (temp folder, then rename); replaces one of the same name."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp_{os.path.basename(folder)}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        model.config.save_pretrained(tmp)
        save_safetensors_model(model, os.path.join(tmp, "model.safetensors"))
        write_json_atomic(os.path.join(tmp, "students.json"), student_specs(model))
        write_json_atomic(os.path.join(tmp, "meta.json"), meta)
        if state is not None:
            torch.save(state, os.path.join(tmp, "state.pt"))
        if keep_tokenizer_from:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                src = os.path.join(keep_tokenizer_from, name)
                if os.path.exists(src):
                    shutil.copy(src, tmp)
        old = None
        if os.path.exists(folder):
            old = os.path.join(parent, f".old_{os.path.basename(folder)}_{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def start_run(out_dir, resume, script, config):
    """Create or reopen a run folder. A new run refuses a folder that already holds files; --resume
    refuses a folder written by another script. Returns the run id."""
    run_file = os.path.join(out_dir, "run.json")
    if resume:
        if not os.path.exists(run_file):
            sys.exit(f"{out_dir}: no run.json, so there is no run to resume here; drop --resume to start a new run")
        with open(run_file) as f:
            run = json.load(f)
        if run.get("script") != script:
            sys.exit(f"{out_dir}: this run was written by {run.get('script')}, not {script}; "
                     f"resume it with that script or choose another --out-dir")
        return run["run_id"]
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        sys.exit(f"{out_dir}: already holds files of another run; pass --resume to continue it, "
                 f"or choose a new --out-dir")
    os.makedirs(out_dir, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    write_json_atomic(run_file, {"run_id": run_id, "script": script, "config": config})
    return run_id


def list_checkpoints(out_dir, phase=None, damaged=None):
    """Complete checkpoint folders of a run, oldest first by their recorded step. A folder whose meta.json cannot
    be read is left out (and appended to the list `damaged`, when given)."""
    found = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        path = os.path.join(out_dir, name)
        if name.startswith(".") or not os.path.isfile(os.path.join(path, "meta.json")):
            continue
        try:
            meta = read_json(os.path.join(path, "meta.json"), "damaged")
            step = int(meta["step"])
        except (ValueError, TypeError, KeyError):
            if damaged is not None:
                damaged.append(path)
            continue
        if phase is None or meta.get("phase") == phase:
            found.append((step, path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir, phase=None):
    """The newest complete checkpoint of the phase, passing over (and naming on stderr) damaged ones."""
    damaged = []
    found = list_checkpoints(out_dir, phase, damaged)
    for path in damaged:
        print(f"{path}: unreadable meta.json, so this checkpoint is passed over (delete it); "
              f"using the newest good one", file=sys.stderr)
    return found[-1] if found else None
