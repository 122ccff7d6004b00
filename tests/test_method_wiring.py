"""How ``DINOv3.forward`` wires its losses together, against formulas written out here.

tests/test_method_losses.py checks each loss function alone; these tests recompute the
whole step's loss from the model's own submodules with the recipe's formulas (recipe
section 1), so a wrong pair count, iBOT denominator, KoLeo pooling, a masked teacher
input or global (instead of per-module) clipping fails them.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dinov3 import build_method
from dinov3.losses import kl_student_teacher

# micro model (as tests/test_method_model.py), no drop path (a deterministic student) and no
# LayerScale (at 1e-5 every CLS is nearly the same vector: KoLeo would measure float noise).
# B = 4 images, 3 local crops.
# Non-default temperatures, weights and Sinkhorn iterations, so that each is checked to be wired.
CFG = dict(backbone="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
           drop_path_rate=0.0, layerscale_init=None, head_hidden_dim=32, head_bottleneck_dim=16, n_cls_prototypes=32,
           n_patch_prototypes=16, temperature_student=0.2, temperature_teacher=0.05, sinkhorn_iterations=4,
           dino_weight=1.3, ibot_weight=0.7, koleo_weight=0.3, clip_grad=1.5)
B, N_LOCAL, P = 4, 3, 16  # 32 px / patch 8 -> 4 x 4 patches
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build(**overrides):
    """A micro method whose outputs depend on the targets, and whose teacher differs from its student.

    At init the heads' logits are ~0.02 and every softmax is nearly uniform (DINO loss ~ ln K
    whatever the targets): unit-gain head layers and prototypes of norm ~2 make them matter.
    """
    torch.manual_seed(0)
    m = build_method({**CFG, **overrides}).train()
    with torch.no_grad():
        for name, p in m.student.named_parameters():
            if "gamma" in name:  # Eva keeps its LayerScale at 1e-5 even with layerscale_init=None
                p.fill_(1.0)
            elif name.endswith("last_layer.weight"):
                p.normal_(0.0, 0.5)
            elif "head.mlp" in name and name.endswith("weight"):
                p.normal_(0.0, p.shape[1] ** -0.5)
        for p_t, p_s in zip(m.teacher.parameters(), m.student.parameters()):
            p_t.copy_(p_s + 0.02 * torch.randn_like(p_s))
    return m


def crops(seed=0):
    """uint8 ``[B, 2, 3, 32, 32]``, ``[B, n_l, 3, 16, 16]``: smooth colour fields plus noise.

    Distinct images (not i.i.d. pixel noise, whose CLS tokens barely differ), so the
    per-image targets, not only their batch mean, enter the losses.
    """
    g = torch.Generator().manual_seed(seed)

    def images(n, size):
        x = F.interpolate(torch.rand(n, 3, 2, 2, generator=g), size=size, mode="bilinear", align_corners=False)
        x = x + 0.1 * torch.randn(n, 3, size, size, generator=g)
        return (x.clamp(0, 1) * 255).to(torch.uint8)

    return images(2 * B, 32).view(B, 2, 3, 32, 32), images(N_LOCAL * B, 16).view(B, N_LOCAL, 3, 16, 16)


def uneven_masks():
    """bool [2B, P], crop-major; 3 of the 8 crops masked, with 5, 2 and 9 tokens."""
    masks = torch.zeros(2 * B, P, dtype=torch.bool)
    masks[0, :5] = True  # crop 0 of image 0
    masks[3, 7:9] = True  # crop 0 of image 3
    masks[6, 3:12] = True  # crop 1 of image 2
    return masks


def to_input(x):
    """uint8 [..., 3, H, W] -> ImageNet-normalised float."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def sinkhorn(logits, temp, n_iter):
    """Recipe section 1, single worker, float64: ``[N, K]`` logits -> ``[N, K]`` targets."""
    q = torch.exp((logits.double() - logits.max()) / temp).T  # [K, N]; a global shift cancels
    n_k, n_b = q.shape
    q = q / q.sum()
    for _ in range(n_iter):
        q = q / q.sum(dim=1, keepdim=True) / n_k
        q = q / q.sum(dim=0, keepdim=True) / n_b
    return (q * n_b).T


def cross_entropy(p_teacher, s_logits, temp):
    """``-sum_k p_t log softmax(s / T)`` per row, float64."""
    z = s_logits.double() / temp
    z = z - z.max(-1, keepdim=True).values  # shift: log p unchanged
    log_p = z - torch.log(torch.exp(z).sum(-1, keepdim=True))
    return -(p_teacher.double() * log_p).sum(-1)


def koleo(x):
    """``-mean_i log ||x_i - x_nn(i)||`` on L2-normalised rows of one crop ``[B, D]``."""
    x = x.double()
    x = x / x.norm(dim=-1, keepdim=True)
    dist = torch.cdist(x, x) + torch.diag(torch.full((x.shape[0],), math.inf, dtype=x.dtype))
    return -torch.log(dist.min(dim=1).values + 1e-8).mean()  # nearest by distance == by cosine


@torch.no_grad()
def reference_terms(m, glob, loc, masks):
    """``(loss_cls, loss_patch, loss_koleo, the locals' share of loss_cls)`` of one step, float64,
    from the model's submodules and the formulas of recipe section 1."""
    c = m.cfg
    npt = m.student["backbone"].num_prefix_tokens  # [CLS, registers, patches]
    g = torch.cat([to_input(glob[:, 0]), to_input(glob[:, 1])])  # [2B, 3, G, G], crop-major
    t_tok = m.teacher["backbone"](g)  # unmasked
    s_tok = m.student["backbone"](g, masks)
    t_cls = sinkhorn(m.teacher["cls_head"](t_tok[:, 0]), m.teacher_temp, c.sinkhorn_iterations).view(2, B, -1)
    s_cls = m.student["cls_head"](s_tok[:, 0]).view(2, B, -1)
    s_loc = [m.student["cls_head"](m.student["backbone"](to_input(loc[:, i]))[:, 0]) for i in range(N_LOCAL)]

    # DINO: student global i vs teacher global 1 - i; each local vs both teacher globals
    terms = [cross_entropy(t_cls[1 - i], s_cls[i], c.temperature_student).mean() for i in range(2)]
    terms += [cross_entropy(t_cls[j], s, c.temperature_student).mean() for s in s_loc for j in range(2)]
    loss_cls = sum(terms) / len(terms)
    local_part = sum(terms[2:]) / len(terms)

    # iBOT: teacher targets of all masked tokens centred together; per crop, the mean CE of
    # its masked tokens; summed over crops, divided by all 2B global crops
    t_patch = m.teacher["patch_head"](t_tok[:, npt:][masks])  # [M, Kp], row-major = crop-major
    s_patch = m.student["patch_head"](s_tok[:, npt:][masks])
    ce = cross_entropy(sinkhorn(t_patch, m.teacher_temp, c.sinkhorn_iterations), s_patch, c.temperature_student)
    crop_of_token = masks.nonzero()[:, 0]
    loss_patch = sum(ce[crop_of_token == k].mean() for k in crop_of_token.unique()) / (2 * B)

    # KoLeo: student CLS before the head, each global crop on its own, summed
    cls = s_tok[:, 0].view(2, B, -1)
    loss_koleo = koleo(cls[0]) + koleo(cls[1])
    return loss_cls, loss_patch, loss_koleo, local_part


def total(c, loss_cls, loss_patch, loss_koleo):
    return c.dino_weight * loss_cls + c.ibot_weight * loss_patch + c.koleo_weight * loss_koleo


def close(actual, expected, name):
    assert float(actual.detach()) == pytest.approx(float(expected), rel=1e-5, abs=1e-7), name


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "vit_small_patch16_dinov3"])
def test_step_loss_matches_the_recipe_formulas(backbone):
    m = build(backbone=backbone)
    glob, loc = crops()
    masks = uneven_masks()
    out = m(glob, loc, masks=masks)
    loss_cls, loss_patch, loss_koleo, local_part = reference_terms(m, glob, loc, masks)
    # every term is non-trivial, so a wrong weight cannot hide in the total
    assert min(loss_cls, loss_patch, abs(loss_koleo)) > 0.05
    close(out.loss_cls, loss_cls, "loss_cls")
    close(out.loss_patch, loss_patch, "loss_patch")
    close(out.loss_koleo, loss_koleo, "loss_koleo")
    close(out.loss, total(m.cfg, loss_cls, loss_patch, loss_koleo), "loss")

    # split step: the two parts' losses add up to the whole step's, the local part alone is
    # the locals' DINO pairs over the step's pair count
    targets = m.targets(glob, masks=masks)
    first = m(glob, loc, part="global", targets=targets)
    last = m(glob, loc, part="local", targets=targets)
    close(first.loss.detach() + last.loss.detach(), out.loss.detach(), "global + local")
    close(last.loss.detach(), m.cfg.dino_weight * local_part, "local part")
    close(first.loss_cls + last.loss_cls, loss_cls, "loss_cls of the split step")
    close(first.loss_patch, loss_patch, "loss_patch of the split step")


def test_teacher_temperature_of_the_step_is_used():
    # apply_schedules sets teacher_temp per step; the targets must follow it
    m = build()
    m.teacher_temp = 0.03
    glob, loc = crops(seed=1)
    masks = uneven_masks()
    out = m(glob, loc, masks=masks)
    loss_cls, loss_patch, _, _ = reference_terms(m, glob, loc, masks)
    close(out.loss_cls, loss_cls, "loss_cls")
    close(out.loss_patch, loss_patch, "loss_patch")


def test_gradients_clipped_per_module_not_globally():
    m = build()
    glob, loc = crops()
    m(glob, loc, masks=uneven_masks()).loss.backward()
    clip = m.cfg.clip_grad

    def params(name):
        return [p for p in m.student[name].parameters() if p.grad is not None]

    def norm(name):
        return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params(name))))

    # backbone far above the limit, one head above it, one below
    for name, target in (("backbone", 50 * clip), ("patch_head", 2 * clip), ("cls_head", 0.5 * clip)):
        scale = target / norm(name)
        for p in params(name):
            p.grad.mul_(scale)
    before = {name: [p.grad.clone() for p in params(name)] for name in ("cls_head", "patch_head")}
    reported = m.clip_gradients()

    assert reported["grad_norm_backbone"] == pytest.approx(50 * clip, rel=1e-4)
    assert reported["grad_norm_patch_head"] == pytest.approx(2 * clip, rel=1e-4)
    assert reported["grad_norm_cls_head"] == pytest.approx(0.5 * clip, rel=1e-4)
    assert reported["grad_norm"] == pytest.approx(clip * math.sqrt(50 ** 2 + 2 ** 2 + 0.5 ** 2), rel=1e-4)
    assert norm("backbone") == pytest.approx(clip, rel=1e-4)
    assert norm("patch_head") == pytest.approx(clip, rel=1e-4)
    # clipped modules keep their direction; a module under the limit is left alone
    # (global clipping would shrink it by clip / total norm)
    for old, p in zip(before["patch_head"], params("patch_head")):
        torch.testing.assert_close(p.grad, old * 0.5, rtol=1e-4, atol=1e-9)
    for old, p in zip(before["cls_head"], params("cls_head")):
        assert torch.equal(p.grad, old)


def test_kl_metric_is_kl_student_to_teacher():
    # recipe section 6 logs KL(student || teacher) = sum_k p_s log(p_s / p_t), p_s = softmax(s / T_s)
    logits = [[1.0, 0.0, -1.0], [0.2, 0.5, 0.1]]
    p_t = [[0.1, 0.3, 0.6], [0.7, 0.2, 0.1]]
    temp = 0.5

    def softmax(row):
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    p_s = [softmax(r) for r in logits]
    forward = sum(kl(s, t) for s, t in zip(p_s, p_t)) / 2
    reverse = sum(kl(t, s) for s, t in zip(p_s, p_t)) / 2
    assert abs(forward - reverse) > 0.1  # the two directions differ clearly here
    got = float(kl_student_teacher(torch.tensor(logits), torch.tensor(p_t), temp))
    assert got == pytest.approx(forward, rel=1e-5)
    assert got != pytest.approx(reverse, rel=1e-2)
