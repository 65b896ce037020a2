"""Download job: fetch a Hub repo's weights into the standard Hugging Face cache, with live progress.

Resumes partial files left by an interrupted or killed run with HTTP range requests. When the Hub cannot be reached and a local mirror of the repo exists, the model
is taken from the mirror instead.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url, snapshot_download
from huggingface_hub.file_download import http_get
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers

from catalog.schema import Model
from engine import hub
from engine.errors import EngineError
from engine.jobs.harness import JobContext, JobFailure, main
from engine.localmodel import check_gguf, check_model_folder, convert_gguf
from engine.mirrors import find_mirror
from engine.models import models_dir

REPORT_EVERY_S = 0.25
RATE_WINDOW_S = 3.0


class ProgressReporter(threading.Thread):
    """Measures the bytes of the wanted blobs that have arrived and reports bytes, rate and ETA."""

    def __init__(self, ctx: JobContext, repo_id: str, etags: set[str], total: int):
        super().__init__(name="progress", daemon=True)
        self.ctx, self.repo_id, self.etags, self.total = ctx, repo_id, etags, total
        self.finished = threading.Event()
        self.samples: deque[tuple[float, int]] = deque()

    def sample(self) -> None:
        done = min(hub.bytes_on_disk(self.repo_id, self.etags), self.total)
        t = time.monotonic()
        self.samples.append((t, done))
        while self.samples and t - self.samples[0][0] > RATE_WINDOW_S:
            self.samples.popleft()
        t0, d0 = self.samples[0]
        rate = max(done - d0, 0) / (t - t0) if t > t0 else None
        eta = (self.total - done) / rate if rate else None
        self.ctx.report(bytes_done=done, bytes_total=self.total, rate=rate, eta_s=eta,
                        progress=done / self.total if self.total else None)

    def run(self) -> None:
        while not self.finished.wait(REPORT_EVERY_S):
            self.sample()

    def stop(self) -> None:
        """Stop and wait, so no late report lands after the job's final state."""
        self.finished.set()
        if self.is_alive():
            self.join()


@dataclass
class Blob:
    filename: str
    etag: str
    url: str  # after redirects: the Hub's, or a CDN's
    size: int | None


def blob_headers(url: str) -> dict[str, str]:
    """The Hub's headers (the token among them) go to Hub hosts only, never to a CDN's signed URL."""
    headers = build_hf_headers()
    if urlparse(url).netloc != urlparse(hub.endpoint()).netloc and not urlparse(url).netloc.endswith("huggingface.co"):
        headers.pop("authorization", None)
    return headers


def fetch_blob(repo_id: str, blob: Blob) -> None:
    """Download one file into the cache's blobs, resumably.

    huggingface_hub writes each download to a process-unique temporary file and deletes it on failure,
    so a killed process restarts from zero. Here the partial file has a stable name
    (`blobs/<etag>.incomplete`) and the next run continues it with an HTTP range request; once whole it
    becomes `blobs/<etag>`, where huggingface_hub finds it and links it into the snapshot."""
    blobs = hub.repo_cache_dir(repo_id) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    whole = blobs / blob.etag
    if whole.exists():
        return
    partial = blobs / f"{blob.etag}.incomplete"
    resume = partial.stat().st_size if partial.exists() else 0
    if blob.size is not None and resume > blob.size:  # not ours to continue: start again
        partial.unlink()
        resume = 0
    with partial.open("ab") as out:
        http_get(blob.url, out, resume_size=resume, headers=blob_headers(blob.url), expected_size=blob.size,
                 displayed_filename=blob.filename)
    if blob.size is not None and partial.stat().st_size != blob.size:
        raise OSError(f"{blob.filename}: got {partial.stat().st_size} bytes, expected {blob.size}")
    partial.replace(whole)


def blobs_of(pool: ThreadPoolExecutor, repo_id: str, revision: str, files: list[str]) -> list[Blob]:
    """Each distinct content among `files` once (two files may share a blob), largest first."""
    def metadata(name: str) -> Blob:
        meta = get_hf_file_metadata(hf_hub_url(repo_id, name, revision=revision, endpoint=hub.endpoint()),
                                    endpoint=hub.endpoint())
        return Blob(name, meta.etag, meta.location, meta.size)

    unique = {blob.etag: blob for blob in pool.map(metadata, files)}
    return sorted(unique.values(), key=lambda blob: -(blob.size or 0))


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
    pool = ThreadPoolExecutor(max_workers=8)
    reporter = None
    try:
        blobs = blobs_of(pool, repo_id, info.sha, selected)
        etags = {blob.etag for blob in blobs}
        total = sum(blob.size or 0 for blob in blobs)
        ctx.log(f"revision {info.sha}: {len(selected)} files, {total} bytes: {', '.join(selected)}")
        already = min(hub.bytes_on_disk(repo_id, etags), total)
        if already:
            ctx.log(f"resuming: {already} bytes already here")
        hub.check_free_space(total - already)
        reporter = ProgressReporter(ctx, repo_id, etags, total)
        reporter.sample()
        reporter.start()
        list(pool.map(lambda blob: fetch_blob(repo_id, blob), blobs))
        # huggingface_hub links the blobs into the snapshot and records the revision.
        path = snapshot_download(repo_id, revision=info.sha, allow_patterns=selected,
                                 cache_dir=hub.hub_cache_dir(), endpoint=hub.endpoint())
    finally:
        # On failure, files still queued are dropped and the job ends at once (the harness does not
        # wait for transfers in flight); their partial files stay for the retry.
        pool.shutdown(wait=False, cancel_futures=True)
        if reporter is not None:
            reporter.stop()
    reporter.sample()
    ctx.log(f"downloaded to {path}")
    ctx.succeed(path=path, revision=info.sha, size_bytes=total, owns_path=False, source=f"hub:{repo_id}",
                meta_json=_meta(repo_id, info.sha, selected))


def _meta(repo_id: str, revision: str, files: list[str], **more: str) -> str:
    import json

    return json.dumps({"files": files, "revision": revision, "link": hub.model_link(repo_id)} | more, sort_keys=True)


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
        name = session.get(Model, ctx.model_id).name
    target = models_dir(ctx.db) / name
    ctx.update_model(path=str(target), owns_path=True)  # so a delete mid-way also frees the partial output
    with ctx.phase("converting GGUF from local mirror") as counted:
        converted = convert_gguf(location, target, ctx.log, counted)
    ctx.succeed(path=str(target), owns_path=True, source=source, size_bytes=hub.snapshot_size(target),
                meta_json=_meta(repo_id, "mirror", sorted(p.name for p in target.iterdir()), converted_from=converted))
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
            try:
                if from_mirror(ctx, repo_id, ctx.db.path.parent):
                    return
            except EngineError as mirror_error:  # e.g. a malformed mirrors.toml
                raise JobFailure(f"{reason}; and the mirrors cannot be read: {mirror_error}") from mirror_error
            reason += ("; no local mirror of it either: import it from a folder or GGUF file, "
                       "or add a mirror in MODELDECK_HOME/mirrors.toml")
        raise JobFailure(reason) from exc


if __name__ == "__main__":
    main(work)
