"""Same weights, same logits: nanoseek against transformers' DeepseekV3/V2ForCausalLM."""

import json

import pytest
import torch
import transformers

import nanoseek
from nanoseek.model import CausalLM
from tests.conftest import randomize, tiny_config, v2_config

TOL = 1e-4


def hf_model_from(cfg, cls_name: str):
    """A random transformers model built from a nanoseek config (fp32, eager experts)."""
    d = cfg.to_dict()
    if cls_name == "DeepseekV2ForCausalLM":
        conf = transformers.DeepseekV2Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    else:
        conf = transformers.DeepseekV3Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    model = getattr(transformers, cls_name)(conf).eval()
    return randomize(model)


# Every configuration family, as transformers builds it. Each is checked both ways:
# transformers -> nanoseek and transformers -> nanoseek -> transformers.
FAMILIES = [
    ("v3-groups-yarn", tiny_config(num_nextn_predict_layers=0), "DeepseekV3ForCausalLM"),
    ("v3-no-groups", tiny_config(num_nextn_predict_layers=0, n_group=1, topk_group=1, rope_scaling=None),
     "DeepseekV3ForCausalLM"),
    ("v3-no-shared", tiny_config(num_nextn_predict_layers=0, n_shared_experts=0), "DeepseekV3ForCausalLM"),
    ("v2-group-limited", v2_config(routed_scaling_factor=2.0), "DeepseekV2ForCausalLM"),
    ("v2-greedy", v2_config(topk_method="greedy", n_group=1, topk_group=1), "DeepseekV2ForCausalLM"),
    ("v2-no-shared", v2_config(n_shared_experts=0), "DeepseekV2ForCausalLM"),
]
FAMILY_IDS = [f[0] for f in FAMILIES]


def max_diff(a: torch.nn.Module, b: torch.nn.Module, vocab_size: int) -> float:
    """max |Δlogits| of two models (transformers or nanoseek) on the same random batch."""
    ids = torch.randint(0, vocab_size, (3, 33))
    with torch.no_grad():
        la, lb = (m(ids) for m in (a, b))
    la, lb = (getattr(x, "logits", x) for x in (la, lb))
    assert la.abs().max() > 0.5, "logits too small for the comparison to mean anything"
    return (la - lb).abs().max().item()


@pytest.mark.parametrize("name,cfg,cls", FAMILIES, ids=FAMILY_IDS)
def test_transformers_checkpoint_loads_with_same_logits(tmp_path, name, cfg, cls):
    hf = hf_model_from(cfg, cls)
    hf.save_pretrained(tmp_path)
    ours = nanoseek.from_pretrained(tmp_path)
    assert max_diff(hf, ours, cfg.vocab_size) <= TOL


@pytest.mark.parametrize("name,cfg,cls", FAMILIES, ids=FAMILY_IDS)
def test_nanoseek_saves_what_it_read_for_transformers(tmp_path, name, cfg, cls):
    """transformers -> nanoseek -> transformers: same class (a V2 model must not come back
    as V3, with sigmoid routing and a 'missing' correction bias), same logits."""
    hf = hf_model_from(cfg, cls)
    hf.save_pretrained(tmp_path / "hf")
    nanoseek.save_pretrained(nanoseek.from_pretrained(tmp_path / "hf"), tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == [cls] and config["model_type"] == hf.config.model_type
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(again).__name__ == cls
    assert max_diff(hf, again, cfg.vocab_size) <= TOL


def test_null_shared_experts_reads_as_none_and_saves_for_transformers(tmp_path):
    """n_shared_experts: null (DeepSeek's code builds no shared experts for it) loads; the saved
    checkpoint says 0, which transformers' int-only config accepts, with the same logits."""
    cfg = v2_config(n_shared_experts=0)
    hf = hf_model_from(cfg, "DeepseekV2ForCausalLM")
    hf.save_pretrained(tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**raw, "n_shared_experts": None}))
    ours = nanoseek.from_pretrained(tmp_path / "hf")
    assert ours.model.layers[1].mlp.shared_experts is None
    nanoseek.save_pretrained(ours, tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert again.config.n_shared_experts == 0
    assert max_diff(hf, again, cfg.vocab_size) <= TOL


def test_routing_actually_differs_between_experts():
    """Guard for the parity test: with randomize(), tokens do spread over experts and groups."""
    model = randomize(CausalLM(tiny_config(num_nextn_predict_layers=0)))
    model(torch.randint(0, 97, (4, 32)))
    load = model.expert_load()[0]
    assert (load > 0).sum() >= 4


@pytest.mark.parametrize("cfg,cls", [
    (tiny_config(), "DeepseekV3ForCausalLM"),  # with an MTP layer, which transformers ignores
    (v2_config(num_nextn_predict_layers=1, routed_scaling_factor=2.0), "DeepseekV2ForCausalLM"),
    (tiny_config(n_shared_experts=0, n_group=1, topk_group=1), "DeepseekV3ForCausalLM"),
], ids=["v3-mtp", "v2-mtp", "v3-no-groups-no-shared-mtp"])
def test_nanoseek_checkpoint_loads_in_transformers(tmp_path, cfg, cls):
    ours = randomize(CausalLM(cfg)).eval()
    nanoseek.save_pretrained(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == cls
    assert max_diff(hf, ours, cfg.vocab_size) <= TOL
    # and nanoseek reads its own checkpoint back, MTP included
    again = nanoseek.from_pretrained(tmp_path)
    assert len(again.mtp) == 1
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_transformers_checkpoint_without_mtp_weights_loads_without_mtp(tmp_path):
    """transformers writes num_nextn_predict_layers=1 but no MTP tensors."""
    hf = hf_model_from(tiny_config(num_nextn_predict_layers=0), "DeepseekV3ForCausalLM")
    hf.config.num_nextn_predict_layers = 1
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no MTP weights"):
        ours = nanoseek.from_pretrained(tmp_path)
    assert len(ours.mtp) == 0
