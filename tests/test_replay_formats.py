"""Archive replay: format detection, field mapping, broken files, the real data sets.

Hand-written samples in the recorded payload shapes live in ``tests/samples/``; broken
files are written per test under ``tmp_path``; the real data sets are read in place
from ``../shared/data`` (the ``shared_data`` fixture).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ingest.envelope import Author, Envelope
from ingest.models import Source
from ingest.sources.base import SourceError
from ingest.sources.registry import adapter_for
from ingest.sources.replay.adapter import ReplayAdapter
from ingest.sources.replay.formats import ArchiveFormatError, detect_format, read_archive
from ingest.sources.replay.rows import MAX_RAW_CHARS, RowError, snowflake_time

SAMPLES = Path(__file__).resolve().parent / "samples"

AIRLINE_HEADER = (
    "tweet_id,airline_sentiment,airline_sentiment_confidence,negativereason,"
    "negativereason_confidence,airline,airline_sentiment_gold,name,negativereason_gold,"
    "retweet_count,text,tweet_coord,tweet_created,tweet_location,user_timezone\n"
)


def split(items: Iterable[Envelope | RowError]) -> tuple[list[Envelope], list[RowError]]:
    """Envelopes and row errors, each in the order read."""
    groups: dict[type, list[Any]] = {Envelope: [], RowError: []}
    for item in items:
        groups[type(item)].append(item)
    return groups[Envelope], groups[RowError]


def read(path: Path, fmt: str | None = None) -> tuple[list[Envelope], list[RowError]]:
    return split(read_archive(path, fmt))


def by_id(envelopes: list[Envelope]) -> dict[str, Envelope]:
    return {envelope.external_id: envelope for envelope in envelopes}


def airline_row(tweet_id: str, *, name: str = "flyer", text: str = "ok", created: str) -> str:
    return f"{tweet_id},neutral,1.0,,,United,,{name},,0,{text},,{created},,Eastern Time\n"


# --- Detection --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sample", "fmt"),
    [
        ("airline.csv", "airline_csv"),
        ("trump.csv", "trump_csv"),
        ("crisislex.csv", "crisislex_csv"),
        ("telegram.json", "telegram_json"),
        ("x_v2.jsonl", "x_v2_jsonl"),
        ("x_v1.jsonl", "x_v1_jsonl"),
    ],
)
def test_it_detects_each_format_from_content_not_the_file_name(
    tmp_path: Path, sample: str, fmt: str
) -> None:
    anonymous = tmp_path / "archive.dat"
    anonymous.write_bytes((SAMPLES / sample).read_bytes())

    assert detect_format(anonymous) == fmt


def test_it_detects_x_lines_past_a_broken_first_line(tmp_path: Path) -> None:
    path = tmp_path / "stream.jsonl"
    path.write_text('{"id_str": "1", "text": trunc\n' + (SAMPLES / "x_v1.jsonl").read_text())

    assert detect_format(path) == "x_v1_jsonl"


def test_it_detects_a_bare_v2_tweet_object(tmp_path: Path) -> None:
    path = tmp_path / "tweets.jsonl"
    path.write_text(
        '{"id": "5", "text": "hi", "author_id": "7", "created_at": "2024-01-01T00:00:00Z"}\n'
    )

    assert detect_format(path) == "x_v2_jsonl"


def test_it_detects_a_csv_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "tweets.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (SAMPLES / "airline.csv").read_bytes())

    assert detect_format(path) == "airline_csv"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"   \n\n",
        b"date,value\n2015-01-01,3\n",
        b'[{"title": "not a telegram message"}]',
        b"[]",
        b'{"foo": 1}\n{"bar": 2}\n',
        b"\x00\xff\xfe binary junk",
    ],
    ids=["empty", "blank", "other-csv", "other-array", "empty-array", "other-jsonl", "binary"],
)
def test_it_refuses_a_file_whose_format_it_cannot_tell(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "mystery"
    path.write_bytes(content)

    with pytest.raises(ArchiveFormatError, match="mystery"):
        detect_format(path)


def test_it_refuses_an_unknown_format_name() -> None:
    with pytest.raises(ArchiveFormatError, match="unknown archive format 'parquet'"):
        read_archive(SAMPLES / "airline.csv", "parquet")


def test_it_reports_a_missing_file_when_called() -> None:
    with pytest.raises(FileNotFoundError):
        read_archive(SAMPLES / "no-such-file.csv", "airline_csv")


# --- Field mapping ------------------------------------------------------------------------


def test_airline_rows_map_to_utc_envelopes_keyed_by_handle() -> None:
    envelopes, errors = read(SAMPLES / "airline.csv")
    first = by_id(envelopes)["570306133677760001"]

    assert errors == []
    assert [e.external_id for e in envelopes] == [
        "570306133677760001",
        "570301130888120002",
        "569587242672398003",
    ]
    assert first.created_at == datetime(2015, 2, 24, 19, 35, 52, tzinfo=UTC)  # 11:35:52 -0800
    assert first.author == Author(id="", handle="sky_walker")
    assert first.author.key(first.external_id) == "@sky_walker"
    assert first.metrics == {"reposts": 0}
    assert first.url == "https://x.com/sky_walker/status/570306133677760001"
    assert first.raw["airline"] == "Virgin America"
    assert first.raw["tweet_created"] == "2015-02-24 11:35:52 -0800"


def test_airline_text_keeps_quoted_commas_newlines_and_quotes() -> None:
    envelopes, _ = read(SAMPLES / "airline.csv")
    late = by_id(envelopes)["570301130888120002"]

    assert late.text == '@VirginAmerica two hours on the tarmac,\nand counting "on time" they said'
    assert late.metrics == {"reposts": 3}


def test_trump_rows_map_the_account_and_its_counts() -> None:
    envelopes, errors = read(SAMPLES / "trump.csv")
    new_year = by_id(envelopes)["683060169677344000"]

    assert errors == []
    assert new_year.created_at == datetime(2015, 12, 31, 23, 30, tzinfo=UTC)
    assert new_year.author == Author(handle="realDonaldTrump", name="Donald J. Trump")
    assert new_year.metrics == {"reposts": 9800, "likes": 25000}
    assert new_year.text == "Happy New Year to all,\r\nincluding the critics"


def test_trump_reply_to_a_user_stays_in_raw_not_in_reply_to() -> None:
    envelopes, _ = read(SAMPLES / "trump.csv")
    reply = by_id(envelopes)["682805320217980928"]

    assert reply.reply_to == ""
    assert reply.raw["in_reply_to_user_id_str"] == "52660746"


def test_trump_ids_from_before_snowflake_keep_their_own_timestamp() -> None:
    envelopes, _ = read(SAMPLES / "trump.csv")

    assert by_id(envelopes)["6971079756"].created_at == datetime(
        2009, 12, 23, 17, 38, 18, tzinfo=UTC
    )


def test_snowflake_time_matches_a_timestamp_published_with_crisislex() -> None:
    # CrisisLexT26 README: "Thu Jun 20 03:56:19 +0000 2013","347563538547609602"
    assert snowflake_time(347563538547609602) == datetime(
        2013, 6, 20, 3, 56, 19, 665000, tzinfo=UTC
    )


def test_snowflake_time_refuses_a_sequential_id_from_before_november_2010() -> None:
    with pytest.raises(ValueError, match="predates snowflake"):
        snowflake_time(6971079756)


def test_crisislex_rows_take_event_time_from_the_snowflake_id() -> None:
    envelopes, errors = read(SAMPLES / "crisislex.csv")
    bow = by_id(envelopes)["347929996293046289"]

    assert errors == []
    assert bow.created_at == datetime(2013, 6, 21, 4, 12, 30, 0, tzinfo=UTC)
    assert bow.author == Author()
    assert bow.text == "Bow river is rising fast near the bridge #yycflood"
    assert bow.raw["Information Type"] == "Infrastructure and utilities"


def test_crisislex_ids_lose_a_leading_apostrophe_and_quotes() -> None:
    envelopes, _ = read(SAMPLES / "crisislex.csv")

    assert [e.external_id for e in envelopes] == [
        "347929996293046289",
        "347866448393142289",
        "347929367147446289",
    ]


def test_crisislex_rows_with_pre_snowflake_ids_have_no_event_time(tmp_path: Path) -> None:
    path = tmp_path / "event-tweets_labeled.csv"
    path.write_text(
        "Tweet ID, Tweet Text, Information Source, Information Type, Informativeness\n"
        '"29700859247","old id",Not labeled,Not labeled,Not related\n'
        '"347929367147446289","good morning",Not labeled,Not labeled,Not related\n'
    )

    envelopes, errors = read(path)

    assert [e.external_id for e in envelopes] == ["347929367147446289"]
    assert [(e.line, e.category) for e in errors] == [(2, "no event time")]


def test_telegram_messages_map_to_channel_envelopes() -> None:
    envelopes, errors = read(SAMPLES / "telegram.json")
    bridge = envelopes[0]

    assert errors == []
    assert bridge.external_id == "-1001234567890/5012"
    assert bridge.created_at == datetime(2024, 11, 20, 9, 15, tzinfo=UTC)
    assert bridge.author == Author(id="-1001234567890", handle="", name="Городские новости")
    assert bridge.url == ""
    assert bridge.raw["category"] == "society"


def test_telegram_media_posts_without_text_are_still_events() -> None:
    envelopes, _ = read(SAMPLES / "telegram.json")

    assert by_id(envelopes)["-1001234567890/5011"].text == ""


def test_x_v2_pages_and_single_tweets_map_authors_from_includes() -> None:
    envelopes, errors = read(SAMPLES / "x_v2.jsonl")
    first = by_id(envelopes)["1846915315921846289"]

    assert errors == []
    assert len(envelopes) == 5
    assert first.created_at == datetime(2024, 10, 17, 14, 5, tzinfo=UTC)
    assert first.author == Author(
        id="1001", handle="harbor_watch", name="Harbor Watch", followers=5120
    )
    assert first.lang == "en"
    assert first.url == "https://x.com/harbor_watch/status/1846915315921846289"
    assert first.metrics == {"reposts": 12, "replies": 3, "likes": 40, "quotes": 1, "views": 2200}


def test_x_v2_referenced_tweets_become_reply_repost_and_quote_links() -> None:
    tweets = by_id(read(SAMPLES / "x_v2.jsonl")[0])

    assert tweets["1846915353670582289"].reply_to == "1846915315921846289"
    assert tweets["1846916746179510289"].repost_of == "1846915315921846289"
    assert tweets["1846915693409206289"].quote_of == "1846914560947126289"
    assert tweets["1846915315921846289"].reply_to == ""


def test_x_v2_tweet_without_included_user_keeps_the_author_id_only() -> None:
    bare = by_id(read(SAMPLES / "x_v2.jsonl")[0])["1846914560947126289"]

    assert bare.author == Author(id="1003")
    assert bare.url == ""


def test_x_v2_raw_is_a_single_tweet_response_that_parses_again(tmp_path: Path) -> None:
    reply = by_id(read(SAMPLES / "x_v2.jsonl")[0])["1846915353670582289"]
    again = tmp_path / "again.jsonl"
    again.write_text(json.dumps(reply.raw) + "\n")

    assert read(again) == ([reply], [])


def test_x_v1_statuses_map_authors_counts_and_links() -> None:
    envelopes, errors = read(SAMPLES / "x_v1.jsonl")
    tweets = by_id(envelopes)
    reply = tweets["1050119031354294289"]

    assert errors == []
    assert len(envelopes) == 4  # the delete notice is not a post
    assert reply.created_at == datetime(2018, 10, 10, 20, 21, 2, tzinfo=UTC)
    assert reply.author == Author(id="4402", handle="mara_l", name="Mara L.", followers=140)
    assert reply.reply_to == "1050118620312502289"
    assert reply.metrics == {"reposts": 0, "likes": 1}
    assert tweets["1050120226730934289"].repost_of == "1050118620312502289"
    assert tweets["1050113276769206289"].quote_of == "1049000000000000000"
    assert tweets["1050113276769206289"].text.startswith("Heavy rain all afternoon")


@pytest.mark.parametrize(
    "sample",
    ["airline.csv", "trump.csv", "crisislex.csv", "telegram.json", "x_v2.jsonl", "x_v1.jsonl"],
)
def test_every_event_time_is_timezone_aware_utc(sample: str) -> None:
    envelopes, _ = read(SAMPLES / sample)

    assert envelopes
    assert {e.created_at.utcoffset() for e in envelopes} == {timedelta(0)}
    assert {e.created_at.tzinfo for e in envelopes} == {UTC}


# --- Broken files -------------------------------------------------------------------------


def test_a_broken_csv_loses_none_of_its_good_rows_and_reports_each_bad_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "Tweets.csv"
    path.write_text(
        AIRLINE_HEADER
        + airline_row("1001", created="2015-02-24 11:35:52 -0800")  # line 2
        + airline_row("", created="2015-02-24 11:36:00 -0800")  # 3: no id
        + airline_row("1003", created="yesterday")  # 4: bad time
        + airline_row("1004", created="2015-02-24 11:37:00")  # 5: no offset
        + "1005,neutral,1.0,United\n"  # 6: too few columns
        + airline_row("10x6", created="2015-02-24 11:38:00 -0800")  # 7: not an id
        + airline_row("1007", created="2015-02-24 11:39:00 -0800")  # 8
    )

    envelopes, errors = read(path)

    assert [e.external_id for e in envelopes] == ["1001", "1007"]
    assert [(e.line, e.category) for e in errors] == [
        (3, "missing id"),
        (4, "bad time"),
        (5, "bad time"),
        (6, "wrong column count"),
        (7, "bad id"),
    ]
    assert errors[3].raw == "1005,neutral,1.0,United\n"


def test_an_unbalanced_quote_costs_only_its_own_row(tmp_path: Path) -> None:
    path = tmp_path / "Tweets.csv"
    path.write_text(
        AIRLINE_HEADER
        + airline_row("1001", created="2015-02-24 11:35:52 -0800")
        + airline_row("1002", text='"never closed', created="2015-02-24 11:36:00 -0800")
        + airline_row("1003", created="2015-02-24 11:37:00 -0800")
        + airline_row("1004", created="2015-02-24 11:38:00 -0800")
    )

    envelopes, errors = read(path)

    assert [e.external_id for e in envelopes] == ["1001", "1003", "1004"]
    assert [(e.line, e.category) for e in errors] == [(3, "wrong column count")]


def test_an_undecodable_byte_costs_one_character_not_the_row(tmp_path: Path) -> None:
    path = tmp_path / "Tweets.csv"
    path.write_bytes(
        AIRLINE_HEADER.encode()
        + airline_row("1001", text="caf\xff-latte", created="2015-02-24 11:35:52 -0800").encode(
            "latin-1"
        )
        + airline_row("1002", created="2015-02-24 11:36:00 -0800").encode()
    )

    envelopes, errors = read(path)

    assert errors == []
    assert [e.text for e in envelopes] == ["caf\ufffd-latte", "ok"]


def test_an_undecodable_byte_in_an_id_costs_that_row_only(tmp_path: Path) -> None:
    path = tmp_path / "Tweets.csv"
    path.write_bytes(
        AIRLINE_HEADER.encode()
        + b"10\xff1"
        + airline_row("", created="2015-02-24 11:35:52 -0800").encode()
        + airline_row("1002", created="2015-02-24 11:36:00 -0800").encode()
    )

    envelopes, errors = read(path)

    assert [e.external_id for e in envelopes] == ["1002"]
    assert [(e.line, e.category) for e in errors] == [(2, "bad id")]


def test_nul_characters_are_dropped_from_text_and_raw(tmp_path: Path) -> None:
    path = tmp_path / "Tweets.csv"
    path.write_text(
        AIRLINE_HEADER + airline_row("1001", text="a\x00b", created="2015-02-24 11:35:52 -0800")
    )

    (envelope,), _ = read(path)

    assert envelope.text == "ab"
    assert envelope.raw["text"] == "ab"


def test_a_truncated_telegram_array_yields_every_complete_message_and_one_error(
    tmp_path: Path,
) -> None:
    text = (SAMPLES / "telegram.json").read_text()
    cut = text.index('"date"', text.index("5010"))
    path = tmp_path / "cut_messages.json"
    path.write_text(text[:cut])

    envelopes, errors = read(path, "telegram_json")

    assert [e.external_id for e in envelopes] == ["-1001234567890/5012", "-1001234567890/5011"]
    assert [(e.line, e.category) for e in errors] == [(18, "bad json")]


def test_a_telegram_array_cut_between_messages_reports_the_missing_end(tmp_path: Path) -> None:
    text = (SAMPLES / "telegram.json").read_text()
    path = tmp_path / "cut_messages.json"
    path.write_text(text[: text.index("},", text.index("5011")) + 2])

    envelopes, errors = read(path)

    assert len(envelopes) == 2
    assert [e.reason for e in errors] == ["bad json: truncated array (no closing ']')"]


def test_a_malformed_telegram_message_costs_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "messages.json"
    path.write_bytes(
        b'[{"message_id": 1, "sender_id": -5, "text": "a", "date": "2024-11-01T10:00:00+00:00"},\n'
        b' {"message_id": 2, "sender_id": -5, "text": "b", "date": 2024-11-01},\n'
        b' {"message_id": 3, "sender_id": -5, "text": "\xff",'
        b' "date": "2024-11-01T10:02:00+00:00"},\n'
        b' {"message_id": 4, "sender_id": -5, "text": "d", "date": "not a date"},\n'
        b' {"sender_id": -5, "text": "e", "date": "2024-11-01T10:04:00+00:00"}]\n'
    )

    envelopes, errors = read(path)

    assert [(e.external_id, e.text) for e in envelopes] == [("-5/1", "a"), ("-5/3", "\ufffd")]
    assert [(e.line, e.category) for e in errors] == [
        (2, "bad json"),
        (4, "bad time"),
        (5, "missing id"),
    ]


def test_a_truncated_last_jsonl_line_is_one_row_error(tmp_path: Path) -> None:
    lines = (SAMPLES / "x_v1.jsonl").read_text().splitlines(keepends=True)
    path = tmp_path / "stream.jsonl"
    path.write_text("".join(lines[:-1]) + lines[-1][:80])

    envelopes, errors = read(path)

    assert len(envelopes) == 3
    assert [(e.line, e.category, e.raw) for e in errors] == [(5, "bad json", lines[-1][:80])]


def test_broken_x_lines_each_cost_one_row(tmp_path: Path) -> None:
    good = (SAMPLES / "x_v2.jsonl").read_text().splitlines()[1]
    path = tmp_path / "stream.jsonl"
    path.write_bytes(
        good.encode()
        + b"\n"
        + b'{"data": {"text": "no id", "author_id": "1", "created_at": "2024-10-17T14:00:00Z"}}\n'
        + b'{"data": {"id": "9", "text": "t", "author_id": "1", "created_at": "17/10/2024"}}\n'
        + b'{"data": {"id": "8", "text": "caf\xc3", "author_id": "1",'
        b' "created_at": "2024-10-17T14:00:00Z"}}\n'
        + b'["not", "an", "object"]\n'
        + b'{"errors": [{"title": "Not Found Error"}]}\n'
    )

    envelopes, errors = read(path, "x_v2_jsonl")

    assert [(e.external_id, e.text) for e in envelopes] == [
        ("1846916746179510289", "RT @harbor_watch: Flood gates closed at the north harbor #storm"),
        ("8", "caf\ufffd"),
    ]
    assert [(e.line, e.category) for e in errors] == [
        (2, "missing id"),
        (3, "bad time"),
        (5, "not a post"),
        (6, "not a post"),
    ]


def test_broken_v1_statuses_each_cost_one_row(tmp_path: Path) -> None:
    path = tmp_path / "stream.jsonl"
    path.write_text(
        '{"id_str": "1", "text": "a", "created_at": "Wed Oct 10 20:19:24 +0000 2018", "user": {}}\n'
        '{"id_str": "2", "text": "b", "created_at": "Wed Oct 10 20:19:24 2018", "user": {}}\n'
        '{"id_str": "3", "text": "c", "created_at": "Wed Oct 10 25:19:24 +0000 2018", "user": {}}\n'
        '{"text": "d", "created_at": "Wed Oct 10 20:19:24 +0000 2018", "user": {}}\n'
        '{"id_str": "5", "text": "e", "created_at": "Wed Oct 10 20:19:24 -0700 2018", "user": {}}\n'
    )

    envelopes, errors = read(path)

    assert [(e.external_id, e.created_at) for e in envelopes] == [
        ("1", datetime(2018, 10, 10, 20, 19, 24, tzinfo=UTC)),
        ("5", datetime(2018, 10, 11, 3, 19, 24, tzinfo=UTC)),
    ]
    assert [(e.line, e.category) for e in errors] == [
        (2, "bad time"),
        (3, "bad time"),
        (4, "missing id"),
    ]


def test_row_error_raw_is_cut_to_two_thousand_characters(tmp_path: Path) -> None:
    path = tmp_path / "stream.jsonl"
    path.write_text((SAMPLES / "x_v1.jsonl").read_text() + '{"text": "' + "x" * 10_000 + "\n")

    _, (error,) = read(path)

    assert len(error.raw) == MAX_RAW_CHARS


# --- Adapter and registry -----------------------------------------------------------------


def test_the_registry_maps_the_replay_kind_to_the_replay_adapter() -> None:
    assert adapter_for("replay") is ReplayAdapter


def test_the_registry_names_an_unknown_kind() -> None:
    with pytest.raises(KeyError, match="no source adapter for kind 'carrier-pigeon'"):
        adapter_for("carrier-pigeon")


def test_the_replay_adapter_yields_only_envelopes_and_counts_skipped_rows(tmp_path: Path) -> None:
    path = tmp_path / "Tweets.csv"
    path.write_text(
        AIRLINE_HEADER
        + airline_row("1001", created="2015-02-24 11:35:52 -0800")
        + airline_row("1002", created="soon")
    )
    adapter = ReplayAdapter(Source(kind="replay", name="t", config={"path": str(path)}))

    envelopes = list(adapter.fetch())

    assert [e.external_id for e in envelopes] == ["1001"]
    assert dict(adapter.errors) == {"bad time": 1}


def test_the_replay_adapter_reports_a_missing_file_as_permanent(tmp_path: Path) -> None:
    adapter = ReplayAdapter(
        Source(kind="replay", name="t", config={"path": str(tmp_path / "gone.csv")})
    )

    with pytest.raises(SourceError) as caught:
        list(adapter.fetch())

    assert caught.value.permanent is True


# --- The real data sets (../shared/data) --------------------------------------------------


def test_the_airline_archive_parses_every_row(shared_data: Path) -> None:
    path = shared_data / "airline_tweets" / "Tweets.csv"

    envelopes, errors = read(path)

    assert detect_format(path) == "airline_csv"
    assert (len(envelopes), len(errors)) == (14_640, 0)
    assert len({e.external_id for e in envelopes}) == 14_485
    assert len({e.author.key(e.external_id) for e in envelopes}) == 7_701
    assert min(e.created_at for e in envelopes) >= datetime(2015, 2, 16, 8, tzinfo=UTC)
    assert max(e.created_at for e in envelopes) < datetime(2015, 2, 25, 8, tzinfo=UTC)


def test_the_trump_archive_parses_every_row(shared_data: Path) -> None:
    path = shared_data / "trump_tweets" / "trump_tweets_2009_2016.csv"

    envelopes, errors = read(path)

    assert detect_format(path) == "trump_csv"
    assert (len(envelopes), len(errors)) == (18_507, 0)
    assert len({e.external_id for e in envelopes}) == 18_507
    assert {e.reply_to for e in envelopes} == {""}
    assert max(e.created_at for e in envelopes) < datetime(2017, 1, 1, tzinfo=UTC)


CRISISLEX_COUNTS = {
    "2012_Colorado_wildfires": 1200,
    "2012_Costa_Rica_earthquake": 1412,
    "2012_Italy_earthquakes": 1000,
    "2012_Philipinnes_floods": 1000,
    "2012_Typhoon_Pablo": 1000,
    "2012_Venezuela_refinery": 1000,
    "2013_Alberta_floods": 1000,
    "2013_Australia_bushfire": 1199,
    "2013_Bohol_earthquake": 1000,
    "2013_Brazil_nightclub_fire": 1000,
    "2013_LA_airport_shootings": 1032,
    "2013_Lac_Megantic_train_crash": 1000,
    "2013_Manila_floods": 1000,
    "2013_NY_train_crash": 1000,
    "2013_Queensland_floods": 1200,
    "2013_Russia_meteor": 1442,
    "2013_Sardinia_floods": 1000,
    "2013_Spain_train_crash": 1000,
}


@pytest.mark.parametrize(("event", "count"), sorted(CRISISLEX_COUNTS.items()))
def test_each_crisislex_labelled_file_parses_every_row(
    shared_data: Path, event: str, count: int
) -> None:
    path = shared_data / "crisislex_t26" / event / f"{event}-tweets_labeled.csv"

    envelopes, errors = read(path)

    assert detect_format(path) == "crisislex_csv"
    assert (len(envelopes), len(errors)) == (count, 0)
    assert len({e.external_id for e in envelopes}) == count


@pytest.mark.parametrize("event", ["2013_Alberta_floods", "2012_Costa_Rica_earthquake"])
def test_crisislex_snowflake_times_agree_with_the_published_timestamps(
    shared_data: Path, event: str
) -> None:
    folder = shared_data / "crisislex_t26" / event
    envelopes, _ = read(folder / f"{event}-tweets_labeled.csv")
    snowflake = {e.external_id: e.created_at for e in envelopes}
    with (folder / f"{event}-tweetids_entire_period.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    published = {
        tweet_id: datetime.strptime(stamp, "%a %b %d %H:%M:%S %z %Y") for stamp, tweet_id, _ in rows
    }
    common = snowflake.keys() & published.keys()

    gaps = [abs(snowflake[i] - published[i]) for i in common]

    # created_at is stamped to the second by another clock than the id's, so a few
    # disagree by a second or so; nearly all agree within one.
    assert len(common) > 100
    assert sum(gap < timedelta(seconds=1) for gap in gaps) / len(gaps) > 0.99
    assert max(gaps) < timedelta(seconds=5)


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("1001003921752_messages.json", 905),
        ("1001101170442_messages.json", 1000),
        ("1001000724666_messages.json", 967),
    ],
)
def test_each_telegram_channel_parses_every_message(
    shared_data: Path, name: str, count: int
) -> None:
    path = shared_data / "telegram_news" / name

    envelopes, errors = read(path)

    assert detect_format(path) == "telegram_json"
    assert (len(envelopes), len(errors)) == (count, 0)
    assert len({e.external_id for e in envelopes}) == count


def test_a_truncated_copy_of_a_real_telegram_file_keeps_every_complete_message(
    shared_data: Path, tmp_path: Path
) -> None:
    text = (shared_data / "telegram_news" / "1001003921752_messages.json").read_text()
    cut = text.index('"date"', len(text) // 2)
    path = tmp_path / "cut_messages.json"
    path.write_text(text[:cut])
    complete = text[:cut].count('"message_id"') - 1
    full_ids = [
        e.external_id
        for e in read(shared_data / "telegram_news" / "1001003921752_messages.json")[0]
    ]

    envelopes, errors = read(path)

    assert [e.external_id for e in envelopes] == full_ids[:complete]
    assert len(errors) == 1
