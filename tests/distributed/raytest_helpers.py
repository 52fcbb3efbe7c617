"""Helpers of the Ray tests: free ports, finding and stopping (by PID) what a test started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pids_using(marker: str) -> list[int]:
    """PIDs (not this process) whose command line or environment mentions `marker`."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        for name in ("cmdline", "environ"):
            try:
                data = (entry / name).read_bytes()
            except OSError:
                continue
            if marker.encode() in data:
                found.append(int(entry.name))
                break
    return found


def stop_pids(pids: list[int], timeout: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while alive and time.time() < deadline:
            alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)]
            time.sleep(0.2)
        pids = alive
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except OSError:
        return True


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a command to completion (killed, with its process group, on timeout)."""
    proc = subprocess.Popen(
        args,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{args} timed out after {timeout} s:\n{out[-6000:]}") from None
    except BaseException:  # Ctrl-C on the suite: its own session did not get the signal, stop it here
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, "")


def start_ray_head(ray_tmp: Path, env: dict[str, str], *extra: str) -> str:
    """`ray start --head` (one CPU, dashboard on 127.0.0.1, free ports) in `ray_tmp`; its address."""
    import re

    head = run_cli(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            f"--port={free_port()}",
            "--num-cpus=1",
            *extra,
            f"--temp-dir={ray_tmp / 'ray'}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={free_port()}",
            "--disable-usage-stats",
        ],
        env,
        ray_tmp,
        timeout=120,
    )
    assert head.returncode == 0, head.stdout[-3000:]
    found = re.search(r"--address='?([\w.-]+:\d+)", head.stdout)
    assert found, head.stdout[-3000:]
    return found.group(1)


def join_ray_node(address: str, env: dict[str, str], cwd: Path, *extra: str) -> None:
    """`ray start --address` one more one-CPU node on this machine."""
    r = run_cli(
        [str(VENV_BIN / "ray"), "start", f"--address={address}", "--num-cpus=1", *extra, "--disable-usage-stats"],
        env,
        cwd,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-3000:]
