"""Searching the community catalog: the same matching for the dashboard's filter bar and the CLI."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from catalog.schema import CommunityModel


def haystack(entry: CommunityModel) -> str:
    """The lowercase text a query is matched against: name, repo id, description and tags."""
    return " ".join((entry.name, entry.repo_id, entry.description, " ".join(entry.tags))).lower()


def matches(text: str, tags: Iterable[str], query_terms: list[str], wanted_tags: set[str]) -> bool:
    """Every query term appears in `text` and every wanted tag is among `tags`."""
    return all(term in text for term in query_terms) and (not wanted_tags or wanted_tags.issubset(tags))


def terms(query: str) -> list[str]:
    return query.lower().split()
