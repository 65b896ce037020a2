"""Small fine-tuning datasets in each format the product reads, written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

QUESTIONS = [(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(40)]


def records(fmt: str, rows: int = 30) -> list[dict]:
    pairs = QUESTIONS[:rows]
    if fmt == "openai":
        return [{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q},
                              {"role": "assistant", "content": a}]} for q, a in pairs]
    if fmt == "sharegpt":
        return [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in pairs]
    if fmt == "alpaca":
        return [{"instruction": q, "input": "", "output": a} for q, a in pairs]
    if fmt == "text":
        return [{"text": f"{q} {a}"} for q, a in pairs]
    raise ValueError(fmt)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_dataset(folder: Path, fmt: str = "openai", rows: int = 30) -> Path:
    return write_jsonl(folder / f"{fmt}.jsonl", records(fmt, rows))
