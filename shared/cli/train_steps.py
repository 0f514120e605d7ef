"""The steps of ``gestalt train`` between reading its options and registering the model, and the
preprocessing that ``gestalt pretrain`` shares.

Each step prints what it did and turns a library error into a one-line CLI error.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import click

from shared.cli.common import cache_note, console, decode_limits, load_samples_or_fail, prep_cache, report_woken


class Task(NamedTuple):
    """The photos to train on and the model's classes, as the mode chose them."""

    samples: list
    class_names: list[str]
    subjects_known: bool  # False for the flat layout: every photo is its own subject
    original_labels: set[str]  # the labels before a binary mode mapped them


def apply_preset(preset: str | None, width: float | None, epochs: int | None,
                 batch_size: int | None) -> tuple[float, int, int]:
    """Width, epochs and batch size: the options given, the preset's values for the others."""
    from shared.ml.train.recipe import PRESETS

    recipe = PRESETS[preset or "paper"]
    width = recipe["width"] if width is None else width
    epochs = recipe["epochs"] if epochs is None else epochs
    batch_size = recipe["batch_size"] if batch_size is None else batch_size
    if preset:
        console.print(f"preset {preset}: width {width}, {epochs} epochs, batch size {batch_size}")
    return width, epochs, batch_size


def load_task(data_dir: Path, exclude: tuple[str, ...], mode: str, positive: str | None,
              classes: str | None) -> Task:
    """The labelled photos of ``data_dir`` (less ``exclude``) and the classes of ``mode``; warns of a flat layout."""
    from shared.ml.train.data import subjects_known
    from shared.ml.train.modes import select_task

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
    return Task(samples, class_names, known, original_labels)


def check_catalogue_labels(class_names: list[str]) -> None:
    """Fail now, not after training, on labels that are unknown catalogue IDs (nothing is written)."""
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


def load_init(init_path: Path, n_classes: int, transfer_pairs: int | None, seed: int):
    """The pretrained checkpoint to fine-tune, with new final layers for ``n_classes`` seeded by ``seed``."""
    from shared.ml.train.loop import load_pretrained
    from shared.ml.train.recipe import seed_everything

    seed_everything(seed)  # the new final layers' initial weights
    try:
        return load_pretrained(init_path.read_bytes(), n_classes, transfer_pairs=transfer_pairs)
    except ValueError as exc:
        raise click.ClickException(f"{init_path}: {exc}") from exc


def prepare_or_fail(settings, preprocessor, samples: list, labels: list[str], cache_dir: Path | None,
                    no_cache: bool):
    """Preprocess ``samples`` into crops (through the preprocessing cache unless --no-cache) and say how
    many photos the cache served; a library ValueError (e.g. no usable photo) is a one-line error."""
    from shared.ml.train.prepared import prepare

    cache = prep_cache(settings, preprocessor, cache_dir, no_cache)
    try:
        data = prepare(samples, labels, preprocessor, cache=cache, **decode_limits(settings))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    cache_note(cache)
    return data


def default_skipped_path(output: Path | None, settings) -> Path:
    """<output>-skipped.csv beside --output, else $GESTALT_DATA_DIR/reports/train-<time>-skipped.csv."""
    from datetime import datetime

    return (output.parent / f"{output.stem}-skipped.csv" if output else settings.data_dir / "reports"
            / f"train-{datetime.now().strftime('%Y%m%d-%H%M%S')}-skipped.csv")


class CasiaOptions(NamedTuple):
    """The options of ``gestalt train`` that shape the CASIA-Nets' training (``--backbone casia``)."""

    preset: str | None
    width: float | None
    epochs: int | None
    batch_size: int | None
    lr: float | None
    optimizer: str | None
    select_topk: int
    patience: int
    seed: int


def load_encoder_or_fail(device: str):
    """The identity encoder as the members' ``encode`` function; a missing weight file is a one-line error."""
    from shared.ml.formats.weights import WeightsMissing
    from shared.ml.train.members import encoder_fn

    try:
        return encoder_fn(device)
    except WeightsMissing as exc:
        raise click.ClickException(f"{exc}; or train --backbone casia --no-identity") from exc


def finetune_config(choice: str | None, preset: str | None, epochs: int | None, seed: int):
    """The fine-tuning of the encoder's regional members (None: the encoder stays frozen): ``--finetune``, by default
    auto except with ``--preset cpu-small``; at most ``--epochs`` epochs per region, else the preset's (cpu-small: 4,
    paper: 6)."""
    from shared.ml.train.finetune import FinetuneConfig

    if (choice or ("off" if preset == "cpu-small" else "auto")) == "off":
        return None
    return FinetuneConfig(epochs=epochs or (4 if preset == "cpu-small" else 6), seed=seed, progress=True)


def fit_encoder_or_fail(data, class_names: list[str], train_idx: list[int], val_idx: list[int], encode, seed: int,
                        finetune=None):
    """The encoder backbone's members (a head per region's cut and on the face chip, regions fine-tuned where it
    pays) and their stack; prints which regions were fine-tuned and why."""
    from shared.ml.nets.encoder import CONVERTED_SHA256
    from shared.ml.train.members import fit_encoder_model

    try:
        model, fitted = fit_encoder_model(data, class_names, train_idx, val_idx, encode, CONVERTED_SHA256, seed=seed,
                                          finetune=finetune)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    report = fitted["finetune"]
    if report is not None:
        for region, row in report.get("regions", {}).items():
            console.print(f"{region}: {'fine-tuned' if row['fine_tuned'] else 'frozen encoder'} (held-out log-loss "
                          f"{row['tuned']['log_loss']:.3f} tuned against {row['frozen']['log_loss']:.3f} frozen, "
                          f"{len(row['epochs'])} epochs)")
        if report.get("skipped"):
            console.print(f"no fine-tuning: {report['skipped']}")
    return model, {"train": {"n": len(train_idx), "subjects": len({data.samples[i].subject for i in train_idx})},
                   "heads": fitted["heads"], "finetune": report}


def train_casia(data, class_names: list[str], regions, train_idx: list[int], val_idx: list[int], opts: CasiaOptions,
                init, mode: str, state_path: Path | None, encode, identity: bool, device: str):
    """Train the regional CASIA-Nets (saying when it resumed from ``state_path`` or stopped early), then add the
    identity member and fit the stack on the validation split."""
    from shared.ml.nets.encoder import CONVERTED_SHA256
    from shared.ml.train.loop import train_ensemble
    from shared.ml.train.members import fit_casia_model
    from shared.ml.train.recipe import FINETUNE_LR, SCRATCH_LR, TrainConfig

    width, epochs, batch_size = apply_preset(opts.preset, opts.width, opts.epochs, opts.batch_size)
    width = init.width if init is not None else width
    cfg = TrainConfig(width=width, epochs=epochs, batch_size=batch_size,
                      lr=opts.lr if opts.lr is not None else (FINETUNE_LR if init else SCRATCH_LR),
                      optimizer=opts.optimizer or ("sgd" if init else "adam"), select_topk=opts.select_topk,
                      seed=opts.seed, device=device, patience=opts.patience)
    try:
        net, metrics = train_ensemble(data, class_names, regions, train_idx, val_idx, cfg, init=init,
                                      positive=0 if mode == "binary" else None, state_path=state_path)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if metrics["resumed_from"]:
        console.print(f"resumed after epoch {metrics['resumed_from']} from {state_path}")
    if metrics["stopped_early"]:
        console.print(f"stopped early after epoch {metrics['history'][-1]['epoch']} (patience {cfg.patience}); "
                      f"kept epoch {metrics['best_epoch']}")
    model = fit_casia_model(net, data, class_names, train_idx, val_idx, encode, CONVERTED_SHA256 if identity else "",
                            identity, opts.seed)
    return model, metrics


def report_members(model, data, val_idx: list[int], encode, metrics: dict, mode: str) -> None:
    """Every member and the aggregate on the validation split, with each member's weight (printed, and kept in
    ``metrics["members"]`` and ``metrics["validation"]``)."""
    from shared.ml.train.loop import prediction_metrics
    from shared.ml.train.members import member_report, score_data

    metrics["stack"] = {k: v for k, v in model.stack.fit.items()}
    metrics["weights"] = model.stack.share_of()
    if not len(val_idx):
        console.print("no validation split (every label has one subject): members weighted "
                      + ", ".join(f"{n} {w:.2f}" for n, w in metrics["weights"].items()))
        return
    pred = score_data(model, data, val_idx, encode)
    labels = data.labels[val_idx]
    metrics["members"] = member_report(model, pred, labels)
    metrics["validation"] = {**prediction_metrics(pred.names, pred.member_probs, pred.aggregate, labels,
                                                  positive=0 if mode == "binary" else None),
                             "subjects": len({data.samples[i].subject for i in val_idx})}
    print_members(metrics, model.num_classes)


def print_members(metrics: dict, n_classes: int) -> None:
    """The validation table: each member's weight and top-k (top-1 with its 95% interval), then the aggregate's.
    Top-k for k at or above the number of classes is 100% by construction and not shown."""
    from rich.table import Table

    val, members = metrics["validation"], metrics.get("members") or {}
    ks = [k for k in val["aggregate"] if k == "top1" or int(k.removeprefix("top")) < n_classes]
    table = Table(title=f"validation ({val['n']} images, {val['subjects']} subjects): each member and the aggregate")
    for column in ("member", "weight", *ks, "top1 95% CI"):
        table.add_column(column, justify="left" if column == "member" else "right")
    for name, row in [*val["regions"].items(), ("aggregate", val["aggregate"])]:
        ci = (members.get(name) or {}).get("top1") or {}
        weight = "" if name == "aggregate" else f"{metrics.get('weights', {}).get(name, 0.0):.2f}"
        table.add_row(name, weight, *(f"{row[k]:.3f}" for k in ks),
                      f"{ci['low']:.3f}-{ci['high']:.3f}" if ci else "")
    console.print(table)
    if "binary" in val:
        b = val["binary"]
        console.print(f"binary: sensitivity {b['sensitivity']:.3f} ({b['n_positive']} positive), "
                      f"specificity {b['specificity']:.3f} ({b['n_negative']} negative)")


def model_extra(model, data, train_idx: list[int], val_idx: list[int], task: Task, mode: str,
                positive: str | None, encode) -> dict:
    """What the checkpoint stores beside the weights: what the model saw (so that evaluation can refuse
    leaked subjects and images) and what evaluation applies, fitted on the validation split."""
    from shared.ml.train.modes import binary_label_map

    seen = [data.samples[i] for i in train_idx]
    extra = {"train_subjects": sorted({s.subject for s in seen}), "train_sha256": sorted({s.sha256 for s in seen}),
             "holdout_subjects": sorted({data.samples[i].subject for i in val_idx}), "mode": mode}
    extra.update(validation_extra(model, data, val_idx, task.class_names, mode,
                                  binary_label_map(task.original_labels, positive) if mode == "binary" else None,
                                  encode))
    if "temperature" in extra:
        console.print(f"calibration temperature {extra['temperature']:.3f} (fitted on the validation split)")
    if mode == "binary":
        console.print(f"operating threshold {extra['threshold']:.3f} on P({positive}) ({extra['threshold_source']})"
                      + (f"; on validation there: sensitivity {extra['val_sensitivity']:.3f}, specificity "
                         f"{extra['val_specificity']:.3f}" if "val_sensitivity" in extra else ""))
    return extra


def validation_extra(model, data, val_idx: list[int], class_names: list[str], mode: str,
                     label_map: dict[str, str] | None, encode) -> dict:
    """What evaluation applies, fitted on the validation split: a temperature for calibrated scores and, for a
    binary model, its label mapping and the operating threshold (Youden's J on the calibrated scores)."""
    from shared.ml.evaluate.statistics import DEFAULT_THRESHOLD, apply_temperature, choose_threshold, fit_temperature
    from shared.ml.train.members import score_data

    extra: dict = {}
    aggregate = labels = None
    if len(val_idx) >= 2:
        probs = score_data(model, data, val_idx, encode).aggregate[:, None]  # the aggregate, calibrated as one
        labels = data.labels[val_idx]
        extra["temperature"] = fit_temperature(probs, labels)
        extra["temperature_source"] = f"validation split, {len(val_idx)} images"
        aggregate = apply_temperature(probs, extra["temperature"])[:, 0]
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


def register_model(model, class_names: list[str], metrics: dict, name: str | None, activate: bool, extra: dict,
                   data, val_idx: list[int]) -> None:
    """Register the model version (the validation split is its base set); with --activate, wake waiting photos."""
    from shared.dispatch import wake_waiting_photos
    from shared.modelops.register import register_trained

    version = register_trained(model, metrics, name, activate, extra, base_set=(data, val_idx))
    console.print(f"registered model version {version.name} (id {version.id}, {version.status})")
    if activate:
        report_woken(wake_waiting_photos())
