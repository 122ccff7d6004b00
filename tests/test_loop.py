"""The training loop without Ray: checkpoint cadence, telemetry windows, resume (exact, and
reading at most the restored epoch's part of the stream), the NaN guard."""

import math
import os
import shutil
import time

import pytest
import torch

from conftest import compose

N_TRAIN, BATCH, EPOCHS = 32, 8, 2  # 4 steps per epoch, 8 in all
MICRO = ["model=micro", f"train.global_batch_size={BATCH}", f"train.epochs={EPOCHS}", "train.log_every=2",
         "data.n_local=2", "train.knn_every=1"]


class Stream:
    """Epochs ``first..EPOCHS-1`` of multi-crop batches of fixed images (crops seeded by epoch
    and image, as the Ray stream's are); counts the rows it hands out."""

    def __init__(self, first_epoch: int = 0, first_delay_s: float = 0.0, augment_on: str = "cpu"):
        from dinov3.augment import MultiCropAugmentation

        self.first_epoch, self.rows, self.first_delay_s = first_epoch, 0, first_delay_s
        self.augment_on = augment_on
        self.images = torch.randint(0, 256, (N_TRAIN, 3, 32, 32), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(0))
        self.aug = MultiCropAugmentation(32, 16, 2)

    def __iter__(self):
        time.sleep(self.first_delay_s)  # a stream's start-up, overlapping the initial k-NN
        for epoch in range(self.first_epoch, EPOCHS):
            for i in range(0, N_TRAIN, BATCH):
                rows = range(i, i + BATCH)
                images = [self.images[j] for j in rows]
                gens = [torch.Generator().manual_seed(1000 * epoch + j) for j in rows]
                self.rows += BATCH
                if self.augment_on == "gpu":  # what the actors emit with data.augment_on=gpu
                    g, loc, gp, lp = self.aug.geometric_batch(images, gens)
                    yield {"global": g, "local": loc, "global_params": gp, "local_params": lp,
                           "epoch": torch.full((BATCH,), epoch)}
                else:
                    g, loc = self.aug.batch(images, gens)
                    yield {"global": g, "local": loc, "epoch": torch.full((BATCH,), epoch)}


class Recorder:
    def __init__(self, run_dir):
        self.run_dir, self.reports, self.logged = run_dir, [], []

    def report(self, metrics, checkpoint_dir):
        self.reports.append((dict(metrics), checkpoint_dir is not None))
        if checkpoint_dir:  # what Ray Train does with rank 0's directory
            shutil.copytree(checkpoint_dir, os.path.join(self.run_dir, f"checkpoint_{metrics['step']:04d}"))

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def _eval_batches():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=g)
    yield images, torch.arange(24) % 3, (torch.arange(24) >= 16).long()


def _fit(run_dir, overrides=(), stream=None, before_step=lambda step: None):
    from rayssl.loop import Trainer, Worker

    rec = Recorder(str(run_dir))
    stream = stream or Stream()
    worker = Worker(batches=lambda: stream, report=rec.report, n_train=N_TRAIN, run_dir=str(run_dir),
                    eval_batches=_eval_batches, make_logger=lambda resumed: rec, before_step=before_step)
    trainer = Trainer(compose(MICRO + list(overrides)), worker)
    trainer.fit()
    return trainer, rec, stream


def test_checkpoint_cadence_reports_and_telemetry_windows(tmp_path):
    trainer, rec, stream = _fit(tmp_path, ["train.checkpoint_every=3"], stream=Stream(first_delay_s=2.0))
    # every 3 steps and at the last; epoch ends (4, 8) always report, with a checkpoint when due
    assert [(m["step"], ckpt) for m, ckpt in rec.reports] == [(3, True), (4, False), (6, True), (8, True)]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_0003", "checkpoint_0006", "checkpoint_0008"]
    assert [m["epoch"] for m, _ in rec.reports] == [0, 1, 1, 2]
    assert stream.rows == EPOCHS * N_TRAIN

    windows = {step: m for step, m in rec.logged if "train/loss" in m}
    assert sorted(windows) == [2, 4, 6, 8]  # log_every=2
    epochs = {step: m for step, m in rec.logged if "loss" in m and "epoch" in m}
    for end, first in ((4, 2), (8, 6)):  # an epoch's mean loss is the mean of its two windows
        assert epochs[end]["loss"] == pytest.approx((windows[first]["train/loss"] + windows[end]["train/loss"]) / 2)
    for m in windows.values():  # the start-up wait belongs to the first window's wall time
        assert m["train/images_per_s"] > 0 and 0.0 <= m["train/data_wait_frac"] <= 1.0
        assert 0.0 <= m["train/teacher_entropy"] <= math.log(256) + 1e-4
        assert {"train/lr", "train/wd", "train/momentum", "train/grad_norm", "collapse_warning"} <= set(m)
    init = [m for step, m in rec.logged if "knn_top1_init" in m]
    assert len(init) == 1 and 0.0 <= init[0]["knn_top1_init"] <= 100.0
    assert "knn_top1" in epochs[4] and "knn_top1" in epochs[8]


def test_resume_is_exact_and_reads_at_most_the_restored_epoch(tmp_path):
    """A run killed in epoch 1 and re-run from its checkpoint ends with the weights of an
    uninterrupted run; the re-run's stream starts at the checkpoint's epoch (as rayssl.launch
    builds it from the checkpoint's meta.json), so it reads less than one epoch before its first
    new step."""
    from rayssl.checkpoint import newest_meta
    from rayssl.loop import start_epoch

    straight, _, _ = _fit(tmp_path / "straight", ["train.checkpoint_every=3"])

    class Killed(Exception):
        pass

    def kill_at_7(step):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        _fit(tmp_path / "run", ["train.checkpoint_every=3"], before_step=kill_at_7)
    meta = newest_meta(str(tmp_path / "run"))
    assert meta == {"step": 6, "epoch": 1}
    first = start_epoch(meta["step"], N_TRAIN // BATCH, EPOCHS)
    assert first == 1
    stream = Stream(first_epoch=first)
    rows_before_first_step = []
    resumed, rec, _ = _fit(tmp_path / "run", ["train.checkpoint_every=3"], stream=stream,
                           before_step=lambda step: rows_before_first_step.append(stream.rows))
    assert resumed.resumed_at == 6 and resumed.step == 8
    assert rows_before_first_step[0] <= N_TRAIN  # at most one epoch read before the first new step
    assert resumed.skipped_batches == 2  # steps 4 and 5 of epoch 1, already trained
    assert stream.rows == 4 * BATCH
    assert [m["step"] for m, _ in rec.reports] == [8]
    a, b = straight.method.state_dict(), resumed.method.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_non_finite_loss_stops_naming_step_and_term(tmp_path):
    from rayssl.loop import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step \d+: loss"):
        _fit(tmp_path, ["method.base_lr=1e30", "method.clip_grad=1e30", "method.lr_warmup_frac=0"])


def test_telemetry_warns_on_collapse_and_on_starvation_after_the_first_window(caplog):
    from rayssl.telemetry import Telemetry

    hints = []
    tel = Telemetry(every=2, images_per_step=4, n_prototypes=256,
                    starvation_hint=lambda frac: hints.append(frac) or f"starved {frac:.2f}")
    for entropy in (math.log(256), math.log(256)):  # uniform targets
        tel.add({"loss": 1.0, "teacher_entropy": entropy})
    tel.wait = 1e9  # this window waited for data all the time
    first = tel.flush(step=2)
    assert first["collapse_warning"] == 1.0 and first["train/loss"] == 1.0
    assert first["train/data_wait_frac"] > 0.5 and hints == []  # the first window holds the start-up
    tel.add({"loss": 3.0, "teacher_entropy": 1.0})
    tel.wait = 1e9
    second = tel.flush(step=3)
    assert second["collapse_warning"] == 0.0 and second["train/loss"] == 3.0 and len(hints) == 1
    assert "near uniform collapse" in caplog.text and "starved" in caplog.text
    assert tel.epoch_means(3) == {"loss": pytest.approx(5.0 / 3)}


def test_checkpoint_due_every_n_steps_or_every_epoch_and_at_the_end():
    from rayssl.checkpoint import Checkpointer

    every_epoch = Checkpointer("/nowhere", every=0, steps_per_epoch=4, total_steps=10)
    assert [s for s in range(1, 11) if every_epoch.due(s)] == [4, 8, 10]
    every_3 = Checkpointer("/nowhere", every=3, steps_per_epoch=4, total_steps=10)
    assert [s for s in range(1, 11) if every_3.due(s)] == [3, 6, 9, 10]


def test_photometric_ops_on_the_trainer_device_train_the_same_model(tmp_path):
    """data.augment_on=gpu: the loop applies the photometric ops the actors left (here on CPU
    tensors) and trains bit for bit the model the finished crops train."""
    on_actors, _, _ = _fit(tmp_path / "cpu", ["train.epochs=1"], stream=Stream())
    on_trainer, _, _ = _fit(tmp_path / "gpu", ["train.epochs=1", "data.augment_on=gpu"], stream=Stream(augment_on="gpu"))
    a, b = on_actors.method.state_dict(), on_trainer.method.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_accumulated_micro_batches_average_their_gradients(tmp_path):
    """train.accumulate=2: a step's gradient is the mean of its two half-batches' own gradients and
    its logged terms their mean: the same global batch in half the activation memory."""
    import copy

    from rayssl.loop import Trainer, Worker

    worker = Worker(batches=lambda: Stream(), report=lambda m, c: None, n_train=N_TRAIN, run_dir=str(tmp_path))
    trainer = Trainer(compose(MICRO + ["train.accumulate=2"]), worker)
    twin = copy.deepcopy(trainer.method)
    batch = next(iter(Stream()))
    g, loc = batch["global"], batch["local"]
    terms = trainer.forward_backward(g, loc)

    half = BATCH // 2
    grads, losses = [], []
    for sl in (slice(0, half), slice(half, BATCH)):
        twin.zero_grad(set_to_none=True)
        losses.append(float(twin.forward_backward(g[sl], loc[sl]).loss))
        grads.append({n: p.grad.clone() for n, p in twin.named_parameters() if p.grad is not None})
    for name, p in trainer.method.named_parameters():
        if p.grad is not None:
            assert torch.allclose(p.grad, (grads[0][name] + grads[1][name]) / 2, atol=1e-6, rtol=1e-4), name
    assert float(terms["loss"]) == pytest.approx(sum(losses) / 2, rel=1e-6)
