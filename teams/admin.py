"""Admin of teams, memberships and API tokens (``/admin/``): onboarding without a shell.

API tokens ("Teams › API tokens") are listed with their name, user, prefix, created,
expiry and last use, and revoked by deleting them; never shown with a secret or a
digest, and never added here (a secret is shown once, to its holder:
``POST /api/tokens/`` or ``manage.py create_user USER --team SLUG --token-name NAME``).
"""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from knox.models import AuthToken as KnoxAuthToken

from teams import services
from teams.models import ApiToken, Membership, Team

# Knox's own model is swapped out for teams.ApiToken (KNOX_TOKEN_MODEL); its admin,
# which shows digests and adds tokens, goes with it.
if admin.site.is_registered(KnoxAuthToken):
    admin.site.unregister(KnoxAuthToken)


class ReadOnlyAdmin(admin.ModelAdmin):
    """The base of the admin of a stage's record (events, dead letters, trends, clocks,
    alerts): viewable, never added, changed or deleted here; only its stage writes it."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 1
    autocomplete_fields = ["user"]
    fields = ["user", "role"]


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "members", "created_at"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    readonly_fields = ["created_at"]
    inlines = [MembershipInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Team]:
        return super().get_queryset(request).annotate(members_count=Count("memberships"))

    @admin.display(description="members", ordering="members_count")
    def members(self, team: Team) -> int:
        return int(getattr(team, "members_count", 0))


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "team", "role"]
    list_filter = ["role", "team"]
    list_select_related = ["user", "team"]
    search_fields = ["user__username", "user__email", "team__slug", "team__name"]
    autocomplete_fields = ["user", "team"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """API tokens: seen and revoked (deleted, through ``services.revoke_token``, so open
    WebSockets close too), never added or edited, and never shown with their digest."""

    list_display = ["name", "user", "token_key", "created", "expiry", "last_used_at"]
    list_select_related = ["user"]
    list_filter = ["created", "expiry"]
    search_fields = ["name", "token_key", "user__username"]
    fields = ("name", "user", "token_key", "created", "expiry", "last_used_at")
    readonly_fields = ("name", "user", "token_key", "created", "expiry", "last_used_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def delete_model(self, request: HttpRequest, obj: ApiToken) -> None:
        services.revoke_token(obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        for token in queryset:
            services.revoke_token(token)
