"""Reading a finished (or interrupted) local Tune experiment folder: every trial's reported rows."""

from __future__ import annotations

import json
from pathlib import Path


def read_trial_rows(experiment: str | Path) -> dict[str, list[dict[str, float]]]:
    """Trial id → its reported rows (numeric fields only), in report order, from ``<experiment>/*/result.json``.

    Raises FileNotFoundError naming the folder when no trial folder holds a result.
    """
    folder = Path(experiment)
    trials: dict[str, list[dict[str, float]]] = {}
    for result in sorted(folder.glob("*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        rows.sort(key=lambda r: r.get("training_iteration", 0))
        trial_id = str(rows[-1].get("trial_id") or result.parent.name)
        trials[trial_id] = [
            {k: float(v) for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} for r in rows
        ]
    if not trials:
        raise FileNotFoundError(
            f"no trial results under '{folder}': expected a Tune experiment folder <storage>/<name> whose trial "
            "folders hold result.json"
        )
    return trials
