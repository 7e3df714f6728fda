"""The view of an experiment's runs that raydrat's links open in the MLflow UI: the loss
charts first, raydrat's columns in the table (val/train loss, measured and estimated peak
MiB, tokens/s).

The MLflow UI (3.x) shares views as an experiment tag ``mlflow.sharedViewState.<key>``,
opened with ``?viewStateShareKey=<key>``. Every experiment raydrat creates holds the view
``raydrat``; a sweep adds its own, listing only its trials.
"""

from __future__ import annotations

from typing import Any

from raydrat.core import metrics as M

VIEW_TAG = "mlflow.sharedViewState."
VIEW_KEY = "raydrat"
TABLE_COLUMNS = (
    f"metrics.`{M.VAL_LOSS}`",
    f"metrics.`{M.TRAIN_LOSS}`",
    f"metrics.`{M.PEAK_MIB}`",
    f"params.`{M.ESTIMATED_PEAK_PARAM}`",
    f"metrics.`{M.TOKENS_PER_S_AVG}`",
    "tags.`raydrat.status`",
    "attributes.`Source`",
)


def _line_chart(key: str, section: str) -> dict:
    return {
        "uuid": f"raydrat-{key}",
        "type": "LINE",
        "runsCountToCompare": 10,
        "metricSectionId": section,
        "deleted": False,
        "isGenerated": False,
        "metricKey": key,
        "selectedMetricKeys": [key],
        "lineSmoothness": 0,
        "xAxisScaleType": "linear",
        "scaleType": "linear",
        "range": {},
        "xAxisKey": "step",
        "selectedXAxisMetricKey": "",
        "yAxisKey": "metric",
        "yAxisExpressions": [],
        "ignoreOutliers": False,
        "useGlobalXaxisKey": True,
        "useGlobalLineSmoothing": True,
    }


def view_state(search_filter: str | None = None) -> dict[str, Any]:
    """A view of the experiment's runs that leads with the loss: the loss charts first in
    their own section (the rest follow in MLflow's own order), the table's columns val/train
    loss, measured and estimated peak, tokens/s and raydrat's status; with
    ``search_filter``, only those runs, ranked by val loss (which lists a sweep's trials
    rather than folding them under it)."""
    columns = list(TABLE_COLUMNS)
    state: dict[str, Any] = {
        "selectedColumns": columns,
        "columnOrder": columns,
        "isAccordionReordered": True,
        "compareRunSections": [
            {
                "uuid": "raydrat-loss",
                "name": "Loss",
                "display": True,
                "isReordered": True,
                "deleted": False,
                "isGenerated": False,
            }
        ],
        "compareRunCharts": [_line_chart(k, "raydrat-loss") for k in (M.VAL_LOSS, M.TRAIN_LOSS)],
    }
    if search_filter:
        state.update(searchFilter=search_filter, orderByKey=f"metrics.`{M.VAL_LOSS}`", orderByAsc=True)
    return state
