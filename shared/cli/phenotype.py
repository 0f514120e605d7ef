"""``gestalt evaluate-phenotype``: face only, phenotype only and joint ranking on simulated patients."""
from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console

console = Console(stderr=True)


@click.command("evaluate-phenotype")
@click.option("--embeddings", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Facial features by disorder and subject (a mini_gm-style pickle: disorder -> subject -> "
                   "image -> vector); cross-validated heads on them give the simulated patients' facial scores.")
@click.option("--train", "n_train", type=click.IntRange(20, 100_000), default=400, show_default=True,
              help="Simulated patients per noise level that fit the joint combination.")
@click.option("--eval", "n_eval", type=click.IntRange(20, 100_000), default=400, show_default=True,
              help="Simulated patients per noise level that are ranked (disjoint subjects).")
@click.option("--other-fraction", type=click.FloatRange(0, 0.9), default=0.5, show_default=True,
              help="Share of patients whose syndrome has no facial model.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table (markdown) here, and the rows and fitted weights beside it as JSON.")
@click.option("--install", is_flag=True,
              help="Install the fitted joint combination: the case pages rank face and phenotype with it.")
def evaluate_phenotype(embeddings: Path, n_train: int, n_eval: int, other_fraction: float, seed: int,
                       out: Path | None, install: bool) -> None:
    """Top-1/top-10 with 95% CIs of face only, phenotype only and joint, at every noise level (Köhler et al.
    2009: terms sampled from a syndrome's annotations, made imprecise and noisy)."""
    from shared.ml.phenotype.evaluation import evaluate_simulation, format_table

    result = evaluate_simulation(embeddings, n_train=n_train, n_eval=n_eval, seed=seed, other_fraction=other_fraction,
                                 progress=lambda message: console.print(message))
    table = format_table(result)
    click.echo(table)
    if out:
        out.write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        console.print(f"written to {out} and {out.with_suffix('.json')}")
    if install:
        from shared.audit import audit
        from shared.db import session_scope
        from shared.storage import PHENOTYPE_COMBINER_KEY, get_storage

        combiner = dict(result["combiner"])
        joint = {r["level"]: round(r["top1"], 4) for r in result["rows"]
                 if r["method"] == "joint" and r["cohort"] == "facial" and "top1" in r}
        combiner["meta"] = {**combiner.get("meta", {}), "embeddings": embeddings.name, "simulated_top1": joint}
        get_storage().put(PHENOTYPE_COMBINER_KEY, json.dumps(combiner).encode(), "application/json")
        with session_scope() as session:
            audit(session, "phenotype_combiner_install", None, via="cli", embeddings=embeddings.name,
                  weights=combiner["weights"])
        console.print("installed: case pages now show the joint face + phenotype ranking")
