"""The DINOv3 method: student/teacher ViT, DINO + iBOT + KoLeo (+ Gram) losses.

Shapes: B images per worker, 2 global crops of G px, n_l local crops of L px, P patches
per global crop, T = 1 + n_reg + P tokens, D width, M masked tokens (this worker).
Crops are handled crop-major: global crop c of image b is row ``c * B + b``.

DDP: wrap the whole module (``DDP(method)``). Teacher and Gram snapshot parameters have
``requires_grad=False`` so DDP ignores them. Every student parameter takes part in every
forward (the mask token via ``torch.where`` even with no masked patch, the patch head
on an empty batch when M == 0, the CLS head with or without locals, zero-weight losses
are still added), so ``find_unused_parameters`` is not needed. A split step
(:meth:`DINOv3.forward_backward`) runs its first part under ``DDP.no_sync()``; its last part
reaches every student parameter (see ``forward``), so the all-reduce is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from dinov3.augment import normalize
from dinov3.backbone import MaskableViT, build_backbone
from dinov3.config import DINOv3Config
from dinov3.heads import DINOHead
from dinov3.losses import (dino_loss, embedding_std, entropy, gram_loss, ibot_loss, kl_student_teacher,
                           koleo_loss, sinkhorn_knopp)
from dinov3.masking import generate_masks, masked_token_index
from dinov3.schedules import Schedules
from dinov3.teacher import copy_params_, ema_update_, frozen_copy

STUDENT_MODULES = ("backbone", "cls_head", "patch_head")
EMBEDDING_PARAMS = ("mask_token", "vit.cls_token", "vit.reg_token", "vit.pos_embed", "vit.patch_embed.",
                    "vit.norm_pre.", "vit.rope.")
NO_WD_PARAMS = ("mask_token", "cls_token", "reg_token", "pos_embed")


@dataclass
class DINOv3Output:
    """``loss`` carries the graph; the ``loss_*`` terms and ``metrics`` are detached scalars."""

    loss: torch.Tensor
    loss_cls: torch.Tensor
    loss_patch: torch.Tensor
    loss_koleo: torch.Tensor
    loss_gram: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepTargets:
    """One step's masks and teacher targets, shared by its ``"local"`` and ``"global"`` parts."""

    masks: torch.Tensor  # bool [2B, P]
    token_index: torch.Tensor  # [M] rows of the flattened [2B*T, D] tokens
    weights: torch.Tensor  # [M] iBOT weights
    masked_fraction: torch.Tensor  # scalar, on the device
    t_cls_probs: torch.Tensor  # [2, B, Kc]
    t_patch_probs: torch.Tensor  # [M, Kp]


class DINOv3(nn.Module):
    """DINOv3 self-distillation (recipe sections 1, 2, 4, 5: shared/design/recipe.md).

    ``student``/``teacher``: ``ModuleDict(backbone=MaskableViT, cls_head=DINOHead,
    patch_head=DINOHead)``; ``gram_teacher``: frozen backbone snapshot (only when
    ``gram_weight > 0``).
    """

    def __init__(self, cfg: DINOv3Config):
        super().__init__()
        self.cfg = cfg.validate()
        backbone = build_backbone(cfg)
        dim = backbone.embed_dim
        self.student = nn.ModuleDict({
            "backbone": backbone,
            "cls_head": DINOHead(dim, cfg.n_cls_prototypes, cfg.head_hidden_dim, cfg.head_bottleneck_dim),
            "patch_head": DINOHead(dim, cfg.n_patch_prototypes, cfg.head_hidden_dim, cfg.head_bottleneck_dim),
        })
        self.teacher = frozen_copy(self.student)
        self.gram_teacher: Optional[MaskableViT] = frozen_copy(backbone) if cfg.gram_weight > 0 else None
        # which snapshot (0 = first, i = i-th refresh) the Gram teacher holds; -1 = none yet
        self.register_buffer("gram_snapshot_index", torch.tensor(-1, dtype=torch.long))
        self.teacher_temp: float = cfg.temperature_teacher  # set per step by apply_schedules
        self.schedules: Optional[Schedules] = None
        self.mask_generator: Optional[torch.Generator] = None  # created on first forward (seed + rank)
        self._gram_active = False

    # ---- structure -----------------------------------------------------------------
    @property
    def num_prefix_tokens(self) -> int:
        return self.student["backbone"].num_prefix_tokens

    @property
    def embed_dim(self) -> int:
        return self.student["backbone"].embed_dim

    def _device(self) -> torch.device:
        return self.student["backbone"].mask_token.device

    def train(self, mode: bool = True) -> "DINOv3":
        super().train(mode)
        self.teacher.eval()  # frozen copies never train (drop path off)
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    @staticmethod
    def _to_float(x: torch.Tensor) -> torch.Tensor:
        return normalize(x) if x.dtype == torch.uint8 else x

    def _masks(self, n_crops: int, grid) -> torch.Tensor:
        if self.mask_generator is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self.mask_generator = torch.Generator().manual_seed(self.cfg.mask_seed + rank)
        c = self.cfg
        return generate_masks(n_crops, grid, self.mask_generator, c.mask_strategy, c.mask_ratio,
                              c.mask_ratio_range, c.mask_probability, c.mask_min_block_patches,
                              c.mask_max_block_frac)

    # ---- training forward ----------------------------------------------------------
    def backward_parts(self, n_local: int) -> Tuple[str, ...]:
        """The ``part`` values of one training step, each followed by its own backward.

        ``("global", "local")`` splits the step's loss into the global crops' terms (DINO,
        iBOT, KoLeo, Gram) and the local crops' DINO terms; the gradients add up to those of
        ``("all",)`` while only one crop group's activations are alive at a time (about half
        the student's activation memory). Globals first: their larger buffers, once freed,
        hold the locals'.
        """
        return ("global", "local") if self.cfg.split_backward and n_local > 0 else ("all",)

    @torch.compiler.disable
    def _mask_plan(self, n_crops: int, grid, npt: int, masks: Optional[torch.Tensor]):
        """Masks of the student's global crops and the rows of their masked tokens, on the CPU.

        -> ``(masks bool [2B, P], token_index long [M], weights float [M], masked_fraction [])``.
        Host-side work (numpy, a stateful generator) outside any ``torch.compile`` graph;
        ``M`` varies step to step, so it is marked dynamic (one graph for every count) and
        the masked fraction is a tensor, not a Python float a graph would specialise on.
        """
        n_patches = grid[0] * grid[1]
        masks = self._masks(n_crops, grid) if masks is None else masks.cpu()
        # indices on CPU -> no device sync; gather rows of the flattened [2B*T, D] tokens
        patch_index, weights = masked_token_index(masks)
        token_index = (patch_index // n_patches) * (npt + n_patches) + npt + patch_index % n_patches
        masked_fraction = torch.tensor(patch_index.numel() / max(masks.numel(), 1), dtype=torch.float32)
        torch._dynamo.maybe_mark_dynamic(token_index, 0)
        torch._dynamo.maybe_mark_dynamic(weights, 0)
        return masks, token_index, weights, masked_fraction

    def _targets(self, g: torch.Tensor, b: int, grid, masks: Optional[torch.Tensor]) -> StepTargets:
        """Masks of the student's global crops and the teacher's Sinkhorn targets (no grad)."""
        c = self.cfg
        device = g.device
        npt = self.num_prefix_tokens
        masks, token_index, weights, masked_fraction = self._mask_plan(2 * b, grid, npt, masks)
        masks = masks.to(device, non_blocking=True)
        token_index = token_index.to(device, non_blocking=True)
        weights = weights.to(device, non_blocking=True)
        masked_fraction = masked_fraction.to(device, non_blocking=True)
        with torch.no_grad():  # teacher: unmasked global crops, eval mode
            t_tokens = self.teacher["backbone"](g)  # [2B, T, D]
            t_cls_logits = self.teacher["cls_head"](t_tokens[:, 0])  # [2B, Kc]
            t_patch_logits = self.teacher["patch_head"](t_tokens.flatten(0, 1).index_select(0, token_index))
            t_cls_probs = sinkhorn_knopp(t_cls_logits, self.teacher_temp, c.sinkhorn_iterations).view(2, b, -1)
            t_patch_probs = sinkhorn_knopp(t_patch_logits, self.teacher_temp, c.sinkhorn_iterations)  # [M, Kp]
        return StepTargets(masks, token_index, weights, masked_fraction, t_cls_probs, t_patch_probs)

    def targets(self, global_crops: torch.Tensor, masks: Optional[torch.Tensor] = None) -> StepTargets:
        """One step's masks and teacher targets (no grad): ``global_crops [B, 2, 3, G, G]``;
        ``masks`` bool ``[2B, P]`` (crop-major) overrides the generated masks (tests)."""
        b = self._check_globals(global_crops)
        g = self._to_float(global_crops).transpose(0, 1).flatten(0, 1)  # [2B, 3, G, G]
        return self._targets(g, b, self.student["backbone"].grid_size(g.shape[-1]), masks)

    @staticmethod
    def _check_globals(global_crops: torch.Tensor) -> int:
        b, n_g = global_crops.shape[:2]
        if n_g != 2:
            raise ValueError(f"global_crops must hold 2 crops per image, got shape {tuple(global_crops.shape)}")
        return b

    def forward(self, global_crops: torch.Tensor, local_crops: Optional[torch.Tensor] = None,
                masks: Optional[torch.Tensor] = None, *, part: str = "all",
                targets: Optional[StepTargets] = None) -> DINOv3Output:
        """``global_crops [B, 2, 3, G, G]``, ``local_crops [B, n_l, 3, L, L] | None`` (uint8, or
        float already normalised); ``masks`` bool ``[2B, P]`` (crop-major) overrides the
        generated masks (tests).

        ``part`` (see :meth:`backward_parts`): ``"all"``, the whole step's loss; ``"global"``
        or ``"local"``, that crop group's loss terms, computed against ``targets`` (this
        step's :meth:`targets`, shared by its parts; computed here when None). The method
        keeps no state between calls: :meth:`forward_backward` runs a step's parts.
        """
        c = self.cfg
        if part not in ("all", "local", "global"):
            raise ValueError(f"part must be 'all', 'local' or 'global', got {part!r}")
        b = self._check_globals(global_crops)
        n_local = local_crops.shape[1] if local_crops is not None else 0
        if part == "local" and n_local == 0:
            raise ValueError("part='local' needs local crops")
        n_pairs = 2 + 2 * n_local  # DINO pairs of the whole step
        g = self._to_float(global_crops).transpose(0, 1).flatten(0, 1)  # [2B, 3, G, G]
        backbone = self.student["backbone"]
        if targets is None:
            targets = self._targets(g, b, backbone.grid_size(g.shape[-1]), masks)
        if part != "local":
            return self._global_terms(g, b, local_crops if part == "all" else None, targets, n_pairs)
        loc = self._to_float(local_crops).transpose(0, 1).flatten(0, 1)  # [n_l*B, 3, L, L]
        s_cls_logits = self.student["cls_head"](backbone(loc)[:, 0]).view(n_local, b, c.n_cls_prototypes)
        loss_cls = dino_loss(s_cls_logits, targets.t_cls_probs, c.temperature_student, globals_first=False,
                             n_pairs=n_pairs)
        # DDP all-reduces on the step's last backward, which must reach every student
        # parameter: the ones only the global crops use join with weight 0.
        unused = [backbone.mask_token, *self.student["patch_head"].parameters()]
        loss = c.dino_weight * loss_cls + 0.0 * sum(p.reshape(-1)[0] for p in unused)
        zero = loss_cls.new_zeros(())
        return DINOv3Output(loss=loss, loss_cls=loss_cls.detach(), loss_patch=zero, loss_koleo=zero,
                            loss_gram=zero)

    def _global_terms(self, g: torch.Tensor, b: int, local_crops: Optional[torch.Tensor], targets: StepTargets,
                      n_pairs: int) -> DINOv3Output:
        """Student on the masked global crops (+ ``local_crops`` when given: the whole step):
        DINO, iBOT, KoLeo (and Gram) terms; heads only on CLS and masked tokens."""
        c = self.cfg
        backbone = self.student["backbone"]
        npt = backbone.num_prefix_tokens
        s_tokens = backbone(g, targets.masks)  # [2B, T, D]
        s_cls = [s_tokens[:, 0]]
        if local_crops is not None and local_crops.shape[1] > 0:
            loc = self._to_float(local_crops).transpose(0, 1).flatten(0, 1)  # [n_l*B, 3, L, L]
            s_cls.append(backbone(loc)[:, 0])
        s_cls_g = s_cls[0]
        s_cls_logits = self.student["cls_head"](torch.cat(s_cls)).view(-1, b, c.n_cls_prototypes)  # [2(+n_l), B, Kc]
        s_patch_logits = self.student["patch_head"](s_tokens.flatten(0, 1).index_select(0, targets.token_index))

        loss_cls = dino_loss(s_cls_logits, targets.t_cls_probs, c.temperature_student, n_pairs=n_pairs)
        loss_patch = ibot_loss(s_patch_logits, targets.t_patch_probs, targets.weights, 2 * b, c.temperature_student)
        # per global crop, never pooled across the two crops of one image
        loss_koleo = koleo_loss(s_cls_g[:b]) + koleo_loss(s_cls_g[b:])
        loss = c.dino_weight * loss_cls + c.ibot_weight * loss_patch + c.koleo_weight * loss_koleo
        if self._gram_active:
            with torch.no_grad():
                gram_target = self.gram_teacher(g)[:, npt:]
            loss_gram = gram_loss(s_tokens[:, npt:], gram_target)
            loss = loss + c.gram_weight * loss_gram
        else:
            loss_gram = loss.new_zeros(())

        t_cls_probs, t_patch_probs = targets.t_cls_probs, targets.t_patch_probs
        with torch.no_grad():
            metrics = {
                "teacher_entropy": entropy(t_cls_probs.flatten(0, 1)),
                "teacher_patch_entropy": entropy(t_patch_probs) if t_patch_probs.numel() else loss.new_zeros(()),
                # same crop: the student's (masked) view vs the teacher target of that crop
                "kl_student_teacher": kl_student_teacher(s_cls_logits[:2].flatten(0, 1), t_cls_probs.flatten(0, 1),
                                                         c.temperature_student),
                "cls_std": embedding_std(s_cls_g),
                "masked_fraction": targets.masked_fraction,
            }
        return DINOv3Output(loss=loss, loss_cls=loss_cls.detach(), loss_patch=loss_patch.detach(),
                            loss_koleo=loss_koleo.detach(), loss_gram=loss_gram.detach(), metrics=metrics)

    def forward_backward(self, global_crops: torch.Tensor, local_crops: Optional[torch.Tensor] = None, *,
                         runner: Optional[nn.Module] = None,
                         autocast: Optional[Callable[[], ContextManager]] = None,
                         loss_scale: float = 1.0, sync: bool = True) -> DINOv3Output:
        """One training step's forward and backward pass(es); returns the step's detached terms.

        ``runner``: the module to call for the forwards (``DDP(self)`` under DDP, whose hooks
        all-reduce the gradients on the step's last backward; earlier ones run under
        ``no_sync()``); ``autocast``: a context factory around the forwards (bf16), or None.
        ``loss_scale`` multiplies the loss before its backward and ``sync=False`` keeps every
        backward local: for a micro-batch of an accumulated step (gradients add up; the last
        micro-batch syncs). See :meth:`backward_parts` for the split into one backward per crop group.
        """
        run = self if runner is None else runner
        amp = autocast or contextlib.nullcontext
        n_local = 0 if local_crops is None else local_crops.shape[1]
        parts = self.backward_parts(n_local)
        with amp():
            targets = self.targets(global_crops) if len(parts) > 1 else None
        outs = {}
        for i, part in enumerate(parts):
            local_only = not sync or i < len(parts) - 1
            no_sync = run.no_sync() if local_only and hasattr(run, "no_sync") else contextlib.nullcontext()
            with no_sync:
                with amp():
                    out = run(global_crops, local_crops if n_local else None, part=part, targets=targets)
                (out.loss * loss_scale if loss_scale != 1.0 else out.loss).backward()
            outs[part] = dataclasses.replace(out, loss=out.loss.detach())
        if len(outs) == 1:
            return outs[parts[0]]
        glob, loc = outs["global"], outs["local"]  # the whole step's terms
        return dataclasses.replace(glob, loss=glob.loss + loc.loss, loss_cls=glob.loss_cls + loc.loss_cls)

    # ---- optimisation --------------------------------------------------------------
    def configure(self, total_steps: int, steps_per_epoch: int, global_batch_size: int) -> None:
        """Fix the run length and global batch (per-step schedules)."""
        self.schedules = Schedules.from_config(self.cfg, total_steps, steps_per_epoch, global_batch_size)

    def _param_meta(self, name: str, p: torch.Tensor) -> Dict[str, Any]:
        """lr / wd multipliers of one student parameter (name relative to ``student``)."""
        c = self.cfg
        depth = self.student["backbone"].depth
        module, _, rest = name.partition(".")
        if module != "backbone":
            layer_id = depth + 1  # heads: multiplier 1
        elif rest.startswith("vit.blocks."):
            layer_id = int(rest.split(".")[2]) + 1
        elif rest.startswith(EMBEDDING_PARAMS):
            layer_id = 0
        else:
            layer_id = depth + 1  # final norm
        lr_mult = c.layerwise_decay ** (depth + 1 - layer_id)
        if rest.startswith("vit.patch_embed."):
            lr_mult *= c.patch_embed_lr_mult
        no_wd = p.ndim <= 1 or name.endswith(".bias") or "gamma" in rest or rest.endswith(NO_WD_PARAMS)
        return {"lr_multiplier": lr_mult, "wd_multiplier": 0.0 if no_wd else 1.0,
                "is_last_layer": ".last_layer." in f".{rest}"}

    def param_groups(self) -> List[Dict[str, Any]]:
        """AdamW parameter groups of the student (teacher excluded).

        No weight decay on biases, norms, LayerScale gammas, tokens and pos-embed;
        layer-wise LR decay ``d^(L+1-layer_id)`` (embeddings 0, blocks i+1, final norm and
        heads L+1 -> 1.0); patch_embed x ``patch_embed_lr_mult``; ``is_last_layer`` marks
        the prototype layers (lr 0 while frozen). Groups carry lr/wd of step 0 once
        :meth:`configure` has run.
        """
        groups: Dict[tuple, Dict[str, Any]] = {}
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            meta = self._param_meta(name, p)
            key = (meta["lr_multiplier"], meta["wd_multiplier"], meta["is_last_layer"])
            if key not in groups:
                groups[key] = {"params": [], "names": [], **meta}
            groups[key]["params"].append(p)
            groups[key]["names"].append(name)
        out = list(groups.values())
        if self.schedules is not None:
            self._set_group_hparams(out, 0)
        return out

    def _set_group_hparams(self, groups, step: int) -> None:
        s = self.schedules
        lr, wd, frozen = s.lr(step), s.weight_decay(step), s.last_layer_frozen(step)
        for g in groups:
            g["lr"] = (0.0 if frozen and g.get("is_last_layer", False) else lr) * g.get("lr_multiplier", 1.0)
            g["weight_decay"] = wd * g.get("wd_multiplier", 1.0)

    def apply_schedules(self, optimizer: torch.optim.Optimizer, step: int) -> Dict[str, float]:
        """Set lr/wd of every group for ``step``, the teacher temperature of the next forward,
        and refresh the Gram snapshot when due. Returns {"lr", "wd", "momentum", "teacher_temp"}."""
        if self.schedules is None:
            raise RuntimeError("call configure(total_steps, steps_per_epoch, global_batch_size) first")
        self._set_group_hparams(optimizer.param_groups, step)
        values = self.schedules.values(step)
        self.teacher_temp = values["teacher_temp"]
        self._update_gram_teacher(step)
        return values

    @torch.no_grad()
    def _update_gram_teacher(self, step: int) -> None:
        c = self.cfg
        if self.gram_teacher is None or step < c.gram_start_step:
            self._gram_active = False
            return
        due = (step - c.gram_start_step) // c.gram_refresh_every if c.gram_refresh_every > 0 else 0
        due = min(due, c.gram_max_refreshes)
        if int(self.gram_snapshot_index) != due:
            copy_params_(self.gram_teacher, self.teacher["backbone"])
            self.gram_snapshot_index.fill_(due)
        self._gram_active = True

    def clip_gradients(self) -> Dict[str, float]:
        """Clip each student module's gradient norm to ``clip_grad`` (0: no clipping).

        Returns the norms before clipping: ``grad_norm_<module>`` and the total ``grad_norm``.
        """
        norms = []
        for name in STUDENT_MODULES:
            params = [p for p in self.student[name].parameters() if p.grad is not None]
            if not params:
                norms.append(torch.zeros((), device=self._device()))
            elif self.cfg.clip_grad > 0:
                norms.append(torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad, foreach=True).float())
            else:
                norms.append(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True).float())
        values = torch.stack(norms).tolist()  # one device sync for all modules
        out = {f"grad_norm_{n}": v for n, v in zip(STUDENT_MODULES, values)}
        out["grad_norm"] = math.sqrt(sum(v * v for v in values))
        return out

    def compile(self, *args, **kwargs) -> None:
        """``torch.compile`` the backbones in place (static crop shapes: one graph per crop
        size); heads and losses stay eager, since the masked-token count changes every step."""
        kwargs.setdefault("dynamic", False)
        self.student["backbone"].compile(*args, **kwargs)
        self.teacher["backbone"].compile(*args, **kwargs)

    def update_teacher(self, momentum: float) -> None:
        """EMA ``t = m * t + (1 - m) * s`` over all student/teacher parameters (any mode)."""
        ema_update_(self.teacher.parameters(), self.student.parameters(), momentum)

    # ---- features ------------------------------------------------------------------
    @torch.no_grad()
    def _teacher_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher["backbone"](self._to_float(images))

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, 3, H, W]`` (uint8 or normalised float) -> teacher CLS after the final norm ``[B, D]``."""
        return self._teacher_tokens(images)[:, 0]

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, 3, H, W]`` -> teacher final-norm patch tokens ``[B, h, w, D]``."""
        tokens = self._teacher_tokens(images)[:, self.num_prefix_tokens:]
        ph, pw = self.student["backbone"].patch_size
        return tokens.reshape(images.shape[0], images.shape[-2] // ph, images.shape[-1] // pw, -1)

    @torch.no_grad()
    def probe_features(self, images: torch.Tensor) -> torch.Tensor:
        """Linear-probe input: teacher CLS concatenated with the mean patch token ``[B, 2D]``."""
        tokens = self._teacher_tokens(images)
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)

    def export_encoder(self) -> nn.Module:
        """A standalone image encoder: normalisation + a deep copy of the teacher backbone.

        ``forward(images [B, 3, H, W] uint8 or normalised float) -> [B, D]`` teacher CLS
        after the final norm, the same as :meth:`embed`; ``.backbone`` is the copied
        ``MaskableViT`` (its ``state_dict`` is the teacher backbone's). Eval mode, no grad,
        on the method's device. The class is local to this method, so serialise the module
        with cloudpickle (what ``mlflow.pytorch`` uses) or save ``backbone.state_dict()``.
        """
        import copy

        class TeacherEncoder(nn.Module):
            def __init__(self, backbone: nn.Module):
                super().__init__()
                self.backbone = backbone

            @torch.no_grad()
            def forward(self, images: torch.Tensor) -> torch.Tensor:
                x = normalize(images) if images.dtype == torch.uint8 else images
                return self.backbone(x)[:, 0]

        encoder = TeacherEncoder(copy.deepcopy(self.teacher["backbone"]))
        for p in encoder.parameters():
            p.requires_grad_(False)
        return encoder.eval()


def build_method(cfg: Union[DINOv3Config, Mapping[str, Any]]) -> DINOv3:
    """Build :class:`DINOv3` from a config or plain keyword dict (unknown keys raise ValueError)."""
    if not isinstance(cfg, DINOv3Config):
        cfg = DINOv3Config.from_dict(cfg)
    return DINOv3(cfg)
