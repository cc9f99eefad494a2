"""LoRA through peft on nanoseek's linears (save -> load -> merge gives the same logits),
LoRA SFT runs and resumes. QLoRA: tests/test_qlora.py."""

import json

import pytest
import torch
from typer.testing import CliRunner

from nanoseek import from_pretrained
from nanoseek.cli import app
from nanoseek.model import CausalLM
from nanoseek.train.posttrain.lora import LoraSettings, add_lora, load_adapter, save_adapter
from nanoseek.train.posttrain.sft import SFTConfig, sft, sft_train_config
from tests.posttrain_utils import PAIRS, make_init, write_jsonl
from tests.train_utils import micro_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_adapter(model, seed=1):
    """Adapters with non-zero B (as after training), so merging changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_lora_wraps_every_projection_and_freezes_the_rest():
    torch.manual_seed(0)
    model = add_lora(CausalLM(micro_config()), LoraSettings(r=4))
    wrapped = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert wrapped == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                       "gate_proj", "up_proj", "down_proj"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="unknown module name"):
        LoraSettings(r=4, targets=["wq"]).validate()


def test_lora_save_load_merge_give_the_same_logits(tmp_path):
    torch.manual_seed(0)
    base = CausalLM(micro_config()).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = _trained_adapter(add_lora(base, LoraSettings(r=4, alpha=8)))
    x = torch.randint(3, 384, (2, 12))
    with torch.no_grad():
        adapted = model(x)
        assert (adapted - CausalLM(micro_config()).eval().requires_grad_(False)(x)).abs().max() > 1e-3
    save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4
    fresh = CausalLM(micro_config())
    fresh.load_state_dict(state)
    loaded = load_adapter(fresh, tmp_path).eval()
    merged = loaded.merge_and_unload()
    assert type(merged) is CausalLM
    with torch.no_grad():
        assert (merged(x) - adapted).abs().max() <= 1e-5
        gen_merged = merged.generate(x[:1, :5], 6)  # absorbed decode over merged weights
        gen_lora = _trained_adapter(add_lora(_with(state), LoraSettings(r=4, alpha=8))).eval().generate(x[:1, :5], 6)
    assert torch.equal(gen_merged, gen_lora)  # the adapter model decodes without absorption


def _with(state):
    m = CausalLM(micro_config())
    m.load_state_dict(state)
    return m


def test_lora_sft_trains_adapters_resumes_and_merges(tmp_path):
    init = make_init(tmp_path / "init")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    quiet = dict(progress=False, log=lambda *a: None)

    def cfg(steps, merge=False):
        return SFTConfig(init=str(init), data=[str(data)], merge=merge, lora=LoraSettings(r=8, alpha=16),
                         train=sft_train_config(max_steps=steps, batch_size=2, seq_len=64, lr=2e-2,
                                                warmup_steps=2, save_every=4, schedule="constant"))
    run = sft(tmp_path / "whole", cfg(8, merge=True), **quiet)
    assert run["loss_after"] < run["loss_before"] - 0.5
    state = torch.load(tmp_path / "whole" / "train_state.pt", weights_only=False)
    assert state["model"] and all("lora_" in k for k in state["model"])  # the adapters only
    sft(tmp_path / "parts", cfg(4), **quiet)
    sft(tmp_path / "parts", cfg(4), resume=True, max_steps=8, **quiet)
    runner = CliRunner()
    r = runner.invoke(app, ["merge-lora", "--model", str(init), "--adapter", str(tmp_path / "parts"),
                            "--out", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    a, b = from_pretrained(tmp_path / "whole"), from_pretrained(tmp_path / "merged")
    x = torch.randint(3, 384, (1, 16))
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max() <= 1e-5
        assert (a(x) - from_pretrained(init)(x)).abs().max() > 1e-3
    r = runner.invoke(app, ["merge-lora", "--model", str(init), "--adapter", str(init), "--out", str(tmp_path / "m2")])
    assert r.exit_code == 2 and "no adapter_config.json" in r.output
