"""What importing the scripts loads: train.py and distill.py validate with common/quality.py, and load neither the
evaluation CLI (common/evaluate.py, with the generator) nor matplotlib (common/plots.py imports it to draw)."""

import json
import subprocess
import sys

from conftest import ROOT

CLI_ONLY = ["common.evaluate", "common.generate", "lm_eval", "matplotlib"]

# distill.py is imported; train.py runs at import, so it is run with --help, which exits once its imports are done
LOADED = f"""
import json, runpy, sys
import distill
sys.argv = ["train.py", "--help"]
try:
    runpy.run_path("train.py")
except SystemExit:
    pass
print(json.dumps({{"quality": "common.quality" in sys.modules, "cli": [m for m in {CLI_ONLY} if m in sys.modules]}}))
"""


def test_the_scripts_load_no_evaluation_cli_and_no_matplotlib():
    proc = subprocess.run([sys.executable, "-c", LOADED], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"quality": True, "cli": []}
