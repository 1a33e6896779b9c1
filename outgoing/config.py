"""One configuration loader shared by the web app, the SMTP proxy and the worker.

Values come from built-in defaults, then ``instance/config.py``, then environment variables
(12-factor: the environment always wins). A typo in ``instance/config.py`` or a malformed URL
stops start-up with one line naming the setting, instead of a traceback minutes later.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import secrets
import socket
from pathlib import Path
from urllib.parse import urlsplit

from scoring.retry import parse_delays

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it."""


def _defaults(instance: Path) -> dict:
    return {
        "DATABASE_URL": f"sqlite:///{instance / 'outbound-guard.db'}",
        # The run command starts an embedded Redis on this socket when REDIS_URL is unset.
        "REDIS_URL": f"unix://{instance / 'redis.sock'}",
        # RQ's Redis (a single server: RQ does not support Cluster); empty = REDIS_URL.
        "RQ_REDIS_URL": "",
        "SECRET_KEY": None,
        "SMTP_LISTEN": "127.0.0.1:10025",
        "SMTP_HOSTNAME": socket.gethostname() or "outbound-guard",
        # A trusted listener offers AUTH without STARTTLS; only for local testing.
        "SMTP_TRUSTED": False,
        "SMTP_WORKERS": 0,
        # Load balancers (addresses or CIDRs) whose connections start with a PROXY protocol
        # header (v1 or v2) naming the real client; a header from anyone else is refused.
        "SMTP_PROXY_PROTOCOL_FROM": "",
        "UPSTREAM_SMTP": "127.0.0.1:10026",
        "UPSTREAM_TIMEOUT": 30.0,
        # Empty means the panel's own address, http://127.0.0.1:$PORT (see load_config).
        "PUBLIC_URL": "",
        "PORT": 5000,
        "NOTIFY_FROM": "outbound-guard@localhost",
        "MAX_MESSAGE_SIZE": 25 * 1024 * 1024,
        # Longest message line accepted (RFC 5321 says 1000 with CRLF; scripts send longer);
        # longer body lines are re-encoded before relaying.
        "SMTP_MAX_LINE_LENGTH": 65536,
        "BARE_LINE_ENDINGS": "normalise",
        # The Received: header of relayed mail names the client (full) or leaves it out.
        "RECEIVED_HEADER": "full",
        # Each domain gets a key for this selector on first use; users whose DKIM Selector is
        # "Use the default" (new users) sign once its TXT record was found published.
        "DKIM_DEFAULT_SELECTOR": "og1",
        # "Check DNS" asks these name servers (host or host:port, comma-separated) instead of
        # the system's resolver.
        "DNS_RESOLVER": "",
        "REDIS_FAIL_OPEN": False,
        # Seconds the proxy waits for Redis per call (the panel and worker wait 5).
        "PROXY_REDIS_TIMEOUT": 1.0,
        # Seconds the proxy waits for the database per call on the SMTP path (storing in the
        # quarantine, a DKIM key, a lock) before it answers 4xx: a hung database answers
        # nothing and raises nothing, and the sender would otherwise hear nothing at all.
        "PROXY_DATABASE_TIMEOUT": 5.0,
        "SPAM_LOCK_THRESHOLD": 5,
        # Compromise detection: seconds in which a sender's risk halves (scoring/risk.py).
        "DETECTION_HALF_LIFE_SECONDS": 3600,
        # A claim on a held message older than this is taken over (its worker died).
        "HELD_CLAIM_SECONDS": 120,
        # Days released or refused held mail (row and body) is kept after the worker finished
        # with it; mail still held is never removed by itself (0 keeps everything).
        "HELD_RETENTION_DAYS": 14,
        "SPAM_WINDOW_SECONDS": 600,
        "CONFIG_REFRESH_SECONDS": 1.0,
        "RQ_QUEUE": "outgoing",
        "STORAGE_DIR": str(instance / "storage"),
        "TLS_CERT": str(instance / "tls" / "cert.pem"),
        "TLS_KEY": str(instance / "tls" / "key.pem"),
        "RSPAMD_URL": "",
        "UNLOCK_LINK_MAX_AGE": 86400,
        "QUARANTINE_RETENTION_DAYS": 14,
        "AUTH_FAILURE_LIMIT": 10,
        "AUTH_FAILURE_WINDOW_SECONDS": 600.0,
        "AUTH_BLOCK_SECONDS": 900.0,
        # A username is not blocked for networks (/24, /64) it logged in from successfully
        # within this many days; those are still throttled per address.
        "AUTH_KNOWN_NETWORK_DAYS": 30,
        "IDENTITY_FLUSH_SECONDS": 2.0,
        # Tenancy: the widest IP/Range a domain admin may add (prefix length).
        "MAX_CUSTOMER_RANGE_V4": 24,
        "MAX_CUSTOMER_RANGE_V6": 48,
        # Connection hygiene: concurrent connections per client address (all proxy
        # processes of this machine together; 421 beyond), and commands in a row that move
        # no mail forward (NOOP, RSET, VRFY, EXPN, HELP) before 421.
        "SMTP_MAX_CONNECTIONS_PER_IP": 50,
        # Connections one proxy process serves at once (421 beyond); 0: half its open-file
        # limit (raised to the hard limit at start), the rest for upstream, Redis, files.
        "SMTP_MAX_CONNECTIONS": 0,
        # On SIGTERM, seconds a transaction in flight may take to finish before its session
        # gets 421 and the process stops; one whose message is in waits for its reply up to
        # UPSTREAM_TIMEOUT + 5 s more (the systemd unit's TimeoutStopSec leaves room).
        "SMTP_DRAIN_SECONDS": 20.0,
        "SMTP_MAX_JUNK_COMMANDS": 20,
        # Bytes of DATA one proxy process holds at once, all connections together (a message
        # is held whole while it is checked and relayed); past it, 452 4.3.1. 0: no budget.
        "SMTP_DATA_BUDGET": 256 * 1024 * 1024,
        # Content stage (proxy/content.py): next-hop login, connection reuse, engines, stores.
        "UPSTREAM_USERNAME": "",
        "UPSTREAM_PASSWORD": "",
        # Idle next-hop connections each proxy process keeps for reuse (closed after 30 s).
        # It never raises the number of connections open at once, which is the number of
        # messages in flight; too few means closing and reopening them under load.
        "UPSTREAM_POOL_SIZE": 16,
        "RSPAMD_TIMEOUT": 2.0,
        "SPAM_THRESHOLD": 5.0,
        "RDAP_URL": "",
        "RDAP_TIMEOUT": 3.0,
        "RDAP_CACHE_SECONDS": 86400,
        "RDAP_NEGATIVE_CACHE_SECONDS": 3600,
        "NEWLY_REGISTERED_LIST": "",
        "MESSAGE_STORE": "file",
        "ARCHIVE_RETENTION_DAYS": 0,
        # Recipients the next hop refused with 4xx while it took the others: the worker
        # retries them after these delays (seconds, the last repeats) until the message is
        # DEFER_GIVE_UP_SECONDS old, then mails the sender a delivery report.
        "DEFER_RETRY_SECONDS": "300,900,1800,3600,7200,14400",
        "DEFER_GIVE_UP_SECONDS": 5 * 86400,
        # Message log (outgoing/message_log.py): days kept, the Redis stream's cap (entries
        # the worker has not written yet; about 0.5 KB each), and how long an entry a worker
        # read stays pending before another worker takes it over (a crashed consumer).
        "MESSAGE_LOG_RETENTION_DAYS": 30,
        "MESSAGE_LOG_STREAM_MAXLEN": 500000,
        "MESSAGE_LOG_CLAIM_IDLE_SECONDS": 60.0,
        # Refusals recorded a minute per client network (IPv4 address, IPv6 /64) before anyone
        # is known (no AUTH, no IP/Range user), per proxy process; 0: all of them.
        "MESSAGE_LOG_ANONYMOUS_PER_MINUTE": 60,
        # Prometheus: where the proxy's parent process serves its metrics (empty: nowhere),
        # and the bearer token for the panel's /metrics (empty: loopback clients only).
        "METRICS_LISTEN": "127.0.0.1:9125",
        "METRICS_TOKEN": "",
    }


def known_settings() -> set[str]:
    return set(_defaults(Path(".")))


def instance_path(environ=None) -> Path:
    """Where config, the SQLite file, Redis data and keys live (``INSTANCE_PATH`` overrides)."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("INSTANCE_PATH") or PROJECT_ROOT / "instance").resolve()


def _coerce(name: str, raw: str, default):
    if isinstance(default, bool):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{name}: expected true or false, got {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None
    if isinstance(default, float):
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{name}: expected a finite number, got {raw!r}")
        return value
    return raw


def _read_instance_file(path: Path, known: set[str]) -> dict:
    if not path.exists():
        return {}
    scope: dict = {}
    try:
        exec(compile(path.read_text(), str(path), "exec"), scope)  # noqa: S102 - operator's file
    except Exception as exc:  # a broken config file must name itself
        raise ConfigError(f"{path}: {type(exc).__name__}: {exc}") from None
    values = {k: v for k, v in scope.items() if k.isupper()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting {unknown[0]}")
    return values


def _secret_key(instance: Path) -> str:
    """A generated key persisted in instance/, so sessions survive restarts."""
    path = instance / "secret_key"
    if path.exists():
        return path.read_text().strip()
    key = secrets.token_urlsafe(48)
    instance.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key


def normalise_database_url(url: str) -> str:
    """Validate DATABASE_URL; accept Heroku's ``postgres://`` spelling."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"DATABASE_URL: not a database URL: {url!r}") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"DATABASE_URL: unsupported database {parsed.get_backend_name()!r} "
            "(use sqlite:/// or postgresql://)"
        )
    return url


def validate_redis_url(url: str, name: str = "REDIS_URL", cluster: bool = True) -> str:
    """A single Redis (``redis://``, ``rediss://``, ``unix://``) or, where ``cluster``, a
    Redis Cluster (``redis+cluster://host:port,host:port``, see ``outgoing.redis_conn``)."""
    from outgoing.redis_conn import CLUSTER_SCHEMES, cluster_nodes

    parts = urlsplit(url)
    if parts.scheme in CLUSTER_SCHEMES:
        if not cluster:
            raise ConfigError(f"{name}: RQ does not support Redis Cluster; name one Redis "
                              f"server (redis://...), got {url!r}")
        try:
            cluster_nodes(url)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc} in {url!r}") from None
        return url
    if parts.scheme not in ("redis", "rediss", "unix"):
        allowed = "redis://, rediss://, unix://" + (" or redis+cluster://" if cluster else "")
        raise ConfigError(f"{name}: expected {allowed}, got {url!r}")
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError(f"{name}: a unix:// URL needs a socket path, got {url!r}")
    if parts.scheme != "unix":
        if not parts.hostname:
            raise ConfigError(f"{name}: no host in {url!r}")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ConfigError(f"{name}: bad port in {url!r}") from None
        database = parts.path.strip("/")
        if database and not database.isdigit():  # redis-py would quietly use database 0
            raise ConfigError(f"{name}: the database is a number, got {database!r} in {url!r}")
    from redis.connection import parse_url

    try:  # its options (db, protocol, timeouts...) as redis-py will read them at start
        options = parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc} ({url!r})") from None
    if str(options.get("protocol", 2)) not in ("2", "3"):  # the proxy picks its pool by it
        raise ConfigError(f"{name}: protocol is 2 or 3, got {options['protocol']!r} in {url!r}")
    return url


# The widest block SMTP_PROXY_PROTOCOL_FROM takes: its hosts may name any client, so a
# block wider than a /8 (IPv6: a /32, an ISP's allocation) is a mistake, not a balancer list.
NARROWEST_TRUSTED_PREFIX = {4: 8, 6: 32}
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def parse_networks(name: str, value) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                              ...]:
    """Addresses or CIDRs, as a list or one string separated by commas or spaces."""
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value or ())
    networks = []
    for item in items:
        try:
            network = ipaddress.ip_network(str(item).strip(), strict=False)
        except ValueError:
            raise ConfigError(f"{name}: not an address or CIDR: {item!r}") from None
        # ::ffff:a.b.c.d/n is an IPv4 block (a dual-stack listener sees IPv4 peers so)
        as_ipv4 = network.version == 6 and network.overlaps(_IPV4_MAPPED)
        if (network.prefixlen < NARROWEST_TRUSTED_PREFIX[network.version]
                or as_ipv4 and network.prefixlen - 96 < NARROWEST_TRUSTED_PREFIX[4]):
            raise ConfigError(
                f"{name}: {item!r} is too wide: every host in it could claim to be any client; "
                f"list your load balancers (at most a /{NARROWEST_TRUSTED_PREFIX[4]} or an "
                f"IPv6 /{NARROWEST_TRUSTED_PREFIX[6]})")
        networks.append(network)
    return tuple(networks)


def parse_hostport(name: str, value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port), with an error naming the setting."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ConfigError(f"{name}: expected host:port, got {value!r}")
    return host.strip("[]"), int(port)


_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def dns_resolvers(config: dict) -> list[tuple[str, int]]:
    """DNS_RESOLVER as (address, port) pairs; empty for the system's resolver."""
    found = []
    for item in filter(None, (i.strip() for i in config["DNS_RESOLVER"].split(","))):
        host, port = (parse_hostport("DNS_RESOLVER", item) if item.count(":") == 1
                      or item.startswith("[") else (item, 53))
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"DNS_RESOLVER: {host!r} is not an IP address") from None
        found.append((host, port))
    return found


def _loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def going_live_problems(config: dict, web_bind: str) -> list[str]:
    """Defaults that are fine on one's own machine and unsafe where customers can connect:
    each one a line for the operator (README "Going live"). Nothing while both the proxy and
    the panel listen on loopback only."""
    smtp_host = config["SMTP_LISTEN"].rpartition(":")[0]
    web_host = web_bind.rpartition(":")[0] or web_bind
    if _loopback(smtp_host) and _loopback(web_host):
        return []
    instance = Path(config["INSTANCE_PATH"])
    problems = []
    key_file = instance / "secret_key"
    if key_file.exists() and key_file.read_text().strip() == config["SECRET_KEY"]:
        problems.append("SECRET_KEY is the one generated into instance/; set your own (the "
                        "same on every host)")
    if config["SMTP_TRUSTED"]:
        problems.append("SMTP_TRUSTED is on: passwords would cross the network unencrypted")
    if not config["PUBLIC_URL"].startswith("https://"):
        problems.append(f"PUBLIC_URL is {config['PUBLIC_URL']}: alerts should link to the "
                        "panel over https")
    if Path(config["TLS_CERT"]) == instance / "tls" / "cert.pem":
        problems.append("TLS_CERT/TLS_KEY are the self-signed pair; use a certificate for "
                        "SMTP_HOSTNAME")
    if "." not in config["SMTP_HOSTNAME"].strip("."):
        problems.append(f"SMTP_HOSTNAME is {config['SMTP_HOSTNAME']!r}, not a fully qualified "
                        "name: set the proxy's public name (its greeting and Received: "
                        "fields carry it)")
    if config["NOTIFY_FROM"].endswith("@localhost"):
        problems.append("NOTIFY_FROM is outbound-guard@localhost; use an address at your "
                        "domain that receives replies")
    if config["DATABASE_URL"].startswith("sqlite"):
        problems.append("DATABASE_URL is SQLite; use PostgreSQL")
    if config["REDIS_URL"].startswith("unix://") and str(instance) in config["REDIS_URL"]:
        problems.append("REDIS_URL is the embedded Redis; use a Redis server you run and back "
                        "up")
    return problems


def load_config(overrides: dict | None = None, environ=None) -> dict:
    """Defaults < instance/config.py < environment < ``overrides`` (tests)."""
    environ = os.environ if environ is None else environ
    instance = instance_path(environ)
    config = _defaults(instance)
    known = set(config)
    config.update(_read_instance_file(instance / "config.py", known))
    for name, default in list(config.items()):
        if name in environ:
            config[name] = _coerce(name, environ[name], default if default is not None else "")
    if overrides:
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]}")
        config.update(overrides)
    if not config["PUBLIC_URL"]:
        # Unlock links must reach the panel wherever PORT moved it.
        config["PUBLIC_URL"] = f"http://127.0.0.1:{config['PORT']}"
    config["DATABASE_URL"] = normalise_database_url(config["DATABASE_URL"])
    config["REDIS_URL"] = validate_redis_url(config["REDIS_URL"])
    if config["RQ_REDIS_URL"]:
        validate_redis_url(config["RQ_REDIS_URL"], "RQ_REDIS_URL", cluster=False)
    elif urlsplit(config["REDIS_URL"]).scheme.endswith("+cluster"):
        raise ConfigError("RQ_REDIS_URL: required when REDIS_URL is a Redis Cluster (RQ needs "
                          "one Redis server of its own)")
    parse_networks("SMTP_PROXY_PROTOCOL_FROM", config["SMTP_PROXY_PROTOCOL_FROM"])
    parse_hostport("SMTP_LISTEN", config["SMTP_LISTEN"])
    parse_hostport("UPSTREAM_SMTP", config["UPSTREAM_SMTP"])
    if config["METRICS_LISTEN"]:
        parse_hostport("METRICS_LISTEN", config["METRICS_LISTEN"])
    if str(config["MESSAGE_STORE"] or "file").strip().lower() not in ("file", "database"):
        raise ConfigError(f"MESSAGE_STORE: expected 'file' or 'database', got "
                          f"{config['MESSAGE_STORE']!r}")
    if config["BARE_LINE_ENDINGS"] not in ("normalise", "reject"):
        raise ConfigError("BARE_LINE_ENDINGS: expected 'normalise' or 'reject'")
    if config["RECEIVED_HEADER"] not in ("full", "anonymous"):
        raise ConfigError("RECEIVED_HEADER: expected 'full' or 'anonymous'")
    selector = config["DKIM_DEFAULT_SELECTOR"] = config["DKIM_DEFAULT_SELECTOR"].strip().lower()
    if selector and not _SELECTOR.fullmatch(selector):
        raise ConfigError("DKIM_DEFAULT_SELECTOR: expected a DNS label such as og1, or empty")
    dns_resolvers(config)  # raises ConfigError naming DNS_RESOLVER
    for name, bits in (("MAX_CUSTOMER_RANGE_V4", 32), ("MAX_CUSTOMER_RANGE_V6", 128)):
        if not 1 <= int(config[name]) <= bits:
            raise ConfigError(f"{name}: expected a prefix length from 1 to {bits}")
    for name, what in (("SMTP_MAX_CONNECTIONS", "a number of connections, or 0 for the default"),
                       ("SMTP_DRAIN_SECONDS", "a number of seconds, or 0 for none"),
                       ("SMTP_DATA_BUDGET", "a number of bytes, or 0 for no budget")):
        if config[name] < 0:  # a negative cap refuses every connection or message
            raise ConfigError(f"{name}: expected {what}")
    if not config["PROXY_DATABASE_TIMEOUT"] > 0:  # 0 would answer 4xx to every message
        raise ConfigError("PROXY_DATABASE_TIMEOUT: expected a number of seconds above 0")
    budget = int(config["SMTP_DATA_BUDGET"])
    # A message of the largest size allowed must fit the budget alone, or it would get
    # "452 try again later" for ever. (Its end line and a line over the limit, at most.)
    largest = int(config["MAX_MESSAGE_SIZE"]) + int(config["SMTP_MAX_LINE_LENGTH"]) + 5
    if 0 < budget < largest:
        raise ConfigError(f"SMTP_DATA_BUDGET: {budget} bytes cannot hold one message of "
                          f"MAX_MESSAGE_SIZE plus a line of SMTP_MAX_LINE_LENGTH ({largest} "
                          f"bytes); raise it, or lower those")
    try:
        parse_delays(config["DEFER_RETRY_SECONDS"])
    except ValueError as exc:
        raise ConfigError(f"DEFER_RETRY_SECONDS: {exc}") from None
    if not config["SECRET_KEY"]:
        config["SECRET_KEY"] = _secret_key(instance)
    config["INSTANCE_PATH"] = str(instance)
    return config
