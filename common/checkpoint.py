"""Checkpoint folders, written by train.py and distill.py and read by every script.

A checkpoint folder holds:
  config.json        the teacher's (backbone's) Hugging Face config
  model.safetensors  every weight: backbone plus student blocks; or, with teacher.json, the students' alone
  students.json      [{layer, target, kind, kwargs}] for each swapped-in student (may be empty)
  teacher.json       only in a checkpoint of the students alone: {path, sha256} of the teacher they go on,
                     whose weights load_model checks are unchanged (distill.py's per-layer and step checkpoints)
  meta.json          what wrote it: script, phase, step, rotation, layer, run id
  state.pt           training state (optimizer, step, data position, RNG), tensors and plain types only
A Hugging Face model folder (no students.json) loads too. Folders are written to a temp name
and renamed (common.files.folder_written_whole), so a folder with its final name is always complete.
The run folders that hold checkpoints are common/run_folder.py's.
"""

import contextlib
import hashlib
import os
import pickle
import shutil
from collections.abc import Iterator
from types import SimpleNamespace

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_file as save_safetensors_file
from safetensors.torch import save_model as save_safetensors_model
from transformers import PreTrainedConfig

from common.files import folder_written_whole, read_json, write_json_atomic
from common.kd import check_head
from common.parallel import load_optimizer_state, optimizer_state
from common.runtime import get_rng_state, set_rng_state
from common.shards import TokenLoader
from common.students import STUDENTS, make_student
from common.swap import (
    block_path,
    check_layers,
    check_target,
    get_block,
    set_block,
    student_specs,
    transformer_layers,
)

TEACHER_REF = "teacher.json"  # in a checkpoint that holds only its students: the teacher's folder and weights' hash


def load_model(
    folder: str, device: str | torch.device = "cpu", trust_remote_code: bool = False, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A ready model from a checkpoint folder or a Hugging Face model folder, students in place, with the
    attention implementation transformers picks for its family (SDPA where it can, eager where the family needs it).
    Its weights are in `dtype`: fp32 by default, bf16 for a frozen model on GPUs (Runtime.frozen_dtype).
    Raises ValueError, one line, for a folder that would load wrong: weights that do not fit its config, a
    students.json that does not fit the model, code it would have to run, a model that is not a decoder-only causal
    LM, or one whose logits common/kd.py cannot reproduce."""
    from transformers import AutoModelForCausalLM

    config = read_config(folder, trust_remote_code)
    check_weights(folder)
    students_path = os.path.join(folder, "students.json")
    weights = os.path.join(folder, "model.safetensors")
    if os.path.exists(os.path.join(folder, TEACHER_REF)):  # the students alone, on the teacher they came from
        model = load_model(checked_teacher(folder), trust_remote_code=trust_remote_code, dtype=dtype)
        add_students(model, students_path)
        load_students_only(model, weights)
    elif not os.path.exists(students_path):
        with transformers_loading(folder):
            model, loading = AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
        check_loaded(folder, loading)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        add_students(model, students_path)
        load_whole(model, weights)
    model = model.to(device)
    transformer_layers(model)
    check_head(model)
    return model


def read_config(folder: str, trust_remote_code: bool = False) -> PreTrainedConfig:
    """The config of a model or checkpoint folder, checked (it is there, parses, runs no shipped code, and is a
    decoder-only causal LM's); else FileNotFoundError or ValueError, one line."""
    from transformers import AutoConfig

    check_has_config(folder)
    check_config(folder, trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    check_decoder_only(config, folder, trust_remote_code)
    return config


def check_has_config(folder: str) -> None:
    """Raise FileNotFoundError, one line, unless the folder holds a config.json: without one it is no model or
    checkpoint folder (what every script checks of the folders it is given before it loads anything)."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"{folder}: no config.json, so not a model or checkpoint folder; "
            f"run prepare.py to fetch the model, or point to a checkpoint folder (OUT/final)"
        )


def built_with(spec: dict) -> dict:
    """The arguments a student of students.json ({layer, target, kind, kwargs}) was built with. A checkpoint records
    every argument, so one without an argument predates it: its kind's ADDED_KWARGS give the value from before."""
    return {**getattr(STUDENTS.get((spec["target"], spec["kind"])), "ADDED_KWARGS", {}), **spec["kwargs"]}


def add_students(model: nn.Module, students_path: str) -> None:
    """Swap a new student of each spec of students.json ({layer, target, kind, kwargs}) into the model, in the
    model's dtype, built as it was (built_with)."""
    for s in read_student_specs(students_path, model):
        teacher = get_block(model, s["layer"], s["target"])
        try:
            student = make_student(s["target"], s["kind"], teacher, model.config, **built_with(s)).to(model.dtype)
        except ValueError as e:
            raise ValueError(
                f"{students_path}: layer {s['layer']}: {e}; this code does not build that student: load the "
                f"checkpoint with the code that wrote it"
            ) from None
        set_block(model, s["layer"], s["target"], student)


def load_whole(model: nn.Module, weights: str) -> None:
    """Load every weight of a complete checkpoint (strict); ValueError in one line when they do not fit."""
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights}: missing; the checkpoint is incomplete, use another one")
    try:
        load_safetensors_model(model, weights, strict=True)
    except RuntimeError as e:  # torch's load_state_dict: a paragraph listing every tensor that does not fit
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ValueError(
            f"{weights}: its tensors do not fit the model students.json describes ({detail[:300]}); "
            f"the checkpoint is damaged: use another one"
        ) from None


def student_weights(model: nn.Module, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state_dict entries of the model's students (what a checkpoint on its teacher holds), from `weights` when
    given (the model's state dict gathered from its shards)."""
    prefixes = tuple(f"{block_path(model, s['layer'], s['target'])}." for s in student_specs(model))
    return {k: v for k, v in (model.state_dict() if weights is None else weights).items() if k.startswith(prefixes)}


def load_students_only(model: nn.Module, weights: str, whole_file: bool = True) -> None:
    """Load a checkpoint's students' weights (and nothing else) into a model that holds those students, reading
    their tensors alone. `whole_file`: the file holds those tensors and no others (a checkpoint of the students
    alone); else it may hold more (a complete checkpoint, read for its students)."""
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights}: missing; the checkpoint is incomplete, use another one")
    expected = set(student_weights(model))
    with safe_open(weights, "pt") as f:
        held = set(f.keys())
        if whole_file and held != expected:
            raise ValueError(
                f"{weights}: holds {len(held)} tensors where its students have {len(expected)} (e.g. "
                f"{sorted(held ^ expected)[0]}); the checkpoint is damaged, use another one"
            )
        if not expected <= held:
            missing = sorted(expected - held)[0]
            raise ValueError(f"{weights}: {missing} is missing; the checkpoint is damaged, use another one")
        model.load_state_dict({k: f.get_tensor(k) for k in expected}, strict=False)


def load_swapped_students(model: nn.Module, folder: str) -> None:
    """Resume: load the weights of the students swapped into `model` from a checkpoint folder (complete, or students
    alone on a teacher, which is checked), reading their tensors alone: never a second copy of the teacher."""
    if os.path.exists(os.path.join(folder, TEACHER_REF)):
        checked_teacher(folder)
    check_weights(folder)
    load_students_only(model, os.path.join(folder, "model.safetensors"), whole_file=False)


def weights_hash(folder: str) -> str:
    """sha256 over a model folder's config.json, students.json (if any) and safetensors files: what its weights are."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors") or name in ("config.json", "students.json"):
            digest.update(name.encode())
            with open(os.path.join(folder, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def teacher_ref(folder: str) -> dict:
    """What a checkpoint that holds only its students records of its teacher: the folder and its weights' hash."""
    return {"path": os.path.realpath(folder), "sha256": weights_hash(folder)}


def checked_teacher(checkpoint: str) -> str:
    """The teacher folder a students-only checkpoint was written on, once its weights are found unchanged; else
    ValueError in one line."""
    ref = read_json(os.path.join(checkpoint, TEACHER_REF), "the checkpoint is damaged; use another one")
    advice = "put that teacher back, or use the run's final/ checkpoint (it holds every weight)"
    if not os.path.isfile(os.path.join(ref["path"], "config.json")):
        raise ValueError(f"{checkpoint}: holds only its students, and its teacher {ref['path']} is missing; {advice}")
    if weights_hash(ref["path"]) != ref["sha256"]:
        raise ValueError(
            f"{checkpoint}: holds only its students, and its teacher {ref['path']} has changed since (its weights' "
            f"sha256 differs); {advice}"
        )
    return ref["path"]


def check_decoder_only(config: PreTrainedConfig, folder: str, remote_code: bool = False) -> None:
    """Raise ValueError in one line unless the config is that of a decoder-only model with a causal LM head (a
    model with remote code brings its own classes, which transformers' mapping does not list)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{folder}: {config.model_type} is an encoder-decoder model; this repo distills decoder-only causal LMs"
        )
    if not remote_code and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"{folder}: {config.model_type} has no causal LM head in transformers (no AutoModelForCausalLM class); "
            f"this repo distills decoder-only causal LMs"
        )


def check_config(folder: str, trust_remote_code: bool = False) -> None:
    """Raise ValueError, one line, for a config.json that does not parse, or that needs code shipped with the model
    (an auto_map for a model type transformers does not have) while trust_remote_code is off."""
    from transformers import CONFIG_MAPPING

    path = os.path.join(folder, "config.json")
    config = read_json(path, "copy the model folder again")
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object, so not a model's config; copy the model folder again")
    model_type = config.get("model_type")
    if not trust_remote_code and "auto_map" in config and model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"{folder}: config.json asks to run Python code shipped in the model folder (auto_map) for model type "
            f"{model_type!r}, which transformers does not have; that code could do anything with your permissions, "
            f"so this repo never runs it (no script has a flag for trust_remote_code): use a model of a type "
            f"transformers ships, such as llama, mistral or qwen2"
        )


@contextlib.contextmanager
def transformers_loading(folder: str) -> Iterator[None]:
    """Around from_pretrained: its multi-line load report is silenced (check_loaded says what matters in one line),
    and pickled weights it refuses to unpickle (they could run code) are one line."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    except pickle.UnpicklingError:
        raise ValueError(
            f"{folder}: its pickled weights (*.bin) hold Python objects besides tensors, and unpickling those could "
            f"run any code, so they are refused; where you trust their source, load them once with "
            f"torch.load(weights_only=False) and save the model as safetensors (save_pretrained)"
        ) from None
    finally:
        transformers_logging.set_verbosity(verbosity)


def check_loaded(folder: str, loading: dict) -> None:
    """Raise ValueError naming a few tensors when from_pretrained's loading info (output_loading_info=True) says
    the weights do not fit the config: tensors missing from the weights (those tied to another, as the config says,
    are not counted: transformers ties them), tensors the model does not have, or of another shape. Loaded anyway,
    such a model is partly random and would train, teach or score without a word."""
    problems = [
        f"{len(names)} {what} ({', '.join(sorted(names)[:3])}{', ...' if len(names) > 3 else ''})"
        for what, names in (
            ("missing from the weights", loading["missing_keys"]),
            ("in the weights but not in the model", loading["unexpected_keys"]),
            ("of another shape", [name for name, *_ in loading["mismatched_keys"]]),
        )
        if names
    ]
    if problems:
        raise ValueError(
            f"{folder}: its weights do not fit its config.json, tensors {'; '.join(problems)}; loaded so, the model "
            f"would be partly random: copy the complete model folder again, or put back the config.json of these "
            f"weights"
        )


def read_student_specs(path: str, model: nn.Module) -> list[dict]:
    """students.json: [{layer, target, kind, kwargs}], checked to fit the model; else ValueError naming the file."""
    specs = read_json(path, "the checkpoint is damaged; use another one")
    keys = {"layer": int, "target": str, "kind": str, "kwargs": dict}
    try:
        if not isinstance(specs, list) or not all(
            isinstance(s, dict) and all(isinstance(s.get(k), t) for k, t in keys.items()) for s in specs
        ):
            raise ValueError("it is not a list of {layer, target, kind, kwargs}")
        for s in specs:
            check_target(model, s["target"])
            check_layers(model, [s["layer"]], "a student's layer")
    except ValueError as e:
        raise ValueError(f"{path}: {e}; the checkpoint is damaged: use another one") from None
    return specs


def check_weights(folder: str) -> None:
    """Raise ValueError naming a safetensors file of the folder that is truncated or not safetensors at all.
    Reads only each file's header: it must describe tensors that exactly fill the file."""
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            path = os.path.join(folder, name)
            try:
                with safe_open(path, "pt"):
                    pass
            except (SafetensorError, OSError) as e:
                raise ValueError(
                    f"{path}: not a complete safetensors file ({str(e).splitlines()[0]}); "
                    f"it was cut short or damaged: copy it again, or use another checkpoint"
                ) from None


def load_state(folder: str) -> dict:
    """The training state saved with a checkpoint (weights_only: tensors and plain types)."""
    path = os.path.join(folder, "state.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: no training state in this checkpoint; it can initialise a run but not resume one"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged zip or pickle surfaces as any of several types, with paragraphs of advice
        raise ValueError(
            f"{path}: unreadable training state ({type(e).__name__}: {str(e).split('. ')[0]}); "
            f"delete {folder} to resume from the checkpoint before it"
        ) from None


def restore_training(
    state: dict, loader: TokenLoader, optimizer: torch.optim.Optimizer | None = None, model: nn.Module | None = None
) -> int:
    """Continue where a checkpoint's state.pt left off: the data position, the RNG and, when given, the optimizer's
    moments (`model`: the sharded model it steps, under FSDP). Returns the step it was saved at (the LR schedule is
    a pure function of the step)."""
    loader.load_state(state["loader"])
    set_rng_state(state["rng"])
    if optimizer is not None:
        load_optimizer_state(optimizer, state["optimizer"], model)
    return state["step"]


def training_state(
    step: int, optimizer: torch.optim.Optimizer, loader: TokenLoader, model: nn.Module | None = None
) -> dict:
    """What a checkpoint's state.pt holds to resume exactly: the step, the optimizer's moments, the data position
    and the RNG (restore_training puts them back). `model`: the sharded model the optimizer steps, under FSDP,
    whose optimizer state is gathered whole (a collective: every rank calls this)."""
    return {
        "step": step,
        "optimizer": optimizer_state(optimizer, model),
        "loader": loader.state(),
        "rng": get_rng_state(),
    }


def save_checkpoint(
    folder: str,
    model: nn.Module,
    meta: dict,
    state: dict | None = None,
    keep_tokenizer_from: str | None = None,
    teacher: dict | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint folder atomically (folder_written_whole); replaces one of the same name. With
    `teacher` (teacher_ref(TEACHER_FOLDER)), it holds only the students' weights and that reference: a layer's
    checkpoint costs the students' bytes, not the model's. `weights`: the whole state dict to take them from instead
    of the model's own (a sharded model's, gathered: common.parallel.full_state_dict)."""
    with folder_written_whole(folder) as tmp:
        model.config.save_pretrained(tmp)
        if teacher is None:  # save_model asks its model for state_dict() alone, and writes shared tensors once
            holder = model if weights is None else SimpleNamespace(state_dict=lambda: weights)
            save_safetensors_model(holder, os.path.join(tmp, "model.safetensors"))
        else:
            tensors = {k: v.detach().contiguous() for k, v in student_weights(model, weights).items()}
            save_safetensors_file(tensors, os.path.join(tmp, "model.safetensors"))
            write_json_atomic(os.path.join(tmp, TEACHER_REF), teacher)
        write_json_atomic(os.path.join(tmp, "students.json"), student_specs(model))
        write_json_atomic(os.path.join(tmp, "meta.json"), meta)
        if state is not None:
            torch.save(state, os.path.join(tmp, "state.pt"))
        if keep_tokenizer_from:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                src = os.path.join(keep_tokenizer_from, name)
                if os.path.exists(src):
                    shutil.copy(src, tmp)


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def run_record(checkpoint: str) -> dict:
    """The run.json of the run folder that holds `checkpoint` (its parent folder): run id, script and the config
    it started with; {} for a folder that is in no run (a Hugging Face model folder), or whose run.json does not
    parse (it only informs: what it would have said is then unknown)."""
    path = os.path.join(os.path.dirname(os.path.realpath(checkpoint)), "run.json")
    try:
        run = read_json(path, "") if os.path.isfile(path) else {}
    except ValueError:
        return {}
    return run if isinstance(run, dict) else {}


def tokenizer_folder(checkpoint: str, fallback: str = "") -> str | None:
    """The folder to take a checkpoint's tokenizer and generation config from: the checkpoint when it has tokenizer
    files, else the model its run started from as run.json records it (distill.py's TEACHER, train.py's INIT; in
    turn a checkpoint of another run, perhaps), else `fallback`; None when none of them has tokenizer files."""
    seen = set()
    folder = checkpoint
    while folder and folder not in seen:
        if has_tokenizer(folder):
            return folder
        seen.add(folder)
        config = run_record(folder).get("config", {})
        folder = config.get("TEACHER") or config.get("INIT")
    return fallback if fallback and has_tokenizer(fallback) else None
