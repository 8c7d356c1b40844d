"""The alert lifecycle (issue 20, "The alert lifecycle"): states and transitions by the
team's members, their activity and live push, filters, the summary, per-rule figures,
and the re-open of a resting alert whose story keeps growing, through the real pipeline."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from django.test import TestCase
from django.utils import timezone

from alerts import evaluation, lifecycle, push
from alerts.models import Alert, AlertActivity
from ingest.models import Source
from teams.models import Membership
from tests.factories import (
    Personas,
    as_user,
    burst,
    envelope,
    make_alerts,
    make_personas,
    make_rule,
    make_source,
    make_team,
    make_user,
    quiet_history,
    run_through,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("clean_redis")]

STATES = list(Alert.State.values)
URL_OF = {
    "acknowledge": "acknowledge",
    "resolve": "resolve",
    "reopen": "reopen",
    "mark_noise": "mark-noise",
}
BODY_OF: dict[str, dict[str, Any]] = {
    "acknowledge": {},
    "resolve": {},
    "reopen": {},
    "mark_noise": {"reason": "a bot"},
    "comment": {"text": "looking"},
    "snooze": {},  # filled per test: a time to come
}
ALLOWED = [(a, s) for a, (froms, _) in lifecycle.TRANSITIONS.items() for s in STATES if s in froms]
REFUSED = [
    (a, s) for a, (froms, _) in lifecycle.TRANSITIONS.items() for s in STATES if s not in froms
]


def an_alert(personas: Personas, state: str = "open") -> Alert:
    [alert_id] = make_alerts(personas.team, 1)
    Alert.objects.filter(id=alert_id).update(state=state)
    return Alert.objects.get(id=alert_id)


def post(user: Any, alert: Alert, action: str, body: dict[str, Any] | None = None) -> Any:
    return as_user(user).post(f"/api/alerts/{alert.id}/{action}/", body or {}, format="json")


@pytest.mark.parametrize(("action", "state"), ALLOWED)
def test_every_allowed_transition_moves_the_state_and_is_recorded(action: str, state: str) -> None:
    personas = make_personas()
    alert = an_alert(personas, state)

    response = post(personas.member, alert, URL_OF[action], BODY_OF[action])

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["state"] == lifecycle.TRANSITIONS[action][1]
    assert [(e["action"], e["user"]["id"]) for e in body["activity"]] == [
        (action, personas.member.pk)
    ]


@pytest.mark.parametrize(("action", "state"), REFUSED)
def test_every_refused_transition_is_a_400_on_state(action: str, state: str) -> None:
    personas = make_personas()
    alert = an_alert(personas, state)

    response = post(personas.owner, alert, URL_OF[action], BODY_OF[action])

    assert response.status_code == 400
    assert list(response.json()) == ["state"]
    assert Alert.objects.get(id=alert.id).state == state
    assert not AlertActivity.objects.filter(alert=alert).exists()


@pytest.mark.parametrize("state", ["resolved", "noise"])
def test_a_resting_or_noise_alert_cannot_be_snoozed(state: str) -> None:
    personas = make_personas()
    alert = an_alert(personas, state)
    until = (timezone.now() + timedelta(hours=1)).isoformat()

    response = post(personas.owner, alert, "snooze", {"until": until})

    assert response.status_code == 400
    assert list(response.json()) == ["state"]


@pytest.mark.parametrize(
    "action", ["acknowledge", "resolve", "reopen", "mark-noise", "assign", "snooze", "comment"]
)
def test_an_outsider_gets_404_and_changes_nothing(action: str) -> None:
    personas = make_personas()
    alert = an_alert(personas, "acknowledged")

    response = post(personas.outsider, alert, action, {"text": "x", "user": None})

    assert response.status_code == 404
    assert Alert.objects.get(id=alert.id).state == "acknowledged"
    assert not AlertActivity.objects.filter(alert=alert).exists()


@pytest.mark.parametrize("persona", ["owner", "member"])
def test_owner_and_member_work_an_alert_through_its_life(persona: str) -> None:
    personas = make_personas()
    user = getattr(personas, persona)
    alert = an_alert(personas)
    until = timezone.now() + timedelta(hours=2)

    steps = [
        ("assign", {"user": personas.member.pk}),
        ("acknowledge", {}),
        ("comment", {"text": "checking the source"}),
        ("snooze", {"until": until.isoformat()}),
        ("resolve", {}),
        ("reopen", {}),
        ("mark-noise", {"reason": "a bot network"}),
        ("assign", {"user": None}),
    ]
    for action, body in steps:
        response = post(user, alert, action, body)
        assert response.status_code == 200, (action, response.content)

    final = response.json()
    assert (final["state"], final["noise_reason"], final["assignee"]) == (
        "noise",
        "a bot network",
        None,
    )
    assert [(e["action"], e["detail"]) for e in final["activity"]] == [
        ("assign", str(personas.member.pk)),
        ("acknowledge", ""),
        ("comment", "checking the source"),
        ("snooze", until.isoformat()),
        ("resolve", ""),
        ("reopen", ""),
        ("mark_noise", "a bot network"),
        ("assign", ""),
    ]
    assert {e["user"]["username"] for e in final["activity"]} == {user.get_username()}
    assert Alert.objects.get(id=alert.id).acknowledged_at is not None


def test_assigning_anyone_but_a_member_of_the_team_is_a_400_on_user() -> None:
    personas = make_personas()
    alert = an_alert(personas)

    outsider = post(personas.owner, alert, "assign", {"user": personas.outsider.pk})
    nobody = post(personas.owner, alert, "assign", {"user": 999_999})
    missing = post(personas.owner, alert, "assign", {})

    assert [r.status_code for r in (outsider, nobody, missing)] == [400, 400, 400]
    assert [list(r.json()) for r in (outsider, nobody, missing)] == [["user"]] * 3
    assert Alert.objects.get(id=alert.id).assignee_id is None


def test_a_snooze_must_end_in_the_future() -> None:
    personas = make_personas()
    alert = an_alert(personas)
    past = (timezone.now() - timedelta(minutes=1)).isoformat()

    response = post(personas.member, alert, "snooze", {"until": past})
    bad = post(personas.member, alert, "snooze", {"until": "tomorrow"})

    assert (response.status_code, list(response.json())) == (400, ["until"])
    assert (bad.status_code, list(bad.json())) == (400, ["until"])
    assert Alert.objects.get(id=alert.id).snoozed_until is None


def test_a_blank_comment_is_a_400_on_text() -> None:
    personas = make_personas()
    alert = an_alert(personas)

    response = post(personas.member, alert, "comment", {"text": ""})

    assert (response.status_code, list(response.json())) == (400, ["text"])


def test_each_change_is_pushed_live_as_alert_updated_with_the_alerts_seq() -> None:
    personas = make_personas()
    alert = an_alert(personas)
    push.push_alerts(alert_ids=[alert.id])

    async def listen() -> list[dict[str, Any]]:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(push.alerts_group(personas.team.id), channel)

        def acknowledge() -> int:
            with TestCase.captureOnCommitCallbacks(execute=True):
                return int(post(personas.member, alert, "acknowledge").status_code)

        assert await sync_to_async(acknowledge)() == 200
        batch = await asyncio.wait_for(layer.receive(channel), timeout=10)
        return list(batch["messages"])

    messages = async_to_sync(listen)()

    assert [(m["type"], m["seq"]) for m in messages] == [("alert.updated", alert.seq)]
    pushed = messages[0]["alert"]
    assert pushed["state"] == "acknowledged"
    assert [e["action"] for e in pushed["activity"]] == ["acknowledge"]


@pytest.mark.django_db(transaction=True)
def test_two_changes_at_once_lose_no_entry_and_make_no_impossible_state() -> None:
    for _ in range(10):
        personas_alert = _race_once()
        alert = Alert.objects.get(id=personas_alert)
        actions = list(AlertActivity.objects.filter(alert=alert).values_list("action", flat=True))
        # Two acknowledgements: one wins, the other is refused; two comments both stay.
        assert sorted(actions) == ["acknowledge", "comment", "comment"]
        assert alert.state == "acknowledged"


_race_ids = iter(range(1_000_000))


def _race_once() -> int:
    n = next(_race_ids)
    team = make_team(f"race{n}")
    user = make_user(f"racer{n}")
    Membership.objects.create(user=user, team=team)  # type: ignore[misc]
    [alert_id] = make_alerts(team, 1)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def work(action: str) -> None:
        try:
            barrier.wait()
            change = lifecycle.Change(action=action, text="x")
            lifecycle.apply(alert_id=alert_id, user=user, change=change)
            outcomes.append(action)
        except lifecycle.TransitionRefused:
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [
        threading.Thread(target=work, args=(a,))
        for a in ("acknowledge", "acknowledge", "comment", "comment")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["acknowledge", "comment", "comment", "refused"]
    return alert_id


def test_the_list_filters_by_state_assignee_and_q_and_summarises_by_state() -> None:
    personas = make_personas()
    opened, acked, resolved, noisy = (an_alert(personas) for _ in range(4))
    Alert.objects.filter(id=opened.id).update(title="Trending: #blizzard in archive")
    Alert.objects.filter(id=acked.id).update(
        state="acknowledged", assignee=personas.member, evidence={"story": {"terms": ["#snow"]}}
    )
    Alert.objects.filter(id=resolved.id).update(state="resolved", severity="critical")
    Alert.objects.filter(id=noisy.id).update(
        state="noise", snoozed_until=timezone.now() + timedelta(hours=1)
    )
    an_alert_elsewhere = make_alerts(personas.other_team, 1)
    client = as_user(personas.member)

    def ids(query: str) -> list[int]:
        response = client.get(f"/api/alerts/?{query}")
        assert response.status_code == 200, response.content
        return [a["id"] for a in response.json()["results"]]

    assert ids("state=acknowledged") == [acked.id]
    assert ids("assignee=me") == [acked.id]
    assert ids(f"assignee={personas.member.pk}") == [acked.id]
    assert ids(f"assignee={personas.owner.pk}") == []
    assert ids("q=BLIZZ") == [opened.id]
    assert ids("q=snow") == [acked.id]
    assert ids("state=resolved&severity=critical") == [resolved.id]
    assert ids("state=noise&page_size=1") == [noisy.id]
    assert ids("source=1&watch=1") == []
    for bad in ("state=closed", "assignee=you", "assignee=-1", "watch=x"):
        assert client.get(f"/api/alerts/?{bad}").status_code == 400, bad

    summary = client.get("/api/alerts/summary/")
    assert summary.status_code == 200
    assert summary.json() == {
        "total": 4,
        "state": {"open": 1, "acknowledged": 1, "resolved": 1, "noise": 1},
        "severity": {"info": 3, "warning": 0, "critical": 1},
        "snoozed": 1,
    }
    other = as_user(personas.outsider).get("/api/alerts/summary/").json()
    assert other["total"] == len(an_alert_elsewhere) == 1
    assert client.get("/api/alerts/summary/?state=open").json()["total"] == 1


def test_the_source_filter_finds_a_trend_alert_by_its_source() -> None:
    personas = make_personas()
    [alert_id] = fire_storm(personas)
    source_id = Alert.objects.get(id=alert_id).evidence["source"]["id"]
    client = as_user(personas.member)

    found = client.get(f"/api/alerts/?source={source_id}").json()["results"]
    none = client.get(f"/api/alerts/?source={source_id + 1}").json()["results"]

    assert ([a["id"] for a in found], none) == ([alert_id], [])


def test_a_rules_figures_are_computed_from_its_alerts() -> None:
    personas = make_personas()
    ids = make_alerts(personas.team, 5)
    rule_id = Alert.objects.get(id=ids[0]).rule_id
    now = timezone.now()
    Alert.objects.filter(id__in=ids).update(created_at=now)
    # Acknowledged after 10, 20 and 60 s; two of those resolved; one other marked noise.
    for alert_id, seconds in zip(ids[:3], (10, 20, 60), strict=True):
        Alert.objects.filter(id=alert_id).update(
            acknowledged_at=now + timedelta(seconds=seconds), state="acknowledged"
        )
    Alert.objects.filter(id__in=ids[:2]).update(state="resolved")
    Alert.objects.filter(id=ids[3]).update(state="noise")

    member = as_user(personas.member).get(f"/api/rules/{rule_id}/stats/")
    outsider = as_user(personas.outsider).get(f"/api/rules/{rule_id}/stats/")

    assert member.status_code == 200
    assert member.json() == {
        "rule": rule_id,
        "fired": 5,
        "acknowledged": 3,
        "resolved": 2,
        "noise": 1,
        "noise_share": 0.2,
        "median_ack_s": 20.0,
    }
    assert outsider.status_code == 404


def test_a_rule_with_no_alerts_has_empty_figures() -> None:
    personas = make_personas()
    rule = make_rule(personas.team)

    body = as_user(personas.owner).get(f"/api/rules/{rule.id}/stats/").json()

    assert (body["fired"], body["noise_share"], body["median_ack_s"]) == (0, 0.0, None)


def fire_storm(personas: Personas) -> list[int]:
    """A rule and a "#storm" story alert of the team, fired through the pipeline and
    pushed."""
    source = make_source(personas.team)
    make_rule(personas.team)
    created = evaluation.evaluate_trends(
        trend_ids=run_through(
            source, quiet_history(6) + burst("#storm", count=12, minutes=91), close=False
        )
    )
    push.push_alerts(alert_ids=created)
    return created


def grow_storm(personas: Personas, count: int) -> list[int]:
    """More of the "#storm" story in its bucket: posts mixing "#storm" with "#hail" (a
    new member term); returns the alerts the evaluation updated (none created)."""
    source = Source.objects.get(team=personas.team)
    posts = [
        envelope(f"so much #storm and #hail here {i}", minutes=96 + i * 0.01, author=f"h{i}")
        for i in range(count)
    ]
    trend_ids = run_through(source, posts)
    return evaluation.evaluate_trends(trend_ids=trend_ids)


@pytest.mark.parametrize("rest", ["resolve", "snooze"])
def test_a_resting_alert_whose_story_keeps_growing_reopens_through_the_pipeline(
    rest: str,
) -> None:
    personas = make_personas()
    [alert_id] = fire_storm(personas)
    alert = Alert.objects.get(id=alert_id)
    body = {"until": (timezone.now() + timedelta(days=1)).isoformat()} if rest == "snooze" else {}
    assert post(personas.member, alert, rest, body).status_code == 200
    rested = Alert.objects.get(id=alert_id)
    assert rested.rest_story_events is not None

    async def listen() -> list[dict[str, Any]]:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(push.alerts_group(personas.team.id), channel)

        def grow() -> list[int]:
            with TestCase.captureOnCommitCallbacks(execute=True):
                return grow_storm(personas, 40)

        assert await sync_to_async(grow)() == []
        batch = await asyncio.wait_for(layer.receive(channel), timeout=10)
        return list(batch["messages"])

    messages = async_to_sync(listen)()

    alert = Alert.objects.get(id=alert_id)
    assert (alert.state, alert.snoozed_until, alert.severity) == ("open", None, "warning")
    entry = AlertActivity.objects.filter(alert=alert).last()
    assert entry is not None and entry.user is None and entry.action == "escalated"
    assert "story grew" in entry.detail
    assert "#hail" in alert.evidence["story"]["terms"]
    assert [(m["type"], m["alert"]["state"]) for m in messages] == [("alert.updated", "open")]
    assert messages[0]["alert"]["activity"][-1]["action"] == "escalated"


def test_an_open_alert_whose_story_grows_is_only_updated() -> None:
    personas = make_personas()
    [alert_id] = fire_storm(personas)

    with TestCase.captureOnCommitCallbacks(execute=True):
        grow_storm(personas, 40)

    alert = Alert.objects.get(id=alert_id)
    assert (alert.state, alert.severity) == ("open", "info")
    assert not AlertActivity.objects.filter(alert=alert).exists()
