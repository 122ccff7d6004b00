"""The method on a CUDA device: same numbers as on the CPU in fp32, finite and close in
bf16 autocast, for both backbone families. Skipped where no GPU is present (CI); run
on a GPU machine with `python -m pytest tests/test_method_cuda.py`."""

import copy

import pytest
import torch

from dinov3 import DINOv3Config, build_method

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MICRO = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, n_register_tokens=2,
             drop_path_rate=0.0, head_hidden_dim=128, head_bottleneck_dim=64,
             n_cls_prototypes=256, n_patch_prototypes=128, layerscale_init=None)


def _step(model, gl, lo, autocast=False):
    """One training forward + backward; returns the loss terms and the student's gradients."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(gl, lo)
    out.loss.backward()
    terms = {k: float(getattr(out, k).detach()) for k in ("loss", "loss_cls", "loss_patch", "loss_koleo")}
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return terms, grads


@pytest.fixture(autouse=True)
def _no_tf32():
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "vit_small_patch16_dinov3"])
def test_cuda_fp32_step_equals_cpu_and_bf16_stays_close(backbone):
    torch.manual_seed(0)
    cpu = build_method(DINOv3Config(backbone=backbone, **MICRO))
    cpu.configure(total_steps=10, steps_per_epoch=5, global_batch_size=8)
    cpu.train()
    with torch.no_grad():  # LayerScale 1e-5 makes all CLS tokens near-identical and KoLeo
        for name, p in cpu.named_parameters():  # (-log of a ~0 distance) ill-conditioned
            if name.endswith(("gamma_1", "gamma_2")):
                p.fill_(0.5)
    gpu = copy.deepcopy(cpu).cuda()
    gl, lo = torch.randn(8, 2, 3, 32, 32), torch.randn(8, 4, 3, 16, 16)

    # Same weights, same crops, same masks (sampled from the same CPU generator state).
    ref_terms, ref_grads = _step(cpu, gl, lo)
    terms, grads = _step(gpu, gl.cuda(), lo.cuda())
    for k, v in ref_terms.items():
        assert abs(terms[k] - v) <= 1e-4 * max(1.0, abs(v)), (k, terms[k], v)
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-4, rtol=1e-3, msg=n)

    bf_terms, bf_grads = _step(gpu, gl.cuda(), lo.cuda(), autocast=True)
    assert all(torch.isfinite(g).all() for g in bf_grads.values())
    for k, v in ref_terms.items():
        assert abs(bf_terms[k] - v) <= 0.03 * max(1.0, abs(v)), (k, bf_terms[k], v)


def test_cuda_training_steps_change_weights_and_update_teacher():
    torch.manual_seed(0)
    model = build_method(DINOv3Config(backbone="vit_tiny_patch16_224", **MICRO)).cuda().train()
    model.configure(total_steps=4, steps_per_epoch=2, global_batch_size=8)
    opt = torch.optim.AdamW(model.param_groups(), fused=True)
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for step in range(4):
        hp = model.apply_schedules(opt, step)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(torch.randn(8, 2, 3, 32, 32, device="cuda"), torch.randn(8, 4, 3, 16, 16, device="cuda"))
        assert torch.isfinite(out.loss)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        model.clip_gradients()
        opt.step()
        model.update_teacher(hp["momentum"])
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert any(k.startswith("student") for k in changed) and any(k.startswith("teacher") for k in changed)
