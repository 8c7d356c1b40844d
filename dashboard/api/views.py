"""Pipeline statistics endpoint."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from dashboard import selectors

_Latency = inline_serializer(
    "AlertLatency",
    {
        "p50": serializers.FloatField(allow_null=True),
        "p95": serializers.FloatField(allow_null=True),
        "p99": serializers.FloatField(allow_null=True),
        "n": serializers.IntegerField(),
    },
)


class StatsView(APIView):
    """Live pipeline numbers for the caller's teams (see ``dashboard.selectors.stats_for``)."""

    @extend_schema(
        responses=inline_serializer(
            "Stats",
            {
                "events_total": serializers.IntegerField(),
                "events_per_s": serializers.FloatField(),
                "queue_lag": serializers.DictField(child=serializers.IntegerField()),
                "alert_latency_ms": _Latency,
                "dead_letters_total": serializers.IntegerField(),
                "sources_total": serializers.IntegerField(),
            },
        )
    )
    def get(self, request: Request) -> Response:
        return Response(selectors.stats_for(request.user))
