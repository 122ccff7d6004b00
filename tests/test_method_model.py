"""DINOv3 module end to end on micro models (depth 2, width 64, 32 px, patch 8 -> 16 patches)."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov3 import DINOv3Output, build_method
from dinov3.evaluation import knn_classify, linear_probe

MICRO = dict(backbone="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
             drop_path_rate=0.1, head_hidden_dim=32, head_bottleneck_dim=16, n_cls_prototypes=32,
             n_patch_prototypes=16)
FAMILIES = ["vit_tiny_patch16_224", "vit_small_patch16_dinov3"]


def crops(b=4, n_local=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    glob = torch.randint(0, 256, (b, 2, 3, 32, 32), generator=g, dtype=torch.uint8)
    loc = torch.randint(0, 256, (b, n_local, 3, 16, 16), generator=g, dtype=torch.uint8)
    return glob, loc


@pytest.mark.parametrize("backbone", FAMILIES)
def test_forward_backward_finite(backbone):
    torch.manual_seed(0)
    m = build_method({**MICRO, "backbone": backbone})
    assert m.num_prefix_tokens == 1 + 4
    glob, loc = crops()
    out = m(glob, loc)
    assert isinstance(out, DINOv3Output)
    for name in ("loss", "loss_cls", "loss_patch", "loss_koleo", "loss_gram"):
        v = getattr(out, name)
        assert v.ndim == 0 and torch.isfinite(v), name
    assert out.loss.requires_grad and not out.loss_cls.requires_grad
    assert {"teacher_entropy", "kl_student_teacher", "cls_std"} <= set(out.metrics)
    out.loss.backward()
    for name, p in m.student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None for p in m.teacher.parameters())
    grads = m.clip_gradients()
    assert set(grads) == {"grad_norm_backbone", "grad_norm_cls_head", "grad_norm_patch_head", "grad_norm"}
    total = sum(p.grad.norm() ** 2 for p in m.student["backbone"].parameters()) ** 0.5
    assert float(total) <= 3.0 + 1e-4  # clipped per module
    # teacher features
    assert m.embed(glob[:, 0]).shape == (4, 64)
    assert m.patch_features(glob[:, 0]).shape == (4, 4, 4, 64)
    assert m.probe_features(glob[:, 0]).shape == (4, 128)


@pytest.mark.parametrize("backbone", FAMILIES)
def test_every_student_param_gets_grad_without_locals_or_masks(backbone):
    """DDP without find_unused_parameters needs this."""
    m = build_method({**MICRO, "backbone": backbone})
    glob, _ = crops()
    out = m(glob, None, masks=torch.zeros(8, 16, dtype=torch.bool))
    assert float(out.loss_patch) == 0.0
    out.loss.backward()
    missing = [n for n, p in m.student.named_parameters() if p.grad is None]
    assert not missing


def test_mask_token_replaces_patches_before_position():
    m = build_method(MICRO)
    glob, _ = crops(b=1)
    x = m._to_float(glob[:, 0])
    full = torch.ones(1, 16, dtype=torch.bool)
    with torch.no_grad():
        a = m.student["backbone"](x, full)
        b = m.student["backbone"](torch.randn_like(x), full)
    torch.testing.assert_close(a, b)  # fully masked: image content gone, positions remain


def test_heads_only_see_masked_tokens():
    m = build_method(MICRO)
    b, n_local = 4, 3
    glob, loc = crops(b, n_local)
    masks = torch.zeros(2 * b, 16, dtype=torch.bool)
    masks[0, :5] = True
    masks[3, 2:4] = True
    masks[6, 10:16] = True
    rows = {}

    def hook(name):
        return lambda mod, inp, out: rows.setdefault(name, []).append(inp[0].shape[0])

    for who in ("student", "teacher"):
        for head in ("cls_head", "patch_head"):
            getattr(m, who)[head].mlp[0].register_forward_hook(hook(f"{who}.{head}"))
    m(glob, loc, masks=masks)
    n_masked = int(masks.sum())
    assert rows["student.patch_head"] == [n_masked]
    assert rows["teacher.patch_head"] == [n_masked]
    assert rows["student.cls_head"] == [(2 + n_local) * b]  # one call: globals + locals
    assert rows["teacher.cls_head"] == [2 * b]  # teacher: unmasked globals only


def test_temperature_student_changes_cls_loss():
    torch.manual_seed(0)
    a = build_method({**MICRO, "temperature_student": 0.1})
    b = build_method({**MICRO, "temperature_student": 0.2})
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()  # no drop path: identical forwards apart from the temperature
    glob, loc = crops()
    masks = torch.zeros(8, 16, dtype=torch.bool)
    masks[:4, :6] = True
    oa, ob = a(glob, loc, masks=masks), b(glob, loc, masks=masks)
    assert float(oa.loss_koleo) == pytest.approx(float(ob.loss_koleo))
    assert float(oa.loss_cls) != pytest.approx(float(ob.loss_cls), rel=1e-4)
    assert float(oa.loss_patch) != pytest.approx(float(ob.loss_patch), rel=1e-4)


def test_teacher_stays_in_eval_mode():
    m = build_method(MICRO).train()
    assert m.student.training and not m.teacher.training


def test_float_input_is_used_as_is():
    m = build_method(MICRO).eval()
    glob, _ = crops(b=2)
    from dinov3.augment import normalize

    torch.testing.assert_close(m.embed(glob[:, 0]), m.embed(normalize(glob[:, 0])))


def test_gram_anchoring_snapshot_schedule():
    m = build_method({**MICRO, "gram_weight": 2.0, "gram_start_step": 2, "gram_refresh_every": 2,
                      "gram_max_refreshes": 1})
    m.configure(total_steps=20, steps_per_epoch=5, global_batch_size=4)
    opt = torch.optim.AdamW(m.param_groups())
    glob, loc = crops()
    seen = []
    for step in range(7):
        m.apply_schedules(opt, step)
        out = m(glob, loc)
        seen.append((int(m.gram_snapshot_index), float(out.loss_gram) > 0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        m.update_teacher(0.5)
    assert [s[0] for s in seen] == [-1, -1, 0, 0, 1, 1, 1]
    assert [s[1] for s in seen] == [False, False, True, True, True, True, True]
    assert torch.isfinite(out.loss_gram)
    # frozen between refreshes: the live teacher moved on after the step-4 refresh
    assert not torch.equal(next(m.gram_teacher.parameters()), next(m.teacher["backbone"].parameters()))
    assert all(not p.requires_grad for p in m.gram_teacher.parameters())


@pytest.mark.parametrize("backbone", FAMILIES)
def test_split_backward_gives_the_gradients_of_one_backward(backbone):
    # "global" then "local" (or the other way round), each with its own backward, against
    # "all" with one backward: same masks and teacher targets -> same terms, same gradients.
    torch.manual_seed(0)
    a = build_method({**MICRO, "backbone": backbone, "drop_path_rate": 0.0})
    glob, loc = crops(b=4, n_local=3)
    masks = torch.zeros(8, 16, dtype=torch.bool)
    masks[0, :5] = masks[3, 2:12] = masks[6, ::2] = True  # unequal counts, some crops unmasked
    assert a.backward_parts(3) == ("global", "local") and a.backward_parts(0) == ("all",)
    whole = a(glob, loc, masks=masks)
    whole.loss.backward()
    for order in (("global", "local"), ("local", "global")):
        b = copy.deepcopy(a)
        b.zero_grad(set_to_none=True)
        targets = b.targets(glob, masks=masks)  # shared by the parts; the method keeps no state
        outs = {}
        for part in order:
            outs[part] = b(glob, loc, part=part, targets=targets)
            outs[part].loss.backward()
        glob_part, loc_part = outs["global"], outs["local"]
        torch.testing.assert_close(glob_part.loss_cls + loc_part.loss_cls, whole.loss_cls, rtol=1e-5, atol=1e-6)
        for name in ("loss_patch", "loss_koleo"):
            torch.testing.assert_close(getattr(glob_part, name), getattr(whole, name), rtol=1e-5, atol=1e-6)
        assert set(glob_part.metrics) == set(whole.metrics)
        torch.testing.assert_close(glob_part.loss + loc_part.loss, whole.loss, rtol=1e-5, atol=1e-6)
        for (name, pa), (_, pb) in zip(a.student.named_parameters(), b.student.named_parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=name)
    # forward_backward runs the same split: same whole-step terms and gradients
    torch.manual_seed(1)
    c = build_method({**MICRO, "backbone": backbone, "drop_path_rate": 0.0})
    d = copy.deepcopy(c)
    c.mask_generator, d.mask_generator = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    split = c.forward_backward(glob, loc)
    one = d(glob, loc)
    one.loss.backward()
    for name in ("loss", "loss_cls", "loss_patch", "loss_koleo"):
        torch.testing.assert_close(getattr(split, name), getattr(one, name).detach(), rtol=1e-5, atol=1e-6)
    for (name, pc), (_, pd) in zip(c.student.named_parameters(), d.student.named_parameters()):
        torch.testing.assert_close(pc.grad, pd.grad, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="needs local crops"):
        c(glob, None, part="local")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        method = build_method({**MICRO, "mask_probability": 0.5})
        method.configure(total_steps=4, steps_per_epoch=2, global_batch_size=4 * world)
        model = torch.nn.parallel.DistributedDataParallel(method)  # find_unused_parameters=False
        opt = torch.optim.AdamW(method.param_groups())
        losses = []
        for step in range(3):  # DDP reports unused parameters on the step after they occur
            hp = method.apply_schedules(opt, step)
            glob, loc = crops(b=2, n_local=2 if step != 1 else 0, seed=10 * step + rank)
            local = loc if step != 1 else None
            opt.zero_grad()
            # the split step through DDP: all-reduce on the last backward only
            out = method.forward_backward(glob, local, runner=model)
            method.clip_gradients()
            opt.step()
            method.update_teacher(hp["momentum"])
            losses.append(float(out.loss.detach()))
        torch.save({"losses": losses, "w": next(method.student.parameters()).detach().clone()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(torch.isfinite(torch.tensor(r0["losses"] + r1["losses"])))
    torch.testing.assert_close(r0["w"], r1["w"])  # gradients were all-reduced


def test_knn_classify_weighted_votes():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [-1.0, 0.1]])
    acc = knn_classify(train, labels, test, torch.tensor([0, 1, 2]), ks=(1, 2, 20), n_classes=3)
    assert acc[1] == 100.0 and acc[2] == 100.0
    # k=20 > N is clipped to 5; the lone class-2 neighbour still wins for the 3rd query thanks to exp(sim/T)
    assert acc[20] == 100.0


def test_linear_probe_separable():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 4
    y = torch.arange(90) % 3
    x = centers[y] + torch.randn(90, 8, generator=g)
    res = linear_probe(x[:60], y[:60], x[60:], y[60:], epochs=20, batch_size=32)
    assert res["top1"] >= 95.0


def test_compiled_model_matches_eager_without_recompiling_per_mask_count():
    """``torch.compile(model)``: the masked-token count M changes every step; the graphs must
    not specialise on it (one recompile per step made `--compile model` slower than eager).
    Dynamo's own ``eager`` backend: the guards and graph breaks are Dynamo's, no codegen."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = build_method({**MICRO, "drop_path_rate": 0.0})
    compiled = copy.deepcopy(eager)
    fn = torch.compile(compiled, backend="eager", dynamic=None)
    counts, graphs = [6, 9, 13, 20, 26, 31], []
    for step, m_total in enumerate(counts):
        glob, loc = crops(seed=step)
        masks = torch.zeros(8, 16, dtype=torch.bool)  # 2B crops x 16 patches, m_total of them masked
        masks.view(-1)[torch.randperm(8 * 16, generator=torch.Generator().manual_seed(step))[:m_total]] = True
        ref, out = eager(glob, loc, masks=masks), fn(glob, loc, masks=masks)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.loss_patch, ref.loss_patch, rtol=1e-5, atol=1e-6)
        assert float(out.metrics["masked_fraction"]) == m_total / (8 * 16)
        graphs.append(counters["stats"]["unique_graphs"])
    # the first two calls compile (static, then dynamic M); later counts reuse those graphs
    assert graphs[2] == graphs[-1], f"graphs compiled after each step: {graphs} (mask counts {counts})"
    torch._dynamo.reset()
