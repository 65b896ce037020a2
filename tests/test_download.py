"""Downloads as real job processes against the loopback Hub, with the real huggingface_hub client."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
from pathlib import Path

import pytest
from sqlmodel import select

from catalog.schema import Event, Job, JobState, Model, ModelKind, ModelState
from engine import hub as hubmod
from engine import jobs, models
from engine.errors import EngineError
from tests.conftest import BIG, TINY_FILES, settled, wait_until
from tests.hubserver import HubServer


def job_of(db, job_id: int) -> Job:
    with db.read() as session:
        return session.get(Job, job_id)


def test_download_fetches_weights_only_into_the_hf_cache(db, hub):
    model, job = models.pull(db, "org/tiny")
    assert model.state == ModelState.PENDING and model.kind == ModelKind.BASE
    model = settled(db, model.id)
    assert model.state == ModelState.READY, model.reason
    snapshot = Path(model.path)
    assert snapshot.parent.parent == hubmod.repo_cache_dir("org/tiny")  # the standard cache, not a copy
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                         "tokenizer_config.json"]
    assert (snapshot / "model.safetensors").read_bytes() == TINY_FILES["model.safetensors"]
    contents = {TINY_FILES[n] for n in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")}
    assert model.size_bytes == sum(len(c) for c in contents)  # on disk: files with equal content share a blob
    fetched = {path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path}
    assert not any(p.endswith((".bin", ".pth", ".md")) for p in fetched)
    assert job_of(db, job.id).state == JobState.SUCCEEDED


def test_progress_is_reported_live_with_bytes_rate_and_eta(db, hub):
    hub.bytes_per_second = 10_000_000  # 32 MiB: about three seconds
    model, job = models.pull(db, "org/big")
    settled(db, model.id)
    with db.read() as session:
        events = session.exec(select(Event).where(Event.subject == f"job:{job.id}", Event.kind == "progress")).all()
    done = [e.loads(e.data_json)["bytes_done"] for e in events]
    assert len(done) >= 4 and done == sorted(done)
    assert done[-1] == BIG + len(TINY_FILES["config.json"]) + 2
    mid = [e.loads(e.data_json) for e in events if 1000 < e.loads(e.data_json)["bytes_done"] < BIG]
    assert mid, done  # seen part way, not only at the start and the end
    assert any(d["rate"] and d["eta_s"] is not None for d in mid)
    rates = [d["rate"] for d in mid if d["rate"]]
    assert 2e6 < max(rates) < 30e6  # roughly the throttled speed


def test_a_download_resumes_after_the_job_is_killed(db, hub):
    hub.bytes_per_second = 8_000_000
    model, job = models.pull(db, "org/big")
    wait_until(lambda: (job_of(db, job.id).bytes_done or 0) > 10_000_000, 30, interval=0.02, what="a partial download")
    os.kill(job_of(db, job.id).pid, signal.SIGKILL)
    failed = settled(db, model.id)
    assert failed.state == ModelState.FAILED
    assert "killed by signal SIGKILL" in failed.reason
    partial = list((hubmod.repo_cache_dir("org/big") / "blobs").glob("*.incomplete"))
    assert partial and partial[0].stat().st_size > 10_000_000

    hub.bytes_per_second = None
    model, _ = models.pull(db, "org/big")  # retry in place
    model = settled(db, model.id)
    assert model.state == ModelState.READY, model.reason
    ranges = [r for method, path, r in hub.requests if method == "GET" and path.endswith("model.safetensors")]
    assert ranges[-1] and int(ranges[-1].split("=")[1].rstrip("-")) > 10_000_000  # continued, not restarted
    data = (Path(model.path) / "model.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == hub.repos["org/big"].etag("model.safetensors")


def test_cancel_stops_the_process_and_ends_cancelled(db, hub):
    hub.bytes_per_second = 4_000_000
    model, job = models.pull(db, "org/big")
    wait_until(lambda: (job_of(db, job.id).bytes_done or 0) > 0, 30, what="the download to start")
    pid = job_of(db, job.id).pid
    cancelled = jobs.cancel(db, job.id)
    assert cancelled.state == JobState.CANCELLED
    assert not jobs.process_alive(pid, None)
    with db.read() as session:
        model = session.get(Model, model.id)
    assert model.state == ModelState.FAILED and "cancelled" in model.reason
    with pytest.raises(EngineError, match="already cancelled"):
        jobs.cancel(db, job.id)


def test_gated_repo_without_token_says_what_to_do_and_where(db, hub):
    model, _ = models.pull(db, "org/gated")
    model = settled(db, model.id)
    assert model.state == ModelState.FAILED
    assert "org/gated is gated" in model.reason
    assert "https://huggingface.co/org/gated" in model.reason and "HF_TOKEN" in model.reason


def test_gated_repo_with_a_token_but_no_access_says_to_accept_the_licence(db, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_someoneWithoutAccess")
    hub.repos["org/gated"].gated = "denied"
    model, _ = models.pull(db, "org/gated")
    model = settled(db, model.id)
    assert model.state == ModelState.FAILED
    assert "has no access yet: accept its licence at https://huggingface.co/org/gated" in model.reason


def test_token_is_used_but_never_written_to_the_database_or_a_log(db, hub, monkeypatch):
    secret = "hf_secretTOKENvalue12345"
    monkeypatch.setenv("HF_TOKEN", secret)
    model, job = models.pull(db, "org/gated")  # the loopback Hub lets any bearer token in
    model = settled(db, model.id)
    assert model.state == ModelState.READY, model.reason
    for path in db.path.parent.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_the_token_never_follows_a_redirect_to_a_cdn(db, hub, monkeypatch):
    cdn = HubServer({"org/tiny": hub.repos["org/tiny"]}).start()
    hub.cdn = cdn
    try:
        monkeypatch.setenv("HF_TOKEN", "hf_secretTOKENvalue12345")
        model, _ = models.pull(db, "org/tiny")
        model = settled(db, model.id)
        assert model.state == ModelState.READY, model.reason
        assert any(method == "GET" and "/resolve/" in path for method, path, _ in cdn.requests)
        assert not any(cdn.authorizations), "the token was sent to the CDN"
        assert any(hub.authorizations), "the Hub itself should get the token"
    finally:
        cdn.stop()


def test_unknown_repo_is_not_found(db, hub):
    model, _ = models.pull(db, "org/missing")
    model = settled(db, model.id)
    assert model.state == ModelState.FAILED
    assert "org/missing was not found" in model.reason


def test_offline_without_a_mirror_fails_with_what_to_do(db):
    model, _ = models.pull(db, "org/anything")  # HF_ENDPOINT points at a closed port
    model = settled(db, model.id)
    assert model.state == ModelState.FAILED
    assert model.reason.startswith("offline: cannot reach")
    assert "import it from a folder or GGUF file" in model.reason


def test_offline_falls_back_to_a_configured_mirror_folder(db, tiny_model_dir, isolated):
    (isolated / "mirrors.toml").write_text(f'[[mirror]]\nrepo_id = "org/mirrored"\npath = "{tiny_model_dir}"\n')
    model, _ = models.pull(db, "org/mirrored")
    model = settled(db, model.id)
    assert model.state == ModelState.READY, model.reason
    assert model.path == str(tiny_model_dir) and not model.owns_path
    assert model.source == f"mirror:{tiny_model_dir}"
    assert model.repo_id == "org/mirrored"


def test_a_second_pull_of_the_same_repo_is_refused(db, hub):
    model, _ = models.pull(db, "org/tiny")
    with pytest.raises(EngineError, match="already being downloaded"):
        models.pull(db, "org/tiny")
    settled(db, model.id)
    with pytest.raises(EngineError, match="already downloaded as 'tiny'"):
        models.pull(db, "org/tiny")


@pytest.mark.parametrize("bad", ["nope", "a/b/c", "", "org/has space"])
def test_bad_repo_ids_are_refused_before_anything_starts(db, bad):
    with pytest.raises(EngineError, match="invalid repo id"):
        models.pull(db, bad)
    assert models.job_rows(db) == []


def test_disk_full_is_explained():
    category, reason = hubmod.explain_error(OSError(errno.ENOSPC, "No space left on device"), "org/x")
    assert category == "disk-full" and "disk full" in reason and "retry to resume" in reason


def test_delete_frees_the_cache_but_never_another_models_files(db, hub):
    a, _ = models.pull(db, "org/tiny")
    b, _ = models.pull(db, "org/big")
    a, b = settled(db, a.id), settled(db, b.id)
    freed = models.delete_model(db, "tiny")
    assert freed >= len(TINY_FILES["model.safetensors"])
    assert not hubmod.repo_cache_dir("org/tiny").exists()
    assert (Path(b.path) / "model.safetensors").exists()
    with db.read() as session:
        assert [m.name for m in session.exec(select(Model))] == ["big"]


def test_delete_is_refused_while_something_depends_on_the_model(db, hub):
    base, _ = models.pull(db, "org/tiny")
    settled(db, base.id)
    with db.write() as session:
        session.add(Model(name="my-adapter", kind=ModelKind.ADAPTER, state=ModelState.READY, source="finetune",
                          base_id=base.id))
    with pytest.raises(EngineError, match="cannot delete 'tiny': adapter 'my-adapter' is built on it"):
        models.delete_model(db, "tiny")
    assert hubmod.repo_cache_dir("org/tiny").exists()


def test_deleting_a_pending_download_cancels_it_first(db, hub):
    hub.bytes_per_second = 4_000_000
    model, job = models.pull(db, "org/big")
    wait_until(lambda: (job_of(db, job.id).bytes_done or 0) > 0, 30, what="the download to start")
    models.delete_model(db, "big")
    assert job_of(db, job.id).state == JobState.CANCELLED
    assert not hubmod.repo_cache_dir("org/big").exists()


def test_a_job_whose_process_vanished_is_failed_by_whoever_reads(db, hub):
    hub.bytes_per_second = 4_000_000
    model, job = models.pull(db, "org/big")
    wait_until(lambda: job_of(db, job.id).state == JobState.RUNNING, 30, what="the job to run")
    pid = job_of(db, job.id).pid
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    jobs._children.pop(job.id).wait()  # as if another process (a new dashboard) were reading
    model = settled(db, model.id)
    assert model.state == ModelState.FAILED
    assert "ended without reporting" in model.reason


def test_a_job_killed_outright_says_by_which_signal_to_a_reader_that_did_not_start_it(db, hub):
    """As the out-of-memory killer does: only the job's process, with SIGKILL (it cannot say so itself)."""
    hub.bytes_per_second = 4_000_000
    model, job = models.pull(db, "org/big")
    wait_until(lambda: job_of(db, job.id).state == JobState.RUNNING, 30, what="the job to run")
    keeper = jobs._children.pop(job.id)  # as if another process (a new dashboard) were reading
    os.kill(job_of(db, job.id).pid, signal.SIGKILL)
    keeper.wait(timeout=10)
    model = settled(db, model.id)
    assert model.state == ModelState.FAILED
    assert "the job process was killed by signal SIGKILL (out of memory, or killed by hand)" in model.reason
    assert "ended with status 137" in Path(job_of(db, job.id).log_path).read_text()  # the log says it too


def queued_download(db, cancel_requested: bool = False):
    """A model and its download job as pull() leaves them just before the spawn."""
    from catalog.schema import JobKind

    with db.write() as session:
        model = Model(name="queued", source="hub:org/tiny", repo_id="org/tiny")
        session.add(model)
        session.flush()
        job = jobs.create(session, JobKind.DOWNLOAD, "download org/tiny", model.id, repo_id="org/tiny")
        job.cancel_requested = cancel_requested
    return model, job


def test_a_job_cancelled_before_its_process_claims_it_never_runs(db, hub):
    model, job = queued_download(db)
    assert jobs.cancel(db, job.id).state == JobState.CANCELLED
    jobs.spawn(db, job)  # the process arrives late: it must see the cancellation and stop
    jobs._children[job.id].wait(timeout=30)
    assert job_of(db, job.id).state == JobState.CANCELLED
    with db.read() as session:
        model = session.get(Model, model.id)
    assert model.state == ModelState.FAILED and "cancelled" in model.reason
    assert not hubmod.repo_cache_dir("org/tiny").exists()


def test_a_name_clash_on_download_picks_a_free_name(db, hub, tiny_model_dir):
    models.import_path(db, tiny_model_dir, "tiny")  # the name the download would take
    model, _ = models.pull(db, "org/tiny")
    assert model.name == "org-tiny"
    with pytest.raises(EngineError, match="already exists"):
        models.pull(db, "org/big", name="tiny")  # a name the user chose is never changed


def test_disk_full_before_downloading_fails_the_model_with_the_reason(db, hub, tmp_path, monkeypatch):
    """The job process sees a nearly full disk (shutil.disk_usage patched inside it at start-up)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import shutil\n_real = shutil.disk_usage\n"
        "shutil.disk_usage = lambda path: _real(path)._replace(free=1000)\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    model, _ = models.pull(db, "org/tiny")
    model = settled(db, model.id)
    assert model.state == ModelState.FAILED
    assert model.reason.startswith("disk full while writing to") and "retry to resume" in model.reason


def test_a_job_process_that_finds_a_cancel_request_does_not_start(db, hub):
    """The cancel came after the spawn recorded its pid, before the process claimed the job."""
    model, job = queued_download(db, cancel_requested=True)  # as cancel() leaves it in that window
    jobs.spawn(db, job)
    assert jobs._children[job.id].wait(timeout=30) != 0
    assert job_of(db, job.id).state == JobState.CANCELLED  # recorded by the job process itself
    with db.read() as session:
        assert session.get(Model, model.id).state == ModelState.FAILED
