"""Ray Train (the trainer across workers) and Ray Tune + Optuna + ASHA (searches over configs).

`train` runs the Trainer as a Ray Train worker function; `search` runs searches (`run_search`) from
`search_types` (settings, results), `resources` (the plan), `trial` (the Tune trial), `tuner`
(+ `asha`), `search_summary` and `storage`; `search_mlflow` and `search_cli` are their MLflow hooks
and command-line faces. The search spaces they search live beside the config (`lpcgma.search_space`:
no Ray). Ray is imported lazily (only `asha` imports it at the top): importing this package does not
start or import Ray.
"""
