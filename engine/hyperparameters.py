"""A fine-tune's hyperparameters: defaults, the text each is shown with, and the checks. Light (no
database, no torch): the CLI builds its flags from it and the dashboard its dialog."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from engine.gpus import has_bitsandbytes

ALL_LINEAR = "all-linear"
DEFAULT_MAX_LENGTH = 1024
# LoRA targets per architecture (config.json's model_type): attention and MLP projections, which is
# what LoRA papers and tools settle on. Anything else gets PEFT's "all-linear".
_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
TARGET_MODULES = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                     "gemma3", "gemma3_text", "olmo", "olmo2", "granite", "smollm3", "cohere", "starcoder2"],
                    _PROJECTIONS),
    "phi3": "qkv_proj,o_proj,gate_up_proj,down_proj",
    "phi": "q_proj,k_proj,v_proj,dense,fc1,fc2",
    "gpt2": "c_attn,c_proj,c_fc",
    **dict.fromkeys(["falcon", "gpt_neox"], "query_key_value,dense,dense_h_to_4h,dense_4h_to_h"),
}


def knob(label: str, help: str, flag: str | None = None) -> dict[str, str]:
    return {"label": label, "help": help, "flag": flag or ""}


@dataclass
class Hyperparameters:
    """What a fine-tune is run with. The defaults make a sound LoRA run for a model and a dataset alone."""

    method: str = field(default="lora", metadata=knob("Method", "lora, or qlora (4-bit base; needs a CUDA GPU and bitsandbytes)"))
    rank: int = field(default=16, metadata=knob("LoRA rank", "rank r of the low-rank update"))
    alpha: int = field(default=32, metadata=knob("LoRA alpha", "scale of the update (alpha / rank)"))
    dropout: float = field(default=0.05, metadata=knob("LoRA dropout", "dropout on the LoRA input, 0 to below 1"))
    target_modules: str = field(default="", metadata=knob(
        "Target modules", "comma-separated module names, or all-linear; empty: the architecture's default",
        "--targets"))
    epochs: float = field(default=3.0, metadata=knob("Epochs", "passes over the training rows"))
    max_steps: int = field(default=0, metadata=knob("Max steps", "optimizer steps; 0: run the epochs"))
    learning_rate: float = field(default=2e-4, metadata=knob("Learning rate", "peak learning rate (cosine, 3% warm-up)", "--lr"))
    batch_size: int = field(default=4, metadata=knob("Batch size", "rows per device and step"))
    grad_accum: int = field(default=4, metadata=knob("Grad accum.", "batches per optimizer step"))
    max_length: int = field(default=0, metadata=knob(
        "Max length", f"tokens per row, longer rows are cut; 0: {DEFAULT_MAX_LENGTH:,} or the model's limit if lower"))
    val_split: float = field(default=0.05, metadata=knob("Val. split", "fraction held out (none under 20 rows)"))
    seed: int = field(default=42, metadata=knob("Seed", "for the split, the shuffle and the LoRA init"))
    save_steps: int = field(default=0, metadata=knob(
        "Save every", "steps between checkpoints; 0: about ten a run, never more than a tenth of its time"))

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> tuple[Hyperparameters, dict[str, str]]:
        """Parse typed text (the dialog's fields); empty means the default. Returns the values and, per
        field, what is wrong with it."""
        parsed, errors = {}, {}
        for f in cls.fields():
            text = str(values.get(f.name, "")).strip()
            if not text:
                continue
            try:
                parsed[f.name] = _cast(f, text)
            except ValueError:
                errors[f.name] = f"{f.metadata['label']}: {text!r} is not {'a whole number' if field_type(f) is int else 'a number'}"
        return cls(**parsed), errors

    def problems(self, model_max_length: int | None = None, gpus: str = "cpu",
                 bitsandbytes: bool | None = None) -> dict[str, str]:
        """Each field's problem, worded for the user; empty when the run can start. `bitsandbytes`: whether
        QLoRA's package is there (None: look on this machine)."""
        errors = {}

        def positive(name: str, label: str) -> None:
            if getattr(self, name) <= 0:
                errors[name] = f"{label} must be above 0"

        if self.method not in ("lora", "qlora"):
            errors["method"] = f"method {self.method!r}: choose lora or qlora"
        elif self.method == "qlora" and (gpus == "cpu" or not (has_bitsandbytes() if bitsandbytes is None
                                                                 else bitsandbytes)):
            errors["method"] = "QLoRA needs a CUDA GPU and the bitsandbytes package; use lora"
        for name, label in (("rank", "LoRA rank"), ("alpha", "LoRA alpha"), ("learning_rate", "learning rate"),
                            ("batch_size", "batch size"), ("grad_accum", "gradient accumulation")):
            positive(name, label)
        if self.max_length < 0:
            errors["max_length"] = "max length must be 0 (automatic) or more"
        if not 0 <= self.dropout < 1:
            errors["dropout"] = "LoRA dropout must be from 0 to below 1"
        if self.max_steps < 0:
            errors["max_steps"] = "max steps must be 0 (run the epochs) or more"
        elif self.max_steps == 0 and self.epochs <= 0:
            errors["epochs"] = "epochs must be above 0 (or set max steps)"
        if not 0 <= self.val_split < 1:
            errors["val_split"] = "validation split must be from 0 to below 1"
        if self.save_steps < 0:
            errors["save_steps"] = "checkpoint interval must be 0 (automatic) or more"
        if self.learning_rate >= 1:
            errors["learning_rate"] = f"learning rate {self.learning_rate} is far too high (LoRA uses about 1e-4 to 1e-3)"
        if model_max_length and self.max_length > model_max_length:
            errors["max_length"] = f"max length {self.max_length:,} is over the model's limit of {model_max_length:,} tokens"
        if self.target_modules and not all(part.strip() for part in self.target_modules.split(",")):
            errors["target_modules"] = "target modules: names separated by commas, without empty ones"
        return errors

    def resolved(self, model_max_length: int | None) -> Hyperparameters:
        """With the automatic max length made concrete for this model."""
        if self.max_length:
            return self
        return dataclasses.replace(self, max_length=min(DEFAULT_MAX_LENGTH, model_max_length or DEFAULT_MAX_LENGTH))

    def steps(self, train_rows: int) -> int:
        """Optimizer steps of the whole run, counted as the trainer counts them."""
        if self.max_steps:
            return self.max_steps
        batches = math.ceil(train_rows / self.batch_size)
        per_epoch = max(batches // self.grad_accum + int(batches % self.grad_accum > 0), 1)
        return max(math.ceil(self.epochs * per_epoch), 1)

    def targets_for(self, model_type: str | None) -> str:
        return self.target_modules or TARGET_MODULES.get(model_type or "", ALL_LINEAR)


def field_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "str": str}[f.type]  # the annotations are strings (PEP 563)


def _cast(f: dataclasses.Field, text: str) -> Any:
    kind = field_type(f)
    if kind is int:
        value = float(text)
        if not value.is_integer():
            raise ValueError(text)
        return int(value)
    return kind(text)
