"""``gestalt stats``: significance tests and confidence intervals on results."""
from __future__ import annotations

from pathlib import Path

import click


@click.group()
def stats() -> None:
    """Quick statistics for comparing published figures."""


@stats.command("proportion-test")
@click.option("--k1", type=float, required=True, help="Correct answers of the first method (may be fractional).")
@click.option("--n1", type=int, required=True)
@click.option("--p2", type=float, required=True, help="The baseline's accuracy, 0-1.")
@click.option("--n2", type=int, required=True)
def stats_proportion(k1: float, n1: int, p2: float, n2: int) -> None:
    """Two-sided two-proportion z-test: prints z and p."""
    from shared.ml.evaluate.statistics import two_proportion_ztest

    try:
        result = two_proportion_ztest(k1, n1, p2, n2)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"z={result.z:.4f} p={result.p:.4g}")


@stats.command("bootstrap-ci")
@click.option("--k", type=int, required=True, help="Correct answers.")
@click.option("--n", type=int, required=True, help="Total.")
@click.option("--resamples", type=int, default=10_000, show_default=True,
              help="Unused: the interval is exact (kept for scripts that pass it).")
@click.option("--seed", type=int, default=0, show_default=True, help="Unused, as --resamples.")
def stats_bootstrap(k: int, n: int, resamples: int, seed: int) -> None:
    """Accuracy k/n with its 95% percentile-bootstrap CI, in percent.

    The bootstrap distribution of k/n is exactly Binomial(n, k/n) / n; its 2.5 and 97.5
    percentiles are computed exactly (no resampling), so the result does not depend on a seed.
    """
    from shared.ml.evaluate.statistics import bootstrap_ci_counts

    try:
        est = bootstrap_ci_counts(k, n, resamples, seed)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"accuracy={100 * est.value:.2f}% ci95=[{100 * est.low:.2f}%, {100 * est.high:.2f}%]")


@stats.command("permutation")
@click.option("--predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="predictions.csv of `gestalt evaluate`; or a CSV with a 'label' column (class index or name) and "
                   "one score column per class; or .npz with arrays 'probs' (N x C) and 'labels' (N).")
@click.option("--k", type=int, default=1, show_default=True)
@click.option("--permutations", type=int, default=100_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def stats_permutation(predictions: Path, k: int, permutations: int, seed: int) -> None:
    """Permutation-test p-value of top-k accuracy against chance."""
    import numpy as np

    from shared.ml.evaluate.statistics import permutation_pvalue, topk_hits

    probs, labels = _read_predictions(predictions)
    p = permutation_pvalue(probs, labels, k, permutations, seed)
    click.echo(f"top{k}={float(np.mean(topk_hits(probs, labels, k))):.4f} p={p:.4g}")


def _read_predictions(path: Path):
    """Scores N x C and labels N from .npz, `gestalt evaluate`'s predictions.csv (``score:<class>`` columns)
    or a plain CSV (``label`` and one column per class)."""
    import numpy as np

    if path.suffix == ".npz":
        with np.load(path) as npz:
            return npz["probs"], npz["labels"].astype(int)
    fields, rows = _read_csv(path)
    if "label" not in fields:
        raise click.ClickException(f"{path} needs a 'label' column and one score column per class")
    scored = [c for c in fields if c.startswith("score:")]
    columns = scored or [c for c in fields if c != "label"]
    classes = [c.removeprefix("score:") for c in columns] if scored else columns
    try:
        probs = np.array([[float(r[c]) for c in columns] for r in rows])
    except ValueError as exc:
        raise click.ClickException(f"{path}: a score is not a number ({exc})") from exc
    index = {c: i for i, c in enumerate(classes)}
    try:
        labels = np.array([index[r["label"]] if r["label"] in index else int(r["label"]) for r in rows])
    except ValueError as exc:
        raise click.ClickException(f"labels must be class names ({', '.join(classes)}) or indices") from exc
    return probs, labels


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    import csv

    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in reader.fieldnames or []]
        reader.fieldnames = fields
        rows = list(reader)
    if not rows:
        raise click.ClickException(f"{path} has no rows")
    return fields, rows


def _read_calls(path: Path) -> dict[str, bool]:
    """Image -> whether the model's call was right, from `gestalt evaluate`'s predictions.csv."""
    fields, rows = _read_csv(path)
    if "image" not in fields or "correct" not in fields:
        raise click.ClickException(f"{path}: not a predictions.csv of `gestalt evaluate` "
                                   "(it needs 'image' and 'correct' columns)")
    calls = {r["image"]: r["correct"].strip() in ("1", "true", "True") for r in rows}
    if len(calls) != len(rows):
        raise click.ClickException(f"{path}: an image is listed twice")
    return calls


@stats.command("mcnemar")
@click.argument("first", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("second", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--exact/--chi2", default=True, show_default=True,
              help="Exact binomial test on the discordant images, or the chi-square form with continuity correction.")
def stats_mcnemar(first: Path, second: Path, exact: bool) -> None:
    """McNemar's paired test of two models on the same images (two predictions.csv of `gestalt evaluate`).

    Compares whether each model's call was right, image by image: only the images one model got
    right and the other wrong count. Both files must list the same images.
    """
    import numpy as np

    from shared.ml.evaluate.statistics import mcnemar_test

    a, b = _read_calls(first), _read_calls(second)
    if set(a) != set(b):
        only_a, only_b = len(set(a) - set(b)), len(set(b) - set(a))
        raise click.ClickException(f"the files must list the same images: {only_a} only in {first}, "
                                   f"{only_b} only in {second}")
    images = sorted(a)
    r = mcnemar_test(np.array([a[i] for i in images]), np.array([b[i] for i in images]), exact=exact)
    click.echo(f"images={r.n} A_right={r.both_right + r.only_a} B_right={r.both_right + r.only_b} "
               f"both_right={r.both_right} only_A={r.only_a} only_B={r.only_b} both_wrong={r.both_wrong}")
    click.echo(f"mcnemar {'exact' if exact else 'chi2'} statistic={r.statistic:.4g} p={r.p:.4g}")
