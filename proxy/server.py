"""Run the proxy: one asyncio loop per process, N processes sharing the port (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time

import redis
import redis.asyncio as aioredis
from aiosmtpd.smtp import SMTP

from outgoing import locks
from outgoing.config import parse_hostport
from outgoing.db import make_sessionmaker, session_scope
from proxy.directory import Directory
from proxy.handler import OutboundHandler
from proxy.tls import server_context

log = logging.getLogger("proxy")


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class LimitedSMTP(SMTP):
    """aiosmtpd's SMTP with a bounded command line and a clean answer to abusive input."""

    command_size_limit = 512


async def serve(config: dict, sock: socket.socket, clock=time.time,
                install_signals: bool = True) -> None:
    sessionmaker = make_sessionmaker(config["DATABASE_URL"])
    redis_async = aioredis.from_url(config["REDIS_URL"], socket_timeout=5,
                                    socket_connect_timeout=5, health_check_interval=30)
    redis_sync = redis.from_url(config["REDIS_URL"], socket_timeout=5,
                                socket_connect_timeout=5)
    directory = Directory(sessionmaker, redis_async, config["CONFIG_REFRESH_SECONDS"])
    while True:
        try:
            await directory.reload()
            break
        except Exception as exc:
            log.warning("cannot load configuration yet (%s); retrying", exc)
            await asyncio.sleep(1)
    try:
        with session_scope(sessionmaker) as db:
            restored = locks.restore_redis_locks(db, redis_sync)
        if restored:
            log.info("restored %d locks into Redis", restored)
    except Exception as exc:
        log.warning("could not restore locks into Redis: %s", exc)

    handler = OutboundHandler(config=config, directory=directory, redis=redis_async,
                              redis_sync=redis_sync, sessionmaker=sessionmaker, clock=clock)
    tls = server_context(config["TLS_CERT"], config["TLS_KEY"], config["SMTP_HOSTNAME"])
    trusted = config["SMTP_TRUSTED"]

    def factory():
        return LimitedSMTP(handler, hostname=config["SMTP_HOSTNAME"],
                           ident="Outbound Guard", tls_context=tls,
                           require_starttls=False, auth_require_tls=not trusted,
                           data_size_limit=config["MAX_MESSAGE_SIZE"],
                           enable_SMTPUTF8=True, timeout=300)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, sock=sock)
    watcher = asyncio.create_task(directory.watch())
    stop = asyncio.Event()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    log.info("SMTP proxy pid %d listening on %s, next hop %s", os.getpid(),
             config["SMTP_LISTEN"], config["UPSTREAM_SMTP"])
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        server.close()
        await server.wait_closed()
        await redis_async.aclose()
        redis_sync.close()


def run(config: dict, workers: int) -> None:
    """Start ``workers`` processes on one listening port; the parent only supervises."""
    host, port = parse_hostport("SMTP_LISTEN", config["SMTP_LISTEN"])
    if workers <= 1:
        sock = listening_socket(host, port, reuse_port=False)
        asyncio.run(serve(config, sock))
        return
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            sock = listening_socket(host, port, reuse_port=True)
            try:
                asyncio.run(serve(config, sock))
            finally:
                os._exit(0)
        children.append(pid)

    def forward(signum, _frame):
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        os.waitpid(child, 0)
