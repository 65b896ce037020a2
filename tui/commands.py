"""The `modeldeck` verbs: each prints a readable table, or JSON with --json, and raises EngineError with
a one-line reason on failure. No logic lives here that the dashboard lacks: both call engine functions."""

from __future__ import annotations

import json
import shutil
import sys
import time
from typing import Any

from sqlmodel import select

from catalog.schema import Job, JobKind, JobState, Model, ModelState
from catalog.tags import tag_order
from engine import jobs, models
from engine.community import haystack, matches, terms
from engine.errors import EngineError
from engine.format import (
    backend_label,
    delete_consequence,
    deployment_state_text,
    human_bytes,
    human_params,
    human_time,
    job_progress,
    listening_on,
    meta_label,
    meta_value,
    model_location,
    state_text,
)
from engine.logs import follow


def _model_dict(row: models.ModelRow) -> dict[str, Any]:
    m = row.model
    data = {
        "id": m.id, "name": m.name, "kind": m.kind.value, "state": m.state.value, "reason": m.reason,
        "source": m.source, "repo_id": m.repo_id, "revision": m.revision, "path": m.path,
        "size_bytes": m.size_bytes, "base": row.base_name, "created_at": m.created_at, "meta": m.meta,
    }
    data["job"] = _job_dict(row.job) if row.job else None
    return data


def _job_dict(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "kind": job.kind.value, "state": job.state.value, "title": job.title,
        "model_id": job.model_id, "progress": job.progress, "bytes_done": job.bytes_done,
        "bytes_total": job.bytes_total, "rate": job.rate, "eta_s": job.eta_s, "error": job.error,
        "pid": job.pid, "log_path": job.log_path, "created_at": job.created_at, "finished_at": job.finished_at,
        "metrics": job.loads(job.metrics_json, {}),
    }


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _emit(args, data: Any, table: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else table)


def cmd_catalog(args, db) -> int:
    wanted, query = set(args.tag or []), terms(" ".join(args.query))
    every = models.community_rows(db)
    known = {tag for r in every for tag in r.entry.tags}
    if unknown := wanted - known:
        raise EngineError(f"unknown tag {', '.join(sorted(unknown))}; tags: {', '.join(sorted(known, key=tag_order))}")
    rows = [r for r in every if matches(haystack(r.entry), r.entry.tags, query, wanted)]
    data = [{"repo_id": r.entry.repo_id, "name": r.entry.name, "description": r.entry.description,
             "tags": r.entry.tags, "params": r.entry.params, "license": r.entry.license, "gated": r.entry.gated,
             "link": r.entry.link, "downloaded_as": r.model.name if r.model else None} for r in rows]
    table = _table(["repo id", "size", "tags", "custom model"],
                   [[r.entry.repo_id, human_params(r.entry.params), ",".join(r.entry.tags),
                     f"{r.model.name} ({r.model.state.value})" if r.model else ""] for r in rows])
    _emit(args, data, table)
    return 0


def cmd_ls(args, db) -> int:
    from catalog.schema import Deployment
    from catalog.states import LIVE_DEPLOYMENT_STATES

    rows = models.model_rows(db)
    with db.read() as session:  # as the dashboard says it: a model a live deployment serves is "deployed"
        served = set(session.exec(select(Deployment.model_id).where(Deployment.state.in_(LIVE_DEPLOYMENT_STATES),
                                                                    Deployment.backend != "external")).all())

    def state(r) -> str:
        return _clip(state_text(r.model.state, r.model.reason, r.job, cancelled=r.cancelled,
                                deployed=r.model.id in served), 70)

    table = _table(["name", "kind", "state", "size", "base", "source", "created"],
                   [[r.model.name, r.model.kind.value, state(r), human_bytes(r.model.size_bytes),
                     r.base_name or "", r.model.source, human_time(r.model.created_at)] for r in rows])
    _emit(args, [_model_dict(r) for r in rows], table)
    return 0


def cmd_show(args, db) -> int:
    row = models.get_model(db, args.name)
    m = row.model
    fields = [
        ("name", m.name), ("kind", m.kind.value), ("state", state_text(m.state, m.reason, row.job, "long", row.cancelled)),
        ("source", m.source), ("repo", m.repo_id), ("revision", m.revision), ("path", model_location(m)),
        ("size", human_bytes(m.size_bytes)), ("base", row.base_name), ("created", human_time(m.created_at)),
        *((meta_label(key).lower(), meta_value(key, v)) for key, v in m.meta.items()),
    ]
    if row.job:
        fields.append(("job", f"{row.job.id} {row.job.kind.value}, log {row.job.log_path}"))
    width = max(len(k) for k, _ in fields)
    indent = "\n" + " " * (width + 2)  # a value of several lines (the evaluations) under itself
    _emit(args, _model_dict(row), "\n".join(f"{k:>{width}}: {str(v).replace(chr(10), indent)}" for k, v in fields
                                            if v not in (None, "")))
    return 0


def _wait(db, model_id: int, quiet: bool) -> int:
    """Follow a Pending model until it settles, a progress line on stderr when it is a terminal."""
    show = sys.stderr.isatty() and not quiet
    while True:
        jobs.reconcile(db)
        row = models.model_rows(db, {model_id})
        if not row:
            raise EngineError("the model was deleted while waiting")
        row = row[0]
        if row.model.state != ModelState.PENDING:
            if show:
                sys.stderr.write("\r\033[K")
            return 0 if row.model.state == ModelState.READY else 1
        if show and row.job:
            line = f"{row.model.name}: {job_progress(row.job, 'long')}"
            sys.stderr.write("\r\033[K" + _clip(line, shutil.get_terminal_size().columns - 1))
            sys.stderr.flush()
        time.sleep(0.5)


def _started(args, db, model: Model, job: Job | None) -> int:
    code = _wait(db, model.id, args.json) if args.wait else 0
    row = models.model_rows(db, {model.id})[0]
    if row.model.state == ModelState.FAILED:
        print(f"modeldeck: {row.model.name}: {row.model.reason}", file=sys.stderr)
    elif not args.json:
        verb = "ready" if row.model.state == ModelState.READY else f"started (job {job.id}; `modeldeck ls` shows progress)"
        print(f"{row.model.name}: {verb}")
    if args.json:
        _emit(args, _model_dict(row), "")
    return code


def cmd_pull(args, db) -> int:
    model, job = models.pull(db, args.repo_id, args.name)
    return _started(args, db, model, job)


def cmd_import(args, db) -> int:
    model, job = models.import_path(db, args.path, args.name)
    return _started(args, db, model, job)


def cmd_retry(args, db) -> int:
    model, job = models.retry(db, args.name)
    return _started(args, db, model, job)


def _target_options(args) -> dict[str, str]:
    """The target options given as flags (--image, --account, ...): each target checks its own."""
    from engine.targets import option_fields

    return {option.name: value for option, _ in option_fields()
            if (value := getattr(args, option.name, None)) is not None}


def _dry_run_needs_a_target(args) -> None:
    from engine.targets import spec_syntax

    if args.dry_run and not args.target:
        raise EngineError(f"--dry-run prints what a target would run: give --target {spec_syntax()}")


def cmd_finetune(args, db) -> int:
    from engine import finetune

    values = {f.name: getattr(args, f.name) for f in finetune.Hyperparameters.fields()
              if getattr(args, f.name) is not None}
    _dry_run_needs_a_target(args)
    options = _target_options(args)
    plan = finetune.plan(db, args.base, args.dataset, finetune.Hyperparameters(**values), args.gpus,
                         target=args.target, options=options, offline=args.dry_run)
    if not args.json:
        print(plan.summary(), file=sys.stderr)
    if args.dry_run:  # what its target would apply or submit, touching nothing
        import dataclasses

        with db.read() as session:
            name = args.name or finetune.default_name(session, plan.base, plan.dataset.path)
        target = plan.placement.target
        text, note = target.dry_run_finetune(name, plan.placement, plan.base, plan.dataset.path,
                                             dataclasses.asdict(plan.hyperparameters),
                                             target.options(options, "finetune"))
        sys.stdout.write(text)
        print(note, file=sys.stderr)
        return 0
    model, job = finetune.start(db, plan, args.name, args.serve_on)
    return _started(args, db, model, job)


def cmd_merge(args, db) -> int:
    from engine import finetune

    model, job = finetune.merge(db, args.adapter, args.name)
    return _started(args, db, model, job)


def _deployment_dict(d, adapters: list[str] | None = None) -> dict[str, Any]:
    return {"id": d.id, "name": d.name, "model_id": d.model_id, "backend": d.backend, "state": d.state.value,
            "phase": d.phase, "reason": d.reason, "endpoint": d.endpoint, "served_name": d.served_name,
            "adapters": adapters or [], "api_key": d.api_key, "gpus": d.gpus, "job_id": d.job_id,
            "created_at": d.created_at, "settings": d.loads(d.settings_json, {})}


def cmd_deploy(args, db) -> int:
    import dataclasses

    from engine import deployments
    from engine.backends import DeploySettings

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DeploySettings)
              if f.name not in ("target", "options") and getattr(args, f.name, None) is not None}
    settings = DeploySettings(**values, target=args.target or "", options=_target_options(args))
    if args.dry_run:
        return _deploy_dry_run(args, db, settings)
    checked = deployments.plan(db, args.model, settings, name=args.name, adapters=args.adapters or [])
    return _start_deployment(args, db, checked, args.replace)


def cmd_start(args, db) -> int:
    from engine import deployments

    return _start_deployment(args, db, deployments.replan(db, args.deployment))


def _start_deployment(args, db, checked, replace: bool = False) -> int:
    """Start a checked plan, say where, and (--wait) follow it to Ready or Failed."""
    from engine import deployments
    from engine.deployment_adapters import model_names

    try:
        deployment, _job = deployments.start(db, checked, args.force, replace)
    except EngineError as exc:
        raise EngineError(f"{exc} (--force)" if "does not fit" in str(exc) else str(exc)) from None
    if not args.json:
        for warning in checked.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        where = f"at {deployment.endpoint}" if deployment.endpoint else f"({checked.serving.summary})"
        print(f"{deployment.name}: starting with {deployment.backend} {where}"
              + (f"; {checked.fit.describe()}" if checked.fit else ""), file=sys.stderr)
    if args.wait:
        while True:
            jobs.reconcile(db)
            deployment = deployments.deployment_rows(db, {deployment.id})[0]
            if deployment.state.value != "pending":
                break
            if sys.stderr.isatty() and not args.json:
                sys.stderr.write("\r\033[K" + _clip(f"{deployment.name}: {deployment.phase}", 70))
                sys.stderr.flush()
            time.sleep(0.5)
        if sys.stderr.isatty() and not args.json:
            sys.stderr.write("\r\033[K")
    bound, exposed = listening_on(deployment)
    with db.read() as session:
        names = model_names(session, deployment)
    table = (f"{deployment.name}: {deployment_state_text(deployment.state, deployment.phase, deployment.reason, deployment.ends_at)}\n"
             f"endpoint: {deployment.endpoint or '(once it runs: modeldeck ps)'}\n"
             f"{'models:  ' if len(names) > 1 else 'model:   '} {', '.join(names) or deployment.served_name}\n"
             f"api key:  {deployment.api_key}"
             + (f"\nlistening on {bound}: reachable from other machines (with the API key)" if exposed else ""))
    _emit(args, _deployment_dict(deployment, names[1:]), table)
    return 1 if deployment.state.value == "failed" else 0


def _sampling_params(args, temperature: str = ""):
    """The sampling flags chat and compare take (tui.cli), as engine.chat.ChatParams; `temperature`: the default
    where none is given ("": ChatParams' own). EngineError naming each bad value."""
    from engine.chat import ChatParams

    params, errors = ChatParams.from_strings({"temperature": args.temperature or temperature, "top_p": args.top_p or "",
                                              "max_tokens": args.max_tokens or ""})
    if errors:
        raise EngineError("; ".join(errors.values()))
    return params


def cmd_chat(args, db) -> int:
    """One streamed reply to stdout; its numbers to stderr."""
    import asyncio

    from engine import deployments, endpoints
    from engine.chat import Delta, Target, new_client, stream_chat

    params = _sampling_params(args)
    with db.read() as session:
        dep = deployments.find_deployment(session, args.deployment)
    if dep.state.value != "ready":
        raise EngineError(f"{dep.name} is {dep.state.value}; chat needs it Ready (see `modeldeck ps`)")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise EngineError("the prompt is empty")
    target = Target(dep.endpoint, endpoints.api_key(dep), dep.served_name)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}]

    async def reply() -> None:
        parts = []
        async with new_client() as client:
            async for event in stream_chat(client, target, messages, params):
                if isinstance(event, Delta):
                    parts.append(event.text)
                    if not args.json:  # streamed as it comes; with --json, one object at the end
                        sys.stdout.write(event.text)
                        sys.stdout.flush()
                elif args.json:
                    print(json.dumps({"deployment": dep.name, "model": dep.served_name, "reply": "".join(parts),
                                      "stats": event.stats.summary()}))
                else:
                    sys.stdout.write("\n")
                    print(f"({event.stats.describe()})", file=sys.stderr)

    asyncio.run(reply())
    return 0


def cmd_compare(args, db) -> int:
    """Each prompt to every model at once; their replies, each with its numbers, once all have answered (a
    progress line on stderr meanwhile). Exit status 1 when no model answered at all."""
    import asyncio

    from engine import compare
    from engine.chat import new_client

    params = _sampling_params(args, temperature="0")  # greedy: replies differ by their models, not by chance
    if args.prompt is not None and args.prompts is not None:
        raise EngineError("give --prompt or --prompts, not both")
    prompts = compare.read_prompts(args.prompts) if args.prompts else [
        sys.stdin.read() if args.prompt == "-" else args.prompt]
    if not all(p.strip() for p in prompts):
        raise EngineError("the prompt is empty")
    models = compare.contenders(db, args.models)
    show = sys.stderr.isatty() and not args.json
    rounds = []

    async def run() -> None:
        async with new_client() as client:
            for number, prompt in enumerate(prompts, 1):
                if show:
                    sys.stderr.write(f"\r\033[Kprompt {number} of {len(prompts)}…")
                    sys.stderr.flush()
                rounds.append((prompt, await compare.ask_all(client, models, prompt, params, args.system,
                                                             alone=args.prompts is not None)))
        if show:
            sys.stderr.write("\r\033[K")

    asyncio.run(run())
    lines = []
    for prompt, replies in rounds:
        lines.append(f"» {prompt}")
        for reply in replies:
            said = f"failed: {reply.error}" if reply.error else reply.stats.describe()
            lines += [f"── {reply.label} · {said}", *([reply.text] if reply.text else []), ""]
    _emit(args, [{"prompt": prompt, "replies": [r.as_dict() for r in replies]} for prompt, replies in rounds],
          "\n".join(lines).rstrip())
    return 0 if any(r.error is None for _, replies in rounds for r in replies) else 1


def cmd_endpoint(args, db) -> int:
    from engine import deployments, endpoints

    if args.action == "rm":
        with db.read() as session:
            dep = deployments.find_deployment(session, args.name)
        if dep.backend != "external":
            raise EngineError(f"{dep.name} is not an external endpoint; stop it with `modeldeck stop`")
        deployments.delete(db, dep.id)
        _emit(args, {"removed": dep.name}, f"{dep.name}: removed")
        return 0
    if not args.url:
        raise EngineError("give the endpoint's base URL: modeldeck endpoint add NAME URL")
    key = None
    if args.key_stdin:
        import getpass

        key = getpass.getpass("API key (not shown): ") if sys.stdin.isatty() else sys.stdin.readline().strip()
    deployment = endpoints.add(db, args.name, args.url, args.model, args.key_env, key)
    _emit(args, _deployment_dict(deployment), f"{deployment.name}: ready at {deployment.endpoint} "
          f"(model {deployment.served_name})")
    return 0


def _deploy_dry_run(args, db, settings) -> int:
    """`deploy --target … --dry-run`: what the target would apply or submit (manifests, a batch script)."""
    import dataclasses

    from engine import targets
    from engine.deployment_adapters import checked_for_deploy
    from engine.models import find_model

    _dry_run_needs_a_target(args)
    if problems := settings.problems():
        raise EngineError("; ".join(problems.values()))
    target = targets.resolve(settings.target)
    settings = dataclasses.replace(settings, options=target.options(settings.options, "deploy"))
    with db.read() as session:
        model = find_model(session, args.model)
        base = session.get(Model, model.base_id) if model.base_id else None
        served = settings.served_name or model.name
        adapters = ([(served, model)] if model.kind.value == "adapter" else []) + checked_for_deploy(
            session, model, [(find_model(session, a), None) for a in args.adapters or []], served)
    text, note = target.dry_run_deploy(args.name or served, model, base, settings, adapters)
    sys.stdout.write(text)
    print(note, file=sys.stderr)
    return 0


def cmd_ps(args, db) -> int:
    from engine import deployments
    from engine.deployment_adapters import adapters_by_deployment

    rows = deployments.deployment_rows(db)
    adapters = {dep_id: [name for name, _ in served] for dep_id, served in adapters_by_deployment(db).items()}

    def endpoint(d) -> str:
        bound, exposed = listening_on(d)
        open_now = exposed and d.backend != "external" and d.state.is_live()
        return (d.endpoint or "") + (f" (open on {bound})" if open_now else "")

    def served(d) -> str:  # the adapters beside the base (a deployed adapter is the deployment itself)
        extra = [name for name in adapters.get(d.id, []) if name != d.served_name]
        return ", ".join(extra)

    table = _table(["name", "backend", "state", "endpoint", "gpus", "adapters", "since"],
                   [[d.name, backend_label(d.backend), _clip(deployment_state_text(d.state, d.phase, d.reason, d.ends_at), 60),
                     endpoint(d), d.gpus or "", _clip(served(d), 40), human_time(d.created_at)] for d in rows])
    _emit(args, [_deployment_dict(d, adapters.get(d.id, [])) for d in rows], table)
    return 0


def cmd_eval(args, db) -> int:
    """Start the evaluation, follow it (its phase on stderr), print the result; ctrl+c cancels it."""
    from engine import evaluate

    checked = evaluate.plan(db, args.model, args.dataset)
    job = evaluate.start(db, checked)
    show = sys.stderr.isatty() and not args.json
    try:
        while not job.state.is_terminal():
            time.sleep(0.5)
            jobs.reconcile(db)
            job = jobs.get(db, job.id)
            if show:
                line = f"{checked.model.name}: {job_progress(job, 'long')}"
                sys.stderr.write("\r\033[K" + _clip(line, shutil.get_terminal_size().columns - 1))
                sys.stderr.flush()
    except KeyboardInterrupt:
        jobs.cancel(db, job.id)
        raise
    finally:
        if show:
            sys.stderr.write("\r\033[K")
    if job.state != JobState.SUCCEEDED:
        raise EngineError(f"evaluating {checked.model.name} {job.state.value}: {job.error or 'see its log'} "
                          f"(modeldeck logs {job.id})")
    result = job.loads(job.metrics_json, {})["evaluation"]
    _emit(args, result, f"{checked.model.name}: {evaluate.describe(result)}")
    return 0


def cmd_serve_adapter(args, db) -> int:
    from engine.deployment_adapters import serve_adapter

    served = serve_adapter(db, args.adapter, args.deployment, args.served_name)
    _emit(args, {"deployment": args.deployment, "adapter": served.model.name, "served_name": served.served_name},
          f"{args.deployment}: serves {served.model.name} as {served.served_name!r}")
    return 0


def cmd_unserve_adapter(args, db) -> int:
    from engine.deployment_adapters import unserve_adapter

    gone = unserve_adapter(db, args.adapter, args.deployment)
    _emit(args, {"deployment": args.deployment, "adapter": gone.model.name if gone.model else None,
                 "served_name": gone.served_name, "removed": True},
          f"{args.deployment}: no longer serves {gone.served_name!r}")
    return 0


def cmd_stop(args, db) -> int:
    from engine import deployments

    with db.read() as session:
        deployment = deployments.find_deployment(session, args.deployment)
    if (deployment.backend != "external" and deployment.state.is_live()) or not args.rm:
        deployment = deployments.stop(db, deployment.id)
    if args.rm:
        deployments.delete(db, deployment.id)
        _emit(args, _deployment_dict(deployment) | {"removed": True}, f"{deployment.name}: stopped and removed")
        return 0
    _emit(args, _deployment_dict(deployment), f"{deployment.name}: {deployment.state.value}")
    return 0


def cmd_rm(args, db) -> int:
    plan = models.delete_plan(db, args.name)
    name = plan.model.name
    if plan.blockers:
        raise EngineError(f"cannot delete {name!r}: " + "; ".join(plan.blockers))
    if not args.yes:
        if not sys.stdin.isatty():
            raise EngineError(f"refusing to delete {name!r} without --yes (deletion is irreversible)")
        answer = input(f"Delete {name!r}? {delete_consequence(plan)} This cannot be undone. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("kept")
            return 1
    freed = models.delete_model(db, name)
    from engine import targets

    home = targets.home_of(plan.model)
    gone = plan.ended_deployments  # their records go with the model: said, as the question said it
    also = (f"; with it its ended deployment{'s' if len(gone) > 1 else ''} {', '.join(gone)} and their chats"
            if gone else "")
    _emit(args, {"deleted": name, "freed_bytes": freed, "deployments_deleted": gone}, f"deleted {name} " + (
        f"(with what {home.label} kept of it)" if home.owns_files(plan.model) else f"(freed {human_bytes(freed)})")
        + also)
    return 0


def cmd_gpus(args, db) -> int:
    from dataclasses import asdict

    from engine.format import gpu_usage, held_by
    from engine.gpus import read_ledger

    states = read_ledger(db)
    if not states and not args.json:
        print("no NVIDIA GPU here (NVML finds no driver): work on this machine runs on the CPU")
        return 0
    table = _table(["gpu", "name", "util", "memory", "temp", "power", "held by"],
                   [[str(s.gpu.index), s.gpu.name, *gpu_usage(s.gpu), held_by(s)] for s in states])
    _emit(args, [asdict(s.gpu) | {"nvlink": sorted(s.gpu.nvlink), "holders": [asdict(h) for h in s.holders]}
                 for s in states], table)
    return 0


def cmd_jobs(args, db) -> int:
    from catalog.schema import Deployment

    rows = models.job_rows(db)
    with db.read() as session:
        names = dict(session.exec(select(Model.id, Model.name)).all())
        served = {d.id: d for d in session.exec(select(Deployment)).all()}

    def what(job: Job) -> tuple[str, str]:
        """What the job is for and how it is doing: a server's deployment, with the deployment's state."""
        deployment = served.get(job.params.get("deployment_id")) if job.kind == JobKind.SERVE else None
        if deployment is not None:
            state = deployment_state_text(deployment.state, deployment.phase, None, deployment.ends_at)
            return f"deployment {deployment.name}", state if not job.state.is_terminal() else ""
        return names.get(job.model_id, "—"), job_progress(job) if not job.state.is_terminal() else ""

    table = _table(["id", "kind", "state", "for", "progress", "error", "created"],
                   [[str(j.id), j.kind.value, j.state.value, *what(j), _clip(j.error or "", 60),
                     human_time(j.created_at)] for j in rows])
    _emit(args, [_job_dict(j) for j in rows], table)
    return 0


def cmd_logs(args, db) -> int:
    job = _job_of(db, args.job)
    if not job.log_path:
        raise EngineError(f"job {job.id} has no log yet")

    def finished() -> bool:  # without --follow: once through the file
        if not args.follow:
            return True
        jobs.reconcile(db)
        return jobs.get(db, job.id).state.is_terminal()

    collected = []
    for lines in follow(job.log_path, stop=finished):
        if args.json:
            collected += lines
        else:
            print("\n".join(lines), flush=True)
    if args.json:
        _emit(args, {"job": job.id, "log_path": job.log_path, "lines": collected}, "")
    return 0


def _job_of(db, ref: str) -> Job:
    """A job by its id; a deployment's supervising job by the deployment's name; or a custom model's
    latest job by the model's name (a deployment is named after its model unless told otherwise, and
    then its server's log is the one wanted)."""
    from engine import deployments

    if ref.isdigit():
        return jobs.get(db, int(ref))
    with db.read() as session:
        try:
            return jobs.get(db, deployments.find_deployment(session, ref).job_id)
        except EngineError:
            pass
    with db.read() as session:
        model = models.find_model(session, ref)
    job = jobs.latest_for_model(db, model.id)
    if job is None:
        raise EngineError(f"no job has run for {model.name!r} (it was imported in place)")
    return job


def cmd_cancel(args, db) -> int:
    from catalog.schema import Deployment
    from engine import targets

    job = _job_of(db, args.job)
    if job.kind == JobKind.SERVE and not job.state.is_terminal():
        with db.read() as session:
            deployment = session.get(Deployment, job.params.get("deployment_id") or -1)
        if deployment is not None and deployment.state.is_live():  # the dashboard asks first; here, say how
            raise EngineError(f"job {job.id} serves the deployment {deployment.name!r}: stop it with "
                              f"`modeldeck stop {deployment.name}`")
    if job.state == JobState.RUNNING and jobs.supervised(job):
        print(f"cancelling job {job.id} ({job.kind.value}): it stops at its next safe point, within "
              f"{targets.of_job(job).STOP_DEADLINE_S:.0f} s…", file=sys.stderr, flush=True)
    job = jobs.cancel(db, job.id)
    _emit(args, _job_dict(job), f"job {job.id}: {job.state.value}")
    return 0
