"""The REST API's routes, one router for every app's viewsets."""

from __future__ import annotations

from django.urls import path
from rest_framework.routers import DefaultRouter

from alerts.api.views import AlertRuleViewSet, AlertViewSet, ChannelViewSet, DeliveryViewSet
from dashboard.api.views import SentimentView, StatsView
from ingest.api.views import DeadLetterViewSet, EventViewSet, SourceViewSet, WebhookView
from mlengine.api.views import (
    AnomalyViewSet,
    ModelVersionViewSet,
    SeriesView,
    StoryViewSet,
    StreamViewSet,
    TrendViewSet,
    WatchViewSet,
)
from teams.api.views import ApiTokenViewSet

router = DefaultRouter()
router.register("sources", SourceViewSet, basename="source")
router.register("events", EventViewSet, basename="event")
router.register("dead-letters", DeadLetterViewSet, basename="deadletter")
router.register("trends", TrendViewSet, basename="trend")
router.register("stories", StoryViewSet, basename="story")
router.register("streams", StreamViewSet, basename="stream")
router.register("anomalies", AnomalyViewSet, basename="anomaly")
router.register("models", ModelVersionViewSet, basename="modelversion")
router.register("watches", WatchViewSet, basename="watch")
router.register("rules", AlertRuleViewSet, basename="alertrule")
router.register("alerts", AlertViewSet, basename="alert")
router.register("channels", ChannelViewSet, basename="channel")
router.register("deliveries", DeliveryViewSet, basename="delivery")
router.register("tokens", ApiTokenViewSet, basename="apitoken")

urlpatterns = [
    path("stats/", StatsView.as_view(), name="stats"),
    path("sentiment/", SentimentView.as_view(), name="sentiment"),
    path("series/", SeriesView.as_view(), name="series"),
    path("ingest/webhooks/<int:source_id>/", WebhookView.as_view(), name="webhook"),
    *router.urls,
]
