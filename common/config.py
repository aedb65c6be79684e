"""Command-line overrides for the run constants at the top of a script.

Every UPPER_CASE constant of the calling script can be set from the command line:
`--steps-per-layer 10` and `--steps_per_layer=10` both set STEPS_PER_LAYER. The value is
parsed to the constant's type: int, float, str, bool (`--resume` alone means true),
list (`0,1,2`; empty string for an empty list) or dict (JSON). An unknown name or a
value of the wrong type is a one-line error that lists what would have been accepted.
`--help` (or `-h`) prints every constant with its default and the comment on its line in the
script's source (`NAME = value  # comment`), then exits. The resolved values come back as one read-only Settings
(`args.LR`); the script's constants themselves stay the defaults its source and --help show. `check_ranges` refuses
a constant outside its range in one line. How a run ends is one line too: `fail()` for a mistake,
`exit_when_disk_full` for a full disk and `exit_on_stop_signals` for Ctrl-C and SIGTERM.
"""

import contextlib
import copy
import errno
import json
import math
import os
import re
import shlex
import signal
import sys
import tokenize
from collections.abc import Iterable, Iterator
from typing import NoReturn

HELP = ("--help", "-h")


def fail(message: object, script: str | None = None) -> NoReturn:
    """End the program with one line, `script.py: message` (no traceback), exit status 1. `script`: by
    default the running script's file name, sys.argv[0] (distill.py under python and torchrun, evaluate.py
    under python -m common.evaluate)."""
    sys.exit(f"{script or os.path.basename(sys.argv[0])}: {message}")


class Settings:
    """A script's constants as one run resolved them, read-only: `args.STEPS_PER_LAYER`. `as_dict()` is a copy of
    {NAME: value}, for the run's records."""

    def __init__(self, values: dict):
        object.__setattr__(self, "_values", copy.deepcopy(values))

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no setting {name}") from None

    def __setattr__(self, name, value):
        raise AttributeError(f"settings are read-only: {name} is set on the command line (--{name.lower()})")

    def __repr__(self):
        return f"Settings({self._values!r})"

    def as_dict(self) -> dict:
        return copy.deepcopy(self._values)


def check_ranges(
    constants: dict,
    choices: dict[str, tuple] | None = None,
    at_least: dict[str, int] | None = None,
    notes: dict[str, str] | None = None,
    positive: Iterable[str] = (),
    fractions: Iterable[str] = (),
) -> None:
    """fail() naming the first of a script's constants (its globals()) outside its range: `choices` {NAME: the allowed
    values}, `at_least` {NAME: its lowest value} (`notes` {NAME: what that lowest value means}), `positive` (> 0) and
    `fractions` (in [0, 1]). A number must be finite: nan and inf are outside every range."""
    for name, allowed in (choices or {}).items():
        if constants[name] not in allowed:
            fail(f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {constants[name]!r}")
    for name, low in (at_least or {}).items():
        if not (math.isfinite(constants[name]) and constants[name] >= low):
            fail(f"{name} must be >= {low}{(notes or {}).get(name, '')}, got {constants[name]}")
    for name in positive:
        if not (math.isfinite(constants[name]) and constants[name] > 0):
            fail(f"{name} must be > 0, got {constants[name]}")
    for name in fractions:
        if not 0 <= constants[name] <= 1:
            fail(f"{name} must be in [0, 1], got {constants[name]}")


def disk_full(error: BaseException) -> bool:
    """Whether an exception is a write that failed for want of disk space: ENOSPC, which torch.save reports as
    'unexpected pos N vs M', safetensors as 'os error 28', and Runtime.master_only passes on as its text."""
    text = str(error)
    return getattr(error, "errno", None) == errno.ENOSPC or any(
        sign in text for sign in ("unexpected pos", "os error 28", f"[Errno {errno.ENOSPC}]")
    )


def _resume(out_dir):
    return f"the same command with --resume --out-dir {out_dir} continues from its latest checkpoint"


@contextlib.contextmanager
def exit_when_disk_full(folder: str, then: str | None = None) -> Iterator[None]:
    """A full disk inside the block ends the program with one line naming `folder` and saying what continues the
    work once space is freed (`then`; by default --resume of the run in `folder`). Every write is atomic (temp file,
    then rename), so nothing half-written is kept or trusted."""
    try:
        yield
    except Exception as e:
        if not disk_full(e):
            raise
        fail(
            f"the disk holding {folder} is full ({str(e).splitlines()[0]}); nothing half-written is kept: free some "
            f"space, then {then or _resume(folder)}"
        )


def exit_on_stop_signals(out_dir: str) -> None:
    """From now on Ctrl-C (SIGINT) and SIGTERM (what schedulers send) end the program with one line saying where to
    resume from, and exit status 128 + the signal's number (130, 143), as a shell reports it; no traceback. The exit
    unwinds as an exception does, so a write in progress removes its temp file. Under torchrun rank 0 alone says it."""
    script = os.path.basename(sys.argv[0])

    def stop(signum, frame):
        if os.environ.get("RANK", "0") == "0":
            name = signal.Signals(signum).name
            made = os.path.isfile(os.path.join(out_dir, "run.json"))
            where = _resume(out_dir) if made else f"nothing was written (the run folder {out_dir} was not made yet)"
            print(f"\n{script}: stopped by {name}; {where}", file=sys.stderr, flush=True)  # off a progress bar's line
        sys.exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)


def _parse(name, default, text):
    if isinstance(default, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} wants true/false, got {text!r}")
    if isinstance(default, (int, float, str)):
        try:
            return type(default)(text)
        except ValueError:
            raise ValueError(f"--{name} wants a {type(default).__name__}, got {text!r}") from None
    if isinstance(default, list):
        items = [t.strip() for t in text.split(",") if t.strip()]
        kind = type(default[0]) if default else None
        out = []
        for t in items:
            try:
                out.append(kind(t) if kind else int(t))
            except ValueError:
                if kind in (int, float):
                    raise ValueError(
                        f"--{name} wants a comma-separated list of {kind.__name__}, got {text!r}"
                    ) from None
                out.append(t)
        return out
    if isinstance(default, dict) or default is None:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            if default is None:
                return text
            raise ValueError(f"--{name} wants JSON like '{{\"scale\": 2}}', got {text!r} ({e.msg})") from None
        if isinstance(default, dict) and not isinstance(value, dict):
            raise ValueError(f"--{name} wants a JSON object, got {text!r}")
        return value
    raise ValueError(f"--{name}: constants of type {type(default).__name__} cannot be set from the command line")


def _documentation(path):
    """From a script's source: {NAME: comment} of its top-level `NAME = value  # comment` lines (a comment
    continues on indented comment-only lines below), {NAME: section} where a comment-only line at column 0
    (`# layer-wise phase`, not a `# ----` divider or `# fmt:` line) sits right above a NAME line, and {NAME: its line}."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.readlines()
        comments = {
            t.start[0]: t.string.lstrip("#").strip()
            for t in tokenize.generate_tokens(iter(source).__next__)
            if t.type == tokenize.COMMENT
        }  # tokenize: a '#' inside a string is no comment
    except (OSError, SyntaxError, tokenize.TokenError):
        return {}, {}, {}
    docs, sections, lines, name = {}, {}, {}, None
    for number, line in enumerate(source, 1):
        constant = re.match(r"([A-Z][A-Z0-9_]*)\s*=(?!=)", line)
        if constant and constant[1] not in lines:
            name = constant[1]
            docs[name], lines[name] = comments.get(number, ""), number
            above = source[number - 2] if number > 1 else ""
            if above.startswith("#") and not above.startswith(("# -", "# fmt:")):
                sections[name] = comments.get(number - 1, "")
        elif not (name and line[:1].isspace() and line.lstrip().startswith("#")):
            name = None
        else:  # an indented comment-only line continues the comment above
            docs[name] = f"{docs[name]} {comments.get(number, '')}".strip()
    return docs, sections, lines


def _option(name):
    """The command-line option of a constant: STEPS_PER_LAYER -> --steps-per-layer."""
    return "--" + name.lower().replace("_", "-")


def _typed(value):
    """A default as it would be typed on the command line."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, list):
        text = ",".join(str(v) for v in value)
    elif isinstance(value, dict) or value is None:
        text = json.dumps(value)
    else:
        text = str(value)
    return shlex.quote(text)


def _help(constants, names, usage=None):
    """The --help text: a usage line, then a line per constant, in the order and sections of the source."""
    path = constants.get("__file__") or ""
    comments, sections, lines = _documentation(path)
    module = getattr(constants.get("__spec__"), "name", None)  # set under python -m
    command = f"python -m {module}" if module else f"python {os.path.basename(path)}"
    out = [
        f"usage: {usage or command + ' [--name value ...]'}",
        "Each constant below is set by --name value or --name=value (a list: 0,1,2; a dict: JSON; a bool alone: "
        "true). Defaults:",
    ]
    names = sorted(names, key=lambda n: (lines.get(n, float("inf")), n))
    options = {n: _option(n) for n in names}
    width = max(len(o) for o in options.values()) if names else 0
    shown = {n: _typed(constants[n]) for n in names}
    column = max((len(v) for v in shown.values() if len(v) <= 28), default=0)  # a longer one overflows
    for n in names:
        if n in sections:
            out.append(f"{sections[n]}:")
        out.append(f"  {options[n]:<{width}}  {shown[n]:<{column}}  {comments.get(n, '')}".rstrip())
    return "\n".join(out)


def override(constants: dict, argv: list[str] | None = None, usage: str | None = None) -> Settings:
    """The Settings of the UPPER_CASE keys of `constants` (a script's globals()) with the `--name value` /
    `--name=value` overrides of `argv` (default: the command line) applied; `constants` is left as it is (a
    top-level script makes them its globals with globals().update(args.as_dict())).
    Exits with a one-line message on bad input; prints the help and exits 0 given --help or -h
    (`usage`: the usage line's command, for scripts with more than options)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    names = sorted(
        k
        for k, v in constants.items()
        if k.isupper() and not k.startswith("_") and not callable(v) and not isinstance(v, type(sys))
    )
    if any(arg in HELP for arg in argv):
        print(_help(constants, names, usage))
        sys.exit(0)
    values = {n: constants[n] for n in names}
    try:
        i = 0
        while i < len(argv):
            arg = argv[i]
            if not arg.startswith("--"):
                raise ValueError(f"unexpected argument {arg!r}: options look like --name value or --name=value")
            key, eq, text = arg[2:].partition("=")
            name = key.replace("-", "_").upper()
            if name not in names:
                raise ValueError(f"unknown option --{key}; known: " + " ".join(_option(n) for n in names))
            default = constants[name]
            if not eq:
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                if isinstance(default, bool) and (nxt is None or nxt.startswith("--")):
                    text = "true"
                elif nxt is None:
                    raise ValueError(f"--{key} needs a value")
                else:
                    text = nxt
                    i += 1
            values[name] = _parse(key, default, text)
            i += 1
    except ValueError as e:
        fail(e, os.path.basename(constants.get("__file__") or "script"))
    return Settings(values)
