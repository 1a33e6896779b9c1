"""Run the proxy: one asyncio loop per process, N processes sharing the port (SO_REUSEPORT).

Each process loads the configuration and starts listening; when the database is down at
start-up it listens anyway (answering 4xx) and keeps trying in the background.
The parent process only supervises: a worker that dies is started again. Before forking it
creates the shared connection counts (proxy/connections.py), so the cap on connections per
client IP holds across all processes.

SIGTERM or SIGINT (the parent forwards either to its workers as SIGTERM) drains each process:
the listening socket closes, sessions between transactions get 421 at once, a transaction in
flight finishes (for up to SMTP_DRAIN_SECONDS: the sender gets the next hop's answer, not a
dropped connection), and only then does the process stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time

from outgoing import jobs, locks, redis_conn, redis_keys
from outgoing.config import parse_hostport, parse_networks
from outgoing.db import make_sessionmaker, session_scope
from proxy import metrics, metrics_server
from proxy.connections import (
    ConnectionCounts,
    OpenConnections,
    default_max_connections,
    raise_file_limit,
)
from proxy.data_budget import DataBudget
from proxy.directory import Directory
from proxy.handler import OutboundHandler
from proxy.identities import IdentityFlusher
from proxy.protocol import COMMAND_CALL_LIMITS, protocol_factory
from proxy.tls import ensure_certificate, server_context

log = logging.getLogger("proxy")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed (a dependency on every platform that has it), else
    asyncio's: each proxy process spends a sixth of its CPU in the event loop itself."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run(coroutine) -> None:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(coroutine)


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio turns Nagle off only on sockets that say they are TCP,
    # and with Nagle on every multi-line reply (EHLO) waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def _load(directory: Directory, sessionmaker, redis_sync) -> bool:
    """Load the configuration, then put the locks the database holds back into Redis (in
    case Redis lost its data). Whether the locks were written back (False too when the
    database cannot be read yet)."""
    try:
        await directory.reload()
    except Exception as exc:
        log.warning("cannot load configuration yet (%s); retrying", exc)
        return False

    return await _restore(sessionmaker, redis_sync)


async def _restore(sessionmaker, redis_sync) -> bool:
    """Write the database's locks back into Redis: whether that was done."""
    def restore():
        with session_scope(sessionmaker) as db:
            restored = locks.restore_redis_locks(db, redis_sync)
        # Also make sure the worker's periodic chains (sweep, retention, reports) exist. Their
        # Redis (RQ_REDIS_URL) may be another server, still down: that must not keep the
        # locks out, so it comes second and fails on its own.
        try:
            jobs.ensure_periodic(redis_sync)
        except Exception as exc:
            log.warning("could not make sure the worker's periodic jobs exist: %s", exc)
        return restored

    try:
        restored = await asyncio.get_running_loop().run_in_executor(None, restore)
        if restored:
            log.info("restored %d locks into Redis", restored)
        return True
    except Exception as exc:
        log.warning("could not restore locks into Redis: %s", exc)
        return False


async def _keep_locks(redis_async, sessionmaker, redis_sync, every: float,
                      known: frozenset[str] | None = None) -> None:
    """Locks are checked in Redis only, so Redis losing its data while the proxy runs would
    unlock locked senders: once a refresh, the database's locks (and the worker's periodic
    chains) are written back when

    - the mark of ``restore_redis_locks`` is gone (one EXISTS): Redis restarted without
      persistence, or was flushed;
    - a Redis server's run_id changed (one INFO): it restarted, maybe from a snapshot older
      than the newest locks, which still holds the mark; or, in a Cluster, a replica took
      over from its master, and asynchronous replication may have lost the last writes.

    Writing back sets only keys that are missing and takes away those the database no
    longer holds, so a restart that lost nothing costs a read of the locked rows and one
    SCAN of the lock keys. ``known``: the run_ids the start-up's write-back saw, if it
    was made."""
    ids_unknown = False
    while True:
        await asyncio.sleep(every)
        try:
            marked = await redis_async.exists(redis_keys.LOCKS_MIRRORED)
        except Exception as exc:  # Redis down: the messages are answered 451 meanwhile
            log.debug("cannot check the locks' mark: %s", exc)
            continue
        try:
            servers = await _server_ids(redis_async)
        except Exception as exc:  # INFO refused (an ACL without @dangerous, a Redis proxy)
            if not ids_unknown:
                log.warning("cannot read the Redis servers' run_id (%s): only a missing mark "
                            "will have the locks written back", exc)
            ids_unknown, servers = True, known
        else:
            ids_unknown = False
        if marked and known is not None and servers == known:
            continue
        if not marked:
            log.warning("Redis lost the locks' mark; writing the database's locks back")
        elif known is not None:
            log.warning("a Redis server restarted or was replaced (run_id %s, was %s); "
                        "writing the database's locks back", ", ".join(sorted(servers or ())),
                        ", ".join(sorted(known)))
        # (With ``known`` None, the first check writes them back too: the start-up's
        # write-back failed, Redis down then, and it may come up from an older snapshot.)
        if await _restore(sessionmaker, redis_sync):
            known = servers if servers is not None else frozenset()  # else tried again


async def _server_ids(redis_async) -> frozenset[str]:
    """The run_id of every Redis server (every Cluster master) that holds locks."""
    if redis_conn.is_cluster(redis_async):
        found = await redis_async.info("server", target_nodes=redis_async.PRIMARIES)
    else:
        found = await redis_async.info("server")
    if "run_id" in found:
        return frozenset([str(found["run_id"])])
    return frozenset(str(info.get("run_id")) for info in found.values())


async def _keep_loaded(directory: Directory, sessionmaker, redis_sync) -> None:
    """Retry the first load until the database answers, then follow configuration changes."""
    while not directory.ready:
        await asyncio.sleep(1)
        await _load(directory, sessionmaker, redis_sync)
    await directory.watch()


def _freeze_startup_heap() -> None:
    """Put what start-up built (modules, SQLAlchemy's and redis-py's state, the directory)
    out of the cyclic garbage collector's reach. Each connection's objects outlive a few
    young collections and pile up in the oldest generation, and every so often that makes
    the collector walk the whole heap, start-up's hundred thousand objects and more included;
    frozen, those are skipped. That was 3 % of the proxy's CPU per message (interleaved runs
    of bench/bench_proxy.py's load). Frozen objects are still freed by reference counting;
    only a cycle among them would stay, and they are a fixed set made once: nothing grows."""
    gc.collect()
    gc.freeze()


async def serve(config: dict, sock: socket.socket, clock=time.time,
                install_signals: bool = True,
                connections: ConnectionCounts | None = None,
                freeze_heap: bool = False) -> None:
    """Serve SMTP on ``sock`` until a signal (or cancellation). ``freeze_heap``: this
    process does nothing else (``python -m proxy``), see :func:`_freeze_startup_heap`."""
    # Bounds of the driver's own, so that a thread blocked on a hung database comes back.
    sessionmaker = make_sessionmaker(config["DATABASE_URL"],
                                     timeout=float(config["PROXY_DATABASE_TIMEOUT"]))
    # Short timeouts: a sender waits on every Redis call, and a hung Redis must cost it about
    # a second before its 451, not the panel's and the worker's 5 s.
    timeout = float(config["PROXY_REDIS_TIMEOUT"])
    # REDIS_URL may name a Redis Cluster; jobs go to RQ_REDIS_URL (outgoing/redis_conn.py).
    redis_async = redis_conn.connect_async(config["REDIS_URL"], socket_timeout=timeout,
                                           socket_connect_timeout=timeout,
                                           health_check_interval=30)
    redis_sync = redis_conn.connect(config["REDIS_URL"], rq_url=config["RQ_REDIS_URL"],
                                    socket_timeout=timeout, socket_connect_timeout=timeout)
    directory = Directory(sessionmaker, redis_async, config["CONFIG_REFRESH_SECONDS"])
    flusher = IdentityFlusher(redis_async, sessionmaker, clock,
                              float(config.get("IDENTITY_FLUSH_SECONDS", 2.0)))
    handler = OutboundHandler(config=config, directory=directory, redis=redis_async,
                              redis_sync=redis_sync, sessionmaker=sessionmaker, clock=clock,
                              flusher=flusher)
    tls = server_context(config["TLS_CERT"], config["TLS_KEY"], config["SMTP_HOSTNAME"])
    trusted = config["SMTP_TRUSTED"]
    open_connections = OpenConnections(int(config["SMTP_MAX_CONNECTIONS"])
                                       or default_max_connections())
    data_budget = DataBudget(int(config["SMTP_DATA_BUDGET"]), held_gauge=metrics.DATA_HELD)
    metrics.DATA_BUDGET.set(data_budget.limit)

    factory = protocol_factory(handler, hostname=config["SMTP_HOSTNAME"],
                               ident="Outbound Guard", tls_context=tls,
                               require_starttls=False, auth_require_tls=not trusted,
                               data_size_limit=config["MAX_MESSAGE_SIZE"],
                               enable_SMTPUTF8=True, timeout=300,
                               command_call_limit=dict(COMMAND_CALL_LIMITS),
                               connections=connections or ConnectionCounts(1),
                               open_connections=open_connections,
                               data_budget=data_budget,
                               max_connections_per_ip=config["SMTP_MAX_CONNECTIONS_PER_IP"],
                               max_junk_commands=config["SMTP_MAX_JUNK_COMMANDS"],
                               line_length_limit=int(config["SMTP_MAX_LINE_LENGTH"]) + 2,
                               proxy_protocol_from=parse_networks(
                                   "SMTP_PROXY_PROTOCOL_FROM",
                                   config.get("SMTP_PROXY_PROTOCOL_FROM", "")))

    servers = None  # the run_ids the start-up's write-back saw: no second one at once
    if await _load(directory, sessionmaker, redis_sync):
        with contextlib.suppress(Exception):
            servers = await _server_ids(redis_async)
    if freeze_heap:
        _freeze_startup_heap()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, sock=sock)
    tasks = [asyncio.create_task(_keep_loaded(directory, sessionmaker, redis_sync)),
             asyncio.create_task(flusher.run()),
             asyncio.create_task(_keep_locks(redis_async, sessionmaker, redis_sync,
                                             float(config["CONFIG_REFRESH_SECONDS"]),
                                             servers))]
    stop = asyncio.Event()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    log.info("SMTP proxy pid %d listening on %s, next hop %s, at most %d connections",
             os.getpid(), config["SMTP_LISTEN"], config["UPSTREAM_SMTP"],
             open_connections.limit)
    try:
        await stop.wait()
    finally:
        # Stopped by a signal: drain. Cancelled (tests' in-process proxy): 421 to every
        # session at once. server.wait_closed() is no help: with uvloop on Python 3.11 it
        # returns at once, and then the runner cancels every session mid-transaction.
        server.close()
        drain = float(config["SMTP_DRAIN_SECONDS"]) if stop.is_set() else 0
        answering = float(config["UPSTREAM_TIMEOUT"]) + 5 if stop.is_set() else 0
        try:
            await open_connections.drain(drain, answering)
        except Exception:
            log.exception("shutdown: draining the connections failed")
        for task in tasks:
            task.cancel()
        try:
            await asyncio.wait_for(handler.close(), timeout=10)
        except Exception as exc:
            log.warning("shutdown: %s", exc)
        await redis_async.aclose()
        redis_sync.close()
        sessionmaker.kw["bind"].dispose()


def _child(config: dict, host: str, port: int, connections: ConnectionCounts,
           index: int) -> None:
    """A worker process: its own socket on the shared port, its own loop, its own array of
    the shared connection counts."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    metrics_server.close_inherited()
    code = 0
    try:
        connections.worker = index
        sock = listening_socket(host, port, reuse_port=True)
        _run(serve(config, sock, connections=connections, freeze_heap=True))
    except BaseException:
        log.exception("SMTP proxy worker %d failed", os.getpid())
        code = 1
    finally:
        os._exit(code)


def run(config: dict, workers: int) -> None:
    """Start ``workers`` processes on one listening port; the parent only supervises and
    starts a worker again when one dies (at most once a second), after forgetting the
    connections the dead one had counted."""
    host, port = parse_hostport("SMTP_LISTEN", config["SMTP_LISTEN"])
    raise_file_limit()  # before the workers fork: they inherit it
    ensure_certificate(config["TLS_CERT"], config["TLS_KEY"], config["SMTP_HOSTNAME"])
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_server.prepare_multiprocess(config)
    metrics_server.serve(config)  # from this process, the sum of all of them
    if workers <= 1:
        sock = listening_socket(host, port, reuse_port=False)
        _run(serve(config, sock, freeze_heap=True))
        return
    stopping = False
    connections = ConnectionCounts(workers)

    def spawn(index: int) -> int:
        pid = os.fork()
        if pid == 0:
            _child(config, host, port, connections, index)
        return pid

    children = {spawn(index): index for index in range(workers)}

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        for child in list(children):
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        if index is None:
            continue
        connections.clear(index)
        metrics_server.child_died(pid)
        if not stopping:
            log.error("SMTP proxy worker %d exited (status %d); starting another", pid,
                      status)
            time.sleep(1)
            if not stopping:
                children[spawn(index)] = index
