"""Authentication at the proxy over real sockets: IP ranges (IPv4 and IPv6, most specific
wins), STARTTLS certificates, AUTH PLAIN and LOGIN, failed-AUTH throttling, re-authentication
and clients that are nobody."""

from __future__ import annotations

import base64
import datetime
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from outgoing import locks
from outgoing.models import LOCK_MANUAL, OutgoingUser
from outgoing.usage import read_usage_sync
from proxy import counters, metrics, throttle
from tests.support import data
from tests.support.mail import client, message, send
from tests.support.redis_monitor import ScriptsRun

PASSWORD = "Alice-pass-123"


def sessions_of(redis_client, user_id: int, now: float) -> int:
    """Sessions counted for a user today: who the proxy attributed the mail to."""
    previous, current = read_usage_sync(redis_client, user_id, now)["day"]
    return previous + current


def sessions_once_closed(redis_client, user_id: int, now: float) -> int:
    """``sessions_of`` once it is at least 1, or after 10 s: a connection no MAIL of the user
    counted is counted as it closes, after the client has gone."""
    deadline = time.monotonic() + 10
    while sessions_of(redis_client, user_id, now) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    return sessions_of(redis_client, user_id, now)


def plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def login_code(port: int, login: str, password: str, source: str | None = None) -> int:
    """One AUTH PLAIN attempt on a new connection (smtplib's login would try every
    mechanism, two failures per call)."""
    with client(port, source=source) as smtp:
        return smtp.docmd("AUTH", f"PLAIN {plain(login, password)}")[0]


# -- IP and ranges --------------------------------------------------------------------------

def test_client_address_picks_the_most_specific_ip_range(instance, start_proxy, clock,
                                                         redis_client, sink):
    wide = data.add_user("wide.example", "ip", "127.0.0.0/8")
    middle = data.add_user("middle.example", "ip", "127.0.0.4-127.0.0.9")
    single = data.add_user("single.example", "ip", "127.0.0.5")
    proxy = start_proxy()
    for source in ("127.0.0.5", "127.0.0.6", "127.0.0.20"):
        with client(proxy.port, source=source) as smtp:
            assert send(smtp, message())[0] == 250
    assert [sessions_of(redis_client, u, clock()) for u in (single, middle, wide)] == [1, 1, 1]
    assert len(sink.handler.messages) == 3


def test_ipv6_client_is_matched_by_its_own_address_before_a_wider_range(
        instance, start_proxy, clock, redis_client, sink):
    network = data.add_user("net.example", "ip", "::/64")
    loopback = data.add_user("host.example", "ip", "::1")
    everything_v4 = data.add_user("v4.example", "ip", "0.0.0.0/1")
    proxy = start_proxy(SMTP_LISTEN="[::1]:0")
    with client(proxy.port, host="::1") as smtp:
        assert send(smtp, message())[0] == 250
    assert sessions_of(redis_client, loopback, clock()) == 1
    assert sessions_of(redis_client, network, clock()) == 0
    assert sessions_of(redis_client, everything_v4, clock()) == 0


def test_ipv6_range_alone_authenticates_an_ipv6_client(instance, start_proxy, sink):
    data.add_user("net.example", "ip", "::-::ff")
    proxy = start_proxy(SMTP_LISTEN="[::1]:0")
    with client(proxy.port, host="::1") as smtp:
        assert send(smtp, message())[0] == 250
    assert len(sink.handler.messages) == 1


def test_ipv4_ranges_do_not_admit_an_ipv6_client(instance, start_proxy, sink):
    data.add_user("v4.example", "ip", "0.0.0.0/1")
    proxy = start_proxy(SMTP_LISTEN="[::1]:0")
    with client(proxy.port, host="::1") as smtp:
        assert smtp.mail("alice@example.com")[0] == 530
    assert sink.handler.messages == []


def test_a_range_added_while_running_is_used_on_the_next_connection(instance, start_proxy,
                                                                    redis_client, sink):
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.7") as smtp:
        assert smtp.mail("alice@example.com")[0] == 530
    data.add_user("late.example", "ip", "127.0.0.7")
    from outgoing.changes import announce_config_change

    announce_config_change(redis_client)
    deadline = 50
    code = 530
    while code == 530 and deadline:
        import time

        time.sleep(0.1)
        deadline -= 1
        with client(proxy.port, source="127.0.0.7") as smtp:
            code = smtp.mail("alice@example.com")[0]
    assert code == 250


# -- unknown clients ------------------------------------------------------------------------

def test_client_outside_every_range_without_auth_relays_nothing(instance, start_proxy, sink):
    data.add_user("one.example", "ip", "127.0.0.5")
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.6") as smtp:
        assert smtp.mail("alice@example.com")[0] == 530
        assert smtp.rcpt("bob@example.org")[0] == 503
        assert smtp.docmd("DATA")[0] == 503
    assert sink.handler.messages == []


def test_unknown_username_gets_535(instance, start_proxy):
    proxy = start_proxy()
    assert login_code(proxy.port, "nobody@example.com", PASSWORD) == 535


# -- STARTTLS certificates --------------------------------------------------------------------

def _peer_certificate(port: int) -> x509.Certificate:
    with client(port) as smtp:
        der = smtp.sock.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def _write_certificate(cert_path: Path, key_path: Path, name: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


def test_starttls_presents_the_operators_certificate_from_instance(instance, start_proxy):
    mine = _write_certificate(instance / "tls" / "cert.pem", instance / "tls" / "key.pem",
                              "mx.operator.example")
    proxy = start_proxy()
    presented = _peer_certificate(proxy.port)
    assert presented.fingerprint(hashes.SHA256()) == mine.fingerprint(hashes.SHA256())


def test_self_signed_certificate_is_made_on_first_start_and_kept(instance, start_proxy):
    cert_file, key_file = instance / "tls" / "cert.pem", instance / "tls" / "key.pem"
    assert not cert_file.exists()
    proxy = start_proxy(SMTP_HOSTNAME="relay.test.example")
    presented = _peer_certificate(proxy.port)
    assert key_file.stat().st_mode & 0o077 == 0
    stored = x509.load_pem_x509_certificate(cert_file.read_bytes())
    assert presented == stored
    assert stored.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        "relay.test.example"
    again = start_proxy(SMTP_HOSTNAME="relay.test.example", SMTP_LISTEN="127.0.0.1:0")
    assert _peer_certificate(again.port) == stored


# -- AUTH mechanisms --------------------------------------------------------------------------

@pytest.fixture
def alice(instance):
    return data.add_user("example.com", "user", "alice@example.com", PASSWORD)


def test_auth_plain_with_initial_response_and_after_a_challenge(alice, start_proxy, sink):
    proxy = start_proxy()
    blob = base64.b64encode(b"\0alice@example.com\0" + PASSWORD.encode()).decode()
    with client(proxy.port) as smtp:
        assert smtp.docmd("AUTH", f"PLAIN {blob}")[0] == 235
        assert send(smtp, message())[0] == 250
    with client(proxy.port) as smtp:
        assert smtp.docmd("AUTH", "PLAIN")[0] == 334
        assert smtp.docmd(blob)[0] == 235


def test_an_initial_response_of_equals_is_an_empty_response_not_bad_base64(alice, start_proxy):
    """RFC 4954 4: "=" sends an empty initial response; PLAIN cannot be empty, so the reply
    names the data as malformed, as for any other empty PLAIN response."""
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        code, reply = smtp.docmd("AUTH", "PLAIN =")
        assert (code, reply) == (501, b"5.5.2 Malformed AUTH data")
        code, reply = smtp.docmd("AUTH", "PLAIN ==")
        assert (code, reply) == (501, b"5.5.2 Cannot decode base64")


def test_auth_login_with_and_without_initial_response(alice, start_proxy):
    proxy = start_proxy()
    user = base64.b64encode(b"alice@example.com").decode()
    password = base64.b64encode(PASSWORD.encode()).decode()
    with client(proxy.port) as smtp:
        assert smtp.docmd("AUTH", "LOGIN")[0] == 334
        assert smtp.docmd(user)[0] == 334
        assert smtp.docmd(password)[0] == 235
    with client(proxy.port) as smtp:
        assert smtp.docmd("AUTH", f"LOGIN {user}")[0] == 334
        assert smtp.docmd(password)[0] == 235
    with client(proxy.port) as smtp:  # a mechanism's name is the same in lower case
        assert smtp.docmd("auth", f"login {user}")[0] == 334
        assert smtp.docmd(password)[0] == 235
    blob = base64.b64encode(b"\0alice@example.com\0" + PASSWORD.encode()).decode()
    with client(proxy.port) as smtp:
        assert smtp.docmd("AUTH", f"Plain {blob}")[0] == 235


@pytest.mark.parametrize("limits", [False, True], ids=["no limits", "connection limits"])
def test_a_password_this_proxy_verified_before_costs_one_script_at_auth(
        limits, instance, start_proxy, redis_client, clock):
    """Scrypt stands between the throttle's check and the recording of a success (and the
    connection's count, for a user with connection limits): two or three scripts. Once
    this process has verified the password, they are one."""
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          connection_limits_enabled=limits, limit_per_day=100)
    for source in (throttle.AUTH_LUA, throttle.AUTH_AND_COUNT_LUA, counters.LIMITS_LUA):
        redis_client.script_load(source)  # a first call would count a NOSCRIPT retry too
    proxy = start_proxy()
    scripts_at_auth = []
    for _ in range(2):
        with client(proxy.port) as smtp, ScriptsRun(redis_client) as scripts:
            assert smtp.docmd("AUTH", f"PLAIN {plain('alice@example.com', PASSWORD)}")[0] \
                == 235
        scripts_at_auth.append(scripts.count)
    assert scripts_at_auth == ([3, 1] if limits else [2, 1])
    if limits:  # each counted at AUTH (without limits: as it closes, after this)
        assert sessions_of(redis_client, alice, clock()) == 2


def password_checks() -> float:
    return metrics.PASSWORD_CHECKS._value.get()


def test_an_unknown_login_is_refused_after_a_password_check_like_a_wrong_password(
        alice, start_proxy):
    """Both cost one scrypt check (the unknown login's against a stand-in hash), so the time
    of a 535 does not tell which logins exist; undecodable input too."""
    proxy = start_proxy()
    refusals = [("alice@example.com", "wrong-password"), ("nobody@example.com", PASSWORD),
                ("127.0.0.9", "anything-at-all")]
    for login, password in refusals:
        before = password_checks()
        assert login_code(proxy.port, login, password) == 535
        assert password_checks() == before + 1, login
    before = password_checks()
    with client(proxy.port) as smtp:
        blob = base64.b64encode(b"\0nobody@example.com\0\xff\xfe").decode()
        assert smtp.docmd("AUTH", f"PLAIN {blob}")[0] == 535
    assert password_checks() == before + 1


def test_an_ip_client_cannot_authenticate_in_the_middle_of_a_transaction(
        instance, start_proxy, sink):
    """RFC 4954 4: the message begun as the IP user would be attributed to it and traced as
    the login (another customer's, here)."""
    data.add_user("one.example", "ip", "127.0.0.5")
    data.add_user("two.example", "user", "bob@two.example", PASSWORD)
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.5") as smtp:
        assert smtp.mail("carol@one.example")[0] == 250
        code, reply = smtp.docmd("AUTH", f"PLAIN {plain('bob@two.example', PASSWORD)}")
        assert (code, reply[:5]) == (503, b"5.5.1")
        code, reply = smtp.docmd("AUTH", "LOGIN " + base64.b64encode(b"bob@two.example")
                                 .decode())
        assert (code, reply[:5]) == (503, b"5.5.1")
        assert smtp.rcpt("dave@example.org")[0] == 250
        assert smtp.data(message(sender="carol@one.example"))[0] == 250
        # Between transactions, AUTH is allowed.
        assert smtp.docmd("AUTH", f"PLAIN {plain('bob@two.example', PASSWORD)}")[0] == 235
    relayed = sink.handler.wait_for(1)[0].data
    assert b"IP/Range user 127.0.0.5" in relayed and b"authenticated as" not in relayed


def test_auth_plain_for_another_authorization_identity_is_refused(instance, start_proxy,
                                                                  alice):
    """RFC 4616: nobody may act as another login. The refusal looks at no password, so it
    is not a failed guess and blocks nobody."""
    data.add_user("two.example", "user", "bob@two.example", "Bob-pass-1234")
    proxy = start_proxy()
    for _ in range(12):  # more than the ten failures that block an address
        with client(proxy.port, source="127.0.0.2") as smtp:
            blob = base64.b64encode(f"bob@two.example\0alice@example.com\0{PASSWORD}"
                                    .encode()).decode()
            code, reply = smtp.docmd("AUTH", f"PLAIN {blob}")
            assert (code, reply[:5]) == (535, b"5.7.8")
            assert smtp.mail("alice@example.com")[0] == 530  # not authenticated
    with client(proxy.port, source="127.0.0.2") as smtp:  # the same login, any case: fine
        blob = base64.b64encode(f" Alice@Example.COM\0alice@example.com\0{PASSWORD}"
                                .encode()).decode()
        assert smtp.docmd("AUTH", f"PLAIN {blob}")[0] == 235


def test_username_is_matched_whatever_its_case(alice, start_proxy):
    proxy = start_proxy()
    assert login_code(proxy.port, "Alice@Example.COM", PASSWORD) == 235


def test_domain_name_and_domain_password_authenticate_the_domain(instance, start_proxy,
                                                                 clock, redis_client, sink):
    domain = data.add_user("example.org", "domain", "example.org", "Domain-pass-123")
    proxy = start_proxy()
    with client(proxy.port) as smtp:
        smtp.login("example.org", "Domain-pass-123")
        assert send(smtp, message(sender="news@example.org"), sender="news@example.org")[0] \
            == 250
    assert sessions_of(redis_client, domain, clock()) == 1


def test_ip_users_cannot_log_in_with_auth(instance, start_proxy):
    data.add_user("example.com", "ip", "127.0.0.9")
    proxy = start_proxy()
    assert login_code(proxy.port, "127.0.0.9", "anything-at-all") == 535


# -- throttling failed AUTH ---------------------------------------------------------------------

def test_tenth_failure_from_an_address_blocks_it_with_454_until_the_block_ends(
        alice, start_proxy, clock):
    proxy = start_proxy()
    for n in range(10):
        assert login_code(proxy.port, f"guess{n}@example.com", "wrong-password",
                          source="127.0.0.2") == 535
    # Blocked: even the right password is not looked at.
    assert login_code(proxy.port, "alice@example.com", PASSWORD, source="127.0.0.2") == 454
    # Another address is not affected, nor is alice.
    assert login_code(proxy.port, "alice@example.com", PASSWORD, source="127.0.0.3") == 235
    clock.advance(14 * 60)
    assert login_code(proxy.port, "alice@example.com", PASSWORD, source="127.0.0.2") == 454
    clock.advance(61)
    assert login_code(proxy.port, "alice@example.com", PASSWORD, source="127.0.0.2") == 235


def test_failures_spread_over_more_than_ten_minutes_do_not_block(alice, start_proxy, clock):
    proxy = start_proxy()
    for n in range(12):
        assert login_code(proxy.port, f"guess{n}@example.com", "wrong-password",
                          source="127.0.0.2") == 535
        clock.advance(67)  # any ten failures span more than 600 seconds
    assert login_code(proxy.port, "alice@example.com", PASSWORD, source="127.0.0.2") == 235


def test_ten_failures_for_one_username_from_many_addresses_block_that_username(
        alice, start_proxy):
    data.add_user("example.com", "user", "bob@example.com", "Bob-pass-12345")
    proxy = start_proxy()
    for n in range(10):
        assert login_code(proxy.port, "alice@example.com", "wrong-password",
                          source=f"127.0.1.{n + 1}") == 535
    assert login_code(proxy.port, "ALICE@example.com", PASSWORD, source="127.0.2.1") == 454
    assert login_code(proxy.port, "bob@example.com", "Bob-pass-12345",
                      source="127.0.2.1") == 235


def test_block_is_shared_by_every_proxy_instance(alice, start_proxy):
    first, second = start_proxy(), start_proxy(SMTP_LISTEN="127.0.0.1:0")
    for n in range(10):
        port = (first, second)[n % 2].port
        assert login_code(port, "alice@example.com", "wrong", source="127.0.0.2") == 535
    assert login_code(second.port, "alice@example.com", PASSWORD, source="127.0.0.4") == 454


def test_more_auth_attempts_than_allowed_in_one_connection_end_it_with_421(alice,
                                                                          start_proxy):
    proxy = start_proxy(AUTH_FAILURE_LIMIT=0)  # no blocking: only the per-connection limit
    with client(proxy.port) as smtp:
        for _ in range(10):
            assert smtp.docmd("AUTH", f"PLAIN {plain('alice@example.com', 'wrong')}")[0] \
                == 535
        code, _ = smtp.docmd("AUTH", f"PLAIN {plain('alice@example.com', PASSWORD)}")
    assert code == 421


# -- re-authentication --------------------------------------------------------------------------

def test_ip_traffic_is_reattributed_to_the_user_named_by_the_envelope_sender(
        instance, start_proxy, clock, redis_client, sink):
    ip_user = data.add_user("example.com", "ip", "127.0.0.5", reauthenticate_as="user")
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          reauthenticate_permitted=True)
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.5") as smtp:
        assert send(smtp, message(), sender="Alice@example.com")[0] == 250
    assert sessions_of(redis_client, alice, clock()) == 1
    # The connection it opened, counted as it closed (no MAIL of the IP user counted it).
    assert sessions_once_closed(redis_client, ip_user, clock()) == 1


def test_reattributed_traffic_obeys_the_targets_lock(instance, start_proxy, redis_client):
    data.add_user("example.com", "ip", "127.0.0.5", reauthenticate_as="user")
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          reauthenticate_permitted=True)

    def lock(session):
        locks.lock(session, redis_client, session.get(OutgoingUser, alice), kind=LOCK_MANUAL,
                   reason="compromised", actor="test", claim_in_redis=False)

    data.query(lock)
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.5") as smtp:
        code, reply = smtp.mail("alice@example.com")
        assert code == 550 and b"alice@example.com is locked: compromised" in reply
        assert smtp.mail("carol@example.com")[0] == 250  # no such user: the IP user's own
        # Quoting names the same mailbox for the next hop, so it is the same target.
        for quoted in ('"alice"@example.com', '"al\\ice"@Example.com'):
            smtp.rset()
            code, reply = smtp.docmd("MAIL", f"FROM:<{quoted}>")  # as written, not parsed
            assert code == 550 and b"alice@example.com is locked" in reply, quoted


def test_a_shared_smarthost_reattributes_to_the_domain_of_the_envelope_sender_in_any_domain(
        instance, start_proxy, clock, redis_client, sink):
    ip_user = data.add_user("example.com", "ip", "127.0.0.5", reauthenticate_as="domain",
                            shared_smarthost=True)
    domain = data.add_user("example.org", "domain", "example.org", "Domain-pass-123",
                           reauthenticate_permitted=True)
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.5") as smtp:
        assert send(smtp, message(), sender="news@example.org")[0] == 250
        assert send(smtp, message(), sender="someone@example.net")[0] == 250
    assert sessions_of(redis_client, domain, clock()) == 1
    assert sessions_of(redis_client, ip_user, clock()) == 1


def test_target_without_reauthenticate_permitted_leaves_the_ip_users_own_settings(
        instance, start_proxy, clock, redis_client, sink):
    ip_user = data.add_user("example.com", "ip", "127.0.0.5", reauthenticate_as="user")
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          reauthenticate_permitted=False)
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.5") as smtp:
        assert send(smtp, message())[0] == 250
    assert sessions_of(redis_client, ip_user, clock()) == 1
    assert sessions_of(redis_client, alice, clock()) == 0


def test_ip_user_without_reauthenticate_as_keeps_its_traffic(instance, start_proxy, clock,
                                                            redis_client, sink):
    ip_user = data.add_user("example.com", "ip", "127.0.0.5")
    alice = data.add_user("example.com", "user", "alice@example.com", PASSWORD,
                          reauthenticate_permitted=True)
    proxy = start_proxy()
    with client(proxy.port, source="127.0.0.5") as smtp:
        assert send(smtp, message())[0] == 250
    assert sessions_of(redis_client, ip_user, clock()) == 1
    assert sessions_of(redis_client, alice, clock()) == 0
