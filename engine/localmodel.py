"""Checks on model files that live on this machine (imports and mirrors), without loading them."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


# GGUF metadata value types: struct formats of the scalars; 8 is a string, 9 an array (spec: ggml's docs/gguf.md)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_header_value(path: Path, wanted: str):
    """One metadata value of a GGUF file, read from its header up to that key (None if it has none).
    The gguf package's reader parses every field and tensor first (3 s for a 100 MB model here); a
    dialog asks for one value."""
    import struct

    def read(f, fmt: str):
        size = struct.calcsize("<" + fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("the GGUF header ends early")
        return struct.unpack("<" + fmt, data)[0]

    def string(f) -> str:
        return f.read(read(f, "Q")).decode("utf-8", errors="replace")

    def value(f, kind: int):
        if kind in _GGUF_SCALARS:
            return read(f, _GGUF_SCALARS[kind])
        if kind == 8:
            return string(f)
        if kind == 9:
            item, count = read(f, "I"), read(f, "Q")
            if item in _GGUF_SCALARS:  # skipped whole: nobody asks for an array here
                f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[item]), 1)
            else:
                for _ in range(count):
                    value(f, item)
            return None
        raise ValueError(f"unknown GGUF value type {kind}")

    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError("not a GGUF file")
        version = read(f, "I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        read(f, "Q")  # tensors
        for _ in range(read(f, "Q")):
            key, kind = string(f), read(f, "I")
            found = value(f, kind)
            if key == wanted:
                return found
    return None


def gguf_quantization(path: Path) -> str | None:
    """The GGUF file's quantization as its header names it (Q4_1, Q8_0, F16…); None when it does not say."""
    try:
        file_type = gguf_header_value(path, "general.file_type")
    except (OSError, ValueError):
        return None
    if not isinstance(file_type, int):
        return None
    try:
        from gguf import LlamaFileType  # its names; the dashboard alone may not have the package
    except ImportError:
        return f"GGUF file type {file_type}"
    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"GGUF file type {file_type}"


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


Progress = Callable[[int, "int | None", "str | None"], None]  # (done, total, the step it is at)


def convert_gguf(gguf: Path, out_dir: Path, log, progress: Progress | None = None) -> str:
    """Load a GGUF file with transformers (dequantized) and save it as safetensors with its tokenizer.
    Written to a temporary folder first, so a crash never leaves a half model behind. `progress` hears
    each step, and the tensors counted as they are dequantized. Returns what was converted, for the
    model's details. Job processes only."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.format import human_bytes

    def step(name: str, said: str) -> None:
        log(said)
        if progress is not None:
            progress(0, None, name)

    with _gguf_read_once():
        step("reading the tokenizer", f"reading the tokenizer and layout of {gguf}")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        step("dequantizing the weights", "dequantizing the weights")
        with _counting_tensors(progress):
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain tensors after loading; the GGUF marker only blocks saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _, partial = output_folders(out_dir)
    shutil.rmtree(partial, ignore_errors=True)
    step("writing safetensors", f"writing safetensors to {out_dir}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    publish(out_dir)
    quantization = gguf_quantization(gguf)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return (f"{gguf.name} ({quantization + ', ' if quantization else ''}{human_bytes(gguf.stat().st_size)}), "
            f"dequantized to {dtype}")


@contextmanager
def _gguf_read_once() -> Iterator[None]:
    """transformers parses the whole GGUF file three times in a conversion (tokenizer, config, weights:
    4.7 s each for SmolLM2-135M here, most of its vocabulary), and builds gguf's tensor-name map once per
    module (397 times, 7 s). Within one conversion the file does not change: one parse, one map each."""
    import gguf as gguf_package

    reader, name_map = gguf_package.GGUFReader, gguf_package.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def read_once(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf_package.GGUFReader, gguf_package.get_tensor_name_map = read_once, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf_package.GGUFReader, gguf_package.get_tensor_name_map = reader, name_map


@contextmanager
def _counting_tensors(progress: Progress | None) -> Iterator[None]:
    """transformers counts the GGUF tensors it dequantizes with a tqdm bar (in the log); the same bar,
    subclassed, tells `progress` as well. Without that module's bar (another transformers), no count."""
    import transformers.modeling_gguf_pytorch_utils as gguf_loading

    shown = getattr(gguf_loading, "tqdm", None)
    if progress is None or shown is None:
        yield
        return

    class Counted(shown):
        def update(self, n: float | None = 1) -> bool | None:
            displayed = super().update(n)
            progress(int(self.n), self.total, None)
            return displayed

        def close(self) -> None:
            progress(int(self.n), self.total, None)
            super().close()

    gguf_loading.tqdm = Counted
    try:
        yield
    finally:
        gguf_loading.tqdm = shown


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
