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
    assert "memory/activation_mib" in proc.stdout and "resource_loss" in proc.stdout


def _slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "cluster").glob("*.md"))]


def test_every_relative_link_in_the_docs_resolves():
    """Each link from the README and docs/ to a file of the repository finds the file (an
    image too), and its #anchor a heading of that page."""
    broken = []
    for page in _pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):  # http(s), mailto
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", dest.read_text(), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_the_anchor_slug_is_githubs():
    assert (
        _slug("Two Ray nodes over a real, bandwidth-limited link: `--link`")
        == "two-ray-nodes-over-a-real-bandwidth-limited-link---link"
    )
    assert _slug("Results on this machine (2 shared CPU cores, fp32, one thread, torch 2.13.0+cpu)") == (
        "results-on-this-machine-2-shared-cpu-cores-fp32-one-thread-torch-2130cpu"
    )


def test_the_docs_speak_of_the_product_only():
    """No page cites work notes or the history of its own making."""
    for page in _pages():
        text = page.read_text()
        assert "notes/" not in text, page.name
        assert not re.search(r"\b(issue|helper|loan|borrowed)\b", text, re.I), page.name
