"""bf16 training (fp32 master weights, fp32 router and losses), `auto` precision detection,
and compiled blocks against the eager reference."""

import pytest
import torch

from nanoseek.config import preset
from nanoseek.model import CausalLM
from nanoseek.model.moe import Gate
from nanoseek.recipes.speedrun import SPEEDRUN_DEFAULT_STEPS, SPEEDRUN_STEPS, default_steps
from nanoseek.train.numerics import precision as prec
from nanoseek.train.numerics.compile import compile_blocks, compiled_blocks, resolve_compile
from nanoseek.train.loop import TrainConfig, read_metrics
from nanoseek.train.pretrain import default_device
from tests.test_train_loop import _trainer
from tests.train_utils import micro_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_router_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    gate = Gate(micro_config())
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(64, gate.weight.shape[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights, indices, scores, logits = gate(x)
    assert logits.dtype == scores.dtype == weights.dtype == torch.float32
    ref = gate(x)
    torch.testing.assert_close(logits, ref[3])  # the same fp32 numbers, not bf16-rounded ones
    assert torch.equal(indices, ref[1])


def test_bf16_step_keeps_fp32_master_weights_and_optimizer_state(tmp_path):
    tr = _trainer(tmp_path, max_steps=2, precision="bf16")
    tr.fit()
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    states = [s for s in tr.optimizer.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)


def test_bf16_and_fp32_steps_agree(tmp_path):
    """Tolerance: after 4 steps at lr 1e-2 the losses differ by under 2 % (bf16's 8-bit
    mantissa in the matmuls; router and losses are fp32). Measured: ~0.3 %."""
    losses = {}
    for precision in ("fp32", "bf16"):
        tr = _trainer(tmp_path / precision, max_steps=4, precision=precision)
        tr.fit()
        losses[precision] = [r["loss"] for r in read_metrics(tmp_path / precision) if r["kind"] == "train"]
    assert losses["fp32"] != losses["bf16"]  # bf16 really ran
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert abs(a - b) / a < 0.02, (losses["fp32"], losses["bf16"])


@pytest.mark.parametrize("flags, expected", [
    ({"avx512f", "amx_bf16", "amx_tile"}, "bf16"),
    ({"avx512f", "avx512_bf16"}, "bf16"),
    ({"avx512f", "avx2"}, "fp32"),
])
def test_auto_precision_follows_the_cpu_flags(monkeypatch, flags, expected):
    prec.fast_bf16.cache_clear()
    monkeypatch.setattr(prec, "cpu_flags", lambda: flags)
    try:
        chosen, why = prec.choose_precision("auto", torch.device("cpu"))
    finally:
        prec.fast_bf16.cache_clear()
    assert chosen == expected and why.startswith("auto: CPU")
    assert prec.choose_precision("fp16", torch.device("cpu")) == ("fp16", "asked for")


def test_unknown_cpu_flags_are_decided_by_a_measured_matmul(monkeypatch):
    monkeypatch.setattr(prec, "bf16_matmul_speedup", lambda: 3.0)
    assert prec.cpu_fast_bf16(None)[0]
    monkeypatch.setattr(prec, "bf16_matmul_speedup", lambda: 0.2)
    fast, why = prec.cpu_fast_bf16(None)
    assert not fast and "0.20x" in why


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16\n\nprocessor\t: 1\n")
    assert prec.cpu_flags(info) == {"fpu", "avx512f", "amx_bf16"}
    assert prec.cpu_flags(tmp_path / "missing") is None


def test_trainer_says_which_precision_and_why(tmp_path):
    tr = _trainer(tmp_path, max_steps=1)
    assert tr.precision in ("fp32", "bf16") and tr.precision_reason.startswith("auto: CPU")
    narrow = tr.model.config.hidden_size < prec.CPU_BF16_MIN_HIDDEN
    assert (tr.precision == "bf16") == (prec.fast_bf16("cpu")[0] and not narrow)


@pytest.mark.parametrize("hidden, expected", [(None, "bf16"), (48, "fp32"), (255, "fp32"),
                                              (256, "bf16"), (7168, "bf16")])
def test_auto_bf16_on_a_cpu_only_for_wide_enough_models(monkeypatch, hidden, expected):
    prec.fast_bf16.cache_clear()
    monkeypatch.setattr(prec, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    try:
        chosen, why = prec.choose_precision("auto", torch.device("cpu"), hidden)
    finally:
        prec.fast_bf16.cache_clear()
    assert chosen == expected, why
    assert why.startswith("auto: CPU with avx512_bf16") and (f"hidden size {hidden}" in why) == (expected == "fp32")
    assert prec.choose_precision("bf16", torch.device("cpu"), 64) == ("bf16", "asked for")


def test_hidden_size_is_read_from_the_model_or_its_policy():
    from nanoseek.train.rl.ppo import ActorCritic
    model = CausalLM(micro_config())
    assert prec.hidden_size_of(model) == model.config.hidden_size
    assert prec.hidden_size_of(ActorCritic(model)) == model.config.hidden_size
    assert prec.hidden_size_of(torch.nn.Linear(2, 2)) is None


def test_compile_option_is_checked_and_auto_is_off_on_cpu():
    assert resolve_compile("auto", torch.device("cpu"))[0] is False
    assert resolve_compile("on", torch.device("cpu")) == (True, "asked for (--compile on)")
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="yes").validate()


def test_compiled_block_equals_eager():
    """Fast check of the compiled path (aot_eager: Dynamo's graphs, graph breaks and
    AOTAutograd's backward, without code generation): same loss and gradients as eager
    within 1e-5."""
    torch.manual_seed(0)
    cfg = micro_config(num_nextn_predict_layers=0, num_hidden_layers=2)
    eager = CausalLM(cfg).train()
    compiled = CausalLM(cfg).train()
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled, backend="aot_eager")
    assert len(compiled_blocks(compiled)) == 2
    assert list(compiled.state_dict()) == list(eager.state_dict())  # same names: saves as eager
    ids = torch.randint(3, cfg.vocab_size, (2, 17))
    losses = []
    for m in (eager, compiled):
        loss = m.loss(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_compiled_training_steps_equal_eager(tmp_path):
    """The whole step with inductor (C++ code generation; a minute or more on a small CPU):
    the losses of 3 steps agree with eager within 1e-4 relative."""
    losses = {}
    for mode in ("off", "on"):
        tr = _trainer(tmp_path / mode, max_steps=3, precision="fp32", compile=mode)
        tr.fit()
        losses[mode] = [r["loss"] for r in read_metrics(tmp_path / mode) if r["kind"] == "train"]
        assert tr.compiled == (mode == "on")
    assert [r for r in read_metrics(tmp_path / "on") if r["kind"] == "compile"]
    for a, b in zip(losses["off"], losses["on"]):
        assert abs(a - b) / a < 1e-4, losses


def test_speedrun_spends_bf16_speed_on_steps():
    hidden = preset("tiny").hidden_size
    assert default_steps("fp32", hidden) == (SPEEDRUN_DEFAULT_STEPS, "fp32")
    assert default_steps("bf16", hidden) == (SPEEDRUN_STEPS["bf16"], "bf16")
    assert SPEEDRUN_STEPS["bf16"] > SPEEDRUN_DEFAULT_STEPS
    auto = prec.choose_precision("auto", default_device(), hidden)[0]
    assert default_steps("auto", hidden)[1] == auto
