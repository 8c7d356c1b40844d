"""The event envelope's validation: each malformed field is named."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from ingest.envelope import Author, Envelope, EnvelopeError


def good() -> dict:
    return Envelope(
        external_id="42",
        created_at=datetime(2015, 2, 24, 11, 35, 52, tzinfo=timezone(timedelta(hours=-8))),
        text="hello",
        author=Author(id="7", handle="jo", followers=3),
        metrics={"reposts": 2},
    ).to_json()


def test_it_round_trips_and_normalises_event_time_to_utc() -> None:
    envelope = Envelope.from_json(good())

    assert envelope.created_at == datetime(2015, 2, 24, 19, 35, 52, tzinfo=UTC)
    assert envelope.author.followers == 3 and envelope.metrics == {"reposts": 2}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"external_id": ""}, "external_id: required"),
        ({"external_id": "x" * 200}, "external_id: longer than"),
        ({"created_at": None}, "created_at: required"),
        ({"created_at": "2015-02-24 11:35"}, "created_at: must carry a UTC offset"),
        ({"text": 5}, "text: must be a string"),
        ({"metrics": {"likes": -1}}, "metrics.likes"),
        ({"metrics": {"likes": True}}, "metrics.likes"),
        ({"author": {"followers": "many"}}, "author.followers"),
        ({"raw": []}, "raw: must be an object"),
    ],
)
def test_a_malformed_field_is_refused_by_name(change: dict, message: str) -> None:
    with pytest.raises(EnvelopeError, match=message):
        Envelope.from_json({**good(), **change})


def test_integer_ids_are_accepted_as_strings() -> None:
    assert Envelope.from_json({**good(), "external_id": 123}).external_id == "123"


def test_an_unknown_author_counts_as_its_own_author() -> None:
    assert Author().key("99") == "?99"
    assert Author(handle="Jo").key("99") == "@jo"


def test_to_json_holds_every_field_of_the_envelope() -> None:
    import dataclasses

    from tests.factories import envelope as make

    env = dataclasses.replace(
        make("hi", author="ann"), metrics={"likes": 2}, raw={"a": [1, {"b": 2}]}, lang="en"
    )

    data = env.to_json()

    assert set(data) == {f.name for f in dataclasses.fields(env)}
    assert set(data["author"]) == {f.name for f in dataclasses.fields(env.author)}
    assert Envelope.from_json(data) == env
