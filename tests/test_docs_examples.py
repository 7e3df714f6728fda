"""The README's plain-PyTorch example runs as written, with only the model and technique
configs, and without importing Ray or MLflow."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_plain_loop_example_runs(tmp_path):
    text = (REPO / "README.md").read_text()
    code = re.search(r"<!-- example: plain-loop -->\n```python\n(.*?)```", text, re.S).group(1)
    for whole_run in ("load_config", "RaydratConfig", "config_from_dict"):
        assert whole_run not in code  # the model's and the techniques' own config sections only
    script = tmp_path / "example.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + code)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory/activation_bytes" in proc.stdout and "resource_loss" in proc.stdout
