"""The incident pack's summaries (pure): recipient domains, subjects, client addresses and
AUTH networks from message-log rows, the counts, and the trigger line."""

from datetime import datetime

from scoring.incident import LogRow, Ranked, counts, recipient_domain, summarise, trigger

AT = datetime(2026, 11, 20, 12, 0)


def row(**fields) -> LogRow:
    return LogRow(at=AT, verdict=fields.pop("verdict", "relayed"), **fields)


def test_recipient_domains_are_counted_per_recipient_and_ranked_top_ten():
    rows = [row(recipients=tuple(f"u{n}@d{n}.example" for n in range(12))),
            row(recipients=("a@Victim.TEST", "b@victim.test.", "<c@victim.test>")),
            row(recipients=("no-domain", "@bare", "x@other.test"))]
    domains = summarise(rows).recipient_domains
    assert len(domains) == 10
    assert domains[0] == Ranked("victim.test", 3)
    assert "other.test" not in [d.value for d in domains]  # the 11th of 14 domains
    assert recipient_domain("no-domain") is None and recipient_domain("@bare") is None


def test_subjects_most_frequent_first_then_newest_five_at_most():
    rows = [row(subject=s) for s in ("Newest", "Pills", "Pills", "Invoice", "Pills", "", None,
                                     "A", "B", "C")]
    assert [(s.value, s.count) for s in summarise(rows).subjects] == [
        ("Pills", 3), ("Newest", 1), ("Invoice", 1), ("A", 1), ("B", 1)]


def test_auth_networks_are_slash_24_and_slash_48_of_authenticated_rows_only():
    rows = [row(client_ip="192.0.2.10", login="alice@example.com"),
            row(client_ip="192.0.2.200", login="bob@example.com"),
            row(client_ip="2001:db8:1:2::9", login="alice@example.com"),
            row(client_ip="2001:db8:1:ffff::1", login="alice@example.com"),
            row(client_ip="::ffff:198.51.100.7", login="alice@example.com"),
            row(client_ip="203.0.113.5")]  # an IP/Range user: no AUTH
    summary = summarise(rows)
    assert [(n.value, n.count, n.extra) for n in summary.auth_networks] == [
        ("192.0.2.0/24", 2, ("alice@example.com", "bob@example.com")),
        ("2001:db8:1::/48", 2, ("alice@example.com",)),
        ("198.51.100.0/24", 1, ("alice@example.com",))]
    assert summary.client_ips_total == 6 and summary.auth_networks_total == 3


def test_counts_sum_transactions_recipients_and_refusals_by_verdict():
    result = counts({"relayed": (2, 3, 0), "partial": (1, 4, 1), "quarantined": (5, 10, 0),
                     "refused": (1, 0, 0), "rejected": (1, 1, 0), "held": (1, 1, 0)})
    assert (result.transactions, result.accepted, result.spam, result.refused) == (11, 3, 5, 2)
    assert (result.recipients, result.refused_recipients) == (19, 1)
    assert list(result.by_verdict)[0] == "quarantined"


def test_trigger_names_the_proxy_or_the_administrator():
    assert trigger("5 spam messages in 10 minutes", "automatic", "proxy") == \
        "Automatic lock by the SMTP proxy: 5 spam messages in 10 minutes"
    assert trigger("customer complaint", "manual", "ops@example.com") == \
        "Locked by ops@example.com: customer complaint"
    assert trigger(None, "manual", None) == "Locked by an administrator: no reason recorded"
