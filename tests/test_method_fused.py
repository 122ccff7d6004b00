"""The lean fused MLP and attention branches equal timm's block forward and backward."""

import pytest
import torch

from dinov3 import fused
from dinov3.backbone import MaskableViT, create_timm_vit


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "vit_small_patch16_dinov3"])
@pytest.mark.parametrize("drop_path", [0.0, 0.5])
def test_lean_backbone_matches_timm_blocks(backbone, drop_path):
    torch.manual_seed(0)
    vit = create_timm_vit(backbone, 32, 8, 64, 2, 2, n_register_tokens=2, drop_path_rate=drop_path,
                          layerscale_init=0.5).double()
    lean, plain = MaskableViT(vit, lean_mlp=True), MaskableViT(vit, lean_mlp=False)
    plain.mask_token = lean.mask_token
    assert all(lean.lean_blocks) and not any(plain.lean_blocks)
    assert all(lean.lean_attn) == (backbone == "vit_tiny_patch16_224")
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    masks = torch.rand(3, 16) < 0.3
    grads = []
    for model in (lean, plain):
        model.train()
        torch.manual_seed(1)  # same drop-path draws
        out = model(x, masks)
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad()
    (out_a, g_a), (out_b, g_b) = grads
    torch.testing.assert_close(out_a, out_b)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], msg=name)


def test_matmul_attention_matches_timm_attention():
    torch.manual_seed(0)
    vit = create_timm_vit("vit_tiny_patch16_224", 32, 8, 64, 1, 2, n_register_tokens=2).double()
    attn = vit.blocks[0].attn
    x = torch.randn(3, 19, 64, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 19, 64, dtype=torch.float64)
    grads = []
    for f in (fused.matmul_attention, lambda a, x: a(x)):  # timm's own: fused SDPA
        y = f(attn, x)
        gx, gw = torch.autograd.grad((y * w).sum(), (x, attn.qkv.weight))
        grads.append((y.detach(), gx, gw))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_cpu_autocast_runs_short_attention_as_matmuls(monkeypatch):
    """Under CPU bf16 autocast the backbone avoids the (slow) bf16 flash kernels for short
    sequences and stays within bf16 error of the fp32 forward."""
    torch.manual_seed(0)
    vit = create_timm_vit("vit_tiny_patch16_224", 32, 8, 64, 2, 2, n_register_tokens=2)
    model = MaskableViT(vit).train()
    x = torch.randn(4, 3, 32, 32)
    ref = model(x)

    def no_sdpa(*a, **k):
        raise AssertionError("SDPA called under CPU autocast for a short sequence")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.vit.blocks.parameters())
    torch.testing.assert_close(out.float(), ref.detach(), atol=0.1, rtol=0.05)
