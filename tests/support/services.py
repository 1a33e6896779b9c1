"""Real services for tests: an SMTP sink as next hop, the proxy, the worker, the web server."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parents[2]


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A free port for a test server that must be told its port before it binds.

    Taken below the kernel's ephemeral range: a port the kernel handed out (bind to port 0)
    may be handed out again, between our check and the server's bind, to one of the many
    outgoing connections the tests make, and then the server fails with EADDRINUSE."""
    ephemeral = _ephemeral_ports()
    for _ in range(200):
        port = random.randrange(10000, 65000)
        if port in ephemeral:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None,
                  host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str] = field(default_factory=list)  # MAIL FROM's, e.g. SMTPUTF8


@dataclass
class SinkHandler:
    """The next hop: keeps every message it accepted; can be told to refuse."""

    messages: list[Received] = field(default_factory=list)
    refuse_with: str | None = None
    delay: float = 0  # seconds to wait before answering DATA (a hanging next hop)
    data_started: threading.Event = field(default_factory=threading.Event)  # a DATA came

    async def handle_DATA(self, server, session, envelope):
        self.data_started.set()
        if self.refuse_with:
            return self.refuse_with
        if self.delay:
            await asyncio.sleep(self.delay)
            if server.transport is None or server.transport.is_closing():
                return "421 4.4.2 client gone"  # never answered 250: not taken
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content or b"",
                                      list(envelope.mail_options)))
        return "250 2.0.0 sink took it"

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.messages


class Sink:
    def __init__(self, port: int | None = None, *, smtputf8: bool = False):
        self.port = port or free_port()
        self.handler = SinkHandler()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     enable_SMTPUTF8=smtputf8)

    def start(self) -> Sink:
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller._thread is not None:
            self.controller.stop()


class RedisServer:
    """A redis-server process of a test's own, to stop and start again (Redis outages).
    With ``data_dir``, a start loads the snapshot a SAVE wrote there (a restart from an
    older snapshot); it never saves by itself, not even when stopped."""

    def __init__(self, port: int | None = None, data_dir: Path | None = None,
                 options: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.data_dir = data_dir
        self.options = options  # more redis-server arguments (users, say)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        where = ["--dir", str(self.data_dir)] if self.data_dir is not None else []
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", *where, *self.options], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class TcpForwarder:
    """A TCP relay to a real server (e.g. PostgreSQL) that a test can cut and restore, to
    play a network outage of that server without touching the server itself, or freeze: a
    hung server, whose connections stay open while nothing answers."""

    frozen = False  # while True, no byte goes through (the kernel still acknowledges them)

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = free_port()
        from proxy.server import new_event_loop

        self.loop = new_event_loop()  # what `python -m proxy` runs on
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._server = None
        self._writers: set = set()

    async def _pipe(self, reader, writer):
        try:
            while data := await reader.read(65536):
                while self.frozen:
                    await asyncio.sleep(0.05)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _accept(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def start(self) -> TcpForwarder:
        async def listen():
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port,
                                                      reuse_address=True)
        self._call(listen())
        return self

    def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        async def close():
            if self._server is not None:
                self._server.close()
                self._server = None
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()
        self._call(close())

    def cut_when(self, event: threading.Event, timeout: float = 20) -> threading.Thread:
        """Cut, from a thread of its own, as soon as ``event`` is set (a next hop's DATA
        came, say): an outage that starts in the middle of what the test runs."""
        def run():
            event.wait(timeout)
            self.cut()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class Clock:
    """An injectable clock for the proxy: tests move time instead of sleeping."""

    def __init__(self, now: float | None = None):
        self.now = now if now is not None else time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class InProcessProxy:
    """The real proxy server loop in a thread, so a test can inject a clock."""

    def __init__(self, config: dict, clock: Clock):
        from proxy.server import listening_socket, new_event_loop

        self.clock = clock
        host, _, port = config["SMTP_LISTEN"].rpartition(":")
        self.host = host.strip("[]")  # "[::1]:port" listens on IPv6
        # Port 0 binds any free port (no race with another socket taking a port chosen
        # before); the proxy is then told where it really listens.
        self.sock = listening_socket(self.host, int(port), reuse_port=False)
        self.port = self.sock.getsockname()[1]
        self.config = dict(config, SMTP_LISTEN=f"{host}:{self.port}")
        self.loop = new_event_loop()  # the loop `python -m proxy` runs on
        self.thread = threading.Thread(target=self._run, daemon=True)
        self._stop: asyncio.Event | None = None

    def _run(self) -> None:
        from proxy import server

        asyncio.set_event_loop(self.loop)

        async def main():
            self._stop = asyncio.Event()
            task = asyncio.create_task(server.serve(self.config, self.sock, clock=self.clock,
                                                    install_signals=False))
            await self._stop.wait()
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

        try:
            self.loop.run_until_complete(main())
        finally:
            try:  # as asyncio.run does: no task left to be destroyed pending in a later test
                pending = asyncio.all_tasks(self.loop)
                for task in pending:
                    task.cancel()
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()  # its descriptors, or a long test run runs out

    def start(self) -> InProcessProxy:
        self.thread.start()
        wait_for_port(self.port, host=self.host)
        return self

    def stop(self) -> None:
        if self._stop is not None and not self.loop.is_closed():  # stopped once already
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=10)
        self.sock.close()


def process_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_process(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    fh = open(log, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def kill_worker(proc: subprocess.Popen) -> None:
    """SIGKILL an RQ worker started in a session of its own, and its work horse: RQ puts the
    horse in a process group of its own (``os.setpgrp``), so killing the worker's group alone
    leaves the job running; a crash kills both."""
    horses = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == proc.pid:  # the parent's pid
            horses.append(int(stat.parent.name))
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in horses:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def procfile_worker(*options: str) -> list[str]:
    """The Procfile's ``worker`` command, with this environment's ``rq`` and ``options``
    (``--burst``) added: tests run the worker exactly as a deployment does."""
    line = next(x for x in (ROOT / "Procfile").read_text().splitlines()
                if x.startswith("worker:"))
    program, command, *rest = line.split(":", 1)[1].split()
    assert (program, command) == ("rq", "worker"), line
    return [str(Path(sys.executable).parent / "rq"), "worker", *options, *rest]


def run_worker_burst(env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    """A real RQ worker, in burst mode, as the Procfile runs it (with the scheduler)."""
    return subprocess.run(procfile_worker("--burst"), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
