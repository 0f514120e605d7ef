"""Training data layouts and subject-disjoint splits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.ml.members.casia import casia_only
from shared.ml.train.data import Sample, load_manifest, scan_folder
from shared.ml.train.splits import (
    LeakageError,
    check_leakage,
    gmdb_protocol,
    in_holdout,
    stratified_holdout,
    subject_split,
)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_scan_both_layouts(tmp_path):
    _touch(tmp_path / "synA" / "subj1" / "a.jpg")
    _touch(tmp_path / "synA" / "subj1" / "b.jpg")
    _touch(tmp_path / "synA" / "subj2" / "c.png")
    _touch(tmp_path / "synB" / "d.jpg")
    _touch(tmp_path / "synB" / "notes.txt")
    samples = scan_folder(tmp_path)
    assert [(s.label, s.subject) for s in samples] == [
        ("synA", "synA/subj1"), ("synA", "synA/subj1"), ("synA", "synA/subj2"), ("synB", "synB/d.jpg")]


def test_scan_refuses_empty_and_missing(tmp_path):
    with pytest.raises(ValueError):
        scan_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        scan_folder(tmp_path / "nope")


def test_subject_split_is_disjoint_and_stable():
    samples = [Sample(Path(f"{lab}/{subj}/{i}.jpg"), lab, f"{lab}/{subj}")
               for lab in ("a", "b", "c") for subj in range(10) for i in range(3)]
    train, val = subject_split(samples, 0.2, seed=3)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(samples)
    assert {samples[i].subject for i in train}.isdisjoint({samples[i].subject for i in val})
    assert len({samples[i].subject for i in val}) == 6  # 2 of 10 subjects per label
    assert subject_split(samples, 0.2, seed=3) == (train, val)


def test_single_subject_label_stays_in_training():
    samples = [Sample(Path("x.jpg"), "rare", "rare/one")]
    assert subject_split(samples, 0.5) == ([0], [])


def test_manifest(tmp_path):
    _touch(tmp_path / "imgs" / "a.jpg")
    (tmp_path / "m.csv").write_text("image,subject,label\nimgs/a.jpg,P1,synA\n")
    [sample] = load_manifest(tmp_path / "m.csv")
    assert sample.path == tmp_path / "imgs" / "a.jpg" and sample.subject == "P1" and sample.label == "synA"
    (tmp_path / "bad.csv").write_text("path,label\nx,y\n")
    with pytest.raises(ValueError, match="missing column"):
        load_manifest(tmp_path / "bad.csv")
    (tmp_path / "gone.csv").write_text("image,subject,label\nnope.jpg,P1,synA\n")
    with pytest.raises(FileNotFoundError):
        load_manifest(tmp_path / "gone.csv")


def test_gmdb_protocol():
    samples = []
    for lab, n_subjects in (("freq1", 10), ("freq2", 8), ("rare1", 3), ("rare2", 2), ("single", 1)):
        samples += [Sample(Path(f"{lab}{j}.jpg"), lab, f"{lab}/{j}") for j in range(n_subjects)]
    frequent, rare = gmdb_protocol(samples, n_rare_splits=10, seed=1)
    assert {samples[i].label for i in frequent.train + frequent.test} == {"freq1", "freq2"}
    assert len(rare) == 10
    for split in rare:
        test_labels = [samples[i].label for i in split.test]
        assert sorted(test_labels) == ["rare1", "rare2"]  # one held-out subject per rare disorder
        assert {samples[i].subject for i in split.train}.isdisjoint({samples[i].subject for i in split.test})
        assert "single" not in {samples[i].label for i in split.train + split.test}
    assert len({tuple(s.test) for s in rare}) > 1  # the splits differ


def test_leakage_check_fails_loudly():
    check_leakage(["a"], ["h1"], ["b"], ["h2"])
    with pytest.raises(LeakageError, match="1 subject"):
        check_leakage(["a", "b"], ["h1"], ["b"], ["h2"])
    with pytest.raises(LeakageError, match="1 identical"):
        check_leakage(["a"], ["h1"], ["b"], ["h1"])


def test_holdout_by_hash_is_stable():
    subjects = [f"s{i}" for i in range(2000)]
    held = [s for s in subjects if in_holdout(s, 0.2)]
    assert 300 < len(held) < 500
    assert held == [s for s in subjects if in_holdout(s, 0.2)]


# ---------------------------------------------------------------------------- training modes and fine-tuning
def _samples(labels: dict[str, int]) -> list[Sample]:
    return [Sample(Path(f"{lab}/{i}.jpg"), lab, f"{lab}/{i}") for lab, n in labels.items() for i in range(n)]


def test_a_first_holdout_holds_out_patients_of_every_syndrome():
    """Sixteen patients of two syndromes, where the hash alone might hold out none of one: a share of each is
    held out, never a syndrome's every patient, and a patient's photos stay on one side."""
    subjects = [f"case:{i}" for i in range(16) for _ in range(3)]
    labels = ["a" if i < 8 else "b" for i in range(16) for _ in range(3)]
    held = stratified_holdout(subjects + ["case:99"], labels + ["c"], 0.2)
    assert held[-1] is False  # a syndrome of one patient keeps it for training
    by_subject = {s: h for s, h in zip(subjects, held, strict=False)}
    assert all(by_subject[s] == h for s, h in zip(subjects, held, strict=False))
    for label in "ab":
        out = {s for s, lab, h in zip(subjects, labels, held, strict=False) if lab == label and h}
        assert len(out) == 2  # round(0.2 x 8)
    assert stratified_holdout(subjects, labels, 0.2) == held[:-1]  # stable
    assert stratified_holdout(["x", "y"], ["a", "a"], 0.9) == [True, False]  # never all


def test_select_task_modes():
    from shared.ml.train.modes import BINARY_NEGATIVE, select_task

    samples = _samples({"a": 2, "b": 3, "c": 1})
    same, classes = select_task(samples, "multiclass")
    assert same == samples and classes == ["a", "b", "c"]
    binary, classes = select_task(samples, "binary", positive="b")
    assert classes == ["b", BINARY_NEGATIVE]
    assert [s.label for s in binary] == [BINARY_NEGATIVE] * 2 + ["b"] * 3 + [BINARY_NEGATIVE]
    assert [s.subject for s in binary] == [s.subject for s in samples]
    special, classes = select_task(samples, "specialised", classes=["c", "a"])
    assert classes == ["a", "c"] and [s.label for s in special] == ["a", "a", "c"]
    with pytest.raises(ValueError, match="2 unknown class"):
        select_task(samples, "specialised", classes=["a", "x", "y"])
    with pytest.raises(ValueError, match="unknown positive label 'x'"):
        select_task(samples, "binary", positive="x")
    with pytest.raises(ValueError, match="needs a positive"):
        select_task(samples, "binary")
    with pytest.raises(ValueError, match="unknown mode"):
        select_task(samples, "ordinal")


def test_binary_summary():
    from shared.ml.train.loop import binary_summary

    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
    out = binary_summary(probs, np.array([0, 0, 1, 1, 1]), positive=0)
    assert out["sensitivity"] == 0.5 and out["specificity"] == pytest.approx(2 / 3)
    assert (out["n_positive"], out["n_negative"]) == (2, 3)


def test_load_pretrained_replaces_the_final_layers():
    import torch

    from shared.ml.nets.ensemble import RegionalEnsemble
    from shared.ml.train.checkpoint import save_checkpoint
    from shared.ml.train.loop import load_pretrained
    from shared.ml.train.recipe import FINETUNE_HEAD_GAIN

    torch.manual_seed(0)
    src = RegionalEnsemble(("full_face", "upper_half"), 200, width=0.5)
    blob = save_checkpoint(casia_only(src, [f"id{i}" for i in range(200)]), {})
    model = load_pretrained(blob, 7, ("upper_half",))
    assert model.regions == ("upper_half",) and model.num_classes == 7 and model.width == 0.5
    net, old = model.nets["upper_half"], src.nets["upper_half"]
    assert torch.equal(net.features[0].weight, old.features[0].weight)  # the backbone is kept
    fc = net.fc.weight.detach()
    assert fc.shape == (7, old.num_features) and torch.count_nonzero(net.fc.bias) == 0
    xavier_std = FINETUNE_HEAD_GAIN * (2 / (fc.shape[0] + fc.shape[1])) ** 0.5
    assert fc.std().item() == pytest.approx(xavier_std, rel=0.2)
    assert model(torch.zeros(2, 1, 1, 100, 100)).shape == (2, 1, 7)
    with pytest.raises(ValueError, match="no net for region"):
        load_pretrained(blob, 7, ("lower_half",))


# ---------------------------------------------------------------------------- early stopping and resuming
def _tiny_data(n: int = 12):
    from shared.ml.train.prepared import PreparedData

    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    crops = rng.integers(0, 255, (n, 1, 100, 100)).astype(np.uint8)
    crops[labels == 1, :, 40:60, 40:60] = 255
    samples = [Sample(Path(f"{i}.jpg"), "ab"[y], f"p{i}") for i, y in enumerate(labels)]
    return PreparedData(crops, labels.astype(np.int64), samples)


def test_training_resumes_from_the_last_epoch(tmp_path, monkeypatch):
    import torch

    from shared.ml.train import loop as training
    from shared.ml.train.loop import train_ensemble
    from shared.ml.train.recipe import TrainConfig

    data = _tiny_data()
    cfg = TrainConfig(width=0.125, epochs=3, batch_size=4, progress=False, augment=False)
    args = (data, ["a", "b"], ("full_face",), list(range(8)), list(range(8, 12)), cfg)
    straight, _ = train_ensemble(*args, state_path=tmp_path / "a.state")

    real, calls = training.train_epoch, []

    def dies_in_epoch_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(training, "train_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_ensemble(*args, state_path=tmp_path / "b.state")
    monkeypatch.setattr(training, "train_epoch", real)
    resumed, metrics = train_ensemble(*args, state_path=tmp_path / "b.state")
    assert metrics["resumed_from"] == 2 and [e["epoch"] for e in metrics["history"]] == [1, 2, 3]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k
    with pytest.raises(ValueError, match="other data, split or settings"):
        train_ensemble(data, ["a", "b"], ("full_face",), list(range(6)), list(range(6, 12)), cfg,
                       state_path=tmp_path / "b.state")


def test_early_stopping_keeps_the_best_epoch(monkeypatch):
    from shared.ml.train import loop as training
    from shared.ml.train.loop import train_ensemble
    from shared.ml.train.recipe import TrainConfig

    scores = iter([0.5, 0.75, 0.75, 0.5, 0.75, 1.0, 1.0])
    real = training.evaluate

    def scripted(model, crops, labels, ks=(1,), positive=None):
        out = real(model, crops, labels, ks=ks, positive=positive)
        if ks != (1, 5, 10):  # per-epoch validation, not the final report
            out["aggregate"] = {f"top{k}": next(scores) for k in ks}
        return out

    monkeypatch.setattr(training, "evaluate", scripted)
    data = _tiny_data()
    cfg = TrainConfig(width=0.125, epochs=7, batch_size=4, progress=False, augment=False, patience=2)
    _, metrics = train_ensemble(data, ["a", "b"], ("full_face",), list(range(8)), list(range(8, 12)), cfg)
    # Epoch 2 reached 0.75; epochs 3 and 4 did not beat it: stop after epoch 4, keep the best.
    assert [e["epoch"] for e in metrics["history"]] == [1, 2, 3, 4] and metrics["stopped_early"]
    assert metrics["best_epoch"] in (2, 3)


# ---------------------------------------------------------------------------- flat layout, run-time estimate
def test_flat_layout_has_unknown_subjects(tmp_path):
    from shared.ml.train.data import subjects_known

    for rel in ("a/1.jpg", "a/2.jpg", "b/3.jpg"):
        _touch(tmp_path / "flat" / rel)
    for rel in ("a/p1/1.jpg", "a/p1/2.jpg", "b/p2/3.jpg"):
        _touch(tmp_path / "nested" / rel)
    assert not subjects_known(scan_folder(tmp_path / "flat"))
    assert subjects_known(scan_folder(tmp_path / "nested"))


def test_run_time_estimate_after_the_first_batches(capsys):
    from shared.ml.train.loop import run_time_estimate, train_ensemble
    from shared.ml.train.recipe import TrainConfig

    assert run_time_estimate(2.0, 4, 40, 10) == pytest.approx(200.0)
    assert run_time_estimate(2.0, 4, 40, 10, val_share=0.3) == pytest.approx(220.0)
    data = _tiny_data()
    cfg = TrainConfig(width=0.125, epochs=2, batch_size=2, progress=True, augment=False)
    _, metrics = train_ensemble(data, ["a", "b"], ("full_face",), list(range(8)), list(range(8, 12)), cfg)
    assert metrics["timing"]["estimated_seconds"] > 0 and metrics["timing"]["train_seconds"] > 0
    err = capsys.readouterr()
    assert "for 2 epochs (estimated from the first batches)" in err.out + err.err
    assert "epoch 1/2" in err.err  # the per-epoch progress bar
