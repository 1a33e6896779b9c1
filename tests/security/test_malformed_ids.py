"""Ids and dates a request may spell in any way: too large for the id column (PostgreSQL's
INTEGER is 4 bytes, SQLite's 8), digits that are not ASCII ("²" passes ``str.isdigit``),
a day after 9999-12-31. Each is "not found", ignored, or a clear error, never a 500
(the app runs with TESTING, so a fault would surface here as the exception itself)."""

from __future__ import annotations

import re

import pytest

from tests.integration.test_panel_settings import settings

ID_IN_PATH = re.compile(r"<(?:int|big_id):\w+>")
BAD_IDS = ["99999999999999999999999", str(2**31), str(2**63), "²", "٣"]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_every_route_with_an_id_in_its_path_answers_404_for_an_id_no_row_can_have(app, root,
                                                                                  bad):
    answers = {}
    for rule in app.url_map.iter_rules():
        if not ID_IN_PATH.search(rule.rule):
            continue
        url = ID_IN_PATH.sub(bad, rule.rule)
        for method in sorted(rule.methods & {"GET", "POST"}):
            response = root.get(url) if method == "GET" else root.post(url)
            answers[f"{method} {url}"] = response.status_code
    assert len(answers) > 30  # the rules were found
    assert {k: v for k, v in answers.items() if v != 404} == {}


@pytest.mark.parametrize("url, status", [
    ("/outgoing/identities?user={bad}", 404),
    ("/outgoing/settings?domain={bad}", 404),
    ("/outgoing/dkim?domain={bad}", 404),
    ("/outgoing/quarantine?before={bad}", 200),  # ignored: the first page
    ("/outgoing/archive?offset={bad}", 200),
    ("/outgoing/users?after={bad}:x", 200),
    ("/outgoing/users?before={bad}:x", 200),
    ("/outgoing/identities?after={bad}:x", 200),
    ("/domains?before={bad}:x", 200),
    ("/audit?after={bad}:x", 200),
    ("/outgoing/log?after=2030-01-01T00:00:00_{bad}", 200),
    ("/outgoing/users/{bob}/header-row?index={bad}", 400),
])
@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_an_id_in_the_query_that_no_row_can_have_is_not_found_or_ignored(root, bob, url,
                                                                         status, bad):
    assert root.get(url.format(bad=bad, bob=bob)).status_code == status


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_bulk_ids_no_row_can_have_select_nothing(root, bad):
    response = root.post("/outgoing/quarantine/bulk", {"action": "remove", "ids": [bad]})
    assert response.status_code == 302
    assert "Select at least one message." in root.get(
        response.headers["Location"]).get_data(as_text=True)


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_a_lock_template_id_no_row_can_have_is_not_found(root, bob, bad):
    response = root.post(f"/outgoing/users/{bob}", settings(lock_template_id=bad))
    assert response.status_code == 404


@pytest.mark.parametrize("url, message", [
    ("/outgoing/archive?to=9999-12-31", "9999-12-31 is past the last date"),
    ("/outgoing/log?to=9999-12-31", "9999-12-31 is past the last time"),
])
def test_the_last_day_there_is_as_the_end_of_a_search_is_a_clear_error(root, url, message):
    response = root.get(url)
    assert response.status_code == 200
    assert message in response.get_data(as_text=True)
