"""The MLflow UI shows our runs: a headless Chromium opens the compare view of a search's trials.

A real `mlflow server` on 127.0.0.1 gets a search the way `lpcgma tune` tracks one (a parent run
from `on_search_start`, three trial runs logged by `MLflowCallback`, the summary from
`on_search_end`); `experiments/mlflow_compare_screenshot.py` then opens the run-comparison page in Debian's
chromium (Selenium + chromedriver) and screenshots it. The PNG is kept under pytest's tmp dir and
copied to ``$LPCGMA_TEST_ARTIFACTS`` when that is set.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from script_helpers import load_script
from tracking_helpers import REPO, MlflowServer, fake_report, fake_trainer, synthetic_cfg

from lpcgma.engine.trainer import TrainResult
from lpcgma.tracking.runs import MLflowCallback
from lpcgma.tracking.search import on_search_end, on_search_start, trial_tags

SCRIPT = REPO / "experiments" / "mlflow_compare_screenshot.py"
CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not CHROMIUM.is_file(),
        reason="needs Debian's chromium + chromium-driver (/usr/bin/chromium); .ci/run installs them",
    ),
]

EXPERIMENT = "ui-compare"
SEARCH = "ui-search"
KEY = "method.tau_pmc"
TAUS = ("0.35", "0.55", "0.75")


def screenshot_script() -> ModuleType:
    """The screenshot script, loaded by path (experiments/ is a folder of scripts)."""
    return load_script(SCRIPT, "compare_screenshot")


def save_artifact(png: Path, name: str) -> None:
    """Keep the screenshot for CI: copied to $LPCGMA_TEST_ARTIFACTS when that is set."""
    if folder := os.environ.get("LPCGMA_TEST_ARTIFACTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(folder) / name)


@pytest.fixture(scope="module")
def search(module_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A search as `lpcgma tune` tracks it: parent run, three trial runs (one per τ_pmc), summary."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("ui-search")
    uri = module_server.uri
    common = ["method.name=lpcgma", f"tracking.experiment={EXPERIMENT}"]
    base = synthetic_cfg(root / "base", uri, *common)
    space = {"method.tau_pmc": {"type": "choice", "values": [float(t) for t in TAUS]}}
    parent = on_search_start(base, SEARCH, space=space)
    assert parent is not None
    run_ids: list[str] = []
    for i, tau in enumerate(TAUS):
        cfg = synthetic_cfg(root / f"trial{i}", uri, *common, f"method.tau_pmc={tau}")
        cb = MLflowCallback(cfg, parent_run_id=parent, tags=trial_tags(SEARCH, f"a1b2c_{i:05d}"))
        cb.on_train_start(fake_trainer(cfg))
        report = fake_report(2 + i, None, False)  # target_miou 0.2 / 0.3 / 0.4 at steps 2 / 3 / 4
        report.previews, report.confusion = [], None
        cb.on_eval(report)
        cb.on_train_end(TrainResult(2 + i, Path(cfg.train.out_dir), {}, 0.1 * (2 + i), 2 + i, None, None))
        assert cb.run_id is not None
        run_ids.append(cb.run_id)
    on_search_end(base, parent)
    client = MlflowClient(uri)
    names = [client.get_run(r).info.run_name for r in run_ids]
    assert len(set(names)) == 3
    return {"server": module_server, "parent": parent, "run_ids": run_ids, "names": names}


def test_compare_view_shows_the_trials(search: dict[str, Any], tmp_path: Path) -> None:
    cs = screenshot_script()
    uri = search["server"].uri
    runs = cs.resolve_runs(uri, EXPERIMENT, search=SEARCH)
    assert [r.run_id for r in runs] == search["run_ids"]  # the trials (oldest first), not the parent
    assert [r.name for r in runs] == search["names"]

    out = tmp_path / "compare_runs.png"
    result = cs.capture_compare(uri, runs, out, expect_params=[KEY], timeout=120)
    save_artifact(out, "mlflow_compare_runs.png")
    print(f"compare view ready after {result.seconds:.1f} s: {result.rows}; blocked: {result.blocked}")

    assert result.ok, f"the page does not show {result.missing}:\n{result.text[:3000]}"
    for name in search["names"]:
        assert name in result.text
    assert result.rows[KEY] == [f"{KEY} {' '.join(TAUS)}"]  # one column per run, in the URL's order
    assert "\t".join((KEY, *TAUS)) in result.text  # innerText: the row's cells tab-separated
    assert out.is_file() and out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_script_starts_a_server_for_a_store(search: dict[str, Any], tmp_path: Path) -> None:
    """`--store` starts its own `mlflow server` on the store (and stops it); params scrolled into view."""
    out = tmp_path / "compare_params.png"
    cmd = [sys.executable, str(SCRIPT), "--store", f"sqlite:///{search['server'].db}", "--experiment", EXPERIMENT]
    cmd += ["--search", SEARCH, "--expect-param", KEY, "--diff-only", "--show-params", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stderr
    assert f"{KEY} {' '.join(TAUS)}" in proc.stdout
    started = re.search(r"\(pid (\d+)\)", proc.stdout)
    assert started is not None
    with pytest.raises(ProcessLookupError):
        os.kill(int(started.group(1)), 0)  # the script stopped its server
    assert out.stat().st_size > 10_000
    save_artifact(out, "mlflow_compare_params.png")


def test_script_says_what_is_missing(search: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cs = screenshot_script()
    argv = ["--tracking-uri", search["server"].uri, "--run-ids", *search["run_ids"]]
    argv += ["--expect-param", KEY, "--expect-param", "method.no_such_key", "--timeout", "10"]
    assert cs.main([*argv, "--out", str(tmp_path / "missing.png")]) == 1
    err = capsys.readouterr().err
    assert "does not show param row 'method.no_such_key'" in err and KEY not in err
    assert (tmp_path / "missing.png").is_file()  # the picture is kept for looking into it
