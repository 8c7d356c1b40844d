"""Fast-path enrichment: entities, language, keywords, sentiment."""

from __future__ import annotations

from mlengine.text import enrich_text, extract_entities


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


def test_language_keywords_and_sentiment() -> None:
    english = enrich_text("Our flight was cancelled again, the worst airline ever #fail")
    russian = enrich_text(
        "Почти три миллиарда лет назад на обратной стороне Луны извергались вулканы"
    )

    assert english.lang == "en" and english.sentiment < -0.5
    assert "flight" in english.keywords and "the" not in english.keywords
    assert russian.lang == "ru" and "луны" in russian.keywords and "на" not in russian.keywords


def test_a_text_without_letters_has_an_undetermined_language() -> None:
    assert enrich_text("https://t.co/x 123 !!").lang == "und"
