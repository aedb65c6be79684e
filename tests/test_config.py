"""common/config.py: `--name value` / `--name=value` overrides of a script's UPPER_CASE constants."""
import os

import pytest

from common.config import override


def constants():
    return {"__file__": "train.py", "STEPS_PER_LAYER": 100, "LR": 3e-4, "OUT_DIR": "runs/x", "RESUME": False,
            "LAYERS": [0, 1], "NAMES": ["mlp"], "STUDENT_KWARGS": {"scale": 1}, "INIT_FROM": None,
            "lowercase": 1, "helper": print, "os": os}


def test_both_spellings_set_the_same_constant():
    for argv in (["--steps-per-layer", "10"], ["--steps_per_layer=10"], ["--STEPS-PER-LAYER=10"]):
        c = constants()
        config = override(c, argv)
        assert c["STEPS_PER_LAYER"] == 10 and config["STEPS_PER_LAYER"] == 10


def test_values_take_the_type_of_the_default():
    c = constants()
    config = override(c, ["--lr", "1e-3", "--out-dir=runs/y", "--layers", "2,3,5", "--names", "mlp,attn",
                          "--student-kwargs", '{"scale": 0.5, "rank": 8}', "--init-from", "runs/x/final"])
    assert c["LR"] == 1e-3 and isinstance(c["LR"], float)
    assert c["OUT_DIR"] == "runs/y"
    assert c["LAYERS"] == [2, 3, 5] and c["NAMES"] == ["mlp", "attn"]
    assert c["STUDENT_KWARGS"] == {"scale": 0.5, "rank": 8}
    assert c["INIT_FROM"] == "runs/x/final"
    assert set(config) == {"STEPS_PER_LAYER", "LR", "OUT_DIR", "RESUME", "LAYERS", "NAMES", "STUDENT_KWARGS",
                           "INIT_FROM"}  # not lowercase names, functions or modules
    assert override(constants(), ["--layers="])["LAYERS"] == []
    assert override(constants(), ["--lr", "2"])["LR"] == 2.0


@pytest.mark.parametrize("argv,want", [(["--resume"], True), (["--resume", "--lr", "1"], True),
                                       (["--resume", "false"], False), (["--resume=yes"], True),
                                       (["--resume=0"], False), ([], False)])
def test_bools_alone_mean_true_and_accept_words(argv, want):
    assert override(constants(), argv)["RESUME"] is want


@pytest.mark.parametrize("argv,message", [
    (["--stepz", "3"], "unknown option --stepz"),
    (["--steps-per-layer", "ten"], "--steps-per-layer wants a int, got 'ten'"),
    (["--layers", "0,x"], "--layers wants a comma-separated list of int"),
    (["--resume", "maybe"], "--resume wants true/false"),
    (["--student-kwargs", "{scale"], "--student-kwargs wants JSON"),
    (["--student-kwargs", "[1]"], "--student-kwargs wants a JSON object"),
    (["--lr"], "--lr needs a value"),
    (["10"], "unexpected argument '10'"),
])
def test_bad_overrides_exit_with_one_line(argv, message):
    with pytest.raises(SystemExit) as e:
        override(constants(), argv)
    text = str(e.value.code)
    assert text.startswith("train.py: ") and message in text and "\n" not in text
    if "unknown" in message:
        assert "--steps-per-layer" in text and "--student-kwargs" in text  # lists what is accepted
