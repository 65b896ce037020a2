"""Fine-tuning datasets: read, detect the format, validate every record, and turn records into training
examples (token ids with labels on the assistant turns only).

Reading and validating is plain Python, cheap enough for the dashboard. Tokenizing needs the base
model's tokenizer (transformers), so it runs in job processes, or in a short subprocess when the
dashboard or the CLI wants token counts (`python -m engine.datasets MODEL DATASET MAX_LENGTH`).

Formats (JSON Lines, or one JSON array of records):
  openai    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}
  sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}]}
  alpaca    {"instruction": "...", "input": "...", "output": "..."}   (input optional)
  text      {"text": "..."}                                          (loss on every token)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import EngineError

FORMAT_NAMES = {"openai": "OpenAI chat", "sharegpt": "ShareGPT", "alpaca": "Alpaca", "text": "plain text"}
# ShareGPT speakers as people write them, mapped to chat roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "model": "assistant"}
OPENAI_ROLES = {"system", "developer", "user", "assistant"}
# Used when the base model has no chat template of its own; saved with the adapter so serving matches.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IGNORE = -100  # the label that excludes a token from the loss


class DatasetError(EngineError):
    """A dataset that cannot be used; the message names the file, the line and what is wrong."""


@dataclass
class Dataset:
    path: Path
    format: str
    examples: list[dict[str, Any]]  # {"messages": [...]} or {"text": "..."}, normalized
    first_line: list[int] = field(default_factory=list)  # the line (or record) number of each example

    @property
    def format_name(self) -> str:
        return FORMAT_NAMES[self.format]

    @property
    def is_chat(self) -> bool:
        return self.format != "text"

    def split(self, fraction: float, seed: int) -> tuple[list[int], list[int]]:
        """Training and validation example indexes: a seeded shuffle, so a resumed run splits the same."""
        count = validation_count(len(self.examples), fraction)
        order = list(range(len(self.examples)))
        random.Random(seed).shuffle(order)
        return sorted(order[count:]), sorted(order[:count])


def validation_count(rows: int, fraction: float) -> int:
    """How many rows are held out: none under 20 rows (too few to spare), else at least one."""
    if fraction <= 0 or rows < 20:
        return 0
    return max(1, min(rows - 1, round(rows * fraction)))


def detect_format(record: dict) -> str | None:
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def _records(path: Path):
    """Yield (number, where, parsed JSON or the JSONDecodeError) for each non-blank line ("line 7"), or each record
    of a JSON array ("record 7")."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from exc
        if not isinstance(records, list):
            raise DatasetError(f"{path}: a JSON file must hold a list of records")
        for number, record in enumerate(records, 1):
            yield number, f"record {number}", record
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield number, f"line {number}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, f"line {number}", exc


def _text(value: Any, what: str) -> str:
    """A message's content: a string, or OpenAI's list of parts whose text parts are joined."""
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        value = "".join(p.get("text", "") for p in value if p.get("type", "text") == "text")
    if not isinstance(value, str):
        raise ValueError(f"{what} is {type(value).__name__}, not text")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    return value


def _messages(turns: Any, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{key}' must be a non-empty list")
    messages = []
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise ValueError(f"{key}[{number}] is not an object")
        if role_key not in turn:
            raise ValueError(f"{key}[{number}] has no '{role_key}'")
        role = roles.get(str(turn[role_key]).lower())
        if role is None:
            raise ValueError(f"{key}[{number}] has unknown role {turn[role_key]!r} in '{role_key}' "
                             f"(expected {', '.join(sorted(roles))})")
        if content_key not in turn:
            raise ValueError(f"{key}[{number}] has no '{content_key}'")
        messages.append({"role": role, "content": _text(turn[content_key], f"{key}[{number}].{content_key}")})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: nothing to learn from")
    return messages


def normalize(record: Any, fmt: str) -> dict[str, Any]:
    """One record as {"messages": [...]} or {"text": ...}; raises ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object but {type(record).__name__}")
    if fmt == "openai":
        if "messages" not in record:
            raise ValueError("missing field 'messages' (OpenAI chat format)")
        roles = {r: ("system" if r == "developer" else r) for r in OPENAI_ROLES}
        return {"messages": _messages(record["messages"], "messages", "role", "content", roles)}
    if fmt == "sharegpt":
        if "conversations" not in record:
            raise ValueError("missing field 'conversations' (ShareGPT format)")
        return {"messages": _messages(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)}
    if fmt == "alpaca":
        for name in ("instruction", "output"):
            if name not in record:
                raise ValueError(f"missing field '{name}' (Alpaca format)")
        prompt = _text(record["instruction"], "instruction")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError(f"input is {type(extra).__name__}, not text")
        if extra.strip():
            prompt += "\n\n" + extra
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record["output"], "output")}]
        if isinstance(record.get("system"), str) and record["system"].strip():
            messages.insert(0, {"role": "system", "content": record["system"]})
        return {"messages": messages}
    if "text" not in record:
        raise ValueError("missing field 'text' (plain text format)")
    return {"text": _text(record["text"], "text")}


def read_dataset(path: str | Path) -> Dataset:
    """Read and validate every record; the first bad one raises DatasetError with its line number."""
    path = Path(path).expanduser()
    if not str(path).strip() or not path.exists():
        raise DatasetError(f"{path}: no such file")
    if not path.is_file():
        raise DatasetError(f"{path}: not a file")
    fmt, examples, lines = None, [], []
    try:
        for number, position, record in _records(path):
            where = f"{path.name}, {position}"
            if isinstance(record, json.JSONDecodeError):
                raise DatasetError(f"{where}: not valid JSON: {record.msg} (column {record.colno})")
            if fmt is None:
                fmt = detect_format(record) if isinstance(record, dict) else None
                if fmt is None:
                    raise DatasetError(f"{where}: unknown format: expected a 'messages', 'conversations', "
                                       "'instruction'/'output' or 'text' field")
            try:
                examples.append(normalize(record, fmt))
            except ValueError as exc:
                raise DatasetError(f"{where}: {exc}") from None
            lines.append(number)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read it: {exc.strerror}") from exc
    if not examples:
        raise DatasetError(f"{path}: the dataset is empty")
    return Dataset(path, fmt, examples, lines)


# -- tokenizing: job processes (and the token-count subprocess) only ------------------------------------


def chat_template(tokenizer) -> tuple[str, bool]:
    """The template chat data is rendered with, and whether it is the model's own (else ChatML)."""
    own = getattr(tokenizer, "chat_template", None)
    return (own, True) if isinstance(own, str) and own else (CHATML_TEMPLATE, False)


def _render(tokenizer, template: str, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, template: str, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of what the assistant says (its end-of-turn
    marker included, so the model learns to stop). Each span is what the assistant's message adds after
    the prompt that asks for it; a template that does not render prefixes consistently (one that drops
    earlier reasoning, say) falls back to finding each reply's text in order."""
    full = _render(tokenizer, template, messages)
    spans, cursor = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, template, messages[:index], generation_prompt=True)
        upto = _render(tokenizer, template, messages[: index + 1])
        if full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= cursor:
            spans.append((len(prompt), len(upto)))
            cursor = len(upto)
        else:
            start = full.find(message["content"], cursor)
            if start < 0:
                continue
            spans.append((start, start + len(message["content"])))
            cursor = start + len(message["content"])
    return full, spans


def encode(tokenizer, template: str, example: dict, max_length: int) -> dict[str, list[int]] | None:
    """Token ids and labels for one example, cut to `max_length`. Chat examples are learned on the
    assistant's tokens only; plain text on every token. None when nothing learnable is left after the cut."""
    if "text" in example:
        ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        labels = list(ids)
    else:
        text, spans = assistant_spans(tokenizer, template, example["messages"])
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"][:max_length]
        offsets = encoded["offset_mapping"][: len(ids)]
        labels = [tid if any(s <= start < e for s, e in spans) else IGNORE
                  for tid, (start, _end) in zip(ids, offsets)]
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


@dataclass
class TokenStats:
    rows: int
    total_tokens: int
    mean_tokens: int
    max_tokens: int
    over_max_length: int  # rows cut to the max length
    unlearnable: int  # rows with nothing to learn once cut (the reply starts past the max length)
    own_template: bool
    mean_trained: float = 0.0  # tokens a trained row carries, once cut (what a run's speed is counted in)

    def describe(self, max_length: int) -> str:
        text = (f"{self.total_tokens:,} tokens, mean {self.mean_tokens:,}, longest {self.max_tokens:,}; "
                f"{self.over_max_length} over {max_length:,} (cut)")
        if self.unlearnable:
            text += f"; {self.unlearnable} left out (nothing to learn within the max length)"
        if not self.own_template:
            text += "; the base model has no chat template: ChatML is used and saved with the adapter"
        return text


def token_stats(tokenizer, dataset: Dataset, max_length: int) -> TokenStats:
    template, own = chat_template(tokenizer)
    lengths, unlearnable, trained = [], 0, []
    for example in dataset.examples:
        full = encode(tokenizer, template, example, 10**9)
        lengths.append(len(full["input_ids"]) if full else 0)
        if full is None or all(label == IGNORE for label in full["labels"][:max_length]):
            unlearnable += 1  # what encode() would drop once the row is cut to max_length
        else:
            trained.append(min(lengths[-1], max_length))
    return TokenStats(len(lengths), sum(lengths), round(sum(lengths) / len(lengths)), max(lengths),
                      sum(1 for n in lengths if n > max_length), unlearnable, own,
                      sum(trained) / len(trained) if trained else 0.0)


@dataclass
class TokenCount:
    """What the dialog's token-count subprocess tells: the counts, worded, and this CPU's speed if asked."""

    stats: TokenStats
    summary: str
    cpu_flops: float | None = None


def load_tokenizer(model_path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def token_stats_in_subprocess(model_path: str | Path, dataset: str | Path, max_length: int,
                              cpu_speed: bool = False) -> TokenCount:
    """Token counts for the dashboard's dialog, from a short child process (the tokenizer needs
    transformers, which the dashboard never imports); with `cpu_speed`, this CPU's measured speed too
    (engine/estimates.py guesses a CPU run's time from it). Raises DatasetError with the reason."""
    import subprocess
    import sys

    from engine.jobs import child_env

    command = [sys.executable, "-m", "engine.datasets", str(model_path), str(dataset), str(max_length)]
    try:
        out = subprocess.run(command + (["--cpu-speed"] if cpu_speed else []),
                             capture_output=True, text=True, timeout=300, env=child_env())
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        raise DatasetError(f"could not count tokens: {exc}") from exc
    if "error" in result:
        raise DatasetError(result["error"])
    summary, cpu_flops = result.pop("summary"), result.pop("cpu_flops", None)
    return TokenCount(TokenStats(**result), summary, cpu_flops)


def main(argv: list[str]) -> int:
    """`python -m engine.datasets MODEL_PATH DATASET MAX_LENGTH [--cpu-speed]`: print token statistics
    (and this CPU's speed) as JSON."""
    import dataclasses
    import sys

    cpu_speed = "--cpu-speed" in argv
    argv = [arg for arg in argv if arg != "--cpu-speed"]
    model_path, dataset_path, max_length = argv[0], argv[1], int(argv[2])
    extra = {}
    try:
        dataset = read_dataset(dataset_path)
        stats = token_stats(load_tokenizer(model_path), dataset, max_length)
        if cpu_speed:
            from engine.estimates import measure_cpu_flops

            extra["cpu_flops"] = measure_cpu_flops()
    except EngineError as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    except Exception as exc:  # noqa: BLE001 - a tokenizer that cannot load is a reason, not a crash
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(dataclasses.asdict(stats) | {"summary": stats.describe(max_length)} | extra))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
