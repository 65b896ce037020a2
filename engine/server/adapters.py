"""LoRA adapters on the built-in server: loaded beside the base model (never merged into it), each served under
its own name and chosen per request, so one deployment serves its base and any number of its adapters, and
requests to different adapters share a batch.

- **Reading** is PEFT's: its config (rank and alpha patterns, rsLoRA) and its weight file (`load_peft_weights`).
  What plain LoRA on linear layers cannot express — DoRA, whole layers replaced (`modules_to_save`), biases,
  embeddings — is refused by name, as is an adapter whose layers do not fit this model (another base's).
- **Applying** is ours: a forward hook on each linear layer an adapter touches adds, for every token, its own
  adapter's low-rank update. The adapters that touch a layer are stacked side by side — A as one
  (in × ΣR) matrix, B (already scaled) as one (ΣR × out) — so a mixed batch costs one matmul into the
  stacked rank, a mask that keeps each token's own columns, and one matmul back, however many adapters it
  mixes (PEFT's own mixed batches loop over the adapters, and need one adapter per batch row; a continuous
  batch packs every request into one row). A step of one adapter alone skips the mask.
  Where the batch is long runs of one adapter each (prompts being read), each run is applied with its own
  adapter instead, on views of the run's rows: no wasted columns, and a few operations per run.
- **Which token is whose** is a `Routing`, set for the thread that runs the next forward: the batched step knows
  its requests and how many tokens each brings, the plain path runs one request at a time.

An adapter being unloaded keeps its weights until the last request using it has ended: those requests finish as
they began, and new ones are refused with a 404.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_current = threading.local()  # the routing of the forward this thread runs next
_serials = itertools.count()
RUN_TOKENS = 8  # tokens per run of one adapter, on average, from which runs beat the mask (measured on a CPU)

PEFT_PREFIX = "base_model.model."


class AdapterError(Exception):
    """An adapter that cannot be served here, in words that say why (an HTTP 400, or the server's exit at start)."""


@dataclass(eq=False)
class Adapter:
    """One loaded adapter: per linear layer (by its name in the model), A as (in × r) and B, scaled, as (r × out),
    on the model's device and in its dtype."""

    name: str
    path: str
    rank: int
    layers: dict[str, tuple[Any, Any]]
    tokenizer: Any = None  # its own, when its folder has one (a chat template saved with it), else the base's
    eos: frozenset = frozenset()  # its tokenizer's end-of-sequence token, where it has its own
    # unique to this load: an adapter unloaded while requests use it, and another loaded under its name, differ
    key: str = field(default_factory=lambda: f"a{next(_serials)}")


def read_adapter(name: str, path: str, model, max_rank: int = 0) -> Adapter:
    """Read a PEFT LoRA adapter for `model`, checked against it; raises AdapterError with what is wrong."""
    import torch
    from peft import PeftConfig
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(f"{path}: no adapter_config.json there (not a PEFT adapter folder)")
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: its adapter_config.json cannot be read ({exc})") from None
    kind = str(getattr(config, "peft_type", "")).rsplit(".", 1)[-1]
    if kind != "LORA":
        raise AdapterError(f"{name}: a {kind or 'non-LoRA'} adapter; the built-in server serves LoRA adapters")
    for refused, why in (("use_dora", "DoRA"), ("modules_to_save", "whole layers replaced (modules_to_save)"),
                         ("trainable_token_indices", "trained token embeddings")):
        if getattr(config, refused, None):
            raise AdapterError(f"{name}: uses {why}, which the built-in server cannot apply beside other adapters; "
                               "merge it (`modeldeck merge`) and deploy the merged model")
    if getattr(config, "bias", "none") != "none":
        raise AdapterError(f"{name}: trains biases (bias={config.bias!r}); merge it and deploy the merged model")
    try:
        weights = load_peft_weights(str(folder), device="cpu")
    except Exception as exc:  # noqa: BLE001 - a missing or damaged weights file, in safetensors' or torch's words
        raise AdapterError(f"{path}: its weights cannot be read ({type(exc).__name__}: {exc})") from None
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in weights.items():
        layer, sep, rest = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not sep or rest not in ("A.weight", "B.weight"):
            raise AdapterError(f"{name}: holds {key}, which is not a LoRA matrix of a linear layer; merge it and "
                               "deploy the merged model")
        pairs.setdefault(layer, {})[rest[0]] = tensor
    if not pairs:
        raise AdapterError(f"{name}: its weights file holds no LoRA matrices")
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    layers, rank = {}, 0
    for layer, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{name}: {layer} has only one of its two LoRA matrices")
        a, b = ab["A"], ab["B"]
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            raise AdapterError(f"{name}: this model has no layer {layer} (an adapter of another base model?)") from None
        if not isinstance(module, torch.nn.Linear):
            raise AdapterError(f"{name}: {layer} is a {type(module).__name__} here, not a linear layer")
        if module is model.get_output_embeddings():  # a batch computes it on a row per request, not per token
            raise AdapterError(f"{name}: adapts the output layer ({layer}), which the built-in server cannot apply "
                               "beside other adapters; merge it and deploy the merged model")
        r = a.shape[0]
        if a.shape[1] != module.in_features or b.shape != (module.out_features, r):
            raise AdapterError(
                f"{name}: does not fit this model: {layer} maps {module.in_features} → {module.out_features} here, "
                f"the adapter's {a.shape[1]} → {b.shape[0]} (an adapter of another base model?)")
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), layer), config.lora_alpha)
        scale = alpha / (math.sqrt(r) if config.use_rslora else r)
        layers[layer] = (a.t().to(device=device, dtype=dtype).contiguous(),
                         (b.t() * scale).to(device=device, dtype=dtype).contiguous())
        rank = max(rank, r)
    if max_rank and rank > max_rank:
        raise AdapterError(f"{name}: rank {rank} is over this deployment's maximum LoRA rank of {max_rank}")
    return Adapter(name, str(folder), rank, layers)


@dataclass(eq=False)
class Stacked:
    """The adapters that touch one layer, side by side."""

    layout: tuple[tuple[str, int], ...]  # (adapter key, rank) in column order: layers alike share their masks
    a: Any  # (in × ΣR)
    b: Any  # (ΣR × out)
    rows: Any  # (len(layout) + 1) × ΣR: row i keeps adapter i's columns; the last row keeps none (the base)
    own: dict[str, tuple[Any, Any]]  # each adapter's own (A, B), by key: a step of one adapter alone


@dataclass(eq=False)
class Stack:
    """Every adapter whose weights apply now (served, or still used by a request), stacked per layer. Never
    changed once made: a change makes a new one, swapped in between two forwards."""

    adapters: dict[str, Adapter]  # by key
    layers: dict[str, Stacked]

    @classmethod
    def of(cls, adapters: list[Adapter]) -> Stack:
        import torch

        by_layer: dict[str, list[Adapter]] = {}
        for adapter in adapters:
            for layer in adapter.layers:
                by_layer.setdefault(layer, []).append(adapter)
        layers = {}
        for layer, touching in by_layer.items():
            a = torch.cat([t.layers[layer][0] for t in touching], dim=1)
            b = torch.cat([t.layers[layer][1] for t in touching], dim=0)
            rows = torch.zeros(len(touching) + 1, a.shape[1], dtype=a.dtype, device=a.device)
            column = 0
            for i, t in enumerate(touching):
                width = t.layers[layer][0].shape[1]
                rows[i, column:column + width] = 1
                column += width
            layers[layer] = Stacked(tuple((t.key, t.layers[layer][0].shape[1]) for t in touching), a, b, rows,
                                    {t.key: t.layers[layer] for t in touching})
        return cls({a.key: a for a in adapters}, layers)


@dataclass(eq=False)
class Routing:
    """Whose each token of the next forward is: `spans` lists (adapter key, or None for the base; token count) in
    the order the tokens are packed. Made by `routing`."""

    stack: Stack
    spans: list[tuple[str | None, int]]
    single: str | None = None  # the one adapter every token is for, when it is one
    tokens: int = 0  # packed, in all
    runs: list[tuple[int, int, str]] | None = None  # (start, length, adapter key) where runs beat the mask
    _masks: dict = field(default_factory=dict)

    def mask(self, stacked: Stacked, tokens: int):
        """Per token, the columns of its own adapter in this layer's stack (zeros for the base and for an adapter
        that leaves this layer alone); None when no token here has an adapter of this layer."""
        key = (stacked.layout, tokens)
        if key not in self._masks:
            slot = {adapter: i for i, (adapter, _) in enumerate(stacked.layout)}
            none = len(stacked.layout)
            index = [slot.get(adapter, none) for adapter, n in self.spans for _ in range(n)][:tokens]
            index += [none] * (tokens - len(index))  # padding, if the batch was padded
            if all(i == none for i in index):
                self._masks[key] = None
            else:
                import torch

                self._masks[key] = stacked.rows[torch.tensor(index, device=stacked.rows.device)]
        return self._masks[key]


def routing(stack: Stack, spans: list[tuple[str | None, int]]) -> Routing | None:
    """The routing of a forward whose packed tokens belong to these adapters (by key) in turn; None when every
    token is the base model's."""
    keys = {adapter for adapter, _ in spans}
    if keys == {None}:
        return None
    runs, start = [], 0
    for adapter, n in spans:  # neighbours of one adapter make one run
        if runs and runs[-1][2] == adapter and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + n, adapter)
        elif adapter is not None:
            runs.append((start, n, adapter))
        start += n
    return Routing(stack, spans, next(iter(keys)) if len(keys) == 1 else None, start,
                   runs if start >= RUN_TOKENS * len(runs) else None)


def route(routing: Routing | None) -> None:
    """The routing of the forwards this thread runs from now on (None: the base model only)."""
    _current.routing = routing


def _hook(layer: str):
    def add_adapters(module, args, output):
        routing: Routing | None = getattr(_current, "routing", None)
        if routing is None:
            return None
        stacked = routing.stack.layers.get(layer)
        if stacked is None:
            return None
        x = args[0]
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), output.view(-1, output.shape[-1])
        single = routing.single
        if single is not None:
            own = stacked.own.get(single)
            if own is not None:
                flat_out.addmm_(flat_x @ own[0], own[1])
            return output
        if routing.runs is not None and flat_x.shape[0] == routing.tokens:
            for start, length, key in routing.runs:
                if (own := stacked.own.get(key)) is not None:
                    flat_out[start:start + length].addmm_(flat_x[start:start + length] @ own[0], own[1])
            return output
        mask = routing.mask(stacked, flat_x.shape[0])
        if mask is not None:
            flat_out.addmm_((flat_x @ stacked.a).mul_(mask), stacked.b)
        return output

    return add_adapters


class Hooks:
    """The forward hooks on the layers some adapter touches: added as adapters come, kept after (a hook whose
    layer no adapter touches returns at once), so no forward ever sees the set of hooks change."""

    def __init__(self, model):
        self.model = model
        self.hooked: set[str] = set()

    def cover(self, stack: Stack) -> None:
        for layer in stack.layers.keys() - self.hooked:
            self.model.get_submodule(layer).register_forward_hook(_hook(layer))
            self.hooked.add(layer)


def rank_of(adapter_folder: str | Path) -> int:
    """An adapter's LoRA rank from its config (the largest of its rank pattern), without loading it."""
    try:
        config = json.loads((Path(adapter_folder) / "adapter_config.json").read_text(encoding="utf-8"))
        ranks = [int(config.get("r", 8)), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
        return max(ranks)
    except (OSError, ValueError, TypeError, AttributeError):
        return 0
