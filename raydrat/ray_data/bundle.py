"""What a run's data is: :class:`DatasetBundle`, built by
:func:`raydrat.ray_data.datasets.build_datasets` and nowhere else."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import ray

from raydrat.core.data.check import DataStats
from raydrat.core.data.stream import TrainSource


@dataclass
class DatasetBundle:
    train: TrainSource
    """What each worker reads its part of the global training order from
    (:func:`raydrat.ray_data.stream.train_stream`)."""
    val: ray.data.Dataset
    """Same rows, materialized in the object store."""
    tokenizer_path: str
    tokenizer_sha256: str
    eod_id: int
    block_len: int
    stats: DataStats | None
    lineage: dict = field(default_factory=dict)
    """The run's data lineage (logged to MLflow as ``data/lineage.json``): the prepare
    manifest, or the sources with sizes, the tokenizer hash, the split rule and counts."""

    counter: object = None
    """The :class:`~raydrat.ray_data.stream.DataCounter` of the streaming train split
    (``None`` for prepared data)."""
    lease: object = None
    """Prepared data: the :class:`~raydrat.core.data.prepared.Lease` on the generation read
    (held until :meth:`release` or the process exits)."""

    def release(self) -> None:
        """Let a later prepare remove the prepared generation this bundle reads."""
        if self.lease is not None:
            self.lease.release()

    def epoch_metrics(self) -> list[dict[str, float]]:
        """Per completed epoch of the train stream: documents read, training documents,
        tokens, blocks, packing-group tails, empty / invalid-UTF-8 documents, skipped files
        and, with several sources, each source's share of the blocks (``data_epoch_*``;
        prepared data: the manifest's counts, every epoch alike)."""
        if self.counter is not None:
            epochs = ray.get(self.counter.epochs.remote())
        elif self.lineage.get("kind") == "prepared":
            c = self.lineage["manifest"]["counts"]
            epochs = [
                {
                    "docs": c["docs"],
                    "split_docs": c["train_split_docs"],
                    "tokens": c["train_tokens"],
                    "blocks": c["train_blocks"],
                }
            ]
        else:
            epochs = []
        return [{f"data_epoch_{k}": float(v) for k, v in e.items()} for e in epochs]

    def achieved_shares(self) -> list[str]:
        """With several sources: per epoch the stream read whole, each source's target and
        achieved share of the training tokens (blocks are all ``seq_len + 1`` tokens)."""
        sizes = self.lineage.get("source_sizes") or []
        if len(sizes) < 2 or self.counter is None:
            return []
        return [
            f"data: epoch {int(e['epoch'])}: "
            + "; ".join(
                f"sources[{i}] target {s['token_share_target']:.1%}, achieved {e.get(f'source{i}_block_share', 0.0):.1%}"
                for i, s in enumerate(sizes)
            )
            for e in ray.get(self.counter.epochs.remote())
        ]

    def metrics(self) -> dict[str, float]:
        """The data counts as run metrics (``data_*``): the manifest's exact counts for
        prepared data, the checked sample's otherwise (``data_sampled_units`` of
        ``data_units``)."""
        if self.lineage.get("kind") == "prepared":
            counts = self.lineage["manifest"]["counts"]
        else:
            counts = {k: v for k, v in asdict(self.stats).items() if not isinstance(v, bool)}
        return {f"data_{k}": float(v) for k, v in counts.items()}
