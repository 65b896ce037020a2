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
    p = verb("retry", "cmd_retry", "start a failed download, conversion, fine-tune (resuming) or merge again")
    p.add_argument("name")
    p.add_argument("--wait", action="store_true", help="wait until it is Ready or Failed")
    p = verb("finetune", "cmd_finetune", "fine-tune a model with LoRA on a JSONL dataset (OpenAI chat, ShareGPT, "
             "Alpaca or text); unset hyperparameters get sound defaults")
    p.add_argument("base", help="a Ready base or merged custom model (or one still downloading)")
    p.add_argument("dataset", help="a .jsonl file (or a .json list of records)")
    p.add_argument("--name", help="the adapter's name (default: BASE-DATASET-lora)")
    p.add_argument("--gpus", default="auto", help="auto (the freest GPU no other modeldeck work holds, else the CPU), cpu, or "
                   "GPU numbers like 0,1; "
                   "with --target, how many GPUs the pod or batch job gets (auto: 1; 0 or cpu: its CPUs)")
    _hyperparameter_flags(p)
    _target_flags(p, "finetune", "run it there (a Job on Kubernetes, a batch job on SLURM)")
    p.add_argument("--serve-on", dest="serve_on", metavar="DEPLOYMENT",
                   help="when done, load the adapter onto this running deployment of its base (no restart)")
    p.add_argument("--wait", action="store_true", help="wait until it is Ready or Failed, showing progress")
    p = verb("merge", "cmd_merge", "merge a Ready adapter into its base: a standalone Merged model")
    p.add_argument("adapter")
    p.add_argument("--name", help="the merged model's name (default: ADAPTER-merged)")
    p.add_argument("--wait", action="store_true", help="wait until it is Ready or Failed")
    p = verb("deploy", "cmd_deploy", "serve a Ready model through an OpenAI-compatible endpoint")
    p.add_argument("model", help="a Ready custom model (an adapter is served on its base)")
    p.add_argument("--name", help="the deployment's name (default: the served name)")
    p.add_argument("--backend", choices=["auto", "vllm", "transformers"], help="auto: vLLM with a CUDA GPU and vLLM, "
                   "else the built-in server")
    p.add_argument("--gpus", help="auto (the freest GPUs no other deployment holds, with room for it), cpu, or GPU "
                   "numbers like 0,1")
    p.add_argument("--tensor-parallel", dest="tensor_parallel", type=int, help="GPUs to split the model over (vLLM)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--max-model-len", dest="max_model_len", type=int, help="context length (default: the model's)")
    p.add_argument("--gpu-memory", dest="gpu_memory_fraction", type=float, help="fraction of GPU memory (vLLM)")
    p.add_argument("--port", type=int, help="default: a free one")
    p.add_argument("--host", help="bind address (default 127.0.0.1; anything else is reachable from outside)")
    p.add_argument("--served-name", dest="served_name", help="the model name clients send (default: the model's)")
    p.add_argument("--adapter", action="append", dest="adapters", metavar="ADAPTER",
                   help="a Ready adapter of the same base, served beside it under its own name; a request's model "
                        "chooses it (repeatable)")
    p.add_argument("--max-lora-rank", dest="max_lora_rank", type=int,
                   help="the highest adapter rank it takes, now or loaded later (default: any on the built-in server; "
                        "on vLLM, the highest of --adapter's, and with none, no adapters)")
    p.add_argument("--force", action="store_true", help="deploy even when the fit check says it does not fit")
    p.add_argument("--replace", action="store_true", help="take the place of a stopped or failed deployment of "
                   "the same name (its record and chats go)")
    _target_flags(p, "deploy", "serve it there (vLLM on Kubernetes; vLLM or the built-in server in a SLURM batch job)")
    p.add_argument("--wait", action="store_true", help="wait until it is Ready or Failed")
    p = verb("start", "cmd_start", "start a stopped or failed deployment again with its settings, name and API key")
    p.add_argument("deployment")
    p.add_argument("--force", action="store_true", help="start even when the fit check says it does not fit")
    p.add_argument("--wait", action="store_true", help="wait until it is Ready or Failed")
    verb("ps", "cmd_ps", "list deployments")
    p = verb("serve-adapter", "cmd_serve_adapter", "load an adapter onto a Ready deployment of its base, without a "
             "restart: requests then name it")
    p.add_argument("adapter", help="a Ready adapter")
    p.add_argument("deployment")
    p.add_argument("--as", dest="served_name", metavar="NAME", help="the name requests give (default: the adapter's)")
    p = verb("unserve-adapter", "cmd_unserve_adapter", "unload an adapter from a deployment (its requests still "
             "running finish; new ones get a 404)")
    p.add_argument("adapter", help="the adapter, by its name or the name it is served as")
    p.add_argument("deployment")
    p = verb("chat", "cmd_chat", "chat with a Ready deployment: one streamed reply to PROMPT, or the dashboard's chat")
    p.add_argument("deployment")
    p.add_argument("prompt", nargs="?", help="the message ('-' reads it from stdin); without it, the dashboard opens "
                   "on the deployment's chat")
    _sampling_flags(p, "0.7")
    p = verb("compare", "cmd_compare", "send the same prompt (or each of a file's) to 2 to 4 models at once and show their "
             "replies side by side, with time to first token, tokens/s and tokens; without a prompt, the dashboard's "
             "compare pane")
    p.add_argument("models", nargs="+", metavar="MODEL", help="a deployment, DEPLOYMENT:MODEL (a model it serves: an "
                   "adapter), or a model one deployment serves")
    p.add_argument("--prompt", help="the prompt ('-' reads it from stdin)")
    p.add_argument("--prompts", metavar="FILE", help="a .jsonl file of prompts (strings, or objects with 'prompt', "
                   "'text', 'instruction' or 'messages'), each asked on its own, in turn")
    _sampling_flags(p, "0: greedy, so replies can be compared")
    p = verb("endpoint", "cmd_endpoint", "list an external OpenAI-compatible endpoint (add), or take one off (rm)")
    p.add_argument("action", choices=["add", "rm"])
    p.add_argument("name")
    p.add_argument("url", nargs="?", help="the API's base URL, like http://host:8000/v1 (add)")
    p.add_argument("--model", help="the model to chat with (default: the only one it serves)")
    p.add_argument("--key-env", dest="key_env", help="an environment variable holding its API key")
    p.add_argument("--key-stdin", dest="key_stdin", action="store_true",
                   help="read the API key from stdin and keep it in the system keyring")
    p = verb("stop", "cmd_stop", "stop a deployment (the server ends cleanly and frees its port)")
    p.add_argument("deployment")
    p.add_argument("--rm", action="store_true", help="also remove its record and chats (works on a stopped one too)")
    p = verb("eval", "cmd_eval", "score a model on a dataset: loss and perplexity of its answer tokens (an adapter: and "
             "its base's on the same rows); kept in its details")
    p.add_argument("model", help="a Ready custom model or adapter")
    p.add_argument("dataset", help="a .jsonl file (OpenAI chat, ShareGPT, Alpaca or text), as a fine-tune takes")
    verb("gpus", "cmd_gpus", "list this machine's GPUs: load, memory, temperature, power, and who holds each")
    verb("jobs", "cmd_jobs", "list jobs (downloads, imports, fine-tunes, merges, servers)")
    p = verb("logs", "cmd_logs", "print a job's log: by job id, a deployment's name (its server), or a model's name")
    p.add_argument("job", help="a job id, a deployment's name, or a custom model's name")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    p = verb("cancel", "cmd_cancel", "cancel a running job (by job id, or a model's running job by its name)")
    p.add_argument("job", help="a job id, or a custom model's name")
    return parser


def _sampling_flags(parser: argparse.ArgumentParser, temperature: str) -> None:
    """What a chat request is sent with (engine.chat.ChatParams), as chat and compare take it."""
    parser.add_argument("--system", default="", help="a system prompt")
    parser.add_argument("--temperature", help=f"0 to 2 (default {temperature})")
    parser.add_argument("--top-p", dest="top_p", help="0 to 1 (default 1)")
    parser.add_argument("--max-tokens", dest="max_tokens", help="the longest reply (default 512)")


VALUES_WITH_DASHES = ("--sbatch",)  # their values are options themselves: `--sbatch "--constraint=a100"`


def _joined_values(argv: list[str]) -> list[str]:
    """argparse takes a value that starts with '-' for an option of its own: join such a flag with its value
    (`--sbatch=--constraint=a100`), as typing it that way would."""
    joined, i = [], 0
    while i < len(argv):
        if argv[i] in VALUES_WITH_DASHES and i + 1 < len(argv):
            joined.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    return joined


def _target_flags(parser: argparse.ArgumentParser, what: str, runs: str) -> None:
    """--target, --dry-run, and each target's own options (--image, --account, ...) for `what`, from the
    same table the dialogs' rows are built from."""
    from engine.targets import option_fields  # light: no client library

    parser.add_argument("--target", help="where to run: CONTEXT[/NAMESPACE] of your kubeconfig, or slurm[:PARTITION] "
                        f"of the SLURM cluster this machine submits to; {runs} (default: this machine)")
    parser.add_argument("--dry-run", dest="dry_run", action="store_true",
                        help="with --target: print what it would apply or submit (manifests as YAML, a batch script) "
                             "and touch nothing")
    group = parser.add_argument_group("target options (each for its kind of target)")
    for option, kind in option_fields():
        if what in option.uses:
            group.add_argument(option.flag, dest=option.name, metavar=option.name.upper(),
                               help=f"{kind.TITLE}: {option.help}".replace("%", "%%"))


def _hyperparameter_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per fine-tune hyperparameter, from the same table the dashboard's dialog is built from."""
    from engine.hyperparameters import (  # light: no database, no torch
        Hyperparameters,
        field_type,
    )

    group = parser.add_argument_group("hyperparameters")
    for f in Hyperparameters.fields():
        group.add_argument(f.metadata["flag"] or "--" + f.name.replace("_", "-"), dest=f.name, type=field_type(f),
                           metavar=f.type.upper(), help=f"{f.metadata['help']} (default: {f.default!r})".replace("%", "%%"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_joined_values(sys.argv[1:] if argv is None else argv))
    dashboard = args.command == "chat" and args.prompt is None or (
        args.command == "compare" and args.prompt is None and args.prompts is None)
    if args.command is None or dashboard:
        from tui.app import ModelDeckApp

        # opens the database itself, after painting its first frame
        app = ModelDeckApp(open_chat=args.deployment if args.command == "chat" else None,
                           open_compare=args.models if args.command == "compare" else None)
        app.run()
        return app.return_code or 0
    try:
        from engine import start
        from tui import commands

        db = start()
        for notice in db.notices:
            print(f"modeldeck: {notice}", file=sys.stderr)
        return getattr(commands, args.func)(args, db)
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
