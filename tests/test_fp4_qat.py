"""FP4 quantisation-aware training of the routed experts (quant/fp4_qat.py): the fake
quantisation is V4's FP4 format bit for bit, its gradient is straight-through, the Trainer
switches it on at `fp4_experts_from`, and a checkpoint written with FP4 experts loads (in
nanoseek and transformers) as the fake-quantised model."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from nanoseek.checkpoint.hf import CheckpointError, save_pretrained
from nanoseek.config import preset
from nanoseek.model import CausalLM
from nanoseek.quant.fp4 import E2M1, dequantize_fp4, quantize_fp4
from nanoseek.quant.fp4_qat import (FP4QATLinear, fake_quantize_fp4, fp4_experts_on, fp4_round,
                                    routed_expert_linears, set_fp4_experts)
from nanoseek.train.loop import TrainConfig, Trainer
from nanoseek.train.pretrain import pretrain_loss

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"tiny": dict(vocab_size=384, hidden_size=64),
         "tiny-v4": dict(vocab_size=384, hidden_size=64, index_topk=4, max_position_embeddings=128)}


def _model(name: str, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(preset(name, **SMALL[name]))


def _weights(seed: int = 0) -> torch.Tensor:
    """Rows of very different ranges, E2M1 ties, an all-zero group, -0 and tiny negatives,
    and a partial last group (N = 80: groups of 32, 32 and 16)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 80, generator=g) * 10 ** torch.empty(48, 1).uniform_(-5, 2, generator=g)
    w[0, :9] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 6.0]) * 2.0 ** -5
    w[1, :32] = 0.0
    w[2, 3], w[2, 4] = -0.0, -1e-12
    return w


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).float()


# ------------------------------------------------------------------ the format
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_is_dequant_of_quant_bit_for_bit(dtype):
    w = _weights().to(dtype)
    got = fp4_round(w)
    assert got.dtype == dtype
    want = dequantize_fp4(*quantize_fp4(w.float()))
    assert torch.equal(got.float().view(torch.int32), want.view(torch.int32))  # -0 vs +0 included


def test_values_are_e2m1_times_a_power_of_two_per_32():
    """Each group of 32 inputs of a row: Q(w) = s · c with s the smallest power of two that
    puts the group's largest magnitude at or under 6, every c on the E2M1 grid, and c the
    grid value nearest w / s."""
    w = _weights(1)
    q = fp4_round(w)
    grid = torch.tensor(sorted(set(E2M1)), dtype=torch.float64)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], 32):
            wg, qg = w[r, start:start + 32].double(), q[r, start:start + 32].double()
            amax = wg.abs().max()
            s = 2.0 ** torch.ceil(torch.log2(amax / 6)) if amax > 0 else torch.tensor(1.0, dtype=torch.float64)
            assert amax / s <= 6 and (amax == 0 or amax / s > 3)  # the smallest such power of two
            c = qg / s
            assert torch.isin(c, grid).all(), (r, start)
            gap = (wg / s - grid[:, None]).abs().min(dim=0).values
            assert torch.allclose((wg / s - c).abs(), gap), (r, start)


def test_gradient_is_straight_through():
    """∂L/∂w is ∂L/∂Q(w): the gradient a Linear holding Q(w) itself would get."""
    w = _weights(2)[:16, :64].clone().requires_grad_(True)
    x = torch.randn(5, 64)
    target = torch.randn(5, 16)
    F.mse_loss(F.linear(x, fake_quantize_fp4(w)), target).backward()
    q = fp4_round(w.detach()).requires_grad_(True)
    F.mse_loss(F.linear(x, q), target).backward()
    assert torch.equal(w.grad, q.grad)
    assert not torch.equal(q.detach(), w.detach())  # the forward did quantise


@pytest.mark.parametrize("name", ["tiny", "tiny-v4"])
def test_switching_the_experts_changes_only_their_forward(name):
    """On: each routed expert's Linear (main layers and MTP) multiplies by Q(weight), the
    same Parameter objects and state-dict names; the model equals one whose expert weights
    are Q(weight), gradients included. Off: the model is as it was."""
    model, ref = _model(name), _model(name)
    ids = torch.randint(3, 384, (2, 17))
    before = _logits(model, ids)
    params, keys = list(model.parameters()), list(model.state_dict())
    n = set_fp4_experts(model, True)
    experts = routed_expert_linears(model)
    assert n == len(experts) == 3 * model.config.n_routed_experts * len(model.moe_layers())
    assert any(name.startswith("mtp.") for name, _ in experts)
    assert all(type(m) is FP4QATLinear for _, m in experts) and fp4_experts_on(model)
    assert list(model.parameters()) == params and list(model.state_dict()) == keys
    with torch.no_grad():
        for (_, m), (_, r) in zip(experts, routed_expert_linears(ref)):
            r.weight.copy_(fp4_round(m.weight))
    for m in (model, ref):
        m.train()
        m.loss(ids[:, :-1], ids[:, 1:]).loss.backward()
    grads = [(a.grad, b.grad) for a, b in zip(model.parameters(), ref.parameters())]
    assert all(a is None and b is None or torch.equal(a, b) for a, b in grads)
    assert sum(a is not None for a, _ in grads) > len(grads) // 2
    model.eval()
    assert torch.equal(_logits(model, ids), _logits(ref.eval(), ids))
    set_fp4_experts(model, False)
    assert not fp4_experts_on(model) and all(type(m) is torch.nn.Linear for _, m in experts)
    assert torch.equal(_logits(model, ids), before)


# ------------------------------------------------------------------ the Trainer
def _trainer(model, tmp_path, **train):
    batch = torch.randint(3, 384, (2, 33), generator=torch.Generator().manual_seed(1))
    seen = []

    def loss_fn(m, b, targets):
        seen.append(fp4_experts_on(m))
        return pretrain_loss(m, b, targets)
    cfg = TrainConfig(max_steps=4, batch_size=2, seq_len=32, warmup_steps=0, compile="off", **train)
    trainer = Trainer(model, cfg, tmp_path, next_batch=lambda step, micro: (batch[:, :-1], batch[:, 1:]),
                      loss_fn=loss_fn, count_targets=lambda b: model.loss_targets(b[1]), progress=False)
    return trainer, seen


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_turns_fp4_on_at_the_chosen_step(tmp_path, precision):
    """Steps before `fp4_experts_from` train plain experts, the ones from it on fake-quantised;
    the fp32 masters still move (bf16: through the bf16 copies' straight-through gradient)."""
    model = _model("tiny")
    trainer, seen = _trainer(model, tmp_path, fp4_experts_from=2, precision=precision)
    expert = routed_expert_linears(model)[0][1].weight
    for _ in range(2):
        trainer.train_step()
    start = expert.detach().clone()
    trainer.train_step()
    trainer.train_step()
    assert seen == [False, False, True, True]
    assert expert.dtype == torch.float32 and not torch.equal(expert, start)


def test_a_resumed_run_is_in_the_stage_it_left(tmp_path):
    model = _model("tiny")
    trainer, seen = _trainer(model, tmp_path, fp4_experts_from=3)
    trainer.step = 3  # as load_loop_state leaves it
    trainer.train_step()
    assert seen == [True]


def test_off_by_default_and_bad_values_are_refused(tmp_path):
    model = _model("tiny")
    trainer, seen = _trainer(model, tmp_path)
    trainer.train_step()
    assert seen == [False]
    with pytest.raises(ValueError, match="training option 'fp4_experts_from': must be an integer >= 0, got -1"):
        TrainConfig(fp4_experts_from=-1).validate()
    with pytest.raises(ValueError, match="fp4_experts_from"):
        TrainConfig(fp4_experts_from=1.5).validate()
    dense = CausalLM(preset("tiny", vocab_size=384, hidden_size=64, first_k_dense_replace=4,
                            num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="no routed experts"):
        _trainer(dense, tmp_path, fp4_experts_from=0)
    with pytest.raises(ValueError, match="no routed experts"):
        set_fp4_experts(dense, True)


def test_cli_flag_checks_its_value():
    from typer.testing import CliRunner

    from nanoseek.cli import app
    r = CliRunner().invoke(app, ["pretrain", "--out", "unused", "--fp4-experts-from", "-1"])
    assert r.exit_code != 0 and "must be an integer >= 0, got -1" in r.output


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", ["tiny", "tiny-v4"])
def test_fp4_checkpoint_loads_as_the_fake_quantised_model(tmp_path, name):
    """save_pretrained(fp4_experts=True): packed int8 codes + UE8M0 `.scale` per 32 for every
    routed expert, V4-Flash's quantization_config; nanoseek loads the logits of the
    fake-quantised model exactly; `convert --quantization fp4-experts` of the fp32
    checkpoint writes the same tensors."""
    from safetensors.torch import load_file

    from nanoseek.checkpoint.convert import convert
    model = _model(name).eval()
    ids = torch.randint(3, 384, (2, 19))
    save_pretrained(model, tmp_path / "fp4", fp4_experts=True)
    save_pretrained(model, tmp_path / "fp32")
    set_fp4_experts(model, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = CausalLM.from_pretrained(tmp_path / "fp4")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    tensors = load_file(tmp_path / "fp4" / "model.safetensors")
    codes = {k: t for k, t in tensors.items() if t.dtype == torch.int8}
    assert len(codes) == len(routed_expert_linears(model))
    assert all(tensors[k.removesuffix("weight") + "scale"].dtype == torch.float8_e8m0fnu for k in codes)
    qc = json.loads((tmp_path / "fp4" / "config.json").read_text())["quantization_config"]
    assert qc["expert_dtype"] == "fp4" and qc["quant_method"] == "fp8"
    report = convert(tmp_path / "fp32", tmp_path / "conv", "fp4-experts", "fp32", progress=False)
    assert report.quantised == len(codes) and 0.05 < report.rel_error_mean < 0.2
    converted = load_file(tmp_path / "conv" / "model.safetensors")
    assert converted.keys() == tensors.keys()
    assert all(torch.equal(converted[k].view(torch.uint8), t.view(torch.uint8)) for k, t in tensors.items())


@pytest.mark.parametrize("name", ["tiny", "tiny-v4"])
def test_transformers_reads_the_fp4_experts(tmp_path, name):
    """transformers 5.25 on a CPU: FineGrainedFP8Config dequantises the packed experts (its
    FP8 path needs a GPU), giving the fake-quantised model's logits."""
    import transformers
    model = _model(name).eval()
    save_pretrained(model, tmp_path, fp4_experts=True)
    set_fp4_experts(model, True)
    cls = transformers.DeepseekV4ForCausalLM if name == "tiny-v4" else transformers.DeepseekV3ForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf = cls.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(3, 384, (1, 19))
    with torch.no_grad():
        theirs = tf(ids).logits
    assert torch.allclose(theirs, _logits(model, ids), atol=1e-4, rtol=0)


def test_fp4_writing_refusals(tmp_path):
    from nanoseek.checkpoint.convert import convert
    from nanoseek.quant.model import quantize_model_fp8
    model = _model("tiny")
    with pytest.raises(CheckpointError, match="fp4_experts with FP8"):
        save_pretrained(quantize_model_fp8(_model("tiny")), tmp_path / "a", fp4_experts=True)
    save_pretrained(model, tmp_path / "fp4", fp4_experts=True)
    with pytest.raises(CheckpointError, match="already quantised"):
        convert(tmp_path / "fp4", tmp_path / "b", "fp4-experts", progress=False)
    odd = torch.nn.Module()  # an expert whose inputs do not pair up into bytes
    odd.mlp = torch.nn.Module()
    odd.mlp.experts = torch.nn.ModuleList([torch.nn.ModuleDict({"gate_proj": torch.nn.Linear(33, 4)})])
    with pytest.raises(ValueError, match="mlp.experts.0.gate_proj: .* in_features 33 is odd"):
        set_fp4_experts(odd, True)


# ------------------------------------------------------------------ the post-training stages
POST = {  # the command line without the flag, and the function it hands its settings to
    "sft": (["sft", "--model", "x", "--out", "y", "--task", "arithmetic"], "nanoseek.train.posttrain.sft", "sft"),
    "dpo": (["dpo", "--model", "x", "--out", "y"], "nanoseek.train.posttrain.dpo", "dpo"),
    "grpo": (["grpo", "--model", "x", "--out", "y"], "nanoseek.train.rl.run", "rl"),
    "distill": (["distill", "--student", "x", "--teacher", "t", "--task", "arithmetic", "--out", "y"],
                "nanoseek.train.rl.distill", "distill"),
}


@pytest.mark.parametrize("stage", list(POST))
def test_every_post_training_command_takes_the_flag(monkeypatch, stage):
    import importlib

    from tests.test_cli import assert_user_error, invoke
    command, module, name = POST[stage]

    def stand_in(*args, **kw):
        raise RuntimeError(args, kw)
    monkeypatch.setattr(importlib.import_module(module), name, stand_in)
    for given, expected in ((["--fp4-experts-from", "3"], 3), ([], None)):
        args, _ = invoke(*command, *given).exception.args
        assert next(a for a in args if hasattr(a, "train")).train.fp4_experts_from == expected
    assert_user_error(invoke(*command, "--fp4-experts-from", "-1"), "--fp4-experts-from", "got -1")


@pytest.fixture
def fp4_spy(monkeypatch):
    """What each stage's model runs: `states` the Trainer's (step, experts in FP4) at each
    step; `rollouts` (step, FP4 expert forwards inside the engine's sampling) per rollout;
    `forwards` every FP4 expert forward (grad on, grad off)."""
    from nanoseek.train.rl import distill, grpo
    spy = {"states": [], "rollouts": [], "forwards": [0, 0]}
    fp4_experts, forward = Trainer._fp4_experts, FP4QATLinear.forward

    def spied_state(self):
        fp4_experts(self)
        spy["states"].append((self.step, self.fp4_experts))

    def spied_forward(self, x):
        spy["forwards"][0 if torch.is_grad_enabled() else 1] += 1
        return forward(self, x)

    def spied_sampling(real):
        def sample(*args, **kw):
            before = sum(spy["forwards"])
            out = real(*args, **kw)
            spy["rollouts"].append((spy["states"][-1][0], sum(spy["forwards"]) - before))
            return out
        return sample
    monkeypatch.setattr(Trainer, "_fp4_experts", spied_state)
    monkeypatch.setattr(FP4QATLinear, "forward", spied_forward)
    for module in (grpo, distill):
        monkeypatch.setattr(module, "sample_rollouts", spied_sampling(module.sample_rollouts))
    return spy


@pytest.fixture(scope="module")
def post_init(tmp_path_factory):
    from tests.posttrain_utils import make_init
    return make_init(tmp_path_factory.mktemp("init"))


@pytest.fixture(scope="module")
def post_data(tmp_path_factory):
    from tests.posttrain_utils import PAIRS, write_jsonl
    root = tmp_path_factory.mktemp("data")
    sft = write_jsonl(root / "sft.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    pairs = write_jsonl(root / "pairs.jsonl", [{"prompt": p, "chosen": r, "rejected": PAIRS[(i + 1) % len(PAIRS)][1]}
                                               for i, (p, r) in enumerate(PAIRS)])
    return sft, pairs


QUIET = dict(progress=False, log=lambda *a: None)


def test_sft_and_dpo_train_in_fp4_from_the_step(tmp_path, post_init, post_data, fp4_spy, monkeypatch):
    """Step 0 plain, step 1 on: the experts train fake-quantised (grad on). DPO's frozen
    reference is a copy of the starting model and keeps its full-precision experts."""
    from nanoseek.train.posttrain.dpo import DPOConfig, dpo, dpo_train_config
    from nanoseek.train.posttrain.sft import SFTConfig, sft, sft_train_config
    short = dict(max_steps=2, batch_size=2, seq_len=64, warmup_steps=0, fp4_experts_from=1)
    sft(tmp_path / "sft", SFTConfig(init=str(post_init), data=[str(post_data[0])],
                                    train=sft_train_config(**short)), **QUIET)
    assert fp4_spy["states"] == [(0, False), (1, True)] and fp4_spy["forwards"][0] > 0
    fp4_spy["states"].clear()
    seen = []
    real = torch.nn.Linear.forward
    import nanoseek.train.posttrain.dpo as dpo_module
    frozen_copy = dpo_module.frozen_copy

    def spied_copy(model):  # the reference's expert forwards: which class ran them
        ref = frozen_copy(model)
        for _, m in routed_expert_linears(ref):
            m.forward = lambda x, m=m: (seen.append(type(m)), real(m, x))[1]
        return ref
    monkeypatch.setattr(dpo_module, "frozen_copy", spied_copy)
    dpo(tmp_path / "dpo", DPOConfig(init=str(post_init), data=[str(post_data[1])],
                                    train=dpo_train_config(**short)), **QUIET)
    assert fp4_spy["states"] == [(0, False), (1, True)]
    assert seen and set(seen) == {torch.nn.Linear}


def test_lora_and_qlora_are_refused_with_fp4(post_init, post_data):
    from nanoseek.train.posttrain.settings import DPOConfig, LoraSettings, SFTConfig, dpo_train_config, sft_train_config
    for qlora in (False, True):
        lora = LoraSettings(r=4, qlora=qlora)
        for cfg in (SFTConfig(init=str(post_init), data=[str(post_data[0])], lora=lora,
                              train=sft_train_config(fp4_experts_from=0)),
                    DPOConfig(init=str(post_init), data=[str(post_data[1])], lora=lora,
                              train=dpo_train_config(fp4_experts_from=0))):
            with pytest.raises(ValueError, match="--fp4-experts-from with --lora/--qlora is not supported"):
                cfg.validate()
    from tests.test_cli import assert_user_error, invoke
    for command in (["sft", "--task", "arithmetic", "--lora"], ["dpo", "--data", post_data[1], "--qlora"]):
        res = invoke(*command, "--model", post_init, "--out", post_init / "unused", "--fp4-experts-from", "0")
        assert_user_error(res, "--fp4-experts-from with --lora/--qlora is not supported")


@pytest.fixture
def vowels(monkeypatch):
    from nanoseek.data.tasks import TASKS
    from tests.test_grpo import Vowels
    monkeypatch.setitem(TASKS, "vowels", Vowels)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_rl_rollouts_and_updates_see_fp4_experts(tmp_path, post_init, vowels, fp4_spy, algo, monkeypatch):
    """The engine samples the live policy: from the step on, its rollouts run through the FP4
    experts (grad off), the update's forward too (grad on), and the two agree on the sampled
    tokens' log-probs (logp_mismatch) as they do without FP4. The KL reference, copied before
    the switch, keeps full-precision experts; PPO's critic, a copy of the policy's trunk
    inside the trained model, is switched with it."""
    from nanoseek.train.rl import grpo
    from nanoseek.train.rl.config import RLConfig, rl_train_config
    from nanoseek.train.rl.run import rl
    from nanoseek.train.run.metrics import read_metrics
    stages, stage_init = [], grpo.RLStage.__init__

    def spied_init(self, *args, **kw):
        stage_init(self, *args, **kw)
        stages.append(self)
    monkeypatch.setattr(grpo.RLStage, "__init__", spied_init)
    train = rl_train_config(max_steps=2, batch_size=2, lr=3e-3, warmup_steps=0, eval_every=0,
                            save_every=2, fp4_experts_from=1)
    cfg = RLConfig(init=str(post_init), task="vowels", algo=algo, train=train, num_generations=2,
                   eval_n=2, max_completion_length=6, beta=0.04)
    rl(tmp_path / algo, cfg, **QUIET)
    assert fp4_spy["states"] == [(0, False), (1, True)]
    (stage,) = stages
    assert fp4_experts_on(stage.policy) and not fp4_experts_on(stage.ref)
    assert algo == "grpo" or fp4_experts_on(stage.model.critic)
    by_step = dict(fp4_spy["rollouts"])
    assert by_step[0] == 0 and by_step[1] > 0 and fp4_spy["forwards"][0] > 0
    recs = [r for r in read_metrics(tmp_path / algo) if r["kind"] == "train"]
    assert len(recs) == 2 and all(r["logp_mismatch"] < 1e-4 for r in recs if algo == "grpo"), recs


def test_distill_student_samples_fp4_experts(tmp_path, post_init, vowels, fp4_spy):
    from nanoseek.train.rl.config import rl_train_config
    from nanoseek.train.rl.distill import distill
    from nanoseek.train.rl.distill_config import DistillConfig
    train = rl_train_config(max_steps=2, batch_size=2, lr=3e-3, warmup_steps=0, eval_every=0,
                            save_every=2, fp4_experts_from=1)
    cfg = DistillConfig(init=str(post_init), teachers=[str(post_init)], tasks=["vowels"], train=train,
                        num_generations=2, eval_n=2, max_completion_length=6)
    distill(tmp_path / "opd", cfg, **QUIET)
    assert fp4_spy["states"] == [(0, False), (1, True)]
    by_step = dict(fp4_spy["rollouts"])
    assert by_step[0] == 0 and by_step[1] > 0


def test_a_model_without_routed_experts_is_refused_naming_the_flag(tmp_path):
    dense = CausalLM(preset("tiny", vocab_size=384, hidden_size=64, first_k_dense_replace=4,
                            num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match=r"'fp4_experts_from' \(--fp4-experts-from\): the model has no routed"):
        _trainer(dense, tmp_path, fp4_experts_from=0)


# ------------------------------------------------------------------ 2 processes against 1
def _fp4_case(rank, parallel_kw, steps=3, fp4_from=0):
    """`steps` steps of the micro model with FP4 experts from `fp4_from` (None: never) on
    the layout `parallel_kw` (None: one process): the losses, whether the switch happened,
    and whether any routed expert weight this rank holds is a DTensor."""
    from torch.distributed.tensor import DTensor

    from tests.parallel_utils import make_trainer, train_steps
    tr = make_trainer(parallel_kw, steps=steps)
    tr.cfg.fp4_experts_from = fp4_from
    losses = [m["loss"] for m in train_steps(tr, steps)]
    experts = routed_expert_linears(tr.model)
    return {"loss": losses, "on": fp4_experts_on(tr.model), "experts": len(experts),
            "dtensor": any(isinstance(m.weight, DTensor) for _, m in experts)}


def _sharded_expert_refusal(rank) -> str:
    """An expert Linear put under FSDP2 by hand (nanoseek's FSDP never does): the switch
    refuses it, naming what is unsupported."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests.train_utils import micro_config
    model = CausalLM(micro_config())
    fully_shard(routed_expert_linears(model)[0][1], mesh=init_device_mesh("cpu", (2,)))
    try:
        set_fp4_experts(model, True)
    except ValueError as e:
        return str(e)
    return "accepted"


def _fp4_layouts(rank):
    return {"fsdp": _fp4_case(rank, {"ep": 1}), "ep": _fp4_case(rank, {"ep": 2}),
            "tp": _fp4_case(rank, {"tp": 2}), "refusal": _sharded_expert_refusal(rank)}


@pytest.mark.slow  # one spawn of 2 gloo processes, three layouts (~15 s on 2 busy cores)
def test_two_processes_train_the_one_process_fp4_run(tmp_path):
    """Under FSDP2 (the routed experts stay out of it), EP (each rank its own experts) and TP
    (experts sharded by EP, not TP) every rank's routed experts are plain tensors, the switch
    covers them, and the 2-rank FP4 run's losses are the one-process FP4 run's, not the
    plain run's. A DTensor-sharded expert is refused by name."""
    from tests.parallel_utils import run_ranks
    one, plain = _fp4_case(0, None), _fp4_case(0, None, fp4_from=None)
    assert one["on"] and not plain["on"] and one["loss"][0] != pytest.approx(plain["loss"][0], rel=1e-6)
    ranks = run_ranks(_fp4_layouts, 2, tmp_path / "ranks", timeout=400)
    for r in ranks:
        for layout in ("fsdp", "ep", "tp"):
            got = r[layout]
            assert got["on"] and not got["dtensor"], layout
            assert got["experts"] == one["experts"] // (2 if layout == "ep" else 1), layout
            assert got["loss"] == pytest.approx(one["loss"], rel=1e-6), (layout, got["loss"], one["loss"])
        assert "DTensor-sharded expert weight" in r["refusal"] and "not supported" in r["refusal"]
