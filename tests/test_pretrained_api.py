"""`model.save_pretrained(dir)` and `CausalLM.from_pretrained(dir)`, as transformers users
type them; the checkpoint code is handed the class, so it never imports the model."""

import torch

import nanoseek
from nanoseek.model import CausalLM
from tests.conftest import randomize, tiny_config


def logits(m):
    ids = torch.randint(0, m.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return m(ids)


def test_save_pretrained_then_from_pretrained_round_trips(tmp_path):
    model = randomize(CausalLM(tiny_config())).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    loaded = CausalLM.from_pretrained(tmp_path)
    assert type(loaded) is CausalLM and not loaded.training
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_from_pretrained_builds_the_class_it_is_called_on(tmp_path):
    class Tagged(CausalLM):
        pass

    model = randomize(CausalLM(tiny_config())).eval()
    model.save_pretrained(tmp_path)
    loaded = Tagged.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert type(loaded) is Tagged and loaded.lm_head.weight.dtype == torch.bfloat16


def test_the_package_functions_are_the_same_api(tmp_path):
    model = randomize(CausalLM(tiny_config())).eval()
    nanoseek.save_pretrained(model, tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    a, b = nanoseek.from_pretrained(tmp_path / "a"), CausalLM.from_pretrained(tmp_path / "b")
    torch.testing.assert_close(logits(a), logits(b), atol=0, rtol=0)
    torch.testing.assert_close(logits(a), logits(model), atol=0, rtol=0)
