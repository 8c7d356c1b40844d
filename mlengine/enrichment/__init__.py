"""Enrichment: language, entities, keywords and lexicon sentiment of every new event.

- ``stage``: the enrich stage (``enrich_events``, ``sweep_unenriched``): reads the events'
  texts through ``ingest.selectors``, writes through ``ingest.services.save_enrichments``
  and hands the source on to the trend stage.
- ``text``: the fast-path enrichment of one text (fastText and Lingua, entity patterns,
  stop words, VADER).
"""
