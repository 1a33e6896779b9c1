"""Watching what the proxy asks of Redis, with MONITOR."""

from __future__ import annotations

import socket


class ScriptsRun:
    """Counts the scripts run (EVALSHA) in this test's Redis database while inside, with
    MONITOR: the server's command statistics would count other tests' too."""

    def __init__(self, redis_client):
        self.redis = redis_client
        self.kwargs = redis_client.connection_pool.connection_kwargs
        self.tag = f"[{int(self.kwargs.get('db', 0))} ".encode()
        self.count = 0

    def __enter__(self):
        path = self.kwargs.get("path")  # the embedded Redis listens on a unix socket
        if path:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(10)
            self.sock.connect(path)
        else:
            self.sock = socket.create_connection(
                (self.kwargs.get("host", "127.0.0.1"), int(self.kwargs.get("port", 6379))),
                timeout=10)
        self.sock.sendall(b"MONITOR\r\n")
        assert self.sock.recv(5) == b"+OK\r\n"
        return self

    def __exit__(self, *exc):
        marker = f"end-{id(self)}".encode()
        self.redis.echo(marker)  # MONITOR shows it after everything before it: read up to it
        seen = b""
        while marker not in seen:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            seen += chunk
        self.sock.close()
        self.count = sum(1 for line in seen.split(b"\r\n")
                         if self.tag in line and b'"evalsha"' in line.lower())
        return False
