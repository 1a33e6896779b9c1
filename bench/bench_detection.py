"""Replay benchmark of compromise detection (prints figures; never a test).

Generates 14 days of realistic outgoing mail and replays it, message by message on a
simulated clock, through the real scoring path with no SMTP: the campaign key is
``scoring.fingerprint`` of rendered messages, the content score is the built-in scorer
(``scoring.spam.score_message``) on rendered messages, and every message runs the proxy's own
Redis scripts (``proxy/detection.lua`` with the cross-customer campaign count, the arguments
``proxy/detection.py`` builds and its ``parse``), then ``scoring.risk.decide`` and the proxy's
reaction: throttled (the sender's MTA retries 5 minutes later, six times at most), held (not
out), locked (identity, or the user when the user's risk locked; later messages are refused at
MAIL and never scored), else relayed (out), after which the next hop's answers (recipients
taken, and those refused for good) go with the user's next script call as the proxy sends
them (``detection.Answers``). Every user is enforcing
(shadow mode off) with the default thresholds of ``scoring.risk.Settings``.

Traffic (``--seed``; the tuned set is seed 1, the untuned one seed 2, which also draws every
scenario's rates, sizes and times afresh):

* legitimate: 2,000 identities of 260 users over 14 days. Each identity's daily volume is
  log-normal (median 5, a tail of role accounts to about 300), spread over the hours by a
  diurnal curve (office hours, an evening bump, quiet nights) and a weekly one (weekends at
  30 %); 1-10 recipients, at the identity's own correspondents' domains and the big
  providers; 1 % of recipients refused for good; the built-in scorer's usual small scores
  of ordinary mail (a From that differs from the envelope, a script without a Date); an
  occasional AUTH from a new network (travel) or a failed AUTH before the right password.
  On top: a monthly newsletter day (20 senders at 10x their volume, 20-50 recipients a
  message), a new employee (first seen on day 6, ramping up to 40 a day, first login from a
  new network after a mistyped password), and a shop's order confirmations (a sale: about
  400 in three hours instead of 30 a day).
* compromised, on days 12-13: a burst of phishing from one identity (one every ~6 s; the
  built-in scorer does not flag it); low-and-slow spam over 30 identities of one user (3 an
  hour each for a day); credential stuffing (failed AUTHs, then success from a new network,
  then 200 an hour); one campaign across 5 customers (60 an hour each, staggered starts).
  Harvested lists: 20-30 % of their recipients are refused for good.

Compression: nothing is aggregated; the cost is kept down by sending the messages of each
simulated minute to Redis in one pipeline (the scripts still run one message at a time in
order, as in the proxy; within one minute a message does not see the previous one's
*reply*, as concurrent sessions do not) and by rendering and fingerprinting only templated
mail (newsletters, order confirmations, spam): a personal message's content is unique, so
it gets a unique campaign key without rendering. About 250,000 messages per set, under a
minute per set on 2 cores.

    python bench/bench_detection.py                       # starts its own redis-server
    python bench/bench_detection.py --redis-url redis://127.0.0.1:6379/13   # FLUSHES db 13
    python bench/bench_detection.py --sets tuned          # only the tuned set

Leaked = attack messages relayed (not held, locked out or left deferred), whenever it
happened. A false throttle, hold or lock is a legitimate sender (an identity, or a whole user
when the user's risk decided) that reached that rung at least once. The last line is one JSON
object: ``{"tuned": {...}, "untuned": {...}}``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from outgoing import redis_keys  # noqa: E402
from proxy import detection  # noqa: E402
from scoring import risk  # noqa: E402
from scoring.fingerprint import body_of, fingerprint  # noqa: E402
from scoring.spam import score_message  # noqa: E402

DAY, HOUR, MINUTE = 86400, 3600, 60
DAYS = 14
START = 1_700_006_400  # a Wednesday 00:00 UTC
RETRY_SECONDS, RETRIES = 300, 6
TARGETS = {"burst": 25, "campaign": 50}

# the share of a day's mail per hour of day (sums to 1): nights quiet, office hours busy
_DIURNAL = [0.2, 0.1, 0.1, 0.1, 0.2, 0.5, 1.5, 3.5, 7, 9, 9, 8.5, 6, 7.5, 8.5, 8, 7, 5,
            3, 2.5, 3, 2.5, 1.5, 0.6]
DIURNAL = [x / sum(_DIURNAL) for x in _DIURNAL]
WEEKEND = 0.3
BIG_PROVIDERS = ["gmail.com", "outlook.com", "yahoo.com", "gmx.de", "web.de", "icloud.com",
                 "hotmail.com", "aol.com", "t-online.de", "orange.fr", "free.fr", "mail.ru"]
FIRST_NAMES = ["anna", "ben", "carla", "david", "eva", "felix", "gina", "hugo", "ines",
               "jonas", "karin", "lars", "maria", "nils", "olga", "paul", "rita", "sven"]


# -- messages ------------------------------------------------------------------------------

@dataclass(order=True)
class Msg:
    t: float
    seq: int
    user: int = field(compare=False)
    identity: str = field(compare=False)
    rcpts: tuple = field(compare=False)
    fp: str | None = field(compare=False)
    score: float = field(compare=False)
    refused: int = field(compare=False)  # recipients the next hop refuses for good
    tag: str = field(compare=False)  # "legit" or the scenario
    auth_failed: bool = field(default=False, compare=False)
    auth_new: bool = field(default=False, compare=False)
    tries: int = field(default=0, compare=False)
    note: str = field(default="", compare=False)  # which legitimate pattern


def render(subject: str, body: str, sender: str, rcpts: list[str]) -> tuple[str | None, float]:
    """The campaign key and the built-in score of a rendered message."""
    domain = sender.rpartition("@")[2]
    raw = (f"From: <{sender}>\r\nTo: undisclosed-recipients:;\r\nSubject: {subject}\r\n"
           f"Date: Wed, 15 Nov 2023 10:00:00 +0000\r\n"
           f"Message-ID: <{random.getrandbits(64):x}@{domain}>\r\n\r\n{body}\r\n").encode()
    verdict = score_message(raw, mail_from=sender, rcpt_tos=rcpts)
    return fingerprint(subject, body_of(raw)), verdict.score


VOCABULARY = ("garden kitchen season opening hours holiday recipe workshop team arrivals "
              "members event concert club training course library school parish council "
              "market farm harvest bakery coffee wine tasting books reading children sports "
              "match league results photos gallery exhibition museum travel tour hotel "
              "spring summer autumn winter offer discount collection fashion shoes repair "
              "service update software release features security webinar conference report "
              "annual meeting volunteers donation charity project community neighbours "
              "street festival music dance theatre cinema program schedule dates tickets "
              "bicycle hiking climbing swimming yoga health clinic practice appointments").split()


def newsletter(rng: random.Random, shop: str) -> tuple[str, str]:
    """One sender's newsletter: its own words (different senders' newsletters differ)."""
    words = [rng.choice(VOCABULARY) for _ in range(90)]
    lines = [" ".join(words[i:i + 15]) for i in range(0, 90, 15)]
    return (f"{shop} {' '.join(words[:3])}",
            "\r\n".join(lines) + f"\r\nRead more at https://{shop}/news - unsubscribe at "
            f"https://{shop}/subscribe")


def order_confirmation(shop: str, name: str, order: int) -> tuple[str, str]:
    return (f"Your order {order} at {shop}",
            f"Hello {name}, thank you for your order {order}. We have received your payment "
            f"and will ship your parcel within two working days. You can follow your "
            f"order at https://{shop}/orders/{order} and reach our customer service by "
            f"replying to this message. Kind regards, the team of {shop}")


SPAM_TEXTS = {
    "burst": ("Action required: mailbox storage almost full",
              "Dear {name}, your mailbox has reached its storage limit and incoming "
              "messages are being held. To keep receiving mail please verify your account "
              "within 24 hours at https://portal-{n}.example-cdn.net/verify and sign in with "
              "your usual password. Thank you for your cooperation, IT service desk"),
    "slow": ("Invoice {n} overdue",
             "Hello {name}, please find the outstanding invoice {n} for last month's "
             "services. Payment is now overdue and a late fee will be added unless it is "
             "settled this week. Download the invoice at https://docs-{n}.share-files.net "
             "and contact accounts if you have any questions. Regards, accounts team"),
    "stuffing": ("Exclusive offer for you",
                 "Hi {name}, our pharmacy partners offer the best prices on prescription "
                 "medicines without a visit to the doctor, discreet shipping worldwide and "
                 "a discount on your first order. Browse the catalogue at "
                 "https://meds-{n}.example-store.net and enjoy free delivery this week"),
    "campaign": ("Your parcel could not be delivered",
                 "Dear customer {name}, we attempted to deliver your parcel today but "
                 "nobody was at home. A small redelivery fee is required before we can "
                 "schedule a new attempt. Please pay and choose a date at "
                 "https://track-{n}.parcel-redelivery.net within 48 hours or the parcel "
                 "will be returned to the sender"),
}


def spam_message(rng: random.Random, kind: str, sender: str, rcpts: list[str]):
    subject, body = SPAM_TEXTS[kind]
    n = rng.randrange(10**5, 10**6)
    name = rng.choice(FIRST_NAMES)
    fp, score = render(subject.format(n=n), body.format(n=n, name=name), sender, rcpts)
    return fp, score


# -- traffic -------------------------------------------------------------------------------

class Traffic:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.seq = 0
        self.messages: list[Msg] = []
        self.attack_start: dict[str, float] = {}
        self.attackers: dict[str, set[tuple[int, str]]] = {}
        self.attacked_users: set[int] = set()  # excluded from the false positives
        self.taken: set[int] = set()  # users a scenario (legitimate or not) already has
        self.harvested = [f"d{i}.example" for i in range(5000)]
        self.unique = 0

    def add(self, t, user, identity, rcpts, fp, score, refused, tag, **kw) -> None:
        self.seq += 1
        self.messages.append(Msg(t, self.seq, user, identity, tuple(rcpts), fp, score,
                                 refused, tag, **kw))

    def unique_fp(self) -> str:
        self.unique += 1
        return f"u{self.unique:07x}"

    def legit_score(self) -> float:
        x = self.rng.random()
        return 0.0 if x < 0.88 else 1.0 if x < 0.96 else 2.0 if x < 0.99 else 3.0

    def recipients(self, contacts: list[str], n: int) -> list[str]:
        rng = self.rng
        out = []
        for _ in range(n):
            domain = (rng.choice(contacts) if rng.random() < 0.6 else
                      rng.choice(BIG_PROVIDERS))
            out.append(f"{rng.choice(FIRST_NAMES)}{rng.randrange(100)}@{domain}")
        return out

    def refusals(self, rcpts: list[str], share: float) -> int:
        return sum(self.rng.random() < share for _ in rcpts)

    def hourly(self, daily: float, day: int, hour: int) -> float:
        weekday = (day + 2) % 7  # START is a Wednesday
        return daily * DIURNAL[hour] * (WEEKEND if weekday >= 5 else 1.0)

    def poisson(self, lam: float) -> int:
        if lam <= 0:
            return 0
        if lam > 30:
            return max(0, round(self.rng.gauss(lam, math.sqrt(lam))))
        limit, k, p = math.exp(-lam), 0, 1.0
        while True:
            p *= self.rng.random()
            if p <= limit:
                return k
            k += 1

    def identity_day(self, user, identity, contacts, daily, day, auth, note="",
                     first_hour=0) -> None:
        rng = self.rng
        new_network_day = auth.get("new_network_day")
        typo_days = auth.get("typo_days", ())
        first_of_day = True
        for hour in range(first_hour, 24):
            for _ in range(self.poisson(self.hourly(daily, day, hour))):
                t = START + day * DAY + hour * HOUR + rng.random() * HOUR
                n = 1 if rng.random() < 0.7 else rng.randint(2, 3) if rng.random() < 0.67 \
                    else rng.randint(4, 10)
                rcpts = self.recipients(contacts, n)
                flags = {}
                if first_of_day and auth.get("auth"):
                    flags = dict(auth_new=day == new_network_day,
                                 auth_failed=day in typo_days)
                    first_of_day = False
                self.add(t, user, identity, rcpts, self.unique_fp(), self.legit_score(),
                         self.refusals(rcpts, 0.01), "legit", note=note, **flags)

    def legitimate(self, identities: int = 2000, users: int = 260) -> None:
        rng = self.rng
        # users of 1 to 40 identities (a few big ones), 2,000 identities in all
        sizes = [1 + min(int(rng.paretovariate(1.2)), 39) for _ in range(users)]
        while sum(sizes) > identities:
            sizes[rng.randrange(users)] = max(1, sizes[rng.randrange(users)] - 1)
        while sum(sizes) < identities:
            sizes[rng.randrange(users)] += 1
        self.users = {}
        for u, size in enumerate(sizes, start=1):
            domain = f"customer{u}.example"
            auth = rng.random() < 0.6
            self.users[u] = [f"{rng.choice(FIRST_NAMES)}.{k}@{domain}" for k in range(size)]
            for identity in self.users[u]:
                daily = min(rng.lognormvariate(math.log(5), 1.0), 300)
                contacts = [f"partner{rng.randrange(400)}.example" for _ in range(8)]
                plan = {"auth": auth,
                        "new_network_day": rng.randrange(DAYS) if rng.random() < 0.3 else -1,
                        "typo_days": {d for d in range(DAYS) if rng.random() < 0.02}}
                for day in range(DAYS):
                    self.identity_day(u, identity, contacts, daily, day, plan,
                                      note=f"{daily:.0f} a day")
        self.next_user = users + 1

    def pick_user(self, min_size=1, max_size=40) -> int:
        while True:
            u = self.rng.randrange(1, len(self.users) + 1)
            if min_size <= len(self.users[u]) <= max_size and u not in self.taken:
                self.taken.add(u)
                return u

    def newsletter_day(self, senders: int = 20) -> None:
        rng = self.rng
        day = 9 + rng.randrange(2)
        for _ in range(senders):
            u = self.pick_user()
            identity = rng.choice(self.users[u])
            shop = identity.rpartition("@")[2]
            volume = 10 * max(5, round(rng.lognormvariate(math.log(5), 0.8)))
            begin = START + day * DAY + (8 + rng.random() * 3) * HOUR
            span = (1 + rng.random() * 2) * HOUR
            subject, body = newsletter(rng, shop)
            for k in range(volume):
                rcpts = [f"{rng.choice(FIRST_NAMES)}{rng.randrange(10**4)}@"
                         f"{rng.choice(BIG_PROVIDERS + self.harvested[:300])}"
                         for _ in range(rng.randint(20, 50))]
                fp, score = render(subject, body, identity, rcpts)
                self.add(begin + span * k / volume, u, identity, rcpts, fp, score,
                         self.refusals(rcpts, 0.03), "legit", note="newsletter")

    def new_employee(self) -> None:
        rng = self.rng
        u = self.pick_user(min_size=3)
        identity = f"new.colleague@customer{u}.example"
        contacts = [f"partner{rng.randrange(400)}.example" for _ in range(8)]
        for day in range(6, DAYS):
            daily = 5 + (40 - 5) * (day - 6) / (DAYS - 7)
            plan = {"auth": True, "new_network_day": 6, "typo_days": {6}}
            self.identity_day(u, identity, contacts, daily, day, plan, note="new employee",
                              first_hour=9 if day == 6 else 0)

    def shop_sale(self) -> None:
        rng = self.rng
        u = self.pick_user()
        shop = f"shop{u}.example"
        identity = f"orders@{shop}"
        order = 10000
        for day in range(DAYS):
            for hour in range(24):
                for _ in range(self.poisson(30 / 24)):
                    order += 1
                    self._confirmation(u, identity, shop, order,
                                       START + day * DAY + (hour + rng.random()) * HOUR)
        begin = START + (10 + rng.randrange(3)) * DAY + (18 + rng.random()) * HOUR
        count = rng.randint(300, 500)
        for k in range(count):  # front-loaded: the sale's first hour is the busiest
            order += 1
            self._confirmation(u, identity, shop, order,
                               begin + 3 * HOUR * (k / count) ** 1.5)

    def _confirmation(self, u, identity, shop, order, t) -> None:
        rcpts = [f"{self.rng.choice(FIRST_NAMES)}{self.rng.randrange(10**4)}@"
                 f"{self.rng.choice(BIG_PROVIDERS)}"]
        subject, body = order_confirmation(shop, self.rng.choice(FIRST_NAMES), order)
        fp, score = render(subject, body, identity, rcpts)
        self.add(t, u, identity, rcpts, fp, score, self.refusals(rcpts, 0.02), "legit",
                 note="shop")

    # -- compromised ---------------------------------------------------------------------

    def spam(self, kind: str, t: float, user: int, identity: str, share: float,
             max_rcpts: int = 3, **flags) -> None:
        rng = self.rng
        rcpts = [f"{rng.choice(FIRST_NAMES)}{rng.randrange(10**5)}@"
                 f"{rng.choice(self.harvested)}" for _ in range(rng.randint(1, max_rcpts))]
        fp, score = spam_message(rng, kind, identity, rcpts)
        self.add(t, user, identity, rcpts, fp, score, self.refusals(rcpts, share), kind,
                 **flags)
        self.attackers.setdefault(kind, set()).add((user, identity.lower()))
        self.attack_start[kind] = min(self.attack_start.get(kind, t), t)

    def burst(self) -> None:
        rng = self.rng
        u = self.pick_user()
        self.attacked_users.add(u)
        identity = rng.choice(self.users[u])
        begin = START + 13 * DAY + (9 + rng.random() * 8) * HOUR
        gap = rng.uniform(4, 8)
        for k in range(1000):
            self.spam("burst", begin + k * gap, u, identity, rng.uniform(0.2, 0.3))

    def slow(self) -> None:
        rng = self.rng
        u = self.pick_user(min_size=30)
        self.attacked_users.add(u)
        begin = START + 12 * DAY + (6 + rng.random() * 4) * HOUR
        rate = rng.uniform(2.5, 3.5)
        for identity in rng.sample(self.users[u], 30):
            t = begin + rng.random() * HOUR
            while t < begin + DAY:
                self.spam("slow", t, u, identity, rng.uniform(0.2, 0.3), max_rcpts=1)
                t += rng.expovariate(rate / HOUR)

    def stuffing(self) -> None:
        rng = self.rng
        u = self.pick_user()
        self.attacked_users.add(u)
        identity = rng.choice(self.users[u])
        begin = START + 13 * DAY + (1 + rng.random() * 3) * HOUR
        rate = rng.uniform(150, 250)
        failures_until = begin  # the failed AUTHs just before; they count for 600 s
        for k in range(int(rate * 2)):
            t = begin + k * HOUR / rate
            first = k % 20 == 0  # a new session every 20 messages
            self.spam("stuffing", t, u, identity, rng.uniform(0.2, 0.3),
                      auth_failed=first and t - failures_until < 600, auth_new=k == 0)

    def campaign(self) -> None:
        rng = self.rng
        begin = START + 13 * DAY + (10 + rng.random() * 4) * HOUR
        for n in range(5):
            u = self.pick_user()
            self.attacked_users.add(u)
            identity = rng.choice(self.users[u])
            start = begin + n * rng.uniform(3, 8) * MINUTE
            rate = rng.uniform(45, 75)
            for k in range(int(rate * 2)):
                self.spam("campaign", start + k * HOUR / rate, u, identity,
                          rng.uniform(0.15, 0.25), max_rcpts=2)


def generate(seed: int) -> Traffic:
    traffic = Traffic(seed)
    traffic.legitimate()
    traffic.newsletter_day()
    traffic.new_employee()
    traffic.shop_sale()
    traffic.burst()
    traffic.slow()
    traffic.stuffing()
    traffic.campaign()
    return traffic


# -- replay --------------------------------------------------------------------------------

@dataclass
class Scenario:
    out: int = 0
    held: int = 0
    refused: int = 0
    deferred: int = 0
    firsts: dict = field(default_factory=dict)  # rung -> (minutes, out before)
    stopped: dict = field(default_factory=dict)  # attacker -> (minutes, out before)
    split: dict = field(default_factory=dict)  # attacker -> its risk by signal when held


def replay(client, traffic: Traffic, settings: risk.Settings) -> dict:
    client.flushdb()
    detect = client.register_script(detection.DETECTION_LUA)
    count = client.register_script(detection.CAMPAIGN_LUA)
    campaigns = detection.CampaignCounts()
    answers = detection.Answers(size=10**6)
    heap = traffic.messages
    heapq.heapify(heap)
    locked_users: set[int] = set()
    locked_ids: set[tuple[int, str]] = set()
    scenarios = {kind: Scenario() for kind in traffic.attackers}
    legit = {"messages": 0, "out": 0, "held": 0, "refused": 0, "deferred": 0,
             "throttled_msgs": 0}
    false = {risk.THROTTLE: set(), risk.HOLD: set(), risk.LOCK: set()}
    why: dict = {}
    # each sender's risk split by signal, decayed like the risk: what put it on a rung
    contrib: dict[tuple[int, str], list] = {}

    def add_points(key, t, signals):
        entry = contrib.setdefault(key, [t, {}])
        factor = risk.decay(1.0, t - entry[0], settings.half_life)
        parts = entry[1]
        for name in parts:
            parts[name] *= factor
        for name, value in signals.items():
            parts[name] = parts.get(name, 0.0) + value
        entry[0] = t
        return parts

    innocent = lambda m: m.tag == "legit" and m.user not in traffic.attacked_users  # noqa: E731
    scored = 0
    while heap:
        window = heap[0].t // MINUTE
        batch = []
        while heap and heap[0].t // MINUTE == window:
            m = heapq.heappop(heap)
            identity = m.identity.lower()
            if m.user in locked_users or (m.user, identity) in locked_ids:
                (scenarios[m.tag].__dict__ if m.tag != "legit" else legit)["refused"] += 1
                continue
            batch.append(m)
        if not batch:
            continue
        pipe = client.pipeline(transaction=False)
        for m in batch:
            hour = int(m.t // risk.HOUR)
            identity = m.identity.lower()
            senders = campaigns.get(m.fp) if m.fp else 1
            evidence = detection.Evidence(identity=identity, recipients=m.rcpts,
                                          fingerprint=m.fp, auth_failed=m.auth_failed,
                                          auth_new_network=m.auth_new, spam_score=m.score)
            if m.fp:
                count(keys=[redis_keys.campaign_senders(hour, m.fp)],
                      args=[f"{m.user}:{identity}"], client=pipe)
            detect(keys=detection.keys_for(m.user, identity, m.t, m.fp),
                   args=detection._args(evidence, settings, m.t, senders, True,
                                        answers.take(m.user, m.t)), client=pipe)
        replies = iter(pipe.execute())
        scored += len(batch)
        for m in batch:
            identity = m.identity.lower()
            if m.fp:
                campaigns.put(m.fp, int(next(replies)))
            found = detection.parse(next(replies))
            is_legit = m.tag == "legit"
            stats = legit if is_legit else scenarios[m.tag]
            if is_legit:
                legit["messages"] += m.tries == 0
            if found.throttled:
                if is_legit:
                    legit["throttled_msgs"] += 1
                if m.tries < RETRIES:
                    m.tries += 1
                    m.t += RETRY_SECONDS
                    heapq.heappush(heap, m)
                else:
                    (legit if is_legit else stats.__dict__)["deferred"] += 1
                continue
            decision = risk.decide(found.identity_risk, found.user_risk, settings,
                                   found.signals)
            split = {identity: add_points((m.user, identity), m.t, found.identity_signals),
                     "*": add_points((m.user, "*"), m.t, found.user_signals)}
            if is_legit and innocent(m):
                for rung in (risk.THROTTLE, risk.HOLD, risk.LOCK):
                    if risk.RUNGS.index(decision.rung) >= risk.RUNGS.index(rung):
                        by_identity = (risk.RUNGS.index(found.identity_rung[1])
                                       >= risk.RUNGS.index(rung))
                        sender = (m.user, identity if by_identity else "*")
                        if sender not in false[rung]:
                            false[rung].add(sender)
                            why[(rung, sender)] = (m.note,
                                                   found.identity_risk, found.user_risk,
                                                   dict(split[sender[1]]))
            if not is_legit:
                minutes = (m.t - traffic.attack_start[m.tag]) / MINUTE
                if decision.rung != risk.OBSERVE:
                    for rung in risk.RUNGS[1:risk.RUNGS.index(decision.rung) + 1]:
                        stats.firsts.setdefault(rung, (minutes, stats.out))
                if decision.rung in (risk.HOLD, risk.LOCK):
                    stats.stopped.setdefault((m.user, identity), (minutes, stats.out))
                    subject = identity if found.identity_rung[1] in (risk.HOLD, risk.LOCK) \
                        else "*"
                    stats.split.setdefault((m.user, identity), dict(split[subject]))
            effective = decision.effective
            if effective == risk.LOCK:
                if found.identity_rung[1] != risk.LOCK:
                    locked_users.add(m.user)
                    if not is_legit:
                        for attacker in traffic.attackers[m.tag]:
                            if attacker[0] == m.user:
                                stats.stopped.setdefault(attacker, (minutes, stats.out))
                else:
                    locked_ids.add((m.user, identity))
                (legit if is_legit else stats.__dict__)["refused"] += 1
            elif effective == risk.HOLD:
                (legit if is_legit else stats.__dict__)["held"] += 1
            else:
                (legit if is_legit else stats.__dict__)["out"] += 1
                answers.add(m.user, identity, len(m.rcpts), m.refused, m.t)
    return {"scenarios": scenarios, "legit": legit, "false": false, "why": why,
            "scored": scored,
            "attackers": traffic.attackers}


# -- report --------------------------------------------------------------------------------

LABELS = {"burst": "burst of spam, 1 identity", "slow": "low-and-slow, 30 identities",
          "stuffing": "credential stuffing", "campaign": "campaign across 5 customers"}


def explain(parts: dict) -> str:
    """A sender's risk by signal, biggest first (decayed points, rounded)."""
    top = sorted(((k, v) for k, v in parts.items() if v >= 0.5), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v:.0f}" for k, v in top) or "nothing"


def report(name: str, result: dict, seconds: float, every: bool = False) -> dict:
    print(f"\n{name} set: {result['scored']} messages scored in {seconds:.0f} s")
    print(f"  {'scenario':30s} {'sent':>5s} {'out':>5s} {'held':>5s} {'refused':>7s} "
          f"{'deferred':>8s}   out before / minutes until: throttle, hold, lock, "
          "held everywhere")
    figures = {}
    for kind in ("burst", "slow", "stuffing", "campaign"):
        s = result["scenarios"][kind]
        attackers = result["attackers"][kind]
        sent = s.out + s.held + s.refused + s.deferred

        def first(rung, s=s):
            if rung not in s.firsts:
                return "    never"
            minutes, out = s.firsts[rung]
            return f"{out:5d}/{minutes:4.0f}m"

        if len(s.stopped) == len(attackers):
            minutes = max(v[0] for v in s.stopped.values())
            out = max(v[1] for v in s.stopped.values())
            everywhere = f"{out:5d}/{minutes:4.0f}m"
        else:
            everywhere = f"{len(s.stopped)} of {len(attackers)}"
        print(f"  {LABELS[kind]:30s} {sent:5d} {s.out:5d} {s.held:5d} {s.refused:7d} "
              f"{s.deferred:8d}   {first(risk.THROTTLE)} {first(risk.HOLD)} "
              f"{first(risk.LOCK)} {everywhere}")
        for attacker, parts in list(s.split.items())[:5]:
            print(f"    held: user {attacker[0]} {attacker[1]}: {explain(parts)}")
        figures[f"{kind}_leaked"] = s.out
    legit, false = result["legit"], result["false"]
    figures.update(false_throttles=len(false[risk.THROTTLE]), false_holds=len(false[risk.HOLD]),
                   false_locks=len(false[risk.LOCK]))
    print(f"  legitimate: {legit['messages']} messages, {legit['out']} out, {legit['held']} "
          f"held, {legit['refused']} refused (locked), {legit['deferred']} given up, "
          f"{legit['throttled_msgs']} 451s (retried)")
    print(f"  false throttles {figures['false_throttles']}, false holds "
          f"{figures['false_holds']} (target <= 1), false locks {figures['false_locks']} "
          "(target 0)   [a sender: an identity, or a user when the user's risk decided]")
    for rung in ((risk.THROTTLE,) if every else ()) + (risk.HOLD, risk.LOCK):
        for sender in sorted(false[rung])[:None if every else 12]:
            note, i_risk, u_risk, signals = result["why"][(rung, sender)]
            print(f"    {rung}: user {sender[0]} {sender[1]} ({note}): risk {i_risk:.0f}, "
                  f"user {u_risk:.0f}; {explain(signals)}")
    burst = result["scenarios"]["burst"]
    held_at = burst.firsts.get(risk.HOLD, (None, None))[1]
    print(f"  targets: burst held after <= {TARGETS['burst']} messages: "
          f"{'never' if held_at is None else held_at}; campaign held everywhere after <= "
          f"{TARGETS['campaign']} in all: {result['scenarios']['campaign'].out} out")
    return figures


def start_redis() -> tuple[subprocess.Popen, str, Path]:
    directory = Path(tempfile.mkdtemp(prefix="og-bench-detection-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", str(directory)],
                              stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return server, f"redis://127.0.0.1:{port}/0", directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", help="a Redis database to FLUSH and use (default: "
                                            "start a redis-server of its own)")
    parser.add_argument("--sets", choices=("both", "tuned", "untuned"), default="both")
    parser.add_argument("--tuned-seed", type=int, default=1)
    parser.add_argument("--untuned-seed", type=int, default=2)
    parser.add_argument("--every", action="store_true",
                        help="list every false throttle, hold and lock (default: 12 of each "
                             "hold and lock) with the sender's risk by signal")
    args = parser.parse_args()
    import redis

    server = directory = None
    url = args.redis_url
    if not url:
        server, url, directory = start_redis()
    client = redis.Redis.from_url(url)
    settings = risk.Settings(enabled=True, shadow=False)
    print(f"Outbound Guard compromise-detection replay: {os.cpu_count()} cores; thresholds "
          f"throttle {settings.throttle_at:g}, hold {settings.hold_at:g}, lock "
          f"{settings.lock_at:g}, throttle rate {settings.throttle_rate}/min, new sender "
          f"allowance {settings.new_sender_allowance:g}/h, half-life "
          f"{settings.half_life:g} s; weights " + ", ".join(
              f"{k} {v:g}" for k, v in risk.WEIGHTS.items()))
    out = {}
    try:
        for name, seed in (("tuned", args.tuned_seed), ("untuned", args.untuned_seed)):
            if args.sets not in ("both", name):
                continue
            began = time.perf_counter()
            traffic = generate(seed)
            generated = time.perf_counter() - began
            result = replay(client, traffic, settings)
            out[name] = report(f"{name} (seed {seed}, generated in {generated:.0f} s)",
                               result, time.perf_counter() - began - generated, args.every)
        client.flushdb()
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
            shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
