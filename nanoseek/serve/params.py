"""From an OpenAI request to what the engine takes: prompts as token ids, `SamplingParams`,
and the response-cache key — with every check a client can act on made here, as a 400 that
names the field, before the request is admitted (the engine's own checks stay as a backstop).

The prompt is tokenised by the server (not by the engine) so that the context check, the
usage counts and the cache key all see the same ids. A chat is written in DeepSeek-V3's
format (`nanoseek.text.chat_template`), which begins with its own BOS; `Tokenizer.encode_chat`
encodes its markers as special ids and every message's content as plain text, so a marker
typed in a message (`<｜User｜>`, `<｜tool▁outputs▁begin｜>`) cannot forge a turn.
"""

from __future__ import annotations

from nanoseek.text.chat_template import ChatFormatError
from nanoseek.engine.sampler import SamplingParams
from nanoseek.serve.errors import APIError
from nanoseek.serve.images import keyed_messages
from nanoseek.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from nanoseek.text.tokenizer import Tokenizer

# fields that change nothing in the output: left out of the cache key
NOT_IN_KEY = {"stream", "stream_options", "user"}


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name}: not supported by nanoseek's sampler (use 0)", param=name,
                           code="unsupported_value")
    if req.logit_bias:
        raise APIError(400, "logit_bias: not supported by nanoseek's sampler (leave it out)",
                       param="logit_bias", code="unsupported_value")
    if req.response_format not in (None, {"type": "text"}):
        raise APIError(400, "response_format: only {\"type\": \"text\"} is supported (no JSON mode "
                            "or schema-constrained decoding)", param="response_format", code="unsupported_value")
    return SamplingParams(
        n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k, min_p=req.min_p, seed=req.seed,
        max_tokens=max_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
        logprobs=logprobs, include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens)


def chat_params(req: ChatCompletionRequest) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs=true", param="top_logprobs", code="invalid_value")
    max_tokens = req.max_completion_tokens or req.max_tokens  # None: up to the context
    return sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)


def completion_params(req: CompletionRequest) -> SamplingParams:
    for name, bad in (("echo", req.echo), ("suffix", req.suffix is not None),
                      ("best_of", req.best_of not in (None, req.n))):
        if bad:
            raise APIError(400, f"{name}: not supported", param=name, code="unsupported_value")
    return sampling_params(req, req.max_tokens, req.logprobs)


# ----------------------------------------------------------------- prompts
def chat_prompt(tokenizer, req: ChatCompletionRequest, image_token_id: int | None = None) -> list[int]:
    """The chat's ids; with `image_token_id` (a vision-language engine's placeholder), one
    placeholder id where each image part stood (serve/images.engine_images)."""
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer (tokenizer.json): use /v1/completions with "
                            "token-id prompts", param="messages", code="no_tokenizer")
    messages = []
    for i, m in enumerate(req.messages):
        if m.role in ("user", "system", "developer", "tool") and m.content is None:
            raise APIError(400, f"messages[{i}].content: a {m.role} message needs content",
                           param=f"messages.{i}.content", code="invalid_value")
        role = "system" if m.role == "developer" else m.role
        content = m.text()
        if image_token_id is not None and isinstance(m.content, list) and any(p.type == "image_url" for p in m.content):
            content = [p.model_dump() for p in m.content]  # the template puts a placeholder per image
        messages.append({"role": role, "content": content, **({"tool_calls": m.tool_calls} if m.tool_calls else {})})
    try:
        return Tokenizer.of(tokenizer).encode_chat(messages, add_generation_prompt=True,
                                                   image_token_id=image_token_id)
    except ChatFormatError as e:
        raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None


def completion_prompts(tokenizer, req: CompletionRequest, vocab_size: int) -> list[list[int]]:
    """str | [str] | [int] | [[int]] -> one token-id list per prompt."""
    p = req.prompt
    prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not prompts:
        raise APIError(400, "prompt: is empty", param="prompt", code="invalid_value")
    out = []
    for i, one in enumerate(prompts):
        if isinstance(one, str):
            if tokenizer is None:
                raise APIError(400, "this model has no tokenizer (tokenizer.json): give prompts as token ids",
                               param="prompt", code="no_tokenizer")
            one = tokenizer.encode(one)
        bad = [t for t in one if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"prompt[{i}]: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})",
                           param="prompt", code="invalid_value")
        if not one:
            raise APIError(400, f"prompt[{i}]: is empty", param="prompt", code="invalid_value")
        out.append(one)
    return out


def check_context(prompt: list[int], params: SamplingParams, max_model_len: int, param: str) -> None:
    """The engine would reject it too, but only once admitted: say so now, as OpenAI does."""
    need = len(prompt) + (params.max_tokens or 1)
    if need > max_model_len:
        asked = f"{params.max_tokens} tokens to generate" if params.max_tokens else "at least 1 new token"
        raise APIError(400, f"this server serves at most {max_model_len} tokens a request (the model's "
                            f"context, or less if the KV cache holds less); the prompt has {len(prompt)} and "
                            f"{asked} were asked ({need} in all): shorten the {param} or lower max_tokens",
                       param=param, code="context_length_exceeded")


# -------------------------------------------------------------------- cache
def cache_key(kind: str, req: SamplingFields, scope: str, checkpoint: str, images=()) -> dict | None:
    """The normalised request, or None when its output is not reproducible (sampled with no
    seed): only deterministic requests may be served from a cache. `scope` names whose
    answers it may get (cache.keys.caller_scope: the API key's hash, or "shared") and
    `checkpoint` which weights answer (cache.fingerprint): both are part of the key, so
    neither another caller's entry nor an old model's can match. Image parts are keyed by
    the content hash of `images` (serve/images.py), never by their URL."""
    if req.seed is None and (req.temperature is None or req.temperature > 0):  # default temperature: 1
        return None
    key = req.model_dump(exclude=NOT_IN_KEY)
    if "messages" in key:
        key["messages"] = keyed_messages(key["messages"], list(images))
    key.update(endpoint=kind, scope=scope, checkpoint=checkpoint)
    return key
