"""``gestalt evaluate`` (test sets, reports, leakage checks) and ``gestalt heads-benchmark``."""
from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from shared.cli.common import (
    cache_note,
    cache_options,
    console,
    decode_limits,
    load_samples_or_fail,
    prep_cache,
    report_skipped,
    torch_options,
    torch_runtime,
)
from shared.cli.train_steps import load_encoder_or_fail


def _load_model(ref: str, device=None):
    """A checkpoint file, or a registered model version (name or id). Returns (model, state, name)."""
    from shared.ml.train.checkpoint import load_checkpoint

    device = device or "cpu"
    path = Path(ref)
    if path.is_file():
        model, state = load_checkpoint(path.read_bytes(), device)
        return model, state, path.stem
    from shared.db import session_scope
    from shared.modelops import registry
    from shared.storage import get_storage

    try:
        with session_scope() as session:
            version = registry.find_version(session, ref)
            key, name = version.checkpoint_key, version.name
    except registry.ModelNotFound as exc:
        raise click.ClickException(f"{exc} (and no checkpoint file {ref})") from exc
    model, state = load_checkpoint(get_storage().get(key), device)
    return model, state, name


def _parse_data_sets(values: tuple[str, ...]) -> list[tuple[str, Path]]:
    """``PATH`` or ``NAME=PATH`` per --data; names default to the folder or file name, made unique."""
    sets: list[tuple[str, Path]] = []
    for value in values:
        name, sep, rest = value.partition("=")
        path = Path(rest if sep and not Path(value).exists() else value)
        if not sep or Path(value).exists():
            name = path.stem or path.name
        if not path.exists():
            raise click.ClickException(f"--data {value}: {path} does not exist")
        if not name or "/" in name:
            raise click.ClickException(f"--data {value}: a set name must be non-empty and have no '/'")
        taken = {n for n, _ in sets}
        base, i = name, 2
        while name in taken:
            name, i = f"{base}-{i}", i + 1
        sets.append((name, path))
    return sets


@click.command()
@click.option("--model", "model_ref", required=True, help="Model version (name or id) or a checkpoint file.")
@click.option("--data", "data_paths", required=True, multiple=True,
              help="Test photos: a labelled folder or a manifest CSV (image,subject,label). Repeat it to evaluate "
                   "several test sets side by side, each as PATH or NAME=PATH.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder (default: reports/<model>-<time>); with several --data, one subfolder per set.")
@click.option("--baseline-accuracy", type=float, default=None, help="A published top-1 accuracy (0-1) to test against.")
@click.option("--baseline-n", type=int, default=None, help="Images behind the baseline (default: the test size).")
@click.option("--positive", default=None,
              help="Two-class models: the positive class [default: a binary model's own positive label].")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Two-class models: call positive at P(positive) >= this [default: the threshold the checkpoint "
                   "chose on validation data, else 0.5].")
@click.option("--prevalence", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Two-class models: also report PPV and NPV at this prevalence (e.g. 0.001 for screening).")
@click.option("--resamples", type=int, default=10_000, show_default=True, help="Bootstrap resamples.")
@click.option("--permutations", type=int, default=100_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--allow-leakage", is_flag=True, help="Report even if test subjects or images were trained on.")
@click.option("--temperature/--no-temperature", "use_temperature", default=True, show_default=True,
              help="Apply the calibration temperature the checkpoint stores (fitted on validation data at training "
                   "time); --no-temperature scores as the workers do.")
@cache_options
@torch_options
def evaluate(model_ref: str, data_paths: tuple[str, ...], out: Path | None, baseline_accuracy: float | None,
             baseline_n: int | None, positive: str | None, threshold: float | None, prevalence: float | None,
             resamples: int, permutations: int, seed: int, allow_leakage: bool, use_temperature: bool,
             threads: int | None, device: str | None, cache_dir: Path | None, no_cache: bool) -> None:
    """Evaluate a model on labelled photos and write a report folder (md, html, json, predictions.csv, plots).

    Test labels are mapped as in training (a binary model's other labels become `others`).
    Skipped photos are counted by reason; the list is in skipped.csv.
    """
    from datetime import datetime

    from shared.ml.evaluate.text import headline

    sets = _parse_data_sets(data_paths)
    settings, torch_device = torch_runtime(threads, device)
    model, state, name = _load_model(model_ref, torch_device)
    class_names = state["class_names"]
    extra = state.get("extra") or {}
    if len(class_names) == 2:
        positive = positive or extra.get("positive") or class_names[0]
        if positive not in class_names:
            raise click.ClickException(f"--positive {positive}: the model's classes are {', '.join(class_names)}")
        if threshold is None and extra.get("threshold") is not None:
            threshold, source = float(extra["threshold"]), str(extra.get("threshold_source", "from the checkpoint"))
            if positive != class_names[0] and extra.get("positive") == class_names[0]:
                raise click.ClickException(f"the checkpoint's threshold is for {class_names[0]}; "
                                           "give --threshold for the other class")
        elif threshold is not None:
            source = "given with --threshold"
        else:
            source = ""
    elif positive or threshold is not None or prevalence is not None:
        raise click.ClickException("--positive, --threshold and --prevalence apply to two-class models only")
    else:
        source = ""
    from shared.ml.preprocess.pipeline import Preprocessor

    preprocessor = Preprocessor.from_settings(settings, model.regions)
    cache = prep_cache(settings, preprocessor, cache_dir, no_cache)
    encode = load_encoder_or_fail(str(torch_device)) if model.needs_encoder else None
    out = out or Path("reports") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    results = {}
    for set_name, path in sets:
        target = out / set_name if len(sets) > 1 else out
        results[set_name] = _evaluate_set(model, state, name, path, target, preprocessor, positive=positive,
                                          threshold=threshold, threshold_source=source, prevalence=prevalence,
                                          baseline_accuracy=baseline_accuracy, baseline_n=baseline_n,
                                          resamples=resamples, permutations=permutations, seed=seed,
                                          allow_leakage=allow_leakage, use_temperature=use_temperature,
                                          cache=cache, encode=encode, limits=decode_limits(settings))
        for line in headline(results[set_name]):
            click.echo(f"[{set_name}] {line}" if len(sets) > 1 else line)
    if len(sets) > 1:
        from shared.ml.evaluate.summary import write_comparison

        write_comparison(name, {n: (p, results[n]) for n, p in sets}, out)
        console.print(f"comparison written to {out}/report.html; each set's report in its subfolder")
    else:
        console.print(f"report written to {out}/report.html")


def _heatmap_for(model, data, encoder):
    """(image index, class index) -> the aligned face with that class's saliency, every member's map weighted as the
    model weighs the member (:func:`shared.ml.explain.saliency.weighted_map`)."""
    import numpy as np

    from shared.ml.explain.saliency import chip_placement, overlay, weighted_map

    def render(i: int, class_index: int):
        rgb = np.repeat(data.aligned[i][..., None], 3, axis=2)
        placed = chip_placement(data.landmarks[i], model.contract) if data.landmarks is not None else None
        net = encoder.net if encoder is not None else None
        return overlay(rgb, weighted_map(model, data.stored_crops([i]), class_index, net, placed))

    return render


def _evaluate_set(model, state: dict, name: str, data_path: Path, out: Path, preprocessor, **opts) -> dict:
    """One test set's report; returns its metrics."""
    import numpy as np

    from shared.ml.evaluate import EvalInput, write_report
    from shared.ml.evaluate.statistics import apply_temperature
    from shared.ml.preprocess.quality import turned_faces
    from shared.ml.train import apply_label_map, data_hash, prepare
    from shared.ml.train.members import score_data
    from shared.ml.train.splits import LeakageError, check_leakage

    class_names = state["class_names"]
    extra = state.get("extra") or {}
    original = load_samples_or_fail(data_path)
    samples, applied = apply_label_map(original, class_names, extra)
    originals = {id(m): o.label for m, o in zip(samples, original, strict=True)}
    if "train_subjects" in extra:
        try:
            check_leakage(extra["train_subjects"], extra.get("train_sha256", []),
                          {s.subject for s in samples}, {s.sha256 for s in samples})
            split = "test data checked disjoint from the model's training subjects and images"
        except LeakageError as exc:
            if not opts["allow_leakage"]:
                raise click.ClickException(f"{data_path}: {exc}") from exc
            split = f"LEAKAGE ALLOWED: {exc}"
    else:
        split = "unknown: the checkpoint does not record its training set"
    try:
        cache = opts.get("cache")
        before = (cache.hits, cache.misses) if cache is not None else (0, 0)
        data = prepare(samples, class_names, preprocessor, keep_aligned=True, cache=cache, **opts["limits"])
    except ValueError as exc:
        raise click.ClickException(f"{data_path}: {exc}") from exc
    cache_note(cache, before)
    report_skipped(data.rejected, None)
    if len(data.samples) < 2:
        reasons = "; ".join(f"{s.path.name}: {reason}" for s, reason in data.rejected[:5])
        raise click.ClickException(f"only {len(data.samples)} usable photo(s) to evaluate; at least 2 are needed "
                                   f"({len(data.rejected)} rejected: {reasons})")
    # Every member's scores, their weights and the aggregate (calibrated as the model was, on its validation split).
    pred = score_data(model, data, np.arange(len(data.samples)), opts["encode"])
    temperature = extra.get("temperature") if opts["use_temperature"] else None
    aggregate = apply_temperature(pred.aggregate[:, None], float(temperature))[:, 0] if temperature else pred.aggregate
    shares = model.stack.share_of()
    metrics = write_report(EvalInput(
        model_name=name, class_names=class_names, regions=list(pred.names), region_probs=pred.member_probs,
        member_weights=[shares.get(n, 0.0) for n in pred.names], aggregate_probs=aggregate, ood=pred.ood,
        turned=turned_faces(data.landmarks),  # flagged "turned face: less reliable"
        labels=data.labels, subjects=[s.subject for s in data.samples], data_source=str(data_path),
        data_hash=data_hash(data.samples), split=split, rejected=[(str(s.path), r) for s, r in data.rejected],
        aligned=data.aligned, baseline_accuracy=opts["baseline_accuracy"], baseline_n=opts["baseline_n"],
        positive=opts["positive"], resamples=opts["resamples"], permutations=opts["permutations"], seed=opts["seed"],
        images=[str(s.path) for s in data.samples], original_labels=[originals[id(s)] for s in data.samples],
        label_map=applied, threshold=opts["threshold"], threshold_source=opts["threshold_source"],
        prevalence=opts["prevalence"], preprocessing=preprocessor.provenance,
        temperature=float(temperature) if temperature else None,
        heatmap=_heatmap_for(model, data, opts["encode"])), out)
    if data.rejected:
        console.print(f"the skipped photos and their reasons: {out}/skipped.csv")
    return metrics


@click.command("heads-benchmark")
@click.option("--embeddings", "path", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Pickle {disorder: {subject: {image: vector}}} (e.g. mini_gm_public_v0.1.p).")
@click.option("--model", "model_ref", default=None,
              help="Instead: a registered model version (name or id); its training set's features and identity "
                   "descriptors, with every member of the ensemble and the aggregate reported separately.")
@click.option("--folds", type=int, default=5, show_default=True, help="Subject-disjoint folds.")
def heads_benchmark(path: Path | None, model_ref: str | None, folds: int) -> None:
    """Our heads, gallery matching and scikit-learn baselines on feature vectors (per-image, out of fold).

    The last line is `top1=<per-image top-1 of our heads>` (with --model: of the aggregate).
    """
    import pickle

    import numpy as np

    from shared.ml.train.heads import benchmark_heads

    if (path is None) == (model_ref is None):
        raise click.ClickException("give exactly one of --embeddings and --model")
    if model_ref is not None:
        _members_benchmark(model_ref, folds)
        return

    with path.open("rb") as fh:
        raw = pickle.load(fh)  # noqa: S301  # nosec B301 - a features file the user names on the command line
    feats, labels, subjects = [], [], []
    classes = sorted(raw, key=str)
    for ci, disorder in enumerate(classes):
        for subject, images in raw[disorder].items():
            for vector in images.values():
                feats.append(np.asarray(vector, np.float32))
                labels.append(ci)
                subjects.append(f"{disorder}/{subject}")
    if len(set(subjects)) < folds:
        raise click.ClickException(f"{len(set(subjects))} subjects cannot make {folds} folds")
    results = benchmark_heads(np.stack(feats), np.asarray(labels), np.asarray(subjects), len(classes), folds)
    out = Console()
    table = Table(title=f"{len(feats)} images, {len(set(subjects))} subjects, {len(classes)} classes; "
                        f"{folds}-fold by subject, per image")
    for col in ("method", "top-1", "top-5", "macro top-1"):
        table.add_column(col, justify="left" if col == "method" else "right")
    names = {"heads": "heads (ours: softmax per region)", "gallery": "gallery (syndromes by nearest patient, cosine)",
             "logistic_regression": "logistic regression (scikit-learn)",
             "nearest_centroid": "nearest class centroid, cosine (scikit-learn)"}
    for key, name in names.items():
        r = results[key]
        table.add_row(name, f"{r['top1']:.3f}", f"{r['top5']:.3f}", f"{r['macro_top1']:.3f}")
    out.print(table)
    best = max(results["logistic_regression"]["top1"], results["nearest_centroid"]["top1"])
    out.print(f"heads vs best baseline: {results['heads']['top1'] - best:+.3f}")
    click.echo(f"top1={results['heads']['top1']:.4f}")


def _members_benchmark(model_ref: str, folds: int) -> None:
    """Every member of a registered model's ensemble, out of fold on its stored training set."""
    import numpy as np

    from shared.db import session_scope
    from shared.ml.train.heads import benchmark_members, load_feature_set
    from shared.modelops.registry import ModelNotFound, find_version
    from shared.storage import get_storage

    try:
        with session_scope() as session:
            version = find_version(session, model_ref)
            name, config = version.name, dict(version.config or {})
    except ModelNotFound as exc:
        raise click.ClickException(str(exc)) from exc
    if not config.get("base_features_key"):
        raise click.ClickException(f"model {name} has no stored training set; it was registered without one")
    base = load_feature_set(get_storage().get(config["base_features_key"]))
    if "identity" not in base:
        raise click.ClickException(f"model {name} has no identity member (trained with --no-identity or before "
                                   "the member existed); use --embeddings for its regional features")
    classes = sorted(set(base["labels"].tolist()))
    labels = np.array([classes.index(lab) for lab in base["labels"].tolist()])
    subjects = base["subjects"]
    if len(set(subjects.tolist())) < folds:
        raise click.ClickException(f"{len(set(subjects.tolist()))} subjects cannot make {folds} folds")
    result = benchmark_members(base["features"], base["identity"], labels, subjects, len(classes),
                               list(config.get("regions") or []), folds,
                               encoder_regions=config.get("backbone") == "encoder")
    table = Table(title=f"model {name}: {len(labels)} images, {len(set(subjects.tolist()))} subjects, "
                        f"{len(classes)} classes; {folds}-fold by subject, per image")
    for col in ("member", "top-1", "top-5", "macro top-1"):
        table.add_column(col, justify="left" if col == "member" else "right")
    for col in ("weight",):
        table.add_column(col, justify="right")
    rows = {**result["members"], "aggregate (stack, out of fold)": result["aggregate"]}
    for key, r in rows.items():
        weight = result["weights"].get(key)
        table.add_row("identity encoder (face chip)" if key == "identity" else key, f"{r['top1']:.3f}",
                      f"{r['top5']:.3f}", f"{r['macro_top1']:.3f}", "" if weight is None else f"{weight:.2f}")
    Console().print(table)
    click.echo(f"top1={result['aggregate']['top1']:.4f}")
