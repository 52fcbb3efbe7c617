#!/usr/bin/env python
"""Screenshot of the MLflow UI's run-comparison view, taken by a headless Chromium (Debian's).

Opens ``<server>/#/compare-runs?runs=[...]&experiments=[...]`` for the trial runs of a search (the
child runs of its parent run) or for given run ids, waits until the page shows every run's name and
every expected param, saves a PNG and prints the params' rows as the page shows them. It exits
non-zero, saying what is missing, when the page does not show them in time.

    # the trials of search "demo" on a running server
    .venv/bin/python experiments/mlflow_compare_screenshot.py --tracking-uri http://127.0.0.1:5000 \\
        --experiment lpcgma-synthetic --search demo --expect-param method.tau_pmc --out compare.png

    # the project's local store: a `mlflow server` is started on a free port and stopped at the end
    .venv/bin/python experiments/mlflow_compare_screenshot.py --store sqlite:///$PWD/mlflow/mlflow.db \\
        --experiment lpcgma-synthetic --search demo --expect-param optim.lr --out compare.png

    # given runs (any experiments)
    .venv/bin/python experiments/mlflow_compare_screenshot.py --tracking-uri http://127.0.0.1:5000 \\
        --run-ids RUN1 RUN2 RUN3 --out compare.png

Needs ``apt-get install chromium chromium-driver`` and Selenium (``pip install -e '.[test]'``). The
browser runs with a fresh profile and reaches nothing but 127.0.0.1/localhost: every other host fails
to resolve and goes to a dead proxy, and the requests the page tried anyway are reported.

This folder is not a package (no ``__init__.py``): tests load this file by path with importlib.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# PLATFORM.md, "The MLflow UI in a real browser" (+ a fresh --user-data-dir per call)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
# nothing but loopback: other names do not resolve, and anything else goes to a closed local port
BLOCK_FLAGS = (
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
    "--proxy-server=http://127.0.0.1:9",
    "--proxy-bypass-list=127.0.0.1;localhost;[::1]",
)
# how lpcgma.tracking tags a search (lpcgma/tracking/runs.py); a plain MLflow parent run works too
ROLE_TAG = "lpcgma.role"
SEARCH_TAG = "search"
PARENT_TAG = "mlflow.parentRunId"


class CompareError(RuntimeError):
    """The runs could not be found, or the page did not show what was expected."""


@dataclass(frozen=True)
class RunRef:
    run_id: str
    name: str
    experiment_id: str


@dataclass
class CompareResult:
    url: str
    screenshot: Path
    text: str  # document.body.innerText when the page was complete (or at the timeout)
    rows: dict[str, list[str]]  # param key -> the page's lines for it
    missing: list[str]  # expected run names / param keys the page never showed
    seconds: float  # until the page showed everything (or the timeout)
    blocked: list[str] = field(default_factory=list)  # non-local URLs the page tried to load

    @property
    def ok(self) -> bool:
        return not self.missing


# ------------------------------------------------------------------------------ mlflow server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mlflow_executable() -> str:
    here = Path(sys.executable).parent / "mlflow"
    return str(here) if here.is_file() else (shutil.which("mlflow") or "mlflow")


def store_uri(store: str) -> str:
    """A backend store URI from ``sqlite:///...``, another database URI, or a path to a .db file."""
    if "://" in store:
        return store
    path = Path(store).expanduser().resolve()
    if not path.is_file():
        raise CompareError(f"no sqlite store at {path}")
    return f"sqlite:///{path}"


class LocalServer:
    """``mlflow server --workers 1 --host 127.0.0.1 --port <free>`` for a store, stopped by PID."""

    def __init__(self, store: str, artifacts: str | None = None, port: int | None = None):
        self.store = store_uri(store)
        if artifacts is None and self.store.startswith("sqlite:///"):
            artifacts = str(Path(self.store.removeprefix("sqlite:///")).parent / "artifacts")
        self.artifacts = artifacts
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="mlflow-server-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 120) -> LocalServer:
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
        cmd = [_mlflow_executable(), "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", self.store]
        if self.artifacts:
            cmd += ["--artifacts-destination", self.artifacts]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status < 500:
                        return self
            except Exception:
                time.sleep(0.3)
        log = Path(self._log.name).read_text(errors="replace")[-3000:]
        self.stop()
        raise CompareError(f"mlflow server for {self.store} did not start within {timeout:.0f} s; log:\n{log}")

    def stop(self, timeout: float = 15) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: the gunicorn/uvicorn workers too
                proc.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def check_server(uri: str, timeout: float = 10) -> None:
    """Fail fast (MLflow's client would retry for minutes) when no MLflow server answers at `uri`."""
    if not uri.startswith(("http://", "https://")):
        raise CompareError(f"--tracking-uri {uri!r}: the UI needs a server (http://...); for a store use --store")
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            if r.status < 500:
                return
    except Exception as e:
        raise CompareError(f"no MLflow server answers at {uri}: {e}") from None
    raise CompareError(f"the MLflow server at {uri} is not healthy")


# ----------------------------------------------------------------------------------- the runs
def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise CompareError(f"no experiment named {name!r}")
    return str(exp.experiment_id)


def _all_pages(fetch: Any) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = fetch(token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_parent_run(client: Any, search: str, experiment: str | None = None) -> Any:
    """The newest parent run of search `search`: tagged by lpcgma (role + search), else named so."""
    from mlflow.entities import ViewType

    if experiment:
        exps = [_experiment_id(client, experiment)]
    else:
        exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    quoted = search.replace("'", "\\'")
    for flt in (
        f"tags.`{ROLE_TAG}` = 'search' and tags.{SEARCH_TAG} = '{quoted}'",
        f"attributes.run_name = '{quoted}'",
    ):
        found = client.search_runs(exps, filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            return found[0]
    where = f"experiment {experiment!r}" if experiment else "any experiment"
    raise CompareError(f"no parent run of search {search!r} in {where}")


def resolve_runs(
    tracking_uri: str,
    experiment: str | None = None,
    search: str | None = None,
    run_ids: Sequence[str] | None = None,
) -> list[RunRef]:
    """The runs to compare: the child runs of the search's parent run (oldest first), or `run_ids`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
        if experiment:
            eid = _experiment_id(client, experiment)
            others = [r.info.run_id for r in runs if r.info.experiment_id != eid]
            if others:
                raise CompareError(f"runs not in experiment {experiment!r}: {', '.join(others)}")
    elif search:
        parent = find_parent_run(client, search, experiment)
        pid = parent.info.run_id
        runs = _all_pages(
            lambda token: client.search_runs(
                [parent.info.experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{pid}'",
                order_by=["attributes.start_time ASC"],
                max_results=1000,
                page_token=token,
            )
        )
        if not runs:
            raise CompareError(f"the parent run {pid} of search {search!r} has no child runs")
    else:
        raise CompareError("give --search/--parent-run-name or --run-ids")
    return [RunRef(r.info.run_id, r.info.run_name or r.info.run_id, str(r.info.experiment_id)) for r in runs]


def compare_url(base: str, runs: Sequence[RunRef]) -> str:
    """``<base>/#/compare-runs?runs=<url-encoded JSON list>&experiments=<url-encoded JSON list>``."""
    experiments = list(dict.fromkeys(r.experiment_id for r in runs))
    q = urllib.parse.quote
    return (
        f"{base.rstrip('/')}/#/compare-runs?runs={q(json.dumps([r.run_id for r in runs]))}"
        f"&experiments={q(json.dumps(experiments))}"
    )


# -------------------------------------------------------------------------------- the browser
def chromium_available(chromium: str = CHROMIUM, chromedriver: str = CHROMEDRIVER) -> bool:
    return Path(chromium).is_file() and Path(chromedriver).is_file()


_ROWS_JS = """
const rows = {};
for (const key of arguments[0]) {
  rows[key] = [];
  for (const tr of document.querySelectorAll('tr')) {
    const first = tr.querySelector('th, td');
    if (first && first.innerText.trim() === key) rows[key].push(tr.innerText);
  }
}
return rows;
"""


def param_rows(text: str, keys: Iterable[str]) -> dict[str, list[str]]:
    """The lines of `text` (innerText) that show a param key followed by its values (tab-separated)."""
    lines = [ln.strip() for ln in text.splitlines()]
    return {
        key: [" ".join(ln.split()) for ln in lines if ln.startswith((key + "\t", key + " ")) and ln.strip() != key]
        for key in keys
    }


def _page_rows(driver: Any, text: str, keys: Sequence[str]) -> dict[str, list[str]]:
    """Each key's row in the page's tables (key, then one value per run), else its lines of `text`."""
    rows = param_rows(text, keys)
    if keys:
        try:
            table = driver.execute_script(_ROWS_JS, list(keys)) or {}
        except Exception:
            table = {}
        for key in keys:
            found = [" ".join(str(r).split()) for r in table.get(key, [])]
            found = [r for r in found if r != key]
            if found:
                rows[key] = found
    return rows


def _missing(text: str, rows: dict[str, list[str]], names: Sequence[str]) -> list[str]:
    return [f"run name {n!r}" for n in names if n not in text] + [f"param row {k!r}" for k, v in rows.items() if not v]


def _is_local(url: str) -> bool:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme in ("data", "blob", "about", "chrome", "devtools", ""):
        return True
    return (parsed.hostname or "") in {h.strip("[]") for h in LOCAL_HOSTS}


def capture_compare(
    base_url: str,
    runs: Sequence[RunRef],
    out: str | Path,
    expect_params: Sequence[str] = (),
    timeout: float = 90,
    window: tuple[int, int] = (1600, 1000),
    show_params: bool = False,
    diff_only: bool = False,
    chromium: str = CHROMIUM,
    chromedriver: str = CHROMEDRIVER,
) -> CompareResult:
    """Open the compare view of `runs` on the server at `base_url`, wait, screenshot to `out`.

    Waits (up to `timeout` s) until ``document.body.innerText`` shows every run's name and a table
    row for every key of `expect_params`; the screenshot (the top of the page: the parallel-coordinates
    plot and the run names; with `show_params` scrolled to the first expected param's row; with
    `diff_only` after switching "Show diff only" on) is written either way. The result holds the
    rows, what is missing (empty when the page is complete) and the non-local requests attempted.
    """
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    host = urllib.parse.urlsplit(base_url).hostname or ""
    if host not in {h.strip("[]") for h in LOCAL_HOSTS}:
        raise CompareError(f"{base_url}: the browser only reaches 127.0.0.1/localhost (use an SSH tunnel)")
    if not chromium_available(chromium, chromedriver):
        raise CompareError(f"needs {chromium} and {chromedriver}: apt-get install -y chromium chromium-driver")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    url = compare_url(base_url, runs)
    names = [r.name for r in runs]
    keys = list(expect_params)

    with tempfile.TemporaryDirectory(prefix="lpcgma-chromium-") as profile:
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for flag in (*CHROMIUM_FLAGS, *BLOCK_FLAGS, f"--user-data-dir={profile}/profile"):
            opts.add_argument(flag)
        opts.add_argument(f"--window-size={window[0]},{window[1]}")
        opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
        service = Service(executable_path=chromedriver, log_output=os.path.join(profile, "chromedriver.log"))
        driver = webdriver.Chrome(options=opts, service=service)
        try:
            # the page itself gets exactly `window` (a headless window's frame would take ~140 px)
            driver.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": window[0], "height": window[1], "deviceScaleFactor": 1, "mobile": False},
            )
            driver.set_page_load_timeout(timeout)
            t0 = time.monotonic()
            try:
                driver.get(url)
            except WebDriverException as e:
                raise CompareError(f"chromium could not open {url}: {e.msg}") from None
            while True:
                text = driver.execute_script("return document.body ? document.body.innerText : ''") or ""
                rows = _page_rows(driver, text, keys)
                missing = _missing(text, rows, names)
                if not missing or time.monotonic() - t0 > timeout:
                    break
                time.sleep(0.25)
            seconds = time.monotonic() - t0
            driver.execute_script(_CLOSE_ASSISTANT_JS)  # MLflow's chat side panel: not part of the view
            if diff_only:
                driver.execute_script(_DIFF_ONLY_JS)
            time.sleep(1.0)  # let the plot and the last layout pass settle before the picture
            if show_params and keys:
                driver.execute_script(_SCROLL_TO_ROW_JS, keys[0])
                time.sleep(0.3)
            driver.save_screenshot(str(out))
            blocked = _attempted_remote(driver)
        finally:
            driver.quit()
    return CompareResult(url, out, text, rows, missing, seconds, blocked)


_CLOSE_ASSISTANT_JS = """
const b = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
if (b) b.click();
"""
_DIFF_ONLY_JS = """
const w = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
let n;
while ((n = w.nextNode())) {
  if (n.textContent.trim() !== 'Show diff only') continue;
  for (let e = n.parentElement; e; e = e.parentElement) {
    const s = e.querySelector('[role="switch"], input[type="checkbox"], button');
    if (s) { s.click(); return; }
  }
}
"""
_SCROLL_TO_ROW_JS = """
for (const tr of document.querySelectorAll('tr')) {
  const first = tr.querySelector('th, td');
  if (first && first.innerText.trim() === arguments[0]) { tr.scrollIntoView({block: 'center'}); return; }
}
"""


def _attempted_remote(driver: Any) -> list[str]:
    """Non-local URLs the page requested (all of them failed: see BLOCK_FLAGS)."""
    urls: list[str] = []
    try:
        entries = driver.get_log("performance")
    except Exception:
        return urls
    for entry in entries:
        try:
            msg = json.loads(entry["message"])["message"]
        except (KeyError, ValueError):
            continue
        if msg.get("method") == "Network.requestWillBeSent":
            u = msg.get("params", {}).get("request", {}).get("url", "")
            if u and not _is_local(u) and u not in urls:
                urls.append(u)
    return urls


# ------------------------------------------------------------------------------------ the CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    doc = (__doc__ or "").split("This folder is not a package")[0].strip()
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--tracking-uri", help="a running MLflow server on this machine (http://127.0.0.1:PORT)")
    where.add_argument("--store", help="a backend store (sqlite:///.../mlflow.db or a .db path): a server is started")
    p.add_argument("--artifacts", help="with --store: the server's --artifacts-destination (default: beside the db)")
    p.add_argument("--experiment", help="experiment name (restricts --search; checks --run-ids)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--search", "--parent-run-name", dest="search", help="compare the child runs of this search")
    which.add_argument("--run-ids", nargs="+", help="compare these runs")
    p.add_argument("--expect-param", action="append", default=[], metavar="KEY", help="a param row to wait for")
    p.add_argument("--out", required=True, help="the screenshot (PNG)")
    p.add_argument("--timeout", type=float, default=90, help="seconds to wait for the page (90)")
    p.add_argument("--window", default="1600x1000", help="page size WIDTHxHEIGHT (1600x1000)")
    p.add_argument("--show-params", action="store_true", help="scroll to the first --expect-param's row")
    p.add_argument("--diff-only", action="store_true", help='switch on "Show diff only" (params that differ)')
    p.add_argument("--chromium", default=CHROMIUM)
    p.add_argument("--chromedriver", default=CHROMEDRIVER)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    args = parse_args(argv)
    try:
        w, h = (int(v) for v in args.window.lower().split("x"))
    except ValueError:
        print(f"--window {args.window!r}: expected WIDTHxHEIGHT", file=sys.stderr)
        return 2
    server: LocalServer | None = None
    try:
        if args.store:
            server = LocalServer(args.store, args.artifacts)
            server.start()
            print(f"started mlflow server for {server.store} on {server.uri} (pid {server.pid})")
            uri = server.uri
        else:
            uri = args.tracking_uri
            check_server(uri)
        runs = resolve_runs(uri, args.experiment, args.search, args.run_ids)
        print(f"comparing {len(runs)} runs: {', '.join(r.name for r in runs)}")
        result = capture_compare(
            uri,
            runs,
            args.out,
            args.expect_param,
            args.timeout,
            (w, h),
            show_params=args.show_params,
            diff_only=args.diff_only,
            chromium=args.chromium,
            chromedriver=args.chromedriver,
        )
    except (CompareError, MlflowException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
    print(f"page: {result.url}")
    for key, lines in result.rows.items():
        for line in lines or [f"{key}: (not shown)"]:
            print(f"  {line}")
    if result.blocked:
        print(f"blocked {len(result.blocked)} non-local request(s): {', '.join(result.blocked[:5])}")
    size = result.screenshot.stat().st_size
    print(f"screenshot: {result.screenshot} ({size} bytes; page ready after {result.seconds:.1f} s)")
    if result.missing:
        shown = ", ".join(result.missing)
        print(f"error: after {result.seconds:.0f} s the compare view does not show {shown}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
