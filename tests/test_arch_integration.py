"""V3.2 and V4 beside the rest of nanoseek: the engine and CausalLM.generate both serve them,
with the same greedy tokens; FP8 quantisation of the model keeps what DeepSeek's releases keep
in high precision."""

import pytest
import torch

from nanoseek.config import preset
from nanoseek.engine import SamplingParams
from nanoseek.engine.engine import LLMEngine
from nanoseek.model import CausalLM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["tiny-v32", "tiny-v4"])
def test_generate_and_the_engine_serve_new_architectures(name):
    cfg = preset(name, vocab_size=64, num_hidden_layers=4 if name == "tiny-v4" else 2,
                 hidden_size=64, moe_intermediate_size=32, intermediate_size=64)
    model = CausalLM(cfg).eval()
    ids = torch.randint(3, 64, (2, 9))
    engine = LLMEngine(model, kv_cache_memory="16MiB")  # V4: paged windows and compressed entries
    seqs = [engine.add_request(row, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)) for row in ids.tolist()]
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in seqs] == model.generate(ids, max_new_tokens=5)[:, 9:].tolist()
    out = model.generate(ids, max_new_tokens=5)
    assert out.shape == (2, 14) and torch.equal(out[:, :9], ids)
    # greedy decoding through the cache picks what the full forward picks
    with torch.no_grad():
        full = model(out[:, :-1])
    assert torch.equal(full[:, 8:].argmax(-1), out[:, 9:])


def test_fp8_model_keeps_the_v4_high_precision_parts_and_runs():
    from nanoseek.quant.model import fp8_targets, quantize_model_fp8

    cfg = preset("tiny-v4", vocab_size=64, hidden_size=128, moe_intermediate_size=32)
    model = CausalLM(cfg).eval()
    names = [full for *_, full in fp8_targets(model)]
    assert any(n.endswith("self_attn.q_b_proj") for n in names)
    assert any(n.endswith("compressor.indexer.q_b_proj") for n in names)
    for kept in ("o_a_proj", "compressor.kv_proj", "compressor.gate_proj", "weights_proj",
                 "compressor.indexer.kv_proj"):
        assert not any(n.endswith(kept) for n in names), kept
    ids = torch.randint(3, 64, (1, 40))
    with torch.no_grad():
        ref = model(ids)
        quantize_model_fp8(model)
        out = model(ids)
    assert torch.isfinite(out).all() and out.shape == ref.shape


def test_generate_cli_serves_a_v4_checkpoint_and_refuses_what_it_cannot_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from nanoseek.cli import app

    cfg = preset("tiny-v4", vocab_size=64, hidden_size=64, moe_intermediate_size=32)
    CausalLM(cfg).save_pretrained(tmp_path / "v4")
    r = CliRunner().invoke(app, ["generate", str(tmp_path / "v4"), "--prompt-ids", "1,2,3", "--max-tokens", "4",
                                 "--kv-cache-memory", "16MiB"])
    assert r.exit_code == 0, r.output
    compressed_mtp = preset("tiny-v4", vocab_size=64, hidden_size=64, moe_intermediate_size=32,
                            mtp_layer_type=cfg.layer_types[1])
    CausalLM(compressed_mtp).save_pretrained(tmp_path / "v4c")
    r = CliRunner().invoke(app, ["generate", str(tmp_path / "v4c"), "--prompt-ids", "1,2,3", "--speculative",
                                 "--kv-cache-memory", "16MiB"])
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and "--no-speculative" in r.output and "Traceback" not in r.output


def test_fp8_model_quantises_the_v32_indexer_projections_as_released():
    from nanoseek.quant.model import fp8_targets, quantize_model_fp8

    model = CausalLM(preset("tiny-v32", vocab_size=64)).eval()
    names = [full for *_, full in fp8_targets(model)]
    assert any(n.endswith("indexer.wq_b") for n in names) and any(n.endswith("indexer.wk") for n in names)
    assert not any(n.endswith("indexer.weights_proj") for n in names)
    ids = torch.randint(3, 64, (1, 80))
    with torch.no_grad():
        quantize_model_fp8(model)
        assert torch.isfinite(model(ids)).all()
