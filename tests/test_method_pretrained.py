"""``pretrained=True`` for ``vit_*`` and ``vit_*_dinov3`` backbones with registers, through
timm's own loading path.

Released timm ``vit_*`` checkpoints have no register tokens (pos_embed = CLS + patches);
``vit_*_dinov3`` ones (Eva, RoPE) hold 4 registers while a sweep may ask for another count.
timm reads a local checkpoint here (``pretrained_file`` -> ``pretrained_cfg_overlay``), no download.
"""

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from dinov3.backbone import MaskableViT, create_timm_vit

ARCH = "vit_tiny_patch16_224"
SAVED_IMG, PATCH, DEPTH = 32, 8, 2  # saved checkpoint: 4x4 patch grid


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    src = timm.create_model(ARCH, img_size=SAVED_IMG, patch_size=PATCH, depth=DEPTH, num_classes=0)
    with torch.no_grad():  # make the zero-initialised tokens / pos-embed distinguishable
        for p in (src.cls_token, src.pos_embed):
            p.normal_()
    path = tmp_path_factory.mktemp("ckpt") / "vit_tiny.pth"
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    torch.save(sd, path)
    return str(path), sd


def build(path, img_size, n_reg):
    return create_timm_vit(ARCH, img_size, PATCH, depth=DEPTH, n_register_tokens=n_reg,
                           pretrained=True, pretrained_file=path)


def assert_non_pos_weights_equal(vit, saved):
    own = vit.state_dict()
    for key, value in saved.items():
        if key == "pos_embed":
            continue
        assert key in own, key
        torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)
    assert any(k.startswith("blocks.1.") for k in saved)


@pytest.mark.parametrize("n_reg", [4, 0])
def test_pretrained_same_img_size(checkpoint, n_reg):
    path, saved = checkpoint
    vit = build(path, SAVED_IMG, n_reg)
    assert vit.num_prefix_tokens == 1 + n_reg
    assert_non_pos_weights_equal(vit, saved)
    pe, pe_saved = vit.pos_embed.detach(), saved["pos_embed"]
    assert pe.shape[1] == 1 + n_reg + 16
    torch.testing.assert_close(pe[:, :1], pe_saved[:, :1], rtol=0, atol=0)  # CLS
    torch.testing.assert_close(pe[:, 1 + n_reg:], pe_saved[:, 1:], rtol=0, atol=0)  # patches
    if n_reg:
        assert vit.reg_token.shape == (1, n_reg, vit.embed_dim)
    # no LayerScale: released vit_* checkpoints have none, the function must be the checkpoint's
    assert all(isinstance(b.ls1, torch.nn.Identity) for b in vit.blocks)

    model = MaskableViT(vit).eval()
    x = torch.randn(2, 3, SAVED_IMG, SAVED_IMG)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, :3] = True
    with torch.no_grad():
        out = model(x, masks)
    assert out.shape == (2, 1 + n_reg + 16, vit.embed_dim)
    assert torch.isfinite(out).all()


def test_pretrained_other_img_size_resamples_patch_pos_embed(checkpoint):
    path, saved = checkpoint
    img = 48  # 6x6 grid: timm's checkpoint filter resamples the 4x4 patch pos-embed
    vit = build(path, img, 4)
    assert_non_pos_weights_equal(vit, saved)
    pe, pe_saved = vit.pos_embed.detach(), saved["pos_embed"]
    assert pe.shape[1] == 1 + 4 + 36
    expected = resample_abs_pos_embed(pe_saved, new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(pe[:, :1], pe_saved[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(pe[:, 5:], expected[:, 1:])

    with torch.no_grad():
        out = MaskableViT(vit).eval()(torch.randn(1, 3, img, img))
    assert out.shape == (1, 1 + 4 + 36, vit.embed_dim)


DINOV3_ARCH = "vit_small_patch16_dinov3"


@pytest.fixture(scope="module")
def dinov3_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    src = timm.create_model(DINOV3_ARCH, img_size=SAVED_IMG, patch_size=PATCH, depth=DEPTH, num_classes=0,
                            num_reg_tokens=4, class_token=True, init_values=1e-5)
    with torch.no_grad():  # every tensor distinguishable from a fresh init (tokens, LayerScale, ...)
        for p in src.parameters():
            p.normal_()
    path = tmp_path_factory.mktemp("ckpt") / "vit_small_dinov3.pth"
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    torch.save(sd, path)
    return str(path), sd


@pytest.mark.parametrize("n_reg,img", [(4, SAVED_IMG), (2, SAVED_IMG), (6, SAVED_IMG), (4, 48)])
def test_pretrained_dinov3_family_any_register_count(dinov3_checkpoint, n_reg, img):
    path, saved = dinov3_checkpoint
    eva = create_timm_vit(DINOV3_ARCH, img, PATCH, depth=DEPTH, n_register_tokens=n_reg,
                          pretrained=True, pretrained_file=path)
    own = eva.state_dict()
    assert set(own) == set(saved)
    for key, value in saved.items():
        if key != "reg_token":
            torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)
    n = min(n_reg, 4)
    assert own["reg_token"].shape == (1, n_reg, eva.embed_dim)
    torch.testing.assert_close(own["reg_token"][:, :n], saved["reg_token"][:, :n], rtol=0, atol=0)
    if n_reg > 4:  # extra registers keep their fresh init, none is a copy of a saved one
        extra = own["reg_token"][0, 4:]
        assert not any(torch.equal(e, r) for e in extra for r in saved["reg_token"][0])
    with torch.no_grad():
        out = MaskableViT(eva).eval()(torch.randn(1, 3, img, img))
    assert out.shape == (1, 1 + n_reg + (img // PATCH) ** 2, eva.embed_dim) and torch.isfinite(out).all()


def test_pretrained_file_through_the_method_config(checkpoint):
    """``pretrained_file`` reaches timm from the method's config (model.pretrained_file)."""
    from dinov3 import build_method

    path, saved = checkpoint
    method = build_method(dict(backbone=ARCH, img_size=SAVED_IMG, patch_size=PATCH, embed_dim=192, depth=DEPTH,
                               num_heads=3, n_register_tokens=4, layerscale_init=None, pretrained=True,
                               pretrained_file=path, head_hidden_dim=32, head_bottleneck_dim=16,
                               n_cls_prototypes=32, n_patch_prototypes=16))
    for vit in (method.student["backbone"].vit, method.teacher["backbone"].vit):
        assert_non_pos_weights_equal(vit, saved)
