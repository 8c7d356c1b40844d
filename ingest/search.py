"""Full-text search of events: the query language, and the backend behind one interface.

The query (``q`` on ``/api/events/``) is web-search syntax, parsed here (``parse``):

- words, all required: ``flight delayed``;
- ``"a quoted phrase"``: the text holds these characters, in this order, ignoring case;
- ``OR`` (upper case) between two terms: either (it binds tighter than the implicit AND,
  as in PostgreSQL's ``websearch_to_tsquery``);
- ``-word`` or ``-"a phrase"``: not this;
- ``word*``: a word that starts with these letters.

A search is answered by a backend (``SearchBackend``) named by the setting
``SEARCH_BACKEND`` (``backend()``); PostgreSQL full-text search (``PostgresSearch``) is
the default and the only one built. docs/operations.md says what an external engine
needs to stand in for it.

How PostgreSQL finds events (the source: PostgreSQL's documentation, chapter "Full Text
Search", https://www.postgresql.org/docs/current/textsearch.html):

- The enrich stage writes each event's ``search_vector`` (``ingest.services
  .save_enrichments``, ``vector_sql``): the text under the ``simple`` configuration
  (every word, lower-cased, unstemmed, at its real position), then under the
  configuration of its detected language (``config_for``: stemmed, stop words out).
  A GIN index covers it.
- A word matches either form: its ``simple`` lexeme, or its stem under any language
  configuration, so "retrasado" finds a Spanish post saying "retrasados" and "delays"
  an English one saying "delayed"; a stop word ("the") still matches by its ``simple``
  form. Stems of other languages may rarely match too (a word that another language
  stems to the same lexeme).
- A prefix matches ``simple`` lexemes only (``to_tsquery``'s ``:*``): the letters the
  user typed, not a stem.
- A phrase is exact: the index narrows the candidates to rows holding its words in
  order under ``simple``, the last as a prefix (``'power' <-> 'outage':*``), and each candidate is
  kept only when its text holds the phrase, ignoring case (``ILIKE``, the phrase's
  ``%``, ``_`` and ``\\`` escaped). So ``"flights delayed"`` returns exactly the posts
  whose text contains "flights delayed" (also "Flights delayed!!" and "flights delayedd"),
  and no post saying "flight delays", whatever its language was detected as. A phrase
  whose first word is glued to a longer one ("myflights delayed") is not found: the
  index knows words, not substrings.

User input only ever reaches SQL as bound parameters: words through ``plainto_tsquery``,
prefixes and phrases through ``to_tsquery`` as one quoted lexeme (quotes doubled,
backslashes escaped) with ``:*``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Protocol

from django.conf import settings
from django.db import connection
from django.db.models import BooleanField, DecimalField, FloatField, QuerySet
from django.db.models.expressions import RawSQL
from django.utils.module_loading import import_string

from ingest.models import Event

LANGUAGE_CONFIGS: Mapping[str, str] = {
    "ar": "arabic",
    "ca": "catalan",
    "da": "danish",
    "de": "german",
    "el": "greek",
    "en": "english",
    "es": "spanish",
    "eu": "basque",
    "fi": "finnish",
    "fr": "french",
    "ga": "irish",
    "hi": "hindi",
    "hu": "hungarian",
    "hy": "armenian",
    "id": "indonesian",
    "it": "italian",
    "lt": "lithuanian",
    "nb": "norwegian",
    "ne": "nepali",
    "nl": "dutch",
    "nn": "norwegian",
    "no": "norwegian",
    "pt": "portuguese",
    "ro": "romanian",
    "ru": "russian",
    "sr": "serbian",
    "sv": "swedish",
    "ta": "tamil",
    "tr": "turkish",
    "yi": "yiddish",
}
"""ISO 639-1 language code (the enrich stage's ``Event.lang``) → the PostgreSQL text
search configuration that stems it. Any other language (and "und") is ``simple``."""

SIMPLE = "simple"
STEMMING_CONFIGS: tuple[str, ...] = tuple(sorted(set(LANGUAGE_CONFIGS.values())))
"""Every stemming configuration a stored vector may use; a query word is stemmed by each."""

MAX_QUERY_CHARS = 512
"""The longest ``q`` taken (a longer one is a 400)."""
MAX_TERMS = 16
"""The most words, prefixes and phrases in one query (more is a 400)."""

MAX_INDEXED_CHARS = 100_000
"""The characters of a text its vector is made of: a tsvector holds at most 1 MB, and a
longer text must not fail its enrichment batch. Posts are far shorter."""

HIGHLIGHT_OPTIONS = "StartSel=<mark>, StopSel=</mark>, HighlightAll=true"

RANK_KEY_FIELD = DecimalField(max_digits=60, decimal_places=0)
"""The type of ``rank_key`` (``SearchBackend.search`` by rank): whole numbers of up to
60 digits, read as ``Decimal`` (a float would lose the low digits, and with them the
cursor's exactness)."""


def config_for(lang: str) -> str:
    """The text search configuration of a language code: ``"en"``, ``"EN"``, ``"pt-BR"``
    and ``"pt_br"`` map through their primary subtag; unknown codes give ``"simple"``."""
    primary = re.split(r"[-_]", lang.strip().lower(), maxsplit=1)[0]
    return LANGUAGE_CONFIGS.get(primary, SIMPLE)


def config_sql(lang_sql: str) -> str:
    """SQL of the ``regconfig`` of the language in the SQL expression ``lang_sql`` (a
    column, never user input), as ``config_for`` maps it."""
    primary = f"split_part(replace(lower({lang_sql}), '_', '-'), '-', 1)"
    cases = " ".join(f"WHEN '{code}' THEN '{cfg}'" for code, cfg in LANGUAGE_CONFIGS.items())
    return f"(CASE {primary} {cases} ELSE '{SIMPLE}' END)::regconfig"


def vector_sql(text_sql: str, lang_sql: str) -> str:
    """SQL of an event's ``search_vector`` from its text and language columns: the
    ``simple`` vector first (so its positions are the words' own, for phrases), then the
    language's. Both column expressions are code, never user input."""
    text = f"left({text_sql}, {MAX_INDEXED_CHARS})"
    return f"(to_tsvector('{SIMPLE}', {text}) || to_tsvector({config_sql(lang_sql)}, {text}))"


class SearchSyntaxError(ValueError):
    """A ``q`` that asks for nothing findable (the message says why, for a 400)."""


@dataclass(frozen=True, slots=True)
class Term:
    """One term of a query: ``kind`` is "word", "prefix" (``text`` without its ``*``) or
    "phrase" (``text`` without its quotes, whitespace collapsed); ``negated`` for ``-``."""

    kind: str
    text: str
    negated: bool = False


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A parsed ``q``: ``groups`` are ANDed, the terms of a group ORed."""

    raw: str
    groups: tuple[tuple[Term, ...], ...] = field(default_factory=tuple)

    @property
    def positive_terms(self) -> list[Term]:
        return [term for group in self.groups for term in group if not term.negated]


_TOKEN = re.compile(r'\s*(-?)(?:"([^"]*)(?:"|$)|([^\s"]+))')
_FINDABLE = re.compile(r"[^\W_]")  # a letter or a digit: what the parser makes lexemes of


def parse(q: str) -> SearchQuery:
    """Parse web-search syntax (module docstring) into a ``SearchQuery``.

    Lenient like a search box: an unbalanced quote runs to the end, a term with no letter
    or digit ("-", "*", "!!") is dropped, ``OR`` at either end or twice is ignored, ``-``
    before ``OR`` makes it a word.

    Raises:
        SearchSyntaxError: ``q`` holds a NUL character, is over ``MAX_QUERY_CHARS``,
            has more than ``MAX_TERMS`` terms, or has no term to look for (only
            operators, or only excluded terms with nothing required).
    """
    if "\x00" in q:
        raise SearchSyntaxError("Null characters are not allowed.")
    if len(q) > MAX_QUERY_CHARS:
        raise SearchSyntaxError(f"At most {MAX_QUERY_CHARS} characters.")
    groups: list[list[Term]] = []
    pending_or = False
    count = 0
    for match in _TOKEN.finditer(q):
        minus, phrase, bare = match.groups()
        if phrase is None and bare is None:
            continue
        if bare == "OR" and not minus:
            pending_or = bool(groups)
            continue
        term = _term(phrase, bare, negated=bool(minus))
        if term is None:
            continue
        count += 1
        if count > MAX_TERMS:
            raise SearchSyntaxError(f"At most {MAX_TERMS} words, prefixes and phrases.")
        if pending_or:
            groups[-1].append(term)
        else:
            groups.append([term])
        pending_or = False
    query = SearchQuery(raw=q, groups=tuple(tuple(g) for g in groups))
    if not any(all(not t.negated for t in group) for group in query.groups):
        raise SearchSyntaxError(
            "Nothing to look for: give a word, a word* prefix or a quoted phrase that is "
            "not excluded with -."
        )
    return query


def _term(phrase: str | None, bare: str | None, *, negated: bool) -> Term | None:
    if phrase is not None:
        text = " ".join(phrase.split())
        return Term("phrase", text, negated) if _FINDABLE.search(text) else None
    assert bare is not None
    if bare.endswith("*"):
        text = bare.rstrip("*")
        return Term("prefix", text, negated) if _FINDABLE.search(text) else None
    return Term("word", bare, negated) if _FINDABLE.search(bare) else None


def quoted_prefix(text: str) -> str:
    """``text`` as one quoted ``to_tsquery`` operand matching as a prefix:
    ``'it''s':*`` (quotes doubled, backslashes escaped), so no character of it is read
    as an operator. PostgreSQL documentation, "Parsing Queries" (to_tsquery)."""
    escaped = text.replace("\\", "\\\\").replace("'", "''")
    return f"'{escaped}':*"


def like_pattern(text: str) -> str:
    """An ``ILIKE`` pattern holding ``text`` anywhere (its ``\\``, ``%`` and ``_``
    escaped with the default escape character)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


SqlParts = tuple[str, list[Any]]

# Qualified: the API's events queryset joins ingest_source, which has an id and a
# created_at of its own.
_VECTOR = '"ingest_event"."search_vector"'
_TEXT = '"ingest_event"."text"'


def normalise(terms: Sequence[Term]) -> dict[Term, str]:
    """Each term's tsquery, as PostgreSQL's own text of it, in one round trip: a word's
    ``plainto_tsquery`` under ``simple`` and under every stemming configuration,
    duplicates dropped and the rest ORed (``'flight' | 'fligh'``); a prefix's
    ``to_tsquery('simple', quoted_prefix(text))``; a phrase's words in order under
    ``simple``, its last one as a prefix (``'power' <-> 'outage':*``: the phrase may end
    inside a word, "power outages", and only there, where a prefix everywhere would make
    the index read every lexeme starting "the"). A term with no lexeme (never
    for the letters and digits ``parse`` keeps) is left out.

    The duplicates matter: the planner estimates ``@@`` from the query's lexemes, and 29
    copies of one rare word read as a common one, so it would walk the time index
    through every row of the window instead of asking the GIN index.
    """
    selects: list[str] = []
    params: list[Any] = []
    spans: list[tuple[Term, int, int]] = []
    for term in dict.fromkeys(terms):
        start = len(selects)
        if term.kind == "word":
            for cfg in (SIMPLE, *STEMMING_CONFIGS):
                selects.append(f"plainto_tsquery('{cfg}', %s)::text")
                params.append(term.text)
        elif term.kind == "phrase" and " " in term.text:
            head, last = term.text.rsplit(" ", 1)
            selects.append(
                f"tsquery_phrase(phraseto_tsquery('{SIMPLE}', %s),"
                f" to_tsquery('{SIMPLE}', %s))::text"
            )
            params += [head, quoted_prefix(last)]
        else:
            selects.append(f"to_tsquery('{SIMPLE}', %s)::text")
            params.append(quoted_prefix(term.text))
        spans.append((term, start, len(selects)))
    if not selects:
        return {}
    with connection.cursor() as cursor:
        cursor.execute("SELECT " + ", ".join(selects), params)
        row = cursor.fetchone()
    out: dict[Term, str] = {}
    for term, start, end in spans:
        forms = list(dict.fromkeys(form for form in row[start:end] if form))
        if forms:
            out[term] = forms[0] if len(forms) == 1 else " | ".join(f"( {f} )" for f in forms)
    return out


class _Compiled:
    """A query's SQL over ``ingest_event``, its terms normalised (``normalise``)."""

    def __init__(self, query: SearchQuery) -> None:
        self.query = query
        self.forms = normalise([term for group in query.groups for term in group])

    def index_tsquery(self) -> str | None:
        """The tsquery text the GIN index answers: the AND of the groups without an
        excluded term, each the OR of its terms (words: every form; prefixes and
        phrases: ``simple`` prefixes). Every row the query matches matches it. None when
        a required group has no lexeme at all (nothing can match)."""
        parts = []
        for group in self.query.groups:
            if any(term.negated for term in group):
                continue
            forms = [self.forms[term] for term in group if term in self.forms]
            if not forms:
                return None
            parts.append("( " + " | ".join(f"( {f} )" for f in forms) + " )")
        return " & ".join(parts)

    def match_sql(self) -> SqlParts | None:
        """A boolean SQL condition true exactly for the rows the query finds: the index
        condition, then each group's exact condition where it adds one (a phrase's text
        check, an excluded term); None when nothing can match."""
        index = self.index_tsquery()
        if index is None:
            return None
        conditions = [f"{_VECTOR} @@ %s::tsquery"]
        params: list[Any] = [index]
        for group in self.query.groups:
            if all(not t.negated and t.kind != "phrase" for t in group):
                continue  # the index condition is already exact for it
            ors = []
            for term in group:
                sql, p = self._predicate(term)
                if sql:
                    ors.append(sql)
                    params.extend(p)
            if ors:
                conditions.append("(" + " OR ".join(ors) + ")")
        return " AND ".join(conditions), params

    def _predicate(self, term: Term) -> SqlParts:
        form = self.forms.get(term)
        if term.negated and term.kind == "phrase":
            # The text decides alone: a row the phrase's tsquery matches may not hold it.
            return f"({_TEXT} NOT ILIKE %s)", [like_pattern(term.text)]
        if form is None:
            return "", []  # no lexeme: finds nothing, excludes nothing
        if term.negated:
            return f"({_VECTOR} IS NULL OR NOT {_VECTOR} @@ %s::tsquery)", [form]
        if term.kind == "phrase":
            return f"({_VECTOR} @@ %s::tsquery AND {_TEXT} ILIKE %s)", [
                form,
                like_pattern(term.text),
            ]
        return f"({_VECTOR} @@ %s::tsquery)", [form]


def _highlight_tsquery(query: SearchQuery, config: str) -> SqlParts:
    """The tsquery ``ts_headline`` marks with: every wanted term, normalised by the
    row's own configuration (as ``ts_headline`` normalises the text)."""
    sqls = []
    params: list[Any] = []
    for term in query.positive_terms:
        if term.kind == "word":
            sqls.append(f"plainto_tsquery({config}, %s)")
            params.append(term.text)
        elif term.kind == "prefix":
            sqls.append(f"to_tsquery({config}, %s)")
            params.append(quoted_prefix(term.text))
        else:
            sqls.append(f"phraseto_tsquery({config}, %s)")
            params.append(term.text)
    return "(" + " || ".join(sqls) + ")", params


class SearchBackend(Protocol):
    """What answers a search. The API narrows its events queryset (already scoped to the
    caller's teams and filtered by every other parameter) with ``search``, and marks the
    rows of the page it returns with ``highlights``. The queryset stays the source of
    truth for scope and filters: a backend only narrows and orders it."""

    def search(
        self, queryset: QuerySet[Event], query: SearchQuery, *, by_rank: bool = False
    ) -> QuerySet[Event]:
        """The events of ``queryset`` that ``query`` finds. With ``by_rank``, annotated
        with ``rank`` (float, higher is better) and ``rank_key`` (a unique sort key,
        ``RANK_KEY_FIELD``) and ordered by ``-rank_key``; else in ``queryset``'s order.
        """
        ...

    def highlights(self, event_ids: Sequence[int], query: SearchQuery) -> dict[int, str]:
        """Per event id: its text, HTML-escaped, with ``query``'s matches in
        ``<mark>…</mark>``. One round trip however many ids."""
        ...


class PostgresSearch:
    """PostgreSQL full-text search over ``Event.search_vector`` (the module docstring)."""

    def search(
        self, queryset: QuerySet[Event], query: SearchQuery, *, by_rank: bool = False
    ) -> QuerySet[Event]:
        """One query to normalise the terms (``normalise``), none else until the
        queryset is read. Ranked by ``ts_rank_cd`` (cover density; normalisation 32:
        rank/(rank+1), so 0 to 1) rounded to 6 digits, then newest event time, then id:
        one numeric key, unique, so a cursor resumes exactly. Ranking reads every match
        in the window (bounded by it), where the time order stops at the page."""
        compiled = _Compiled(query)
        match = compiled.match_sql()
        if match is None:
            return queryset.none()
        sql, params = match
        queryset = queryset.filter(RawSQL(sql, params, output_field=BooleanField()))
        if not by_rank:
            return queryset
        rank = f"ts_rank_cd({_VECTOR}, %s::tsquery, 32)"
        key = (
            f"(round(({rank})::numeric, 6) * 1e42"
            ' + floor(extract(epoch FROM "ingest_event"."created_at") * 1e6)::numeric * 1e20'
            ' + "ingest_event"."id")::numeric(60, 0)'
        )
        index = [compiled.index_tsquery()]
        return queryset.annotate(
            rank=RawSQL(rank, index, output_field=FloatField()),
            rank_key=RawSQL(key, index, output_field=RANK_KEY_FIELD),
        ).order_by("-rank_key")

    def highlights(self, event_ids: Sequence[int], query: SearchQuery) -> dict[int, str]:
        """``ts_headline`` (``HighlightAll``: the whole text) over the HTML-escaped text
        (``&``, ``<``, ``>``, ``"``; the parser reads the entities as no word), with the
        row's own configuration. Reads only ``event_ids``."""
        if not event_ids:
            return {}
        config = config_sql("lang")
        tsquery, params = _highlight_tsquery(query, config)
        escaped = (
            "replace(replace(replace(replace(text, '&', '&amp;'), '<', '&lt;'), '>', '&gt;'),"
            " '\"', '&quot;')"
        )
        sql = (
            f"SELECT id, ts_headline({config}, {escaped}, {tsquery}, %s) "
            "FROM ingest_event WHERE id = ANY(%s)"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, [*params, HIGHLIGHT_OPTIONS, list(event_ids)])
            return {int(row[0]): row[1] for row in cursor.fetchall()}


@cache
def _backend(path: str) -> SearchBackend:
    backend: SearchBackend = import_string(path)()
    return backend


def backend() -> SearchBackend:
    """The backend ``settings.SEARCH_BACKEND`` names (a dotted path to a class taking no
    arguments; default ``ingest.search.PostgresSearch``), one instance per process."""
    return _backend(settings.SEARCH_BACKEND)
