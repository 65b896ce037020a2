"""The Hugging Face Hub side of downloads: where the cache is, which files to fetch, what errors mean.

Kept free of network calls so the dashboard can use it; the download job does the fetching.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
from pathlib import Path

from engine.format import human_bytes

WEIGHT_FORMATS = ("*.safetensors", "pytorch_model*.bin")  # in order of preference
SUPPORT_FILES = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py")
SKIPPED_DIRS = ("original/", "onnx/", "openvino/", "coreml/", "gguf/", "flax/", "tf/")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def model_link(repo_id: str) -> str:
    return f"https://huggingface.co/{repo_id}"


def hub_cache_dir() -> Path:
    """The standard Hugging Face cache, resolved from the environment the way huggingface_hub does."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")).expanduser() / "hub"


def repo_cache_dir(repo_id: str) -> Path:
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def select_files(paths: list[str]) -> list[str]:
    """The files worth fetching to run a model: one weight format (safetensors over .bin) plus configs
    and tokenizer files; no GGUF/ONNX/original checkpoints alongside."""
    kept = [p for p in paths if not any(p.startswith(d) or f"/{d}" in p for d in SKIPPED_DIRS)]
    weights: list[str] = []
    for pattern in WEIGHT_FORMATS:
        weights = [p for p in kept if fnmatch.fnmatch(os.path.basename(p), pattern)]
        if weights:
            break
    # Mistral repos ship their native consolidated.safetensors beside the transformers shards.
    transformers_format = [p for p in weights if not os.path.basename(p).startswith("consolidated")]
    if transformers_format:
        weights = transformers_format
    support = [
        p for p in kept
        if any(fnmatch.fnmatch(os.path.basename(p), pat) for pat in SUPPORT_FILES)
        and not (p.endswith(".bin.index.json") and weights and weights[0].endswith(".safetensors"))
    ]
    return sorted(set(weights + support))


def bytes_on_disk(repo_id: str, etags: set[str]) -> int:
    """Bytes of the wanted blobs in the repo's cache, partial downloads (`<etag>[.x].incomplete`)
    included: the download's progress. Other revisions' blobs do not count."""
    total = 0
    try:
        entries = list(os.scandir(repo_cache_dir(repo_id) / "blobs"))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.split(".", 1)[0] in etags:
            try:
                total += entry.stat().st_size
            except FileNotFoundError:  # renamed from .incomplete to whole between listing and stat
                pass
    return total


def snapshot_size(path: Path) -> int:
    """Bytes the files of a snapshot or model folder take (symlinks followed, each blob once)."""
    seen, total = set(), 0
    for file in path.rglob("*"):
        if file.is_file():
            real = file.resolve()
            if real not in seen:
                seen.add(real)
                total += real.stat().st_size
    return total


def delete_from_cache(repo_id: str, revision: str | None) -> int:
    """Free what one downloaded repo revision holds in the cache (and partial downloads of the repo).
    Blobs that another cached revision still uses are kept. Returns the bytes freed."""
    from huggingface_hub import scan_cache_dir

    repo_dir = repo_cache_dir(repo_id)
    if not repo_dir.exists():
        return 0
    freed = 0
    if revision:
        cache = scan_cache_dir(hub_cache_dir())
        hashes = [
            rev.commit_hash for repo in cache.repos if repo.repo_id == repo_id and repo.repo_type == "model"
            for rev in repo.revisions if rev.commit_hash == revision
        ]
        if hashes:
            strategy = cache.delete_revisions(*hashes)
            freed += strategy.expected_freed_size
            strategy.execute()
    for partial in (repo_dir / "blobs").glob("*.incomplete"):
        freed += partial.stat().st_size
        partial.unlink()
    snapshots = repo_dir / "snapshots"
    if not snapshots.exists() or not any(snapshots.iterdir()):
        shutil.rmtree(repo_dir, ignore_errors=True)
    return freed


def token() -> str | None:
    """The user's Hugging Face token, where huggingface_hub finds it: HF_TOKEN, or the file `hf auth login`
    writes (a cluster's pods get it through a Secret)."""
    from huggingface_hub import get_token

    return get_token()


def explain_error(exc: BaseException, repo_id: str) -> tuple[str, str]:
    """(category, one-line reason) for a failed download; categories: gated, not-found, offline,
    disk-full, http, other. The reason says what to do next."""
    from huggingface_hub import errors

    link = model_link(repo_id)
    if isinstance(exc, errors.GatedRepoError):
        if token():
            return "gated", (f"{repo_id} is gated and your Hugging Face account has no access yet: "
                             f"accept its licence at {link}, then retry")
        return "gated", (f"{repo_id} is gated: accept its licence at {link}, then log in "
                         f"(`hf auth login` or set HF_TOKEN) and retry")
    if isinstance(exc, errors.RevisionNotFoundError):
        return "not-found", f"revision not found in {repo_id}"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return "not-found", (f"{repo_id} was not found on {endpoint()} (check the repo id; "
                             f"a private repo also needs a token)")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "disk-full", f"disk full while writing to {hub_cache_dir()}: free some space, then retry to resume"
    if isinstance(exc, errors.HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return "gated", (f"{repo_id} needs authentication: log in (`hf auth login` or set HF_TOKEN) "
                             f"and check access at {link}")
        return "http", f"the Hub answered HTTP {status} for {repo_id}; retry later"
    if _is_offline(exc):
        return "offline", f"offline: cannot reach {endpoint()}"
    return "other", f"{type(exc).__name__}: {exc}"


def _is_offline(exc: BaseException) -> bool:
    from huggingface_hub import errors

    seen: BaseException | None = exc
    while seen is not None:
        name = type(seen).__name__
        if isinstance(seen, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError, TimeoutError)):
            return True
        if name in ("ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "RemoteProtocolError",
                    "ReadError", "NetworkError"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def check_free_space(needed: int, folder: Path | None = None) -> None:
    """Raise ENOSPC before starting when the disk of `folder` (default: the Hub cache) cannot hold
    `needed` more bytes."""
    folder = folder or hub_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"not enough free disk: about {human_bytes(needed)} needed, "
                                    f"{human_bytes(free)} free", str(folder))


BYTES_PER_PARAM = 2  # the Hub's weights are bf16 or fp16 safetensors, nearly always


def download_bytes(params: int | None) -> int | None:
    """About what a download of a model from the Hub is: its weights, in bf16."""
    return params * BYTES_PER_PARAM if params else None
