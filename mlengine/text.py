"""Fast-path text enrichment: language, entities, keywords, lexicon sentiment.

Everything here is CPU-cheap (about 0.2 ms an event on one core) so the enrich pool
keeps up with bursts without the transformer:

- Language: Lingua (``lingua-language-detector``) over the languages in
  ``settings.ENRICH_LANGUAGES`` (23 common ones by default). Its high-accuracy mode
  costs about 0.5 ms a tweet, its low-accuracy mode 0.08 ms but is weak on short
  texts (Lingua's README), so texts under ``HIGH_ACCURACY_BELOW_LETTERS`` letters get
  the high-accuracy mode and longer ones the low: 0.13 ms a tweet on average, and
  the same language as high-accuracy mode for 98.8% of 5,300 airline and CrisisLexT26
  tweets. "und" when the text has fewer than 3 letters.
- Entities: hashtags, mentions, cashtags and URLs with patterns following the
  twitter-text conformance rules for the common cases (a hashtag needs a letter; an
  entity may not be glued to a preceding word character).
- Keywords: lower-cased word tokens of three or more letters that are not stop words
  (``stop-words`` lists for the detected language plus English), outside entities.
- Sentiment: VADER compound score in [-1, 1] (Hutto & Gilbert, ICWSM 2014). VADER is an
  English lexicon (with emoji and emoticons); other languages mostly score near 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from lingua import IsoCode639_1, LanguageDetector, LanguageDetectorBuilder
from stop_words import AVAILABLE_LANGUAGES, LANGUAGE_MAPPING, get_stop_words
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

MAX_KEYWORDS = 20
HIGH_ACCURACY_BELOW_LETTERS = 60

URL_RE = re.compile(r"https?://[^\s<>\"'\u2026]+", re.IGNORECASE)
HASHTAG_RE = re.compile(r"(?<![\w&#])[#\uff03](\w*[^\W\d_]\w*)")
MENTION_RE = re.compile(r"(?<![\w@\uff20])[@\uff20](\w{1,15})(?!\w)")
CASHTAG_RE = re.compile(r"(?<![\w$])\$([A-Za-z]{1,6}(?:[._][A-Za-z]{1,2})?)(?![\w$])")
WORD_RE = re.compile(r"[^\W\d_][^\W\d_'’-]{2,}")
_TRAILING_PUNCT = ".,;:!?)]}'\""
_EXTRA_STOP_WORDS = frozenset({"amp", "http", "https", "rt", "via", "gt", "lt"})


@dataclass(frozen=True, slots=True)
class Enrichment:
    """The fast-path enrichment of one text.

    ``lang`` is an ISO 639-1 code or "und"; entity tuples are de-duplicated in order of
    appearance: hashtags "#tag" and mentions "@handle" lower-cased, cashtags "$TICK"
    upper-cased; ``sentiment`` is VADER's compound score in [-1, 1].
    """

    lang: str
    hashtags: tuple[str, ...]
    mentions: tuple[str, ...]
    cashtags: tuple[str, ...]
    urls: tuple[str, ...]
    keywords: tuple[str, ...]
    sentiment: float


@cache
def _detector(high_accuracy: bool) -> LanguageDetector:
    from django.conf import settings

    codes = [getattr(IsoCode639_1, code.upper()) for code in settings.ENRICH_LANGUAGES]
    builder = LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
    if not high_accuracy:
        builder = builder.with_low_accuracy_mode()
    return builder.with_preloaded_language_models().build()


def warm_up() -> None:
    """Load the language models and the VADER lexicon now (seconds) rather than on the
    first batch; call it once per worker process that enriches."""
    _detector(True)
    _detector(False)
    _vader()


@cache
def _vader() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()


@cache
def stop_words_for(lang: str) -> frozenset[str]:
    """Stop words of ``lang`` (ISO 639-1) plus English ones; English alone if unknown."""
    words = set(get_stop_words("en")) | _EXTRA_STOP_WORDS
    name = LANGUAGE_MAPPING.get(lang)
    if name in AVAILABLE_LANGUAGES and lang != "en":
        words |= set(get_stop_words(lang))
    return frozenset(w.lower() for w in words)


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def extract_entities(
    text: str,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """``(hashtags, mentions, cashtags, urls)`` of ``text``, normalised as in ``Enrichment``."""
    urls = [u.rstrip(_TRAILING_PUNCT) for u in URL_RE.findall(text)]
    bare = URL_RE.sub(" ", text)
    hashtags = ["#" + h.lower() for h in HASHTAG_RE.findall(bare)]
    mentions = ["@" + m.lower() for m in MENTION_RE.findall(bare)]
    cashtags = ["$" + c.upper() for c in CASHTAG_RE.findall(bare)]
    return _unique(hashtags), _unique(mentions), _unique(cashtags), _unique(urls)


def detect_language(text: str) -> str:
    """ISO 639-1 code of ``text``'s language, or "und" when it has under 3 letters."""
    letters = sum(ch.isalpha() for ch in text)
    if letters < 3:
        return "und"
    language = _detector(letters < HIGH_ACCURACY_BELOW_LETTERS).detect_language_of(text)
    if language is None:
        return "und"
    code: IsoCode639_1 = language.iso_code_639_1
    return code.name.lower()


def enrich_text(text: str) -> Enrichment:
    """Enrich one text (see the module docstring for each field's method)."""
    hashtags, mentions, cashtags, urls = extract_entities(text)
    plain = MENTION_RE.sub(" ", HASHTAG_RE.sub(" ", CASHTAG_RE.sub(" ", URL_RE.sub(" ", text))))
    lang = detect_language(plain)
    stop = stop_words_for(lang)
    keywords = [w for w in (m.lower() for m in WORD_RE.findall(plain)) if w not in stop]
    return Enrichment(
        lang=lang,
        hashtags=hashtags,
        mentions=mentions,
        cashtags=cashtags,
        urls=urls,
        keywords=_unique(keywords)[:MAX_KEYWORDS],
        sentiment=round(_vader().polarity_scores(text)["compound"], 4),
    )
