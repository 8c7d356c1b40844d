"""Reads of the alerts app for the other rooms (consumers, API, dashboard)."""

from __future__ import annotations

from collections.abc import Sequence

from alerts.models import AlertSequence


def team_sequences(team_ids: Sequence[int]) -> dict[int, int]:
    """The last alert sequence number of each of ``team_ids`` (0 when none yet)."""
    seqs = dict(
        AlertSequence.objects.filter(team_id__in=list(team_ids)).values_list("team_id", "last_seq")
    )
    return {team_id: seqs.get(team_id, 0) for team_id in team_ids}
