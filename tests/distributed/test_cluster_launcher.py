"""The cluster-launcher user path on this machine (slow): `ray up clusters/local.yaml` →
`ray submit clusters/local.yaml experiments/tune_synthetic.py --smoke-test` → `ray down`.

The test starts its own sshd on a free port of 127.0.0.1 (own host key, key auth only) and logs in
as a dedicated user it creates (``lpcgma-it-<random>``), so the machine's own sshd, users and shell
files are never touched. The cluster config is the shipped ``clusters/local.yaml``, changed only
where a test must: that user and a generated key, ``ssh_proxy_command`` for the port, free Ray
ports, the existing ``.venv`` symlinked as the user's ``~/venv`` instead of ``pip install`` of the
whole stack, and an MLflow store in the user's home (through ``clusters/lpcgma.env``, the file the
shipped ``.bashrc`` block loads). The launcher runs as root with its own HOME/RAY_TMPDIR.

Needs root, Debian's openssh-server, netcat-openbsd and rsync (installed here with apt-get when
missing; `.ci/run` installs them). Everything the test started is stopped by PID, the user removed.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from raytest_helpers import REPO, VENV_BIN, free_port, pids_using, run_cli, stop_pids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1400)]

SSHD = Path("/usr/sbin/sshd")
PACKAGES = ("openssh-server", "netcat-openbsd", "rsync")
CLUSTER_YAML = REPO / "clusters" / "local.yaml"
SCRIPT = REPO / "experiments" / "tune_synthetic.py"
VENV = VENV_BIN.parent
BASE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "OMP_NUM_THREADS": "1",
    "LANG": "C.UTF-8",
}
# Known ways the user path breaks, and what to change in the cluster config.
HINTS = {
    "no authentication token was found": "with RAY_AUTH_MODE=token the head needs a token before `ray start`: "
    "add a setup command `test -f ~/.ray/auth_token || ray get-auth-token --generate > /dev/null`",
    "lpcgma/configs'": "`ray submit` runs ~/<script>.py with the home folder first on sys.path, where the "
    "repository copy (file_mounts ~/lpcgma, no __init__.py) shadows the installed package as a namespace "
    "package: mount the repository elsewhere (e.g. ~/src/lpcgma)",
}
SSH_PROCESS_NAMES = {"sshd", "sshd-session"}  # the user's login sessions, not Ray


def _sha(text: str) -> str:
    """Ray's short hash in the launcher's ssh control path (command_runner.HASH_MAX_LENGTH)."""
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _tail(text: str, n: int = 6000) -> str:
    return text[-n:] if len(text) > n else text


# ------------------------------------------------------------------------------- system tools
def _missing_tools() -> list[str]:
    need = {"sshd": SSHD.is_file(), "nc": shutil.which("nc"), "rsync": shutil.which("rsync")}
    need |= {t: shutil.which(t) for t in ("ssh", "ssh-keygen", "useradd", "userdel")}
    return [name for name, found in need.items() if not found]


@pytest.fixture(scope="module")
def system_tools() -> None:
    """Root, sshd, nc and rsync; the Debian packages are installed (quietly) when missing."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a user and starts its own sshd")
    missing = _missing_tools()
    if missing and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:  # a stale package index: refresh it once
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
            r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        missing = _missing_tools()
        if missing:
            why = _tail(r.stdout + r.stderr, 800)
            pytest.skip(f"{missing} missing and apt-get could not install {PACKAGES}: {why}")
    elif missing:
        pytest.skip(f"{missing} missing and no apt-get to install {PACKAGES} (.ci/run installs them)")


# ------------------------------------------------------------------------- the dedicated user
@dataclass
class LoginUser:
    name: str
    uid: int
    gid: int
    home: Path
    key: Path  # the launcher's private key for this user
    opened_dirs: list[tuple[Path, int]] = field(default_factory=list)  # (dir, old mode) to restore


def _processes_of(uid: int) -> dict[int, str]:
    """PID → command line of every live process owned by `uid`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            status = (entry / "status").read_text()
            if "\nState:\tZ" in status:
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            found[int(entry.name)] = cmd or status.split("\n", 1)[0].split("\t", 1)[-1]
        except OSError:
            continue
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ray_processes_of(uid: int) -> dict[int, str]:
    """The user's processes other than its ssh login sessions (after `ray down` there should be none)."""
    return {p: c for p, c in _processes_of(uid).items() if _comm(p) not in SSH_PROCESS_NAMES}


def _run_as(user: LoginUser, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    env = {"HOME": str(user.home), "USER": user.name, "PATH": "/usr/bin:/bin", **BASE_ENV}
    return subprocess.run(
        cmd,
        user=user.uid,
        group=user.gid,
        extra_groups=[],
        env=env,
        cwd=user.home,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _open_for_others(user: LoginUser, paths: list[Path]) -> None:
    """Let the user traverse into the venv and its interpreter (o+x on a folder only where missing)."""
    for path in paths:
        for folder in [*reversed(path.parents), path] if path.is_dir() else reversed(path.parents):
            mode = folder.stat().st_mode
            if not mode & stat.S_IXOTH:
                user.opened_dirs.append((folder, stat.S_IMODE(mode)))
                folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


@pytest.fixture
def login_user(system_tools: None, tmp_path: Path) -> Iterator[LoginUser]:
    """A fresh login user (bash, key login only) that can run the existing venv; removed afterwards."""
    name = f"lpcgma-it-{secrets.token_hex(3)}"
    r = subprocess.run(
        ["useradd", "--create-home", "--shell", "/bin/bash", "--password", "*", name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot create a test user: {r.stderr.strip()}")
    pw = pwd.getpwnam(name)
    user = LoginUser(name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir), tmp_path / "launcher" / "id_ed25519")
    try:
        user.key.parent.mkdir(parents=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(user.key)], check=True, timeout=60
        )
        ssh_dir = user.home / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        shutil.copy(user.key.with_suffix(".pub"), ssh_dir / "authorized_keys")
        (ssh_dir / "authorized_keys").chmod(0o600)
        for p in (ssh_dir, ssh_dir / "authorized_keys"):
            os.chown(p, user.uid, user.gid)
        # The venv's python links to an interpreter that may live under a private home (/root/.pyenv).
        _open_for_others(user, [VENV, Path(os.path.realpath(VENV_BIN / "python")), Path(sys.base_prefix), REPO])
        check = _run_as(user, [str(VENV_BIN / "python"), "-c", "import lpcgma, ray, mlflow, torch"])
        assert check.returncode == 0, f"{name} cannot use {VENV}: {_tail(check.stdout + check.stderr, 3000)}"
        yield user
    finally:
        stop_pids(list(_processes_of(user.uid)))
        for entry in (*Path("/tmp").iterdir(), *Path("/dev/shm").iterdir()):  # what the user left there
            try:
                if entry.lstat().st_uid == user.uid:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            except OSError:
                pass
        for folder, mode in reversed(user.opened_dirs):
            folder.chmod(mode)
        subprocess.run(["userdel", "--remove", name], capture_output=True, timeout=60)


# ----------------------------------------------------------------------------------- the sshd
@dataclass
class Sshd:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, n: int = 4000) -> str:
        try:
            return _tail(self.log.read_text(errors="replace"), n)
        except OSError:
            return "(no sshd log)"


def _banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


@pytest.fixture
def sshd(login_user: LoginUser, tmp_path: Path) -> Iterator[Sshd]:
    """Our own sshd on 127.0.0.1:<free port>, key login for the test user only; stopped by PID."""
    root = tmp_path / "sshd"
    root.mkdir()
    host_key = root / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True, timeout=60)
    port = free_port()
    config = root / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"ListenAddress 127.0.0.1:{port}",
                f"HostKey {host_key}",
                f"PidFile {root / 'sshd.pid'}",
                "AuthorizedKeysFile .ssh/authorized_keys",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin no",
                f"AllowUsers {login_user.name}",
                "UsePAM no",
                "MaxSessions 50",
                "MaxStartups 50",
                "LogLevel INFO",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )
    )
    made_run_dir = not Path("/run/sshd").exists()  # sshd's privilege-separation folder
    if made_run_dir:
        Path("/run/sshd").mkdir(mode=0o755)
    log = root / "sshd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Sshd(port, proc, log)
    try:
        deadline = time.monotonic() + 30
        while not _banner(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"sshd did not start on 127.0.0.1:{port}: {server.log_tail(1500)}")
            time.sleep(0.2)
        login = subprocess.run([*_ssh_args(login_user, port), "echo", "ok"], capture_output=True, text=True, timeout=60)
        assert login.stdout.strip() == "ok", (
            f"key login as {login_user.name} failed: {login.stderr[-2000:]}\nsshd log:\n{server.log_tail()}"
        )
        yield server
    finally:
        if proc.poll() is None:
            stop_pids([proc.pid])
        proc.wait(10)
        if made_run_dir:
            shutil.rmtree("/run/sshd", ignore_errors=True)


def _ssh_args(user: LoginUser, port: int) -> list[str]:
    return [
        "ssh",
        "-i",
        str(user.key),
        "-o",
        f"ProxyCommand=nc 127.0.0.1 {port}",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        f"{user.name}@127.0.0.1",
    ]


# ----------------------------------------------------------------------------- cluster config
def repo_mount(cfg: dict[str, Any]) -> str:
    """The remote folder `file_mounts` copies the repository to (``~/...``)."""
    mounts = [remote for remote, local in cfg["file_mounts"].items() if Path(local) == Path(".")]
    assert len(mounts) == 1 and mounts[0].startswith("~/"), cfg["file_mounts"]
    return str(mounts[0])


def cluster_config(user: LoginUser, port: int, gcs_port: int, dashboard_port: int) -> dict[str, Any]:
    """`clusters/local.yaml`, changed only where this test must."""
    shipped: dict[str, Any] = yaml.safe_load(CLUSTER_YAML.read_text())
    cfg = copy.deepcopy(shipped)
    cfg["auth"] = {
        "ssh_user": user.name,
        "ssh_private_key": str(user.key),
        "ssh_proxy_command": f"nc 127.0.0.1 {port}",
    }
    installs = [c for c in cfg["setup_commands"] if re.search(r"\bpip install\b", c)]
    assert installs, f"{CLUSTER_YAML.name} no longer installs the project with pip: update this test"
    setup = [c for c in cfg["setup_commands"] if c not in installs]
    # The existing venv (with lpcgma installed) as the user's ~/venv, instead of minutes of pip.
    setup.insert(0, f"test -e ~/venv || ln -s {VENV} ~/venv")
    # MLflow writes into the user's home: set in the settings file the shipped .bashrc block loads.
    env_file = f"{repo_mount(cfg)}/clusters/lpcgma.env"
    assert any(env_file.replace("~/", "$HOME/") in c and ".bashrc" in c for c in setup), setup
    setup.append(
        f"mkdir -p ~/mlflow {env_file.rsplit('/', 1)[0]} && printf '%s\\n' "
        f"'MLFLOW_TRACKING_URI=sqlite:///{user.home}/mlflow/mlflow.db' > {env_file}"
    )
    cfg["setup_commands"] = setup
    # Free ports: a fixed 6379 / 8265 may be taken on a shared machine.
    starts = [
        c.replace("--port=6379", f"--port={gcs_port} --dashboard-port={dashboard_port}")
        for c in cfg["head_start_ray_commands"]
    ]
    assert starts != cfg["head_start_ray_commands"], "head_start_ray_commands no longer use --port=6379"
    cfg["head_start_ray_commands"] = starts
    # What must stay as shipped: the provider, the repo mount and the .bashrc environment block.
    assert cfg["provider"] == shipped["provider"] and cfg["file_mounts"] == shipped["file_mounts"]
    assert any("RAY_TMPDIR" in c and ".bashrc" in c for c in setup), setup
    return cfg


# -------------------------------------------------------------------------------------- test
def test_ray_up_submit_down_on_this_machine(login_user: LoginUser, sshd: Sshd, tmp_path: Path) -> None:
    user = login_user
    launcher = tmp_path / "launcher"
    for sub in ("home", "ray", "tmp"):
        (launcher / sub).mkdir(parents=True, exist_ok=True)
    cfg_path = launcher / "local.yaml"
    cfg = cluster_config(user, sshd.port, free_port(), free_port())
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {
        "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(launcher / "home"),
        "USER": "root",
        "RAY_TMPDIR": str(launcher / "ray"),
        "TMPDIR": str(launcher / "tmp"),
        **BASE_ENV,
    }
    ray = str(VENV_BIN / "ray")

    def ray_cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return run_cli([ray, *args], env, REPO, timeout)  # from the repo root, as a user runs it

    def explain(what: str, r: subprocess.CompletedProcess[str]) -> str:
        hints = "".join(f"\n--- hint: {h}" for pattern, h in HINTS.items() if pattern in r.stdout)
        return f"{what} exited {r.returncode}:\n{_tail(r.stdout)}\n--- sshd log:\n{sshd.log_tail()}{hints}"

    # The launcher's ssh control sockets go to a fixed folder of Ray's: removed after if new and empty.
    control_dir = Path("/tmp") / f"ray_ssh_{_sha(env['USER'])}" / _sha(cfg["cluster_name"])
    new_dirs = [d for d in (control_dir, control_dir.parent) if not d.exists()]
    up_done = down_done = False
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        up = ray_cli("up", str(cfg_path), "--yes", "--no-config-cache", timeout=420)
        timings["up"] = time.monotonic() - t0
        up_done = True
        assert up.returncode == 0, explain("ray up", up)
        running = " ".join(_ray_processes_of(user.uid).values())
        assert "gcs_server" in running and "raylet" in running, f"no Ray head of {user.name}: {running}"
        # The head uses the RAY_TMPDIR of the .bashrc block, the launcher its own cluster state.
        assert (user.home / ".ray_tmp" / "ray" / "session_latest").exists(), _tail(up.stdout)
        assert (launcher / "ray" / "ray" / f"cluster-{cfg['cluster_name']}.state").is_file(), (
            "no launcher state in its RAY_TMPDIR"
        )
        copy_of_repo = user.home / repo_mount(cfg)[2:]
        assert (copy_of_repo / "pyproject.toml").is_file(), "file_mounts did not copy the repository"
        assert not (copy_of_repo / ".venv").exists(), "rsync_exclude did not keep .venv out"

        t0 = time.monotonic()
        sub = ray_cli("submit", str(cfg_path), str(SCRIPT.relative_to(REPO)), "--smoke-test", timeout=720)
        timings["submit"] = time.monotonic() - t0
        assert sub.returncode == 0, explain("ray submit … --smoke-test", sub)
        out = sub.stdout
        summary = re.search(
            r"## Search summary: (\S+)\n(\d+) trials: (\d+) finished, (\d+) stopped early by ASHA, (\d+) failed", out
        )
        assert summary, explain("ray submit (no search summary)", sub)
        path, trials, finished, failed = summary[1], int(summary[2]), int(summary[3]), int(summary[5])
        assert trials >= 1 and finished >= 1 and failed == 0, explain(f"ray submit: {summary[0]!r}", sub)
        assert path.startswith(str(user.home / "runs" / "tune")), path  # the user's cwd, not the repo
        assert re.search(r"^(best trial \S+: |the literature defaults \(trial )", out, re.M), _tail(out)
        assert "best checkpoint: /" in out, _tail(out)
        # MLflow went to the store of clusters/lpcgma.env, in the user's home.
        assert f"sqlite:///{user.home}/mlflow/mlflow.db" in out, _tail(out)
        assert (user.home / "mlflow" / "mlflow.db").stat().st_size > 0

        t0 = time.monotonic()
        down = ray_cli("down", str(cfg_path), "--yes", timeout=240)
        timings["down"] = time.monotonic() - t0
        down_done = True
        assert down.returncode == 0, explain("ray down", down)
        deadline = time.monotonic() + 60
        while (left := _ray_processes_of(user.uid)) and time.monotonic() < deadline:
            time.sleep(1)
        if left:
            stop_pids(list(left))
            pytest.fail(
                f"`ray down` exited 0 but left {len(left)} processes of {user.name} (stopped by PID): "
                + "; ".join(f"{p}: {c[:200]}" for p, c in left.items())
                + f"\n{_tail(down.stdout, 3000)}"
            )
        print(out[summary.start() :].split("\nShared connection")[0])
        print(f"cluster launcher timings (s): {', '.join(f'{k} {v:.0f}' for k, v in timings.items())}")
    finally:
        if up_done and not down_done:  # a failure after `ray up`: take the cluster down, then stop by PID
            with contextlib.suppress(AssertionError):
                ray_cli("down", str(cfg_path), "--yes", timeout=180)
        stop_pids(list(_processes_of(user.uid)))
        stop_pids([p for p in pids_using(str(launcher)) if p != sshd.proc.pid])  # ssh control masters
        for d in new_dirs:
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty
