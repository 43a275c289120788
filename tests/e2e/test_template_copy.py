"""A copied app template runs with a plain ``flwr run .``, from a built wheel.

Issue 14, item 3: ``cp -r apps/hospital-diagnostics ~/myhospital && cd ~/myhospital
&& flwr run .`` failed (Flower's runtime dependency install looked for flwr-ext in
the package registry, exit 608). This test does what the app's README says, as a
user would, against what a release ships:

1. ``python -m build`` builds the sdist, then the wheel *from the sdist* (so a file
   missing from the sdist breaks the wheel), from a copy of the source tree.
2. A new virtualenv gets flwr-ext **only from that wheel** (``pip install
   --no-index --no-deps``, not editable). Its third-party dependencies (torch,
   flwr, Ray, TenSEAL, Opacus...) are the ones already installed for the tests,
   made visible through a ``.pth`` line that puts that ``site-packages`` on
   ``sys.path``: a plain path line, so the ``.pth`` files *inside* it - the
   editable install of the working tree - are not processed, and ``flwr_ext``
   cannot come from there. Installing torch, Ray and Flower again from the
   registry would cost minutes and network on every CI run and test nothing of
   ours; the check below that ``flwr_ext`` and the ``flwr-ext`` metadata resolve
   inside the new venv is what makes the run honest. Flower's console scripts
   (``flwr``, ``flower-superlink``... which ``flwr run`` starts by name) are
   written into the new venv's ``bin`` for its interpreter, the way pip writes
   them, and ``PATH`` holds no other Python environment.
3. The app is copied to a temporary folder outside the repository and run with
   Flower's own ``flwr run . --federation-config "num-supernodes=3"`` - the
   command its README gives (the app needs ``min-nodes`` = 3 hospitals, Flower
   simulates 2 by default) - with its own ``FLWR_HOME`` (and ``HOME``) and free ports
   for Flower's managed local SuperLink; ``flwr ls --format json`` is polled until
   the run is finished, and it must be ``finished:completed``.
4. Teardown stops, by PID, every process whose environment holds this test's
   ``FLWR_HOME`` (the detached managed SuperLink and whatever it started).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tarfile
import time
from importlib.metadata import distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "apps" / "hospital-diagnostics"
_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache",
    ".ruff_cache", "outputs",
)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def build_release(source: Path, out: Path) -> tuple[Path, Path]:
    """Build sdist + wheel (wheel from the sdist) from a copy of ``source``."""
    tree = out / "src"
    shutil.copytree(source, tree, ignore=_IGNORE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # --no-isolation: build offline with the setuptools already installed (the
    # build-system requires are checked by `build` all the same).
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
          str(out / "dist"), str(tree)], env=env)  # fmt: skip
    (wheel,) = (out / "dist").glob("flwr_ext-*.whl")
    (sdist,) = (out / "dist").glob("flwr_ext-*.tar.gz")
    return wheel, sdist


def make_venv(venv: Path, wheel: Path) -> Path:
    """A venv with flwr-ext from ``wheel`` only; see the module docstring."""
    # No pip inside: the test's own pip installs into it (--python), which saves
    # bootstrapping one.
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([str(python), "-c", code]).stdout.strip())
    # The wheel first, while the venv sees no other flwr-ext at all.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
          "--no-index", "--no-deps", str(wheel)])  # fmt: skip
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    for entry in distribution("flwr").entry_points:
        if entry.group != "console_scripts":
            continue
        module, _, attr = entry.value.partition(":")
        script = venv / "bin" / entry.name
        script.write_text(
            f"#!{python}\nimport sys\nfrom {module} import {attr.split('.')[0]}\n"
            f"sys.exit({attr}())\n"
        )
        script.chmod(0o755)
    return python


def _our_processes(flwr_home: Path) -> list[int]:
    """PIDs of processes whose environment has FLWR_HOME=flwr_home."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def stop_processes(flwr_home: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _our_processes(flwr_home)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()]
            time.sleep(0.2)
        if not _our_processes(flwr_home):
            return


@pytest.mark.e2e
def test_copied_template_runs_with_plain_flwr_run_from_the_wheel(tmp_path):
    timings: dict[str, float] = {}
    started = time.monotonic()
    wheel, sdist = build_release(ROOT, tmp_path / "release")
    timings["build"] = time.monotonic() - started
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "pyproject.toml"} <= names, sorted(names)[:20]

    mark = time.monotonic()
    python = make_venv(tmp_path / "venv", wheel)
    clean = {"env": {"PATH": "/usr/bin:/bin"}, "cwd": tmp_path}  # no PYTHONPATH
    code = (
        "import flwr_ext, importlib.metadata as m, flwr_ext.strategy; "
        "print(flwr_ext.__file__); print(m.version('flwr-ext')); "
        "print(m.distribution('flwr-ext')._path)"
    )
    probe = _run([str(python), "-c", code], **clean).stdout.split()
    venv_site = str(tmp_path / "venv" / "lib")
    assert probe[0].startswith(venv_site), probe  # the wheel's flwr_ext, not ours
    assert probe[2].startswith(venv_site), probe  # and the wheel's metadata
    assert "__editable__" not in probe[0]
    version = _run([str(tmp_path / "venv" / "bin" / "flwr-ext"), "--version"], **clean)
    assert version.stdout.strip() == f"flwr-ext {probe[1]}"
    timings["venv"] = time.monotonic() - mark

    # The user's copy, outside the repository, run exactly as its README says.
    myhospital = tmp_path / "myhospital"
    shutil.copytree(APP, myhospital, ignore=_IGNORE)
    flwr_home = tmp_path / "flwr-home"
    env = {
        "PATH": f"{tmp_path / 'venv' / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "FLWR_HOME": str(flwr_home),
        "FLWR_EXT_OUTPUT_ROOT": str(tmp_path / "outputs"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # What the README says to export before the first `flwr run`:
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "LANG": "C.UTF-8",
    }
    (tmp_path / "home").mkdir()
    readme = (myhospital / "README.md").read_text()
    command = 'flwr run . --federation-config "num-supernodes=3"'
    assert "cp -r apps/hospital-diagnostics" in readme and command in readme
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in readme
    mark = time.monotonic()
    try:
        submitted = subprocess.run(
            ["flwr", "run", ".", "--federation-config", "num-supernodes=3"],
            cwd=myhospital, env=env, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        status, runs = "", []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            listed = subprocess.run(
                ["flwr", "ls", "--format", "json"], cwd=myhospital, env=env,
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if listed.returncode == 0 and listed.stdout.strip():
                runs = json.loads(listed.stdout).get("runs", [])
                if len(runs) == 1 and runs[0]["status"].startswith("finished"):
                    status = runs[0]["status"]
                    break
            time.sleep(3)
        timings["flwr-run"] = time.monotonic() - mark
        log = ""
        if runs:
            log = subprocess.run(
                ["flwr", "log", str(runs[0]["run-id"]), "--show"], cwd=myhospital,
                env=env, capture_output=True, text=True, timeout=120,
            ).stdout  # fmt: skip
        assert status == "finished:completed", (
            f"{status or 'not finished'}: {runs}\n{log[-4000:]}"
        )
        assert "flwr-ext result: app=hospital-diagnostics" in log, log[-4000:]
        assert list((tmp_path / "outputs").rglob("final_model.npz")), log[-2000:]
    finally:
        stop_processes(flwr_home)
    assert not _our_processes(flwr_home)
    timings["total"] = time.monotonic() - started
    print("template-copy timings (s):", {k: round(v, 1) for k, v in timings.items()})
