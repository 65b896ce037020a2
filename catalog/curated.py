"""The curated community catalog: parse and check `community.toml`, derive tags, upsert into the database."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from sqlmodel import delete, select

from catalog.db import CatalogError, Database
from catalog.schema import CommunityModel, Event, now
from catalog.tags import TASKS, license_family, size_class

CURATED_FILE = Path(__file__).with_name("community.toml")
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "repo_id": str, "name": str, "description": str, "task": str, "params": int,
    "license": str, "gated": bool, "chat": bool, "finetunable": bool, "capabilities": list,
}


def derive_tags(entry: dict[str, Any]) -> list[str]:
    tags = [entry["task"], size_class(entry["params"]), license_family(entry["license"])]
    tags += [c for c in entry["capabilities"] if c not in tags]
    if entry["finetunable"]:
        tags.append("fine-tunable")
    if entry["gated"]:
        tags.append("gated")
    return tags


def load_curated(path: Path = CURATED_FILE) -> list[CommunityModel]:
    """Parse the curated file; any problem raises CatalogError naming the file, entry and field."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"cannot read the community catalog {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{path}: not valid TOML: {exc}") from exc
    entries = data.get("model")
    if not isinstance(entries, list) or not entries:
        raise CatalogError(f"{path}: expected [[model]] entries, found none")
    models, seen = [], set()
    for position, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise CatalogError(f"{path}: model #{position}: expected a table ([[model]]), got {entry!r}")
        where = f"{path}: model #{position}" + (f" ({entry['repo_id']})" if isinstance(entry.get("repo_id"), str) else "")
        for field, kind in _REQUIRED.items():
            if field not in entry:
                raise CatalogError(f"{where}: missing field '{field}'")
            if not isinstance(entry[field], kind) or (kind is int and isinstance(entry[field], bool)):
                raise CatalogError(f"{where}: field '{field}' should be {kind.__name__}, got {entry[field]!r}")
        repo_id = entry["repo_id"]
        if repo_id.count("/") != 1 or " " in repo_id:
            raise CatalogError(f"{where}: repo_id must look like 'owner/name'")
        if repo_id in seen:
            raise CatalogError(f"{where}: repo_id listed twice")
        if not all(isinstance(c, str) and c for c in entry["capabilities"]):
            raise CatalogError(f"{where}: capabilities must be a list of words")
        if entry["task"] not in TASKS:
            raise CatalogError(f"{where}: task must be one of {', '.join(sorted(TASKS))}")
        seen.add(repo_id)
        models.append(
            CommunityModel(
                repo_id=repo_id,
                name=entry["name"],
                link=entry.get("link", f"https://huggingface.co/{repo_id}"),
                description=entry["description"],
                task=entry["task"],
                tags_json=CommunityModel.dumps(derive_tags(entry)),
                params=entry["params"],
                license=entry["license"],
                gated=entry["gated"],
                chat=entry["chat"],
                finetunable=entry["finetunable"],
                position=position,
            )
        )
    return models


_COMPARED = ("name", "link", "description", "task", "tags_json", "params", "license", "gated", "chat",
             "finetunable", "position")


def upsert_curated(db: Database, models: list[CommunityModel]) -> int:
    """Make the community table match `models`; returns how many rows changed. Idempotent."""
    changed = 0
    with db.write() as session:
        existing = {row.repo_id: row for row in session.exec(select(CommunityModel))}
        for model in models:
            row = existing.pop(model.repo_id, None)
            if row is None:
                session.add(model)
                changed += 1
            elif any(getattr(row, f) != getattr(model, f) for f in _COMPARED):
                for f in _COMPARED:
                    setattr(row, f, getattr(model, f))
                row.updated_at = now()
                changed += 1
        if existing:
            session.exec(delete(CommunityModel).where(CommunityModel.repo_id.in_(list(existing))))
            changed += len(existing)
        if changed:
            session.add(Event(subject="community", kind="updated", message=f"{changed} catalog rows changed"))
    return changed
