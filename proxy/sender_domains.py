"""When was the envelope sender's domain registered? The imported list first, then RDAP.

Unknown never rejects: a look-up that times out, fails or finds no registration event lets
the message through (and is cached for a while so a slow RDAP server does not slow every
MAIL). See ``outgoing/newdomains.py`` for the sources and their configuration.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from urllib.parse import quote

import httpx

from outgoing.newdomains import (
    FAILED_LOOKUPS_KEEP_SECONDS,
    LIST_KEY,
    UNKNOWN,
    failed_lookups_key,
    rdap_cache_key,
)
from scoring.newdomains import parse_rdap_registration

log = logging.getLogger(__name__)

# Errors (timeouts, 5xx) are cached for at most this long: long enough to spare a struggling
# RDAP server, short enough that a real answer soon follows.
ERROR_CACHE_SECONDS = 300
MAX_RDAP_BYTES = 256 * 1024


class RegistrationDates:
    def __init__(self, config: dict, redis, http: httpx.AsyncClient | None = None):
        self.redis = redis
        self.rdap_url = (config.get("RDAP_URL") or "").strip()
        self.timeout = float(config.get("RDAP_TIMEOUT") or 3.0)
        self.cache_seconds = int(config.get("RDAP_CACHE_SECONDS") or 86400)
        self.negative_seconds = int(config.get("RDAP_NEGATIVE_CACHE_SECONDS") or 3600)
        self._http = http
        self._pending: dict[str, asyncio.Future] = {}

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=True, max_redirects=3,
                                           headers={"Accept": "application/rdap+json"})
        return self._http

    async def registered_at(self, domain: str) -> float | None:
        listed = await self.redis.zscore(LIST_KEY, domain)
        if listed is not None:
            return float(listed)
        if not self.rdap_url:
            return None
        cached = await self.redis.get(rdap_cache_key(domain))
        if cached is not None:
            return None if cached == UNKNOWN else float(cached)
        # One look-up per domain at a time; concurrent MAILs wait for the same answer.
        pending = self._pending.get(domain)
        if pending is None:
            pending = asyncio.ensure_future(self._rdap(domain))
            self._pending[domain] = pending
            pending.add_done_callback(lambda _: self._pending.pop(domain, None))
        return await asyncio.shield(pending)

    async def _rdap(self, domain: str) -> float | None:
        url = f"{self.rdap_url.rstrip('/')}/domain/{quote(domain)}"
        ttl = self.negative_seconds
        value = None
        try:
            response = await self._client().get(url, timeout=self.timeout)
            if response.status_code == 200 and len(response.content) <= MAX_RDAP_BYTES:
                value = parse_rdap_registration(json.loads(response.content))
                if value is not None:
                    ttl = self.cache_seconds
            elif response.status_code != 404:
                log.warning("RDAP %s answered HTTP %s", url, response.status_code)
                ttl = min(ttl, ERROR_CACHE_SECONDS)
                await self._count_failure()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("RDAP look-up of %s failed: %s %s", domain, type(exc).__name__, exc)
            ttl = min(ttl, ERROR_CACHE_SECONDS)
            await self._count_failure()
        await self.redis.set(rdap_cache_key(domain), UNKNOWN if value is None else repr(value),
                             ex=max(1, ttl))
        return value

    async def _count_failure(self) -> None:
        """Count the failure for the control panel; the message goes on unchecked either way."""
        key = failed_lookups_key(time.time())
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, FAILED_LOOKUPS_KEEP_SECONDS)
                await pipe.execute()
        except Exception:
            log.exception("could not count a failed RDAP look-up")

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
