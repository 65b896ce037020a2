"""`modeldeck`: with no verb it opens the dashboard; verbs (tui/commands.py) script the same engine.

Exit status is non-zero with a one-line message on error. Kept light: the dashboard path imports only
Textual before its first frame.
"""

from __future__ import annotations

import argparse
import sys

from catalog.errors import CatalogError
from engine.errors import EngineError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modeldeck", description="Open LLMs on your GPU machine, from the keyboard. "
                                     "With no command, opens the dashboard.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def verb(name: str, func: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        p.set_defaults(func=func)  # a function of tui.commands, imported only when a verb runs
        return p

    p = verb("catalog", "cmd_catalog", "list the curated community models")
    p.add_argument("query", nargs="*", help="words to match in name, description and tags")
    p.add_argument("--tag", action="append", help="only models with this tag (repeatable)")
    verb("ls", "cmd_ls", "list custom models (downloaded, imported, fine-tuned)")
    p = verb("show", "cmd_show", "show everything known about a custom model")
    p.add_argument("name")
    p = verb("pull", "cmd_pull", "download a model from the Hugging Face Hub (retries a failed one)")
    p.add_argument("repo_id", help="e.g. Qwen/Qwen2.5-0.5B-Instruct")
    p.add_argument("--name", help="custom model name (default: the repo's name)")
    p.add_argument("--wait", action="store_true", help="wait until it is Ready or Failed")
    p = verb("import", "cmd_import", "import a local model folder (Hugging Face layout) or a GGUF file")
    p.add_argument("path")
    p.add_argument("--name", help="custom model name (default: the folder or file name)")
    p.add_argument("--wait", action="store_true", help="wait until it is Ready or Failed")
    p = verb("rm", "cmd_rm", "delete a custom model and free its disk (irreversible)")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    verb("jobs", "cmd_jobs", "list jobs (downloads, imports, ...)")
    p = verb("logs", "cmd_logs", "print a job's log")
    p.add_argument("job", type=int)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    p = verb("cancel", "cmd_cancel", "cancel a running job")
    p.add_argument("job", type=int)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        from tui.app import ModelDeckApp

        app = ModelDeckApp()  # opens the database itself, after painting its first frame
        app.run()
        return app.return_code or 0
    try:
        from engine import start
        from tui import commands

        return getattr(commands, args.func)(args, start())
    except (EngineError, CatalogError) as exc:
        print(f"modeldeck: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `modeldeck catalog | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except OSError as exc:
        print(f"modeldeck: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
