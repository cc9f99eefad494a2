"""OpenAI's request and response shapes, as pydantic models: what the official `openai`
client sends and parses, plus vLLM's sampling extensions (top_k, min_p, ignore_eos,
stop_token_ids, ...) so a vLLM user's `extra_body` carries over.

Types and ranges are checked here, by pydantic, so that a bad value becomes a 400 naming the
field (`param`) before anything reaches the engine. Types are strict, as OpenAI's API checks
them: `"stream": "yes"`, `"max_tokens": "5"` or `"n": 1.5` is refused, never coerced; only an
integer where a number is expected passes (`"temperature": 1`). A lone UTF-16 surrogate
anywhere in the body (JSON's `"\\ud800"`: not Unicode text, it cannot be tokenised or even
written back as UTF-8) is refused too, naming where it is. Unknown fields are ignored (as
vLLM does): a client written for a richer API still gets an answer.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # the engine re-checks every stop's prefixes at each token
INT64 = 2 ** 63
SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins a valid pair: what is left is lone


class _Lenient(BaseModel):
    """Unknown fields ignored; known ones strictly typed."""
    model_config = ConfigDict(extra="ignore", strict=True)


def lone_surrogate(value, path: str = "") -> tuple[str, int] | None:
    """(where, character index) of the first lone surrogate in a JSON value, or None.
    Iterative: a deeply nested body cannot exhaust the stack."""
    stack = [(path, value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            if (m := SURROGATE.search(v)) is not None:
                return where, m.start()
        elif isinstance(v, dict):
            for k, item in reversed(list(v.items())):
                stack.append((where, k))
                stack.append((f"{where}.{k}" if where else str(k), item))
        elif isinstance(v, list):
            stack.extend((f"{where}.{i}" if where else str(i), item) for i, item in reversed(list(enumerate(v))))
    return None


# -------------------------------------------------------------------- requests
class StreamOptions(_Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str  # data:image/...;base64,... or file:///... (serve/images.py decodes it within limits)
    detail: Optional[Literal["auto", "low", "high"]] = None


class ImagePart(_Lenient):
    """OpenAI's image content part; decoded, limited and refused in serve/images.py."""
    type: Literal["image_url"]
    image_url: ImageURL


class CalledFunction(_Lenient):
    name: str = Field(..., min_length=1)
    arguments: Union[str, dict]  # JSON text, as OpenAI sends it; an object is written as JSON


class ToolCallIn(_Lenient):
    """A call in an assistant message of the history."""
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: CalledFunction


def _as_dicts(calls: list[ToolCallIn]) -> list[dict]:
    """Checked as `ToolCallIn`, kept as the plain dicts the chat template reads."""
    return [c.model_dump(exclude_none=True) for c in calls]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Union[TextPart, ImagePart]], None] = None
    tool_calls: Optional[Annotated[list[ToolCallIn], AfterValidator(_as_dicts)]] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if p.type == "text")  # images: serve/images.py
        return self.content or ""


class SamplingFields(_Lenient):
    """The fields chat and completions share."""
    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=-INT64, lt=INT64)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: Optional[str] = None
    # vLLM's extensions (through the openai client's `extra_body`)
    top_k: int = Field(0, ge=-1, lt=INT64)
    min_p: float = Field(0.0, ge=0, le=1)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=INT64)]] = Field(default_factory=list, max_length=1024)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # OpenAI fields the sampler does not implement: refused when they would change the
    # output (params.sampling_params), never silently ignored
    logit_bias: Optional[dict[str, Union[int, float]]] = None
    response_format: Optional[dict] = None

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data):
        if (found := lone_surrogate(data)) is not None:
            where, at = found
            raise PydanticCustomError(
                "lone_surrogate", "{param}: holds a lone UTF-16 surrogate at character {at}, which is not "
                "Unicode text (escape a pair, e.g. \\ud83d\\ude00, or send UTF-8)",
                {"param": where or "body", "at": at})
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            # a long stop string costs the engine work at every generated token
            raise ValueError(f"stop: at most {MAX_STOPS} non-empty strings of at most "
                             f"{MAX_STOP_CHARS} characters")
        return stops


class FunctionSpec(_Lenient):
    name: str = Field(..., min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict] = None


class ToolSpec(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    tools: Optional[list[ToolSpec]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    max_tokens: Optional[int] = Field(None, ge=1, lt=INT64)
    max_completion_tokens: Optional[int] = Field(None, ge=1, lt=INT64)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1, lt=INT64)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)


# ------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON, as the model wrote it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(ToolCall):
    index: int  # which call of the message (a stream sends each call whole, once)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: Optional[list[ToolCall]] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallDelta]] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanoseek"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
