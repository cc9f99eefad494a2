"""The engine pages MLA latents only: a V3.2 or V4 model is refused with a clear error, and
CausalLM.generate (the model's own contiguous cache) serves them instead."""

import pytest
import torch

from nanoseek.config import preset
from nanoseek.engine.engine import LLMEngine
from nanoseek.model import CausalLM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["tiny-v32", "tiny-v4"])
def test_engine_refuses_new_architectures_and_generate_serves_them(name):
    cfg = preset(name, vocab_size=64, num_hidden_layers=4 if name == "tiny-v4" else 2,
                 hidden_size=64, moe_intermediate_size=32, intermediate_size=64)
    model = CausalLM(cfg).eval()
    with pytest.raises(NotImplementedError, match="CausalLM.generate"):
        LLMEngine(model)
    ids = torch.randint(3, 64, (2, 9))
    out = model.generate(ids, max_new_tokens=5)
    assert out.shape == (2, 14) and torch.equal(out[:, :9], ids)
    # greedy decoding through the cache picks what the full forward picks
    with torch.no_grad():
        full = model(out[:, :-1])
    assert torch.equal(full[:, 8:].argmax(-1), out[:, 9:])
