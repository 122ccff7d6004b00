"""Multi-crop augmentation (recipe section 3) on uint8 tensors.

Plain PyTorch; no Ray, MLflow or Hydra. The transform runs per image on CPU data actors, so
it is written for speed and a small footprint:

* every random number comes from the ``torch.Generator`` passed to ``__call__``
  (drawn in a few vectorised calls), so the same generator seed gives identical crops;
* pixels stay uint8 through crop/resize (torch's native uint8 antialiased bicubic kernel,
  the call torchvision's ``F.resize`` makes; the ops only available in float are done once
  per crop, vectorised over crops);
* torchvision is not imported (~1.4 s and ~170 MiB in every data actor); its functional
  ops are the reference the tests compare against (:meth:`MultiCropAugmentation.apply`);
* Gaussian blur is separable (two 1-D passes) instead of a dense k x k kernel.

| | global 1 | global 2 | local (x n_local) |
|---|---|---|---|
| RandomResizedCrop (bicubic) | global_size, global_scale | same | local_size, local_scale |
| horizontal flip | 0.5 | 0.5 | 0.5 |
| ColorJitter (0.4, 0.4, 0.2, 0.1), random op order | p 0.8 | p 0.8 | p 0.8 |
| grayscale | 0.2 | 0.2 | 0.2 |
| Gaussian blur, sigma U(0.1, 2), kernel 9 | 1.0 | 0.1 | 0.5  (blur="nominal", default) |
|                                          | 0.0 | 0.9 | 0.5  (blur="official": released models) |
|                                          | 0.0 | 0.0 | 0.0  (blur="none": small images) |
| solarize (threshold 128) | - | solarize_prob (0.2) | - |

Normalisation (ImageNet mean/std) is *not* applied here: crops leave as uint8 (4x less
data through Ray's object store) and :func:`normalize` runs on the training device.

Split path (``data.augment_on=gpu``): the actors run only the geometric part,
:meth:`MultiCropAugmentation.geometric_batch` (random-resized-crop + resize, uint8), and
ship every crop's photometric parameters packed as float32 ``[..., N_PHOTO_PARAMS]``
(layout: the ``PARAM_*`` indices); the trainer runs flip, colour jitter, grayscale, blur and
solarize batched on its device with :func:`apply_photometric_batch` (or
:func:`apply_photometric` on flat ``[N, 3, S, S]`` crops), then :func:`normalize`. Same
generator draws, same arithmetic: on CPU tensors the result is bitwise the crops of
:meth:`MultiCropAugmentation.batch` (tested); on CUDA, float rounding of the device kernels
(fused multiply-adds, reduction order, ``exp``) can move rare pixels by one grey level.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as tnf

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

# (global 1, global 2, local) blur probabilities.
# "none": small images, where a sigma of up to 2 px (set for 224 px) erases the content.
BLUR_PROBS = {"nominal": (1.0, 0.1, 0.5), "official": (0.0, 0.9, 0.5), "none": (0.0, 0.0, 0.0)}
# float32 bytes of crops per photometric call: cache-sized chunks ran 224 px crops 24% and
# 32 px crops 8% faster than one call over a whole 16- / 256-image batch (2-core CPU here).
PHOTOMETRIC_CHUNK_BYTES = 2 << 20

# Packed photometric parameters of one crop (float32 vector, every value exact in float32):
PARAM_FLIP = 0        # 1: horizontal flip
PARAM_JITTER = 1      # 1: colour jitter applied
PARAM_FACTORS = 2     # 2..5: brightness, contrast, saturation, hue factors (1, 1, 1, 0 when not applied)
PARAM_ORDER = 6       # 6..9: jitter op (0 brightness, 1 contrast, 2 saturation, 3 hue) at position 0..3
PARAM_GRAY = 10       # 1: grayscale
PARAM_SIGMA = 11      # Gaussian blur sigma (0: no blur)
PARAM_BLUR_KSIZE = 12  # Gaussian blur kernel size
PARAM_SOLARIZE = 13   # 1: solarize (threshold 128)
N_PHOTO_PARAMS = 14


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` (0-255) -> float32 normalised with ImageNet mean/std.

    Float input is assumed to be in [0, 1] already. Works on any device.
    """
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    else:
        x = x.float()
    shape = (3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(shape)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(shape)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------
# Parameter sampling (pure functions of the generator)
# ---------------------------------------------------------------------------------------

def _rrc_params(height: int, width: int, scale: Tuple[float, float], u: Sequence[float],
                ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)) -> Tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params, drawing from the uniforms ``u`` (len 40)."""
    area = height * width
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(10):
        ua, ur, ui, uj = u[4 * attempt: 4 * attempt + 4]
        target_area = area * (scale[0] + ua * (scale[1] - scale[0]))
        aspect = math.exp(log_r0 + ur * (log_r1 - log_r0))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = min(int(ui * (height - h + 1)), height - h)
            j = min(int(uj * (width - w + 1)), width - w)
            return i, j, h, w
    # Fallback: central crop with the ratio clamped to the allowed range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ---------------------------------------------------------------------------------------
# Fast uint8 ops
# ---------------------------------------------------------------------------------------

def _gaussian_kernel1d(ksize: int, sigma: float) -> torch.Tensor:
    half = (ksize - 1) * 0.5
    x = torch.linspace(-half, half, ksize)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def resize_uint8(img: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bicubic antialiased resize of uint8 ``[..., C, H, W]`` to ``size = (h, w)``.

    The exact call torchvision's ``F.resize(img, size, BICUBIC, antialias=True)`` makes (same
    output, tested): torch's native uint8 kernel on CPU, float with rounding elsewhere.
    """
    h, w = int(size[0]), int(size[1])
    shape = img.shape
    c, h0, w0 = shape[-3:]
    if (h0, w0) == (h, w):
        return img
    x = img.reshape(-1, c, h0, w0)
    if x.shape[0] == 1 and x.is_contiguous(memory_format=torch.channels_last) and x.stride(0) != x.numel():
        # A 1CHW channels-last view with an ambiguous batch stride gets a contiguous output
        # from interpolate (pytorch#68430); restriding keeps it channels-last (no repacking).
        x = x.as_strided(x.shape, (x.numel(),) + tuple(x.stride()[1:]))
    if x.device.type == "cpu":
        y = tnf.interpolate(x, size=[h, w], mode="bicubic", align_corners=False, antialias=True)
    else:
        y = tnf.interpolate(x.float(), size=[h, w], mode="bicubic", align_corners=False, antialias=True)
        y = y.clamp_(0, 255).round_().to(torch.uint8)
    return y.reshape(shape[:-3] + (c, h, w))


def resized_crop_uint8(img: torch.Tensor, top: int, left: int, height: int, width: int,
                       size: int) -> torch.Tensor:
    """Crop the box (inside the image) and resize it to ``size x size``, bicubic, antialiased."""
    return resize_uint8(img[..., top:top + height, left:left + width], (size, size))


def gaussian_blur(img: torch.Tensor, sigma: float, kernel_size: int = 9) -> torch.Tensor:
    """Separable Gaussian blur of uint8 ``[3, H, W]`` with reflect padding.

    Same result as ``F.gaussian_blur(img, [k, k], [sigma, sigma])`` (up to uint8 rounding)
    at ~1/4 of the cost: two 1-D passes instead of a dense k x k kernel.
    """
    h, w = img.shape[-2:]
    k = min(kernel_size, 2 * (min(h, w) - 1) + 1)  # reflect padding needs pad < size
    if k < 3:
        return img
    k = k if k % 2 == 1 else k - 1
    pad = k // 2
    kern = _gaussian_kernel1d(k, sigma)
    x = img.unsqueeze(0).float()
    c = x.shape[1]
    x = tnf.pad(x, [pad, pad, pad, pad], mode="reflect")
    x = tnf.conv2d(x, kern.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    x = tnf.conv2d(x, kern.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return x.squeeze(0).round_().clamp_(0, 255).to(torch.uint8)


def solarize(img: torch.Tensor, threshold: int = 128) -> torch.Tensor:
    """uint8 solarize: invert every pixel >= threshold (as torchvision/PIL)."""
    return torch.where(img >= threshold, 255 - img, img)


class MultiCropAugmentation:
    """DINO multi-crop: 2 global + ``n_local`` local crops of one uint8 ``[3, H, W]`` image.

    ``__call__(image, generator) -> (global uint8 [2, 3, G, G], local uint8 [n_local, 3, L, L])``.
    All randomness is drawn from ``generator``.
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, n_local: int = 8,
                 global_scale: Tuple[float, float] = (0.32, 1.0),
                 local_scale: Tuple[float, float] = (0.05, 0.32),
                 blur: str = "nominal", solarize_prob: float = 0.2,
                 flip_prob: float = 0.5,
                 jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
                 jitter_prob: float = 0.8, grayscale_prob: float = 0.2,
                 blur_sigma: Tuple[float, float] = (0.1, 2.0), blur_kernel_size: int = 9):
        if blur not in BLUR_PROBS:
            raise ValueError(f"blur={blur!r}: must be one of {sorted(BLUR_PROBS)}")
        if n_local < 0:
            raise ValueError(f"n_local={n_local}: must be >= 0")
        self.global_size, self.local_size, self.n_local = int(global_size), int(local_size), int(n_local)
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.blur = blur
        self.blur_probs = BLUR_PROBS[blur]
        self.solarize_prob = float(solarize_prob)
        self.flip_prob, self.jitter_prob, self.grayscale_prob = flip_prob, jitter_prob, grayscale_prob
        b, c, s, h = jitter
        self.jitter_ranges = ((max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h))
        self.blur_sigma, self.blur_kernel_size = tuple(blur_sigma), int(blur_kernel_size)

    def __repr__(self) -> str:
        return (f"MultiCropAugmentation(global_size={self.global_size}, local_size={self.local_size}, "
                f"n_local={self.n_local}, global_scale={self.global_scale}, local_scale={self.local_scale}, "
                f"blur={self.blur!r} {self.blur_probs}, solarize_prob={self.solarize_prob})")

    # Number of uniforms one crop consumes: 40 (crop tries) + flip + jitter(apply + 4 factors)
    # + gray + blur(apply + sigma) + solarize = 51; the jitter order is a separate randperm.
    _N_UNIFORMS = 51

    def sample_params(self, crop: int, height: int, width: int, generator: torch.Generator) -> dict:
        """Random parameters of one crop (crop 0/1: global 1/2, crop >= 2: locals).

        Exposed for tests: the same draws ``__call__`` makes, in the same order.
        """
        u = torch.rand(self._N_UNIFORMS, generator=generator).tolist()
        order = torch.randperm(4, generator=generator).tolist()
        is_global = crop < 2
        scale = self.global_scale if is_global else self.local_scale
        p = {"box": _rrc_params(height, width, scale, u[:40]), "flip": u[40] < self.flip_prob}
        p["jitter"] = None
        if u[41] < self.jitter_prob:
            factors = [lo + uu * (hi - lo) for (lo, hi), uu in zip(self.jitter_ranges, u[42:46])]
            p["jitter"] = [(o, factors[o]) for o in order]
        p["gray"] = u[46] < self.grayscale_prob
        blur_p = self.blur_probs[min(crop, 2)]
        p["sigma"] = (self.blur_sigma[0] + u[48] * (self.blur_sigma[1] - self.blur_sigma[0])) if u[47] < blur_p else None
        p["solarize"] = crop == 1 and u[49] < self.solarize_prob
        return p

    def apply(self, img: torch.Tensor, p: dict, size: int) -> torch.Tensor:
        """One crop with the torchvision functional ops, op by op (reference path, slow)."""
        import torchvision.transforms.v2.functional as F
        from torchvision.transforms import InterpolationMode

        i, j, h, w = p["box"]
        x = F.resized_crop(img, i, j, h, w, [size, size], interpolation=InterpolationMode.BICUBIC,
                           antialias=True)
        if p["flip"]:
            x = F.horizontal_flip(x)
        if p["jitter"] is not None:
            for op, f in p["jitter"]:
                if op == 0:
                    x = F.adjust_brightness(x, f)
                elif op == 1:
                    x = F.adjust_contrast(x, f)
                elif op == 2:
                    x = F.adjust_saturation(x, f)
                else:
                    x = F.adjust_hue(x, f)
        if p["gray"]:
            x = F.rgb_to_grayscale(x, num_output_channels=3)
        if p["sigma"] is not None:
            x = gaussian_blur(x, p["sigma"], self.blur_kernel_size)
        if p["solarize"]:
            x = solarize(x, 128)
        return x

    def photometric(self, out: torch.Tensor, params: List[dict]) -> torch.Tensor:
        """Flip / jitter (per-crop random op order) / grayscale / blur / solarize of uint8
        crops [N, 3, S, S], vectorised over the crops with per-crop parameters.

        Every op is per-crop elementwise (the blur is a shifted sum, not a conv), so a crop's
        result does not depend on which other crops share the call.
        """
        packed = torch.tensor([self.pack_params(p) for p in params], dtype=torch.float32)
        return _photometric_packed(out, packed)

    def apply_group(self, img: torch.Tensor, params: List[dict], size: int) -> torch.Tensor:
        """Crops of one image and one size: per-crop resized crop, then :meth:`photometric`."""
        return self._crops([img] * len(params), params, size)

    def _resized_crops(self, images: Sequence[torch.Tensor], params: List[dict], size: int) -> torch.Tensor:
        """The geometric part: each crop's box resized to ``size`` (uint8 [N, 3, size, size])."""
        out = torch.empty((len(params), 3, size, size), dtype=torch.uint8)
        for k, (img, p) in enumerate(zip(images, params)):
            i, j, h, w = p["box"]
            out[k] = resized_crop_uint8(img, i, j, h, w, size)
        return out

    def _crops(self, images: Sequence[torch.Tensor], params: List[dict], size: int) -> torch.Tensor:
        out = self._resized_crops(images, params, size)
        chunk = max(1, PHOTOMETRIC_CHUNK_BYTES // (3 * size * size * 4))
        if chunk >= len(params):
            return self.photometric(out, params)
        for s in range(0, len(params), chunk):  # per-crop ops: chunking changes no pixel
            out[s:s + chunk] = self.photometric(out[s:s + chunk], params[s:s + chunk])
        return out

    def _sample_batch(self, images: Sequence[torch.Tensor], generators: Sequence[torch.Generator]):
        """Every crop's parameters, image by image (the draws of ``self(image, generator)``):
        (global images, global params, local images, local params), flat lists."""
        pg, pl, ig, il = [], [], [], []
        for img, gen in zip(images, generators):
            height, width = img.shape[-2:]
            ps = [self.sample_params(c, height, width, gen) for c in range(2 + self.n_local)]
            pg += ps[:2]
            pl += ps[2:]
            ig += [img, img]
            il += [img] * self.n_local
        return ig, pg, il, pl

    def batch(self, images: Sequence[torch.Tensor], generators: Sequence[torch.Generator]
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Many images at once (one generator each): global [B, 2, 3, G, G], local [B, n, 3, L, L].

        Identical to stacking ``self(image_b, generator_b)``; faster because the photometric
        ops run over many crops of a size at once (in chunks of ``PHOTOMETRIC_CHUNK_BYTES``).
        """
        images = [_as_rgb_uint8(im) for im in images]
        b, n = len(images), self.n_local
        ig, pg, il, pl = self._sample_batch(images, generators)
        g = self._crops(ig, pg, self.global_size).view(b, 2, 3, self.global_size, self.global_size)
        if n:
            loc = self._crops(il, pl, self.local_size).view(b, n, 3, self.local_size, self.local_size)
        else:
            loc = torch.empty((b, 0, 3, self.local_size, self.local_size), dtype=torch.uint8)
        return g, loc

    def pack_params(self, p: dict) -> List[float]:
        """One crop's photometric parameters (a :meth:`sample_params` dict) as the packed
        ``N_PHOTO_PARAMS`` vector (layout: ``PARAM_*``); float32 holds every value exactly as
        :meth:`photometric` uses it (its factors and sigmas also pass through float32)."""
        v = [0.0] * N_PHOTO_PARAMS
        v[PARAM_FLIP] = float(p["flip"])
        v[PARAM_FACTORS:PARAM_FACTORS + 4] = [1.0, 1.0, 1.0, 0.0]  # neutral (unused when not applied)
        v[PARAM_ORDER:PARAM_ORDER + 4] = [0.0, 1.0, 2.0, 3.0]
        if p["jitter"] is not None:
            v[PARAM_JITTER] = 1.0
            for pos, (op, f) in enumerate(p["jitter"]):
                v[PARAM_ORDER + pos] = float(op)
                v[PARAM_FACTORS + op] = f
        v[PARAM_GRAY] = float(p["gray"])
        v[PARAM_SIGMA] = 0.0 if p["sigma"] is None else p["sigma"]
        v[PARAM_BLUR_KSIZE] = float(self.blur_kernel_size)
        v[PARAM_SOLARIZE] = float(p["solarize"])
        return v

    def geometric_batch(self, images: Sequence[torch.Tensor], generators: Sequence[torch.Generator]
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The data actors' part of ``augment_on=gpu``: the same draws as :meth:`batch`, but
        only random-resized-crop + resize; the rest leaves as packed parameters.

        Returns ``(global uint8 [B, 2, 3, G, G], local uint8 [B, n, 3, L, L],
        global_params float32 [B, 2, N_PHOTO_PARAMS], local_params float32 [B, n, N_PHOTO_PARAMS])``;
        :func:`apply_photometric_batch` on them gives exactly :meth:`batch`'s crops.
        """
        images = [_as_rgb_uint8(im) for im in images]
        b, n = len(images), self.n_local
        G, L = self.global_size, self.local_size
        ig, pg, il, pl = self._sample_batch(images, generators)
        g = self._resized_crops(ig, pg, G).view(b, 2, 3, G, G)
        loc = self._resized_crops(il, pl, L).view(b, n, 3, L, L)
        gp = torch.tensor([self.pack_params(p) for p in pg], dtype=torch.float32).view(b, 2, N_PHOTO_PARAMS)
        lp = torch.tensor([self.pack_params(p) for p in pl], dtype=torch.float32).view(b, n, N_PHOTO_PARAMS)
        return g, loc, gp, lp

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        g, loc = self.batch([image], [generator])
        return g[0], loc[0]


# ---------------------------------------------------------------------------------------
# Vectorised float ops on [N, 3, H, W] in [0, 1] with per-crop factors [N]
# (same formulas as torchvision.transforms.v2.functional)
# ---------------------------------------------------------------------------------------

def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    return (a * f + b * (1.0 - f)).clamp_(0.0, 1.0)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _crop_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-crop mean of [N, 1, H, W] -> [N, 1, 1, 1], the same bits whatever N and the thread
    count: torch's CPU reduction splits a lone output's sum over threads (another summation
    order) once it is large (grain 32768 elements: 1 x 224 x 224 is); with >= 2 outputs it
    splits over the outputs and sums each one serially. A lone crop is therefore reduced next
    to a copy of itself, which gives the serial (one-thread, as in the data actors) bits."""
    if x.shape[0] == 1 and x.device.type == "cpu" and torch.get_num_threads() > 1:
        return torch.cat([x, x]).mean(dim=(-3, -2, -1), keepdim=True)[:1]
    return x.mean(dim=(-3, -2, -1), keepdim=True)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _crop_mean(_gray(x)), f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), f)


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Hue shift by f (fraction of a turn) per crop: torchvision's RGB->HSV->RGB, written in
    the chroma form (value and saturation are unchanged by a hue shift, so only the
    hexcone position h6 = 6 * hue moves)."""
    r, g, b = x.unbind(dim=-3)
    maxc, _ = x.max(dim=-3)
    minc, _ = x.min(dim=-3)
    cr = maxc - minc
    crd = torch.where(cr == 0, torch.ones_like(cr), cr)
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    h6 = torch.where(is_r, (g - b) / crd, torch.where(is_g, 2.0 + (b - r) / crd, 4.0 + (r - g) / crd))
    h6 = torch.remainder(h6 + (6.0 * f).view(-1, 1, 1), 6.0)
    rgb = torch.stack(((h6 - 3.0).abs_().sub_(1.0), (h6 - 2.0).abs_().neg_().add_(2.0),
                       (h6 - 4.0).abs_().neg_().add_(2.0)), dim=-3).clamp_(0.0, 1.0)
    return rgb.mul_(cr.unsqueeze(-3)).add_(minc.unsqueeze(-3))


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def _blur_batch(x: torch.Tensor, sigmas: Sequence[float], kernel_size: int = 9) -> torch.Tensor:
    """Separable Gaussian blur of float [N, 3, H, W], one sigma per crop, reflect padding.

    Written as k shifted multiply-adds per axis (per-crop weights), which beats a grouped
    depthwise conv2d on CPU and keeps every crop independent of the others in the batch.
    """
    n, c, h, w = x.shape
    k = min(kernel_size, 2 * (min(h, w) - 1) + 1)
    if k < 3:
        return x
    k = k if k % 2 == 1 else k - 1
    pad = k // 2
    # weights computed on the CPU whatever x's device (the same bits on every device)
    half = (k - 1) * 0.5
    t = torch.linspace(-half, half, k)
    sig = torch.as_tensor(sigmas, dtype=torch.float32).to("cpu").view(n, 1)
    kern = torch.exp(-0.5 * (t.view(1, k) / sig) ** 2)
    kern = (kern / kern.sum(dim=1, keepdim=True)).T.reshape(k, n, 1, 1, 1).to(x.device, x.dtype)
    xp = tnf.pad(x, [pad, pad, 0, 0], mode="reflect")
    y = xp[..., 0:w] * kern[0]
    for i in range(1, k):
        y.addcmul_(xp[..., i:i + w], kern[i])
    yp = tnf.pad(y, [0, 0, pad, pad], mode="reflect")
    z = yp[..., 0:h, :] * kern[0]
    for i in range(1, k):
        z.addcmul_(yp[..., i:i + h, :], kern[i])
    return z


# ---------------------------------------------------------------------------------------
# Photometric ops from packed parameters, on any device (data.augment_on=gpu)
# ---------------------------------------------------------------------------------------

def _photometric_packed(out: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """:meth:`MultiCropAugmentation.photometric` with the parameters packed (``p``: float32
    [N, N_PHOTO_PARAMS] on the CPU): the same per-op groups of crops and the same arithmetic.
    The groups' indices come from the CPU copy of the parameters (no device sync); each op runs
    once over its group (gather / scatter along dim 0), never per crop. May modify ``out``."""
    dev, n = out.device, out.shape[0]

    def group(mask: torch.Tensor):
        k = torch.nonzero(mask).flatten()
        return k, (k if dev.type == "cpu" else k.to(dev, non_blocking=True))

    def run(x: torch.Tensor, k: torch.Tensor, kd: torch.Tensor, fn) -> torch.Tensor:
        if len(k) == n:  # the whole batch: no gather
            return fn(x, k).contiguous()  # (grayscale returns an expanded view)
        return x.index_copy_(0, kd, fn(x.index_select(0, kd), k))

    flip = p[:, PARAM_FLIP] > 0.5
    if flip.any():
        k, kd = group(flip)
        out = run(out, k, kd, lambda y, _: y.flip(-1))
    jit = p[:, PARAM_JITTER] > 0.5
    gray = p[:, PARAM_GRAY] > 0.5
    blur = p[:, PARAM_SIGMA] > 0
    if jit.any() or gray.any() or blur.any():
        x = out.float().div_(255.0)
        if jit.any():
            for pos in range(4):
                at = p[:, PARAM_ORDER + pos]
                for op in range(4):
                    sel = jit & (at == op)
                    if sel.any():
                        k, kd = group(sel)
                        x = run(x, k, kd, lambda y, kk, op=op: _JITTER_OPS[op](
                            y, p[kk, PARAM_FACTORS + op].to(dev)))
        if gray.any():
            k, kd = group(gray)
            x = run(x, k, kd, lambda y, _: _gray(y).expand(-1, 3, -1, -1))
        if blur.any():
            ks = p[:, PARAM_BLUR_KSIZE]
            for size in torch.unique(ks[blur]).tolist():
                k, kd = group(blur & (ks == size))
                x = run(x, k, kd, lambda y, kk: _blur_batch(y, p[kk, PARAM_SIGMA], int(size)))
        out = x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    sol = p[:, PARAM_SOLARIZE] > 0.5
    if sol.any():
        k, kd = group(sol)
        out = run(out, k, kd, lambda y, _: solarize(y, 128))
    return out


def apply_photometric(crops: torch.Tensor, params) -> torch.Tensor:
    """Flip, colour jitter, grayscale, blur and solarize of uint8 crops ``[N, 3, S, S]`` from
    their packed parameters ``[N, N_PHOTO_PARAMS]`` (float32; a tensor on any device or a
    numpy array), batched on the crops' device. Returns new uint8 ``[N, 3, S, S]`` crops on
    that device (not normalised: :func:`normalize` next); ``crops`` is left unchanged.

    Every op is per crop: a crop's result depends on its own pixels and parameters only, not
    on the other crops of the call. On CPU tensors the result is bitwise what
    :meth:`MultiCropAugmentation.photometric` gives (the data actors' path). Parameters on the
    CPU cost no device sync (their group indices are computed there); on the device, one copy.
    On the CPU the crops are processed in cache-sized chunks (``PHOTOMETRIC_CHUNK_BYTES``).
    """
    crops = torch.as_tensor(crops)
    if crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops: expected uint8 [N, 3, S, S], got {crops.dtype} {tuple(crops.shape)}")
    n = crops.shape[0]
    p = torch.as_tensor(params).detach().to("cpu", torch.float32)
    if tuple(p.shape) != (n, N_PHOTO_PARAMS):
        raise ValueError(f"params: expected [{n}, {N_PHOTO_PARAMS}], got {tuple(p.shape)}")
    out = crops.clone(memory_format=torch.contiguous_format)
    if n == 0:
        return out
    if out.device.type != "cpu":
        return _photometric_packed(out, p)
    chunk = max(1, PHOTOMETRIC_CHUNK_BYTES // (3 * crops.shape[-2] * crops.shape[-1] * 4))
    for s in range(0, n, chunk):  # per-crop ops: chunking changes no pixel
        out[s:s + chunk] = _photometric_packed(out[s:s + chunk], p[s:s + chunk])
    return out


def apply_photometric_batch(global_crops: torch.Tensor, local_crops: torch.Tensor, global_params,
                            local_params) -> Tuple[torch.Tensor, torch.Tensor]:
    """The trainer's call for ``data.augment_on=gpu``: the stream's geometric crops -> the
    finished uint8 crops, batched on the crops' device (then :func:`normalize` as usual).

    Args (the train stream's columns of that mode):
        global_crops: uint8 ``[B, 2, 3, G, G]`` (column ``global``), on the training device.
        local_crops: uint8 ``[B, n, 3, L, L]`` (column ``local``; ``n`` may be 0), same device.
        global_params: float32 ``[B, 2, N_PHOTO_PARAMS]`` (column ``global_params``).
        local_params: float32 ``[B, n, N_PHOTO_PARAMS]`` (column ``local_params``).
            The parameters may stay on the CPU (no device sync) or be on the device (one copy
            back); numpy arrays are accepted.

    Returns:
        ``(global uint8 [B, 2, 3, G, G], local uint8 [B, n, 3, L, L])`` on the crops' device;
        on CPU tensors bitwise equal to the ``augment_on=cpu`` stream's crops of the same rows.
    """
    global_crops, local_crops = torch.as_tensor(global_crops), torch.as_tensor(local_crops)
    g = apply_photometric(global_crops.reshape((-1,) + tuple(global_crops.shape[-3:])),
                          torch.as_tensor(global_params).reshape(-1, N_PHOTO_PARAMS))
    loc = apply_photometric(local_crops.reshape((-1,) + tuple(local_crops.shape[-3:])),
                            torch.as_tensor(local_params).reshape(-1, N_PHOTO_PARAMS))
    return g.view(global_crops.shape), loc.view(local_crops.shape)


class EvalTransform:
    """Resize the short side to ``size * 256 / 224`` (bicubic) and centre-crop ``size``.

    ``__call__(image uint8 [3, H, W]) -> uint8 [3, size, size]``.
    """

    def __init__(self, size: int = 224, resize_ratio: float = 256 / 224):
        if resize_ratio < 1.0:
            raise ValueError(f"resize_ratio={resize_ratio}: must be >= 1 (the crop lies inside the resized image)")
        self.size = int(size)
        self.resize_size = int(round(self.size * resize_ratio))

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, resize={self.resize_size})"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = _as_rgb_uint8(image)
        h, w = image.shape[-2:]
        # short side -> resize_size, long side scaled and truncated (as torchvision's F.resize)
        if w <= h:
            nh, nw = int(self.resize_size * h / w), self.resize_size
        else:
            nh, nw = self.resize_size, int(self.resize_size * w / h)
        x = resize_uint8(image, (nh, nw))
        top, left = int(round((nh - self.size) / 2.0)), int(round((nw - self.size) / 2.0))
        return x[..., top:top + self.size, left:left + self.size].contiguous()


def _as_rgb_uint8(image: torch.Tensor) -> torch.Tensor:
    """Accept uint8 [3,H,W] (fast path), [1,H,W] / [H,W] grey or [4,H,W] RGBA."""
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image tensor, got {image.dtype}")
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3:
        raise ValueError(f"expected [C, H, W], got shape {tuple(image.shape)}")
    c = image.shape[0]
    if c == 3:
        return image
    if c == 1:
        return image.expand(3, -1, -1)
    if c == 4:
        return image[:3]
    raise ValueError(f"expected 1, 3 or 4 channels, got {c}")


__all__: List[str] = ["IMAGENET_MEAN", "IMAGENET_STD", "BLUR_PROBS", "N_PHOTO_PARAMS", "normalize",
                      "resize_uint8", "resized_crop_uint8", "gaussian_blur", "solarize",
                      "apply_photometric", "apply_photometric_batch", "MultiCropAugmentation",
                      "EvalTransform"]
