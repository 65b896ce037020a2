"""Chat conversations, kept per deployment in the catalog database to reopen later.

A conversation holds its settings (system prompt, temperature, top-p, max tokens) and its messages; an
assistant message holds the numbers of its reply (ReplyStats). Deleting a deployment deletes its
conversations (the database cascades).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import select

from catalog import Database
from catalog.schema import ChatMessage, Conversation, now
from engine.chat import PARAM_LIMITS, ChatParams, ReplyStats
from engine.errors import EngineError

TITLE_CHARS = 60


@dataclass
class Turn:
    """One message as the pane shows it and the client sends it."""

    role: str  # user | assistant
    content: str
    stats: ReplyStats | None = None
    id: int | None = None


def title_for(first_prompt: str) -> str:
    words = " ".join(first_prompt.split())
    return words if len(words) <= TITLE_CHARS else words[:TITLE_CHARS - 1] + "…"


def listed(db: Database, deployment_ids: int | set[int]) -> list[Conversation]:
    """The conversations with these deployments, latest first."""
    ids = {deployment_ids} if isinstance(deployment_ids, int) else set(deployment_ids)
    with db.read() as session:
        return list(session.exec(select(Conversation).where(Conversation.deployment_id.in_(ids))
                                 .order_by(Conversation.updated_at.desc(), Conversation.id.desc())))


def create(db: Database, deployment_id: int, system_prompt: str, params: ChatParams, title: str = "") -> Conversation:
    with db.write() as session:
        conversation = Conversation(deployment_id=deployment_id, title=title, system_prompt=system_prompt,
                                    params_json=Conversation.dumps(params.as_dict()))
        session.add(conversation)
        session.flush()
        session.refresh(conversation)
        return conversation


def settings(conversation: Conversation) -> tuple[str, ChatParams]:
    values = conversation.loads(conversation.params_json, {})
    return conversation.system_prompt, ChatParams(**{k: v for k, v in values.items() if k in PARAM_LIMITS})


def update_settings(db: Database, conversation_id: int, system_prompt: str, params: ChatParams) -> None:
    with db.write() as session:
        conversation = _get(session, conversation_id)
        conversation.system_prompt, conversation.params_json = system_prompt, Conversation.dumps(params.as_dict())
        session.add(conversation)


def turns(db: Database, conversation_id: int) -> list[Turn]:
    with db.read() as session:
        rows = session.exec(select(ChatMessage).where(ChatMessage.conversation_id == conversation_id)
                            .order_by(ChatMessage.id)).all()
    return [Turn(m.role, m.content, ReplyStats.from_dict(m.loads(m.stats_json, {})) if m.role == "assistant" else None,
                 m.id) for m in rows]


def add(db: Database, conversation_id: int, turn: Turn) -> Turn:
    """Append a message; the first user message names the conversation."""
    with db.write() as session:
        conversation = _get(session, conversation_id)
        message = ChatMessage(conversation_id=conversation_id, role=turn.role, content=turn.content,
                              stats_json=ChatMessage.dumps(turn.stats.as_dict() if turn.stats else {}))
        session.add(message)
        if turn.role == "user" and not conversation.title:
            conversation.title = title_for(turn.content)
        conversation.updated_at = now()
        session.add(conversation)
        session.flush()
        return Turn(turn.role, turn.content, turn.stats, message.id)


def remove(db: Database, message_id: int) -> None:
    """Take a message out (a reply about to be regenerated)."""
    with db.write() as session:
        message = session.get(ChatMessage, message_id)
        if message is not None:
            session.delete(message)


def _get(session, conversation_id: int) -> Conversation:
    conversation = session.get(Conversation, conversation_id)
    if conversation is None:
        raise EngineError(f"conversation {conversation_id} was deleted")
    return conversation


def request_messages(system_prompt: str, history: list[Turn]) -> list[dict]:
    """What the server is sent: the system prompt, then every turn with text (a failed reply's partial
    text is part of the history only once the user goes on from it)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    return messages + [{"role": t.role, "content": t.content} for t in history if t.content]
