"""MLflow tracking (runs, params, metrics, artifacts, plots) and model-registry promotion.

store.py      tracking URI: tracking.tracking_uri → $MLFLOW_TRACKING_URI → <repo>/mlflow/ sqlite store
runs.py       MLflowCallback: one run per training (a child run per Tune trial), from rank 0;
              tracking_callbacks, the one factory of it (lpcgma train, Ray workers)
plots.py      confusion matrix, per-class IoU bars, prediction overlays (palette colours)
search.py     the search's parent run: on_search_start / on_search_end, trials table, Optuna plots
registry.py   promote (best trial → registered model, aliases champion/previous), predict
offline.py    retries, then a local JSONL record in the run folder; `lpcgma mlflow sync` uploads it
redaction.py  no secret becomes a param, tag or artifact
"""
