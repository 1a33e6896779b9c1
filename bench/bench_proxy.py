"""Benchmark of the SMTP proxy under load (prints figures and ratios; never a test).

Starts its own redis-server, a SQLite database, a sink as next hop and the real
``python -m proxy``, then pushes messages of 5 KB over 20 concurrent connections, a new SMTP
connection per message (the worst case: a web form or PHP's mail() per message), and again
with the 20 connections each carrying many messages (a sending MTA with a backlog, which
caches its connections) where marked "reused":

  (a) the sink alone: the ceiling
  (P) the Postfix anchor: a private stock Postfix (its own main.cf and master.cf, config,
      queue and data directories in a temporary folder; no system service is touched)
      relaying to the same sink. Its rate counts until its queue is empty, as the proxy
      answers 250 only once the next hop has the message
  (b) a bare aiosmtpd + aiosmtplib relay with no policy in front of the sink
  (c) the proxy: IP authentication, every connection window and recipients per day limited,
      identities by envelope sender, compromise detection on in shadow mode (the default
      for new users) and the content stages it always runs; at 1 process and at
      ``--workers`` processes, and at 1 process with detection off
  (d) the proxy with STARTTLS + AUTH PLAIN on every connection, clients that resume their
      TLS session and clients that do not; the same limits, from an address outside every
      IP user's range (``TLS_SOURCE``)
  (e) content: a 48 KB message with one attachment (bench_content.py's) through the bare relay
      and through the proxy with every content policy on (macro and unwanted attachments,
      the built-in spam verdict, DKIM signing, the archive)

and prints messages per second, CPU per message (of the server under test; for Postfix all
its processes), (c)/(P), (c)/(b), the scaling of ``--workers`` from 1 to N processes and what
limits it, detection's added CPU, TLS's CPU against the plain path's, the content ratio, Redis
commands and round trips per message (INFO commandstats deltas; MONITOR tells script
internals from client round trips), Redis memory per active user and the latency the proxy
adds (p50/p99, one message at a time). The last line is one JSON object with every figure, so
that runs can be compared.

    python bench/bench_proxy.py                 # 10,000 messages per run
    python bench/bench_proxy.py --messages 1000 # a quick look
    python bench/bench_proxy.py --profile       # also: where a proxy process spends its CPU
    python bench/bench_proxy.py --tools python  # aiosmtplib load and an aiosmtpd sink throughout
    python bench/bench_proxy.py --postfix deb   # Postfix from Debian's package even if installed

Load generator and sink. They share the machine's cores with the proxy, so whatever CPU they
burn per message is taken from the proxy, and the scaling from 1 to N proxy processes measures
them as much as the proxy. By default (``--tools postfix``) the load for (a)-(c) and (e) comes
from Postfix's ``smtp-source`` and the next hop is Postfix's ``smtp-sink``: the C test tools
made for exactly this, about 0.06 ms of CPU per message each, against about 0.5 ms for an
aiosmtplib client and 0.6 ms for an aiosmtpd sink. They, and Postfix itself for (P), are taken
from the PATH or /usr/sbin, or else Debian's postfix package is downloaded and unpacked (not
installed, no daemon) into bench/.tools/. (P) runs Postfix's ``master`` in the foreground
with a config directory of its own; as root its daemons run as the ``postfix`` user (or
``nobody`` when the package is only unpacked).

TLS load generator for (d). smtp-source speaks neither STARTTLS nor AUTH, and aiosmtplib
cannot resume: asyncio's ``start_tls`` takes no session. ``openssl s_client -sess_in`` could,
but costs a fork and exec per message and cannot hold an SMTP dialogue without a scripted
terminal. So (d) uses ``--tls-generators`` processes (4 by default) of plain blocking
sockets in threads (the C handshake releases the GIL), each thread keeping the
``ssl.SSLSession`` of its last connection and passing it to ``wrap_socket(session=...)`` on
the next, as Postfix's smtp_tls_session_cache does; the same code with no session passed
gives the figures without resumption. The proxy's CPU per message is read from /proc, so the
generator's own CPU does not enter it, only the rate.

``--profile`` runs (c) once more with 1 process and samples it with py-spy (``pip install -e
.[bench]``), grouping the samples by part (aiosmtpd's protocol, redis-py, the event loop,
aiosmtplib, content, headers and identity, detection, ours): a sample counts for the innermost
frame that belongs to a part, so the standard library's logging, email or asyncio streams count
for whoever called them, and a stack of nothing but asyncio is the event loop's own. Without
py-spy it falls back to cProfile, grouped by the module of each function's own time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import grp
import json
import multiprocessing
import os
import pwd
import re
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
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SENDER_COUNT = 50  # distinct envelope senders, so the identity stage has real work
PASSWORD = "Bench-pass-123"
BENCH_USER = "127.0.0.0/24"  # the IP user every plain load authenticates as
# (d)'s clients log in with AUTH from outside every IP user's range, as a mailbox client or
# a customer's server does: from inside one they would also be counted as one of that IP
# user's connections, a script that the plain path pays and an AUTH client does not.
TLS_SOURCE = "127.0.1.1"
REUSED = "connections reused: "
CONTENT_LABEL = "(e) proxy, every content policy on, 48 KB"


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


def content_message() -> bytes:
    """bench_content.py's message (48 KB: a text body and a 30 KB PDF attachment), from the
    bench's own domain so that the proxy signs it with that domain's key."""
    from bench.bench_content import fifty_kb_message

    return fifty_kb_message().replace(b"alice@example.com", b"bench@bench.example")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, of the children it has reaped (Postfix's daemons that
    exited) and of its live direct children (the proxy's workers, Postfix's daemons)."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        children = [int(c) for c in
                    Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        children = []
    total = 0.0
    for each in [pid, *children]:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if each == pid:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / tick


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent not idle (/proc/stat): with the parts the bench
    measures taken off, what other processes (and other people on a shared machine) took."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait


def quiet_aiosmtpd() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)


# -- Postfix: its C test tools, and Postfix itself for the anchor ---------------------------

TOOLS = ROOT / "bench" / ".tools" / "postfix"


class Tools(NamedTuple):
    source: str  # smtp-source
    sink: str  # smtp-sink
    env: dict[str, str]  # LD_LIBRARY_PATH for an unpacked package
    daemons: str | None  # Postfix's daemon_directory (master, smtpd, ...), None if missing
    shlib: str | None  # its shlib_directory


def _unpack_postfix() -> None:
    if (TOOLS / "usr" / "sbin" / "smtp-source").exists():
        return
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        return
    print("  fetching Postfix (apt-get download postfix, unpacked into bench/.tools/; nothing "
          "installed)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "postfix"], cwd=tmp, capture_output=True)
        TOOLS.mkdir(parents=True, exist_ok=True)
        for deb in Path(tmp).glob("postfix_*.deb"):
            subprocess.run(["dpkg", "-x", str(deb), str(TOOLS)], check=True)


def postfix_tools(prefer: str = "system") -> Tools | None:
    """Postfix from the PATH or /usr/sbin (``prefer="system"``), else from Debian's package
    unpacked into bench/.tools/; None when neither can be had."""
    if prefer == "system":
        path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
        source, sink = shutil.which("smtp-source", path=path), shutil.which("smtp-sink",
                                                                            path=path)
        if source and sink:
            daemons = None
            postconf = shutil.which("postconf", path=path)
            if postconf:
                found = subprocess.run([postconf, "-h", "daemon_directory"],
                                       capture_output=True, text=True).stdout.strip()
                daemons = found if (Path(found) / "master").exists() else None
            if daemons is None and Path("/usr/lib/postfix/sbin/master").exists():
                daemons = "/usr/lib/postfix/sbin"
            return Tools(source, sink, {}, daemons, "/usr/lib/postfix" if daemons else None)
    _unpack_postfix()
    unpacked = TOOLS / "usr" / "sbin"
    if not (unpacked / "smtp-source").exists():
        return None
    libs = str(TOOLS / "usr" / "lib" / "postfix")
    env = {"LD_LIBRARY_PATH": os.pathsep.join(filter(None, [libs,
                                                             os.environ.get("LD_LIBRARY_PATH")]))}
    daemons = TOOLS / "usr" / "lib" / "postfix" / "sbin"
    return Tools(str(unpacked / "smtp-source"), str(unpacked / "smtp-sink"), env,
                 str(daemons) if (daemons / "master").exists() else None, libs)


def start_smtp_sink(tools: Tools, port: int) -> subprocess.Popen:
    """Postfix's smtp-sink: takes every message, keeps nothing (as root it must drop to a user)."""
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([tools.sink, *user, "-m", "1024", f"127.0.0.1:{port}", "1024"],
                            env=dict(os.environ, **tools.env), stdout=subprocess.DEVNULL)
    wait_for_port(port)
    return proc


# Upstream's master.cf (Postfix 3.7, chroot off as upstream ships it), without the pipe
# transports; the smtpd line listens on the bench's port.
POSTFIX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
QUEUE_DIRS = ("active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming",
              "private", "saved", "trace")
WAITING = ("maildrop", "incoming", "active", "deferred", "hold")


def _postfix_accounts() -> tuple[str, str, str]:
    """(mail_owner, setgid_group, default_privs): Postfix wants an owner that is not root,
    a set-gid group that is not the owner's group, and default_privs not the owner."""

    def user_exists(name: str) -> bool:
        try:
            pwd.getpwnam(name)
            return True
        except KeyError:
            return False

    if os.geteuid() != 0:
        owner = pwd.getpwuid(os.geteuid()).pw_name
    else:
        owner = "postfix" if user_exists("postfix") else "nobody"
    owner_gid = pwd.getpwnam(owner).pw_gid
    group = None
    for name in ("postdrop", "mail", "adm", "daemon", "users", "nogroup"):
        try:
            if grp.getgrnam(name).gr_gid != owner_gid:
                group = name
                break
        except KeyError:
            continue
    privs = next(u for u in ("nobody", "daemon", "bin") if u != owner and user_exists(u))
    return owner, group or "nogroup", privs


class PostfixRelay:
    """(P): a private stock Postfix relaying everything from 127.0.0.0/8 to the sink.

    Its own main.cf/master.cf in a temporary config directory, its own queue and data
    directories, ``master -d`` in the foreground: nothing of a system Postfix is read or
    touched. Settings are Postfix's defaults but for what relaying to the sink needs."""

    def __init__(self, tools: Tools, sink_port: int):
        self.dir = Path(tempfile.mkdtemp(prefix="og-bench-postfix-"))
        self.dir.chmod(0o755)  # the daemons run as mail_owner and must reach their queue
        self.port = free_port()
        conf, self.queue, data = self.dir / "conf", self.dir / "queue", self.dir / "data"
        owner, group, privs = _postfix_accounts()
        uid, gid = pwd.getpwnam(owner).pw_uid, grp.getgrnam(group).gr_gid
        for path in (conf, self.queue, data):
            path.mkdir()
        for name in QUEUE_DIRS:
            (self.queue / name).mkdir(mode=0o700)
            os.chown(self.queue / name, uid, -1)
        for name, mode in (("maildrop", 0o730), ("public", 0o710)):
            (self.queue / name).mkdir()
            os.chown(self.queue / name, uid, gid)
            (self.queue / name).chmod(mode)
        (self.queue / "pid").mkdir(mode=0o755)
        os.chown(data, uid, -1)
        data.chmod(0o700)
        self.log = self.dir / "maillog"  # -s with maillog_file=/dev/stdout: master's output
        (conf / "dynamicmaps.cf").write_text("")  # no plugin map types needed
        (conf / "main.cf").write_text(f"""\
compatibility_level = 3.6
config_directory = {conf}
meta_directory = {conf}
queue_directory = {self.queue}
data_directory = {data}
daemon_directory = {tools.daemons}
command_directory = {Path(tools.source).parent}
shlib_directory = {tools.shlib}
mail_owner = {owner}
setgid_group = {group}
default_privs = {privs}
myhostname = postfix.bench.example
mydomain = bench.example
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [127.0.0.1]:{sink_port}
maillog_file = /dev/stdout
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C POSTLOG_SERVICE \
 POSTLOG_HOSTNAME LD_LIBRARY_PATH
""")
        (conf / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=self.port))
        self.proc = subprocess.Popen(
            [str(Path(str(tools.daemons)) / "master"), "-c", str(conf), "-s"],
            env=dict(os.environ, MAIL_CONFIG=str(conf), **tools.env),
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True)  # on SIGTERM master signals its process group
        try:
            wait_for_port(self.port, timeout=20)
        except TimeoutError:
            self.close()
            raise RuntimeError(f"Postfix did not start: {self.problem()}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self):
        return self.proc.poll()

    def problem(self) -> str:
        text = ""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            pass
        return " | ".join(text.strip().splitlines()[-4:]) or "(no log)"

    def waiting(self) -> int:
        """Messages in its queue: received but not yet handed to the sink."""
        count = 0
        for name in WAITING:
            for _, _, files in os.walk(self.queue / name):
                count += len(files)
        return count

    def drain(self, timeout: float = 600) -> int:
        """Wait until the queue is empty (or only deferred mail is left for 5 s); returns the
        messages still queued."""
        deadline = time.monotonic() + timeout
        stuck_since, last = None, -1
        while time.monotonic() < deadline:
            left = self.waiting()
            if left == 0:
                return 0
            if left == last:
                stuck_since = stuck_since or time.monotonic()
                if time.monotonic() - stuck_since > 5:
                    return left
            else:
                stuck_since, last = None, left
            time.sleep(0.02)
        return self.waiting()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # master stops its daemons
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def load_smtp_source(tools: Tools, port: int, messages: int, concurrency: int, data: bytes,
                     generators: int, reuse: bool = False) -> dict:
    """``generators`` smtp-source processes, each with its own envelope sender; ``reuse``
    sends every message of a session over its one connection (as a sending MTA with a
    backlog does), else each message comes on a new connection."""
    eml = Path(tempfile.mkstemp(suffix=".eml")[1])
    eml.write_bytes(data.replace(b"\r\n", b"\n"))  # smtp-source adds the CR
    env = dict(os.environ, **tools.env)
    before = os.times()
    machine = machine_busy_seconds()
    started = time.monotonic()
    procs = []
    for i in range(generators):
        count = messages // generators + (1 if i < messages % generators else 0)
        sessions = max(1, concurrency // generators)
        procs.append(subprocess.Popen(
            [tools.source, *(["-d"] if reuse else []), "-s", str(sessions), "-m", str(count),
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
    machine = machine_busy_seconds() - machine
    after = os.times()
    eml.unlink()
    ok = 0 if failed else messages
    return {"rate": ok / seconds, "seconds": seconds, "ok": ok, "failed": failed,
            "load_cpu": (after.children_user - before.children_user)
            + (after.children_system - before.children_system),
            "machine_cpu": machine, "p50": float("nan"), "p99": float("nan")}
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

async def _generate(port: int, count: int, concurrency: int, data: bytes,
                    source: list[str] | None) -> tuple[list[float], int]:
    import aiosmtplib

    latencies: list[float] = []
    failures = 0
    next_index = 0

    async def worker() -> None:
        nonlocal next_index, failures
        while next_index < count:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=port, timeout=60, start_tls=False,
                source_address=(source[index % len(source)], 0) if source else None)
            try:
                await smtp.connect()
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


def _generator_process(port, count, concurrency, data, source, go, results):
    go.wait()
    started, cpu = time.monotonic(), time.process_time()
    latencies, failures = asyncio.run(_generate(port, count, concurrency, data, source))
    results.put((started, time.monotonic(), latencies, failures, time.process_time() - cpu, 0))


def _spread(messages: int, generators: int, concurrency: int, target, extra: tuple) -> dict:
    """Run ``target(port..., count, connections, *extra, go, results)`` in ``generators``
    spawned processes, start them together, and add up what they report."""
    ctx = multiprocessing.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    per = [messages // generators + (1 if i < messages % generators else 0)
           for i in range(generators)]
    conns = max(1, concurrency // generators)
    procs = [ctx.Process(target=target, args=(extra[0], per[i], conns, *extra[1:], go,
                                              results))
             for i in range(generators) if per[i]]
    for proc in procs:
        proc.start()
    time.sleep(1.0)  # let every generator import what it needs before the clock starts
    machine = machine_busy_seconds()
    go.set()
    outcome = [results.get(timeout=1800) for _ in procs]
    machine = machine_busy_seconds() - machine
    for proc in procs:
        proc.join()
    start = min(o[0] for o in outcome)
    end = max(o[1] for o in outcome)
    latencies = [x for o in outcome for x in o[2]]
    return {"rate": len(latencies) / (end - start), "seconds": end - start,
            "ok": len(latencies), "failed": sum(o[3] for o in outcome),
            "load_cpu": sum(o[4] for o in outcome), "resumed": sum(o[5] for o in outcome),
            "machine_cpu": machine,
            "p50": percentile(latencies, 0.50) * 1000, "p99": percentile(latencies, 0.99) * 1000}


def load(port: int, messages: int, concurrency: int, data: bytes, generators: int,
         source: list[str] | None = None) -> dict:
    """Push ``messages`` over ``concurrency`` aiosmtplib connections from ``generators``
    processes, a new connection per message."""
    return _spread(messages, generators, concurrency, _generator_process,
                   (port, data, source))


# STARTTLS + AUTH PLAIN, blocking: see "TLS load generator" in the module's docstring.

class SmtpError(Exception):
    pass


def _expect(reader, code: int) -> None:
    while True:
        line = reader.readline()
        if not line:
            raise SmtpError(f"connection closed, expected {code}")
        if line[3:4] != b"-":
            break
    if int(line[:3]) != code:
        raise SmtpError(f"expected {code}, got {line.strip().decode(errors='replace')}")


def _tls_message(port: int, context, session, data: bytes, sender: bytes, auth: bytes):
    """One connection: EHLO, STARTTLS (offering ``session``), EHLO, AUTH PLAIN, one message,
    QUIT. Returns the session to keep and whether this one was resumed."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60,
                                    source_address=(TLS_SOURCE, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tls = None
    try:
        reader = sock.makefile("rb")
        _expect(reader, 220)
        sock.sendall(b"EHLO load.bench.example\r\n")
        _expect(reader, 250)
        sock.sendall(b"STARTTLS\r\n")
        _expect(reader, 220)
        reader.close()
        tls = context.wrap_socket(sock, server_hostname="proxy.bench.example",
                                  session=session)
        reader = tls.makefile("rb")
        tls.sendall(b"EHLO load.bench.example\r\n")
        _expect(reader, 250)  # TLS 1.3's ticket comes with it
        tls.sendall(auth)
        _expect(reader, 235)
        tls.sendall(b"MAIL FROM:<" + sender + b">\r\n")
        _expect(reader, 250)
        tls.sendall(b"RCPT TO:<sink@example.org>\r\n")
        _expect(reader, 250)
        tls.sendall(b"DATA\r\n")
        _expect(reader, 354)
        tls.sendall(data)
        _expect(reader, 250)
        tls.sendall(b"QUIT\r\n")
        _expect(reader, 221)
        reader.close()
        return tls.session, tls.session_reused
    finally:
        (tls or sock).close()


def _tls_generator_process(port, count, threads, data, resume, go, results):
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # one per process, as an MTA keeps one
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    data += b".\r\n"  # the bench's messages have no line starting with a dot to stuff
    auth = b"AUTH PLAIN " + base64.b64encode(b"\0bench@bench.example\0"
                                             + PASSWORD.encode()) + b"\r\n"
    latencies: list[float] = []
    counts = {"failures": 0, "resumed": 0}
    lock = threading.Lock()
    quota = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]

    def worker(index: int) -> None:
        session = None
        for n in range(quota[index]):
            sender = f"sender{(index * 7 + n) % SENDER_COUNT}@bench.example".encode()
            started = time.perf_counter()
            try:
                kept, reused = _tls_message(port, context, session, data, sender, auth)
            except (OSError, SmtpError, ssl.SSLError) as exc:
                with lock:
                    counts["failures"] += 1
                    if counts["failures"] <= 3:
                        print(f"    failure: {exc}", file=sys.stderr)
                session = None
                continue
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                counts["resumed"] += reused
            if resume:
                session = kept

    go.wait()
    started, cpu = time.monotonic(), time.process_time()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads) if quota[i]]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    results.put((started, time.monotonic(), latencies, counts["failures"],
                 time.process_time() - cpu, counts["resumed"]))


def load_tls(port: int, messages: int, concurrency: int, data: bytes, generators: int,
             resume: bool) -> dict:
    """STARTTLS + AUTH PLAIN on a new connection per message; with ``resume`` each
    connection offers the session of the one before it."""
    return _spread(messages, generators, concurrency, _tls_generator_process,
                   (port, data, resume))


def sequential_latencies(port: int, messages: int, size: int) -> list[float]:
    """One message at a time: latency without queueing, in milliseconds."""
    latencies, failures = asyncio.run(_generate(port, messages, 1, message(size), None))
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
        from outgoing.users import create_outgoing_user, get_or_create_domain

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
            create_outgoing_user(db, domain=domain, kind="ip", name=BENCH_USER, **limits)
            create_outgoing_user(db, domain=domain, kind="user", name="bench@bench.example",
                                 password=PASSWORD, **limits)
            other = get_or_create_domain(db, "memory.example")
            users = {}
            for n in range(memory_users):
                address = f"127.0.{2 + n // 250}.{1 + n % 250}"
                users[address] = create_outgoing_user(db, domain=other, kind="ip",
                                                      name=address, **limits).id
        factory.kw["bind"].dispose()
        return users

    def update_user(self, name: str, **fields) -> None:
        """Change a user's settings in the database (the next proxy started reads them)."""
        from sqlalchemy import update

        from outgoing.db import make_sessionmaker, session_scope
        from outgoing.models import OutgoingUser

        factory = make_sessionmaker(self.database_url)
        with session_scope(factory) as db:
            db.execute(update(OutgoingUser).where(OutgoingUser.name == name).values(**fields))
        factory.kw["bind"].dispose()

    @contextlib.contextmanager
    def content_policies(self):
        """Every content policy on for the bench's user while inside: attachments (macros and
        unwanted types), DKIM with the "bench" key (add_dkim_key first), the archive. The
        built-in spam verdict is always on without RSPAMD_URL; newly registered domains
        stay off (an RDAP lookup per sender domain, at MAIL, not content)."""
        from outgoing.models import DKIM_DEFAULT

        self.update_user(BENCH_USER, block_macro_attachments=True,
                         block_unwanted_attachments=True, dkim_selector="bench",
                         message_archiving=True)
        try:
            yield
        finally:
            self.update_user(BENCH_USER, block_macro_attachments=False,
                             block_unwanted_attachments=False, dkim_selector=DKIM_DEFAULT,
                             message_archiving=False)

    def add_dkim_key(self, selector: str) -> None:
        """An RSA 2048 key for bench.example, so that DKIM signing has real work."""
        from sqlalchemy import select

        from outgoing.db import make_sessionmaker, session_scope
        from outgoing.dkim import generate_key
        from outgoing.models import DkimKey, Domain

        factory = make_sessionmaker(self.database_url)
        key = generate_key("rsa")
        with session_scope(factory) as db:
            domain = db.execute(select(Domain).where(Domain.name == "bench.example")).scalar_one()
            db.add(DkimKey(domain_id=domain.id, selector=selector, algorithm="rsa",
                           private_key_pem=key.private_pem, public_key_b64=key.public_b64))
        factory.kw["bind"].dispose()

    def client(self):
        import redis

        return redis.Redis(port=self.redis_port)

    def start_proxy(self, port: int, sink: int, workers: int,
                    profile: Path | None = None) -> subprocess.Popen:
        env = dict(os.environ, INSTANCE_PATH=str(self.instance),
                   DATABASE_URL=self.database_url, REDIS_URL=self.redis_url,
                   SMTP_LISTEN=f"127.0.0.1:{port}", UPSTREAM_SMTP=f"127.0.0.1:{sink}",
                   SMTP_HOSTNAME="proxy.bench.example", LOG_LEVEL="INFO",
                   METRICS_LISTEN="")  # not read here; and a running instance keeps :9125
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

def command_stats(client) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}


# XADDs of one client within this of the first of theirs are one round trip, a pipeline (the
# message log's writer: a batch runs in well under a millisecond, the next comes 20 ms on).
SAME_TRIP_SECONDS = 0.005


def round_trips(world: World, port: int, messages: int, size: int) -> tuple[float, float, dict]:
    """MONITOR during ``messages`` messages: client round trips and commands run inside
    scripts, per message. A client command is a round trip, except an XADD that comes
    within ``SAME_TRIP_SECONDS`` of the first XADD of the same connection's pipeline."""
    client = world.client()
    counts = {"client": 0, "lua": 0}
    commands: dict[str, int] = {}
    trip_start: dict[str, float] = {}  # by connection: its pipeline of XADDs began then
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
                if kind == "client":
                    name = entry["command"].split()[0].upper()
                    if name == "XADD":
                        who = f"{entry['client_address']}:{entry['client_port']}"
                        if entry["time"] - trip_start.get(who, 0.0) < SAME_TRIP_SECONDS:
                            continue  # the same pipeline
                        trip_start[who] = entry["time"]
                    commands[name] = commands.get(name, 0) + 1
                counts[kind] += 1

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    time.sleep(0.3)
    idle_start = dict(counts)
    time.sleep(2.0)  # background traffic (configuration polling) over two seconds
    idle = {k: counts[k] - idle_start[k] for k in counts}
    started = time.monotonic()
    before = dict(counts)
    latencies, failures = asyncio.run(_generate(port, messages, 4, message(size), None))
    elapsed = time.monotonic() - started
    time.sleep(0.3)
    stop_flag.set()
    world.client().ping()  # wake the monitor so it sees the flag
    thread.join(timeout=5)
    per = {k: (counts[k] - before[k] - idle[k] / 2.0 * elapsed) / messages for k in counts}
    return per["client"], per["lua"], {k: v / messages for k, v in sorted(commands.items())}


def kind_of_key(key: str) -> str:
    """What a Redis key holds, for the memory breakdown: a user's own keys by their kind
    (limits, idcounts, risk, dom, camp, ref...), the shared message-log stream, the
    cross-customer campaign counts, else the key's first two parts."""
    from outgoing.message_log import STREAM

    if key == STREAM:
        return "message log stream (one entry a message, until the worker has written it)"
    own = re.match(r"og:\{\d+\}:([a-z]+)", key)
    if own:
        return f"the user's {own[1]}"
    if key.startswith("og:{camp:"):
        return "campaign senders (shared by all customers)"
    return ":".join(key.split(":")[:2])


def key_memory(client) -> dict[str, int]:
    """MEMORY USAGE of every key (the bench's own Redis: a few thousand keys at most)."""
    return {key.decode(errors="replace"): client.memory_usage(key) or 0
            for key in client.scan_iter(count=1000)}


def memory_per_user(world: World, port: int, size: int) -> dict:
    """One message from each of the memory users' addresses; bytes of their keys, and what
    Redis grew by, per kind of key."""
    client = world.client()
    keys_before = key_memory(client)
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
    keys_after = key_memory(client)
    by_kind: dict[str, float] = {}
    for key, used in keys_after.items():
        grown = used - keys_before.get(key, 0)
        by_kind[kind_of_key(key)] = by_kind.get(kind_of_key(key), 0) + grown / len(addresses)
    time.sleep(3)  # the identity flusher empties the pending counts
    settled = key_bytes()
    return {"users": len(addresses), "keys_fresh": statistics.mean(fresh),
            "keys_settled": statistics.mean(settled),
            "used_memory_delta": (used_after - used_before) / len(addresses),
            "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))}


# -- where a proxy process spends its CPU ----------------------------------------------------

# (substring of a frame's file, part); the first that matches names the frame's part. Frames
# of the standard library (asyncio, logging, email, ssl, re...) and of libraries not named
# here match none: they count for the innermost frame above them that does, else for the
# event loop (a stack of nothing but asyncio) or "other".
HEADERS = "headers, identity, normalisation (scoring/message.py)"
RELAY = "relay (aiosmtplib, proxy/relay.py, proxy/pipelining.py)"
PARTS = (
    ("/aiosmtpd/", "SMTP protocol (aiosmtpd, proxy/protocol.py)"),
    ("proxy/protocol.py", "SMTP protocol (aiosmtpd, proxy/protocol.py)"),
    ("/redis/", "redis-py (and hiredis)"),
    ("hiredis", "redis-py (and hiredis)"),
    ("/aiosmtplib/", RELAY),
    ("proxy/relay.py", RELAY), ("proxy/pipelining.py", RELAY),
    ("/uvloop/", "event loop"),
    ("proxy/content.py", "content"), ("proxy/rspamd.py", "content"),
    ("scoring/spam.py", "content"), ("scoring/attachments.py", "content"),
    ("scoring/mimeparse.py", "content"),
    ("outgoing/dkim.py", "content"), ("/dkim/", "content"), ("/oletools/", "content"),
    ("/olefile/", "content"), ("/msoffcrypto/", "content"),
    ("outgoing/archive.py", "content"), ("outgoing/storage.py", "content"),
    ("proxy/identities.py", HEADERS), ("proxy/sender_domains.py", HEADERS),
    ("scoring/identity.py", HEADERS), ("scoring/message.py", HEADERS),
    ("outgoing/identities.py", HEADERS),
    ("proxy/detection.py", "detection"), ("scoring/risk.py", "detection"),
    ("scoring/fingerprint.py", "detection"),
    ("/sqlalchemy/", "database (SQLAlchemy)"),
    ("/prometheus_client/", "metrics (prometheus_client)"),
)


ENTRY_POINTS = ("proxy/server.py", "proxy/__main__.py")  # asyncio.run(): the loop's, not ours


def _relative(path: str) -> str:
    """py-spy names a file relative to its sys.path entry ("redis/client.py"), cProfile by
    its full path: both become "/redis/client.py"-like for the needles."""
    root = str(ROOT) + "/"
    path = path[len(root):] if path.startswith(root) else path
    return path if path.startswith("/") else "/" + path


def _is_stdlib(path: str) -> bool:
    if "site-packages" in path or "dist-packages" in path:
        return False
    top = _relative(path).split("/")[1].removesuffix(".py")
    return "/lib/python" in path or top in sys.stdlib_module_names or path.startswith("<")


def part_of(path: str) -> str | None:
    path = _relative(path)
    if path.endswith(ENTRY_POINTS):
        return None
    for needle, part in PARTS:
        if needle in path:
            return part
    if path.startswith(("/proxy/", "/outgoing/", "/scoring/")):
        return "ours (handler, limits, counters, message log)"
    return None


def _fallback(paths: list[str]) -> str:
    if any(not _is_stdlib(p) and part_of(p) is None and not _relative(p).endswith(ENTRY_POINTS)
           for p in paths):
        return "other libraries"
    if any("asyncio" in p or "selectors" in p for p in paths):
        return "event loop"
    return "other (standard library)"


# Innermost frames that are a thread waiting, not working (py-spy --nonblocking cannot always
# tell): an executor thread waiting for work, the event loop waiting in epoll.
WAITS = ("_worker (concurrent/futures/thread.py", "select (selectors.py", "wait (threading.py")


def group_py_spy(raw: Path) -> tuple[dict[str, int], dict[str, int], dict[str, dict]]:
    """py-spy's raw (collapsed) stacks -> samples per part, per innermost function, and per
    part the frames that decided it (which of our functions, which library call)."""
    parts: dict[str, int] = {}
    leaves: dict[str, int] = {}
    via: dict[str, dict[str, int]] = {}
    waiting = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if any(wait in frames[-1] for wait in WAITS):
            waiting += int(count)
            continue
        paths = [frame.rpartition("(")[2].rpartition(":")[0] for frame in frames]
        decided = next((i for i in range(len(paths) - 1, -1, -1) if part_of(paths[i])), None)
        part = part_of(paths[decided]) if decided is not None else _fallback(paths)
        parts[part] = parts.get(part, 0) + int(count)
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + int(count)
        frame = frames[decided] if decided is not None else frames[-1]
        via.setdefault(part, {})[frame] = via.get(part, {}).get(frame, 0) + int(count)
    if waiting:
        print(f"  ({waiting} samples of threads waiting, not working, left out)")
    return parts, leaves, via


def group_cprofile(path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """cProfile's own time per function -> seconds per part (the standard library's own time
    counts as the event loop's and the standard library's), and per function."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    parts: dict[str, float] = {}
    functions: dict[str, float] = {}
    for (file, line, name), (_, _, own, _, _) in stats.items():
        part = part_of(file) or _fallback([file])
        parts[part] = parts.get(part, 0.0) + own
        functions[f"{name} ({file}:{line})"] = own
    return parts, functions


def print_grouped(parts: dict, leaves: dict, cpu_ms: float, unit: str,
                  via: dict | None = None) -> dict[str, float]:
    total = sum(parts.values()) or 1
    shares = {k: v / total for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}
    for part, share in shares.items():
        print(f"  {part:55s} {share * 100:5.1f} %   {share * cpu_ms:6.3f} ms/msg")
        for frame, value in sorted((via or {}).get(part, {}).items(),
                                   key=lambda kv: -kv[1])[:3]:
            print(f"      {value / total * 100:5.1f} %  in {frame[:100]}")
    print(f"  (of {total:.0f} {unit}; ms/msg = share x the run's proxy CPU per message "
          f"{cpu_ms:.2f} ms)")
    print("  busiest functions by own time:")
    for name, value in sorted(leaves.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {value / total * 100:5.1f} %  {name[:110]}")
    return {k: round(v, 4) for k, v in shares.items()}


def py_spy() -> str | None:
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    return found


# -- what limits a run -----------------------------------------------------------------------

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


def what_limits(figures: dict, workers: int) -> str:
    """Which part limits a run: the cores when they are full (and who takes them), else the
    proxy's processes when they are full, else waiting (latency, not CPU)."""
    cores = os.cpu_count() or 1
    busy = figures["busy_cores"]
    total = sum(busy.values())  # the whole machine's, "elsewhere" included
    others = sorted(((k, v) for k, v in busy.items() if k != "server"), key=lambda kv: -kv[1])
    if total >= 0.9 * cores:
        if busy["server"] >= 0.9 * workers:
            return f"the proxy: its {workers} proc(s) are busy ({busy['server']:.2f} cores)"
        return (f"the {cores} cores are full ({total:.2f} busy) and the proxy has "
                f"{busy['server']:.2f} of them: the rest goes to "
                + ", ".join(f"{k} {v:.2f}" for k, v in others)
                + " (load generator, sink and Redis share the cores; 'elsewhere' is every "
                "other process on the machine)")
    if busy["server"] >= 0.9 * workers:
        return f"the proxy: its {workers} proc(s) are busy ({busy['server']:.2f} cores)"
    return (f"waiting, not CPU: {total:.2f} of {cores} cores busy machine-wide, the proxy "
            f"{busy['server']:.2f} of {workers} (round trips to Redis and the next hop)")


# -- main ----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000, help="messages per run")
    parser.add_argument("--concurrency", type=int, default=20, help="concurrent connections")
    parser.add_argument("--size", type=int, default=5 * 1024, help="message size in bytes")
    parser.add_argument("--generators", type=int, default=2,
                        help="load-generator processes sharing the connections")
    parser.add_argument("--tls-generators", type=int, default=4,
                        help="processes of the STARTTLS load generator (threads share the "
                             "connections within each)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="proxy processes for the scaling run (default: the cores)")
    parser.add_argument("--detection-rounds", type=int, default=4,
                        help="rounds of detection on and off, every other round off first "
                             "(1 proc, a fresh proxy each), for its added CPU")
    parser.add_argument("--latency-messages", type=int, default=500)
    parser.add_argument("--memory-users", type=int, default=200)
    parser.add_argument("--profile", action="store_true",
                        help="run (c) once more and print where the proxy spends its CPU, by "
                             "part (py-spy when installed, else cProfile)")
    parser.add_argument("--tools", choices=("postfix", "python"), default="postfix",
                        help="load generator and sink for (a)-(c) and (e): Postfix's "
                             "smtp-source and smtp-sink (default), or aiosmtplib clients and "
                             "an aiosmtpd sink")
    parser.add_argument("--postfix", choices=("system", "deb"), default="system",
                        help="Postfix from the PATH (default; Debian's package unpacked into "
                             "bench/.tools/ when missing), or always the unpacked package")
    args = parser.parse_args()
    postfix = postfix_tools(args.postfix)
    tools = postfix if args.tools == "postfix" else None
    if args.tools == "postfix" and tools is None:
        print("  Postfix's smtp-source/smtp-sink are not to be had here; using --tools python")

    print(f"Outbound Guard proxy benchmark: {args.messages} messages of {args.size} B per run,"
          f" {args.concurrency} connections, a new connection per message unless 'reused', "
          f"{args.generators} load generators, {os.cpu_count()} cores")
    print("  load (a)-(c), (e): " + ("Postfix smtp-source; sink: Postfix smtp-sink" if tools
                                     else "aiosmtplib clients; sink: aiosmtpd")
          + f"; load (d): {args.tls_generators} processes of blocking STARTTLS clients from "
          f"{TLS_SOURCE}; "
          "latency: aiosmtplib clients")
    plain, content = message(args.size), content_message()
    world = World(args.memory_users)
    sink_port = free_port()
    sink = start_smtp_sink(tools, sink_port) if tools else start_server("--serve-sink",
                                                                          sink_port)
    results: dict[str, dict] = {}
    summary: dict = {"messages": args.messages, "size": args.size,
                     "concurrency": args.concurrency, "cores": os.cpu_count(),
                     "workers": args.workers, "tools": "postfix" if tools else "python"}
    try:
        redis = world.client()

        def redis_cpu() -> float:
            info = redis.info("cpu")
            return info["used_cpu_user"] + info["used_cpu_sys"]

        def run(key: str, label: str, port: int, server, *, data: bytes = plain,
                reuse: bool = False, tls: str | None = None,
                queue: PostfixRelay | None = None) -> dict:
            cpu = cpu_seconds(server.pid)
            sink_cpu = cpu_seconds(sink.pid)
            redis_before = redis_cpu()
            if tls:
                figures = load_tls(port, args.messages, args.concurrency, data,
                                   args.tls_generators, resume=tls == "resumed")
            elif tools:
                figures = load_smtp_source(tools, port, args.messages, args.concurrency,
                                           data, args.generators, reuse=reuse)
            else:
                figures = load(port, args.messages, args.concurrency, data, args.generators)
            if queue is not None:  # Postfix has answered 250; count until it has relayed
                loaded, machine = time.monotonic(), machine_busy_seconds()
                left = queue.drain()
                figures["machine_cpu"] += machine_busy_seconds() - machine
                figures["accepted_rate"] = figures["rate"]
                figures["seconds"] += time.monotonic() - loaded
                figures["ok"] = max(0, figures["ok"] - left)
                figures["failed"] += left
                figures["rate"] = figures["ok"] / figures["seconds"]
            ok = max(figures["ok"], 1)
            busy = {"server": cpu_seconds(server.pid) - cpu,
                    "sink": 0.0 if server is sink else cpu_seconds(sink.pid) - sink_cpu,
                    "load": figures["load_cpu"], "redis": redis_cpu() - redis_before}
            # while the clock ran: every other process on the machine, the bench's own included
            busy["elsewhere"] = max(0.0, figures["machine_cpu"] - sum(busy.values()))
            figures["cpu_ms"] = busy["server"] * 1000 / ok
            figures["others_ms"] = (busy["sink"] + busy["load"] + busy["redis"]) * 1000 / ok
            figures["server_cores"] = busy["server"] / figures["seconds"]
            figures["busy_cores"] = {k: v / figures["seconds"] for k, v in busy.items()}
            figures["label"] = label
            results[key] = figures
            extra = ""
            if tls:
                extra = f", {figures['resumed'] / ok * 100:.0f} % resumed"
            if queue is not None:
                extra = f", accepted at {figures['accepted_rate']:.0f} msg/s"
            print(f"  {label:58s} {figures['rate']:6.0f} msg/s  p50 {figures['p50']:6.1f} ms"
                  f"  p99 {figures['p99']:6.1f} ms  ({figures['ok']} ok, "
                  f"{figures['failed']} failed{extra})", flush=True)
            cores = " + ".join(f"{k} {v:.2f}" for k, v in figures["busy_cores"].items())
            print(f"      server CPU {figures['cpu_ms']:.2f} ms/msg; cores busy: {cores} = "
                  f"{sum(figures['busy_cores'].values()):.2f} of {os.cpu_count()}",
                  flush=True)
            return figures

        def with_proxy(workers: int, body) -> None:
            port = free_port()
            proxy = world.start_proxy(port, sink_port, workers)
            try:
                body(port, proxy)
            finally:
                stop(proxy)

        print("\nthroughput")
        run("sink", "(a) sink alone", sink_port, sink)
        if postfix is not None and postfix.daemons is not None:
            try:
                anchor = PostfixRelay(postfix, sink_port)
            except (RuntimeError, OSError, KeyError, StopIteration) as exc:
                print(f"  (P) skipped: Postfix could not start here ({exc})")
            else:
                try:
                    run("postfix", "(P) stock Postfix relay (until its queue is empty)",
                        anchor.port, anchor, queue=anchor)
                finally:
                    anchor.close()
        else:
            print("  (P) skipped: no Postfix master here (apt-get download postfix failed?)")
        relay_port = free_port()
        relay = start_server("--serve-relay", relay_port, sink_port)
        try:
            run("relay", "(b) bare aiosmtpd + aiosmtplib relay", relay_port, relay)
            if tools:
                run("relay_reused", REUSED + "(b) bare relay", relay_port, relay, reuse=True)
            run("relay_content", "(e) bare relay, 48 KB with an attachment", relay_port, relay,
                data=content)
        finally:
            stop(relay)

        measured: dict = {}

        def one_process(port: int, proxy) -> None:
            before = command_stats(redis)
            run("proxy_1", "(c) proxy, IP auth + limits + identities + detection, 1 proc",
                port, proxy)
            measured["commands"] = delta(command_stats(redis), before)
            if tools:
                run("proxy_1_reused", REUSED + "(c) proxy, 1 proc", port, proxy, reuse=True)
            run("tls_1_full", "(d) proxy, STARTTLS + AUTH PLAIN, full handshakes, 1 proc",
                port, proxy, tls="full")
            run("tls_1_resumed", "(d) proxy, STARTTLS + AUTH PLAIN, resumed, 1 proc", port,
                proxy, tls="resumed")
            measured["trips"] = round_trips(world, port, min(args.messages, 500), args.size)
            measured["direct"] = sequential_latencies(sink_port, args.latency_messages,
                                                      args.size)
            measured["through"] = sequential_latencies(port, args.latency_messages, args.size)
            measured["memory"] = memory_per_user(world, port, args.size)

        with_proxy(1, one_process)
        # Rounds of detection on and off (--detection-rounds), each run with a fresh proxy: a
        # difference of a tenth of a millisecond needs the median of the rounds' differences on
        # a machine shared with others. Every other round runs off first (on-off, off-on, ...):
        # a machine that drifts steadily over the rounds then weighs on both sides alike.
        def detection_run(state: str, suffix: str) -> None:
            world.update_user(BENCH_USER, compromise_detection=state == "on")
            try:
                with_proxy(1, lambda port, proxy: run(
                    f"proxy_1_detection_{state}{suffix}", f"(c) proxy, detection {state}, 1 proc",
                    port, proxy))
            finally:
                world.update_user(BENCH_USER, compromise_detection=True)

        for index in range(args.detection_rounds):
            for state in ("on", "off") if index % 2 == 0 else ("off", "on"):
                detection_run(state, f"_{index + 1}")
        if args.workers > 1:
            def many_processes(port: int, proxy) -> None:
                n = args.workers
                run(f"proxy_{n}", f"(c) proxy, IP auth + limits + identities + detection, "
                    f"{n} proc", port, proxy)
                if tools:
                    run(f"proxy_{n}_reused", REUSED + f"(c) proxy, {n} proc", port, proxy,
                        reuse=True)
                run(f"tls_{n}_resumed", f"(d) proxy, STARTTLS + AUTH PLAIN, resumed, {n} proc",
                    port, proxy, tls="resumed")

            with_proxy(args.workers, many_processes)

        world.add_dkim_key("bench")
        with world.content_policies():
            with_proxy(1, lambda port, proxy: run(
                "proxy_content", CONTENT_LABEL + ", 1 proc", port, proxy, data=content))

        summary["ratios"] = report(results, args, tools is not None)
        summary["detection_added_cpu_ms"] = round(detection_added(results), 3)
        summary["tls_resumed_share"] = {
            k: round(v["resumed"] / max(v["ok"], 1), 3) for k, v in results.items()
            if k.startswith("tls_")}

        c1 = results["proxy_1"]
        trips, inside, by_command = measured["trips"]
        print("\nRedis per message, (c) with 1 proc")
        per_message = {k: v / c1["ok"] for k, v in sorted(measured["commands"].items())}
        print("  commandstats calls (script internals included): "
              + ", ".join(f"{k} {v:.2f}" for k, v in per_message.items() if v >= 0.005))
        print(f"  round trips (client commands, MONITOR; a pipeline counts once):  "
              f"{trips:.2f} per message "
              f"({', '.join(f'{k} {v:.2f}' for k, v in by_command.items())}); "
              f"{inside:.2f} commands inside scripts")
        print("  target: one round trip per message for every check (limits, detection)")
        summary["redis_round_trips"] = round(trips, 2)
        summary["redis_commands_in_scripts"] = round(inside, 2)

        memory = measured["memory"]
        print("\nRedis memory per active user")
        print(f"  {memory['users']} users, one message each: keys {memory['keys_fresh']:.0f} B"
              f" right after (limits hash + pending identity counts), "
              f"{memory['keys_settled']:.0f} B once flushed; used_memory grew "
              f"{memory['used_memory_delta']:.0f} B per user   target < 2048 B")
        print("  what grew, per user, by kind of key (MEMORY USAGE, which counts each key's "
              "own overhead; used_memory also counts Redis' dictionaries):")
        for kind, grown in memory["by_kind"].items():
            if abs(grown) >= 1:
                print(f"    {grown:7.0f} B  {kind}")
        summary["memory_per_user_bytes"] = round(memory["used_memory_delta"])
        summary["memory_per_user_by_kind"] = {k: round(v) for k, v in memory["by_kind"].items()}

        print("\nlatency, one message at a time (connect to QUIT)")
        direct, through = measured["direct"], measured["through"]
        direct_p50, direct_p99 = percentile(direct, 0.5), percentile(direct, 0.99)
        through_p50, through_p99 = percentile(through, 0.5), percentile(through, 0.99)
        print(f"  sink directly      p50 {direct_p50:6.2f} ms   p99 {direct_p99:6.2f} ms")
        print(f"  through the proxy  p50 {through_p50:6.2f} ms   p99 {through_p99:6.2f} ms")
        print(f"  added by the proxy p50 {through_p50 - direct_p50:6.2f} ms   "
              f"p99 {through_p99 - direct_p99:6.2f} ms   target p99 < 5 ms")
        summary["latency_added_ms"] = {"p50": round(through_p50 - direct_p50, 2),
                                       "p99": round(through_p99 - direct_p99, 2)}

        if args.profile:
            summary["profile"] = profile(world, sink_port, run, "proxy_1_profiled",
                                         "(c) proxy, 1 proc", plain)
            if py_spy():
                sampled = detection_sampled(world, sink_port, run, plain)
                summary["detection_sampled"] = sampled
                if sampled:
                    print("\ncompromise detection's added CPU by py-spy (the handler's "
                          "detection step, on, less the identity check it replaces, off)")
                    for text, field, target in (
                            ("detection step, detection on", "detection_step_ms", ""),
                            ("identity check, detection off", "identity_check_ms", ""),
                            ("detection's added CPU, sampled", "added_ms", "target < 0.15")):
                        print(f"      {text:54s} {sampled[field]:6.3f} ms   {target}")
            with world.content_policies():
                summary["profile_content"] = profile(world, sink_port, run,
                                                     "proxy_content_profiled", CONTENT_LABEL,
                                                     content)
    finally:
        stop(sink)
        world.close()
    summary["rate"] = {k: round(v["rate"], 1) for k, v in results.items()}
    summary["cpu_ms"] = {k: round(v["cpu_ms"], 3) for k, v in results.items()}
    if "postfix" in results:
        summary["postfix_accepted_rate"] = round(results["postfix"]["accepted_rate"], 1)
    print(json.dumps(summary))


def detection_pairs(results: dict[str, dict]) -> list[tuple[float, float]]:
    """(on, off) proxy CPU per message of each round, the two runs back to back."""
    return [(v["cpu_ms"], results[k.replace("_on", "_off")]["cpu_ms"])
            for k, v in results.items() if k.startswith("proxy_1_detection_on")
            and k.replace("_on", "_off") in results]


def detection_cpu(results: dict[str, dict]) -> tuple[float, float]:
    """Median proxy CPU per message with detection on and off."""
    pairs = detection_pairs(results)
    return (statistics.median(on for on, _ in pairs),
            statistics.median(off for _, off in pairs))


def detection_added(results: dict[str, dict]) -> float:
    """The median of the rounds' differences: a round's two runs share the machine's mood
    (a shared machine drifts by more than a tenth of a millisecond between runs)."""
    return statistics.median(on - off for on, off in detection_pairs(results))


def report(results: dict[str, dict], args, reused: bool) -> dict:
    """Print the ratios against their targets; returns them."""
    def ratio(a: str, b: str, field: str = "rate") -> float | None:
        if a not in results or b not in results or not results[b][field]:
            return None
        return round(results[a][field] / results[b][field], 3)

    def show(text: str, value: float | None, target: str = "") -> None:
        shown = "   n/a" if value is None else f"{value:6.2f}"
        print(f"  {text:58s} {shown}   {target}")

    n = args.workers
    out = {
        "relay_vs_sink": ratio("relay", "sink"),
        "proxy_vs_postfix": ratio("proxy_1", "postfix"),
        f"proxy_{n}proc_vs_postfix": ratio(f"proxy_{n}", "postfix") if n > 1 else None,
        "proxy_vs_relay": ratio("proxy_1", "relay"),
        "proxy_vs_relay_reused": ratio("proxy_1_reused", "relay_reused"),
        "scaling": ratio(f"proxy_{n}", "proxy_1") if n > 1 else None,
        "scaling_reused": ratio(f"proxy_{n}_reused", "proxy_1_reused") if n > 1 else None,
        "tls_resumed_vs_plain_cpu": ratio("tls_1_resumed", "proxy_1", "cpu_ms"),
        "tls_full_vs_plain_cpu": ratio("tls_1_full", "proxy_1", "cpu_ms"),
        "tls_scaling_resumed": ratio(f"tls_{n}_resumed", "tls_1_resumed") if n > 1 else None,
        "content_vs_relay": ratio("proxy_content", "relay_content"),
        "proxy_vs_postfix_cpu": ratio("proxy_1", "postfix", "cpu_ms"),
    }
    c1 = results["proxy_1"]
    on, off = detection_cpu(results)
    print("\nratios (rates unless marked CPU)")
    show("(b) / (a)    bare relay vs sink", out["relay_vs_sink"])
    show("(c) / (P)    proxy, 1 proc, vs stock Postfix", out["proxy_vs_postfix"], "target >= 1.8")
    if n > 1:
        show(f"(c) / (P)    proxy, {n} procs, vs stock Postfix", out[f"proxy_{n}proc_vs_postfix"])
    show("(c) / (b)    proxy, 1 proc, vs bare relay", out["proxy_vs_relay"])
    if reused:
        show("(c) / (b)    the same, connections reused", out["proxy_vs_relay_reused"])
    if n > 1:
        show(f"(c) {n} procs / 1 proc   scaling", out["scaling"], "target >= 1.6")
        print(f"      what limits {n} procs: {what_limits(results[f'proxy_{n}'], n)}")
        print(f"      what limits 1 proc:  {what_limits(c1, 1)}")
        print("      " + why_it_scales("(c)", c1, results[f"proxy_{n}"], n))
        if reused:
            show(f"(c) {n} procs / 1 proc   scaling, connections reused",
                 out["scaling_reused"], "target >= 1.6")
            print(f"      what limits it: {what_limits(results[f'proxy_{n}_reused'], n)}")
        show(f"(d) {n} procs / 1 proc   scaling, TLS resumed", out["tls_scaling_resumed"])
        print(f"      what limits it: {what_limits(results[f'tls_{n}_resumed'], n)}")

    print("\nproxy CPU per message (ms; the server's own CPU from /proc)")
    if "postfix" in results:
        show("(P) stock Postfix, all its processes", results["postfix"]["cpu_ms"])
        show("(c) / (P)    CPU per message, proxy vs Postfix", out["proxy_vs_postfix_cpu"])
    show("(b) bare relay", results["relay"]["cpu_ms"])
    show("(c) proxy, new connection per message", c1["cpu_ms"], "target <= 0.8")
    if reused:
        show("(c) proxy, connections reused", results["proxy_1_reused"]["cpu_ms"],
             "target <= 0.55")
    rounds = len(detection_pairs(results))
    show(f"(c) proxy, detection on, median of {rounds}", on)
    show(f"(c) proxy, detection off, median of {rounds}", off)
    show(f"    detection's added CPU (median of {rounds} rounds' on - off)",
         detection_added(results), "target < 0.15")
    show("(d) STARTTLS + AUTH PLAIN, full handshakes", results["tls_1_full"]["cpu_ms"])
    show("(d) STARTTLS + AUTH PLAIN, resumed", results["tls_1_resumed"]["cpu_ms"])
    show("(d) / (c)    TLS resumed vs plain, CPU", out["tls_resumed_vs_plain_cpu"],
         "target <= 1.5")
    show("(d) / (c)    TLS full handshakes vs plain, CPU", out["tls_full_vs_plain_cpu"])

    print("\ncontent: 48 KB with one attachment, every content policy on")
    show("(e) proxy / bare relay", out["content_vs_relay"], "target >= 0.8")
    show("    CPU per message, bare relay", results["relay_content"]["cpu_ms"])
    show("    CPU per message, proxy", results["proxy_content"]["cpu_ms"])
    return {k: v for k, v in out.items() if v is not None}


def sampled_run(world: World, sink_port: int, run, key: str, label: str,
                data: bytes) -> tuple[dict, Path | None]:
    """A run with 1 process and a fresh proxy, sampled by py-spy: its figures and py-spy's
    raw samples (None when py-spy wrote nothing)."""
    port = free_port()
    proxy = world.start_proxy(port, sink_port, 1)
    raw = world.dir / f"py-spy-{key}.txt"
    sampler = subprocess.Popen(
        [py_spy(), "record", "--pid", str(proxy.pid), "--rate", "250", "--format", "raw",
         "--nonblocking", "--output", str(raw)],
        stdout=subprocess.DEVNULL, stderr=open(world.dir / "py-spy.log", "wb"))  # noqa: SIM115
    time.sleep(1.0)
    try:
        figures = run(key, f"{label}, sampled by py-spy", port, proxy, data=data)
    finally:
        sampler.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
        try:
            sampler.wait(timeout=60)
        except subprocess.TimeoutExpired:
            sampler.kill()
        stop(proxy)
    if not raw.exists():
        print("  (py-spy wrote nothing: "
              + (world.dir / "py-spy.log").read_text(errors="replace")[-300:] + ")")
        return figures, None
    return figures, raw


def share_under(raw: Path, function: str) -> float:
    """The share of py-spy's samples whose stack passes through ``function`` (py-spy names
    a frame "function (file:line)", one name per line of the function)."""
    total = under = 0
    prefix = function + " ("
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        if any(frame.startswith(prefix) for frame in stack.split(";")):
            under += int(count)
    return under / total if total else 0.0


def detection_sampled(world: World, sink_port: int, run, data: bytes) -> dict:
    """Detection's added CPU by attribution, the figure that holds still: the CPU under the
    handler's detection step with detection on, less the CPU under the identity check that
    step replaces with detection off (py-spy's share of samples times the run's CPU per
    message). Whole-process on - off differences move as much as the machine drifts between
    two runs; the attribution does not count that drift."""
    on, on_raw = sampled_run(world, sink_port, run, "proxy_1_sampled_detection_on",
                             "(c) proxy, detection on, 1 proc", data)
    world.update_user(BENCH_USER, compromise_detection=False)
    try:
        off, off_raw = sampled_run(world, sink_port, run, "proxy_1_sampled_detection_off",
                                   "(c) proxy, detection off, 1 proc", data)
    finally:
        world.update_user(BENCH_USER, compromise_detection=True)
    if on_raw is None or off_raw is None:
        return {}
    step = share_under(on_raw, "OutboundHandler._detect") * on["cpu_ms"]
    check = share_under(off_raw, "OutboundHandler._check_identity") * off["cpu_ms"]
    return {"detection_step_ms": round(step, 3), "identity_check_ms": round(check, 3),
            "added_ms": round(step - check, 3)}


def profile(world: World, sink_port: int, run, key: str, label: str, data: bytes) -> dict:
    """A run with 1 process once more, sampled by py-spy (or under cProfile); its CPU by
    part."""
    if py_spy():
        figures, raw = sampled_run(world, sink_port, run, key, label, data)
        if raw is None:
            return {}
        print(f"\nwhere the proxy spends its CPU, {label}: py-spy samples by part (and the "
              "frames that decided it)")
        parts, leaves, via = group_py_spy(raw)
        return print_grouped(parts, leaves, figures["cpu_ms"], "samples", via)
    port = free_port()
    path = world.dir / "proxy.prof"
    proxy = world.start_proxy(port, sink_port, 1, profile=path)
    try:
        figures = run(key, f"{label}, under cProfile", port, proxy, data=data)
    finally:
        stop(proxy)
    if not path.exists():
        print("  (no profile written)")
        return {}
    parts, functions = group_cprofile(path)
    print(f"\nwhere the proxy spends its CPU, {label}: cProfile own time by part (py-spy "
          "is not installed: pip install -e .[bench]; cProfile's overhead inflates small "
          "calls)")
    return print_grouped(parts, functions, figures["cpu_ms"], "s")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-sink":
        serve_sink(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--serve-relay":
        serve_relay(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
