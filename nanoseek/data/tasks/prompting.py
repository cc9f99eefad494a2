"""Prompting an engine `LLM` with chat messages: the chat template, encoded by
`Tokenizer.encode_chat` (bos once, the template's markers as ids, a task's prompt text as
plain text even when it holds a special-token string). Completions keep their special
tokens: `<think>` and `</think>` are special tokens, and the format reward needs them.
"""

from __future__ import annotations

from dataclasses import replace


def prompt_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation (a nanoseek `Tokenizer`), bos included once."""
    if tokenizer is None:
        raise ValueError("the model has no tokenizer (tokenizer.json): tasks prompt with text")
    return tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)


def generate_texts(llm, conversations: list[list[dict]], params) -> list[list[str]]:
    """params.n completions per conversation, special tokens kept (eos is not text)."""
    params = replace(params, skip_special_tokens=False)
    prompts = [prompt_ids(llm.tokenizer, msgs) for msgs in conversations]
    outs = llm.generate(prompts, [fit_context(llm, ids, params) for ids in prompts], use_tqdm=False)
    return [[c.text for c in out.outputs] for out in outs]


def fit_context(llm, ids: list[int], params):
    """`params` with max_tokens cut to what the model's context leaves after the prompt
    (a task's budget may exceed a tiny model's max_position_embeddings)."""
    limit = llm.max_model_len
    room = limit - len(ids)
    if room < 1:
        raise ValueError(f"a prompt of {len(ids)} tokens leaves no room in the model's "
                         f"{limit}-token context")
    if params.max_tokens is None or params.max_tokens <= room:
        return params
    return replace(params, max_tokens=room)
