"""Download job: fetch a Hub repo's weights into the standard Hugging Face cache, with live progress.

Resumes partial files left by an interrupted or killed run with HTTP range requests. When the Hub cannot be reached and a local mirror of the repo exists, the model
is taken from the mirror instead.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url, snapshot_download
from huggingface_hub.file_download import http_get
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers

from engine import hub
from engine.errors import EngineError
from engine.jobs.harness import JobContext, JobFailure, main
from engine.localmodel import check_gguf, check_model_folder, convert_gguf
from engine.mirrors import find_mirror

REPORT_EVERY_S = 0.25
RATE_WINDOW_S = 3.0


class ProgressReporter(threading.Thread):
    """Measures bytes arrived in the repo's cache folder and reports bytes, rate and ETA."""

    def __init__(self, ctx: JobContext, repo_id: str, total: int):
        super().__init__(name="progress", daemon=True)
        self.ctx, self.repo_id, self.total = ctx, repo_id, total
        self.finished = threading.Event()
        self.samples: deque[tuple[float, int]] = deque()

    def sample(self) -> None:
        done = min(hub.bytes_on_disk(self.repo_id), self.total)
        t = time.monotonic()
        self.samples.append((t, done))
        while self.samples and t - self.samples[0][0] > RATE_WINDOW_S:
            self.samples.popleft()
        t0, d0 = self.samples[0]
        rate = (done - d0) / (t - t0) if t > t0 else None
        eta = (self.total - done) / rate if rate else None
        self.ctx.report(bytes_done=done, bytes_total=self.total, rate=rate, eta_s=eta,
                        progress=done / self.total if self.total else None)

    def run(self) -> None:
        while not self.finished.wait(REPORT_EVERY_S):
            self.sample()


def fetch_blob(repo_id: str, etag: str, url: str, size: int | None, filename: str) -> None:
    """Download one file into the cache's blobs, resumably.

    huggingface_hub writes each download to a process-unique temporary file and deletes it on failure,
    so a killed process restarts from zero. Here the partial file has a stable name
    (`blobs/<etag>.incomplete`) and the next run continues it with an HTTP range request; once whole it
    becomes `blobs/<etag>`, where huggingface_hub finds it and links it into the snapshot."""
    blobs = hub.repo_cache_dir(repo_id) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / etag
    if blob.exists():
        return
    partial = blobs / f"{etag}.incomplete"
    resume = partial.stat().st_size if partial.exists() else 0
    if size is not None and resume > size:  # not ours to continue: start again
        partial.unlink()
        resume = 0
    with partial.open("ab") as out:
        http_get(url, out, resume_size=resume, headers=build_hf_headers(), expected_size=size,
                 displayed_filename=filename)
    if size is not None and partial.stat().st_size != size:
        raise OSError(f"{filename}: got {partial.stat().st_size} bytes, expected {size}")
    partial.replace(blob)


def fetch_blobs(repo_id: str, revision: str, files: list[str]) -> None:
    """Fetch every file's blob, eight at a time, each distinct content once."""
    def metadata(name: str):
        return name, get_hf_file_metadata(hf_hub_url(repo_id, name, revision=revision, endpoint=hub.endpoint()),
                                          endpoint=hub.endpoint())

    with ThreadPoolExecutor(max_workers=8) as pool:
        unique = {meta.etag: (name, meta) for name, meta in pool.map(metadata, files)}
        by_size = sorted(unique.values(), key=lambda item: -(item[1].size or 0))
        list(pool.map(lambda item: fetch_blob(repo_id, item[1].etag, item[1].location, item[1].size, item[0]),
                      by_size))


def fetch(ctx: JobContext, repo_id: str) -> None:
    api = HfApi(endpoint=hub.endpoint())
    ctx.log(f"asking {hub.endpoint()} for the files of {repo_id}")
    info = api.repo_info(repo_id, revision=ctx.params.get("revision"))
    sizes = {f.path: f.size for f in api.list_repo_tree(repo_id, recursive=True, revision=info.sha)
             if isinstance(f, RepoFile)}
    selected = hub.select_files(list(sizes))
    if not any(p.endswith((".safetensors", ".bin")) for p in selected):
        raise JobFailure(f"{repo_id} has no weights in safetensors or PyTorch format "
                         f"(a GGUF-only repo: download the .gguf file and import it)")
    total = sum(sizes[p] for p in selected)
    ctx.log(f"revision {info.sha}: {len(selected)} files, {total} bytes: {', '.join(selected)}")
    already = min(hub.bytes_on_disk(repo_id), total)
    if already:
        ctx.log(f"resuming: {already} bytes already here")
    hub.check_free_space(total - already)
    reporter = ProgressReporter(ctx, repo_id, total)
    reporter.sample()
    reporter.start()
    try:
        fetch_blobs(repo_id, info.sha, selected)
        # huggingface_hub links the blobs into the snapshot and records the revision.
        path = snapshot_download(repo_id, revision=info.sha, allow_patterns=selected,
                                 cache_dir=hub.hub_cache_dir(), endpoint=hub.endpoint())
    finally:
        reporter.finished.set()
    reporter.sample()
    ctx.log(f"downloaded to {path}")
    ctx.succeed(path=path, revision=info.sha, size_bytes=total,
                meta_json=_meta(repo_id, info.sha, selected))


def _meta(repo_id: str, revision: str, files: list[str]) -> str:
    import json

    return json.dumps({"files": files, "revision": revision, "link": hub.model_link(repo_id)}, sort_keys=True)


def from_mirror(ctx: JobContext, repo_id: str, home: Path) -> bool:
    """Take the model from a local mirror; False when there is none."""
    found = find_mirror(repo_id, home)
    if found is None:
        return False
    mirror, location = found
    ctx.log(f"the Hub is unreachable; using the local mirror {mirror.describe()} ({mirror.origin})")
    source = f"mirror:{mirror.describe()}"
    try:
        if location.is_dir():
            check_model_folder(location)
            ctx.succeed(path=str(location), owns_path=False, source=source, size_bytes=hub.snapshot_size(location))
            return True
        check_gguf(location)
    except EngineError as exc:
        raise JobFailure(f"the local mirror of {repo_id} is unusable: {exc}") from exc
    with ctx.db.read() as session:
        from catalog.schema import Model

        name = session.get(Model, ctx.model_id).name
    target = home / "models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    ctx.report(metrics_json='{"phase": "converting GGUF from local mirror"}')
    convert_gguf(location, target, ctx.log)
    ctx.succeed(path=str(target), owns_path=True, source=source, size_bytes=hub.snapshot_size(target),
                meta_json=_meta(repo_id, "mirror", sorted(p.name for p in target.iterdir())))
    return True


def work(ctx: JobContext) -> None:
    repo_id = ctx.params["repo_id"]
    try:
        fetch(ctx, repo_id)
    except JobFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes a reason the user can act on
        category, reason = hub.explain_error(exc, repo_id)
        ctx.log(f"download failed ({category}): {type(exc).__name__}: {exc}")
        if category == "offline":
            if from_mirror(ctx, repo_id, ctx.db.path.parent):
                return
            reason += ("; no local mirror of it either: import it from a folder or GGUF file, "
                       "or add a mirror in MODELDECK_HOME/mirrors.toml")
        raise JobFailure(reason) from exc


if __name__ == "__main__":
    main(work)
