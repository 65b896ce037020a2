"""Checks on model files that live on this machine (imports and mirrors), without loading them."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from engine.errors import EngineError

GGUF_MAGIC = b"GGUF"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # a custom model's name


def check_name(name: str, what: str = "name") -> None:
    """A name modeldeck keeps (a model's, a deployment's, an endpoint's), refused with what it may hold."""
    if not NAME_PATTERN.match(name):
        raise EngineError(f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-' (up to 100)")


def _unreadable_is_a_reason(check):
    """A permission error or the like is a reason to show, not a crash."""
    @functools.wraps(check)
    def checked(path: Path):
        try:
            return check(path)
        except OSError as exc:
            raise EngineError(f"{path}: cannot read it: {exc.strerror}") from exc

    return checked


@_unreadable_is_a_reason
def check_gguf(path: Path) -> None:
    if not path.exists():
        raise EngineError(f"{path}: no such file")
    if not path.is_file():
        raise EngineError(f"{path}: not a file")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise EngineError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")


@_unreadable_is_a_reason
def check_model_folder(path: Path) -> dict:
    """A folder in Hugging Face layout: config.json naming the architecture, weights, a tokenizer.
    Returns the parsed config."""
    if not path.exists():
        raise EngineError(f"{path}: no such folder")
    if not path.is_dir():
        raise EngineError(f"{path}: not a folder (to import one file, give a .gguf file)")
    config_file = path / "config.json"
    if not config_file.exists():
        raise EngineError(f"{path}: not a model folder: no config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EngineError(f"{config_file}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or not (config.get("model_type") or config.get("architectures")):
        raise EngineError(f"{config_file}: names no model_type or architectures")
    weights = [p for p in path.iterdir() if p.suffix == ".safetensors" or (p.suffix == ".bin" and p.name.startswith("pytorch_model"))]
    if not weights:
        raise EngineError(f"{path}: no weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        raise EngineError(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    return config


def output_folders(out_dir: Path) -> tuple[Path, Path]:
    """A written model's folder and the one it is written to first; both are the model's own."""
    return out_dir, out_dir.with_name(out_dir.name + ".partial")


def publish(out_dir: Path) -> None:
    """Make the finished `.partial` folder the model's folder: a crash never leaves half a model behind."""
    import shutil

    final, partial = output_folders(out_dir)
    shutil.rmtree(final, ignore_errors=True)  # a leftover of an earlier attempt at this same model
    partial.rename(final)


def convert_gguf(gguf: Path, out_dir: Path, log) -> None:
    """Load a GGUF file with transformers (dequantized) and save it as safetensors with its tokenizer.
    Written to a temporary folder first, so a crash never leaves a half model behind. Job processes only."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"loading {gguf} (dequantizing GGUF weights; this takes a while)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain tensors after loading; the GGUF marker only blocks saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _, partial = output_folders(out_dir)
    shutil.rmtree(partial, ignore_errors=True)
    log(f"writing safetensors to {out_dir}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    publish(out_dir)


def has_chat_template(path: str | Path) -> bool:
    """Whether the model (an adapter keeps its own copy) can chat: a chat template beside its tokenizer.
    A folder that cannot be read counts as yes: the server then says what is wrong."""
    folder = Path(path)
    try:
        if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
            return True
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return bool(config.get("chat_template"))


def model_config(path: str | Path | None) -> tuple[dict, dict]:
    """A model folder's config.json, and its language model's part (multimodal configs nest it under
    text_config); empty when there is none or it cannot be read (not downloaded yet)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        config = {}
    return config, config.get("text_config") or config
