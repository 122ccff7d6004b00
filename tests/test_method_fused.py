"""The lean fused MLP branch equals timm's block forward and backward."""

import pytest
import torch

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
