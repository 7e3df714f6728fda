"""Checkpoints through Ray Train: reporting them, and finding the one a worker group starts
from. The files themselves, their manifests and the completeness check are
:mod:`raydrat.core.checkpoint.state`'s.

A checkpoint is complete by construction: each rank's manifest reaches storage after every
file it lists. Ray Train copies a reported directory in no set order, so the manifest is held
back from the directory Ray copies and written into storage by the upload function once the
copy is done (:class:`ManifestLast`): a save cut off at any point (a kill, a full disk) leaves
files without their manifest, which :func:`~raydrat.core.checkpoint.state.verify_checkpoint`
rejects."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs
import ray.train
import ray.util

from raydrat.core import metrics as M
from raydrat.core.checkpoint import state as S
from raydrat.core.fit import Callback, FitState
from raydrat.ray_train.replicas import may_report
from raydrat.ray_train.resume import choose_checkpoint, describe_choice


class RayReport(Callback):
    """At every save step, every rank writes its part of the checkpoint (its manifest last)
    and reports it with the metrics (``ray.train.report`` is a barrier all ranks reach). A
    save between evaluations has no validation loss: it is reported as the largest finite
    float (the worst score), not ``inf``, which Ray Train's run snapshot stores as JSON and
    reads back as ``None`` (its checkpoint manager then fails on resume)."""

    def __init__(self, config: dict):
        self.config = config

    def on_save(self, state: FitState, report: dict[str, float]) -> None:
        if not may_report(state):
            return
        where = {"node_ip": ray.util.get_node_ip_address()}  # the node this rank ran on
        with S.temporary_checkpoint(
            state.model,
            state.optimizer,
            state.step,
            self.config,
            state.techniques,
            state.position,
            state.rank,
            state.world_size,
            rank_extra=where,
        ) as d:
            with tempfile.TemporaryDirectory(prefix="raydrat-manifest-") as held:
                name = S.MANIFEST_FILE.format(rank=state.rank)
                os.replace(os.path.join(d, name), os.path.join(held, name))
                ray.train.report(
                    report,
                    checkpoint=ray.train.Checkpoint.from_directory(d),
                    checkpoint_upload_fn=ManifestLast(os.path.join(held, name)),
                )


class ManifestLast:
    """Ray Train's upload of one rank's part of a checkpoint: its files (Ray's own copy, with
    its check that the storage is reachable from this node), then its manifest, written under
    a temporary name and renamed."""

    def __init__(self, manifest: str):
        self.manifest = manifest

    def __call__(self, checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
        write_last(self.manifest, persisted.path, persisted.filesystem)
        return persisted


def write_last(local_file: str, directory: str, fs: pyarrow.fs.FileSystem) -> None:
    """Copy ``local_file`` into ``directory`` of ``fs`` whole or not at all (a temporary name,
    then a rename)."""
    name = os.path.basename(local_file)
    tmp, final = f"{directory}/.{name}.tmp", f"{directory}/{name}"
    with open(local_file, "rb") as src, fs.open_output_stream(tmp) as out:
        shutil.copyfileobj(src, out)
    fs.move(tmp, final)


def restore_latest(state: FitState, run_dir: str | None, since: float) -> bool | None:
    """Start ``state`` from the newest *complete* checkpoint among Ray Train's restored one
    and the run's checkpoints on storage saved since ``since`` (Ray Train records a save
    only once its controller has collected every worker's report, so a worker killed right
    after saving can leave the newest save out of its record; a save cut off half-way, or a
    file truncated since, is skipped, and rank 0 says which one it took and why newer ones
    were skipped). Returns ``None`` when there was none, else whether this rank's own state
    was in it."""
    restored = ray.train.get_checkpoint()
    also = (restored.path,) if restored is not None else ()
    chosen, skipped = choose_checkpoint(Path(run_dir) if run_dir else None, since, also)
    if state.rank == 0 and (chosen is not None or skipped):
        start = "starting from checkpoint " if chosen is not None else "starting from step 0: "
        M.setup_logging().info(start + describe_choice(chosen, skipped))
    if chosen is None:
        return None
    d = str(chosen)
    rank_state = S.load_rank_state(d, state.rank)
    saved = S.load_state(d)
    state.start_step = S.restore(
        state.model, state.optimizer, saved, rank_state, state.techniques, state.position, directory=d
    )
    state.restored = True
    return rank_state is not None
