"""`DefaultsProtectedASHA`: ASHA that never stops the literature-defaults trial early.

Imports Ray: import this module only where Ray is needed (`lpcgma.distributed.tuner` does so when it
builds a Tuner). A restored experiment unpickles its scheduler by this class's path,
``lpcgma.distributed.asha.DefaultsProtectedASHA``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from lpcgma.search_space import values_close


class DefaultsProtectedASHA(ASHAScheduler):  # type: ignore[misc]
    """ASHA whose `protected` trial (the literature defaults) always runs to the end.

    The defaults trial still enters every rung (its results set the cut-offs for the others), but it is
    never stopped early, so the summary compares the best trial with the defaults at full length.
    """

    def __init__(self, *args: Any, protected: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.protected = dict(protected or {})

    def _is_protected(self, trial: Any) -> bool:
        config = trial.config or {}
        return bool(self.protected) and all(
            k in config and values_close(config[k], v) for k, v in self.protected.items()
        )

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        action: str = super().on_trial_result(tune_controller, trial, result)
        unfinished = result.get(self._time_attr, 0) < self._max_t
        if action == TrialScheduler.STOP and unfinished and self._is_protected(trial):
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action
