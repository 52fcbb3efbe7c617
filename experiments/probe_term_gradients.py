"""How hard does each LPCGMA term pull on the encoder? Per-term gradient norms during a training run.

    python experiments/probe_term_gradients.py OUT.jsonl --config synthetic method.name=lpcgma ...

Runs `lpcgma train` with the arguments after OUT.jsonl and, at every step, takes the gradient of each
weighted loss term with respect to the encoder's parameters: the base loss (source CE + target
pseudo-label CE), λ_pmc·PMC, λ_pix·PIX and λ_fwd·FWD (the Gaussian forward term). One JSON line per
step: each term's gradient norm and its cosine with the base loss's gradient. The encoder is the only
path from the embedding terms to the segmentation (the classifier never sees them), so these norms say
how much of each step's change to the segmenter comes from which term. Training is unchanged
(`torch.autograd.grad` leaves `.grad` alone); each step costs one extra backward pass per term.
At the end, the mean of each column over steps in [16, 32) (the demo's second half) and over all steps
is printed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import lpcgma.methods.lpcgma as lpcgma_module
from lpcgma import cli
from lpcgma.config import ConfigError
from lpcgma.methods.base import Batch, StepOutput

# the module-level names LPCGMA's step calls for each embedding term, and the weight key of each
TERM_FUNCTIONS = {"pmc": "supervised_infonce", "pix": "pixel_view_contrast", "fwd": "forward_alignment_loss"}
TERM_WEIGHTS = {"pmc": "lambda_pmc", "pix": "lambda_pix", "fwd": "lambda_fwd"}


def flat_grad(loss: Tensor, params: Sequence[Tensor]) -> Tensor:
    """d loss / d params as one vector (zeros where a parameter is not on the loss's graph)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1).float() for g, p in zip(grads, params, strict=True)]
    )


def term_gradients(base: Tensor, terms: dict[str, Tensor], params: Sequence[Tensor]) -> dict[str, float]:
    """Norm of each weighted term's gradient and its cosine with the base loss's gradient."""
    g_base = flat_grad(base, params)
    row = {"grad/base": float(g_base.norm())}
    for name, term in terms.items():
        g = flat_grad(term, params)
        row[f"grad/{name}"] = float(g.norm())
        row[f"cos/{name}"] = float(torch.nn.functional.cosine_similarity(g, g_base, dim=0))
    return row


@contextmanager
def probing(out: Path) -> Iterator[None]:
    """While open, every LPCGMA step records each term's loss (with its graph) and appends a gradient
    row to `out`; on exit the patched names are restored."""
    recorded: dict[str, Tensor] = {}

    def recorder(name: str, fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def wrapped(*args: Any, **kwargs: Any) -> Tensor:
            recorded[name] = fn(*args, **kwargs)
            return recorded[name]

        return wrapped

    originals = {attr: getattr(lpcgma_module, attr) for attr in TERM_FUNCTIONS.values()}
    original_step = lpcgma_module.LPCGMA.train_step

    def probed_step(self: lpcgma_module.LPCGMA, source: Batch, target: Batch, step: int) -> StepOutput:
        recorded.clear()
        result = original_step(self, source, target, step)
        weighted = {name: float(getattr(self.options, TERM_WEIGHTS[name])) * loss for name, loss in recorded.items()}
        base = result.loss - sum(weighted.values(), torch.zeros((), device=result.loss.device))
        params = [p for p in self.student.encoder_parameters() if p.requires_grad]
        with out.open("a") as f:
            f.write(json.dumps({"step": step, **term_gradients(base, weighted, params)}) + "\n")
        return result

    for name, attr in TERM_FUNCTIONS.items():
        setattr(lpcgma_module, attr, recorder(name, originals[attr]))
    lpcgma_module.LPCGMA.train_step = probed_step  # type: ignore[method-assign]
    try:
        yield
    finally:
        for attr, fn in originals.items():
            setattr(lpcgma_module, attr, fn)
        lpcgma_module.LPCGMA.train_step = original_step  # type: ignore[method-assign]


def summarise(out: Path) -> None:
    """Print each column's mean over steps in [16, 32) (when the run has any) and over all logged steps."""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    columns = sorted({k for r in rows for k in r if k != "step"})
    for label, chosen in (("steps 16-31", [r for r in rows if 16 <= r["step"] < 32]), ("all steps", rows)):
        if not chosen:
            continue
        means = {c: sum(r[c] for r in chosen if c in r) / max(1, sum(c in r for r in chosen)) for c in columns}
        print(label, " ".join(f"{c}={v:.4g}" for c, v in means.items()))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-") or not args[0].endswith(".jsonl"):
        print("usage: probe_term_gradients.py OUT.jsonl [lpcgma train arguments]", file=sys.stderr)
        return 2
    out = Path(args[0])
    train_args = cli.build_parser().parse_args(["train", *args[1:]])
    try:
        method = cli.load_cli_config(train_args.config, train_args.overrides).method.name
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"probe_term_gradients: error: {e}", file=sys.stderr)
        return 2
    if method != "lpcgma":
        print(f"probe_term_gradients: error: method.name is {method!r}; expected lpcgma", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with probing(out):
        code = cli.main(["train", *args[1:]])
    if code == 0 and out.exists():
        summarise(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
