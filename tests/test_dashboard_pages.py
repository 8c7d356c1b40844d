"""The dashboard's pages: login, the live page shell, and the assets it loads.

The page's numbers come from the REST API and the WebSocket in the browser; here we check
what Django serves: who may open the page, and that it points at assets that exist.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.contrib.staticfiles import finders
from django.templatetags.static import static
from django.test import Client
from django.urls import reverse

ASSETS = (
    "dashboard/app.js",
    "dashboard/app.css",
    "dashboard/vendor/chart.umd.min.js",
    "dashboard/vendor/chart.LICENSE.md",
)
PASSWORD = "a-long-test-password-42"


@pytest.fixture
def analyst(db: None) -> User:
    return User.objects.create_user("ana", email="ana@example.com", password=PASSWORD)


def test_an_anonymous_visitor_is_sent_to_the_login_page(client: Client, db: None) -> None:
    response = client.get(reverse("dashboard:home"))

    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next={reverse('dashboard:home')}"


def test_the_login_page_renders_a_form(client: Client, db: None) -> None:
    response = client.get(reverse("login"), {"next": reverse("dashboard:home")})

    assert response.status_code == 200
    assert "registration/login.html" in [t.name for t in response.templates]
    html = response.content.decode()
    assert 'name="username"' in html
    assert 'name="password"' in html
    assert 'name="csrfmiddlewaretoken"' in html
    assert f'name="next" value="{reverse("dashboard:home")}"' in html
    assert static("dashboard/app.css") in html


def test_an_analyst_logs_in_and_lands_on_the_dashboard(analyst: User) -> None:
    browser = Client(enforce_csrf_checks=True)
    browser.get(reverse("login"))
    token = browser.cookies["csrftoken"].value

    response = browser.post(
        reverse("login"),
        {"username": "ana", "password": PASSWORD, "csrfmiddlewaretoken": token},
        follow=True,
    )

    assert response.redirect_chain == [(reverse("dashboard:home"), 302)]
    assert response.status_code == 200
    assert response.context["user"] == analyst
    assert "dashboard/home.html" in [t.name for t in response.templates]


def test_a_wrong_password_is_refused_with_a_message(client: Client, analyst: User) -> None:
    response = client.post(reverse("login"), {"username": "ana", "password": "wrong"})

    assert response.status_code == 200
    assert "_auth_user_id" not in client.session
    assert "Please enter a correct username and password" in response.content.decode()


def test_the_dashboard_renders_for_a_logged_in_analyst(client: Client, analyst: User) -> None:
    client.force_login(analyst)

    response = client.get(reverse("dashboard:home"))

    assert response.status_code == 200
    html = response.content.decode()
    for asset in ("dashboard/app.js", "dashboard/app.css", "dashboard/vendor/chart.umd.min.js"):
        assert static(asset) in html
    assert "ana" in html
    assert reverse("api-docs") in html
    assert f'action="{reverse("logout")}"' in html
    assert 'id="conn"' in html
    # The page's script reads the CSRF cookie for unsafe API calls.
    assert "csrftoken" in response.cookies


def test_the_dashboard_has_a_streams_panel_polling_the_streams_api(
    client: Client, analyst: User
) -> None:
    client.force_login(analyst)

    html = client.get(reverse("dashboard:home")).content.decode()
    script = Path(str(finders.find("dashboard/app.js"))).read_text()

    assert 'id="streams"' in html
    assert f'data-api="{reverse("stream-list")}"' in html
    assert 'id="streams-body"' in html
    assert "Event-time clock" in html
    assert "No stream has started yet." in html
    assert "streams-body" in script
    assert "poll(refreshStreams" in script


def test_the_dashboard_has_a_sources_panel_with_health_and_add_forms(
    client: Client, analyst: User
) -> None:
    client.force_login(analyst)

    html = client.get(reverse("dashboard:home")).content.decode()
    script = Path(str(finders.find("dashboard/app.js"))).read_text()

    assert f'data-api="{reverse("source-list")}"' in html
    assert 'id="sources-body"' in html
    for form in ("add-feed", "add-webhook", "add-x", "add-telegram", "edit-source"):
        assert f'id="{form}"' in html
    assert "poll(refreshSources" in script
    assert "msg.type === 'alert.updated'" in script  # a story's alert grows in place
    assert "wireSourceForm('add-x'" in script and "wireSourceForm('add-telegram'" in script
    assert "method: 'PATCH'" in script and "method: 'POST'" in script


def test_the_vendored_chart_loads_before_the_page_script(client: Client, analyst: User) -> None:
    client.force_login(analyst)

    html = client.get(reverse("dashboard:home")).content.decode()

    assert html.index(static("dashboard/vendor/chart.umd.min.js")) < html.index(
        static("dashboard/app.js")
    )


def test_the_user_name_is_escaped_in_the_header(client: Client, db: None) -> None:
    user = User.objects.create_user("<b>mallory</b>", password=PASSWORD)
    client.force_login(user)

    html = client.get(reverse("dashboard:home")).content.decode()

    assert "<b>mallory</b>" not in html
    assert "&lt;b&gt;mallory&lt;/b&gt;" in html


def test_logging_out_by_post_ends_the_session(client: Client, analyst: User) -> None:
    client.force_login(analyst)

    response = client.post(reverse("logout"))

    assert response.status_code == 302
    assert response["Location"] == reverse("login")
    assert client.get(reverse("dashboard:home")).status_code == 302


@pytest.mark.parametrize("asset", ASSETS)
def test_the_static_asset_is_found(asset: str) -> None:
    found = finders.find(asset)

    assert found is not None
    assert Path(str(found)).stat().st_size > 0


def test_the_vendored_chart_keeps_its_license() -> None:
    bundle = Path(str(finders.find("dashboard/vendor/chart.umd.min.js")))
    license_text = Path(str(finders.find("dashboard/vendor/chart.LICENSE.md"))).read_text()

    banner = bundle.read_text()[:200]
    assert "Chart.js v4." in banner
    assert "Released under the MIT License" in banner
    assert "MIT License" in license_text
