"""dinov3.augment: shapes, determinism, per-crop probabilities, agreement with torchvision."""

import math

import pytest
import torch
import torchvision.transforms.v2.functional as F

import dinov3.augment as A
from dinov3.augment import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MultiCropAugmentation, normalize


def _img(h=48, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def test_shapes_and_dtypes():
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=6)
    g, loc = aug(_img(), torch.Generator().manual_seed(0))
    assert g.shape == (2, 3, 32, 32) and g.dtype == torch.uint8
    assert loc.shape == (6, 3, 16, 16) and loc.dtype == torch.uint8
    g0, l0 = MultiCropAugmentation(32, 16, n_local=0)(_img(), torch.Generator().manual_seed(0))
    assert g0.shape == (2, 3, 32, 32) and l0.shape == (0, 3, 16, 16)


def test_tiny_and_odd_inputs():
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=2)
    for img in (_img(8, 8), _img(1, 1), _img(5, 300), torch.zeros(1, 20, 20, dtype=torch.uint8),
                torch.zeros(4, 20, 20, dtype=torch.uint8)):
        g, loc = aug(img, torch.Generator().manual_seed(1))
        assert g.shape == (2, 3, 32, 32) and loc.shape == (2, 3, 16, 16)


def test_same_seed_identical_different_seed_different():
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=4)
    img = _img()
    a = aug(img, torch.Generator().manual_seed(123))
    b = aug(img, torch.Generator().manual_seed(123))
    c = aug(img, torch.Generator().manual_seed(124))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    # global randomness ignored: reseeding torch's default RNG changes nothing
    torch.manual_seed(0)
    d = aug(img, torch.Generator().manual_seed(123))
    torch.manual_seed(99)
    e = aug(img, torch.Generator().manual_seed(123))
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


def test_batch_equals_single():
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=3)
    imgs = [_img(seed=i) for i in range(5)]
    gb, lb = aug.batch(imgs, [torch.Generator().manual_seed(i) for i in range(5)])
    for i in range(5):
        g, loc = aug(imgs[i], torch.Generator().manual_seed(i))
        assert torch.equal(gb[i], g) and torch.equal(lb[i], loc)


def test_batch_equals_single_across_photometric_chunks():
    """224 px crops: 3 per photometric call, so a 4-image batch's 8 global crops span 3 calls."""
    from dinov3.augment import PHOTOMETRIC_CHUNK_BYTES

    assert PHOTOMETRIC_CHUNK_BYTES // (3 * 224 * 224 * 4) == 3
    aug = MultiCropAugmentation(global_size=224, local_size=96, n_local=2)
    imgs = [_img(h=260, w=250, seed=i) for i in range(4)]
    gb, lb = aug.batch(imgs, [torch.Generator().manual_seed(10 + i) for i in range(4)])
    for i in range(4):
        g, loc = aug(imgs[i], torch.Generator().manual_seed(10 + i))
        assert torch.equal(gb[i], g) and torch.equal(lb[i], loc)


def _sample(aug, n=4000, h=48, w=40):
    gen = torch.Generator().manual_seed(0)
    return [[aug.sample_params(c, h, w, gen) for c in range(2 + aug.n_local)] for _ in range(n)]


def _rate(samples, crop, key, pred=lambda v: bool(v)):
    vals = [pred(s[crop][key]) for s in samples]
    return sum(vals) / len(vals)


def _close(p_hat, p, n):
    return abs(p_hat - p) <= 4 * math.sqrt(max(p * (1 - p), 1e-4) / n) + 1e-9


@pytest.mark.parametrize("mode,probs", [("nominal", (1.0, 0.1, 0.5)), ("official", (0.0, 0.9, 0.5)),
                                        ("none", (0.0, 0.0, 0.0))])
def test_blur_probabilities(mode, probs):
    aug = MultiCropAugmentation(32, 16, n_local=2, blur=mode)
    s = _sample(aug)
    blurred = lambda v: v is not None  # noqa: E731
    for crop, p in zip((0, 1, 2), probs):
        assert _close(_rate(s, crop, "sigma", blurred), p, len(s)), (mode, crop)
    sig = [c["sigma"] for x in s for c in x if c["sigma"] is not None]
    assert not sig if mode == "none" else (min(sig) >= 0.1 and max(sig) <= 2.0)


def test_other_probabilities_and_solarize_only_global2():
    aug = MultiCropAugmentation(32, 16, n_local=3)
    s = _sample(aug)
    n = len(s)
    assert _rate(s, 0, "solarize") == 0.0
    assert _close(_rate(s, 1, "solarize"), 0.2, n)
    for c in range(2, 5):
        assert _rate(s, c, "solarize") == 0.0
    for c in range(5):
        assert _close(_rate(s, c, "flip"), 0.5, n)
        assert _close(_rate(s, c, "jitter", lambda v: v is not None), 0.8, n)
        assert _close(_rate(s, c, "gray"), 0.2, n)
    # crop scales: global (0.32, 1), local (0.05, 0.32) of the image area (up to rounding)
    area = 48 * 40
    for c, (lo, hi) in ((0, (0.32, 1.0)), (2, (0.05, 0.32))):
        fr = [x[c]["box"][2] * x[c]["box"][3] / area for x in s]
        assert min(fr) > lo * 0.8 and max(fr) < hi * 1.2
    # jitter factor ranges
    f = [dict(x[0]["jitter"]) for x in s if x[0]["jitter"] is not None]
    for op, (lo, hi) in enumerate(((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))):
        vals = [d[op] for d in f]
        assert lo <= min(vals) and max(vals) <= hi


def test_solarize_applied_to_global2_pixels():
    aug = MultiCropAugmentation(32, 16, n_local=1, solarize_prob=1.0, flip_prob=0, jitter_prob=0,
                                grayscale_prob=0, blur="official")
    aug.blur_probs = (0.0, 0.0, 0.0)
    img = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    g, loc = aug(img, torch.Generator().manual_seed(0))
    assert (g[0] == 200).all() and (g[1] == 55).all() and (loc == 200).all()


def test_vectorised_ops_match_torchvision():
    x = torch.randint(0, 256, (5, 3, 24, 24), dtype=torch.uint8)
    xf = x.float() / 255
    cases = [(A._brightness, F.adjust_brightness, 1.3), (A._contrast, F.adjust_contrast, 0.7),
             (A._saturation, F.adjust_saturation, 1.2), (A._hue, F.adjust_hue, 0.08), (A._hue, F.adjust_hue, -0.1)]
    for fast, ref, f in cases:
        a = (fast(xf, torch.full((5,), f)) * 255).round().to(torch.uint8)
        b = torch.stack([ref(x[i], f) for i in range(5)])
        assert (a.int() - b.int()).abs().max() <= 1, fast.__name__
    sig = [0.1, 0.5, 1.0, 1.5, 2.0]
    a = (A._blur_batch(xf, sig) * 255).round().to(torch.uint8)
    b = torch.stack([F.gaussian_blur(x[i], [9, 9], [s, s]) for i, s in enumerate(sig)])
    assert (a.int() - b.int()).abs().max() <= 1


def test_fast_path_matches_reference_path():
    aug = MultiCropAugmentation(32, 16, n_local=4)
    img = _img()
    gen = torch.Generator().manual_seed(5)
    ps = [aug.sample_params(c, 48, 40, gen) for c in range(6)]
    fast = aug.apply_group(img, ps[2:], 16)
    ref = torch.stack([aug.apply(img, p, 16) for p in ps[2:]])
    d = (fast.int() - ref.int()).abs().float()
    assert d.mean() < 2.0  # only intermediate uint8 rounding differs


def test_eval_transform():
    tf = EvalTransform(32)
    assert tf.resize_size == round(32 * 256 / 224)
    out = tf(_img(50, 70))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert EvalTransform(224)(_img(300, 400)).shape == (3, 224, 224)
    assert EvalTransform(16)(_img(8, 8)).shape == (3, 16, 16)


def test_uint8_resize_equals_torchvision():
    """The actors' own resize/crop (no torchvision import) gives torchvision's exact pixels,
    for contiguous and channels-last (decoded HWC) images, down- and up-scaling."""
    from torchvision.transforms import InterpolationMode

    bicubic = InterpolationMode.BICUBIC
    g = torch.Generator().manual_seed(0)
    n = 0
    for h, w in [(48, 40), (32, 32), (7, 300), (1, 1), (257, 193)]:
        hwc = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)
        for img in (hwc.permute(2, 0, 1), hwc.permute(2, 0, 1).contiguous()):
            assert torch.equal(A.resize_uint8(img, (h, w)), img)
            for _ in range(12):
                t, l = int(torch.randint(0, h, (1,), generator=g)), int(torch.randint(0, w, (1,), generator=g))
                bh, bw = int(torch.randint(1, h - t + 1, (1,), generator=g)), int(torch.randint(1, w - l + 1, (1,), generator=g))
                size = int(torch.randint(1, 64, (1,), generator=g))
                ours = A.resized_crop_uint8(img, t, l, bh, bw, size)
                ref = F.resized_crop(img, t, l, bh, bw, [size, size], interpolation=bicubic, antialias=True)
                assert ours.shape == (3, size, size) and torch.equal(ours, ref), (h, w, t, l, bh, bw, size)
                n += 1
            for size in [(h + 5, w), (max(1, h // 3), 2 * w)]:
                assert torch.equal(A.resize_uint8(img, size), F.resize(img, list(size), interpolation=bicubic,
                                                                          antialias=True))
    assert n == 120


def test_eval_transform_equals_torchvision():
    from torchvision.transforms import InterpolationMode

    for size, (h, w) in [(32, (50, 70)), (32, (70, 50)), (224, (300, 400)), (16, (8, 8)), (32, (37, 37)),
                         (224, (256, 256))]:
        tf = EvalTransform(size)
        img = _img(h, w, seed=size + h)
        ref = F.center_crop(F.resize(img, [tf.resize_size], interpolation=InterpolationMode.BICUBIC,
                                     antialias=True), [size, size])
        assert torch.equal(tf(img), ref), (size, h, w)
    with pytest.raises(ValueError, match="resize_ratio"):
        EvalTransform(32, resize_ratio=0.9)


def test_augment_imports_neither_torchvision_nor_timm():
    """A data actor imports dinov3.augment: it must not pay for timm or torchvision
    (~2 s and ~200 MiB per actor process)."""
    import subprocess
    import sys

    code = ("import sys, dinov3.augment, dinov3\n"
            "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))\n"
            "dinov3.build_method\n"
            "print('timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"  # lazy names still resolve


def test_normalize():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    y = normalize(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    for c in range(3):
        assert torch.allclose(y[:, c], torch.tensor((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]))
    assert torch.allclose(normalize(x.float() / 255), y)


def test_bad_blur_mode():
    with pytest.raises(ValueError):
        MultiCropAugmentation(blur="sometimes")


# ---------------------------------------------------------------------------------------
# Split path (data.augment_on=gpu): actors' geometric part + batched photometric ops
# ---------------------------------------------------------------------------------------

def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _split(aug, imgs, seeds):
    gg, ll, gp, lp = aug.geometric_batch(imgs, _gens(seeds))
    return A.apply_photometric_batch(gg, ll, gp, lp)


@pytest.mark.parametrize("blur", ["nominal", "official", "none"])
@pytest.mark.parametrize("gsize,lsize,n_local,hw,n_img,seeds", [
    (224, 96, 8, (256, 250), 3, (0, 1)),
    (32, 16, 6, (32, 32), 12, (0, 1, 2, 3)),
])
def test_split_path_equals_cpu_path_bitwise(blur, gsize, lsize, n_local, hw, n_img, seeds):
    """geometric_batch + apply_photometric_batch on CPU tensors == batch (the actors' cpu
    path), bit for bit, for the same generators."""
    aug = MultiCropAugmentation(gsize, lsize, n_local=n_local, blur=blur)
    for seed in seeds:
        imgs = [_img(*hw, seed=100 * seed + i) for i in range(n_img)]
        keys = [1000 * seed + i for i in range(n_img)]
        g, loc = aug.batch(imgs, _gens(keys))
        gs, ls = _split(aug, imgs, keys)
        assert gs.dtype == torch.uint8 and gs.shape == g.shape and ls.shape == loc.shape
        assert torch.equal(gs, g) and torch.equal(ls, loc), (blur, gsize, seed)


def test_split_path_every_op_on_every_crop_and_none():
    """All ops on all crops (no gather: whole-batch branches) and no op at all."""
    imgs = [_img(40, 36, seed=i) for i in range(4)]
    for prob in (1.0, 0.0):
        aug = MultiCropAugmentation(32, 16, n_local=3, flip_prob=prob, jitter_prob=prob, grayscale_prob=prob,
                                    solarize_prob=prob)
        aug.blur_probs = (prob, prob, prob)
        g, loc = aug.batch(imgs, _gens(range(4)))
        gs, ls = _split(aug, imgs, range(4))
        assert torch.equal(gs, g) and torch.equal(ls, loc), prob
    # grayscale without jitter: the whole-batch gray output is an expanded view internally
    aug = MultiCropAugmentation(32, 16, n_local=2, jitter_prob=0.0, grayscale_prob=1.0)
    g, loc = aug.batch(imgs, _gens(range(4)))
    gs, ls = _split(aug, imgs, range(4))
    assert torch.equal(gs, g) and torch.equal(ls, loc)
    assert torch.equal(gs[:, :, 0], gs[:, :, 1]) and torch.equal(gs[:, :, 0], gs[:, :, 2])


def test_geometric_batch_draws_like_batch_and_packs_params():
    aug = MultiCropAugmentation(32, 16, n_local=4)
    imgs = [_img(48, 40, seed=i) for i in range(16)]
    ga, gb = _gens(range(16)), _gens(range(16))
    aug.batch(imgs, ga)
    gg, ll, gp, lp = aug.geometric_batch(imgs, gb)
    assert gg.shape == (16, 2, 3, 32, 32) and ll.shape == (16, 4, 3, 16, 16) and gg.dtype == torch.uint8
    assert gp.shape == (16, 2, A.N_PHOTO_PARAMS) and lp.shape == (16, 4, A.N_PHOTO_PARAMS)
    assert gp.dtype == torch.float32 and lp.dtype == torch.float32
    # the same generator draws: both generators end in the same state
    assert all(torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b)) for a, b in zip(ga, gb))
    # packed values: those of sample_params
    ps = [[aug.sample_params(c, 48, 40, g) for c in range(6)] for g in _gens(range(16))]
    packed = torch.cat([gp, lp], dim=1)
    for i in range(16):
        for c in range(6):
            p, v = ps[i][c], packed[i, c]
            assert v[A.PARAM_FLIP] == float(p["flip"]) and v[A.PARAM_GRAY] == float(p["gray"])
            assert v[A.PARAM_SOLARIZE] == float(p["solarize"]) and v[A.PARAM_BLUR_KSIZE] == 9
            assert v[A.PARAM_SIGMA] == (0.0 if p["sigma"] is None else torch.tensor(p["sigma"]).item())
            assert v[A.PARAM_JITTER] == float(p["jitter"] is not None)
            if p["jitter"] is not None:
                assert v[A.PARAM_ORDER:A.PARAM_ORDER + 4].tolist() == [op for op, _ in p["jitter"]]
                for op, f in p["jitter"]:
                    assert v[A.PARAM_FACTORS + op] == torch.tensor(f).item()
    # geometric crops are the resized boxes, unflipped
    p = ps[3][2]
    assert torch.equal(ll[3, 0], A.resized_crop_uint8(imgs[3], *p["box"], 16))
    assert packed[..., A.PARAM_SOLARIZE].sum() > 0 and packed[:, 2:, A.PARAM_SOLARIZE].sum() == 0


def test_apply_photometric_independent_of_batch_mates():
    """A crop's result depends only on itself: any permutation, subset or lone crop (224 px:
    a lone crop's contrast mean would otherwise be summed across threads) gives the same."""
    for gsize, lsize, hw in ((224, 96, (256, 256)), (32, 16, (40, 40))):
        aug = MultiCropAugmentation(gsize, lsize, n_local=4, jitter_prob=1.0)  # contrast on many crops
        imgs = [_img(*hw, seed=i) for i in range(4)]
        gg, ll, gp, lp = aug.geometric_batch(imgs, _gens(range(50, 54)))
        for crops, params in ((gg.flatten(0, 1), gp.flatten(0, 1)), (ll.flatten(0, 1), lp.flatten(0, 1))):
            full = A.apply_photometric(crops, params)
            perm = torch.randperm(len(crops), generator=torch.Generator().manual_seed(gsize))
            assert torch.equal(A.apply_photometric(crops[perm], params[perm]), full[perm])
            half = perm[: len(perm) // 2]
            assert torch.equal(A.apply_photometric(crops[half], params[half]), full[half])
            for i in range(len(crops)):
                assert torch.equal(A.apply_photometric(crops[i:i + 1], params[i:i + 1])[0], full[i]), (gsize, i)


def test_apply_photometric_inputs_shapes_and_errors():
    aug = MultiCropAugmentation(32, 16, n_local=0)
    imgs = [_img(seed=i) for i in range(3)]
    gg, ll, gp, lp = aug.geometric_batch(imgs, _gens(range(3)))
    assert ll.shape == (3, 0, 3, 16, 16) and lp.shape == (3, 0, A.N_PHOTO_PARAMS)
    before = gg.clone()
    g, loc = A.apply_photometric_batch(gg, ll, gp.numpy(), lp.numpy())  # numpy params accepted
    assert torch.equal(gg, before)  # the input crops are left unchanged
    assert loc.shape == (3, 0, 3, 16, 16) and torch.equal(g, aug.batch(imgs, _gens(range(3)))[0])
    empty = A.apply_photometric(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, A.N_PHOTO_PARAMS))
    assert empty.shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="params"):
        A.apply_photometric(gg[0], gp[0, :1])
    with pytest.raises(ValueError, match="crops"):
        A.apply_photometric(gg[0].float(), gp[0])


def test_apply_photometric_runs_on_another_device():
    """Device plumbing without a GPU: crops on the ``meta`` device (any op mixing in a CPU
    tensor would raise), parameters on the CPU -> crops of the same shape on that device."""
    aug = MultiCropAugmentation(32, 16, n_local=4, jitter_prob=0.9, grayscale_prob=0.5)
    aug.blur_probs = (0.5, 0.5, 0.5)
    imgs = [_img(seed=i) for i in range(6)]
    gg, ll, gp, lp = aug.geometric_batch(imgs, _gens(range(6)))
    g, loc = A.apply_photometric_batch(gg.to("meta"), ll.to("meta"), gp, lp)
    assert g.device.type == "meta" and g.shape == gg.shape and g.dtype == torch.uint8
    assert loc.device.type == "meta" and loc.shape == ll.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_photometric_cuda_close_to_cpu():
    """On CUDA the device kernels round differently (fused multiply-adds, reduction order,
    exp): rare pixels may move by a grey level or two; the crops are otherwise the same."""
    aug = MultiCropAugmentation(224, 96, n_local=8)
    imgs = [_img(256, 250, seed=i) for i in range(8)]
    gg, ll, gp, lp = aug.geometric_batch(imgs, _gens(range(8)))
    g, loc = A.apply_photometric_batch(gg, ll, gp, lp)
    gc, lc = A.apply_photometric_batch(gg.cuda(), ll.cuda(), gp, lp)  # parameters stay on the CPU
    gc2, _ = A.apply_photometric_batch(gg.cuda(), ll.cuda(), gp.cuda(), lp.cuda())
    assert gc.device.type == "cuda" and torch.equal(gc, gc2)
    for cpu, dev in ((g, gc.cpu()), (loc, lc.cpu())):
        d = (cpu.int() - dev.int()).abs()
        assert d.max() <= 3 and (d > 0).float().mean() < 1e-2, (d.max(), (d > 0).float().mean())
