"""The incident pack's summaries: from a sender's message-log rows to what an administrator
reads first when a lock alert arrives (who was written to, about what, from where).

Pure: the rows come in (newest first), the lists go out; the queries that fetch the rows and
the pack around them are ``outgoing/incident.py``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from scoring.activity import REFUSED_VERDICTS
from scoring.locks import auth_network

TOP_RECIPIENT_DOMAINS = 10
SAMPLE_SUBJECTS = 5
TOP_CLIENT_IPS = 20
TOP_AUTH_NETWORKS = 20
# AUTH networks as a provider reads them: a customer's office or a hosting provider's block.
NETWORK_PREFIX_V4 = 24
NETWORK_PREFIX_V6 = 48

SPAM_VERDICT = "quarantined"
ACCEPTED_VERDICTS = ("relayed", "partial")


@dataclass(frozen=True)
class LogRow:
    """What the summaries read of one message-log row."""

    at: datetime
    verdict: str
    client_ip: str | None = None
    login: str | None = None
    subject: str | None = None
    recipients: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ranked:
    """A value and how often it was seen (``extra``: the logins of an AUTH network)."""

    value: str
    count: int
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class Summary:
    recipient_domains: list[Ranked] = field(default_factory=list)
    subjects: list[Ranked] = field(default_factory=list)
    client_ips: list[Ranked] = field(default_factory=list)
    client_ips_total: int = 0
    auth_networks: list[Ranked] = field(default_factory=list)
    auth_networks_total: int = 0


def _ranked(counts: Counter, top: int) -> list[Ranked]:
    # most_common keeps first-seen order among equals: with rows newest first, the newest.
    return [Ranked(value, count) for value, count in counts.most_common(top)]


def recipient_domain(address: str) -> str | None:
    """The domain of a recipient address, lower-cased; None for one without a domain."""
    address = address.strip().strip("<>")
    local, at, domain = address.rpartition("@")
    domain = domain.strip().rstrip(".").lower()
    return domain if at and local and domain else None


def summarise(rows: Iterable[LogRow], *, top_domains: int = TOP_RECIPIENT_DOMAINS,
              subjects: int = SAMPLE_SUBJECTS) -> Summary:
    """Top recipient domains (of the first recipients each row keeps), the most frequent
    subjects, the client addresses and the networks that authenticated (/24, /48)."""
    domains: Counter = Counter()
    seen_subjects: Counter = Counter()
    ips: Counter = Counter()
    networks: Counter = Counter()
    logins: dict[str, list[str]] = {}
    for row in rows:
        for address in row.recipients:
            domain = recipient_domain(address)
            if domain:
                domains[domain] += 1
        subject = (row.subject or "").strip()
        if subject:
            seen_subjects[subject] += 1
        if row.client_ip:
            ips[row.client_ip] += 1
            if row.login:
                network = auth_network(row.client_ip, v4=NETWORK_PREFIX_V4,
                                       v6=NETWORK_PREFIX_V6)
                networks[network] += 1
                names = logins.setdefault(network, [])
                if row.login not in names and len(names) < 5:
                    names.append(row.login)
    return Summary(
        recipient_domains=_ranked(domains, top_domains),
        subjects=_ranked(seen_subjects, subjects),
        client_ips=_ranked(ips, TOP_CLIENT_IPS), client_ips_total=len(ips),
        auth_networks=[Ranked(r.value, r.count, tuple(logins[r.value]))
                       for r in _ranked(networks, TOP_AUTH_NETWORKS)],
        auth_networks_total=len(networks))


@dataclass(frozen=True)
class Counts:
    """The sender's transactions in the pack's window, by what became of them."""

    transactions: int = 0
    accepted: int = 0
    spam: int = 0
    refused: int = 0  # transactions we refused (at MAIL or RCPT, after DATA, or throttled)
    recipients: int = 0
    refused_recipients: int = 0
    by_verdict: dict[str, int] = field(default_factory=dict)


def counts(by_verdict: dict[str, tuple[int, int, int]]) -> Counts:
    """``by_verdict``: verdict -> (transactions, recipients, refused recipients)."""
    return Counts(
        transactions=sum(n for n, _, _ in by_verdict.values()),
        accepted=sum(by_verdict.get(v, (0, 0, 0))[0] for v in ACCEPTED_VERDICTS),
        spam=by_verdict.get(SPAM_VERDICT, (0, 0, 0))[0],
        refused=sum(by_verdict.get(v, (0, 0, 0))[0] for v in REFUSED_VERDICTS),
        recipients=sum(r for _, r, _ in by_verdict.values()),
        refused_recipients=sum(x for _, _, x in by_verdict.values()),
        by_verdict={v: by_verdict[v][0] for v in sorted(by_verdict,
                                                         key=lambda v: -by_verdict[v][0])})


def trigger(reason: str | None, lock_kind: str | None, actor: str | None) -> str:
    """What set the lock off, as one line: the proxy's own rule, or who locked by hand."""
    why = reason or "no reason recorded"
    if lock_kind == "automatic":
        by = "the SMTP proxy" if actor in (None, "", "proxy") else actor
        return f"Automatic lock by {by}: {why}"
    return f"Locked by {actor or 'an administrator'}: {why}"
