"""common/plots.py: distill.py's OUT/layers.png at each layer boundary and in the logits phase."""

import os
import struct

import pytest

from common.plots import relative_error_before
from conftest import TINY_DISTILL, make_model_folder, run_distill


def png_size(path):
    """(width, height) from a PNG's header."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_layers_png_at_each_layer_boundary_and_in_the_logits_phase(tiny_data_dir, tmp_path, monkeypatch):
    import common.plots
    import distill

    teacher = make_model_folder(str(tmp_path / "teacher"), initializer_range=0.2)
    out = str(tmp_path / "run")
    drawn = []  # the rows each drawing showed, recorded on the way to the real drawing

    def recording(out_dir, layer_rows=None, logits_rows=None):
        drawn.append((len(layer_rows or []), len(logits_rows or [])))
        draw(out_dir, layer_rows, logits_rows)
        drawn[-1] += png_size(os.path.join(out_dir, "layers.png"))

    draw = common.plots.run_png
    monkeypatch.setattr(distill, "run_png", recording)  # the name distill.py calls
    common_args = ["--teacher", teacher, "--data-dir", tiny_data_dir, "--out-dir", out]
    run_distill(*TINY_DISTILL, *common_args, "--student-kind", "pruned", "--steps-per-layer", "3")
    run_distill(
        *TINY_DISTILL,
        *common_args,
        "--phase",
        "logits",
        "--kd-steps",
        "4",
        "--kd-val-every",
        "2",
        "--kd-save-every",
        "4",
    )
    # one drawing per layer (one row more each time), then one per validation of the logits phase (steps 0, 2, 4),
    # which adds a second row of panels beside the layer-wise ones read back from layers.json
    assert [d[:2] for d in drawn] == [(1, 0), (2, 0), (3, 0), (0, 1), (0, 2), (0, 3)]
    assert {d[2:] for d in drawn[:3]} == {(1200, 400)} and {d[2:] for d in drawn[3:]} == {(1200, 800)}
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_relative_error_before_training_from_the_row():
    # both relative errors divide by the teacher's mean square: rel = mse / mean(t^2)
    assert relative_error_before({"mse_start": 0.6, "mse_end": 0.2, "rel_err": 0.05}) == pytest.approx(0.15)
    assert relative_error_before({"mse_start": 0.0, "mse_end": 0.0, "rel_err": 0.0}) == 0.0  # copy students
    assert relative_error_before({"mse_start": 0.6, "mse_end": 0.2, "rel_err": 0.05, "start_rel_err": 0.2}) == 0.2
