"""Command-line overrides for the run constants at the top of a script.

Every UPPER_CASE constant of the calling script can be set from the command line:
`--steps-per-layer 10` and `--steps_per_layer=10` both set STEPS_PER_LAYER. The value is
parsed to the constant's type: int, float, str, bool (`--resume` alone means true),
list (`0,1,2`; empty string for an empty list) or dict (JSON). An unknown name or a
value of the wrong type is a one-line error that lists what would have been accepted.
"""
import json
import sys


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
                    raise ValueError(f"--{name} wants a comma-separated list of {kind.__name__}, got {text!r}") from None
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


def override(constants, argv=None):
    """Apply `--name value` / `--name=value` overrides to the UPPER_CASE keys of `constants`
    (a script's globals()) in place; return the resolved {NAME: value} config.
    Exits with a one-line message on bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    names = sorted(k for k, v in constants.items() if k.isupper() and not k.startswith("_") and not callable(v)
                   and not isinstance(v, type(sys)))
    try:
        i = 0
        while i < len(argv):
            arg = argv[i]
            if not arg.startswith("--"):
                raise ValueError(f"unexpected argument {arg!r}: options look like --name value or --name=value")
            key, eq, text = arg[2:].partition("=")
            name = key.replace("-", "_").upper()
            if name not in names:
                raise ValueError(f"unknown option --{key}; known: " + " ".join("--" + n.lower().replace("_", "-") for n in names))
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
            constants[name] = _parse(key, default, text)
            i += 1
    except ValueError as e:
        script = constants.get("__file__", "script")
        sys.exit(f"{script}: {e}")
    return {n: constants[n] for n in names}
