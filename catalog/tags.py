"""The tag vocabulary derived from catalog data: size classes and licence families. Light to import."""

from __future__ import annotations

SIZE_CLASSES = ("<1B", "1-4B", "4-15B", "15-40B", "40B+")
TASKS = ("chat", "text-generation", "embedding")
_LICENSE_FAMILIES = {
    "apache-2.0": "apache", "mit": "mit", "gemma": "gemma", "falcon-llm": "falcon",
    "bigcode-openrail-m": "openrail",
}


def size_class(params: int) -> str:
    """The size tag a user filters by. Rounded as the size is shown (999.9M shows as 1.0B: "1-4B")."""
    billions = round(params / 1e9, 1)
    for limit, tag in ((1, "<1B"), (4, "1-4B"), (15, "4-15B"), (40, "15-40B")):
        if billions < limit:
            return tag
    return "40B+"


def license_family(license_id: str) -> str:
    if license_id.startswith("llama"):
        return "llama"
    return _LICENSE_FAMILIES.get(license_id, "other")


def tag_order(tag: str) -> tuple[int, int, str]:
    """Tasks first, then sizes smallest first, then everything else alphabetically."""
    if tag in TASKS:
        return (0, TASKS.index(tag), tag)
    if tag in SIZE_CLASSES:
        return (1, SIZE_CLASSES.index(tag), tag)
    return (2, 0, tag)
