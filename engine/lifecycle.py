"""Every state change of a job, a model or a deployment goes through one function here: it checks the
transition against the entity's table (catalog/states.py), sets the fields, and records the event in the
same transaction, so the dashboard sees the change exactly when it is made and never a state that was
left. Each returns whether the entity moved."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from catalog.schema import (
    DEPLOYMENT_TRANSITIONS,
    JOB_TRANSITIONS,
    MODEL_TRANSITIONS,
    Deployment,
    DeploymentState,
    Job,
    JobState,
    Model,
    ModelState,
    now,
)
from engine.events import record


def move_job(session: Session, job: Job, state: JobState, **fields: Any) -> bool:
    """Move `job` to `state` if allowed; a terminal state is never left."""
    session.refresh(job)
    if state not in JOB_TRANSITIONS[job.state]:
        return False
    job.state = state
    stamp = now()
    if state == JobState.RUNNING:
        job.started_at = stamp
    if state.is_terminal():
        job.finished_at = stamp
        job.eta_s = None
        job.rate = None
    for name, value in fields.items():
        setattr(job, name, value)
    session.add(job)
    message = fields.get("error") or state.value
    record(session, f"job:{job.id}", "state", message, state=state.value, model_id=job.model_id)
    return True


def move_model(session: Session, model: Model, state: ModelState, reason: str | None = None,
               message: str | None = None, **fields: Any) -> bool:
    """Move `model` to `state` (a Failed one with its `reason`); `message` is the event's words."""
    if state not in MODEL_TRANSITIONS[model.state]:
        return False
    model.state, model.reason, model.updated_at = state, reason, now()
    for name, value in fields.items():
        setattr(model, name, value)
    session.add(model)
    record(session, f"model:{model.id}", "state", message or reason or state.value, state=state.value)
    return True


def fail_model(session: Session, model_id: int | None, reason: str) -> None:
    """A Pending model whose work failed (or was cancelled) is Failed, with the reason."""
    model = session.get(Model, model_id) if model_id is not None else None
    if model is not None and model.state == ModelState.PENDING:
        move_model(session, model, ModelState.FAILED, reason)


def move_deployment(session: Session, deployment: Deployment, state: DeploymentState, reason: str | None = None,
                    phase: str | None = None, **fields: Any) -> bool:
    """Move `deployment` to `state`, through a new `phase` while Pending; Failed and Stopped are never left.
    A change of phase alone is recorded as a phase event; an unchanged one records nothing."""
    if state not in DEPLOYMENT_TRANSITIONS[deployment.state]:
        return False
    changed = {name: value for name, value in fields.items() if getattr(deployment, name) != value}
    if state == deployment.state and phase == deployment.phase and reason == deployment.reason and not changed:
        return False
    event = "state" if state != deployment.state else ("phase" if phase != deployment.phase else "updated")
    if event != "updated":  # a Ready one's uptime counts from its last change of state
        deployment.updated_at = now()
    deployment.state, deployment.reason, deployment.phase = state, reason, phase
    for name, value in changed.items():
        setattr(deployment, name, value)
    session.add(deployment)
    record(session, f"deployment:{deployment.id}", event, reason or phase or state.value, state=state.value)
    return True


def settle_deployment(session: Session, deployment_id: int | None, state: DeploymentState,
                      reason: str | None = None, phase: str | None = None) -> None:
    """Move a live (Pending or Ready) deployment to Ready, Failed or Stopped; a finished one stays."""
    deployment = session.get(Deployment, deployment_id) if deployment_id is not None else None
    if deployment is not None:
        move_deployment(session, deployment, state, reason, phase)
