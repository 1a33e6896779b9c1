"""Benchmark of the SMTP proxy under load (prints figures and ratios; never a test).

Starts its own redis-server, a SQLite database, a sink as next hop and the real
``python -m proxy``, then pushes messages of 5 KB over 20 concurrent connections, a new SMTP
connection per message (the worst case: a web form or PHP's mail() per message), and again
with the 20 connections each carrying many messages (a sending MTA with a backlog, which
caches its connections) for (b) and (c):

  (a) the sink alone
  (b) a bare aiosmtpd + aiosmtplib relay with no policy in front of the sink
  (c) the proxy: IP authentication, every connection window and recipients per day limited,
      identities by envelope sender (and the content stages it always runs)
  (d) the proxy with STARTTLS + AUTH PLAIN on every connection

and prints messages per second, (c)/(b), the scaling of ``--workers`` from 1 to N processes,
Redis commands and round trips per message (INFO commandstats deltas; MONITOR tells script
internals from client round trips), Redis memory per active user and the latency the proxy
adds (p50/p99, one message at a time, and p99 under load).

    python bench/bench_proxy.py                 # 10,000 messages per run
    python bench/bench_proxy.py --messages 1000 # a quick look
    python bench/bench_proxy.py --profile       # also: where a proxy worker spends its time
    python bench/bench_proxy.py --tools python  # aiosmtplib load and an aiosmtpd sink throughout

Load generator and sink. The load generator and the sink share the machine's cores with the
proxy, so whatever CPU they burn per message is taken from the proxy, and the scaling from 1 to
N proxy processes measures them as much as the proxy. By default (``--tools postfix``) the load
for (a)-(c) comes from Postfix's ``smtp-source`` and the next hop is Postfix's ``smtp-sink``:
the C test tools made for exactly this, about 0.06 ms of CPU per message each, against about
0.5 ms for an aiosmtplib client and 0.6 ms for an aiosmtpd sink. They are taken from the PATH
or /usr/sbin, or else Debian's postfix package is downloaded and unpacked (not installed, no
daemon) into bench/.tools/. (d) needs STARTTLS and AUTH, which smtp-source does not speak, so
it always uses aiosmtplib clients; so do the latency figures, which smtp-source does not give.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SENDER_COUNT = 50  # distinct envelope senders, so the identity stage has real work
PASSWORD = "Bench-pass-123"


# -- helpers -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def message(size: int) -> bytes:
    head = ("From: bench@bench.example\r\nTo: sink@example.org\r\nSubject: bench\r\n"
            "Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench@bench.example>\r\n"
            "\r\n")
    line = "The quick brown fox jumps over the lazy dog, again and again. 0123456789\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return (head + body).encode()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its direct children (the proxy's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    total = 0.0
    for each in pids:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def quiet_aiosmtpd() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)


# -- Postfix's C test tools ----------------------------------------------------------------

TOOLS = ROOT / "bench" / ".tools" / "postfix"


def postfix_tools() -> tuple[str, str, dict[str, str]] | None:
    """(smtp-source, smtp-sink, environment) or None when they cannot be had."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    source, sink = shutil.which("smtp-source", path=path), shutil.which("smtp-sink", path=path)
    if source and sink:
        return source, sink, {}
    unpacked = TOOLS / "usr" / "sbin"
    if not (unpacked / "smtp-source").exists() and shutil.which("apt-get") and \
            shutil.which("dpkg"):
        print("  fetching Postfix's smtp-source and smtp-sink (apt-get download postfix, "
              "unpacked into bench/.tools/)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", "postfix"], cwd=tmp, capture_output=True)
            TOOLS.mkdir(parents=True, exist_ok=True)
            for deb in Path(tmp).glob("postfix_*.deb"):
                subprocess.run(["dpkg", "-x", str(deb), str(TOOLS)], check=True)
    if not (unpacked / "smtp-source").exists():
        return None
    libs = str(TOOLS / "usr" / "lib" / "postfix")
    env = {"LD_LIBRARY_PATH": os.pathsep.join(filter(None, [libs,
                                                             os.environ.get("LD_LIBRARY_PATH")]))}
    return str(unpacked / "smtp-source"), str(unpacked / "smtp-sink"), env


def start_smtp_sink(tools: tuple[str, str, dict[str, str]], port: int) -> subprocess.Popen:
    """Postfix's smtp-sink: takes every message, keeps nothing (as root it must drop to a user)."""
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([tools[1], *user, "-m", "1024", f"127.0.0.1:{port}", "1024"],
                            env=dict(os.environ, **tools[2]), stdout=subprocess.DEVNULL)
    wait_for_port(port)
    return proc


def load_smtp_source(tools: tuple[str, str, dict[str, str]], port: int, messages: int,
                     concurrency: int, size: int, generators: int, reuse: bool = False) -> dict:
    """``generators`` smtp-source processes, each with its own envelope sender; ``reuse``
    sends every message of a session over its one connection (as a sending MTA with a
    backlog does), else each message comes on a new connection."""
    eml = Path(tempfile.mkstemp(suffix=".eml")[1])
    eml.write_bytes(message(size).replace(b"\r\n", b"\n"))  # smtp-source adds the CR
    env = dict(os.environ, **tools[2])
    before = os.times()
    started = time.monotonic()
    procs = []
    for i in range(generators):
        count = messages // generators + (1 if i < messages % generators else 0)
        sessions = max(1, concurrency // generators)
        procs.append(subprocess.Popen(
            [tools[0], *(["-d"] if reuse else []), "-s", str(sessions), "-m", str(count),
             "-F", str(eml), "-C", "5",
             "-f", f"sender{i}@bench.example", "-t", "sink@example.org", "-M", "bench.example",
             f"127.0.0.1:{port}"], env=env, stderr=subprocess.PIPE))
    failed = 0
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        if proc.returncode:
            failed += 1
            print(f"    smtp-source failed: {err.decode(errors='replace').strip()[:300]}",
                  file=sys.stderr)
    seconds = time.monotonic() - started
    after = os.times()
    eml.unlink()
    ok = 0 if failed else messages
    return {"rate": ok / seconds, "seconds": seconds, "ok": ok, "failed": failed,
            "load_cpu": (after.children_user - before.children_user)
            + (after.children_system - before.children_system),
            "p50": float("nan"), "p99": float("nan")}


# -- servers in their own processes ---------------------------------------------------------

def serve_sink(port: int) -> None:
    """The next hop: takes every message, keeps nothing."""
    from aiosmtpd.smtp import SMTP

    quiet_aiosmtpd()

    class Sink:
        async def handle_DATA(self, server, session, envelope):
            return "250 2.0.0 taken"

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Sink(), hostname="sink"), "127.0.0.1",
                                          port, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(main())


def serve_relay(port: int, upstream: int) -> None:
    """(b): aiosmtpd in, aiosmtplib out, one upstream connection per message, no policy."""
    import aiosmtplib
    from aiosmtpd.smtp import SMTP

    quiet_aiosmtpd()

    class Relay:
        async def handle_DATA(self, server, session, envelope):
            try:
                await aiosmtplib.send(envelope.original_content, sender=envelope.mail_from,
                                      recipients=envelope.rcpt_tos, hostname="127.0.0.1",
                                      port=upstream, start_tls=False, timeout=30)
            except aiosmtplib.SMTPException as exc:
                return f"451 4.4.0 {exc}"
            return "250 2.0.0 relayed"

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Relay(), hostname="relay"),
                                          "127.0.0.1", port, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(main())


def start_server(mode: str, *args) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, mode, *map(str, args)], cwd=ROOT)
    wait_for_port(int(args[0]))
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- load generation -----------------------------------------------------------------------

async def _generate(port: int, count: int, concurrency: int, size: int, auth: bool,
                    source: list[str] | None) -> tuple[list[float], int]:
    import ssl

    import aiosmtplib

    data = message(size)
    latencies: list[float] = []
    failures = 0
    next_index = 0
    # One client TLS context for all connections, as a real sending server keeps one (making
    # one per connection loads the CA store each time and would measure the client).
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE

    async def worker() -> None:
        nonlocal next_index, failures
        while next_index < count:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=port, timeout=60, start_tls=auth,
                validate_certs=False, tls_context=tls if auth else None,
                source_address=(source[index % len(source)], 0) if source else None)
            try:
                await smtp.connect()
                if auth:
                    await smtp.login("bench@bench.example", PASSWORD)
                sender = f"sender{index % SENDER_COUNT}@bench.example"
                await smtp.sendmail(sender, ["sink@example.org"], data)
                await smtp.quit()
                latencies.append(time.perf_counter() - started)
            except (aiosmtplib.SMTPException, OSError) as exc:
                failures += 1
                if failures <= 3:
                    print(f"    failure: {exc}", file=sys.stderr)
                smtp.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, failures


def _generator_process(port, count, concurrency, size, auth, source, go, results):
    go.wait()
    started, cpu = time.monotonic(), time.process_time()
    latencies, failures = asyncio.run(_generate(port, count, concurrency, size, auth, source))
    results.put((started, time.monotonic(), latencies, failures, time.process_time() - cpu))


def load(port: int, messages: int, concurrency: int, size: int, generators: int,
         auth: bool = False, source: list[str] | None = None) -> dict:
    """Push ``messages`` over ``concurrency`` connections from ``generators`` processes."""
    ctx = multiprocessing.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    per = [messages // generators + (1 if i < messages % generators else 0)
           for i in range(generators)]
    conns = [max(1, concurrency // generators)] * generators
    procs = [ctx.Process(target=_generator_process,
                         args=(port, per[i], conns[i], size, auth, source, go, results))
             for i in range(generators) if per[i]]
    for proc in procs:
        proc.start()
    time.sleep(1.0)  # let every generator import what it needs before the clock starts
    go.set()
    outcome = [results.get(timeout=1800) for _ in procs]
    for proc in procs:
        proc.join()
    start = min(o[0] for o in outcome)
    end = max(o[1] for o in outcome)
    latencies = [x for o in outcome for x in o[2]]
    return {"rate": len(latencies) / (end - start), "seconds": end - start,
            "ok": len(latencies), "failed": sum(o[3] for o in outcome),
            "load_cpu": sum(o[4] for o in outcome),
            "p50": percentile(latencies, 0.50) * 1000, "p99": percentile(latencies, 0.99) * 1000}


def sequential_latencies(port: int, messages: int, size: int) -> list[float]:
    """One message at a time: latency without queueing, in milliseconds."""
    latencies, failures = asyncio.run(_generate(port, messages, 1, size, False, None))
    if failures:
        print(f"    {failures} sequential failures", file=sys.stderr)
    return [x * 1000 for x in latencies]


# -- the world: Redis, database, users, the proxy ------------------------------------------

class World:
    def __init__(self, memory_users: int):
        self.dir = Path(tempfile.mkdtemp(prefix="og-bench-"))
        self.instance = self.dir / "instance"
        self.instance.mkdir()
        self.redis_port = free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        wait_for_port(self.redis_port)
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.database_url = f"sqlite:///{self.instance / 'bench.db'}"
        self.memory_users = self._create_users(memory_users)

    def _create_users(self, memory_users: int) -> dict[str, int]:
        from outgoing.db import make_sessionmaker, session_scope
        from outgoing.models import Base
        from outgoing.users import Authority, create_outgoing_user, get_or_create_domain

        factory = make_sessionmaker(self.database_url)
        Base.metadata.create_all(factory.kw["bind"])
        big = 10**9
        limits = dict(connection_limits_enabled=True, limit_per_month=big, limit_per_week=big,
                      limit_per_day=big, limit_per_hour=big, limit_per_minute=big,
                      maximum_recipients_per_day=big, identification_method="envelope_sender",
                      # detection scores every message but, in shadow mode, holds none (new
                      # users enforce by default, and a throughput run is a burst)
                      compromise_detection=True, detection_shadow_mode=True)
        with session_scope(factory) as db:
            domain = get_or_create_domain(db, "bench.example")
            create_outgoing_user(db, domain=domain, kind="ip", name="127.0.0.0/8", **limits)
            create_outgoing_user(db, domain=domain, kind="user", name="bench@bench.example",
                                 password=PASSWORD, **limits)
            other = get_or_create_domain(db, "memory.example")
            users = {}
            for n in range(memory_users):
                address = f"127.0.{2 + n // 250}.{1 + n % 250}"
                # inside bench.example's /8, as a super admin who confirmed the overlap
                users[address] = create_outgoing_user(
                    db, domain=other, kind="ip", name=address,
                    authority=Authority(confirm_overlap=True), **limits).id
        factory.kw["bind"].dispose()
        return users

    def client(self):
        import redis

        return redis.Redis(port=self.redis_port)

    def start_proxy(self, port: int, sink: int, workers: int,
                    profile: Path | None = None) -> subprocess.Popen:
        env = dict(os.environ, INSTANCE_PATH=str(self.instance),
                   DATABASE_URL=self.database_url, REDIS_URL=self.redis_url,
                   SMTP_LISTEN=f"127.0.0.1:{port}", UPSTREAM_SMTP=f"127.0.0.1:{sink}",
                   SMTP_HOSTNAME="proxy.bench.example", LOG_LEVEL="INFO")
        command = [sys.executable]
        if profile is not None:
            command += ["-m", "cProfile", "-o", str(profile)]
        command += ["-m", "proxy", "--workers", str(workers)]
        log = open(self.dir / f"proxy-{port}.log", "wb")  # noqa: SIM115 - lives with the proc
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
        wait_for_port(port)
        time.sleep(0.5 + 0.5 * workers)  # every worker loaded and listening
        return proc

    def close(self) -> None:
        stop(self.redis)
        shutil.rmtree(self.dir, ignore_errors=True)


REUSED = "connections reused: "


def why_it_scales(label: str, one: dict, many: dict, workers: int) -> str:
    """The proxy's own CPU per message with 1 and N processes, and the ceiling that the load
    generator, sink and Redis set by sharing the same cores: N processes can take at most
    cores / (proxy CPU + their CPU per message) messages a second."""
    cores = os.cpu_count() or 1
    ceiling = cores * 1000 / (many["cpu_ms"] + many["others_ms"])
    return (f"why {label} scales as it does: proxy CPU per message {one['cpu_ms']:.2f} ms with"
            f" 1 proc ({one['server_cores']:.2f} cores busy), {many['cpu_ms']:.2f} ms with "
            f"{workers}; messages per proxy core-second {one['rate'] / one['server_cores']:.0f}"
            f" and {many['rate'] / many['server_cores']:.0f}. The load generator, sink and "
            f"Redis take {many['others_ms']:.2f} ms per message of the same {cores} cores, so "
            f"{workers} procs can take at most {cores} / ({many['cpu_ms']:.2f} + "
            f"{many['others_ms']:.2f}) ms = {ceiling:.0f} msg/s here (measured "
            f"{many['rate']:.0f}), {ceiling / one['rate']:.2f}x what 1 proc took")


def command_stats(client) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}


def round_trips(world: World, port: int, messages: int, size: int) -> tuple[float, float, dict]:
    """MONITOR during ``messages`` messages: client commands (round trips) and commands run
    inside scripts, per message."""
    client = world.client()
    counts = {"client": 0, "lua": 0}
    commands: dict[str, int] = {}
    stop_flag = threading.Event()

    def watch():
        with client.monitor() as monitor:
            while not stop_flag.is_set():
                try:
                    entry = monitor.next_command()
                except Exception:
                    return
                if entry.get("command", "").upper().startswith("MONITOR"):
                    continue
                kind = "lua" if entry.get("client_type") == "lua" else "client"
                counts[kind] += 1
                if kind == "client":
                    name = entry["command"].split()[0].upper()
                    commands[name] = commands.get(name, 0) + 1

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    time.sleep(0.3)
    idle_start = dict(counts)
    time.sleep(2.0)  # background traffic (configuration polling) over two seconds
    idle = {k: counts[k] - idle_start[k] for k in counts}
    started = time.monotonic()
    before = dict(counts)
    latencies, failures = asyncio.run(_generate(port, messages, 4, size, False, None))
    elapsed = time.monotonic() - started
    time.sleep(0.3)
    stop_flag.set()
    world.client().ping()  # wake the monitor so it sees the flag
    thread.join(timeout=5)
    per = {k: (counts[k] - before[k] - idle[k] / 2.0 * elapsed) / messages for k in counts}
    return per["client"], per["lua"], {k: v / messages for k, v in sorted(commands.items())}


def memory_per_user(world: World, port: int, size: int) -> dict:
    """One message from each of the memory users' addresses; bytes of their keys."""
    client = world.client()
    used_before = client.info("memory")["used_memory"]
    addresses = list(world.memory_users)

    async def one_each():
        import aiosmtplib

        data = message(size)
        for address in addresses:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                                   source_address=(address, 0), timeout=30)
            await smtp.connect()
            await smtp.sendmail(f"one@{address}.example", ["sink@example.org"], data)
            await smtp.quit()

    asyncio.run(one_each())
    from outgoing import redis_keys

    def key_bytes() -> list[int]:
        sizes = []
        for user_id in world.memory_users.values():
            total = 0
            for key in (redis_keys.user_limits(user_id), redis_keys.identity_counts(user_id)):
                total += client.memory_usage(key) or 0
            sizes.append(total)
        return sizes

    fresh = key_bytes()
    used_after = client.info("memory")["used_memory"]
    time.sleep(3)  # the identity flusher empties the pending counts
    settled = key_bytes()
    return {"users": len(addresses), "keys_fresh": statistics.mean(fresh),
            "keys_settled": statistics.mean(settled),
            "used_memory_delta": (used_after - used_before) / len(addresses)}


def print_profile(path: Path, lines: int = 30) -> None:
    import pstats

    if not path.exists():
        print("  (no profile written)")
        return
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(lines)


# -- main ----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000, help="messages per run")
    parser.add_argument("--concurrency", type=int, default=20, help="concurrent connections")
    parser.add_argument("--size", type=int, default=5 * 1024, help="message size in bytes")
    parser.add_argument("--generators", type=int, default=2,
                        help="load-generator processes sharing the connections")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="proxy processes for the scaling run (default: the cores)")
    parser.add_argument("--latency-messages", type=int, default=500)
    parser.add_argument("--memory-users", type=int, default=200)
    parser.add_argument("--profile", action="store_true",
                        help="run (c) once more under cProfile and print the top functions")
    parser.add_argument("--tools", choices=("postfix", "python"), default="postfix",
                        help="load generator and sink for (a)-(c): Postfix's smtp-source and "
                             "smtp-sink (default), or aiosmtplib clients and an aiosmtpd sink")
    args = parser.parse_args()
    tools = postfix_tools() if args.tools == "postfix" else None
    if args.tools == "postfix" and tools is None:
        print("  Postfix's smtp-source/smtp-sink are not to be had here; using --tools python")

    print(f"Outbound Guard proxy benchmark: {args.messages} messages of {args.size} B per run,"
          f" {args.concurrency} connections, a new connection per message unless 'reused', "
          f"{args.generators} load generators, {os.cpu_count()} cores")
    print("  load (a)-(c): " + ("Postfix smtp-source; sink: Postfix smtp-sink" if tools else
                                "aiosmtplib clients; sink: aiosmtpd")
          + "; load (d) and latency: aiosmtplib clients")
    world = World(args.memory_users)
    sink_port = free_port()
    sink = start_smtp_sink(tools, sink_port) if tools else start_server("--serve-sink",
                                                                          sink_port)
    results: dict[str, dict] = {}
    try:
        redis = world.client()

        def redis_cpu() -> float:
            info = redis.info("cpu")
            return info["used_cpu_user"] + info["used_cpu_sys"]

        def run(name: str, port: int, server: subprocess.Popen, **kw) -> dict:
            cpu = cpu_seconds(server.pid)
            sink_cpu = cpu_seconds(sink.pid)
            redis_before = redis_cpu()
            if tools and not kw.get("auth"):
                figures = load_smtp_source(tools, port, args.messages, args.concurrency,
                                           args.size, args.generators,
                                           reuse=kw.get("reuse", False))
            else:
                figures = load(port, args.messages, args.concurrency, args.size,
                               args.generators, **kw)
            ok = max(figures["ok"], 1)
            figures["cpu_ms"] = (cpu_seconds(server.pid) - cpu) * 1000 / ok
            busy = {"server": cpu_seconds(server.pid) - cpu,
                    "sink": 0.0 if server is sink else cpu_seconds(sink.pid) - sink_cpu,
                    "load": figures["load_cpu"], "redis": redis_cpu() - redis_before}
            figures["others_ms"] = (busy["sink"] + busy["load"] + busy["redis"]) * 1000 / ok
            figures["server_cores"] = busy["server"] / figures["seconds"]
            results[name] = figures
            print(f"  {name:46s} {figures['rate']:6.0f} msg/s  p50 {figures['p50']:6.1f} ms"
                  f"  p99 {figures['p99']:6.1f} ms  ({figures['ok']} ok, "
                  f"{figures['failed']} failed)", flush=True)
            cores = " + ".join(f"{k} {v / figures['seconds']:.2f}" for k, v in busy.items())
            print(f"      server CPU {figures['cpu_ms']:.2f} ms/msg; cores busy: {cores} = "
                  f"{sum(busy.values()) / figures['seconds']:.2f} of {os.cpu_count()}",
                  flush=True)
            return figures

        print("\nthroughput")
        run("(a) sink alone", sink_port, sink)
        relay_port = free_port()
        relay = start_server("--serve-relay", relay_port, sink_port)
        try:
            run("(b) bare aiosmtpd + aiosmtplib relay", relay_port, relay)
            if tools:
                run(REUSED + "(b) bare relay", relay_port, relay, reuse=True)
        finally:
            stop(relay)

        for workers in sorted({1, args.workers}):
            port = free_port()
            proxy = world.start_proxy(port, sink_port, workers)
            try:
                before = command_stats(redis)
                run(f"(c) proxy, IP auth + limits + identities, {workers} proc", port, proxy)
                if workers == 1:
                    commands = delta(command_stats(redis), before)
                if tools:
                    run(REUSED + f"(c) proxy, {workers} proc", port, proxy, reuse=True)
                run(f"(d) proxy, STARTTLS + AUTH PLAIN, {workers} proc", port, proxy,
                    auth=True)
                if workers == 1:
                    trips, inside, by_command = round_trips(world, port,
                                                            min(args.messages, 500), args.size)
                    direct = sequential_latencies(sink_port, args.latency_messages, args.size)
                    through = sequential_latencies(port, args.latency_messages, args.size)
                    memory = memory_per_user(world, port, args.size)
            finally:
                stop(proxy)

        a, b = results["(a) sink alone"], results["(b) bare aiosmtpd + aiosmtplib relay"]
        c1 = results["(c) proxy, IP auth + limits + identities, 1 proc"]
        d1 = results["(d) proxy, STARTTLS + AUTH PLAIN, 1 proc"]
        print("\nratios")
        print(f"  (b) / (a)   relay vs sink                      {b['rate'] / a['rate']:6.2f}")
        print(f"  (c) / (b)   proxy (1 proc) vs bare relay       {c1['rate'] / b['rate']:6.2f}"
              "   target >= 0.80")
        print(f"  (d) / (c)   STARTTLS+AUTH vs IP auth (1 proc)  {d1['rate'] / c1['rate']:6.2f}")
        print(f"  server CPU per message: relay (b) {b['cpu_ms']:.2f} ms, proxy (c) "
              f"{c1['cpu_ms']:.2f} ms, (d) {d1['cpu_ms']:.2f} ms -> one proxy process could "
              f"take {1000 / c1['cpu_ms']:.0f} msg/s (c), {1000 / d1['cpu_ms']:.0f} msg/s (d) "
              "on a core of its own; (b)'s CPU / (c)'s CPU "
              f"{b['cpu_ms'] / c1['cpu_ms']:.2f}")
        if args.workers > 1:
            cn = results[f"(c) proxy, IP auth + limits + identities, {args.workers} proc"]
            dn = results[f"(d) proxy, STARTTLS + AUTH PLAIN, {args.workers} proc"]
            print(f"  (c) {args.workers} procs / 1 proc   scaling                 "
                  f"{cn['rate'] / c1['rate']:6.2f}   target >= 1.6 on 2 cores")
            print(f"  (d) {args.workers} procs / 1 proc   scaling                 "
                  f"{dn['rate'] / d1['rate']:6.2f}")
            print(f"  (c) {args.workers} procs / (b)                          "
                  f"{cn['rate'] / b['rate']:6.2f}")
            print("  " + why_it_scales("(c)", c1, cn, args.workers))
        if tools:
            b_r, c1_r = results[REUSED + "(b) bare relay"], results[REUSED + "(c) proxy, 1 proc"]
            print(f"  with {args.concurrency} connections reused (a sending MTA with a backlog):")
            print(f"  (c) / (b)   proxy (1 proc) vs bare relay       "
                  f"{c1_r['rate'] / b_r['rate']:6.2f}   target >= 0.80")
            if args.workers > 1:
                cn_r = results[REUSED + f"(c) proxy, {args.workers} proc"]
                print(f"  (c) {args.workers} procs / 1 proc   scaling                 "
                      f"{cn_r['rate'] / c1_r['rate']:6.2f}   target >= 1.6 on 2 cores")
                print("  " + why_it_scales("(c) reused", c1_r, cn_r, args.workers))

        print("\nRedis per message, (c) with 1 proc")
        per_message = {k: v / c1["ok"] for k, v in sorted(commands.items())}
        print("  commandstats calls (script internals included): "
              + ", ".join(f"{k} {v:.2f}" for k, v in per_message.items() if v >= 0.005))
        print(f"  round trips (client commands, MONITOR):  {trips:.2f} per message "
              f"({', '.join(f'{k} {v:.2f}' for k, v in by_command.items())}); "
              f"{inside:.2f} commands inside scripts")
        print("  target: one round trip for all limit checks (MAIL script: lock + every window "
              "+ a recipient reserved for the first RCPT)")

        print("\nRedis memory per active user")
        print(f"  {memory['users']} users, one message each: keys {memory['keys_fresh']:.0f} B"
              f" right after (limits hash + pending identity counts), "
              f"{memory['keys_settled']:.0f} B once flushed; used_memory grew "
              f"{memory['used_memory_delta']:.0f} B per user   target < 2048 B")

        print("\nlatency, one message at a time (connect to QUIT)")
        direct_p50, direct_p99 = percentile(direct, 0.5), percentile(direct, 0.99)
        through_p50, through_p99 = percentile(through, 0.5), percentile(through, 0.99)
        print(f"  sink directly      p50 {direct_p50:6.2f} ms   p99 {direct_p99:6.2f} ms")
        print(f"  through the proxy  p50 {through_p50:6.2f} ms   p99 {through_p99:6.2f} ms")
        print(f"  added by the proxy p50 {through_p50 - direct_p50:6.2f} ms   "
              f"p99 {through_p99 - direct_p99:6.2f} ms   target p99 < 5 ms")
        if c1["p99"] == c1["p99"]:  # not NaN: smtp-source gives no per-message latency
            print(f"  under load (c), 1 proc: p99 {c1['p99']:.1f} ms vs sink alone "
                  f"{a['p99']:.1f} ms (queueing included)")

        if args.profile:
            path = world.dir / "proxy.prof"
            port = free_port()
            proxy = world.start_proxy(port, sink_port, 1, profile=path)
            try:
                load(port, args.messages, args.concurrency, args.size, args.generators)
            finally:
                stop(proxy)
            print("\nprofile of one proxy worker during (c), by own time")
            print_profile(path)
    finally:
        stop(sink)
        world.close()
    print(json.dumps({k: round(v["rate"]) for k, v in results.items()}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-sink":
        serve_sink(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--serve-relay":
        serve_relay(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
