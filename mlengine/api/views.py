"""Read endpoint of trends."""

from __future__ import annotations

from django_filters.rest_framework import DjangoFilterBackend
from rest_framework.filters import OrderingFilter
from rest_framework.pagination import PageNumberPagination

from dashboard.api.base import TeamScopedReadOnlyViewSet
from mlengine.api.filters import TrendFilter
from mlengine.api.serializers import TrendSerializer
from mlengine.models import Trend


class TrendPagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class TrendViewSet(TeamScopedReadOnlyViewSet):
    """Detected trends, newest detection first; ``ordering`` by score, events, time."""

    team_field = "source__team"
    queryset = Trend.objects.select_related("source")
    serializer_class = TrendSerializer
    filterset_class = TrendFilter
    filter_backends = [DjangoFilterBackend, OrderingFilter]
    ordering_fields = ["score", "events", "detected_at", "bucket_start", "velocity"]
    ordering = ["-detected_at", "-id"]
    pagination_class = TrendPagination
