"""The message log's budget for refusals nobody is known for (proxy/anonymous_records.py)."""

from proxy.anonymous_records import IN_ALL, AnonymousRecords
from proxy.connections import client_key


def test_each_network_has_its_minute_and_the_next_minute_starts_afresh():
    budget = AnonymousRecords(3, client_key)
    assert [budget.allow("192.0.2.1", 60.0) for _ in range(5)] == [
        (True, False)] * 3 + [(False, True), (False, False)]
    assert budget.allow("192.0.2.2", 61.0) == (True, False)
    assert budget.allow("2001:db8::1", 62.0)[0] and budget.allow("2001:db8::2", 62.0)[0]
    assert budget.allow("2001:db8::3", 62.0)[0]
    assert budget.allow("2001:db8::ffff", 62.0) == (False, True)  # one /64, one budget
    assert budget.allow("192.0.2.1", 120.0) == (True, False)


def test_the_process_records_at_most_twenty_networks_worth_and_forgets_nobody_unbounded():
    budget = AnonymousRecords(2, client_key, max_clients=50)
    recorded = sum(budget.allow(f"198.51.100.{n}", 0.0)[0] for n in range(200))
    assert recorded == 2 * IN_ALL
    assert len(budget._counts) <= 51
    assert AnonymousRecords(0, client_key).allow("192.0.2.1", 0.0) == (True, False)
