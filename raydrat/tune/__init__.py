"""Ray Tune sweeps under a memory budget: YAML spaces (``space``), admission before launch
(``admission``), the trial function (``trial``), the driver (``sweep``), per-trial records
(``results``), the sweep's MLflow runs (``mlflow_runs``) and the Pareto report (``report``)."""
