"""Source-only training (the lower reference) and the oracle (trained on target labels)."""

from __future__ import annotations

from lpcgma.methods.base import Batch, Method, StepOutput


class SourceOnly(Method):
    """Supervised CE on the labelled source domain only."""

    student_domains = ("source",)

    def train_step(self, source: Batch, target: Batch, step: int) -> StepOutput:
        loss, logs, _ = self.supervised_loss(source, "source")
        return StepOutput(loss, logs)


class Oracle(Method):
    """Supervised CE on the target domain's own labels: the upper reference no UDA method has."""

    student_domains = ("target",)

    def train_step(self, source: Batch, target: Batch, step: int) -> StepOutput:
        loss, logs, _ = self.supervised_loss(target, "target")
        return StepOutput(loss, logs)
