"""Comparing models side by side: the same prompt — or each prompt of a file in turn — sent to two to four models
at once (a deployment's base or one of its adapters, other deployments, external endpoints), their replies
streamed together with each one's time to first token, tokens/s and token count. Prompts typed one after another
are kept like a conversation: each model answers with its own earlier replies in its context; a file's prompts
are each asked on their own (a set of test prompts, not a dialogue). A model that fails says why in its own
place; the others go on.

Light (no torch): the dashboard's compare pane and `modeldeck compare` use it, over engine.chat's client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from catalog import Database
from catalog.schema import Deployment, DeploymentState
from engine.chat import ChatError, ChatParams, Delta, ReplyStats, Target, stream_chat
from engine.errors import EngineError

MIN_MODELS, MAX_MODELS = 2, 4
MAX_PROMPTS = 1000  # in one file


@dataclass
class Contender:
    """One model of a comparison: how its column is titled, and where its requests go (None: it cannot be asked,
    and `problem` says why)."""

    label: str
    target: Target | None
    problem: str | None = None
    history: list[dict] = field(default_factory=list)  # its own conversation so far (user and its replies)


@dataclass
class Reply:
    label: str
    text: str = ""
    stats: ReplyStats = field(default_factory=ReplyStats)

    @property
    def error(self) -> str | None:
        return self.stats.error

    def as_dict(self) -> dict:
        return {"model": self.label, "reply": self.text, "stats": self.stats.summary(), "error": self.error}


def contenders(db: Database, names: list[str]) -> list[Contender]:
    """The models named, each as a deployment's name (the model it serves), DEPLOYMENT:MODEL (a model it serves
    beside it: an adapter), or a name a single live deployment serves (an adapter's). EngineError for a name that
    is none of these, too few or too many models, or one named twice; a known model that cannot be asked now (a
    stopped deployment) is kept, with why."""
    from engine import endpoints
    from engine.deployments import find_deployment

    if not MIN_MODELS <= len(names) <= MAX_MODELS:
        raise EngineError(f"compare {MIN_MODELS} to {MAX_MODELS} models; {len(names)} named")
    found: list[Contender] = []
    seen: dict[tuple[int, str], str] = {}
    with db.read() as session:
        for name in names:
            deployment, model = _resolve(session, name, find_deployment)
            if (deployment.id, model) in seen:
                raise EngineError(f"{name} and {seen[(deployment.id, model)]} are the same model: compare different ones")
            seen[(deployment.id, model)] = name
            problem = None
            if deployment.backend != "external" and deployment.state != DeploymentState.READY:
                problem = f"deployment {deployment.name!r} is {deployment.state.value}"
            try:
                target = Target(deployment.endpoint or "", endpoints.api_key(deployment), model)
            except EngineError as exc:  # an external endpoint's key that cannot be had
                target, problem = None, str(exc)
            found.append(Contender(name, None if problem else target, problem))
    return found


def _resolve(session, name: str, find_deployment) -> tuple[Deployment, str]:
    from sqlmodel import select

    from engine.deployment_adapters import model_names

    if ":" in name:
        wanted, model = name.split(":", 1)
        deployment = find_deployment(session, wanted)
        served = model_names(session, deployment)
        if deployment.backend != "external" and model not in served:
            raise EngineError(f"{deployment.name!r} serves no model {model!r} (it serves {', '.join(served) or 'none'})")
        return deployment, model
    try:
        deployment = find_deployment(session, name)
        return deployment, deployment.served_name or deployment.name
    except EngineError:
        pass
    live = session.exec(select(Deployment).where(Deployment.state == DeploymentState.READY,
                                                 Deployment.backend != "external")).all()
    serving = [d for d in live if name in model_names(session, d)]
    if len(serving) == 1:
        return serving[0], name
    if serving:
        raise EngineError(f"{name!r} is served by {', '.join(d.name for d in serving)}: name one as DEPLOYMENT:{name}")
    raise EngineError(f"no deployment or served model named {name!r} (modeldeck ps lists them; DEPLOYMENT:MODEL "
                      "names a model a deployment serves beside its own)")


async def ask_all(client, models: list[Contender], prompt: str, params: ChatParams, system: str = "",
                  on_text: Callable[[int, str, ReplyStats], Awaitable[None] | None] | None = None,
                  on_done: Callable[[int, Reply], None] | None = None, alone: bool = False) -> list[Reply]:
    """Send `prompt` to every model at once, each with its own conversation so far (`alone`: on its own, the
    conversation untouched); `on_text(index, text so far, stats)` as each one's reply grows, `on_done(index,
    reply)` as each one ends. A model's failure is its reply's error; the others go on. Each model's conversation
    keeps the prompt and what it answered (a failed reply: nothing of this turn)."""
    async def one(index: int, contender: Contender) -> Reply:
        reply = Reply(contender.label)
        if contender.target is None:
            reply.stats.error, reply.stats.finish = contender.problem, "error"
            if on_done is not None:
                on_done(index, reply)
            return reply
        messages = ([{"role": "system", "content": system}] if system else []) + (
            [] if alone else contender.history) + [{"role": "user", "content": prompt}]
        parts: list[str] = []
        try:
            async for event in stream_chat(client, contender.target, messages, params, reply.stats):
                if isinstance(event, Delta):
                    parts.append(event.text)
                    if on_text is not None and (told := on_text(index, "".join(parts), reply.stats)) is not None:
                        await told
        except ChatError as exc:
            reply.stats.error, reply.stats.finish = str(exc), "error"
        reply.text = "".join(parts)
        if reply.error is None and not alone:
            contender.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply.text}]
        if on_done is not None:
            on_done(index, reply)
        return reply

    return list(await asyncio.gather(*(one(i, c) for i, c in enumerate(models))))


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a JSON Lines file, in order: each line a JSON string, or an object with "prompt" (or "text",
    or "instruction" and "input", or "messages" whose last user turn is the prompt). A bad line raises EngineError
    with its number."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EngineError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EngineError(f"{path}: cannot read it ({exc})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path.name}, line {number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise EngineError(f"{where}: not valid JSON ({exc})") from None
        prompt = _prompt_of(record)
        if not prompt:
            raise EngineError(f"{where}: no prompt: give a JSON string, or an object with 'prompt', 'text', "
                              "'instruction' or 'messages'")
        prompts.append(prompt)
        if len(prompts) > MAX_PROMPTS:
            raise EngineError(f"{path.name}: more than {MAX_PROMPTS} prompts; split the file")
    if not prompts:
        raise EngineError(f"{path}: no prompts in it")
    return prompts


def _prompt_of(record) -> str | None:
    if isinstance(record, str):
        return record.strip() or None
    if not isinstance(record, dict):
        return None
    for key in ("prompt", "text"):
        if isinstance(record.get(key), str) and record[key].strip():
            return record[key].strip()
    if isinstance(record.get("instruction"), str) and record["instruction"].strip():
        extra = record.get("input")
        return record["instruction"].strip() + (f"\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip()
                                                else "")
    turns = record.get("messages") or record.get("conversations")
    if isinstance(turns, list):
        users = [t.get("content") or t.get("value") for t in turns if isinstance(t, dict)
                 and (t.get("role") or t.get("from")) in ("user", "human")]
        users = [u for u in users if isinstance(u, str) and u.strip()]
        return users[-1].strip() if users else None
    return None
