"""Settings: every MODELDECK_* variable and the config file, read in one place.

The config file is TOML, at the platform's config directory (`~/.config/modeldeck/config.toml` on Linux)
or where MODELDECK_CONFIG points:

    home = "/data/modeldeck"              # MODELDECK_HOME: the database, logs and converted models
    [slurm]
    enabled = true                        # MODELDECK_SLURM=off: never offer SLURM, even with sbatch here
    workdir = "/scratch/me/modeldeck"     # MODELDECK_SLURM_WORKDIR: run folders the nodes can reach
    [kubernetes]
    vllm_image = "vllm/vllm-openai:v0.11.0"        # MODELDECK_VLLM_IMAGE
    finetune_image = "registry/me/modeldeck:1"     # MODELDECK_FINETUNE_IMAGE
    [keys]                                # a binding's id = the key(s) for it, as Textual names keys
    "custom.deploy" = "P"
    "app.quit" = "q,ctrl+q"

An environment variable wins over the file. `current()` reads both once, and again only when one of
them has changed (a test's monkeypatched variable, a file edited), so callers need not keep it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from catalog.errors import CatalogError

# variable: (table in the file or "" for the top level, key)
VARIABLES = {
    "MODELDECK_HOME": ("", "home"),
    "MODELDECK_SLURM": ("slurm", "enabled"),
    "MODELDECK_SLURM_WORKDIR": ("slurm", "workdir"),
    "MODELDECK_VLLM_IMAGE": ("kubernetes", "vllm_image"),
    "MODELDECK_FINETUNE_IMAGE": ("kubernetes", "finetune_image"),
}
CONFIG_ENV = "MODELDECK_CONFIG"
OFF = ("0", "off", "no", "false")


@dataclass(frozen=True)
class Settings:
    home: str = ""  # empty: the platform's user data directory
    slurm_enabled: bool = True
    slurm_workdir: str = ""
    vllm_image: str = ""
    finetune_image: str = ""
    keys: dict[str, str] = field(default_factory=dict)  # binding id -> keys
    config_path: Path | None = None  # the file read, if there was one


def config_path() -> Path:
    chosen = os.environ.get(CONFIG_ENV, "").strip()
    if chosen:
        return Path(chosen).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("modeldeck")) / "config.toml"


_cache: tuple[tuple, Settings] | None = None


def current() -> Settings:
    """The settings now: from the environment and the config file (re-read only when either changed)."""
    global _cache
    path = config_path()
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = None
    key = (str(path), stamp, *(os.environ.get(name) for name in VARIABLES))
    if _cache is None or _cache[0] != key:
        if stamp is None and os.environ.get(CONFIG_ENV, "").strip():
            raise CatalogError(f"{CONFIG_ENV} names {path}, which does not exist")
        _cache = (key, _read(path if stamp is not None else None))
    return _cache[1]


def _read(path: Path | None) -> Settings:
    table: dict = {}
    if path is not None:
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise CatalogError(f"cannot read the config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise CatalogError(f"the config file {path} is not valid TOML: {exc}") from exc
        _check_names(path, table)

    def value(variable: str) -> str | bool | None:
        if (env := os.environ.get(variable)) is not None and env.strip():
            return env.strip()
        section, name = VARIABLES[variable]
        found = (table.get(section, {}) if section else table).get(name)
        if found is not None and not isinstance(found, str | bool):
            raise CatalogError(f"the config file {path}: {(section + '.') if section else ''}{name} must be a "
                               f"string or true/false, not {found!r}")
        return found.strip() if isinstance(found, str) else found

    def text(variable: str) -> str:
        found = value(variable)
        return found if isinstance(found, str) else ""

    slurm = value("MODELDECK_SLURM")
    keys = table.get("keys", {})
    if not isinstance(keys, dict) or not all(isinstance(k, str) for k in keys.values()):
        raise CatalogError(f"the config file {path}: [keys] maps a binding's id to its keys, like "
                           '"custom.deploy" = "P"')
    return Settings(home=text("MODELDECK_HOME"),
                    slurm_enabled=not (slurm is False or (isinstance(slurm, str) and slurm.lower() in OFF)),
                    slurm_workdir=text("MODELDECK_SLURM_WORKDIR"), vllm_image=text("MODELDECK_VLLM_IMAGE"),
                    finetune_image=text("MODELDECK_FINETUNE_IMAGE"), keys=dict(keys), config_path=path)


def _check_names(path: Path, table: dict) -> None:
    """A misspelt setting would be ignored in silence: name it instead."""
    known: dict[str, set[str]] = {"": {"slurm", "kubernetes", "keys"}}
    for section, name in VARIABLES.values():
        known.setdefault(section, set()).add(name)
    for name, entry in table.items():
        if name not in known[""]:
            raise CatalogError(f"the config file {path}: unknown setting {name!r} (known: "
                               f"{', '.join(sorted(known['']))})")
        if name in known and name != "keys":
            if not isinstance(entry, dict):
                raise CatalogError(f"the config file {path}: {name} is a table ([{name}])")
            for inner in entry:
                if inner not in known[name]:
                    raise CatalogError(f"the config file {path}: unknown setting {name}.{inner} (known: "
                                       f"{', '.join(sorted(known[name]))})")
