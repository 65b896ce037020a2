"""The connection kit of a deployment: what an application needs to use it, as ready-to-paste snippets
(curl, Python with the openai SDK, environment variables), and, for a loopback endpoint on a machine
reached over SSH, the `ssh -L` command that makes it reachable from the user's laptop.

The snippets are executed by the tests against a live server, so what is shown is known to work.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from engine.backends import LOOPBACK


@dataclass
class Snippet:
    key: str  # the dialog's key to copy it
    title: str
    text: str


def snippets(base_url: str, model: str, api_key: str | None) -> list[Snippet]:
    key = api_key or "none"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    curl = (f"curl -sS {shlex.quote(base_url + '/chat/completions')} \\\n"  # quiet, but errors said
            f"  -H {shlex.quote('Authorization: Bearer ' + key)} \\\n"
            f"  -H 'Content-Type: application/json' \\\n"
            f"  -d {shlex.quote(body)}")
    python = ("from openai import OpenAI\n\n"
              f"client = OpenAI(base_url={base_url!r}, api_key={key!r})\n"
              f"reply = client.chat.completions.create(\n"
              f"    model={model!r}, messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}])\n"
              "print(reply.choices[0].message.content)")
    env = (f"export OPENAI_BASE_URL={shlex.quote(base_url)}\n"
           f"export OPENAI_API_KEY={shlex.quote(key)}\n"
           f"export OPENAI_MODEL={shlex.quote(model)}")
    return [Snippet("1", "curl", curl), Snippet("2", "Python (openai SDK)", python),
            Snippet("3", "Environment variables", env)]


def ssh_tunnel(base_url: str, environ: dict[str, str] | None = None) -> str | None:
    """`ssh -L` for a loopback endpoint when this session came in over SSH (SSH_CONNECTION is set):
    run on the laptop, it makes the same URL work there. None when not needed."""
    environ = os.environ if environ is None else environ
    parts = urlsplit(base_url)
    if parts.hostname not in LOOPBACK or not environ.get("SSH_CONNECTION"):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return ssh_command(port, parts.hostname, port, environ)


def ssh_command(local_port: int, host: str, port: int, environ: dict[str, str] | None = None) -> str:
    """`ssh -N -L LOCAL:HOST:PORT user@this-machine`: run on a laptop, it reaches HOST:PORT as this machine
    does (its own loopback, or a compute node of the cluster this is the login node of), on the laptop's
    127.0.0.1:LOCAL. This machine is named as the user reached it (SSH_CONNECTION), else by its name."""
    environ = os.environ if environ is None else environ
    fields = environ.get("SSH_CONNECTION", "").split()  # client address, client port, this server's address, port
    here = fields[2] if len(fields) >= 3 else socket.gethostname()  # getfqdn() can be "localhost"
    here = f"[{here}]" if ":" in here else here
    ssh_port = f"-p {fields[3]} " if len(fields) >= 4 and fields[3] != "22" else ""
    target = f"[{host}]" if ":" in host else host
    return f"ssh -N {ssh_port}-L {local_port}:{target}:{port} {getpass.getuser()}@{here}"
