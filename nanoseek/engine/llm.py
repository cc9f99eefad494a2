"""The offline API, with the names vLLM users know:

    from nanoseek.engine import LLM, SamplingParams
    llm = LLM("runs/speedrun")
    for out in llm.generate(["The meaning of"], SamplingParams(temperature=0, max_tokens=32)):
        print(out.outputs[0].text)
    llm.chat([{"role": "user", "content": "Hi"}])  # a conversation, in the chat format
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nanoseek.engine.chat_images import CHAT_LIMITS, chat_images, expand_prompt, image_locations, image_placeholder
from nanoseek.engine.engine import EngineConfig, LLMEngine
from nanoseek.engine.outputs import RequestOutput, request_output
from nanoseek.engine.dtype import cast_model, resolve_dtype
from nanoseek.engine.sampler import SamplingParams
from nanoseek.engine.sequence import Sequence
from nanoseek.checkpoint.hf import vision_checkpoint
from nanoseek.model import CausalLM
from nanoseek.quant.model import check_quantization, log_backend, quantize_model_fp8
from nanoseek.text.images import ImageLimits
from nanoseek.text.tokenizer import Tokenizer


def load_model(path_or_model, dtype=None, device=None, quantization: str | None = None) -> tuple[CausalLM, object]:
    """A CausalLM (and the checkpoint directory's tokenizer, if any), in `dtype` (see
    engine/dtype.py) and with FP8 projection weights when quantization="fp8". A model
    object is converted in place, as Module.to does."""
    check_quantization(quantization)
    target = None if device is None else torch.device(device)
    if isinstance(path_or_model, CausalLM):
        model = path_or_model
        dtype = resolve_dtype(dtype, None, target or next(model.parameters()).device)
        if dtype is not None:
            cast_model(model, dtype)
        if device is not None:
            model.to(device)
        if quantization == "fp8":
            quantize_model_fp8(model)
        return model, None
    path = Path(path_or_model)
    if not (path / "config.json").exists():
        check_not_adapter(path)
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    dtype = resolve_dtype(dtype, path, target or torch.device("cpu"))
    if quantization is None and vision_checkpoint(path):  # its language model serves text
        from nanoseek.model.vl.vl_load import language_model, vision_class  # transformers' towers: only here
        model = language_model(vision_class(path).from_pretrained(path, dtype=dtype, device=device))
    else:
        model = CausalLM.from_pretrained(path, dtype=dtype, device=device, quantization=quantization)
    return model, Tokenizer.from_dir(path)


# config.json's architecture -> the class whose whole model an engine keeps (its prompts take images)
ENGINE_VISION = {"DeepseekVLForConditionalGeneration": "DeepseekVLForConditionalGeneration",
                 "DeepseekOcr2ForConditionalGeneration": "DeepseekOCR2"}


def _load_ocr2(path_or_model, dtype, device):
    """(model, tokenizer, None) for a DeepSeek-OCR-2 directory or model: the language model cast
    as load_model casts one, the vision side whole; the processor from its SAM sizes
    (engine/vision_ocr2.default_processor)."""
    from nanoseek.model.vl.ocr2_model import DeepseekOCR2
    target = None if device is None else torch.device(device)
    if isinstance(path_or_model, DeepseekOCR2):
        model = path_or_model
        dtype = resolve_dtype(dtype, None, target or next(model.parameters()).device)
        if dtype is not None:
            cast_model(model.language, dtype)
            for part in (model.vision, model.projector):
                part.to(dtype)
            model.view_separator.data = model.view_separator.data.to(dtype)
        return (model if device is None else model.to(device)), None, None
    dtype = resolve_dtype(dtype, Path(path_or_model), target or torch.device("cpu"))
    model = DeepseekOCR2.from_pretrained(path_or_model, dtype=dtype, device=device)
    return model, Tokenizer.from_dir(Path(path_or_model)), None


def load_engine_model(path_or_model, dtype=None, device=None, quantization: str | None = None):
    """(model, tokenizer, image processor) for an engine: `load_model`'s, except that a
    DeepSeek-VL checkpoint directory or model is kept whole, so that its prompts may carry
    images (engine/vision.py); the processor is the directory's, or None (the model's
    defaults). A DeepSeek-OCR-2 directory or model is kept whole too (engine/vision_ocr2.py)."""
    from nanoseek.checkpoint.hf import vision_architecture
    path = path_or_model if isinstance(path_or_model, (str, Path)) else None
    raw = _read_json(Path(path) / "config.json") if path is not None else None
    is_dir = isinstance(raw, dict) and vision_architecture(raw) in ENGINE_VISION
    # by name: importing the class imports transformers' towers, which text models never need
    is_model = type(path_or_model).__name__ in ENGINE_VISION.values()
    if not (is_dir or is_model):
        return (*load_model(path_or_model, dtype, device, quantization), None)
    if quantization is not None:
        raise ValueError(f"quantization={quantization!r}: not supported for a vision-language model's engine")
    if ENGINE_VISION.get(vision_architecture(raw) if is_dir else None) == "DeepseekOCR2" or \
            type(path_or_model).__name__ == "DeepseekOCR2":
        return _load_ocr2(path_or_model, dtype, device)
    from nanoseek.model.vl.deepseek_vl import DeepseekVLForConditionalGeneration
    from nanoseek.model.vl.vl_image import PROCESSOR_FILES, image_processor
    target = None if device is None else torch.device(device)
    if is_model:
        model = path_or_model
        dtype = resolve_dtype(dtype, None, target or next(model.parameters()).device)
        if dtype is not None:  # the language model as load_model casts one; the vision side whole
            cast_model(model.language_model, dtype)
            model.vision_model.to(dtype)
            model.aligner.to(dtype)
        return (model if device is None else model.to(device)), None, None
    dtype = resolve_dtype(dtype, Path(path), target or torch.device("cpu"))
    model = DeepseekVLForConditionalGeneration.from_pretrained(path, dtype=dtype, device=device)
    own = any((Path(path) / f).exists() for f in PROCESSOR_FILES)
    return model, Tokenizer.from_dir(Path(path)), image_processor(path) if own else None


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def check_not_adapter(path: Path) -> None:
    """A LoRA adapter (adapter_config.json, or a LoRA run directory's adapter/) holds no base
    weights: say in one line how to make a checkpoint of it, rather than "no config.json"."""
    adapter = next((d for d in (path, path / "adapter") if (d / "adapter_config.json").exists()), None)
    if adapter is None:
        return
    base = (_read_key(adapter / "adapter_config.json", "base_model_name_or_path")
            or _read_key(path / "run.json", "settings", "init"))  # a LoRA run directory's init
    raise ValueError(f"{path}: an unmerged LoRA adapter, not a checkpoint; merge it into its base "
                     f"first: nanoseek merge-lora --base {base or 'BASE_CHECKPOINT'} --adapter {adapter} "
                     f"--out MERGED_DIR (or train with --merge), then use MERGED_DIR")


def _read_key(file: Path, *keys: str):
    """file's JSON value at keys, or None (no file, not JSON, no such key)."""
    try:
        value = json.loads(file.read_text())
        for k in keys:
            value = value[k]
        return value if isinstance(value, str) and value else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class LLM:
    """Offline batched generation over the engine. `model` is a checkpoint directory or a
    CausalLM; `tokenizer` overrides the directory's (a `nanoseek.text.tokenizer.Tokenizer`, a
    transformers tokenizer or a `tokenizers.Tokenizer`).
    dtype: "float32" | "bfloat16" | "float16" | "auto" (the checkpoint's torch_dtype) or a
    torch dtype; None keeps the model's (fp32 for a checkpoint). The latent cache takes it
    too. quantization="fp8": attention and FFN/expert weights held in FP8 (128x128 blocks)
    and run through FP8Linear; `quantization_backend` says which GEMM runs.
    Engine options (kv_cache_memory, block_size, max_num_seqs, max_num_batched_tokens,
    enable_prefix_caching, speculative, max_model_len, weight_layout) are `EngineConfig`
    fields. On a CPU the engine may store the model's linear weights k-major (the same values;
    engine/weight_layout.py), a model object included."""

    def __init__(self, model, tokenizer=None, dtype=None, device=None, quantization: str | None = None,
                 **engine_kw):
        model, dir_tok, processor = load_engine_model(model, dtype, device, quantization)
        self.engine = LLMEngine(model, tokenizer or dir_tok, EngineConfig(**engine_kw), image_processor=processor)
        self.quantization_backend = log_backend(model, self.engine.device)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        """The longest prompt + output one request may have (LLMEngine.max_model_len)."""
        return self.engine.max_model_len

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, a list of strings, a token-id list, a list of token-id lists,
        or dicts {"prompt": ...} / {"prompt_token_ids": [...]}, with "images": [...] for a
        DeepSeek-VL model (LLMEngine.add_request). Outputs in prompt order."""
        prompts = _as_prompt_list(prompts)
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        groups: list[list[Sequence]] = []
        seqs: list[Sequence] = []
        bar = None
        try:  # a rejected prompt (or an interrupt) aborts every request this call added
            for p, sp in zip(prompts, params):
                groups.append([])
                if sp.n > 1:  # its images preprocessed once for the n samples
                    p = self.engine.preprocess_images(p)
                for k in range(sp.n):
                    seq = self.engine.add_request(p, sp.for_sample(k))
                    groups[-1].append(seq)
                    seqs.append(seq)
            if use_tqdm:
                from tqdm import tqdm
                bar = tqdm(total=len(seqs), desc="generate", unit="req")
            while self.engine.has_unfinished():
                done = sum(s.finished for s in self.engine.step())
                if bar is not None:
                    bar.update(done)
        except BaseException:
            for s in seqs:
                self.engine.abort(s.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        outs = []
        for group in groups:
            out = request_output(group[0])
            for k, seq in enumerate(group[1:], 1):
                comp = request_output(seq).outputs[0]
                comp.index = k
                out.outputs.append(comp)
            outs.append(out)
        return outs


    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             image_limits: ImageLimits = CHAT_LIMITS, image_dir=None) -> list[RequestOutput]:
        """vLLM's `LLM.chat`: `messages` is one conversation (a list of {"role", "content"}
        dicts, OpenAI's roles and tool calls included) or a list of them; each is rendered in
        DeepSeek-V3's chat format by `Tokenizer.encode_chat` (content text, never special
        tokens: what the server and `nanoseek chat` send) and generated as `generate` does.
        A user message's content may be OpenAI content parts with `image_url` images
        (DeepSeek-VL engines): decoded and placed as the server does (engine/chat_images.py:
        `image_limits`, the server's defaults; `file:` URLs only under `image_dir`; images in
        user messages only). One RequestOutput per conversation, in order; its text is the
        assistant's reply."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (tokenizer.json); this checkpoint has none")
        conversations = [messages] if not messages or isinstance(messages[0], dict) else list(messages)
        prompts = [self._chat_prompt(list(c), add_generation_prompt, image_limits, image_dir)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _chat_prompt(self, messages: list[dict], add_generation_prompt: bool, limits, image_dir):
        """One conversation's ids, or {"prompt_token_ids", "images"} when it holds images."""
        placeholder = image_placeholder(self.engine, len(image_locations(messages)), "LLM.chat: this model")
        images = chat_images(messages, limits, image_dir) if placeholder is not None else []
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt,
                                         image_token_id=placeholder)
        return expand_prompt(self.engine, ids, images)[0]


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    out = []
    for p in prompts:
        if isinstance(p, dict) and p.get("images") is not None:  # the engine reads it whole
            out.append(p)
            continue
        if isinstance(p, dict):
            p = p.get("prompt_token_ids", p.get("prompt"))
        if not isinstance(p, (str, list, tuple)):
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(p).__name__}")
        out.append(p if isinstance(p, str) else list(p))
    return out
