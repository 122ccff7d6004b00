"""Training-loop pieces without Ray: NaN guard, resumable metric logging, collapse threshold,
data-starvation advice, exported encoder (safetensors + MLflow model) and the PCA picture."""

import dataclasses
import io
import math

import pytest
import torch

from conftest import compose


@pytest.fixture(scope="module")
def micro_method():
    from rayssl.method import build_method

    cfg = compose(["model=micro"])
    torch.manual_seed(0)
    return build_method(cfg.method.name, cfg.method_kwargs()).eval()


def test_check_finite_names_step_and_term():
    from rayssl.loop import NonFiniteLossError, check_finite

    terms = {"loss": torch.tensor(1.0), "loss_cls": torch.tensor(float("nan")), "loss_koleo": torch.tensor(float("inf"))}
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 17: loss_cls, loss_koleo"):
        check_finite(terms, 17)
    values = check_finite({"loss": torch.tensor(2.0), "teacher_entropy": torch.tensor(0.5)}, 3)
    assert values == {"loss": 2.0, "teacher_entropy": 0.5}


def test_resume_finds_newest_readable_checkpoint_ray_never_registered(tmp_path):
    """A worker killed right after report leaves a checkpoint Ray did not record: resume
    takes the newest complete one on storage, skipping one cut short."""
    from rayssl.checkpoint import CHECKPOINT_FILE, Checkpointer, newest_meta

    run_dir = tmp_path / "run"
    for step, stamp in [(3, "2026-01-01_00-00-03.000000"), (6, "2026-01-01_00-00-06.000000")]:
        Checkpointer.save({"step": step, "epoch": step // 3}, str(run_dir / f"checkpoint_{stamp}"))
    cut = run_dir / "checkpoint_2026-01-01_00-00-09.000000"
    cut.mkdir()
    (cut / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04truncated")
    (run_dir / "not_a_checkpoint").mkdir()
    registered = str(run_dir / "checkpoint_2026-01-01_00-00-03.000000")

    ckpt = Checkpointer(str(run_dir), every=0, steps_per_epoch=3, total_steps=9, registered=registered)
    assert [c[-9:] for c in ckpt.candidates()] == ["09.000000", "06.000000", "03.000000"]
    state, path = ckpt.load()
    assert state["step"] == 6 and path.endswith("06.000000")
    assert newest_meta(str(run_dir)) == {"step": 6, "epoch": 2}  # what the driver reads to start the stream

    elsewhere = tmp_path / "moved" / "checkpoint_x"
    Checkpointer.save({"step": 2}, str(elsewhere))
    only = Checkpointer(str(tmp_path / "empty"), 0, 3, 9, registered=str(elsewhere))
    assert only.load()[0]["step"] == 2
    assert Checkpointer(str(tmp_path / "empty"), 0, 3, 9).load() == (None, None)
    assert newest_meta(str(tmp_path / "empty")) is None
    resume = Checkpointer(str(tmp_path / "empty"), 0, 3, 9, resume_from=str(elsewhere))
    assert resume.load()[0]["step"] == 2  # train.resume_from: only when the run has none of its own


def test_resumable_logger_skips_steps_already_logged(tmp_path):
    from mlflow.tracking import MlflowClient

    from rayssl import tracking
    from rayssl.tracking import ResumableLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = tracking.get_or_create_experiment(uri, "units")
    run_id = tracking.create_run(uri, exp, "r")
    first = ResumableLogger(uri, run_id, resumed=False)
    for step in (2, 4, 6):
        first.log({"train/loss": float(step)}, step)
    first.log({"loss": 1.0}, 3)
    again = ResumableLogger(uri, run_id, resumed=True)  # restarted from a checkpoint at step 2
    for step in (4, 6, 8):
        again.log({"train/loss": float(step)}, step)
    again.log({"loss": 2.0}, 6)  # a key's own history decides: 6 > 3
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4, 6, 8]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [3, 6]


def test_collapse_threshold_is_near_uniform_entropy():
    from dinov3.losses import entropy
    from rayssl.telemetry import COLLAPSE_FRACTION

    k = 256
    uniform = torch.full((4, k), 1.0 / k)
    peaked = torch.softmax(torch.randn(4, k) * 10, dim=-1)
    assert entropy(uniform) > COLLAPSE_FRACTION * math.log(k)
    assert entropy(peaked) < COLLAPSE_FRACTION * math.log(k)


def test_data_starvation_hint_sizes_the_actor_pool():
    from rayssl.telemetry import DATA_WAIT_WARN, data_starvation_hint

    assert data_starvation_hint(DATA_WAIT_WARN, 8, 1.0) is None  # waiting 20% or less: no advice
    # waited 75%: the step alone runs 4x as fast as the 8 actors feed it -> 32 actors
    hint = data_starvation_hint(0.75, 8, 1.0)
    assert "75%" in hint and "about 32 actors" in hint and "data.num_actors=8" in hint
    hint = data_starvation_hint(0.75, 4, 1.0, max_cpus=4)
    assert "about 16 actors" in hint and "data.max_cpus=4" in hint
    assert "about 160 actors" in data_starvation_hint(0.999, 8, 1.0)  # bounded at 20x


def test_unnamed_training_runs_never_share_a_name():
    """Only a chosen train.run_name resumes; two unnamed runs get their own checkpoint folders."""
    from rayssl.launch import training_run_name

    cfg = compose(["model=micro"])
    a, b = training_run_name(cfg), training_run_name(cfg)
    assert a != b and a.startswith(f"train-{cfg.model.backbone}-{cfg.data.name}-")
    assert training_run_name(compose(["model=micro", "train.run_name=mine"])) == "mine"


def test_export_encoder_matches_embed_and_reloads_identically(micro_method, tmp_path):
    from safetensors.torch import load_file

    from rayssl.export import SAFETENSORS_FILE, load_encoder, save_encoder

    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    encoder = micro_method.export_encoder()
    ref = micro_method.embed(images)
    assert ref.shape == (3, micro_method.embed_dim)
    assert torch.equal(encoder(images), ref)
    assert not any(p.requires_grad for p in encoder.parameters())

    save_encoder(encoder, str(tmp_path / "model"))
    reloaded = load_encoder(str(tmp_path / "model"))
    assert torch.equal(reloaded(images), ref)
    floats = (images.float() / 255 - 0.45) / 0.225
    assert torch.allclose(reloaded(floats), encoder(floats))

    weights = load_file(str(tmp_path / "model" / SAFETENSORS_FILE))
    teacher = micro_method.teacher["backbone"].state_dict()
    assert set(weights) == set(teacher)
    assert all(torch.equal(weights[k], teacher[k]) for k in teacher)


def test_pca_picture_is_png_of_expected_size(micro_method):
    from PIL import Image

    from rayssl.pictures import TILE, pca_picture, pca_rgb

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    feats = micro_method.patch_features(images)
    assert feats.shape == (4, 4, 4, micro_method.embed_dim)
    rgb = pca_rgb(feats)
    assert rgb.shape == (4, 4, 4, 3) and rgb.dtype.name == "uint8"
    png = pca_picture(images, feats)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(png))
    img.verify()
    assert img.size == (4 * TILE, 2 * TILE) and img.mode == "RGB"


def test_evaluate_checkpoint_dir_in_process(micro_method, tmp_path):
    """experiments/evaluate.py on a Ray-style checkpoint dir (state.pt with its config)."""
    import importlib.util

    from conftest import REPO

    cfg = compose(["model=micro", "data.synthetic_n_train=64", "data.synthetic_n_eval=32"])
    torch.save({"method": micro_method.state_dict(), "step": 0, "config": cfg.to_dict()}, tmp_path / "state.pt")
    spec = importlib.util.spec_from_file_location("evaluate_entry", REPO / "experiments" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    eval_cfg = dataclasses.replace(cfg.eval, knn_k=[5, 20], probe_epochs=5, device="cpu")
    results = mod.evaluate(str(tmp_path), cfg, eval_cfg)
    assert results["n_bank"] == 64 and results["n_query"] == 32 and results["feature_dim"] == micro_method.embed_dim
    for key in ("knn_top1_k5", "knn_top1_k20", "linear_probe_top1"):
        assert 0.0 <= results[key] <= 100.0
    assert "knn_top1_k20" in mod.format_table(str(tmp_path), "synthetic", results)


def test_knn_evaluation_retries_a_transient_data_failure(monkeypatch):
    """A failure while reading the k-NN sets is retried from the start (up to EVAL_ATTEMPTS);
    the result equals an undisturbed evaluation; a lasting failure is raised. The second
    evaluation reads the cached set, not the stream."""
    import rayssl.evaluator as ev
    from dinov3.evaluation import knn_classify
    from rayssl.method import build_method

    cfg = compose(["model=micro", "model.layerscale_init=null", "train.knn_k=5"])
    torch.manual_seed(0)  # no LayerScale: distinct features, so no ties among neighbours
    micro_method = build_method(cfg.method.name, cfg.method_kwargs()).eval()

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (36, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.cat([torch.arange(24) % 4, torch.arange(12) % 4])
    split = torch.tensor([ev.KNN_BANK] * 24 + [ev.KNN_QUERY] * 12)
    calls = {"n": 0, "fail": 1}

    def flaky():
        calls["n"] += 1
        if calls["n"] <= calls["fail"]:
            raise RuntimeError("ActorUnschedulableError: transient")
        for i in range(0, 36, 5):  # batches holding bank and query rows
            yield images[i:i + 5], labels[i:i + 5], split[i:i + 5]

    monkeypatch.setattr(ev.time, "sleep", lambda s: None)
    evaluator = ev.KnnEvaluator(flaky, torch.device("cpu"), every_epochs=1, k=5, epochs=2)
    out = evaluator.run(micro_method, step=0)
    with torch.no_grad():
        feats = micro_method.embed(images).float()
    expected = knn_classify(feats[:24], labels[:24], feats[24:], labels[24:], ks=(5, 10, 100), n_classes=4)
    assert out["knn_top1"] == pytest.approx(float(expected[5]))
    assert out["knn_top1_k100"] == pytest.approx(float(expected[100]))
    assert calls["n"] == 2  # one failed attempt, then one pass over bank + queries
    assert evaluator.run(micro_method, step=1) == out and calls["n"] == 2  # from the cache

    calls.update(n=0, fail=10)
    fresh = ev.KnnEvaluator(flaky, torch.device("cpu"), every_epochs=1, k=5, epochs=2)
    with pytest.raises(RuntimeError, match="transient"):
        fresh.run(micro_method, step=0)
    assert calls["n"] == ev.EVAL_ATTEMPTS


def test_first_item_is_fetched_ahead_in_the_background():
    """The train loop's iterator starts fetching its first batch at construction (so the train
    stream starts up during the initial k-NN evaluation); items and errors come through in order."""
    import threading

    from rayssl.loop import prefetch_first

    started = threading.Event()

    def items():
        started.set()
        yield from (1, 2, 3)

    it = prefetch_first(items())
    assert started.wait(5), "the first item was not requested before it was taken"
    assert list(it) == [1, 2, 3]
    assert list(prefetch_first(iter(()))) == []

    def failing():
        raise ValueError("stream broke")
        yield  # noqa: unreachable

    with pytest.raises(ValueError, match="stream broke"):
        next(prefetch_first(failing()))
