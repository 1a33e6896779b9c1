"""The rspamd spam engine: its HTTP scanning API (``POST {RSPAMD_URL}/checkv2``).

Used instead of the built-in scorer when ``RSPAMD_URL`` is set. rspamd decides by its own
actions: ``reject``, ``add header`` and ``rewrite subject`` mean spam (the message goes to the
quarantine); ``no action``, ``greylist`` and ``soft reject`` (rate limits, greylisting: not a
content verdict) mean not spam. The rules reported are rspamd's symbols that added to the
score, highest first. Any failure (timeout, refused connection, bad answer) raises
:class:`RspamdError`; the content pipeline then falls back to the built-in scorer.
"""

from __future__ import annotations

from collections.abc import Iterable

import httpx

from scoring.spam import SpamVerdict

SPAM_ACTIONS = frozenset({"reject", "add header", "rewrite subject"})
MAX_RULES = 20


class RspamdError(Exception):
    """rspamd could not give a verdict."""


def _header(value: str) -> bytes:
    """Header values as UTF-8 bytes; CR and LF cannot be smuggled into the request."""
    return " ".join(str(value).split()).encode("utf-8")


def verdict_from(result: object) -> SpamVerdict:
    """Turn a ``/checkv2`` JSON answer into our verdict; RspamdError when it is not one."""
    if not isinstance(result, dict) or not isinstance(result.get("action"), str):
        raise RspamdError(f"unexpected answer from rspamd: {str(result)[:200]}")
    try:
        score = float(result.get("score") or 0.0)
    except (TypeError, ValueError):
        raise RspamdError(f"rspamd score is not a number: {result.get('score')!r}") from None
    symbols = result.get("symbols") if isinstance(result.get("symbols"), dict) else {}
    scored = []
    for name, detail in symbols.items():
        value = detail.get("score", 0.0) if isinstance(detail, dict) else 0.0
        try:
            scored.append((float(value), str(name)))
        except (TypeError, ValueError):
            continue
    rules = [name for value, name in sorted(scored, key=lambda s: (-s[0], s[1])) if value > 0]
    is_spam = result["action"].strip().lower() in SPAM_ACTIONS
    if is_spam and not rules:
        # e.g. GTUBE: rspamd rejects through a pre-filter whose symbol scores nothing.
        rules = sorted(str(name) for name in symbols)
    return SpamVerdict(is_spam, round(score, 2), tuple(rules[:MAX_RULES]), engine="rspamd")


async def check(client: httpx.AsyncClient, url: str, data: bytes, *, mail_from: str,
                rcpt_tos: Iterable[str], client_ip: str | None = None, user: str | None = None,
                timeout: float = 2.0) -> SpamVerdict:
    """Scan one message; the envelope goes along so rspamd's envelope rules work."""
    headers: list[tuple[bytes, bytes]] = [(b"From", _header(mail_from or "<>"))]
    headers += [(b"Rcpt", _header(rcpt)) for rcpt in rcpt_tos]
    if client_ip:
        headers.append((b"IP", _header(client_ip)))
    if user:
        headers.append((b"User", _header(user)))
    endpoint = url.rstrip("/") + "/checkv2"
    try:
        response = await client.post(endpoint, content=data, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise RspamdError(f"rspamd at {endpoint} unreachable: {type(exc).__name__} {exc}") \
            from exc
    if response.status_code != 200:
        raise RspamdError(f"rspamd answered HTTP {response.status_code}: "
                          f"{response.text[:200]}")
    try:
        result = response.json()
    except ValueError as exc:
        raise RspamdError(f"rspamd answer is not JSON: {exc}") from exc
    return verdict_from(result)
