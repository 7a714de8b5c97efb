"""Private PostgreSQL clusters and RabbitMQ nodes, and test certificates, for tests that need
servers of their own (TLS listeners, servers to stop or break).

Nothing here touches the shared services: a private cluster gets its own data
directory, socket directory and free port; a private RabbitMQ node its own
node name, ports, Erlang cookie (in a HOME of its own, so `rabbitmqctl` only
ever reaches it), database, logs, configuration and plugin list, and is
stopped by name. Every process is started here and stopped here, by its id.

Each helper is a context manager; binaries that are missing skip the test
with the reason.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

__all__ = [
    "CertificateAuthority",
    "KeyPair",
    "PrivatePostgres",
    "PrivateRabbitMQ",
    "free_port",
    "node_environment",
    "private_postgres",
    "private_rabbitmq",
]

POSTGRES_BIN_DIRS = (Path("/usr/lib/postgresql/15/bin"),)
RABBITMQ_BIN_DIRS = (Path("/usr/lib/rabbitmq/bin"), Path("/usr/lib/rabbitmq/sbin"))
"""Where the real scripts live; /usr/sbin/rabbitmqctl would switch to the shared node's user."""

_START_TIMEOUT_S = 90.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _binary(name: str, folders: tuple[Path, ...], what: str) -> Path:
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{what}: {name} not found in {', '.join(map(str, folders))} or on PATH")
    return Path(found)


def _run(args: list[str], *, what: str, timeout_s: float = 60.0, **kwargs: object) -> str:
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout_s, check=False, **kwargs
    )
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): {result.stderr or result.stdout}")
    return result.stdout


# --- certificates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its unencrypted PEM key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertificateAuthority:
    """A self-signed CA made with `openssl` in `directory`; it issues server and client pairs."""

    directory: Path
    name: str
    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path, name: str) -> CertificateAuthority:
        openssl = _binary("openssl", (Path("/usr/bin"),), "test certificates need openssl")
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        _run(
            [
                str(openssl), "req", "-x509", "-newkey", "ec",
                "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", str(key), "-out", str(cert), "-days", "2",
                "-subj", f"/CN={name}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            ],
            what=f"openssl (CA {name})",
        )  # fmt: skip
        return cls(directory, name, cert, key)

    def issue(self, name: str, *, hosts: tuple[str, ...] = (), common_name: str = "") -> KeyPair:
        """A certificate signed by this CA; `hosts` become its subjectAltNames (IPs or DNS)."""
        openssl = _binary("openssl", (Path("/usr/bin"),), "test certificates need openssl")
        cert, key = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        request, extensions = self.directory / f"{name}.csr", self.directory / f"{name}.ext"
        lines = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "extendedKeyUsage=serverAuth,clientAuth",
            "subjectKeyIdentifier=hash",
            "authorityKeyIdentifier=keyid,issuer",
        ]
        if hosts:
            names = [f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts]
            lines.append("subjectAltName=" + ",".join(names))
        extensions.write_text("\n".join(lines) + "\n")
        _run(
            [
                str(openssl), "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-keyout", str(key), "-out", str(request),
                "-subj", f"/CN={common_name or name}",
            ],
            what=f"openssl (request {name})",
        )  # fmt: skip
        _run(
            [
                str(openssl), "x509", "-req", "-in", str(request), "-CA", str(self.cert),
                "-CAkey", str(self.key), "-CAcreateserial", "-out", str(cert), "-days", "2",
                "-extfile", str(extensions),
            ],
            what=f"openssl (sign {name})",
        )  # fmt: skip
        key.chmod(0o600)
        return KeyPair(cert, key)


def _owned_copy(source: Path, folder: Path, owner: str | None, mode: int) -> Path:
    """Copy `source` into `folder` readable by `owner` alone (servers refuse shared keys)."""
    target = folder / source.name
    shutil.copyfile(source, target)
    target.chmod(mode)
    if owner is not None:
        shutil.chown(target, owner, owner)
    return target


# --- PostgreSQL --------------------------------------------------------------------------------


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of one test: TLS only on 127.0.0.1, trust authentication."""

    port: int
    data: Path
    runtime: Path
    start_command: list[str] = field(default_factory=list, repr=False)
    """`pg_ctl ... start` as it started the cluster: `restart()` runs it again."""

    def restart(self, mode: str = "immediate") -> None:
        """Stop the cluster (`immediate`: as after a crash, no checkpoint) and start it again."""
        stop = [*self.start_command[: self.start_command.index("-D")], "-D", str(self.data)]
        _run([*stop, "-m", mode, "-w", "stop"], what="pg_ctl stop", timeout_s=60)
        _run(self.start_command, what="pg_ctl start", timeout_s=_START_TIMEOUT_S + 10)

    def url(self, database: str = "postgres", user: str = "postgres", **query: str) -> str:
        """`postgresql://user@127.0.0.1:port/database?query` (query values are not escaped)."""
        params = urlencode(query, safe="/:") if query else ""
        return f"postgresql://{quote(user)}@127.0.0.1:{self.port}/{database}" + (
            f"?{params}" if params else ""
        )

    @property
    def log(self) -> str:
        path = self.runtime / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def private_postgres(
    server: KeyPair,
    ca: CertificateAuthority,
    *,
    require_client_cert: bool = False,
) -> Iterator[PrivatePostgres]:
    """Start a cluster whose only TCP access is TLS with `server`'s certificate; stop it after.

    With `require_client_cert`, a client must also present a certificate `ca` signed.
    """
    initdb = _binary("initdb", POSTGRES_BIN_DIRS, "a private cluster needs PostgreSQL 15")
    pg_ctl = _binary("pg_ctl", POSTGRES_BIN_DIRS, "a private cluster needs PostgreSQL 15")
    as_user: list[str] = []
    owner: str | None = None
    if os.geteuid() == 0:  # initdb refuses root; the cluster runs as `postgres`
        owner = "postgres"
        as_user = ["runuser", "-u", owner, "--"]
    # Under the system's temporary folder: pytest's own is private to the user running it.
    runtime = Path(tempfile.mkdtemp(prefix="sagaworks-pg-"))
    if owner is not None:
        shutil.chown(runtime, owner, owner)
    cert = _owned_copy(server.cert, runtime, owner, 0o644)
    key = _owned_copy(server.key, runtime, owner, 0o600)
    root = _owned_copy(ca.cert, runtime, owner, 0o644)
    data = runtime / "data"
    _run(
        [*as_user, str(initdb), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
         "--no-sync"],
        what="initdb",
        timeout_s=120,
    )  # fmt: skip
    client = " clientcert=verify-ca" if require_client_cert else ""
    (data / "pg_hba.conf").write_text(
        "local all all trust\n"
        f"hostssl all all 127.0.0.1/32 trust{client}\n"
        "hostnossl all all 127.0.0.1/32 reject\n"
    )
    port = free_port()
    options = " ".join(
        [
            f"-p {port}",
            f"-k {runtime}",
            "-c listen_addresses=127.0.0.1",
            "-c ssl=on",
            f"-c ssl_cert_file={cert}",
            f"-c ssl_key_file={key}",
            f"-c ssl_ca_file={root}",
            "-c fsync=off",
            "-c max_connections=40",
        ]
    )
    start = [*as_user, str(pg_ctl), "-D", str(data), "-l", str(runtime / "postgres.log"), "-w",
             "-t", str(int(_START_TIMEOUT_S)), "-o", options, "start"]  # fmt: skip
    cluster = PrivatePostgres(port, data, runtime, start)
    try:
        _run(start, what="pg_ctl start", timeout_s=_START_TIMEOUT_S + 10)
        yield cluster
    finally:
        subprocess.run(
            [*as_user, str(pg_ctl), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
            check=False,  # best effort: the cluster may not have started
        )
        shutil.rmtree(runtime, ignore_errors=True)


# --- RabbitMQ ----------------------------------------------------------------------------------


@dataclass
class PrivateRabbitMQ:
    """A RabbitMQ node of one test with a TLS listener (and no plain one)."""

    node: str
    tls_port: int
    base: Path
    env: Mapping[str, str] = field(repr=False)
    ctl: Path = field(repr=False)
    server_script: Path | None = field(default=None, repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        """Start the node (again, after `kill()`: same name, ports and data) and wait for it."""
        assert self.server_script is not None
        with (self.base / "server.out").open("ab") as out:
            self.process = subprocess.Popen(
                [str(self.server_script)],
                cwd=self.base,
                env=dict(self.env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _await_node(self, self.process)

    def kill(self) -> None:
        """SIGKILL the node's whole process group (the Erlang VM and its helpers): a crash."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def restart(self) -> None:
        """Stop the broker application and start it again: every connection is closed."""
        self.rabbitmqctl("stop_app")
        self.rabbitmqctl("start_app", timeout_s=120)

    def url(self, user: str = "guest", password: str = "guest", **query: str) -> str:
        """`amqps://user:password@127.0.0.1:tls_port/?query`."""
        params = urlencode(query, safe="/:") if query else ""
        return (
            f"amqps://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.tls_port}/"
            + (f"?{params}" if params else "")
        )

    def rabbitmqctl(self, *args: str, timeout_s: float = 60.0) -> str:
        """Run `rabbitmqctl -n <this node>` with this node's cookie; its stdout."""
        return _run(
            [str(self.ctl), "-n", self.node, *args],
            what=f"rabbitmqctl {' '.join(args[:1])}",
            timeout_s=timeout_s,
            env=dict(self.env),
        )

    @property
    def log(self) -> str:
        logs = sorted((self.base / "log").glob("*.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs)


@contextmanager
def private_rabbitmq(
    directory: Path,
    server: KeyPair,
    ca: CertificateAuthority,
    *,
    require_client_cert: bool = False,
) -> Iterator[PrivateRabbitMQ]:
    """Start a node whose only listener is TLS with `server`'s certificate; stop it after.

    With `require_client_cert`, a client must present a certificate `ca` signed.
    """
    server_script = _binary("rabbitmq-server", RABBITMQ_BIN_DIRS, "a private node needs RabbitMQ")
    ctl = _binary("rabbitmqctl", RABBITMQ_BIN_DIRS, "a private node needs RabbitMQ")
    token = secrets.token_hex(3)
    base = directory / f"rmq-{token}"
    home = base / "home"
    for folder in (home, base / "mnesia", base / "log"):
        folder.mkdir(parents=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(16).upper())
    cookie.chmod(0o400)
    (base / "rabbitmq-env.conf").write_text("")
    (base / "enabled_plugins").write_text("[].\n")
    tls_port, node_port, dist_port = free_port(), free_port(), free_port()
    verify = "verify_peer" if require_client_cert else "verify_none"
    (base / "rabbitmq.conf").write_text(
        "\n".join(
            [
                "listeners.tcp = none",
                f"listeners.ssl.default = 127.0.0.1:{tls_port}",
                f"ssl_options.cacertfile = {ca.cert}",
                f"ssl_options.certfile = {server.cert}",
                f"ssl_options.keyfile = {server.key}",
                f"ssl_options.verify = {verify}",
                f"ssl_options.fail_if_no_peer_cert = {str(require_client_cert).lower()}",
                "log.console = false",
                "log.file.level = info",
            ]
        )
        + "\n"
    )
    node = f"sagaworks-test-{os.getpid()}-{token}@localhost"
    env = node_environment(base, node, node_port, dist_port)
    rabbit = PrivateRabbitMQ(node, tls_port, base, env, ctl, server_script)
    try:
        rabbit.start()
        yield rabbit
    finally:
        if rabbit.process is not None:
            _stop_node(rabbit, rabbit.process)
        shutil.rmtree(base, ignore_errors=True)


def _await_node(rabbit: PrivateRabbitMQ, process: subprocess.Popen[bytes]) -> None:
    """Wait until the node has booted; `await_startup` fails until it has registered."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            output = (rabbit.base / "server.out").read_text(errors="replace")
            raise RuntimeError(f"private RabbitMQ exited ({process.returncode}): {output}")
        try:
            rabbit.rabbitmqctl("await_startup", "--timeout", "30", timeout_s=40)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
        else:
            return


def _stop_node(rabbit: PrivateRabbitMQ, process: subprocess.Popen[bytes]) -> None:
    try:
        rabbit.rabbitmqctl("stop", timeout_s=60)
        process.wait(timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def node_environment(base: Path, node: str, node_port: int, dist_port: int) -> dict[str, str]:
    """The environment of a private RabbitMQ node living in `base` (its HOME is `base/home`)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "HOME": str(base / "home"),
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_PORT": str(node_port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "ERL_EPMD_ADDRESS": "127.0.0.1",
    }
