"""``gestalt train`` and ``gestalt pretrain``."""
from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from shared.cli.common import (
    cache_note,
    cache_options,
    console,
    load_samples_or_fail,
    prep_cache,
    report_skipped,
    report_woken,
    torch_options,
    torch_runtime,
)


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, path_type=Path),
              help="Labelled photos: DIR/<label>/<subject>/<image>, DIR/<label>/<image>, or a manifest CSV "
                   "(image,subject,label).")
@click.option("--preset", type=click.Choice(["cpu-small", "paper"]), default=None,
              help="Defaults for --width, --epochs and --batch-size: cpu-small (0.25, 8, 16) for a quick run on a "
                   "laptop CPU, paper (1.0, 40, 32). Options given explicitly win [default: paper].")
@click.option("--width", type=float, default=None, help="CASIA-Net channel multiplier [default: 1.0].")
@click.option("--epochs", type=int, default=None, help="[default: 40]")
@click.option("--batch-size", type=int, default=None, help="[default: 32]")
@click.option("--lr", type=float, default=None,
              help="Learning rate [default: 5e-3 with --init (SGD), 1e-3 from scratch (Adam)].")
@click.option("--init", "init_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Fine-tune a pretrained checkpoint (`gestalt pretrain`): new final layers, Xavier-normal at "
                   "gain 0.3, SGD with momentum 0.9 and no weight decay.")
@click.option("--transfer-pairs", type=click.IntRange(0, 5), default=None,
              help="With --init: keep the pretrained weights of only the first N of each net's five conv pairs "
                   "and start the rest afresh [default: keep all]. Keep fewer after pretraining on few identities.")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=None,
              help="[default: sgd with --init, adam from scratch]")
@click.option("--mode", type=click.Choice(["multiclass", "binary", "specialised"]), default="multiclass",
              show_default=True, help="binary: --positive against all other labels; specialised: only --classes.")
@click.option("--positive", default=None, help="Binary mode: the positive label.")
@click.option("--classes", default=None, help="Specialised mode: comma-separated labels, e.g. genotypes of a syndrome.")
@click.option("--select-topk", type=int, default=1, show_default=True,
              help="Keep the epoch with the best validation top-k at this k.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of each label's subjects held out for validation.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--exclude", multiple=True, help="Skip files with this name (repeatable), e.g. a held-out image.")
@click.option("--name", default=None, help="Model version name (default: a timestamp).")
@click.option("--activate/--no-activate", default=False, help="Make the new version the active model.")
@click.option("--register/--no-register", default=True, help="Register the model version in the database.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the checkpoint to this file.")
@click.option("--patience", type=click.IntRange(min=0), default=0, show_default=True,
              help="Early stopping: stop after this many epochs without a better validation top-k (0: off); "
                   "the best epoch is kept either way.")
@click.option("--state", "state_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Epoch state, rewritten after every epoch and removed when training finishes; when it exists, "
                   "training resumes after its last epoch (same data and settings) [default: <output>.state beside "
                   "--output, else none].")
@click.option("--skipped", "skipped_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to list the photos preprocessing skipped, with reasons [default: <output>-skipped.csv "
                   "beside --output, else $GESTALT_DATA_DIR/reports/train-<time>-skipped.csv].")
@click.option("--identity/--no-identity", default=True, show_default=True,
              help="Add the identity member: a head on the face-identity encoder's descriptors (dlib's ResNet, "
                   "learned on millions of faces), weighted against the regional networks on the validation split.")
@cache_options
@torch_options
def train(data_dir: Path, preset: str | None, width: float | None, epochs: int | None, batch_size: int | None,
          lr: float | None, init_path: Path | None,
          transfer_pairs: int | None, optimizer: str | None, mode: str, positive: str | None, classes: str | None,
          select_topk: int, val_fraction: float, seed: int, exclude: tuple[str, ...], name: str | None, activate: bool,
          register: bool, output: Path | None, patience: int, state_path: Path | None, skipped_path: Path | None,
          identity: bool, threads: int | None, device: str | None, cache_dir: Path | None, no_cache: bool) -> None:
    """Train the regional CNNs (and the identity member) from a labelled photo folder and register a model version.

    A binary model stores the label mapping it trained with (every label but --positive becomes
    `others`) and an operating threshold chosen on the validation split (Youden's J), which
    `gestalt evaluate` applies.
    """
    from datetime import datetime

    from shared.ml.data import subjects_known
    from shared.ml.preprocess import Preprocessor
    from shared.ml.splits import subject_split
    from shared.ml.training import (
        FINETUNE_LR,
        PRESETS,
        SCRATCH_LR,
        TrainConfig,
        binary_label_map,
        data_hash,
        load_pretrained,
        prepare,
        seed_everything,
        select_task,
        train_ensemble,
    )

    if transfer_pairs is not None and init_path is None:
        raise click.ClickException("--transfer-pairs needs --init")
    recipe = PRESETS[preset or "paper"]
    width = recipe["width"] if width is None else width
    epochs = recipe["epochs"] if epochs is None else epochs
    batch_size = recipe["batch_size"] if batch_size is None else batch_size
    if preset:
        console.print(f"preset {preset}: width {width}, {epochs} epochs, batch size {batch_size}")
    settings, torch_device = torch_runtime(threads, device)
    samples = [s for s in load_samples_or_fail(data_dir) if s.path.name not in set(exclude)]
    known = subjects_known(samples)
    if not known:
        console.print(
            "[bold yellow]WARNING: subjects are unknown.[/]\n"
            f"  {data_dir} uses the flat layout DIR/<label>/<image>, so every photo counts as its own subject.\n"
            "  Photos of one person can land on both sides of the validation split: validation figures will be\n"
            "  optimistic and the model's metrics record subjects_known=false. To split by person, use\n"
            "  DIR/<label>/<subject>/<image> or a manifest CSV (image,subject,label).", soft_wrap=True)
    original_labels = {s.label for s in samples}
    try:
        samples, class_names = select_task(samples, mode, positive,
                                           [c.strip() for c in classes.split(",")] if classes else None)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(f"{len(samples)} images, {len(class_names)} labels, "
                  f"{len({s.subject for s in samples})} subjects ({mode})")
    if register:  # unknown catalogue IDs stop the run now, not after training
        from shared.catalog import CatalogError, syndromes_for_labels
        from shared.db import get_sessionmaker

        session = get_sessionmaker()()
        try:
            syndromes_for_labels(session, class_names)
        except CatalogError as exc:
            raise click.ClickException(str(exc)) from exc
        finally:
            session.rollback()
            session.close()
    init = None
    if init_path is not None:
        seed_everything(seed)  # the new final layers' initial weights
        try:
            init = load_pretrained(init_path.read_bytes(), len(class_names), transfer_pairs=transfer_pairs)
        except ValueError as exc:
            raise click.ClickException(f"{init_path}: {exc}") from exc
        width = init.width
    # A fine-tuned model keeps the regions of its pretrained nets.
    preprocessor = Preprocessor.from_settings(settings, init.regions) if init else Preprocessor.from_settings(settings)
    cache = prep_cache(settings, preprocessor, cache_dir, no_cache)
    try:
        data = prepare(samples, class_names, preprocessor, cache=cache)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    cache_note(cache)
    if skipped_path is None:
        skipped_path = (output.parent / f"{output.stem}-skipped.csv" if output else settings.data_dir / "reports"
                        / f"train-{datetime.now().strftime('%Y%m%d-%H%M%S')}-skipped.csv")
    report_skipped(data.rejected, skipped_path)
    train_idx, val_idx = subject_split(data.samples, val_fraction, seed)
    cfg = TrainConfig(width=width, epochs=epochs, batch_size=batch_size,
                      lr=lr if lr is not None else (FINETUNE_LR if init else SCRATCH_LR),
                      optimizer=optimizer or ("sgd" if init else "adam"), select_topk=select_topk, seed=seed,
                      device=str(torch_device), patience=patience)
    if state_path is None and output is not None:
        state_path = output.with_name(output.name + ".state")
    try:
        model, metrics = train_ensemble(data, class_names, preprocessor.regions, train_idx, val_idx, cfg, init=init,
                                        positive=0 if mode == "binary" else None, state_path=state_path)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if metrics["resumed_from"]:
        console.print(f"resumed after epoch {metrics['resumed_from']} from {state_path}")
    if metrics["stopped_early"]:
        console.print(f"stopped early after epoch {metrics['history'][-1]['epoch']} (patience {patience}); "
                      f"kept epoch {metrics['best_epoch']}")
    if identity:
        _add_identity_member(model, data, train_idx, val_idx, metrics, str(torch_device), seed)
    metrics["subjects_known"] = known
    metrics["data"] = {"path": str(data_dir), "hash": data_hash(data.samples), "images": len(data.samples),
                       "rejected": len(data.rejected), "validation_images": len(val_idx)}
    metrics["task"] = {"mode": mode, "init": str(init_path) if init_path else None,
                       **({"transfer_pairs": transfer_pairs} if init_path and transfer_pairs is not None else {}),
                       **({"positive": class_names[0]} if mode == "binary" else {})}
    _print_metrics(metrics, len(class_names))
    # What the model saw, so that evaluation can refuse leaked subjects and images.
    seen = [data.samples[i] for i in train_idx]
    extra = {"train_subjects": sorted({s.subject for s in seen}), "train_sha256": sorted({s.sha256 for s in seen}),
             "holdout_subjects": sorted({data.samples[i].subject for i in val_idx}), "mode": mode}
    extra.update(_validation_extra(model, data, val_idx, class_names, mode,
                                   binary_label_map(original_labels, positive) if mode == "binary" else None))
    if "temperature" in extra:
        console.print(f"calibration temperature {extra['temperature']:.3f} (fitted on the validation split)")
    if mode == "binary":
        console.print(f"operating threshold {extra['threshold']:.3f} on P({positive}) ({extra['threshold_source']})"
                      + (f"; on validation there: sensitivity {extra['val_sensitivity']:.3f}, specificity "
                         f"{extra['val_specificity']:.3f}" if "val_sensitivity" in extra else ""))
    if output:
        from shared.ml.gestalt import save_checkpoint

        output.write_bytes(save_checkpoint(model, class_names, metrics, extra))
        console.print(f"checkpoint written to {output}")
    if register:
        from shared.dispatch import wake_waiting_photos
        from shared.modelops.register import register_trained

        version = register_trained(model, class_names, metrics, name, activate, extra, base_set=(data, val_idx))
        console.print(f"registered model version {version.name} (id {version.id}, {version.status})")
        if activate:
            report_woken(wake_waiting_photos())
    if state_path is not None and state_path.exists():  # a finished run needs no resuming
        state_path.unlink()


def _add_identity_member(model, data, train_idx: list[int], val_idx: list[int], metrics: dict, device: str,
                         seed: int) -> None:
    from shared.ml.members import add_identity_member
    from shared.ml.weights import WeightsMissing

    try:
        member = add_identity_member(model, data, train_idx, val_idx, device, seed)
    except WeightsMissing as exc:
        raise click.ClickException(f"{exc}; or train without the identity member (--no-identity)") from exc
    metrics["members"] = {"identity": {"head": member.head.selection, **member.validation}}
    v = member.validation
    line = f"identity member: {member.head.selection['chosen']} head, weight {member.weight:.2f} in the aggregate"
    if "identity_top1" in v:
        line += (f" (validation top-1: identity {v['identity_top1']:.3f}, regions {v['regions_top1']:.3f}, "
                 f"combined {v['grid'][member.weight]:.3f})")
    console.print(line)


def _validation_extra(model, data, val_idx: list[int], class_names: list[str], mode: str,
                      label_map: dict[str, str] | None) -> dict:
    """What evaluation applies, fitted on the validation split: a temperature for calibrated scores and, for a
    binary model, its label mapping and the operating threshold (Youden's J on the calibrated scores)."""
    import numpy as np

    from shared.ml.evaluation import DEFAULT_THRESHOLD, apply_temperature, choose_threshold, fit_temperature
    from shared.ml.members import member_probs

    extra: dict = {}
    aggregate = labels = None
    if len(val_idx) >= 2:
        descriptors = data.descriptors[val_idx] if data.descriptors is not None else None
        _, probs, weights = member_probs(model, data.crops[val_idx], descriptors)
        labels = data.labels[val_idx]
        extra["temperature"] = fit_temperature(probs, labels, weights)
        extra["temperature_source"] = f"validation split, {len(val_idx)} images"
        aggregate = np.einsum("nrc,r->nc", apply_temperature(probs, extra["temperature"]), np.asarray(weights))
    if mode != "binary":
        return extra
    threshold, source = None, "the default 0.5: no validation split"
    if aggregate is not None:
        threshold = choose_threshold(aggregate[:, 0], labels == 0)
        source = (f"Youden's J on {len(val_idx)} validation images" if threshold is not None
                  else "the default 0.5: the validation split lacks a class")
        if threshold is not None:
            called, truth = aggregate[:, 0] >= threshold, labels == 0
            extra["val_sensitivity"] = float(called[truth].mean())
            extra["val_specificity"] = float((~called[~truth]).mean())
    return {**extra, "label_map": label_map or {}, "positive": class_names[0], "negative": class_names[1],
            "threshold": DEFAULT_THRESHOLD if threshold is None else threshold, "threshold_source": source}


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, path_type=Path),
              help="Identity-labelled photos, one folder per identity: DIR/<identity>/<image> (CASIA-WebFace "
                   "layout), or a manifest CSV with the identity as the label.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("pretrained.pt"),
              show_default=True, help="The checkpoint, rewritten after every epoch; an existing one is resumed.")
@click.option("--width", type=float, default=1.0, show_default=True, help="CASIA-Net channel multiplier.")
@click.option("--epochs", type=int, default=40, show_default=True, help="Epochs of Adam.")
@click.option("--sgd-epochs", type=int, default=10, show_default=True, help="Then epochs of SGD (momentum 0.9).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam's learning rate.")
@click.option("--sgd-lr", type=float, default=1e-4, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of each identity's images held out.")
@click.option("--regions", default=None, help="Comma-separated regions [default: the model's four].")
@click.option("--min-images", type=int, default=2, show_default=True,
              help="Skip identities with fewer usable images.")
@click.option("--augment/--no-augment", default=True, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@cache_options
@torch_options
def pretrain(data_dir: Path, output: Path, width: float, epochs: int, sgd_epochs: int, lr: float, sgd_lr: float,
             batch_size: int, val_fraction: float, regions: str | None, min_images: int, augment: bool,
             seed: int, threads: int | None, device: str | None, cache_dir: Path | None, no_cache: bool) -> None:
    """Pretrain the region nets on face identification, for `gestalt train --init`."""
    from collections import Counter

    import numpy as np

    from shared.ml.preprocess import Preprocessor
    from shared.ml.pretrain import PretrainConfig, summary_rows
    from shared.ml.pretrain import pretrain as run_pretrain
    from shared.ml.regions import DEFAULT_REGIONS, REGIONS
    from shared.ml.training import PreparedData, prepare

    settings, torch_device = torch_runtime(threads, device)
    samples = load_samples_or_fail(data_dir)
    identities = sorted({s.label for s in samples})
    console.print(f"{len(samples)} images, {len(identities)} identities")
    wanted = tuple(r.strip() for r in regions.split(",")) if regions else DEFAULT_REGIONS
    unknown = [r for r in wanted if r not in REGIONS]
    if unknown:
        raise click.ClickException(f"unknown region(s) {', '.join(unknown)}; known: {', '.join(REGIONS)}")
    preprocessor = Preprocessor.from_settings(settings, wanted)
    cache = prep_cache(settings, preprocessor, cache_dir, no_cache)
    try:
        data = prepare(samples, identities, preprocessor, cache=cache)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    cache_note(cache)
    report_skipped(data.rejected, output.parent / f"{output.stem}-skipped.csv")
    counts = Counter(s.label for s in data.samples)
    kept = sorted(label for label, n in counts.items() if n >= min_images)
    if len(kept) < 2:
        raise click.ClickException(f"fewer than two identities with {min_images} or more usable images")
    if len(kept) < len(counts):
        console.print(f"{len(counts) - len(kept)} identities with fewer than {min_images} usable images skipped")
    index = {name: i for i, name in enumerate(kept)}
    rows = [i for i, s in enumerate(data.samples) if s.label in index]
    data = PreparedData(data.crops[rows], np.asarray([index[data.samples[i].label] for i in rows], np.int64),
                        [data.samples[i] for i in rows])
    cfg = PretrainConfig(width=width, epochs=epochs, sgd_epochs=sgd_epochs, batch_size=batch_size, lr=lr,
                         sgd_lr=sgd_lr, val_fraction=val_fraction, augment=augment, seed=seed)
    try:
        _, metrics = run_pretrain(data, kept, preprocessor.regions, cfg, output,
                                  device=str(torch_device))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if metrics["resumed_from"]:
        console.print(f"resumed from epoch {metrics['resumed_from']} of {cfg.total_epochs}")
    table = Table(title=f"held-out identity accuracy ({metrics.get('validation', {}).get('n', 0)} images, "
                        f"{len(kept)} identities)")
    table.add_column("region")
    table.add_column("top1", justify="right")
    for region, top1 in summary_rows(metrics):
        table.add_row(region, f"{top1:.3f}")
    console.print(table)
    console.print(f"pretrained checkpoint written to {output}")


def _print_metrics(metrics: dict, n_classes: int) -> None:
    val = metrics.get("validation")
    if not val:
        console.print("no validation split (every label has one subject)")
        return
    table = Table(title=f"validation ({val['n']} images, {val['subjects']} subjects)")
    table.add_column("region")
    # Top-k for k >= the number of classes is 100% by construction: not shown (two classes: top-1 only).
    ks = [k for k in val["aggregate"] if k == "top1" or int(k.removeprefix("top")) < n_classes]
    for k in ks:
        table.add_column(k, justify="right")
    for region, row in [*val["regions"].items(), ("aggregate", val["aggregate"])]:
        table.add_row(region, *(f"{row[k]:.3f}" for k in ks))
    console.print(table)
    if "binary" in val:
        b = val["binary"]
        console.print(f"binary: sensitivity {b['sensitivity']:.3f} ({b['n_positive']} positive), "
                      f"specificity {b['specificity']:.3f} ({b['n_negative']} negative)")
