"""RMSNorm's fused call against the form transformers writes out (DeepseekV3RMSNorm)."""

import pytest
import torch

from nanoseek.model.norm import RMSNorm


def written_out(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * h.to(x.dtype)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("autocast", [False, True])
def test_rms_norm_equals_the_written_out_form_forward_and_backward(x_dtype, w_dtype, autocast):
    torch.manual_seed(0)
    norm = RMSNorm(96, eps=1e-6).to(w_dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    x = (torch.randn(3, 5, 96) * 4).to(x_dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got, want = norm(x), written_out(norm, x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g_got = torch.autograd.grad((got.float() ** 2).sum(), (x, norm.weight))
    g_want = torch.autograd.grad((want.float() ** 2).sum(), (x, norm.weight))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
