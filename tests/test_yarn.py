"""Every YaRN key nanoseek accepts means what it means in transformers (the oracle), both
ways round; any rope_scaling key nanoseek does not implement is refused by name."""

import pytest
import torch
import transformers

import nanoseek
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.model import CausalLM
from tests.conftest import randomize, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
VARIANTS = {
    "default": YARN,
    "truncate-false": {**YARN, "truncate": False},
    # mscale != mscale_all_dim: attention_factor replaces their ratio on cos/sin, while the
    # softmax scale's mscale² still comes from mscale_all_dim
    "attention-factor": {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0, "attention_factor": 0.8},
    "factor-only": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32},
}


def _cfg(rope_scaling):
    return tiny_config(num_nextn_predict_layers=0, rope_scaling=dict(rope_scaling))


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", VARIANTS)
def test_nanoseek_checkpoint_gives_transformers_the_same_logits(tmp_path, name):
    ours = randomize(CausalLM(_cfg(VARIANTS[name]))).eval()
    nanoseek.save_pretrained(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 48))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert ref.abs().max() > 0.5
    assert _max_diff(ref, got) <= TOL, name


@pytest.mark.parametrize("name", VARIANTS)
def test_transformers_checkpoint_gives_nanoseek_the_same_logits(tmp_path, name):
    d = _cfg(VARIANTS[name]).to_dict()
    conf = transformers.DeepseekV3Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    randomize(transformers.DeepseekV3ForCausalLM(conf)).eval().save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = nanoseek.from_pretrained(tmp_path)
    assert ours.config.rope_scaling == {k: v for k, v in VARIANTS[name].items()}
    ids = torch.randint(0, 97, (2, 48))
    with torch.no_grad():
        assert _max_diff(hf(ids).logits, ours(ids)) <= TOL, name


def test_the_keys_change_the_frequencies_or_the_scale():
    """Guard: each variant is a different rotation, so the parity above tests the key."""
    from nanoseek.model.rope import inv_frequencies
    f0, s0 = inv_frequencies(_cfg(YARN), 8)
    f1, s1 = inv_frequencies(_cfg(VARIANTS["truncate-false"]), 8)
    f2, s2 = inv_frequencies(_cfg(VARIANTS["attention-factor"]), 8)
    assert not torch.allclose(f0, f1) and s1 == s0
    assert torch.equal(f0, f2) and s2 == 0.8 != s0


def test_rope_dict_rope_theta_wins_as_in_transformers():
    d = tiny_config().to_dict()
    d["rope_scaling"] = {**YARN, "rope_theta": 500.0}
    assert ModelConfig.from_dict(d).rope_theta == 500.0
    d.pop("rope_scaling")
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 700.0}
    assert ModelConfig.from_dict(d).rope_theta == 700.0


@pytest.mark.parametrize("rope_scaling,key", [
    ({**YARN, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({**YARN, "low_freq_factor": 1.0}, "low_freq_factor"),
    ({"type": "default", "factor": 2.0}, "factor"),
    ({**YARN, "truncate": "no"}, "truncate"),
    ({**YARN, "attention_factor": -1.0}, "attention_factor"),
    ({**YARN, "factor": None}, "factor"),
])
def test_unimplemented_or_bad_rope_keys_are_refused_by_name(rope_scaling, key):
    d = tiny_config().to_dict()
    d["rope_scaling"] = rope_scaling
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_dict(d)
    with pytest.raises(ConfigError, match=key):
        tiny_config(rope_scaling=rope_scaling)


def test_transformers5_rope_parameters_with_unimplemented_key_are_refused(tmp_path):
    d = tiny_config().to_dict()
    d.pop("rope_scaling")
    d["rope_parameters"] = {**YARN, "rope_type": "yarn", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        ModelConfig.from_dict(d)
