"""Prompting an engine `LLM` with chat messages: the chat template, tokenised as is.

`render_chat` already writes the bos token, so the prompt is encoded without the
tokenizer's post-processor (which would add a second one). Completions keep their special
tokens: `<think>` and `</think>` are special tokens, and the format reward needs them.
"""

from __future__ import annotations

from dataclasses import replace

from nanoseek.chat_template import render_chat


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation (a nanoseek `Tokenizer`), bos included once."""
    if tokenizer is None:
        raise ValueError("the model has no tokenizer (tokenizer.json): tasks prompt with text")
    text = render_chat(messages, add_generation_prompt=add_generation_prompt)
    return tokenizer.tok.encode(text, add_special_tokens=False).ids


def generate_texts(llm, conversations: list[list[dict]], params) -> list[list[str]]:
    """params.n completions per conversation, special tokens kept (eos is not text)."""
    params = replace(params, skip_special_tokens=False)
    prompts = [encode_chat(llm.tokenizer, msgs) for msgs in conversations]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [[c.text for c in out.outputs] for out in outs]
