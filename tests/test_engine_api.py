"""Sampling, the async engine (streaming, abort) and `nanoseek generate`."""

from __future__ import annotations

import asyncio
import contextlib
import copy

import pytest
import torch

import nanoseek
from nanoseek.engine import LLM, AsyncLLM, SamplingParams
from nanoseek.engine.outputs import IncrementalDetokenizer
from nanoseek.text.tokenizer import Tokenizer
from nanoseek.engine.sampler import filtered_logits, sample_token
from tests.test_engine import prompts, reference_greedy, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    return tiny_model(mtp=1, seed=1)


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    """Printable ASCII, one character per token (ids = code points), as tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models
    vocab = {chr(i): i for i in range(32, 127)}
    vocab["<unk>"] = 3
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return Tokenizer.from_dir(path.parent)


# --------------------------------------------------------------------- sampling
def test_filters_keep_what_they_should():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]).log_softmax(-1) * 1.0
    p = logits.softmax(-1)
    keep = lambda **kw: torch.isfinite(filtered_logits(logits, SamplingParams(**kw))).tolist()  # noqa: E731
    assert keep(top_k=2) == [True, True, False, False, False]
    mass = float(p[0] + p[1])
    assert keep(top_p=mass - 1e-4) == [True, True, False, False, False]
    assert keep(top_p=mass + 1e-4) == [True, True, True, False, False]
    assert keep(top_p=1e-6) == [True, False, False, False, False]  # the best token always stays
    assert keep(min_p=float(p[2] / p[0]) - 1e-4) == [True, True, True, False, False]


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0])
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.95)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample_token(logits, params, g).token for _ in range(4000)]), minlength=5)
    expected = filtered_logits(logits, params).softmax(-1)
    assert counts[4] == 0 and counts[3] == 0  # top-k and top-p cut
    assert torch.allclose(counts.float() / 4000, expected, atol=0.03)


def test_batched_draw_equals_each_row_alone_and_skips_empty_intervals():
    """sample_batch draws every row at once (grouped by params); each row must get what it
    gets alone from the same generator state, and a zero-probability token never comes."""
    from nanoseek.engine.sampler import sample_batch
    from nanoseek.model.sampling import inverse_cdf
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=t, top_k=k, logprobs=lp)
              for t, k, lp in ((1.0, 0, None), (0.7, 5, 0), (1.0, 0, 2), (0.0, 0, 1), (0.7, 5, None), (1.3, 0, 0))]
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    alone = [sample_token(logits[i], params[i], torch.Generator().manual_seed(i)) for i in range(6)]
    together = sample_batch(logits, params, gens)
    assert [(s.token, s.logprob, s.top_logprobs) for s in together] == \
        [(s.token, s.logprob, s.top_logprobs) for s in alone]
    assert together[3].token == int(logits[3].argmax()) and len(together[2].top_logprobs) in (2, 3)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(3, -1)
    edges = torch.tensor([0.0, 0.5 - 1e-7, 1 - 2 ** -24])
    assert inverse_cdf(probs, edges).tolist() == [1, 1, 3]
    from nanoseek.engine.sampler import finite_rows
    rows = torch.tensor([[3e38, 3e38, 0.0], [1.0, float("nan"), 0.0], [0.0, float("-inf"), 1.0], [1.0, 2.0, 3.0]])
    assert finite_rows(rows) == [True, False, False, True]  # the first row's sum overflows


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    load = prompts(5, seed=3)
    llm = LLM(model, kv_cache_memory=2**22, speculative=False)
    params = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, seed=11, max_tokens=12)
    together = [o.outputs[0].token_ids for o in llm.generate(load, params)]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in load[:2]]
    assert alone == together[:2]
    other_seed = llm.generate(load[:1], SamplingParams(temperature=1.0, seed=12, max_tokens=12))
    assert other_seed[0].outputs[0].token_ids != together[0]  # 12 tokens from 256: a tie is ~impossible
    top1 = llm.generate(load[:2], SamplingParams(temperature=1.0, top_k=1, max_tokens=8, seed=0))
    assert [o.outputs[0].token_ids for o in top1] == [reference_greedy(model, p, 8, eos=1) for p in load[:2]]


def test_logprobs_are_the_models(model):
    prompt = prompts(1, seed=4)[0]
    out = LLM(model, kv_cache_memory=2**22, speculative=True).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=3))[0].outputs[0]
    ids = list(prompt)
    total = 0.0
    for tok, lp in zip(out.token_ids, out.logprobs):
        with torch.no_grad():
            ref = model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)
        top = ref.topk(3)
        assert set(lp) == set(top.indices.tolist()) | {tok}
        assert all(abs(lp[t] - float(ref[t])) < 1e-4 for t in lp)
        total += float(ref[tok])
        ids.append(tok)
    assert abs(out.cumulative_logprob - total) < 1e-3


def test_stop_token_ids_and_eos(model):
    prompt = prompts(1, seed=5)[0]
    ref = reference_greedy(model, prompt, 10)
    stop_id = ref[3]
    first = ref.index(stop_id)
    out = LLM(model, kv_cache_memory=2**22, speculative=True).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == ref[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_id
    out = LLM(model, kv_cache_memory=2**22).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4


def test_text_prompts_and_stop_strings(model, char_tokenizer):
    llm = LLM(model, tokenizer=char_tokenizer, kv_cache_memory=2**22)
    prompt = "The cache holds latents"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    ids = free.outputs[0].token_ids
    assert free.prompt_token_ids == [ord(c) for c in prompt]
    assert free.outputs[0].text == char_tokenizer.decode(ids)
    full = char_tokenizer.decode(ids)
    assert len(full) >= 6, f"greedy text too short: {full!r}"
    # a 2-character stop string taken from the text, at the first place it occurs
    at = next((i for i in range(2, len(full) - 1) if full.find(full[i:i + 2]) == i), None)
    assert at is not None, f"no usable stop string in {full!r}"
    stop = full[at:at + 2]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert out.outputs[0].text == full[:at] and out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop and len(out.outputs[0].token_ids) < len(ids)
    kept = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=stop,
                                               include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == full[:at + 2]


def test_stop_strings_cut_at_the_earliest_hit():
    # both complete with the same token; the list order must not decide where the text ends
    class Words:  # token i decodes to WORDS[i]
        WORDS = ["hello", " world"]

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.WORDS[i] for i in ids)

    detok = IncrementalDetokenizer(Words(), SamplingParams(stop=["world", "lo w"]))
    assert detok.add(0) is None and detok.text == "hello"
    assert detok.add(1) == "lo w"
    assert detok.text == "hel" and detok.output_text(finished=True) == "hel"


def test_eos_ends_a_request_unless_ignored(model):
    prompt = prompts(1, seed=5)[0]
    ref = reference_greedy(model, prompt, 10)
    eos = ref[3]
    first = ref.index(eos)
    with_eos = copy.deepcopy(model)
    with_eos.config.eos_token_id = eos
    llm = LLM(with_eos, kv_cache_memory=2**22, speculative=True)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    assert out.token_ids == ref[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == eos
    past = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert past.token_ids == ref and past.finish_reason == "length"


def test_bad_params_are_named():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_non_finite_sampling_values_are_rejected_naming_the_field():
    for name, value in (("temperature", float("inf")), ("temperature", float("nan")), ("top_p", float("nan")),
                        ("min_p", float("inf")), ("min_p", float("-inf"))):
        with pytest.raises(ValueError, match=rf"^SamplingParams\.{name}=.* must be a finite number$"):
            SamplingParams(**{name: value})
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=2.5)
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_a_tiny_temperature_is_greedy_not_a_crash(model):
    # logits / 1e-30 overflow to inf (softmax NaN, multinomial raised): below 1e-5 is greedy
    prompt = prompts(1, seed=16)[0]
    out = LLM(model, kv_cache_memory=2**22).generate([prompt], SamplingParams(temperature=1e-30, max_tokens=6))
    assert out[0].outputs[0].token_ids == reference_greedy(model, prompt, 6, eos=1)
    ids = model.generate(torch.tensor([prompt]), 6, temperature=1e-30)[0, len(prompt):].tolist()
    assert ids == reference_greedy(model, prompt, 6)


# ------------------------------------------------------------------------ async
def test_async_streams_match_offline_and_abort_frees_blocks(model):
    load = prompts(4, seed=6)
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = [reference_greedy(model, p, 8, eos=1) for p in load]

    async def scenario():
        engine = AsyncLLM(model, kv_cache_memory=2**22, block_size=4)

        async def collect(p):
            seen = []
            async for out in engine.generate(p, params):
                seen.append(list(out.outputs[0].token_ids))
            return seen

        streams = await asyncio.gather(*(collect(p) for p in load))
        # a consumer that walks away mid-stream: its request is aborted and its blocks freed
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        async with contextlib.aclosing(engine.generate(load[0], long)) as gen:
            async for out in gen:
                if len(out.outputs[0].token_ids) >= 3:
                    break
        # an explicit abort ends the stream with finish_reason "abort"
        last = None
        async for out in engine.generate(load[1], long, request_id="victim"):
            last = out
            if len(out.outputs[0].token_ids) >= 2:
                engine.abort("victim")
        for _ in range(5):
            await asyncio.sleep(0.01)
        bm = engine.engine.block_manager
        used = bm.num_used
        await engine.shutdown()
        return streams, last, used, bm.num_blocks

    streams, last, used, _ = asyncio.run(scenario())
    assert [s[-1] for s in streams] == expected
    assert all(len(s) >= 2 and all(len(a) <= len(b) for a, b in zip(s, s[1:])) for s in streams)  # streamed
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert used == 0


def test_async_client_cancelled_before_its_request_is_added(model):
    load = prompts(2, seed=10)
    params = SamplingParams(temperature=0, max_tokens=6)
    expected = reference_greedy(model, load[1], 6, eos=1)

    async def scenario():
        engine = AsyncLLM(model, kv_cache_memory=2**22, block_size=4)

        async def collect(p):
            return [out async for out in engine.generate(p, params)]

        gone = asyncio.create_task(collect(load[0]))
        other = asyncio.create_task(collect(load[1]))
        await asyncio.sleep(0)        # both wait for their add, which the loop has not run yet
        assert engine._ops, "the adds should still be queued"
        gone.cancel()
        outs = await asyncio.wait_for(other, timeout=30)  # hangs if the loop died
        with pytest.raises(asyncio.CancelledError):
            await gone
        for _ in range(3):
            await asyncio.sleep(0.01)
        state = (dict(engine._queues), dict(engine.engine.requests), engine.engine.has_unfinished(),
                 engine.engine.block_manager.num_used, engine._task.done())
        await engine.shutdown()
        return outs, state

    outs, (queues, requests, unfinished, used, loop_done) = asyncio.run(scenario())
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == expected
    assert not queues and not requests and not unfinished and used == 0  # the cancelled one was never added
    assert not loop_done


def test_async_client_cancelled_just_after_its_request_is_added(model):
    async def scenario():
        engine = AsyncLLM(model, kv_cache_memory=2**22, block_size=4)

        async def consume():
            return [o async for o in engine.generate([5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))]

        gone = asyncio.create_task(consume())
        await asyncio.sleep(0)
        engine._submit(gone.cancel)  # runs right after the add: the future holds a result, the task is cancelled
        with pytest.raises(asyncio.CancelledError):
            await gone
        for _ in range(5):
            await asyncio.sleep(0.01)
        state = (dict(engine._queues), dict(engine.engine.requests), engine.engine.block_manager.num_used)
        await engine.shutdown()
        return state

    queues, requests, used = asyncio.run(scenario())
    assert not queues and not requests and used == 0


def test_async_loop_survives_a_failing_op(model):
    async def scenario():
        engine = AsyncLLM(model, kv_cache_memory=2**22)
        engine._start()
        fut = asyncio.get_running_loop().create_future()
        engine._submit(lambda: 1 / 0, fut)
        with pytest.raises(ZeroDivisionError):
            await fut
        outs = [o async for o in engine.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=3))]
        alive = not engine._task.done()
        await engine.shutdown()
        return outs, alive

    outs, alive = asyncio.run(scenario())
    assert outs[-1].finished and alive


def test_async_rejects_bad_requests(model):
    async def scenario():
        engine = AsyncLLM(model, kv_cache_memory=2**22)
        try:
            with pytest.raises(ValueError, match="exceeds"):
                async for _ in engine.generate([5, 6], SamplingParams(max_tokens=10_000)):
                    pass
        finally:
            await engine.shutdown()
    asyncio.run(scenario())


# -------------------------------------------------------------------------- CLI
def test_cli_generate_streams_tokens(model, tmp_path, char_tokenizer):
    from typer.testing import CliRunner

    from nanoseek.cli import app
    nanoseek.save_pretrained(model, tmp_path)
    prompt = prompts(1, seed=8)[0]
    ref = reference_greedy(model, prompt, 6)
    res = CliRunner().invoke(app, ["generate", str(tmp_path), "--prompt-ids", ",".join(map(str, prompt)),
                                   "--max-tokens", "6", "--ignore-eos"])
    assert res.exit_code == 0, res.output
    assert " ".join(map(str, ref)) in res.output
    char_tokenizer.tok.save(str(tmp_path / "tokenizer.json"))
    res = CliRunner().invoke(app, ["generate", str(tmp_path), "-p", "Hello", "--max-tokens", "5", "--ignore-eos"])
    ids = reference_greedy(model, [ord(c) for c in "Hello"], 5)
    assert res.exit_code == 0 and res.output.startswith("Hello" + char_tokenizer.decode(ids)), res.output
    batch = ["Hello", "The cache holds latents"]
    res = CliRunner().invoke(app, ["generate", str(tmp_path), "-p", batch[0], "-p", batch[1], "--max-tokens", "4",
                                   "--ignore-eos"])
    assert res.exit_code == 0, res.output
    assert "[0]" in res.output and "[1]" in res.output
    for p in batch:  # each request's generated text, not just the echoed prompt
        gen = char_tokenizer.decode(reference_greedy(model, [ord(c) for c in p], 4))
        assert gen and (p + gen + "\n") in res.output, (p, gen, res.output)
    bad = CliRunner().invoke(app, ["generate", str(tmp_path), "--prompt-ids", "1,x"])
    assert bad.exit_code != 0 and "expected integers" in bad.output


def test_cli_stream_never_prints_a_stop_string(model, tmp_path, char_tokenizer):
    from typer.testing import CliRunner

    from nanoseek.cli import app
    nanoseek.save_pretrained(model, tmp_path)
    char_tokenizer.tok.save(str(tmp_path / "tokenizer.json"))
    prompt = "The cache holds latents"
    full = char_tokenizer.decode(reference_greedy(model, [ord(c) for c in prompt], 16))
    at = next((i for i in range(2, len(full) - 2) if full.find(full[i:i + 3]) == i), None)
    assert at is not None, f"no usable stop string in {full!r}"
    stop = full[at:at + 3]  # 3 characters, arriving over steps: the stream must hold back their start
    res = CliRunner().invoke(app, ["generate", str(tmp_path), "-p", prompt, "--max-tokens", "16",
                                   "--ignore-eos", "--stop", stop])
    assert res.exit_code == 0, res.output
    assert res.stdout == prompt + full[:at] + "\n", (stop, res.stdout)  # stdout: the streamed text only


def test_n_completions_per_prompt(model):
    load = prompts(2, seed=9, lo=40, hi=41)
    llm = LLM(model, kv_cache_memory=2**22)
    outs = llm.generate(load, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6))
    assert [len(o.outputs) for o in outs] == [3, 3] and [c.index for c in outs[0].outputs] == [0, 1, 2]
    samples = [c.token_ids for c in outs[0].outputs]
    assert len({tuple(s) for s in samples}) == 3  # different seeds, different samples
    again = llm.generate(load[:1], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6))
    assert [c.token_ids for c in again[0].outputs] == samples
    assert again[0].num_cached_tokens == 32  # the prompt's two full blocks come from the prefix cache


def test_streamed_text_only_grows_even_with_stop_strings(model, char_tokenizer):
    prompt = "Latent attention"
    llm = LLM(model, tokenizer=char_tokenizer, kv_cache_memory=2**22)
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0].text
    stop = full[6:9]  # a 3-character stop string, arriving one character per step
    assert len(stop) == 3, f"greedy text too short: {full!r}"

    async def stream():
        engine = AsyncLLM.from_engine(llm.engine)
        texts = [o.outputs[0].text async for o in engine.generate(
            prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]))]
        await engine.shutdown()
        return texts

    texts = asyncio.run(stream())
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert texts[-1] == full[:full.find(stop)]
    assert all(len(t) <= full.find(stop) for t in texts)  # no part of the stop string was ever shown
