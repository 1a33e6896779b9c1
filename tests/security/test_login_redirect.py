"""After logging in, ``next`` may only lead to a page of the panel, never to another host:
the known open-redirect bypasses, through the real app and its login form."""

from __future__ import annotations

from urllib.parse import quote, urljoin

import pytest

from tests.support import data
from tests.support.web import csrf_token

PANEL = "https://panel.example/login"  # where the browser is when it follows the redirect
DEFAULT = "/outgoing/users"


def browser_view(location: str) -> str:
    """The absolute URL a browser goes to for this Location (WHATWG URL parsing): leading
    and trailing C0 controls and spaces stripped, tab/CR/LF removed, ``\\`` read as ``/``
    in the path."""
    cleaned = location.strip("".join(map(chr, range(0x21))))
    cleaned = "".join(ch for ch in cleaned if ch not in "\t\r\n")
    path, mark, rest = cleaned.partition("?")
    return urljoin(PANEL, path.replace("\\", "/") + mark + rest)


def login_with_next(web, raw_next: str):
    """POST /login?next=<raw_next>, ``raw_next`` as it stands in the query string."""
    data.add_admin("root@example.net", "Root-pass-123")
    return web.post(f"/login?next={raw_next}",
                    data={"email": "root@example.net", "password": "Root-pass-123",
                          "csrf_token": csrf_token(web)})


@pytest.fixture
def web(app):
    return app.test_client()


# Each value is the ``next`` parameter after the server decoded the query string.
BYPASSES = [
    "//evil.test",
    "/\\evil.test",
    "\\/evil.test",
    "\\\\evil.test",
    "/\t/evil.test",  # the reported one: ?next=/%09/evil.test
    "/\r\n/evil.test",
    "/\n/evil.test",
    "\t//evil.test",
    " //evil.test",
    "//evil.test\t",
    "///evil.test",
    "https://evil.test",
    "https:/evil.test",
    "HTTPS://evil.test/",
    "//evil.test@panel.example",
    "javascript:alert(1)",
    " javascript:alert(1)",
    "java\tscript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "evil.test",
    "/\\/evil.test",
    "/\x0b/evil.test",
]


@pytest.mark.parametrize("target", BYPASSES, ids=repr)
def test_next_that_leaves_the_panel_is_replaced_by_the_users_page(web, target):
    response = login_with_next(web, quote(target, safe=""))
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location == DEFAULT
    assert browser_view(location).startswith("https://panel.example/")


@pytest.mark.parametrize("target", ["/%5Cevil.test", "/%2F/evil.test", "/%09/evil.test"],
                         ids=repr)
def test_percent_escapes_left_in_the_path_stay_on_the_panel(web, target):
    # ``next`` itself holds "%5C" (the query had %255C): a browser does not decode escapes
    # in a path, so "/%5Cevil.test" is a page of the panel, not a host.
    response = login_with_next(web, quote(target, safe=""))
    location = response.headers["Location"]
    assert location == target
    assert browser_view(location) == "https://panel.example" + target


def test_a_next_holding_a_nul_is_refused_without_logging_in(web):
    # Like any value holding NUL (webapp._refuse_nul): no redirect at all, not even home.
    response = login_with_next(web, quote("\x00//evil.test", safe=""))
    assert response.status_code == 400 and "Location" not in response.headers
    assert web.get(DEFAULT).headers["Location"].startswith("/login")


def test_reported_query_does_not_redirect_to_another_host(web):
    response = login_with_next(web, "/%09/evil.test")
    assert response.status_code == 302
    assert browser_view(response.headers["Location"]).startswith("https://panel.example/")


@pytest.mark.parametrize("target", ["/outgoing/users?q=a", "/outgoing/users/3",
                                    "/outgoing/blocked-logins", "/outgoing/users?q=a%2Fb#top",
                                    "/outgoing/users?back=//elsewhere"], ids=repr)
def test_next_on_the_panel_is_honoured(web, target):
    response = login_with_next(web, quote(target, safe=""))
    assert response.status_code == 302
    assert response.headers["Location"] == target


def test_no_next_goes_to_the_users_page(web):
    data.add_admin("root@example.net", "Root-pass-123")
    response = web.post("/login", data={"email": "root@example.net",
                                        "password": "Root-pass-123",
                                        "csrf_token": csrf_token(web)})
    assert response.headers["Location"] == DEFAULT
