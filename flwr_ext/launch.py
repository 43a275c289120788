"""Start Flower's own processes on this machine and run an app to completion.

``flwr run`` returns as soon as a run is *submitted* and exits 0 even when the run
later fails, and its managed local SuperLink is a detached daemon that outlives it
and reads ``~/.flwr``. For the quickstart, the benchmarks and the end-to-end tests
we need the opposite: an isolated Flower home, processes we own and stop, and the
run's real final status. This module gives exactly that, using only Flower's real
executables (``flower-superlink``, ``flower-supernode``, ``flwr``):

- :class:`FlowerHome` - a private ``FLWR_HOME`` with a ``config.toml`` of connections.
- :func:`start_superlink` / :func:`start_supernode` - processes in their own process
  group, stopped (SIGTERM, then SIGKILL) by :meth:`FlowerProcess.stop`.
- :func:`submit_run`, :func:`wait_for_run`, :func:`run_log` - ``flwr run`` /
  ``flwr ls`` / ``flwr log`` with JSON output parsed.
- :func:`simulate` - all of the above for one app in the Simulation Engine.
- :func:`make_tls_files` - a self-signed CA and a server certificate whose
  subjectAltName covers 127.0.0.1 (the SuperLink's own SuperExec connects there)
  and, optionally, the SuperLink's public name.
- :func:`make_node_key`, :func:`register_supernode`, :func:`wait_for_nodes_online` -
  SuperNode authentication with Flower's ECDSA node keys (``ssh-keygen``), as in
  ``docs/deployment.md``.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "FlowerHome",
    "FlowerProcess",
    "NodeKey",
    "RunOutcome",
    "TlsFiles",
    "free_port",
    "make_node_key",
    "make_tls_files",
    "register_supernode",
    "run_log",
    "simulate",
    "start_superlink",
    "start_supernode",
    "submit_run",
    "toml_overrides",
    "wait_for_nodes_online",
    "wait_for_run",
]

#: Environment every Flower process started here gets (see FLOWER-1.42 notes).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONUNBUFFERED": "1",
}


def _executable(name: str) -> str:
    """Flower's console script from this interpreter's environment."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"'{name}' not found next to {sys.executable} or on PATH; "
            "install flwr[simulation] in this environment"
        )
    return found


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """CA certificate, server certificate and server key (PEM paths)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls_files(directory: Path, public_name: str | None = None) -> TlsFiles:
    """Create a self-signed CA and a server certificate for ``IP:127.0.0.1``.

    The certificate's subjectAltName always holds ``IP:127.0.0.1``: Flower 1.42's
    SuperLink starts its own ``flower-superexec``, which connects to 127.0.0.1
    and refuses a certificate issued only for the public name. ``public_name``
    (e.g. ``superlink.consortium.example``) is added as a ``DNS:`` entry.

    Uses the ``openssl`` command line tool. For tests and local trials only: a
    consortium uses certificates from its own PKI (with the same two names).
    """
    directory.mkdir(parents=True, exist_ok=True)
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl is needed to create TLS test certificates")
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = (
        directory / "server.key",
        directory / "server.csr",
        directory / "server.pem",
    )
    ext = directory / "server.ext"
    names = ["IP:127.0.0.1", "DNS:localhost"]
    if public_name:
        names.append(f"DNS:{public_name}")
    ext.write_text(f"subjectAltName = {', '.join(names)}\n")
    steps = [
        [openssl, "genrsa", "-out", ca_key, "2048"],
        [openssl, "req", "-x509", "-new", "-nodes", "-key", ca_key, "-sha256",
         "-days", "2", "-subj", "/CN=flwr-ext test CA", "-out", ca_cert],
        [openssl, "genrsa", "-out", key, "2048"],
        [openssl, "req", "-new", "-key", key, "-subj", "/CN=127.0.0.1", "-out", csr],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key,
         "-CAcreateserial", "-out", cert, "-days", "2", "-sha256", "-extfile", ext],
    ]  # fmt: skip
    for step in steps:
        subprocess.run([str(s) for s in step], check=True, capture_output=True)
    return TlsFiles(ca_cert, cert, key)


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's ECDSA key pair (OpenSSH format, as Flower expects)."""

    private: Path
    public: Path


def make_node_key(directory: Path, name: str) -> NodeKey:
    """Create a SuperNode authentication key: ``ssh-keygen -t ecdsa -b 384``.

    The private key (0600) stays with the SuperNode
    (``--auth-supernode-private-key``); the public key is registered on the
    SuperLink with :func:`register_supernode`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        raise FileNotFoundError("ssh-keygen (OpenSSH) is needed to create node keys")
    private = directory / name
    subprocess.run(
        [keygen, "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", name,
         "-f", str(private)],
        check=True, capture_output=True,
    )  # fmt: skip
    return NodeKey(private, directory / f"{name}.pub")


@dataclass
class FlowerHome:
    """A private ``FLWR_HOME``: a folder with a ``config.toml`` of connections.

    Parameters
    ----------
    path : Path
        The folder (created if missing).
    """

    path: Path
    connections: dict[str, dict[str, object]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)

    def add_connection(
        self, name: str, port: int, *, root_certificates: Path | None = None
    ) -> None:
        """Add (or replace) connection ``name`` to a SuperLink on 127.0.0.1:port."""
        entry: dict[str, object] = {"address": f"127.0.0.1:{port}"}
        if root_certificates is None:
            entry["insecure"] = True
        else:
            entry["root-certificates"] = str(Path(root_certificates).resolve())
        self.connections[name] = entry
        self._write()

    def _write(self) -> None:
        default = next(iter(self.connections), None)
        lines = ["[superlink]"]
        if default:
            lines.append(f'default = "{default}"')
        for name, entry in self.connections.items():
            lines += ["", f"[superlink.{name}]"]
            for key, value in entry.items():
                lines.append(f"{key} = {_toml_value(value)}")
        (self.path / "config.toml").write_text("\n".join(lines) + "\n")

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for Flower commands that use this home."""
        env = dict(os.environ)
        env.update(FLOWER_ENV)
        env["FLWR_HOME"] = str(self.path)
        # flwr finds flower-superlink & co. on PATH: put this venv's bin first.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(extra or {})
        return env


class FlowerProcess:
    """A Flower process in its own process group, with its output in a log file."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], log: Path):
        self.name = name
        self.log_path = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            list(args),
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        """Process id (also the process group id)."""
        return self.process.pid

    def alive(self) -> bool:
        """Return True while the process runs."""
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, for fault tests)."""
        _signal_group(self.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self._log.close()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group; SIGKILL what is left after ``timeout`` s."""
        if self.alive():
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        # Children (SuperExec, ClientApp processes) share the group.
        _signal_group(self.pid, signal.SIGKILL)
        self._log.close()

    def log_count(self, text: str) -> int:
        """How many times ``text`` occurs in the process's log so far.

        Reading the log costs nothing, unlike a ``flwr`` command (a new Python
        process importing Flower): tests wait on it, e.g. for a SuperNode's
        second "Receiving: train message" (it has begun round 2).
        """
        try:
            return self.log_path.read_text(errors="replace").count(text)
        except OSError:
            return 0

    def tail(self, lines: int = 40) -> str:
        """Last ``lines`` lines of the process's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_healthy(process: FlowerProcess, port: int, timeout: float, tls: bool) -> None:
    deadline = time.monotonic() + timeout
    scheme = "https" if tls else "http"
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(
                f"{process.name} exited with code {process.process.returncode}:\n"
                f"{process.tail()}"
            )
        try:
            context = ssl._create_unverified_context() if tls else None
            with urllib.request.urlopen(
                f"{scheme}://127.0.0.1:{port}/health", timeout=2, context=context
            ) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    process.stop()
    raise TimeoutError(f"{process.name} not healthy after {timeout:.0f} s")


def start_superlink(
    home: FlowerHome,
    *,
    simulation: bool,
    port: int | None = None,
    tls: TlsFiles | None = None,
    node_auth: bool = False,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 90.0,
) -> tuple[FlowerProcess, int]:
    """Start ``flower-superlink`` on 127.0.0.1 and wait until ``/health`` answers.

    ``node_auth`` adds ``--enable-supernode-auth`` (needs ``tls``): only
    SuperNodes whose public key was registered (:func:`register_supernode`)
    are admitted. Returns the process and its port (Fleet, Control and Runtime
    APIs share it).
    """
    if node_auth and tls is None:
        raise ValueError("SuperNode authentication needs TLS")
    port = port or free_port()
    args = [
        _executable("flower-superlink"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--control-api-address", f"127.0.0.1:{free_port()}",
        "--database", str(home.path / f"superlink-{port}.db"),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if simulation:
        args += ["--simulation", "--isolation", "subprocess"]
    if tls is None:
        args.append("--insecure")
    else:
        args += [
            "--ssl-ca-certfile", str(tls.ca_cert),
            "--ssl-certfile", str(tls.server_cert),
            "--ssl-keyfile", str(tls.server_key),
        ]  # fmt: skip
    if node_auth:
        args.append("--enable-supernode-auth")
    args += list(extra_args)
    process = FlowerProcess(
        f"flower-superlink:{port}",
        args,
        home.env(),
        home.path / f"superlink-{port}.log",
    )
    _wait_healthy(process, port, ready_timeout, tls is not None)
    return process, port


def start_supernode(
    home: FlowerHome,
    superlink_port: int,
    *,
    node_config: Mapping[str, object],
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    extra_args: Sequence[str] = (),
    name: str | None = None,
) -> FlowerProcess:
    """Start ``flower-supernode`` connected to the SuperLink on ``superlink_port``.

    Each SuperNode gets its own ``--port`` (the default one collides).
    ``auth_key`` is the node's registered private key (SuperNode
    authentication).
    """
    args = [
        _executable("flower-supernode"),
        "--superlink", f"127.0.0.1:{superlink_port}",
        "--port", str(free_port()),
        "--node-config", toml_overrides(node_config),
    ]  # fmt: skip
    if root_certificates is None:
        args.append("--insecure")
    else:
        args += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        args += ["--auth-supernode-private-key", str(auth_key)]
    args += list(extra_args)
    label = name or f"supernode-{len(list(home.path.glob('supernode-*.log')))}"
    return FlowerProcess(label, args, home.env(), home.path / f"{label}.log")


def toml_overrides(values: Mapping[str, object]) -> str:
    """Format ``{"a": 1, "b": "x"}`` as ``a=1 b='x'``, as Flower's CLIs expect."""
    return " ".join(f"{k}={_toml_value(v, quote=chr(39))}" for k, v in values.items())


def _toml_value(value: object, quote: str = '"') -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if quote in text or "\\" in text or "\n" in text:
        raise ValueError(f"unsupported character in config value {text!r}")
    return f"{quote}{text}{quote}"


def _flwr_json(home: FlowerHome, args: Sequence[str], timeout: float) -> dict:
    result = subprocess.run(
        [_executable("flwr"), *args, "--format", "json"],
        env=home.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    try:
        payload = json.loads(result.stdout)
    except json.JSONDecodeError as err:
        raise RuntimeError(
            f"`flwr {' '.join(args)}` did not print JSON (exit {result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        ) from err
    if not payload.get("success", False):
        raise RuntimeError(f"`flwr {' '.join(args)}` failed: {payload}")
    return payload


def register_supernode(home: FlowerHome, connection: str, public_key: Path) -> int:
    """``flwr supernode register KEY.pub CONNECTION``; return the node id."""
    payload = _flwr_json(
        home, ["supernode", "register", str(public_key), connection], timeout=120
    )
    return int(payload["node-id"])


def wait_for_nodes_online(
    home: FlowerHome, connection: str, count: int, *, timeout: float = 120.0
) -> list[int]:
    """Poll ``flwr supernode list`` until ``count`` nodes are ``online``.

    Returns their node ids. Raises ``TimeoutError`` with the last listing.
    """
    deadline = time.monotonic() + timeout
    nodes: list[dict] = []
    while True:
        nodes = _flwr_json(home, ["supernode", "list", connection], timeout=60).get(
            "nodes", []
        )
        online = [int(n["node-id"]) for n in nodes if n.get("status") == "online"]
        if len(online) >= count:
            return online
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(online)} of {count} SuperNodes online: {nodes}")
        time.sleep(1.0)


def submit_run(
    home: FlowerHome,
    app_dir: Path,
    connection: str,
    *,
    run_config: Mapping[str, object] | None = None,
    num_supernodes: int | None = None,
) -> str:
    """``flwr run APP CONNECTION``; return the run id."""
    args = ["run", str(Path(app_dir).resolve()), connection]
    if run_config:
        args += ["--run-config", toml_overrides(run_config)]
    if num_supernodes is not None:
        args += ["--federation-config", f"num-supernodes={int(num_supernodes)}"]
    return str(_flwr_json(home, args, timeout=300)["run-id"])


@dataclass(frozen=True)
class RunOutcome:
    """Final state of a run: ``status`` is e.g. ``finished:completed``."""

    run_id: str
    status: str
    details: str
    elapsed_s: float
    log: str

    @property
    def completed(self) -> bool:
        """True if the run finished without error."""
        return self.status == "finished:completed"


def wait_for_run(
    home: FlowerHome, connection: str, run_id: str, *, timeout: float = 1800.0
) -> RunOutcome:
    """Poll ``flwr ls`` until the run has finished; return its status and log."""
    started = time.monotonic()
    status, details = "unknown", ""
    while time.monotonic() - started < timeout:
        runs = _flwr_json(home, ["ls", connection, "--run-id", run_id], timeout=120)
        run = runs["runs"][0]
        status, details = str(run["status"]), str(run.get("status-details", ""))
        if status.startswith("finished:"):
            return RunOutcome(
                run_id, status, details, time.monotonic() - started,
                run_log(home, connection, run_id),
            )  # fmt: skip
        time.sleep(2.0)
    raise TimeoutError(
        f"run {run_id} still '{status}' after {timeout:.0f} s ({details}); "
        f"log so far:\n{run_log(home, connection, run_id)}"
    )


def run_log(home: FlowerHome, connection: str, run_id: str) -> str:
    """Return the ServerApp log stored for ``run_id`` (``flwr log RUN CONN --show``)."""
    result = subprocess.run(
        [_executable("flwr"), "log", run_id, connection, "--show"],
        env=home.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result.stdout + result.stderr


def simulate(
    app_dir: Path,
    *,
    num_supernodes: int = 3,
    run_config: Mapping[str, object] | None = None,
    home: Path | None = None,
    timeout: float = 1800.0,
) -> RunOutcome:
    """Run ``app_dir`` in Flower's Simulation Engine and wait for the outcome.

    Starts a private simulation SuperLink (own ``FLWR_HOME``, free port), submits
    the run with ``flwr run``, waits for it to finish, and stops every process it
    started, also on error or Ctrl-C.
    """
    owned_tmp = None
    if home is None:
        owned_tmp = tempfile.mkdtemp(prefix="flwr-ext-home-")
        home = Path(owned_tmp)
    flower_home = FlowerHome(home)
    superlink, port = start_superlink(flower_home, simulation=True)
    try:
        flower_home.add_connection("simulation", port)
        run_id = submit_run(
            flower_home, app_dir, "simulation",
            run_config=run_config, num_supernodes=num_supernodes,
        )  # fmt: skip
        return wait_for_run(flower_home, "simulation", run_id, timeout=timeout)
    finally:
        superlink.stop()
        if owned_tmp is not None:
            shutil.rmtree(owned_tmp, ignore_errors=True)
