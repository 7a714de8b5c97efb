"""A private three-node RabbitMQ cluster on loopback, for the failover test.

Each node has its own name, ports, data and log folders; all share one Erlang
cookie (each in a HOME of its own) so they can cluster, and nothing here can
reach the shared node. Nodes listen on plain AMQP on 127.0.0.1 only. A node
can be killed outright (SIGKILL to its process group) and started again on
its old data, when it rejoins the cluster by itself.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from private_services import RABBITMQ_BIN_DIRS, _binary, _run, free_port, node_environment

__all__ = ["ClusterNode", "rabbitmq_cluster"]

_BOOT_TIMEOUT_S = 120.0


@dataclass
class ClusterNode:
    """One node: how to reach it, control it, and kill it."""

    name: str
    amqp_port: int
    base: Path
    env: dict[str, str] = field(repr=False)
    server: Path = field(repr=False)
    ctl: Path = field(repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def url(self, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.amqp_port}/"

    def rabbitmqctl(self, *args: str, timeout_s: float = 60.0) -> str:
        return _run(
            [str(self.ctl), "-n", self.name, *args],
            what=f"rabbitmqctl {args[0]}",
            timeout_s=timeout_s,
            env=self.env,
        )

    def start(self) -> None:
        """Start the node (on its old data, if it ran before) and wait until it has booted."""
        with (self.base / "server.out").open("ab") as out:
            self.process = subprocess.Popen(
                [str(self.server)],
                cwd=self.base,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + _BOOT_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                output = (self.base / "server.out").read_text(errors="replace")
                raise RuntimeError(f"RabbitMQ node {self.name} exited: {output[-2000:]}")
            try:
                self.rabbitmqctl("await_startup", "--timeout", "30", timeout_s=40)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
            else:
                return

    def kill(self) -> None:
        """SIGKILL the node's whole process group: no goodbye to its peers or clients."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.rabbitmqctl("stop", timeout_s=60)
            self.process.wait(timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            self.kill()

    def queue_leaders(self) -> dict[str, str]:
        """Queue name -> the node that leads it, as this node sees it."""
        listed = self.rabbitmqctl("list_queues", "name", "leader", "--formatter", "json", "-q")
        return {row["name"]: row["leader"] for row in json.loads(listed)}


@contextmanager
def rabbitmq_cluster(directory: Path, size: int = 3) -> Iterator[list[ClusterNode]]:
    """Start `size` nodes, join the others to the first, and stop them all afterwards."""
    server = _binary("rabbitmq-server", RABBITMQ_BIN_DIRS, "a cluster needs RabbitMQ")
    ctl = _binary("rabbitmqctl", RABBITMQ_BIN_DIRS, "a cluster needs RabbitMQ")
    token = secrets.token_hex(3)
    cookie = secrets.token_hex(16).upper()
    nodes = [_node(directory, f"{token}-{i}", cookie, server, ctl) for i in range(1, size + 1)]
    try:
        for node in nodes:
            node.start()
        first = nodes[0]
        for node in nodes[1:]:
            node.rabbitmqctl("stop_app")
            node.rabbitmqctl("join_cluster", first.name, timeout_s=120)
            node.rabbitmqctl("start_app", timeout_s=120)
        yield nodes
    finally:
        for node in reversed(nodes):
            node.stop()
        for node in nodes:
            shutil.rmtree(node.base, ignore_errors=True)


def _node(directory: Path, token: str, cookie: str, server: Path, ctl: Path) -> ClusterNode:
    base = directory / f"rmq-cluster-{token}"
    home = base / "home"
    for folder in (home, base / "mnesia", base / "log"):
        folder.mkdir(parents=True)
    cookie_file = home / ".erlang.cookie"
    cookie_file.write_text(cookie)
    cookie_file.chmod(0o400)
    (base / "rabbitmq-env.conf").write_text("")
    (base / "enabled_plugins").write_text("[].\n")
    amqp_port, dist_port = free_port(), free_port()
    (base / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = 127.0.0.1:{amqp_port}\n"
        "log.console = false\nlog.file.level = info\n"
        # A node cut off from the majority stops serving instead of diverging.
        "cluster_partition_handling = pause_minority\n"
    )
    name = f"sagaworks-cluster-{os.getpid()}-{token}@localhost"
    env = node_environment(base, name, amqp_port, dist_port)
    return ClusterNode(name, amqp_port, base, env, server, ctl)
