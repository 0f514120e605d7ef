"""The steps of ``gestalt train`` between reading its options and registering the model, and the
preprocessing that ``gestalt pretrain`` shares.

Each step prints what it did and turns a library error into a one-line CLI error.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import click

from shared.cli.common import cache_note, console, load_samples_or_fail, prep_cache, report_woken


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
        data = prepare(samples, labels, preprocessor, cache=cache)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    cache_note(cache)
    return data


def default_skipped_path(output: Path | None, settings) -> Path:
    """<output>-skipped.csv beside --output, else $GESTALT_DATA_DIR/reports/train-<time>-skipped.csv."""
    from datetime import datetime

    return (output.parent / f"{output.stem}-skipped.csv" if output else settings.data_dir / "reports"
            / f"train-{datetime.now().strftime('%Y%m%d-%H%M%S')}-skipped.csv")


def train_or_fail(data, class_names: list[str], regions, train_idx: list[int], val_idx: list[int], cfg, init,
                  mode: str, state_path: Path | None):
    """Train the regional ensemble; says when it resumed from ``state_path`` or stopped early."""
    from shared.ml.train.loop import train_ensemble

    try:
        model, metrics = train_ensemble(data, class_names, regions, train_idx, val_idx, cfg, init=init,
                                        positive=0 if mode == "binary" else None, state_path=state_path)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if metrics["resumed_from"]:
        console.print(f"resumed after epoch {metrics['resumed_from']} from {state_path}")
    if metrics["stopped_early"]:
        console.print(f"stopped early after epoch {metrics['history'][-1]['epoch']} (patience {cfg.patience}); "
                      f"kept epoch {metrics['best_epoch']}")
    return model, metrics


def add_identity_member(model, data, train_idx: list[int], val_idx: list[int], metrics: dict, device: str,
                        seed: int) -> None:
    from shared.ml.formats.weights import WeightsMissing
    from shared.ml.train.members import add_identity_member as add_member

    try:
        member = add_member(model, data, train_idx, val_idx, device, seed)
    except WeightsMissing as exc:
        raise click.ClickException(f"{exc}; or train without the identity member (--no-identity)") from exc
    metrics["members"] = {"identity": {"head": member.head.selection, **member.validation}}
    v = member.validation
    line = f"identity member: {member.head.selection['chosen']} head, weight {member.weight:.2f} in the aggregate"
    if "identity_top1" in v:
        line += (f" (validation top-1: identity {v['identity_top1']:.3f}, regions {v['regions_top1']:.3f}, "
                 f"combined {v['grid'][member.weight]:.3f})")
    console.print(line)


def model_extra(model, data, train_idx: list[int], val_idx: list[int], task: Task, mode: str,
                positive: str | None) -> dict:
    """What the checkpoint stores beside the weights: what the model saw (so that evaluation can refuse
    leaked subjects and images) and what evaluation applies, fitted on the validation split."""
    from shared.ml.train.modes import binary_label_map

    seen = [data.samples[i] for i in train_idx]
    extra = {"train_subjects": sorted({s.subject for s in seen}), "train_sha256": sorted({s.sha256 for s in seen}),
             "holdout_subjects": sorted({data.samples[i].subject for i in val_idx}), "mode": mode}
    extra.update(validation_extra(model, data, val_idx, task.class_names, mode,
                                  binary_label_map(task.original_labels, positive) if mode == "binary" else None))
    if "temperature" in extra:
        console.print(f"calibration temperature {extra['temperature']:.3f} (fitted on the validation split)")
    if mode == "binary":
        console.print(f"operating threshold {extra['threshold']:.3f} on P({positive}) ({extra['threshold_source']})"
                      + (f"; on validation there: sensitivity {extra['val_sensitivity']:.3f}, specificity "
                         f"{extra['val_specificity']:.3f}" if "val_sensitivity" in extra else ""))
    return extra


def validation_extra(model, data, val_idx: list[int], class_names: list[str], mode: str,
                     label_map: dict[str, str] | None) -> dict:
    """What evaluation applies, fitted on the validation split: a temperature for calibrated scores and, for a
    binary model, its label mapping and the operating threshold (Youden's J on the calibrated scores)."""
    import numpy as np

    from shared.ml.evaluate.statistics import DEFAULT_THRESHOLD, apply_temperature, choose_threshold, fit_temperature
    from shared.ml.train.members import member_probs

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


def register_model(model, class_names: list[str], metrics: dict, name: str | None, activate: bool, extra: dict,
                   data, val_idx: list[int]) -> None:
    """Register the model version (the validation split is its base set); with --activate, wake waiting photos."""
    from shared.dispatch import wake_waiting_photos
    from shared.modelops.register import register_trained

    version = register_trained(model, class_names, metrics, name, activate, extra, base_set=(data, val_idx))
    console.print(f"registered model version {version.name} (id {version.id}, {version.status})")
    if activate:
        report_woken(wake_waiting_photos())
