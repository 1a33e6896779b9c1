"""The incident pack: the lock alert carries it (a real proxy locks, a real RQ worker writes
the message log and mails the alert to a real SMTP sink), and the panel hands it out as a
.zip, to the sender's own domain only, within its size limits."""

from __future__ import annotations

import email
import email.policy
import io
import json
import re
import threading
import time
import zipfile
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select

from outgoing import incident, message_log
from outgoing.models import (
    ArchivedMessage,
    Domain,
    HeldMessage,
    OutgoingUser,
    QuarantinedMessage,
    utcnow,
)
from outgoing.tokens import make_unlock_token
from tests.support import data, worker
from tests.support.mail import GTUBE, client, message, send
from tests.support.web import log_in
from tests.support.worker import PUBLIC_URL

PASSWORD = "Alice-pass-123"
MALLORY_PW = "Mallory-pass-123"
OPS, OPS_PW = "ops@example.com", "Ops-pass-12345"
OTHER, OTHER_PW = "ops@other.example", "Other-pass-12345"
ROOT, ROOT_PW = "root@example.net", "Root-pass-12345"
SHARED_IP = "127.0.0.5"


def lock_alert(sink, address: str) -> email.message.EmailMessage:
    """The lock alert among what the worker sent (the abuse reports go there too)."""
    mails = [email.message_from_bytes(m.data, policy=email.policy.default)
             for m in sink.handler.messages if m.rcpt_tos == [address]]
    found = [m for m in mails if m["Subject"].startswith("[Outbound Guard] Locked")]
    assert len(found) == 1, [m["Subject"] for m in mails]
    return found[0]


def stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def opened(response) -> tuple[dict, dict[str, email.message.EmailMessage]]:
    assert response.status_code == 200, response.status_code
    assert response.mimetype == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.data)) as archive:
        assert archive.testzip() is None
        summary = json.loads(archive.read("summary.json"))
        messages = {name: email.message_from_bytes(archive.read(name),
                                                   policy=email.policy.default)
                    for name in archive.namelist() if name.endswith(".eml")}
    assert sorted(messages) == sorted(m["file"] for m in summary["messages"])
    return summary, messages


def panel(app, login: str, password: str):
    web = app.test_client()
    assert log_in(web, login, password).status_code == 302
    return web


def test_the_lock_alert_carries_the_incident_pack_of_what_the_proxy_logged(
        instance, start_proxy, clock, sink, app, redis_client):
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          message_archiving=True)
    worker.set_domain("example.com", abuse_report_address="postmaster@example.com")
    # Another customer on the same address, writing to the same recipients.
    data.add_user("other.example", "user", "mallory@other.example", MALLORY_PW)
    data.add_admin(OPS, OPS_PW, domain="example.com")
    data.add_admin(OTHER, OTHER_PW, domain="other.example")
    clock.now = time.time() - 300  # the proxy's clock: the transactions of minutes ago
    proxy = start_proxy()
    started = clock.now

    with client(proxy.port, source=SHARED_IP) as smtp:
        smtp.login("mallory@other.example", MALLORY_PW)
        assert send(smtp, message(sender="mallory@other.example", subject="Mallory's offer"),
                    sender="mallory@other.example",
                    rcpts=("x@victim.test", "bob@example.org"))[0] == 250
        assert send(smtp, message(sender="mallory@other.example", subject="Mallory's spam",
                                  body=GTUBE), sender="mallory@other.example")[0] == 550
    clock.advance(20)
    with client(proxy.port, source=SHARED_IP) as smtp:
        smtp.login("alice@example.com", PASSWORD)
        assert send(smtp, message(subject="Lunch"))[0] == 250
        clock.advance(20)
        assert send(smtp, message(subject="Minutes"),
                    rcpts=("carol@example.net", "dave@example.org"))[0] == 250
        for n in range(5):
            clock.advance(20)
            assert send(smtp, message(subject="Cheap pills", body=GTUBE, to="x@victim.test"),
                        rcpts=(f"x{n}@victim.test", f"y{n}@other-victim.test"))[0] == 550
        clock.advance(20)
        last = clock.now
        code, reply = smtp.mail("alice@example.com")
        assert code == 550 and b"is locked" in reply
    assert worker.target("user", alice).locked
    transactions = 2 + 2 + 5 + 1
    deadline = time.monotonic() + 5
    while redis_client.xlen(message_log.STREAM) < transactions and time.monotonic() < deadline:
        time.sleep(0.02)  # the proxy appends after each reply, without waiting

    worker.burst(sink)

    alert = lock_alert(sink, "postmaster@example.com")
    text = alert.get_content()
    pack = text[text.index("Incident pack:"):]
    assert "What triggered the lock: Automatic lock by the SMTP proxy: " \
           "5 spam messages in 10 minutes" in pack
    assert "Spam in the spam window before the lock: 5" in pack
    assert "Transactions: 8 (quarantined 5, relayed 2, refused 1)" in pack
    assert "Spam (quarantined): 5" in pack
    assert "Messages accepted: 2" in pack
    assert "Refused transactions: 1" in pack
    assert "Recipients: 13, of them refused: 0" in pack
    assert f"First message: {stamp(started + 20)}" in pack
    assert f"Last message:  {stamp(last)}" in pack
    domains = pack[pack.index("Top recipient domains"):pack.index("Sample subjects")]
    assert [line.split()[0] for line in domains.splitlines()[1:] if line.strip()] == [
        "victim.test", "other-victim.test", "example.org", "example.net"]
    assert "  victim.test  5 recipients" in domains
    assert "  example.org  2 recipients" in domains  # Mallory's bob@example.org not counted
    assert "  example.net  1 recipient\r\n" in domains
    assert '"Cheap pills"  5 message(s)' in pack
    assert '"Lunch"  1 message(s)' in pack and '"Minutes"  1 message(s)' in pack
    assert "Mallory" not in text and "mallory" not in text
    assert f"  {SHARED_IP}  8 transactions" in pack
    assert "  127.0.0.0/24  8 transactions (alice@example.com)" in pack

    search = next(line for line in pack.splitlines() if "/outgoing/log?" in line)
    assert search.startswith(f"{PUBLIC_URL}/outgoing/log?")
    query = parse_qs(urlsplit(search).query)
    assert query["user"] == ["alice@example.com"] and "identity" not in query
    since = datetime.strptime(query["from"][0], "%Y-%m-%dT%H:%M")
    until = datetime.strptime(query["to"][0], "%Y-%m-%dT%H:%M")
    assert until - since == timedelta(hours=24)  # "to" takes in its whole minute
    assert since < datetime.fromtimestamp(started, UTC).replace(tzinfo=None) < \
        until + timedelta(minutes=1)

    own = panel(app, OPS, OPS_PW)
    listed = own.get(search.removeprefix(PUBLIC_URL)).get_data(as_text=True)
    assert len(re.findall(r'id="log-\d+"', listed)) == 8 and "Mallory" not in listed

    download = next(line for line in pack.splitlines() if "incident-pack" in line)
    assert download == f"{PUBLIC_URL}/outgoing/users/{alice}/incident-pack"
    summary, messages = opened(own.get(download.removeprefix(PUBLIC_URL)))
    assert summary["target"]["user"] == "alice@example.com"
    assert summary["counts"]["spam"] == 5 and summary["counts"]["transactions"] == 8
    assert summary["lock"]["spam_before_lock"] == 5
    assert [s["subject"] for s in summary["sample_subjects"]] == ["Cheap pills", "Minutes",
                                                                   "Lunch"]
    # Five quarantined (newest first), then the two archived copies of what was relayed.
    assert [m["store"] for m in summary["messages"]] == ["quarantine"] * 5 + ["archive"] * 2
    assert sorted(str(m["Subject"]) for m in messages.values()) == [
        "Cheap pills"] * 5 + ["Lunch", "Minutes"]
    assert all(GTUBE in m.get_body().get_content() for m in messages.values()
               if m["Subject"] == "Cheap pills")

    stranger = panel(app, OTHER, OTHER_PW)
    assert stranger.get(download.removeprefix(PUBLIC_URL)).status_code == 404


def test_the_alert_waits_for_the_log_record_of_the_message_that_set_off_the_lock(
        instance, sink, redis_client):
    """The proxy appends a transaction's record after its reply, and the lock comes before
    the reply: the worker may start on the alert before the fifth spam is in the stream."""
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    domain_id = worker.set_domain("example.com", abuse_report_address="postmaster@example.com")
    own = {"user_id": alice, "domain_id": domain_id, "user_name": "alice@example.com",
           "login": "alice@example.com", "verdict": "quarantined", "stage": "content",
           "stored_kind": "quarantine", "subject": "Cheap pills"}
    now = utcnow()
    spam = [worker.add_spam("example.com", alice, received_at=now - timedelta(minutes=5 - n))
            for n in range(5)]
    store_log(*[log(n, 0, stored_id=spam[n], **own) for n in range(4)])
    data.query(lambda s: [s.execute(  # the four logged ones, minutes before the lock
        message_log.MessageLogEntry.__table__.update().where(
            message_log.MessageLogEntry.stored_id == spam[n]).values(
            at=now - timedelta(minutes=5 - n))) for n in range(4)])
    worker.lock("user", alice)

    def append_the_fifth_once_the_alert_job_reads_the_stream():
        deadline = time.monotonic() + 30
        while not redis_client.exists(message_log.STREAM) and time.monotonic() < deadline:
            time.sleep(0.005)  # the job's first write creates the stream and its group
        record = dict(own, at=time.time() - 1, stored_id=spam[4], client_ip="192.0.2.10",
                      recipients=["victim@example.org"], rcpt_count=1)
        redis_client.xadd(message_log.STREAM, message_log.encode(record))

    late = threading.Thread(target=append_the_fifth_once_the_alert_job_reads_the_stream)
    late.start()
    worker.burst(sink)
    late.join()

    text = lock_alert(sink, "postmaster@example.com").get_content()
    assert "Spam in the spam window before the lock: 5" in text
    assert "Spam (quarantined): 5" in text


# --- the .zip from stored data -------------------------------------------------------------

T0 = utcnow().replace(microsecond=0) - timedelta(hours=2)


def log(n: int, minutes: float, **fields) -> tuple[str, dict]:
    entry = {"at": (T0 + timedelta(minutes=minutes)).replace(tzinfo=UTC).timestamp(),
             "stage": "relay", "verdict": "relayed", "reply": "250 2.0.0 Message accepted",
             "client_ip": "192.0.2.10", "login": None, "recipients": ["bob@example.org"],
             "rcpt_count": 1}
    entry.update(fields)
    return f"{1700000000000 + n}-0", message_log.encode(entry)


def store_log(*records) -> None:
    data.query(lambda s: message_log.insert_rows(
        s, [message_log.row_from_entry(stream_id, fields) for stream_id, fields in records]))


def add_stored(model, domain_id: int, user_id: int, subject: str, *, minutes: float,
               mail_from: str = "alice@example.com", size: int = 0, **fields) -> int:
    body = message(sender=mail_from, subject=subject, body="x" * size + "\n")

    def add(session):
        row = model(domain_id=domain_id, user_id=user_id, mail_from=mail_from,
                    rcpt_tos='["bob@example.org"]', subject=subject, size=len(body),
                    storage_key="db:", body=body,
                    received_at=T0 + timedelta(minutes=minutes), **fields)
        session.add(row)
        session.flush()
        return row.id
    return data.query(add)


@pytest.fixture
def customers(instance):
    """Alice (example.com) and Mallory (other.example) on the same client address, writing
    to the same recipients, each with logged transactions and stored messages."""
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD)
    mallory = data.add_user("other.example", "user", "mallory@other.example", MALLORY_PW)
    news = data.add_identity(alice, "news@example.com")
    ids = data.query(lambda s: {n: s.scalar(select(Domain.id).where(Domain.name == n))
                                for n in ("example.com", "other.example")})
    own = {"user_id": alice, "domain_id": ids["example.com"], "user_name": "alice@example.com",
           "login": "alice@example.com"}
    other = {"user_id": mallory, "domain_id": ids["other.example"],
             "user_name": "mallory@other.example", "login": "mallory@other.example"}
    spam = worker.add_spam("example.com", alice, identity="news@example.com",
                           mail_from="news@example.com", subject="Newsletter blast",
                           received_at=T0 + timedelta(minutes=10))
    theirs = worker.add_spam("other.example", mallory, identity="mallory@other.example",
                             mail_from="mallory@other.example", subject="Mallory's blast",
                             client_ip="192.0.2.10", received_at=T0 + timedelta(minutes=11))
    held = add_stored(HeldMessage, ids["example.com"], alice, "Held for review", minutes=12,
                      identity="alice@example.com")
    archived = add_stored(ArchivedMessage, ids["example.com"], alice, "Monthly report",
                          minutes=13)
    # Mallory wrote as an example.com address: the copy is in example.com's archive, and
    # still never Alice's. Alice's copy filed with other.example is not hers to show either.
    planted = add_stored(ArchivedMessage, ids["example.com"], mallory, "Mallory in disguise",
                         minutes=14, mail_from="billing@example.com")
    filed_away = add_stored(ArchivedMessage, ids["other.example"], alice, "Filed elsewhere",
                            minutes=15, mail_from="alice@other.example")
    store_log(
        log(1, 0, subject="Monthly report", identity="alice@example.com",
            stored_kind="archive", stored_id=archived, **own),
        log(2, 10, subject="Newsletter blast", verdict="quarantined", stage="content",
            identity="news@example.com", stored_kind="quarantine", stored_id=spam,
            recipients=["x@victim.test", "bob@example.org"], rcpt_count=2, **own),
        log(3, 11, subject="Mallory's blast", verdict="quarantined", stage="content",
            stored_kind="quarantine", stored_id=theirs,
            recipients=["x@victim.test", "bob@example.org"], rcpt_count=2, **other),
        log(4, 14, subject="Mallory in disguise", stored_kind="archive", stored_id=planted,
            client_ip="198.51.100.7", **other),
        log(5, 20, verdict="refused", stage="rcpt", subject=None, refused_count=1,
            identity="alice@example.com", client_ip="2001:db8:1:2::9",
            recipients=["nobody@example.org"], rcpt_count=1, **own),
        log(6, -26 * 60, subject="Yesterday's news", **own),  # outside the 24 hours
        # Alice's user when it was in other.example (a super admin moved it): that domain's.
        log(7, 30, **dict(own, domain_id=ids["other.example"], subject="Before the move",
                          client_ip="203.0.113.9")),
    )
    data.add_admin(OPS, OPS_PW, domain="example.com")
    data.add_admin(OTHER, OTHER_PW, domain="other.example")
    data.add_admin(ROOT, ROOT_PW)
    return {"alice": alice, "mallory": mallory, "news": news, "spam": spam, "held": held,
            "archived": archived, "theirs": theirs, "planted": planted,
            "filed_away": filed_away,
            "mallory_identity": data.add_identity(mallory, "mallory@other.example")}


def test_the_zip_holds_the_users_own_log_and_messages_never_another_domains(app, customers):
    own = panel(app, OPS, OPS_PW)
    summary, messages = opened(own.get(f"/outgoing/users/{customers['alice']}/incident-pack"))

    assert summary["target"] == {"kind": "user", "id": customers["alice"],
                                 "user": "alice@example.com", "user_id": customers["alice"],
                                 "identity": None, "domain": "example.com"}
    assert summary["lock"]["locked"] is False
    assert summary["counts"]["transactions"] == 3
    assert summary["counts"]["spam"] == 1 and summary["counts"]["refused"] == 1
    assert summary["counts"]["recipients"] == 4
    assert summary["counts"]["refused_recipients"] == 1
    assert summary["first_message_at"] == T0.isoformat() + "Z"
    assert summary["last_message_at"] == (T0 + timedelta(minutes=20)).isoformat() + "Z"
    assert summary["top_recipient_domains"] == [{"domain": "example.org", "recipients": 3},
                                                {"domain": "victim.test", "recipients": 1}]
    assert {s["subject"] for s in summary["sample_subjects"]} == {"Monthly report",
                                                                 "Newsletter blast"}
    assert summary["client_ips"] == [{"ip": "192.0.2.10", "transactions": 2},
                                     {"ip": "2001:db8:1:2::9", "transactions": 1}]
    assert [n["network"] for n in summary["auth_networks"]] == ["192.0.2.0/24",
                                                                "2001:db8:1::/48"]
    assert summary["auth_networks"][0]["logins"] == ["alice@example.com"]
    assert [(m["store"], m["id"]) for m in summary["messages"]] == [
        ("quarantine", customers["spam"]), ("held", customers["held"]),
        ("archive", customers["archived"])]
    assert sorted(str(m["Subject"]) for m in messages.values()) == [
        "Held for review", "Monthly report", "Newsletter blast"]
    everything = json.dumps(summary) + "".join(m.as_string() for m in messages.values())
    for foreign in ("Mallory", "mallory", "198.51.100.7", "Filed elsewhere",
                    "Yesterday's news", "Before the move", "203.0.113.9"):
        assert foreign not in everything
    query = parse_qs(urlsplit(summary["log_search_url"]).query)
    assert query["user"] == ["alice@example.com"]

    # The same user as the super admin sees it: the same pack.
    root = panel(app, ROOT, ROOT_PW)
    assert opened(root.get(f"/outgoing/users/{customers['alice']}/incident-pack"))[0][
        "counts"] == summary["counts"]


def test_an_identitys_pack_is_that_identitys_only(app, customers):
    own = panel(app, OPS, OPS_PW)
    summary, messages = opened(
        own.get(f"/outgoing/identities/{customers['news']}/incident-pack"))
    assert summary["target"]["identity"] == "news@example.com"
    assert summary["counts"]["transactions"] == 1 and summary["counts"]["spam"] == 1
    assert [(m["store"], m["id"]) for m in summary["messages"]] == [
        ("quarantine", customers["spam"])]
    assert [str(m["Subject"]) for m in messages.values()] == ["Newsletter blast"]
    assert parse_qs(urlsplit(summary["log_search_url"]).query)["identity"] == [
        "news@example.com"]


def test_a_cyrillic_identitys_pack_downloads_under_its_name(app, customers):
    """WSGI headers are Latin-1: gunicorn refused the raw name and the download failed."""
    ivan = data.add_identity(customers["alice"], "иван@example.com")
    own = panel(app, OPS, OPS_PW)
    response = own.get(f"/outgoing/identities/{ivan}/incident-pack")
    assert opened(response)[0]["target"]["identity"] == "иван@example.com"
    disposition = response.headers["Content-Disposition"]
    assert re.fullmatch(r'attachment; filename="incident-_____example\.com-\d{8}-\d{4}\.zip"; '
                        r"filename\*=UTF-8''incident-%D0%B8%D0%B2%D0%B0%D0%BD_example\.com-"
                        r"\d{8}-\d{4}\.zip", disposition), disposition


def test_another_domains_admin_gets_404_for_every_pack(app, customers):
    stranger = panel(app, OTHER, OTHER_PW)
    for path in (f"/outgoing/users/{customers['alice']}/incident-pack",
                 f"/outgoing/identities/{customers['news']}/incident-pack",
                 "/outgoing/users/999999999/incident-pack"):
        assert stranger.get(path).status_code == 404, path
    own = panel(app, OPS, OPS_PW)
    for path in (f"/outgoing/users/{customers['mallory']}/incident-pack",
                 f"/outgoing/identities/{customers['mallory_identity']}/incident-pack"):
        assert own.get(path).status_code == 404, path
    # Their own pack works, and holds their own mail only.
    summary, messages = opened(
        stranger.get(f"/outgoing/users/{customers['mallory']}/incident-pack"))
    assert {m["id"] for m in summary["messages"]} == {customers["theirs"]}
    assert "alice" not in json.dumps(summary)


def test_the_panel_offers_the_pack_where_the_lock_is_shown(app, customers):
    worker.lock("user", customers["alice"])
    lock_id = worker.lock("identity", customers["news"])
    own = panel(app, OPS, OPS_PW)
    user_pack = f"/outgoing/users/{customers['alice']}/incident-pack"
    identity_pack = f"/outgoing/identities/{customers['news']}/incident-pack"
    settings = own.get(f"/outgoing/users/{customers['alice']}").get_data(as_text=True)
    assert f'href="{user_pack}"' in settings and "Download incident pack" in settings
    assert f'href="{user_pack}"' in own.get("/outgoing/users").get_data(as_text=True)
    identities = own.get(f"/outgoing/identities?user={customers['alice']}")
    assert f'href="{identity_pack}"' in identities.get_data(as_text=True)
    page = own.get(f"/outgoing/identities/{customers['news']}").get_data(as_text=True)
    assert f'href="{identity_pack}"' in page  # the identity's own page
    token = make_unlock_token(app.config["SECRET_KEY"], kind="identity",
                              target_id=customers["news"], lock_id=lock_id)
    assert f'href="{identity_pack}"' in own.get(f"/unlock/{token}").get_data(as_text=True)
    summary, _ = opened(own.get(user_pack))
    assert summary["lock"]["locked"] is True
    assert summary["lock"]["trigger"] == ("Automatic lock by the SMTP proxy: "
                                          "5 spam messages in 10 minutes")


def test_the_zip_keeps_to_its_message_count_and_byte_limits(app, customers):
    alice, domain_id = customers["alice"], data.query(
        lambda s: s.get(OutgoingUser, customers["alice"]).domain_id)
    for n in range(incident.MAX_MESSAGES + 2):
        worker.add_spam("example.com", alice, subject=f"Spam {n}",
                        received_at=T0 + timedelta(minutes=30 + n))
    own = panel(app, OPS, OPS_PW)
    summary, messages = opened(own.get(f"/outgoing/users/{alice}/incident-pack"))
    assert len(messages) == incident.MAX_MESSAGES
    assert summary["messages"][0]["subject"] == f"Spam {incident.MAX_MESSAGES + 1}"
    assert {m["why"] for m in summary["omitted_messages"]} == {"more than the message limit"}
    assert summary["limits"]["max_messages"] == incident.MAX_MESSAGES

    # Big messages: as many as fit in MAX_BYTES, newest first; the rest are listed.
    megabyte = 1024 * 1024
    for n in range(12):
        add_stored(HeldMessage, domain_id, alice, f"Big {n}", minutes=100 + n, size=megabyte,
                   identity="alice@example.com")
    data.query(lambda s: s.execute(QuarantinedMessage.__table__.delete().where(
        QuarantinedMessage.user_id == alice)))
    response = own.get(f"/outgoing/users/{alice}/incident-pack")
    summary, messages = opened(response)
    assert sum(m["size"] for m in summary["messages"]) <= incident.MAX_BYTES
    assert sum(len(m.as_bytes()) for m in messages.values()) <= incident.MAX_BYTES
    big = [m for m in summary["messages"] if m["subject"].startswith("Big")]
    assert [m["subject"] for m in big] == [f"Big {n}" for n in range(11, 11 - len(big), -1)]
    too_big = [m for m in summary["omitted_messages"] if m["why"] == "over the size limit"]
    assert [m["subject"] for m in too_big] == [f"Big {n}" for n in range(11 - len(big), -1,
                                                                          -1)]
    assert sum(m["size"] for m in big) + too_big[0]["size"] > incident.MAX_BYTES
    assert "Held for review" in [m["subject"] for m in summary["messages"]]  # small: fits
    assert len(response.data) < incident.MAX_BYTES + 100_000
    assert summary["limits"]["max_bytes"] == incident.MAX_BYTES
