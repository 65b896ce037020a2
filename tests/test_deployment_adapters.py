"""Adapters on deployments, end to end on this machine: a real supervising job and built-in server, a base and
adapters built so each changes what the model says, deployed together, loaded and unloaded while it serves
(the same server process throughout), started again with what it served, and what cannot be served refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import select

from catalog.schema import Deployment, DeploymentAdapter, DeploymentState, Model, ModelKind, ModelState
from engine import deployments
from engine.backends import DeploySettings
from engine.deployment_adapters import candidates, serve_adapter, unserve_adapter
from engine.errors import EngineError
from tests.test_deployments import ready, server_process

PROMPT = "modeldeck downloads"


def register_adapter(db, name: str, base_name: str, folder) -> Model:
    with db.write() as session:
        base = session.exec(select(Model).where(Model.name == base_name)).one()
        adapter = Model(name=name, kind=ModelKind.ADAPTER, state=ModelState.READY, source=f"finetune:{base_name}",
                        base_id=base.id, path=str(folder), size_bytes=1000)
        session.add(adapter)
        session.flush()
        session.refresh(adapter)
        return adapter


@pytest.fixture
def adapters(db, tiny, tmp_path):
    """Three adapters of "tiny": rank 4, 4 and 8."""
    from tests.tinymodel import make_tiny_adapter

    made = {}
    for i, (name, rank) in enumerate((("alpha", 4), ("beta", 4), ("gamma", 8))):
        folder = make_tiny_adapter(tiny, tmp_path / name, seed=10 + i, rank=rank)
        made[name] = register_adapter(db, name, "tiny", folder)
    return made


def complete(deployment, model: str):
    from openai import OpenAI

    client = OpenAI(base_url=deployment.endpoint, api_key=deployment.api_key, max_retries=0)
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text


def listed(deployment) -> list[tuple[str, str | None]]:
    from openai import OpenAI

    client = OpenAI(base_url=deployment.endpoint, api_key=deployment.api_key, max_retries=0)
    return [(m.id, m.model_extra.get("parent")) for m in client.models.list()]


def test_a_deployment_serves_its_adapters_takes_more_and_lets_them_go_without_a_restart(db, adapters):
    from openai import NotFoundError

    deployment, _ = deployments.deploy(db, "tiny", DeploySettings(backend="transformers"),
                                       adapters=["alpha", "beta"])
    done = ready(db, deployment.id)
    assert listed(done) == [("tiny", None), ("alpha", "tiny"), ("beta", "tiny")]
    said = {name: complete(done, name) for name in ("tiny", "alpha", "beta")}
    assert len(set(said.values())) == 3, said
    pid = server_process(db, done).pid

    served = serve_adapter(db, "gamma", "tiny")
    assert served.served_name == "gamma" and ("gamma", "tiny") in listed(done)
    said["gamma"] = complete(done, "gamma")
    assert said["gamma"] not in (said["tiny"], said["alpha"], said["beta"])
    assert [name for deployment_, why in candidates(db, "gamma") for name in [deployment_.name] if why is None] == []
    assert "served on 'tiny' already" in candidates(db, "gamma")[0][1]

    unserve_adapter(db, "beta", "tiny")
    with pytest.raises(NotFoundError):
        complete(done, "beta")
    assert complete(done, "alpha") == said["alpha"]  # the others answer as before
    assert server_process(db, done).pid == pid  # no restart
    with db.read() as session:
        rows = session.exec(select(DeploymentAdapter.served_name).where(
            DeploymentAdapter.deployment_id == done.id).order_by(DeploymentAdapter.id)).all()
    assert rows == ["alpha", "gamma"]

    # an adapter it serves cannot be deleted; stopped and started again, it serves what it served then
    from engine.models import delete_model

    with pytest.raises(EngineError, match="'tiny' serves it beside its base: unload it first"):
        delete_model(db, "gamma")
    deployments.stop(db, "tiny")
    unserve_adapter(db, "alpha", "tiny")  # from a stopped one: not served when it starts again
    again, _ = deployments.restart(db, "tiny")
    again = ready(db, again.id)
    assert listed(again) == [("tiny", None), ("gamma", "tiny")]
    assert complete(again, "gamma") == said["gamma"]
    deployments.stop(db, "tiny")


def test_a_deployed_adapter_serves_its_base_beside_it_and_stays(db, adapters):
    deployment, _ = deployments.deploy(db, "alpha", DeploySettings(), adapters=["beta"])
    done = ready(db, deployment.id)
    assert listed(done) == [("alpha-base", None), ("alpha", "alpha-base"), ("beta", "alpha-base")]
    with pytest.raises(EngineError, match="what 'alpha' was deployed as: stop the deployment"):
        unserve_adapter(db, "alpha", "alpha")
    # by the name it is served as, or as a custom model
    assert unserve_adapter(db, "beta", "alpha").served_name == "beta"
    deployments.stop(db, "alpha")


def test_what_cannot_join_a_deployment_is_refused_before_its_server_is_asked(db, adapters, tmp_path):
    from engine import models
    from tests.tinymodel import make_tiny_adapter, make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", seed=4)
    models.import_path(db, other, "other")
    foreign = register_adapter(db, "foreign", "other", make_tiny_adapter(other, tmp_path / "foreign", seed=3))
    with pytest.raises(EngineError, match="'foreign' is an adapter of 'other', not of 'tiny'"):
        deployments.plan(db, "tiny", DeploySettings(), adapters=["foreign"])
    with pytest.raises(EngineError, match="'tiny' is a base model, not an adapter"):
        deployments.plan(db, "other", DeploySettings(), adapters=["tiny"])
    with pytest.raises(EngineError, match="'alpha' would be served as 'tiny', a name the deployment uses"):
        deployments.plan(db, "tiny", DeploySettings(), adapters=[("alpha", "tiny")])

    deployment, _ = deployments.deploy(db, "tiny", DeploySettings(max_lora_rank=4))
    with pytest.raises(EngineError, match="deployment 'tiny' is pending: an adapter joins a Ready deployment"):
        serve_adapter(db, "alpha", "tiny")
    done = ready(db, deployment.id)
    with pytest.raises(EngineError, match="'foreign' is an adapter of 'other'"):
        serve_adapter(db, foreign.name, "tiny")
    with pytest.raises(EngineError, match=r"'gamma' has rank 8, over the maximum LoRA rank of 'tiny' \(4\)"):
        serve_adapter(db, "gamma", "tiny")
    with pytest.raises(EngineError, match="serves a model named 'tiny' already"):
        serve_adapter(db, "alpha", "tiny", served_name="tiny")
    with pytest.raises(EngineError, match="serves no adapter 'beta'"):
        unserve_adapter(db, "beta", "tiny")
    # what only the server can know, in its words: files that are no adapter any more
    (Path(adapters["beta"].path) / "adapter_config.json").unlink()
    with pytest.raises(EngineError, match="could not load 'beta': 'tiny' said: .*no adapter_config.json"):
        serve_adapter(db, "beta", "tiny")
    assert listed(done) == [("tiny", None)]
    with db.read() as session:
        assert session.exec(select(DeploymentAdapter)).all() == []
        assert session.get(Deployment, done.id).state == DeploymentState.READY
    deployments.stop(db, "tiny")


def test_a_finetune_asked_to_serve_when_done_joins_the_deployment_of_its_base(db, tiny, tmp_path):
    from engine import finetune
    from engine.hyperparameters import Hyperparameters
    from tests.conftest import FAST, settled
    from tests.tinydata import write_dataset

    deployment, _ = deployments.deploy(db, "tiny", DeploySettings())
    done = ready(db, deployment.id)
    data = write_dataset(tmp_path, "alpaca")
    plan = finetune.plan(db, "tiny", data, Hyperparameters(**FAST, max_steps=2), "auto")
    with pytest.raises(EngineError, match="no deployment named 'elsewhere'"):
        finetune.start(db, plan, "tuned", serve_on="elsewhere")
    model, _job = finetune.start(db, plan, "tuned", serve_on="tiny")
    assert settled(db, model.id, timeout=180).state == ModelState.READY
    assert said_when_done(db, model.id) == "serving on tiny as 'tuned'"  # (just after it turned Ready)
    assert ("tuned", "tiny") in listed(done) and complete(done, "tuned") is not None

    # asked of a deployment that is gone by the time it is done: the adapter stays Ready, and says why
    deployments.stop(db, "tiny")
    plan = finetune.plan(db, "tiny", data, Hyperparameters(**FAST, max_steps=1), "auto")
    again, _ = deployments.restart(db, "tiny")
    ready(db, again.id)
    model, _job = finetune.start(db, plan, "late", serve_on="tiny")
    deployments.stop(db, "tiny")
    assert settled(db, model.id, timeout=180).state == ModelState.READY
    assert said_when_done(db, model.id).startswith("not served on tiny: deployment 'tiny' is stopped")


def said_when_done(db, model_id: int) -> str:
    from tests.conftest import wait_until

    def said():
        with db.read() as session:
            return session.get(Model, model_id).meta.get("when_done")

    return wait_until(said, 30, what="the adapter to say where it is served")
