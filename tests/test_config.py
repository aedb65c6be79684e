"""common/config.py: `--name value` / `--name=value` overrides of a script's UPPER_CASE constants, --help, fail()."""

import ast
import os
import re
import shlex
import subprocess
import sys

import pytest

from common.config import override
from conftest import ROOT


def constants():
    return {
        "__file__": "train.py",
        "STEPS_PER_LAYER": 100,
        "LR": 3e-4,
        "OUT_DIR": "runs/x",
        "RESUME": False,
        "LAYERS": [0, 1],
        "NAMES": ["mlp"],
        "STUDENT_KWARGS": {"scale": 1},
        "INIT_FROM": None,
        "lowercase": 1,
        "helper": print,
        "os": os,
    }


def test_both_spellings_set_the_same_constant():
    for argv in (["--steps-per-layer", "10"], ["--steps_per_layer=10"], ["--STEPS-PER-LAYER=10"]):
        assert override(constants(), argv).STEPS_PER_LAYER == 10


def test_values_take_the_type_of_the_default():
    c = constants()
    args = override(
        c,
        [
            "--lr",
            "1e-3",
            "--out-dir=runs/y",
            "--layers",
            "2,3,5",
            "--names",
            "mlp,attn",
            "--student-kwargs",
            '{"scale": 0.5, "rank": 8}',
            "--init-from",
            "runs/x/final",
        ],
    )
    assert args.LR == 1e-3 and isinstance(args.LR, float)
    assert args.OUT_DIR == "runs/y"
    assert args.LAYERS == [2, 3, 5] and args.NAMES == ["mlp", "attn"]
    assert args.STUDENT_KWARGS == {"scale": 0.5, "rank": 8}
    assert args.INIT_FROM == "runs/x/final"
    assert set(args.as_dict()) == {
        "STEPS_PER_LAYER",
        "LR",
        "OUT_DIR",
        "RESUME",
        "LAYERS",
        "NAMES",
        "STUDENT_KWARGS",
        "INIT_FROM",
    }  # not lowercase names, functions or modules
    assert override(constants(), ["--layers="]).LAYERS == []
    assert override(constants(), ["--lr", "2"]).LR == 2.0
    assert c == constants()  # the script's own constants keep their defaults


def test_settings_are_read_only():
    args = override(constants(), ["--lr", "2"])
    with pytest.raises(AttributeError, match="read-only: LR is set on the command line"):
        args.LR = 3.0
    record = args.as_dict()
    record["LAYERS"].append(7)  # a copy: what a run records cannot change what it reads
    assert args.LR == 2.0 and args.LAYERS == [0, 1]
    with pytest.raises(AttributeError, match="no setting LRR"):
        args.LRR


@pytest.mark.parametrize(
    "argv,want",
    [
        (["--resume"], True),
        (["--resume", "--lr", "1"], True),
        (["--resume", "false"], False),
        (["--resume=yes"], True),
        (["--resume=0"], False),
        ([], False),
    ],
)
def test_bools_alone_mean_true_and_accept_words(argv, want):
    assert override(constants(), argv).RESUME is want


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--stepz", "3"], "unknown option --stepz"),
        (["--steps-per-layer", "ten"], "--steps-per-layer wants a int, got 'ten'"),
        (["--layers", "0,x"], "--layers wants a comma-separated list of int"),
        (["--resume", "maybe"], "--resume wants true/false"),
        (["--student-kwargs", "{scale"], "--student-kwargs wants JSON"),
        (["--student-kwargs", "[1]"], "--student-kwargs wants a JSON object"),
        (["--lr"], "--lr needs a value"),
        (["10"], "unexpected argument '10'"),
    ],
)
def test_bad_overrides_exit_with_one_line(argv, message):
    with pytest.raises(SystemExit) as e:
        override(constants(), argv)
    text = str(e.value.code)
    assert text.startswith("train.py: ") and message in text and "\n" not in text
    if "unknown" in message:
        assert "--steps-per-layer" in text and "--student-kwargs" in text  # lists what is accepted


def source_constants(path):
    """[(NAME, value expression, comment, section above it or None)] of the run constants at the top of a script,
    read plainly: `NAME = value  # comment` lines, with `# section` lines (not `# fmt:`), up to the first other code."""
    found, section = [], None
    with open(path) as f:
        for line in f:
            constant = re.match(r"([A-Z][A-Z0-9_]*) += (.*?) +# (.*)$", line)
            if constant:
                found.append((*constant.groups(), section))
            elif found and line.strip() and not line.startswith("#"):
                break
            is_section = constant is None and line.startswith("# ") and "---" not in line and "fmt:" not in line
            section = line[2:].strip() if is_section else None
    return found


def run(args, cwd, **env):
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT, **env},
    )


@pytest.mark.parametrize(
    "script,usage",
    [
        ("distill.py", "python distill.py [--name value ...]"),
        ("train.py", "python train.py [--name value ...]"),
        ("prepare.py", "python prepare.py [--name value ...]"),
        ("common/evaluate.py", "python -m common.evaluate CHECKPOINT [CHECKPOINT ...] [--name value ...]"),
        ("common/export.py", "python -m common.export CHECKPOINT --out DIR [--name value ...]"),
        ("common/generate.py", 'python -m common.generate CHECKPOINT --prompt "..." [--name value ...]'),
    ],
)
def test_help_lists_every_constant_with_its_comment_and_default(script, usage, tmp_path):
    """--help exits 0 before doing anything (run where no model, data or network is: nothing is read or written)
    and prints each constant's option, its default (as typed on the command line) and its comment, in the source's
    order and sections."""
    path = os.path.join(ROOT, script)
    args = ["-m", script[:-3].replace("/", ".")] if script.startswith("common/") else [path]
    result = run(args + ["--steps", "3", "--help"], tmp_path, HF_HUB_OFFLINE="1")  # --help wins over the rest
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert not os.listdir(tmp_path)
    lines = result.stdout.splitlines()
    assert lines[0] == f"usage: {usage}"
    expected = []
    for name, value, comment, section in source_constants(path):
        option = "--" + name.lower().replace("_", "-")
        expected += ([f"{section}:"] if section else []) + [option]
        line = next(line for line in lines if line.startswith(f"  {option} "))
        assert line.endswith(f"  {comment}"), line
        (shown,) = shlex.split(line[len(option) + 2 : -len(comment)])
        default = eval(value, {"os": os})  # noqa: S307 (our own source)
        # the default as shown is the default: typed back as the option, it gives the same value
        assert getattr(override({"__file__": script, name: default}, [f"{option}={shown}"]), name) == default, line
    assert len(expected) >= 5
    listed = [line.split()[0] if line.startswith("  --") else line for line in lines[2:]]
    assert listed == expected  # every option, in order, and nothing else (no imported UPPER_CASE name)


def test_help_reads_comments_sections_and_continuations(tmp_path):
    (tmp_path / "tool.py").write_text(
        '"""A tool."""\n'
        "from common.config import override\n"
        "# ---------------------------------------- run constants\n"
        "STEPS = 10          # optimizer steps\n"
        "                    # (the comment goes on here)\n"
        'MARK = "a#b"        # a # in a string is no comment\n'
        "# data\n"
        "LAYERS = [0, 1, 2]  # layer indices\n"
        "KWARGS = {}\n"
        'OUT = ""            # run folder\n'
        "RESUME = False      # continue\n"
        "\n"
        "# not a section: a blank line follows\n"
        "\n"
        "RATE = 3e-4         # learning rate\n"
        "override(globals())\n"
    )
    for args, command in ((["tool.py"], "python tool.py"), (["-m", "tool"], "python -m tool")):
        result = run(args + ["-h"], tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            f"usage: {command} [--name value ...]",
            "Each constant below is set by --name value or --name=value (a list: 0,1,2; a dict: JSON; a bool alone: "
            "true). Defaults:",
            "  --steps   10      optimizer steps (the comment goes on here)",
            "  --mark    'a#b'   a # in a string is no comment",
            "data:",
            "  --layers  0,1,2   layer indices",
            "  --kwargs  '{}'",
            "  --out     ''      run folder",
            "  --resume  false   continue",
            "  --rate    0.0003  learning rate",
        ]


def test_fail_is_one_line_named_after_the_running_script(tmp_path):
    (tmp_path / "tool.py").write_text("from common.config import fail\nfail(ValueError('no such thing'))\n")
    for args in (["tool.py"], ["-m", "tool"]):  # python tool.py, python -m tool: sys.argv[0] ends in tool.py
        result = run(args, tmp_path)
        assert result.returncode == 1 and result.stdout == "" and result.stderr == "tool.py: no such thing\n"
    result = run([os.path.join(ROOT, "prepare.py"), "--model-dirr", "x"], tmp_path)  # override's bad input
    assert result.returncode == 1 and result.stderr.startswith("prepare.py: unknown option --model-dirr; known: ")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "script,some",
    [
        ("distill.py", {"BATCH_SIZE", "STEPS_PER_LAYER", "KD_LR"}),
        ("common/evaluate.py", {"TEACHER", "SPEED", "OUT"}),
        ("common/export.py", {"OUT", "PAD_TO_WIDEST"}),
        ("common/generate.py", {"PROMPT", "TOP_P"}),
    ],
)
def test_no_function_reads_its_module_constants(script, some):
    """The functions of distill.py and of the python -m common.* tools read the run's settings (args, or the values
    passed to them) alone: a module constant read inside a function would be the default, whatever the command line
    said."""
    with open(os.path.join(ROOT, script)) as f:
        tree = ast.parse(f.read())
    names = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    constants = {n for n in names if n.isupper() and not n.startswith("_")}  # the settings override() resolves
    assert some <= constants
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    reads = {
        (f.name, x.id)
        for f in functions
        for x in ast.walk(f)
        if isinstance(x, ast.Name) and isinstance(x.ctx, ast.Load) and x.id in constants
    }
    assert len(functions) >= 10 and reads == set()
