"""Ray Tune sweeps under a memory budget: YAML spaces (``space``), the trial function
(``trial``), the driver (``sweep``) and the Pareto report (``report``)."""
