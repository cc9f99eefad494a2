"""Same weights, same logits: nanoseek against transformers' DeepseekV3/V2ForCausalLM."""

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


@pytest.mark.parametrize("name,cfg,cls", [
    ("v3-groups-yarn", tiny_config(num_nextn_predict_layers=0), "DeepseekV3ForCausalLM"),
    ("v3-no-groups", tiny_config(num_nextn_predict_layers=0, n_group=1, topk_group=1, rope_scaling=None),
     "DeepseekV3ForCausalLM"),
    ("v2-group-limited", v2_config(), "DeepseekV2ForCausalLM"),
    ("v2-greedy", v2_config(topk_method="greedy", n_group=1, topk_group=1), "DeepseekV2ForCausalLM"),
])
def test_transformers_checkpoint_loads_with_same_logits(tmp_path, name, cfg, cls):
    hf = hf_model_from(cfg, cls)
    hf.save_pretrained(tmp_path)
    ours = nanoseek.from_pretrained(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (3, 33))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert ref.abs().max() > 0.5, "logits too small for the comparison to mean anything"
    assert (ref - got).abs().max().item() <= TOL


def test_routing_actually_differs_between_experts():
    """Guard for the parity test: with randomize(), tokens do spread over experts and groups."""
    model = randomize(CausalLM(tiny_config(num_nextn_predict_layers=0)))
    model(torch.randint(0, 97, (4, 32)))
    load = model.expert_load()[0]
    assert (load > 0).sum() >= 4


def test_nanoseek_checkpoint_loads_in_transformers(tmp_path):
    cfg = tiny_config()  # with an MTP layer, which transformers ignores
    ours = randomize(CausalLM(cfg)).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert (ref - got).abs().max().item() <= TOL
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
