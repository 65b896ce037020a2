"""The OpenAI API as the built-in server accepts it: typed request models (pydantic, strict, unknown
fields refused as OpenAI refuses them), and errors in OpenAI's shape naming the parameter.

Every field a client may send is either honoured or refused with a 400 that names it; none is silently
ignored. Validation runs on the raw bytes (pydantic's JSON parser), so malformed JSON, lone surrogates and
deep nesting are refused there, before anything else reads the body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_STOP_SEQUENCES = 4
MAX_N = 16  # choices per request: each is a generation of its own
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 64  # prompts × n in one request: each choice is a generation of its own
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_STOP_CHARS = 256
GREEDY_BELOW = 1e-5  # a temperature this small is greedy decoding (dividing by it could overflow), as in vLLM


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    # strict: "1" is no number and true no integer; no inf or NaN; unknown fields are an error
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(Strict):
    type: Literal["text"]
    text: str


Content = str | list[TextPart]


class SystemMessage(Strict):
    role: Literal["system", "developer"]
    content: Content
    name: str | None = None


class UserMessage(Strict):
    role: Literal["user"]
    content: Content
    name: str | None = None


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: Content | None = None  # null in a turn that called tools
    tool_calls: list[ToolCall] | None = None
    name: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]
ROLES = {"system", "developer", "user", "assistant", "tool"}


class StreamOptions(Strict):
    include_usage: bool | None = False


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)]


class Common(Strict):
    """What chat and text completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: Stop | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch's generators take
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end user's id: nothing to do with it here, but clients send it


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(Common):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


AdapterName = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9._/:-]+$")]


class LoadAdapter(Strict):
    """POST /v1/load_lora_adapter, as vLLM takes it (`load_inplace` is not offered: unload, then load)."""

    lora_name: AdapterName
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)]


class UnloadAdapter(Strict):
    """POST /v1/unload_lora_adapter, as vLLM takes it."""

    lora_name: AdapterName
    lora_int_id: int | None = None  # vLLM's clients may send it; the name is what counts here


# -- errors --------------------------------------------------------------------------------------------

TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def param_of(loc: tuple) -> str | None:
    """pydantic's location as OpenAI names a parameter: ("messages", 0, "user", "content") → messages[0].content.
    The role that tags a message and the types tried in a union are pydantic's, not the request's."""
    name = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            name += f"[{part}]"
        elif (part in ROLES and i and isinstance(loc[i - 1], int)) or "[" in part or "-" in part or part in TYPE_NAMES:
            continue
        else:
            name += f".{part}" if name else part
    return name or None


def refusal(exc: ValidationError) -> RequestError:
    """The one error to tell: the deepest (a union's other members fail at its top), in OpenAI's words."""
    errors = exc.errors(include_url=False)
    # the deepest, and of two as deep the one whose type matched (a list too long, not "no string")
    error = max(errors, key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")))
    if error["type"] == "json_invalid":
        return RequestError(f"the request body is not valid JSON: {error['msg'].removeprefix('Invalid JSON: ')}")
    if error["type"] in ("model_type", "model_attributes_type") and not error["loc"]:
        return RequestError("the request body must be a JSON object")
    param = param_of(error["loc"])
    if error["type"] == "extra_forbidden":  # the field as it was sent, whatever its name
        param = ".".join(filter(None, [param_of(error["loc"][:-1]), str(error["loc"][-1])]))
        return RequestError(f"Unrecognized request argument supplied: {param}", param=param,
                            code="unknown_parameter")
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):  # a message's role
        return RequestError(f"'{param}.role' must be one of {', '.join(sorted(ROLES))}", param=f"{param}.role",
                            code="invalid_value")
    if error["type"] == "missing":
        return RequestError(f"missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    code = "invalid_type" if error["type"].endswith(("_type", "_parsing")) or error["type"] == "literal_error" \
        else "invalid_value"
    message = error["msg"].removeprefix("Value error, ")
    return RequestError(f"'{param}': {message}" if param else message, param=param, code=code)


def parse(model: type[Strict], raw: bytes) -> Strict:
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        raise refusal(exc) from None


# -- what a request asks of the generator ----------------------------------------------------------------


@dataclass
class Sampling:
    """One choice's generation settings, as the generator reads them."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; else how many alternatives beside each token
    grammar: str | None = None  # an llguidance grammar the reply must follow (response_format)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def batchable(self) -> bool:
        """Whether transformers' continuous batching honours all of it (a seed of its own per request, penalties,
        biases, logprobs and grammars it cannot: those run on the plain path, exactly)."""
        return (self.seed is None and not self.presence_penalty and not self.frequency_penalty
                and not self.logit_bias and self.logprobs is None and self.grammar is None)


def sampling_of(request: ChatRequest | CompletionRequest, default_max_tokens: int, vocab_size: int) -> Sampling:
    if isinstance(request, ChatRequest):
        limit = request.max_completion_tokens or request.max_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        if request.top_logprobs is not None and not request.logprobs:
            raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    else:
        limit, logprobs = request.max_tokens, request.logprobs
    bias = {}
    for key, value in (request.logit_bias or {}).items():
        if not re.fullmatch(r"[0-9]{1,10}", key) or int(key) >= vocab_size:
            raise RequestError(f"'logit_bias': {key!r} is no token id of this model (0 to {vocab_size - 1})",
                               param="logit_bias", code="invalid_value")
        bias[int(key)] = value
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return Sampling(max_tokens=limit or default_max_tokens,
                    temperature=1.0 if request.temperature is None else request.temperature,
                    top_p=1.0 if request.top_p is None else request.top_p, stop=stop, seed=request.seed,
                    presence_penalty=request.presence_penalty or 0.0,
                    frequency_penalty=request.frequency_penalty or 0.0, logit_bias=bias, logprobs=logprobs)


def refuse_unsupported(request: ChatRequest | CompletionRequest) -> None:
    """What this server does not do yet: said, never ignored."""
    if isinstance(request, ChatRequest):
        if any(t.function.strict for t in request.tools or []):
            raise RequestError("'tools[].function.strict': arguments held to the schema are not enforced by the "
                               "built-in server", param="tools", code="unsupported_parameter")
        if request.tool_choice not in (None, "none", "auto"):
            raise RequestError("'tool_choice': the model decides whether to call a tool ('auto') or none is "
                               "offered ('none'); forcing a call is not supported", param="tool_choice",
                               code="unsupported_parameter")
        if request.store:
            raise RequestError("'store': this server keeps no completions", param="store",
                               code="unsupported_parameter")
    else:
        if request.suffix:
            raise RequestError("'suffix': insertion is not supported", param="suffix", code="unsupported_parameter")
        if request.echo:
            raise RequestError("'echo' is not supported by the built-in server", param="echo",
                               code="unsupported_parameter")
        if request.best_of is not None and request.best_of != (request.n or 1):
            raise RequestError("'best_of' other than 'n' is not supported", param="best_of",
                               code="unsupported_parameter")


def message_dicts(messages: list) -> list[dict]:
    """Messages as a chat template reads them: text content, the roles templates know."""
    out = []
    for m in messages:
        content = m.content if m.content is None or isinstance(m.content, str) else "".join(p.text for p in m.content)
        entry = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if getattr(m, "name", None):  # for templates that tell participants apart
            entry["name"] = m.name
        if isinstance(m, AssistantMessage) and m.tool_calls:
            entry["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                   for c in m.tool_calls]
        if isinstance(m, ToolMessage):
            entry["tool_call_id"] = m.tool_call_id
        out.append(entry)
    return out
