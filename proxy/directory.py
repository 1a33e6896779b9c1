"""The proxy's in-memory view of outgoing users, reloaded when the configuration changes.

The control panel bumps a version in Redis and publishes it; the proxy listens and also polls
the version as a fallback. Lookups per connection are dictionary hits and a bisect over IP
ranges, never a database query, and a database outage keeps the last good view serving.
Only when a login is unknown to that view does the proxy ask whether the database is
reachable at all (at most once a second), to tell "no such user" (535) from "cannot know
right now" (454).
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import text

from outgoing import redis_keys
from outgoing.db import session_scope
from outgoing.models import REAUTH_DOMAIN, REAUTH_USER
from outgoing.redis_conn import is_cluster
from outgoing.snapshot import Snapshot, UserPolicy, load_snapshot
from scoring.address import canonical_mailbox, mailbox_domain
from scoring.ipranges import IpRange, RangeIndex, whole_space_problem

log = logging.getLogger(__name__)


class Directory:
    def __init__(self, sessionmaker, redis, refresh_seconds: float = 1.0,
                 full_reload_seconds: float = 30.0):
        self._sessionmaker = sessionmaker
        self._redis = redis
        self._refresh = refresh_seconds
        self._full_reload = full_reload_seconds
        self._loaded_at = 0.0
        self.snapshot: Snapshot | None = None
        self._index = RangeIndex([])
        self._version: bytes | None = None
        self._lock = asyncio.Lock()
        self._probed_at = float("-inf")
        self._reachable = True
        self._probe: asyncio.Future | None = None

    def _load(self) -> Snapshot:
        with session_scope(self._sessionmaker) as session:
            return load_snapshot(session)

    async def reload(self) -> None:
        async with self._lock:
            try:
                version = await self._redis.get(redis_keys.CONFIG_VERSION)
            except Exception:  # Redis down: still load from the database
                version = None
            snap = await asyncio.get_running_loop().run_in_executor(None, self._load)
            ranges = []
            for u in snap.ip_users:
                if not u.ip_family:
                    continue
                ip_range = IpRange(u.ip_family, u.ip_first, u.ip_last)
                if whole_space_problem(ip_range):  # stored before the rule: an open relay
                    log.error("ignoring IP/Range user %s (%s): it covers every address",
                              u.id, ip_range)
                    continue
                ranges.append((ip_range, u.id))
            self._index = RangeIndex(ranges)
            self.snapshot = snap
            self._version = version
            self._loaded_at = time.monotonic()
            log.info("configuration loaded: %d outgoing users", len(snap.users))

    async def watch(self) -> None:
        """Reload on a published change, when the polled version moved, or every so often."""
        pubsub = None
        while True:
            if time.monotonic() - self._loaded_at > self._full_reload:
                try:
                    await self.reload()
                except Exception as exc:
                    log.warning("periodic reload failed (%s); serving the last view", exc)
                    self._loaded_at = time.monotonic()
            try:
                if is_cluster(self._redis):
                    # redis-py's asyncio cluster pub/sub stays on a dead node after a failover
                    # (seen in tests/integration/test_redis_cluster.py); the version key
                    # follows its slot to the new master, so a cluster polls it alone.
                    await asyncio.sleep(self._refresh)
                else:
                    if pubsub is None:
                        pubsub = self._redis.pubsub()
                        await pubsub.subscribe(redis_keys.CONFIG_CHANNEL)
                    await pubsub.get_message(ignore_subscribe_messages=True,
                                             timeout=self._refresh)
                version = await self._redis.get(redis_keys.CONFIG_VERSION)
                if version != self._version or self.snapshot is None:
                    await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("configuration refresh failed (%s); serving the last view", exc)
                pubsub = None
                await asyncio.sleep(self._refresh)

    @property
    def ready(self) -> bool:
        return self.snapshot is not None

    def _ping(self) -> bool:
        try:
            with session_scope(self._sessionmaker) as session:
                session.execute(text("SELECT 1 FROM outgoing_users LIMIT 1"))
            return True
        except Exception as exc:
            log.warning("database unreachable: %s", exc)
            return False

    async def database_reachable(self, max_age: float = 1.0,
                                 timeout: float | None = None) -> bool:
        """Can the database be read now? Asked only on failure paths, answered from a probe
        at most ``max_age`` seconds old, one probe at a time however many ask. A probe not
        answered within ``timeout`` seconds is "no" (a hung database)."""
        if time.monotonic() - self._probed_at < max_age:
            return self._reachable
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().run_in_executor(None, self._ping)
        try:
            reachable = await asyncio.wait_for(asyncio.shield(self._probe), timeout)
        except TimeoutError:
            log.warning("database unreachable: no answer within %g s", timeout)
            reachable = False
        self._reachable, self._probed_at = reachable, time.monotonic()
        return reachable

    def user(self, user_id: int) -> UserPolicy | None:
        return self.snapshot.users.get(user_id) if self.snapshot else None

    def user_for_ip(self, ip: str) -> UserPolicy | None:
        user_id = self._index.lookup(ip)
        return self.user(user_id) if user_id is not None else None

    def user_for_login(self, login: str) -> UserPolicy | None:
        """An Authenticating User by username, else an Authenticating Domain by domain name."""
        if not self.snapshot:
            return None
        login = login_key(login)
        return self.snapshot.by_username.get(login) or self.snapshot.by_domain_login.get(login)

    def reauthentication_target(self, ip_user: UserPolicy, mail_from: str) -> UserPolicy | None:
        """The user an IP/range's traffic is re-attributed to: one that permits it, in the IP
        user's own domain, or in any domain for a shared smarthost (DESIGN.md
        "Re-authenticate"). Otherwise one customer could count against, or lock, another."""
        if not self.snapshot or not mail_from:
            return None
        # The sender as the next hop reads it: "bob"@one.example is bob@one.example.
        sender = canonical_mailbox(mail_from.strip()).lower()
        target = None
        if ip_user.reauthenticate_as == REAUTH_USER:
            target = self.snapshot.by_username.get(sender)
        elif ip_user.reauthenticate_as == REAUTH_DOMAIN:
            target = self.snapshot.by_domain_login.get(mailbox_domain(sender))
        if target is not None and target.reauthenticate_permitted and (
                target.domain_id == ip_user.domain_id or ip_user.shared_smarthost):
            return target
        return None


def login_key(login: str) -> str:
    """A login as the directory looks it up: trimmed, lower-case."""
    return login.strip().lower()
