"""External endpoints: any OpenAI-compatible server that modeldeck does not run (a colleague's vLLM, a
hosted API), listed in Active deployments as `external` so it can be chatted with the same way.

Its API key is never written to the database or a log: the deployment keeps only where the key is, either
an environment variable's name (read whenever the key is needed) or the system keyring (service
"modeldeck", the endpoint's name as the user name; the optional `keyring` package).
"""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlsplit

from sqlmodel import select

from catalog import Database
from catalog.schema import Deployment, DeploymentState
from catalog.states import LIVE_DEPLOYMENT_STATES
from engine.chat import ChatError, list_models, new_client
from engine.errors import EngineError
from engine.events import record
from engine.localmodel import check_name

EXTERNAL = "external"
KEYRING_SERVICE = "modeldeck"


def _keyring():
    try:
        import keyring
    except ImportError:
        raise EngineError("the keyring package is not installed (pip install keyring); name an environment "
                          "variable that holds the key instead") from None
    return keyring


def store_key(name: str, key: str) -> None:
    keyring = _keyring()
    try:
        keyring.set_password(KEYRING_SERVICE, name, key)
    except keyring.errors.KeyringError as exc:
        raise EngineError(f"no usable system keyring here ({exc}); name an environment variable that holds "
                          "the key instead") from None


def api_key(deployment: Deployment) -> str | None:
    """The key to send: a local deployment's own, or an external one's from where it is kept."""
    if deployment.backend != EXTERNAL:
        return deployment.api_key
    where = deployment.loads(deployment.settings_json, {})
    if variable := where.get("key_env"):
        if not os.environ.get(variable, "").strip():
            raise EngineError(f"the API key of {deployment.name} is read from ${variable}, which is not set in "
                              "this shell")
        return clean_key(os.environ[variable], f"${variable}")
    if where.get("key_keyring"):
        keyring = _keyring()
        try:
            key = keyring.get_password(KEYRING_SERVICE, deployment.name)
        except Exception as exc:  # noqa: BLE001 - KeyringError, or a D-Bus failure underneath it
            raise EngineError(f"cannot read the key of {deployment.name} from the keyring: {type(exc).__name__}") from None
        if key is None:
            raise EngineError(f"the keyring holds no key for {deployment.name}; add the endpoint again")
        return key
    return None


def clean_key(key: str, where: str) -> str:
    """A key as HTTP can carry it: a trailing newline (a file with CRLF) is dropped; anything else
    unprintable is refused, without showing the key."""
    key = key.strip()
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise EngineError(f"the API key in {where} has control characters; check how it was set")
    return key


def check_url(base_url: str) -> str:
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EngineError(f"{base_url!r} is not an http(s) URL; give the API's base, like http://host:8000/v1")
    return base_url.strip().rstrip("/")


def served_models(base_url: str, key: str | None) -> list[str]:
    """Ask the endpoint which models it serves; a clear EngineError when it cannot be used."""
    async def ask() -> list[str]:
        async with new_client(read_timeout=15) as client:
            return await list_models(client, base_url, key)

    try:
        return asyncio.run(ask())
    except ChatError as exc:
        raise EngineError(str(exc)) from None


def add(db: Database, name: str, base_url: str, model: str | None = None, key_env: str | None = None,
        key: str | None = None) -> Deployment:
    """Check the endpoint answers with this key, then list it. `key_env` names an environment variable
    holding the key; `key` is kept in the system keyring. The model defaults to the only one it serves."""
    check_name(name)
    if key_env and key:
        raise EngineError("give the key one way: an environment variable's name, or the key for the keyring")
    base_url = check_url(base_url)
    if key_env:
        if not os.environ.get(key_env, "").strip():
            raise EngineError(f"${key_env} is not set in this shell; export it first, or give another variable")
        key_value = clean_key(os.environ[key_env], f"${key_env}")
    else:
        key = key_value = clean_key(key, "the key given") if key else None
    with db.read() as session:
        taken = session.exec(select(Deployment).where(Deployment.name == name,
                                                      Deployment.state.in_(LIVE_DEPLOYMENT_STATES))).first()
    if taken:
        raise EngineError(f"a deployment named {name!r} is already listed; choose another name")
    try:
        models = served_models(base_url, key_value)
    except EngineError as exc:
        if key_value is None and "(401)" in str(exc):
            raise EngineError(f"{base_url} wants an API key: name the environment variable that holds it, or give "
                              "the key to keep in the system keyring") from None
        raise
    if model is None:
        if len(models) != 1:
            raise EngineError(f"{base_url} serves {len(models)} models; choose one with --model: "
                              + (", ".join(models[:20]) or "none listed"))
        model = models[0]
    elif models and model not in models:
        raise EngineError(f"{base_url} does not serve {model!r}; it serves: " + ", ".join(models[:20]))
    if key:
        store_key(name, key)
    where = {"key_env": key_env} if key_env else ({"key_keyring": True} if key else {})
    with db.write() as session:
        deployment = Deployment(name=name, backend=EXTERNAL, state=DeploymentState.READY, endpoint=base_url,
                                served_name=model, settings_json=Deployment.dumps(where))
        session.add(deployment)
        session.flush()
        record(session, f"deployment:{deployment.id}", "created", f"external endpoint {base_url}", state="ready")
        return deployment


def forget_key(name: str) -> None:
    """A deleted external endpoint's key leaves the keyring too; best effort, after the record is gone
    (a keyring that is missing or locked must not keep the endpoint listed)."""
    try:
        _keyring().delete_password(KEYRING_SERVICE, name)
    except Exception:  # noqa: BLE001, S110 - already gone, or no keyring here: nothing else to do
        pass
