"""The adapters a deployment serves beside its base model, each under its own name (a request names the one it
wants): which they are, which adapter may join which deployment and why not, and loading or unloading one on a
Ready deployment without a restart — through its server's own routes: vLLM's /v1/load_lora_adapter and
/v1/unload_lora_adapter, which the built-in server has too.

A deployment's rows (`DeploymentAdapter`) are what it serves: those it started with are on its server's command
line; one loaded later is loaded again by its supervisor whenever the server comes back (a batch job requeued, a
pod replaced); one unloaded from a stopped deployment is not loaded when it starts again.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx2 as httpx
from sqlmodel import Session, select

from catalog import Database
from catalog.schema import Deployment, DeploymentAdapter, DeploymentState, Model, ModelKind, ModelState
from engine import targets
from engine.backends import DeploySettings, base_served_name, lora_rank, max_adapter_rank
from engine.errors import EngineError
from engine.events import record

LOAD_TIMEOUT_S = 300.0  # reading a large adapter on a busy server


@dataclass
class ServedAdapter:
    served_name: str
    model: Model | None  # None: deleted since (a stopped deployment keeps the name it served it as)


def served_adapters(session: Session, deployment_id: int) -> list[ServedAdapter]:
    rows = session.exec(select(DeploymentAdapter).where(DeploymentAdapter.deployment_id == deployment_id)
                        .order_by(DeploymentAdapter.id))
    return [ServedAdapter(row.served_name, session.get(Model, row.model_id) if row.model_id else None) for row in rows]


def adapters_by_deployment(db: Database, ids: set[int] | None = None) -> dict[int, list[tuple[str, int | None]]]:
    """Each deployment's adapters as (the name it serves it under, the adapter's model id), in the order they
    joined (for the screens and `ps`)."""
    with db.read() as session:
        query = select(DeploymentAdapter).order_by(DeploymentAdapter.id)
        if ids is not None:
            query = query.where(DeploymentAdapter.deployment_id.in_(list(ids)))
        found: dict[int, list[tuple[str, int | None]]] = {}
        for row in session.exec(query):
            found.setdefault(row.deployment_id, []).append((row.served_name, row.model_id))
        return found


def base_of(session: Session, model: Model) -> Model | None:
    """The model whose weights a server of `model` loads: the model itself, or an adapter's base."""
    if model.kind != ModelKind.ADAPTER:
        return model
    return session.get(Model, model.base_id) if model.base_id else None


def model_names(session: Session, deployment: Deployment) -> list[str]:
    """Every name a deployment serves: its base model's, then its adapters'."""
    deployed = session.get(Model, deployment.model_id) if deployment.model_id else None
    base = [base_served_name(deployment.served_name, deployed)] if deployed and deployment.served_name else []
    return base + [a.served_name for a in served_adapters(session, deployment.id)]


def checked_for_deploy(session: Session, model: Model, adapters: list[tuple[Model, str | None]],
                       served_name: str) -> list[tuple[str, Model]]:
    """Adapters to serve with a deployment of `model` from its start, each under its name (default: its own): each
    a Ready adapter of the same base, once, under a name nothing else of the deployment has."""
    from engine.localmodel import check_name

    base = base_of(session, model)
    taken = {served_name, base_served_name(served_name, model)}
    chosen: list[tuple[str, Model]] = []
    for adapter, name in adapters:
        if adapter.id == model.id or any(adapter.id == other.id for _, other in chosen):
            continue  # the deployed adapter is served already; once is enough
        if problem := _unfit(session, adapter, base):
            raise EngineError(problem)
        name = name or adapter.name
        check_name(name, "served name")
        if name in taken:
            raise EngineError(f"the adapter {adapter.name!r} would be served as {name!r}, a name the deployment "
                              "uses already; choose another served name")
        taken.add(name)
        chosen.append((name, adapter))
    return chosen


def _unfit(session: Session, adapter: Model, base: Model | None) -> str | None:
    """Why `adapter` cannot be served on `base`, if it cannot."""
    if adapter.kind != ModelKind.ADAPTER:
        return f"{adapter.name!r} is a {adapter.kind.value} model, not an adapter: deploy it on its own"
    if adapter.state != ModelState.READY:
        return f"the adapter {adapter.name!r} is {adapter.state.value}; serve it once it is Ready"
    if base is None or adapter.base_id != base.id:
        own = session.get(Model, adapter.base_id) if adapter.base_id else None
        return (f"{adapter.name!r} is an adapter of {own.name if own else 'a deleted model'!r}, not of "
                f"{base.name if base else 'this model'!r}")
    return None


def why_not(session: Session, adapter: Model, deployment: Deployment, served_name: str | None = None) -> str | None:
    """Why `adapter` cannot be loaded onto `deployment` now (under `served_name`, default its own name); None if it
    can. Everything that can be known before asking its server."""
    name = served_name or adapter.name
    if deployment.backend == "external":
        return f"{deployment.name!r} is an external endpoint: modeldeck does not run it"
    if deployment.state != DeploymentState.READY:
        return f"deployment {deployment.name!r} is {deployment.state.value}: an adapter joins a Ready deployment"
    deployed = session.get(Model, deployment.model_id) if deployment.model_id else None
    if deployed is None:
        return f"the model deployment {deployment.name!r} serves was deleted"
    if problem := _unfit(session, adapter, base_of(session, deployed)):
        return problem
    served = served_adapters(session, deployment.id)
    if mine := next((s for s in served if s.model is not None and s.model.id == adapter.id), None):
        return f"{adapter.name!r} is served on {deployment.name!r} already (as {mine.served_name!r})"
    if name in model_names(session, deployment):
        return f"{deployment.name!r} serves a model named {name!r} already; serve this one under another name"
    settings = DeploySettings.of(deployment)
    limit = max_adapter_rank(deployment.backend, settings)
    if limit is None:
        return (f"{deployment.name!r} runs vLLM started without adapters, which takes none while it serves: start it "
                "again with a max LoRA rank (or deploy it with this adapter)")
    rank = _rank(adapter)
    if limit and rank > limit:
        return f"{adapter.name!r} has rank {rank}, over the maximum LoRA rank of {deployment.name!r} ({limit})"
    try:
        targets.of_deployment(deployment).adapter_path(deployment, adapter)
    except EngineError as exc:
        return str(exc)
    return None


def _rank(adapter: Model) -> int:
    """An adapter's rank: from its files here, else from how it was trained (a cluster's adapter)."""
    return lora_rank(adapter.path) or int((adapter.meta.get("hyperparameters") or {}).get("rank", 0))


def candidates(db: Database, adapter_name: str | int) -> list[tuple[Deployment, str | None]]:
    """The live deployments of an adapter's base, each with why the adapter cannot be loaded there (None: it can)."""
    with db.read() as session:
        adapter = _adapter(session, adapter_name)
        base = base_of(session, adapter)
        found = []
        for deployment in session.exec(select(Deployment).where(Deployment.state.in_(
                [DeploymentState.PENDING, DeploymentState.READY]), Deployment.backend != "external")
                .order_by(Deployment.created_at)):
            deployed = session.get(Model, deployment.model_id) if deployment.model_id else None
            if deployed is not None and base is not None and getattr(base_of(session, deployed), "id", None) == base.id:
                found.append((deployment, why_not(session, adapter, deployment)))
        return found


def _adapter(session: Session, name: str | int) -> Model:
    from engine.models import find_model

    model = session.get(Model, name) if isinstance(name, int) else find_model(session, name)
    if model is None:
        raise EngineError("that model was deleted")
    return model


def serve_adapter(db: Database, adapter_name: str | int, deployment_name: str | int,
                  served_name: str | None = None) -> ServedAdapter:
    """Load an adapter onto a Ready deployment of its base, without a restart: its server reads it and serves it
    under `served_name` (default: the adapter's name) from then on. Raises EngineError with why not."""
    from engine.deployments import find_deployment
    from engine.localmodel import check_name

    if served_name:
        check_name(served_name, "served name")
    with db.read() as session:
        deployment = find_deployment(session, deployment_name)
        adapter = _adapter(session, adapter_name)
        if problem := why_not(session, adapter, deployment, served_name):
            raise EngineError(problem)
        path = targets.of_deployment(deployment).adapter_path(deployment, adapter)
    name = served_name or adapter.name
    _ask(deployment, "load_lora_adapter", {"lora_name": name, "lora_path": path}, f"load {adapter.name!r}")
    with db.write() as session:
        now = session.get(Deployment, deployment.id)
        if now is None or now.state != DeploymentState.READY:  # stopped meanwhile: nothing is served any more
            raise EngineError(f"deployment {deployment.name!r} was stopped while {adapter.name!r} was loading")
        gone = session.get(Model, adapter.id) is None
        if not gone:
            session.add(DeploymentAdapter(deployment_id=deployment.id, model_id=adapter.id, served_name=name))
            record(session, f"deployment:{deployment.id}", "updated", f"serves the adapter {adapter.name} as {name}",
                   adapter=name)
    if gone:  # deleted while it loaded: its server lets it go again
        _ask(deployment, "unload_lora_adapter", {"lora_name": name}, f"unload {name!r}", gone_is_fine=True)
        raise EngineError(f"{adapter.name!r} was deleted while it loaded; it is not served")
    return ServedAdapter(name, adapter)


def unserve_adapter(db: Database, adapter_name: str, deployment_name: str | int) -> ServedAdapter:
    """Stop serving an adapter (named as a custom model, or as it is served): its server unloads it (requests
    still using it finish; new ones get a 404); from a stopped deployment, it is not loaded when it starts again.
    The adapter a deployment was deployed as is what it serves: stopping the deployment ends that."""
    from engine.deployments import find_deployment

    with db.read() as session:
        deployment = find_deployment(session, deployment_name)
        rows = session.exec(select(DeploymentAdapter).where(DeploymentAdapter.deployment_id == deployment.id)).all()
        models = {row.id: session.get(Model, row.model_id) if row.model_id else None for row in rows}
        row = next((r for r in rows if r.served_name == adapter_name), None) or next(
            (r for r in rows if models[r.id] is not None and models[r.id].name == adapter_name), None)
        if row is None:
            names = ", ".join(repr(r.served_name) for r in rows) or "none"
            raise EngineError(f"deployment {deployment.name!r} serves no adapter {adapter_name!r} (it serves {names})")
        if row.model_id is not None and row.model_id == deployment.model_id:
            raise EngineError(f"{adapter_name!r} is what {deployment.name!r} was deployed as: stop the deployment to "
                              "stop serving it")
    if deployment.state == DeploymentState.READY:
        _ask(deployment, "unload_lora_adapter", {"lora_name": row.served_name}, f"unload {row.served_name!r}",
             gone_is_fine=True)
    elif deployment.state.is_live():
        raise EngineError(f"deployment {deployment.name!r} is {deployment.state.value}: unload it once it is Ready")
    with db.write() as session:
        if (found := session.get(DeploymentAdapter, row.id)) is not None:
            session.delete(found)
            record(session, f"deployment:{deployment.id}", "updated", f"no longer serves the adapter {row.served_name}",
                   adapter=row.served_name)
    return ServedAdapter(row.served_name, models[row.id])


def _ask(deployment: Deployment, route: str, body: dict, doing: str, gone_is_fine: bool = False) -> None:
    """One of the server's adapter routes; EngineError in the server's own words if it refuses."""
    url = (deployment.endpoint or "").rstrip("/") + "/" + route
    try:
        reply = httpx.post(url, json=body, timeout=LOAD_TIMEOUT_S,
                           headers={"Authorization": f"Bearer {deployment.api_key}"})
    except httpx.HTTPError as exc:
        raise EngineError(f"could not {doing}: {deployment.name!r} did not answer at {url} ({exc})") from None
    if reply.status_code == 200 or (gone_is_fine and reply.status_code == 404 and "cannot be found" in reply.text):
        return
    if reply.status_code in (404, 405) and "lora" not in reply.text.lower():  # no such route: vLLM without it
        raise EngineError(f"could not {doing}: {deployment.name!r} has no route for it ({route}; vLLM needs "
                          "VLLM_ALLOW_RUNTIME_LORA_UPDATING, which modeldeck sets when it starts it with adapters)")
    raise EngineError(f"could not {doing}: {deployment.name!r} said: {_message(reply)}")


def _message(reply: httpx.Response) -> str:
    """An error's words, in OpenAI's shape ({"error": {"message"}}), vLLM's older one ({"message"}), or text."""
    try:
        body = reply.json()
        if isinstance(body, dict):
            error = body.get("error")
            text = error.get("message") if isinstance(error, dict) else body.get("message") or error
            if text:
                return str(text)
    except ValueError:
        pass
    return f"HTTP {reply.status_code}: {reply.text[:300]}"


def reload_missing(db: Database, deployment_id: int, log) -> None:
    """Once a server is Ready: load what the deployment serves that it does not (a server that came back — a
    batch job requeued, a pod replaced — knows only those on its command line). Said in the log, never fatal."""
    with db.read() as session:
        deployment = session.get(Deployment, deployment_id)
        if deployment is None or deployment.state != DeploymentState.READY:
            return
        wanted = [(s.served_name, s.model) for s in served_adapters(session, deployment.id)]
    if not wanted:
        return
    try:
        reply = httpx.get((deployment.endpoint or "").rstrip("/") + "/models", timeout=30,
                          headers={"Authorization": f"Bearer {deployment.api_key}"})
        listed = {card.get("id") for card in reply.json().get("data", [])}
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        log(f"could not list what the server serves to load its adapters again: {exc}")
        return
    for name, model in wanted:
        if name in listed:
            continue
        if model is None:
            log(f"the adapter served as {name!r} was deleted: not loaded again")
            continue
        try:
            path = targets.of_deployment(deployment).adapter_path(deployment, model)
            _ask(deployment, "load_lora_adapter", {"lora_name": name, "lora_path": path}, f"load {model.name!r} again")
            log(f"loaded the adapter {model.name!r} again as {name!r}")
        except EngineError as exc:
            log(str(exc))
