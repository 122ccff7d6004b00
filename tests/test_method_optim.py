"""Schedules, EMA teacher and AdamW parameter groups (recipe sections 4, 5)."""

import math

import pytest
import torch
import torch.nn as nn

from dinov3 import DINOv3Config, build_method
from dinov3.schedules import Schedules
from dinov3.teacher import ema_update_, frozen_copy

MICRO = dict(backbone="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
             drop_path_rate=0.0, head_hidden_dim=32, head_bottleneck_dim=16, n_cls_prototypes=32,
             n_patch_prototypes=16)


def test_schedule_values_closed_form():
    cfg = DINOv3Config()
    s = Schedules.from_config(cfg, total_steps=1000, steps_per_epoch=100, global_batch_size=256)
    peak = 4e-3 * math.sqrt(256 / 1024)
    assert s.lr(0) == 0.0
    assert s.lr(50) == pytest.approx(peak * 50 / 100)
    assert s.lr(100) == pytest.approx(peak)
    assert s.lr(550) == pytest.approx(1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * 450 / 900)))
    assert s.lr(1000) == pytest.approx(1e-6)
    assert s.weight_decay(0) == pytest.approx(0.04)
    assert s.weight_decay(500) == pytest.approx(0.22)
    assert s.weight_decay(1000) == pytest.approx(0.4)
    assert s.momentum(0) == pytest.approx(0.992)
    assert s.momentum(250) == pytest.approx(1.0 + 0.5 * (0.992 - 1.0) * (1 + math.cos(math.pi / 4)))
    assert s.momentum(1000) == pytest.approx(1.0)
    assert s.teacher_temperature(0) == pytest.approx(0.04)
    assert s.teacher_temperature(150) == pytest.approx(0.055)
    assert s.teacher_temperature(300) == pytest.approx(0.07)
    assert s.teacher_temperature(900) == pytest.approx(0.07)
    assert s.last_layer_frozen(99) and not s.last_layer_frozen(100)
    # momentum is monotone in the global step (no per-epoch staircase)
    m = [s.momentum(i) for i in range(0, 1001, 7)]
    assert all(a <= b for a, b in zip(m, m[1:]))


def test_ema_step_equals_formula_in_any_mode():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    teacher = frozen_copy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    t0 = [p.clone() for p in teacher.parameters()]
    for mode in (True, False):
        student.train(mode)
        teacher.train(mode)
        before = [p.clone() for p in teacher.parameters()]
        ema_update_(teacher.parameters(), student.parameters(), 0.9)
        for t, b, s in zip(teacher.parameters(), before, student.parameters()):
            torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    assert not torch.equal(t0[0], next(teacher.parameters()))
    assert all(not p.requires_grad for p in teacher.parameters())


def test_method_update_teacher():
    m = build_method(MICRO)
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.teacher.parameters()]
    m.eval()
    m.update_teacher(0.75)
    for t, b, s in zip(m.teacher.parameters(), before, m.student.parameters()):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s)


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "vit_small_patch16_dinov3"])
def test_param_groups_exclusions_and_multipliers(backbone):
    m = build_method({**MICRO, "backbone": backbone})
    groups = m.param_groups()
    meta = {}
    for g in groups:
        for name, p in zip(g["names"], g["params"]):
            meta[name] = (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
    student = dict(m.student.named_parameters())
    assert set(meta) == set(student)  # every student parameter once, no teacher parameter
    teacher_ids = {id(p) for p in m.teacher.parameters()}
    assert not any(id(p) in teacher_ids for g in groups for p in g["params"])
    d, depth = 0.9, 2
    emb = d ** (depth + 1)
    assert meta["backbone.mask_token"] == (pytest.approx(emb), 0.0, False)
    assert meta["backbone.vit.cls_token"][:2] == (pytest.approx(emb), 0.0)
    assert meta["backbone.vit.reg_token"][:2] == (pytest.approx(emb), 0.0)
    assert meta["backbone.vit.patch_embed.proj.weight"][:2] == (pytest.approx(emb * 0.2), 1.0)
    assert meta["backbone.vit.patch_embed.proj.bias"][:2] == (pytest.approx(emb * 0.2), 0.0)
    assert meta["backbone.vit.blocks.0.attn.qkv.weight"][:2] == (pytest.approx(d ** 2), 1.0)
    assert meta["backbone.vit.blocks.1.mlp.fc1.weight"][:2] == (pytest.approx(d), 1.0)
    assert meta["backbone.vit.blocks.1.mlp.fc1.bias"][1] == 0.0
    assert meta["backbone.vit.blocks.1.norm1.weight"][1] == 0.0
    assert meta["backbone.vit.norm.weight"][:2] == (pytest.approx(1.0), 0.0)
    assert meta["cls_head.mlp.0.weight"] == (pytest.approx(1.0), 1.0, False)
    assert meta["cls_head.last_layer.weight"] == (pytest.approx(1.0), 1.0, True)
    assert meta["patch_head.last_layer.weight"][2]
    gammas = [n for n in meta if "gamma" in n]
    assert gammas and all(meta[n][1] == 0.0 for n in gammas)  # LayerScale
    if "backbone.vit.pos_embed" in meta:
        assert meta["backbone.vit.pos_embed"][:2] == (pytest.approx(emb), 0.0)


def test_apply_schedules_sets_groups_and_freezes_last_layer():
    m = build_method(MICRO)
    m.configure(total_steps=100, steps_per_epoch=10, global_batch_size=64)
    opt = torch.optim.AdamW(m.param_groups())
    hp = m.apply_schedules(opt, 5)
    s = m.schedules
    assert hp == pytest.approx({"lr": s.lr(5), "wd": s.weight_decay(5), "momentum": s.momentum(5),
                                "teacher_temp": s.teacher_temperature(5)})
    assert m.teacher_temp == pytest.approx(s.teacher_temperature(5))
    for g in opt.param_groups:
        want_lr = 0.0 if g["is_last_layer"] else hp["lr"] * g["lr_multiplier"]
        assert g["lr"] == pytest.approx(want_lr)
        assert g["weight_decay"] == pytest.approx(hp["wd"] * g["wd_multiplier"])
    m.apply_schedules(opt, 10)  # one epoch later: unfrozen
    assert all(g["lr"] > 0 for g in opt.param_groups)


def test_apply_schedules_needs_configure():
    m = build_method(MICRO)
    with pytest.raises(RuntimeError):
        m.apply_schedules(torch.optim.AdamW(m.param_groups()), 0)


def test_config_validation_names_the_field():
    for field, value in [("mask_ratio", 1.0), ("temperature_student", 0.0), ("koleo_weight", -1.0),
                         ("mask_strategy", "grid"), ("layerwise_decay", 0.0), ("mask_probability", 1.5)]:
        with pytest.raises(ValueError, match=field):
            DINOv3Config(**{field: value}).validate()
    with pytest.raises(ValueError, match="not_a_field"):
        build_method({**MICRO, "not_a_field": 1})
    build_method({**MICRO, "name": "dinov3"})  # the platform's registry key is accepted
