"""Acceptance: `gestalt pretrain` learns face identification on ORL, resumes, and `gestalt train --init` fine-tunes it.

Held-out accuracy is measured here, independently of the command's own report: the
held-out photos named in the checkpoint go through preprocessing again and are scored
by the loaded model.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from shared.cli import main
from shared.ml.members.casia import casia_only
from tests.conftest import shared_data

# Small enough for CI on 2 cores (about a minute), with margin over the 0.90 acceptance level.
PRETRAIN_ARGS = ("--width", "0.25", "--regions", "full_face", "--batch-size", "16", "--lr", "2e-3", "--sgd-lr", "1e-3",
                 "--seed", "0")
FIRST_EPOCHS, ADAM_EPOCHS, SGD_EPOCHS = 10, 25, 5


@pytest.fixture(scope="module")
def cli():
    """Run `gestalt ...` in this process with the tests' settings, on both cores: the suite's workers are idle
    while these commands train (the pretraining fixture: 112 s on one thread in a full run, 62 s on two)."""
    from shared.config import reload_settings

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GESTALT_TORCH_THREADS", "2")
        reload_settings()
        runner = CliRunner()

        def invoke(*args: str):
            result = runner.invoke(main, list(args), catch_exceptions=False)
            print(result.output[-3000:])
            return result

        yield invoke
    reload_settings()
    torch.set_num_threads(threads)


def _load(path: Path) -> dict:
    return torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)


def _casia(state: dict) -> dict:
    """The CASIA-Nets member (config, state_dict) of a trained model's checkpoint."""
    (member,) = [m for m in state["members"] if m["kind"] == "casia"]
    return member


@pytest.fixture(scope="module")
def pretrained(cli, tmp_path_factory) -> tuple[Path, list, list]:
    """Pretrain in two invocations: the second resumes from the first one's checkpoint."""
    orl = shared_data("faces", "orl")
    out = tmp_path_factory.mktemp("pretrain") / "orl.pt"
    first = cli("pretrain", "--data", str(orl), "--output", str(out), *PRETRAIN_ARGS,
                "--epochs", str(FIRST_EPOCHS), "--sgd-epochs", "0")
    assert first.exit_code == 0, first.output
    state = _load(out)
    assert state["epoch"] == FIRST_EPOCHS and state["phase"] == "adam"
    first_history = state["metrics"]["history"]
    second = cli("pretrain", "--data", str(orl), "--output", str(out), *PRETRAIN_ARGS,
                 "--epochs", str(ADAM_EPOCHS), "--sgd-epochs", str(SGD_EPOCHS))
    assert second.exit_code == 0, second.output
    assert f"resumed from epoch {FIRST_EPOCHS}" in second.output
    return out, first_history, _load(out)["metrics"]["history"]


def test_resume_continues_from_the_checkpoint(pretrained):
    out, first, history = pretrained
    state = _load(out)
    assert state["epoch"] == ADAM_EPOCHS + SGD_EPOCHS
    assert state["metrics"]["resumed_from"] == FIRST_EPOCHS
    assert [h["epoch"] for h in history] == list(range(1, ADAM_EPOCHS + SGD_EPOCHS + 1))
    assert history[:FIRST_EPOCHS] == first  # the first run's epochs were kept, not retrained
    assert [h["phase"] for h in history] == ["adam"] * ADAM_EPOCHS + ["sgd"] * SGD_EPOCHS
    assert "state" in state["optimizer"] and state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    # Training went on from the checkpoint's weights: the loss keeps falling instead of restarting.
    assert history[FIRST_EPOCHS]["loss"] < history[0]["loss"] * 0.8


def test_held_out_identity_accuracy(pretrained):
    """At least 90% of each identity's unseen photos are recognised from the full face."""
    from shared.config import get_settings
    from shared.ml.nets.ensemble import predict_regions as predict
    from shared.ml.preprocess.pipeline import Preprocessor
    from shared.ml.train.checkpoint import load_checkpoint
    from shared.ml.train.data import scan_folder
    from shared.ml.train.prepared import prepare

    out, _, _ = pretrained
    loaded, state = load_checkpoint(out.read_bytes())
    model = loaded.member("casia").net
    holdout = set(state["extra"]["holdout_images"])
    samples = [s for s in scan_folder(shared_data("faces", "orl")) if str(s.path) in holdout]
    identities = state["class_names"]
    assert len(holdout) >= 35 and {s.label for s in samples} == set(identities)  # about one photo per person
    data = prepare(samples, identities, Preprocessor.from_settings(get_settings(), model.regions), progress=False)
    pred = predict(model, data.crops)
    accuracy = float((pred.region_probs[:, model.regions.index("full_face")].argmax(1) == data.labels).mean())
    print(f"ORL held-out identity top-1 (full face): {accuracy:.3f} on {len(data.labels)} photos")
    assert accuracy >= 0.90
    assert state["metrics"]["validation"]["regions"]["full_face"]["top1"] == pytest.approx(accuracy)


def test_fine_tune_from_pretrained(cli, pretrained, tmp_path):
    """`gestalt train --init` on a manifest CSV: binary mode, new head at gain 0.3, backbone from the checkpoint."""
    out, _, _ = pretrained
    orl = shared_data("faces", "orl")
    rows = ["image,subject,label"]
    for person in ("s1", "s2", "s3", "s4", "s5", "s6"):
        rows += [f"{orl / person / f'{i}.pgm'},{person}-{i},{person}" for i in range(1, 11)]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    ft = tmp_path / "ft.pt"
    result = cli("train", "--data", str(manifest), "--backbone", "casia", "--init", str(out), "--mode", "binary",
                 "--positive", "s1", "--epochs", "3", "--batch-size", "16", "--no-register", "--output", str(ft))
    assert result.exit_code == 0, result.output
    assert "sensitivity" in result.output and "specificity" in result.output
    state = _load(ft)
    nets = _casia(state)
    assert state["class_names"] == ["s1", "others"] and nets["config"]["regions"] == ["full_face"]
    assert nets["config"]["width"] == 0.25
    assert state["metrics"]["config"]["optimizer"] == "sgd" and state["metrics"]["config"]["lr"] == 5e-3
    binary = state["metrics"]["validation"]["binary"]
    assert 0 <= binary["sensitivity"] <= 1 and 0 <= binary["specificity"] <= 1
    pre = _load(out)["state_dict"]
    conv = "nets.full_face.features.0.weight"
    # Fine-tuning started from the pretrained filters (a fresh He-normal init would be uncorrelated).
    corr = np.corrcoef(pre[conv].flatten().numpy(), nets["state_dict"][conv].flatten().numpy())[0, 1]
    assert corr > 0.9
    assert nets["state_dict"]["nets.full_face.fc.weight"].shape == (2, pre["nets.full_face.fc.weight"].shape[1])


def test_fine_tune_keeps_only_the_first_conv_pairs(cli, pretrained, tmp_path):
    """`--transfer-pairs 2`: the first two conv pairs start from the checkpoint, the later three afresh."""
    from shared.ml.nets.casia import CASIANet

    out, _, _ = pretrained
    orl = shared_data("faces", "orl")
    rows = ["image,subject,label"] + [f"{orl / p / f'{i}.pgm'},{p}-{i},{p}" for p in ("s1", "s2", "s3")
                                      for i in range(1, 11)]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    ft = tmp_path / "ft.pt"
    result = cli("train", "--data", str(manifest), "--backbone", "casia", "--init", str(out),
                 "--transfer-pairs", "2", "--optimizer", "adam",
                 "--lr", "1e-3", "--epochs", "2", "--batch-size", "16", "--no-register", "--output", str(ft))
    assert result.exit_code == 0, result.output
    state = _load(ft)
    assert state["metrics"]["task"]["transfer_pairs"] == 2
    pre, tuned = _load(out)["state_dict"], _casia(state)["state_dict"]
    starts = CASIANet(1, width=0.25).pair_starts

    def corr(layer: int) -> float:
        key = f"nets.full_face.features.{layer}.weight"
        return float(np.corrcoef(pre[key].flatten().numpy(), tuned[key].flatten().numpy())[0, 1])

    assert corr(starts[0]) > 0.9 and corr(starts[1]) > 0.9  # kept, then fine-tuned for two epochs
    assert all(abs(corr(s)) < 0.3 for s in starts[2:-1])  # started afresh

    result = cli("train", "--data", str(manifest), "--transfer-pairs", "2", "--no-register")
    assert result.exit_code != 0 and "--transfer-pairs needs --init" in result.output


def test_reinit_pairs_from_resets_only_the_later_pairs():
    from shared.ml.nets.casia import CASIANet

    net = CASIANet(3, width=0.125)
    with torch.no_grad():  # as if trained: values no initialisation gives (batch norm statistics included)
        for value in net.state_dict().values():
            if value.is_floating_point():
                value.add_(0.25)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.reinit_pairs_from(2)
    for j, layer in enumerate(net.features):
        for name, value in layer.state_dict().items():
            if name == "num_batches_tracked":
                continue
            same = torch.equal(value, before[f"features.{j}.{name}"])
            assert same == (j < net.pair_starts[2]), (j, name)
    assert torch.equal(net.fc.weight, before["fc.weight"])  # the classifier is reset_classifier's job
    with pytest.raises(ValueError, match="between 0 and 5"):
        net.reinit_pairs_from(6)


def test_unknown_classes_are_listed(cli, tmp_path):
    orl = shared_data("faces", "orl")
    result = cli("train", "--data", str(orl), "--mode", "specialised", "--classes", "s1,s2,nobody,s99",
                 "--no-register")
    assert result.exit_code != 0
    assert "2 unknown class(es): nobody, s99" in result.output
    result = cli("train", "--data", str(orl), "--mode", "binary", "--positive", "nobody", "--no-register")
    assert result.exit_code != 0 and "nobody" in result.output
    result = cli("pretrain", "--data", str(orl), "--output", str(tmp_path / "p.pt"), "--regions", "full_face,snout")
    assert result.exit_code != 0 and "unknown region(s) snout" in result.output
    assert not (tmp_path / "p.pt").exists()


def _tiny_identities(n_ids: int = 4, per_id: int = 5):
    """Random 'faces': each identity a fixed pattern plus noise (enough to exercise the loop in seconds)."""
    from shared.ml.train.data import Sample
    from shared.ml.train.prepared import PreparedData

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(n_ids, 1, 100, 100))
    crops = np.concatenate([np.clip(base[i] + rng.normal(0, 20, (per_id, 1, 100, 100)), 0, 255)
                            for i in range(n_ids)]).astype(np.uint8)
    labels = np.repeat(np.arange(n_ids), per_id)
    samples = [Sample(Path(f"id{i}/{j}.png"), f"id{i}", f"id{i}/{j}.png") for i in range(n_ids) for j in range(per_id)]
    return PreparedData(crops, labels, samples), [f"id{i}" for i in range(n_ids)]


def test_resume_is_exact(tmp_path):
    """Stopping after any epoch and resuming gives the same weights as one uninterrupted run."""
    from shared.ml.train.pretrain import PretrainConfig, pretrain

    data, ids = _tiny_identities()
    cfg = PretrainConfig(width=0.0625, epochs=2, sgd_epochs=1, batch_size=4, seed=3)
    straight, _ = pretrain(data, ids, ("full_face",), cfg, tmp_path / "a.pt", progress=False)
    for stop in (PretrainConfig(width=0.0625, epochs=1, sgd_epochs=0, batch_size=4, seed=3),
                 PretrainConfig(width=0.0625, epochs=2, sgd_epochs=0, batch_size=4, seed=3)):
        pretrain(data, ids, ("full_face",), stop, tmp_path / "b.pt", progress=False)
    resumed, metrics = pretrain(data, ids, ("full_face",), cfg, tmp_path / "b.pt", progress=False)
    assert metrics["resumed_from"] == 2
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    # A finished run is not trained again.
    _, again = pretrain(data, ids, ("full_face",), cfg, tmp_path / "b.pt", progress=False)
    assert again["resumed_from"] == 3 and len(again["history"]) == 3


def test_resume_refuses_another_setup(tmp_path):
    from shared.ml.train.pretrain import PretrainConfig, pretrain

    data, ids = _tiny_identities()
    cfg = PretrainConfig(width=0.0625, epochs=1, sgd_epochs=0, batch_size=4)
    pretrain(data, ids, ("full_face",), cfg, tmp_path / "p.pt", progress=False)
    with pytest.raises(ValueError, match="written for other data"):
        pretrain(data, ids, ("full_face",), PretrainConfig(width=0.125, epochs=2, sgd_epochs=0, batch_size=4),
                 tmp_path / "p.pt", progress=False)
    (tmp_path / "other.pt").write_bytes(_model_bytes())
    with pytest.raises(ValueError, match="not a pretraining checkpoint"):
        pretrain(data, ids, ("full_face",), cfg, tmp_path / "other.pt", progress=False)
    assert not list(tmp_path.glob(".*.tmp"))  # every write was completed and renamed


def _model_bytes() -> bytes:
    from shared.ml.nets.ensemble import RegionalEnsemble
    from shared.ml.train.checkpoint import save_checkpoint

    return save_checkpoint(casia_only(RegionalEnsemble(("full_face",), 2, width=0.0625), ["a", "b"]), {})
