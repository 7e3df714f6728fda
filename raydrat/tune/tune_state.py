"""What Tune saved of a sweep (its newest ``experiment_state-*.json``), read, and repaired
before a resume.

Tune (2.60) writes a trial into its experiment state again only when it stops the trial's
actor. A trial whose process died (the kernel's OOM killer, a kill -9) has no actor left to
stop when Tune handles its error: it stays saved as ``RUNNING``, and ``Tuner.restore`` would
run it again. The sweep keeps how Tune ended each trial (:class:`raydrat.tune.events.TrialEvents`
records it), and :func:`mark_ended` writes that into Tune's state before a restore reads
it: a trial that ended is never run again.
"""

from __future__ import annotations

import json
from pathlib import Path

from raydrat.atomic import write_text

STATE_GLOB = "experiment_state-*.json"
ENDED = ("TERMINATED", "ERROR")
ERROR_FILES = {"error_filename": "error.txt", "pickled_error_filename": "error.pkl"}


def newest_state(sweep_dir: Path) -> Path | None:
    """The experiment state Tune restores from (the newest by name, as Tune picks it)."""
    states = sorted(sweep_dir.glob(STATE_GLOB), key=lambda p: p.name)
    return states[-1] if states else None


def saved_trials(sweep_dir: Path) -> list[dict]:
    """Each trial as Tune's newest state has it (``relative_logdir``: its folder, ``status``)."""
    path = newest_state(sweep_dir)
    if path is None:
        return []
    return [json.loads(entry[0]) for entry in json.loads(path.read_text()).get("trial_data", [])]


def mark_ended(sweep_dir: Path, ended: dict[str, str]) -> list[str]:
    """Give the trials of ``ended`` (trial folder -> ``TERMINATED`` or ``ERROR``) that status in
    Tune's newest state where it still has them unfinished (an errored one with its error
    files, which Tune wrote into the trial's folder); returns the trials changed."""
    path = newest_state(sweep_dir)
    if path is None or not ended:
        return []
    doc = json.loads(path.read_text())
    changed = []
    for entry in doc.get("trial_data", []):
        trial, meta = json.loads(entry[0]), json.loads(entry[1])
        name = trial.get("relative_logdir")
        status = ended.get(name)
        if status is None or trial.get("status") in ENDED:
            continue
        trial["status"] = status
        if status == "ERROR":
            meta.update({k: f for k, f in ERROR_FILES.items() if (sweep_dir / name / f).exists()})
            meta["num_failures"] = max(1, meta.get("num_failures") or 0)
        entry[0], entry[1] = json.dumps(trial, indent=2), json.dumps(meta)
        changed.append(name)
    if changed:
        write_text(path, json.dumps(doc))
    return changed
