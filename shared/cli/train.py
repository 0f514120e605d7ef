"""``gestalt train`` and ``gestalt pretrain``."""
from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from shared.cli.common import (
    cache_options,
    console,
    load_samples_or_fail,
    report_skipped,
    torch_options,
    torch_runtime,
)
from shared.cli.train_steps import (
    CasiaOptions,
    check_catalogue_labels,
    default_skipped_path,
    finetune_config,
    fit_encoder_or_fail,
    load_encoder_or_fail,
    load_init,
    load_task,
    model_extra,
    prepare_or_fail,
    register_model,
    report_members,
    train_casia,
)


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, path_type=Path),
              help="Labelled photos: DIR/<label>/<subject>/<image>, DIR/<label>/<image>, or a manifest CSV "
                   "(image,subject,label).")
@click.option("--preset", type=click.Choice(["cpu-small", "paper"]), default=None,
              help="Defaults for a quick run on a laptop CPU (cpu-small) or the paper's recipe (paper): with "
                   "--backbone encoder, the regions' fine-tuning epochs (4 or 6); with --backbone casia, --width, "
                   "--epochs and --batch-size (0.25, 8, 16 or 1.0, 40, 32). Options given explicitly win "
                   "[default: paper].")
@click.option("--width", type=float, default=None, help="CASIA-Net channel multiplier [default: 1.0].")
@click.option("--epochs", type=int, default=None,
              help="CASIA-Nets: epochs [default: 40]; encoder: the most fine-tuning epochs per region [default: 6].")
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
@click.option("--backbone", type=click.Choice(["encoder", "casia"]), default="encoder", show_default=True,
              help="What the regional members are built on: encoder (the face-identity network learned on millions "
                   "of faces, one head per region's cut and on the face chip; no network is trained) or casia (the "
                   "paper's CASIA-Nets, trained on these photos; --width, --epochs, --init and the other network "
                   "options apply to it).")
@click.option("--finetune", type=click.Choice(["auto", "off"]), default=None,
              help="With --backbone encoder: fine-tune each region's copy of the encoder's 256-channel stage where "
                   "held-out training patients say it pays (auto), or keep the encoder frozen (off) [default: auto; "
                   "off with --preset cpu-small, whose budget is about 2,000 photos in 15 minutes on 2 cores].")
@click.option("--identity/--no-identity", default=True, show_default=True,
              help="With --backbone casia: add the identity member (a head on the face-identity encoder's "
                   "descriptors). The encoder backbone always has it.")
@cache_options
@torch_options
def train(data_dir: Path, preset: str | None, width: float | None, epochs: int | None, batch_size: int | None,
          lr: float | None, init_path: Path | None,
          transfer_pairs: int | None, optimizer: str | None, mode: str, positive: str | None, classes: str | None,
          select_topk: int, val_fraction: float, seed: int, exclude: tuple[str, ...], name: str | None, activate: bool,
          register: bool, output: Path | None, patience: int, state_path: Path | None, skipped_path: Path | None,
          backbone: str, finetune: str | None, identity: bool, threads: int | None, device: str | None,
          cache_dir: Path | None, no_cache: bool) -> None:
    """Train a model's members from a labelled photo folder and register a model version.

    Every member is reported on the validation split with its weight in the aggregate. A binary model stores the
    label mapping it trained with (every label but --positive becomes `others`) and an operating threshold chosen
    on the validation split (Youden's J), which `gestalt evaluate` applies.
    """
    from shared.ml.preprocess.pipeline import Preprocessor
    from shared.ml.train import data_hash, save_checkpoint, subject_split

    if transfer_pairs is not None and init_path is None:
        raise click.ClickException("--transfer-pairs needs --init")
    if backbone == "encoder" and init_path is not None:
        raise click.ClickException("--init fine-tunes CASIA-Nets: use it with --backbone casia")
    settings, torch_device = torch_runtime(threads, device)
    task = load_task(data_dir, exclude, mode, positive, classes)
    class_names = task.class_names
    if register:  # unknown catalogue IDs stop the run now, not after training
        check_catalogue_labels(class_names)
    init = load_init(init_path, len(class_names), transfer_pairs, seed) if init_path is not None else None
    # A fine-tuned model keeps the regions of its pretrained nets.
    preprocessor = Preprocessor.from_settings(settings, init.regions) if init else Preprocessor.from_settings(settings)
    data = prepare_or_fail(settings, preprocessor, task.samples, class_names, cache_dir, no_cache)
    report_skipped(data.rejected, skipped_path if skipped_path is not None else default_skipped_path(output, settings))
    train_idx, val_idx = subject_split(data.samples, val_fraction, seed)
    encode = load_encoder_or_fail(str(torch_device)) if backbone == "encoder" or identity else None
    if backbone == "encoder":
        model, metrics = fit_encoder_or_fail(data, class_names, train_idx, val_idx, encode, seed,
                                             finetune_config(finetune, preset, epochs, seed))
    else:
        casia = CasiaOptions(preset, width, epochs, batch_size, lr, optimizer, select_topk, patience, seed)
        model, metrics = train_casia(data, class_names, preprocessor.regions, train_idx, val_idx, casia, init, mode,
                                     _state_path(state_path, output), encode, identity, str(torch_device))
    report_members(model, data, val_idx, encode, metrics, mode)
    metrics["subjects_known"] = task.subjects_known
    metrics["data"] = {"path": str(data_dir), "hash": data_hash(data.samples), "images": len(data.samples),
                       "rejected": len(data.rejected), "validation_images": len(val_idx)}
    metrics["task"] = {"mode": mode, "backbone": backbone, "init": str(init_path) if init_path else None,
                       **({"transfer_pairs": transfer_pairs} if init_path and transfer_pairs is not None else {}),
                       **({"positive": class_names[0]} if mode == "binary" else {})}
    extra = model_extra(model, data, train_idx, val_idx, task, mode, positive, encode)
    if output:
        output.write_bytes(save_checkpoint(model, metrics, extra))
        console.print(f"checkpoint written to {output}")
    if register:
        register_model(model, class_names, metrics, name, activate, extra, data, val_idx)
    state = _state_path(state_path, output)
    if state is not None and state.exists():  # a finished run needs no resuming
        state.unlink()


def _state_path(state_path: Path | None, output: Path | None) -> Path | None:
    return state_path if state_path is not None or output is None else output.with_name(output.name + ".state")


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

    from shared.ml.preprocess.pipeline import Preprocessor
    from shared.ml.preprocess.regions import DEFAULT_REGIONS, REGIONS
    from shared.ml.train.prepared import PreparedData
    from shared.ml.train.pretrain import PretrainConfig, summary_rows
    from shared.ml.train.pretrain import pretrain as run_pretrain

    settings, torch_device = torch_runtime(threads, device)
    samples = load_samples_or_fail(data_dir)
    identities = sorted({s.label for s in samples})
    console.print(f"{len(samples)} images, {len(identities)} identities")
    wanted = tuple(r.strip() for r in regions.split(",")) if regions else DEFAULT_REGIONS
    unknown = [r for r in wanted if r not in REGIONS]
    if unknown:
        raise click.ClickException(f"unknown region(s) {', '.join(unknown)}; known: {', '.join(REGIONS)}")
    preprocessor = Preprocessor.from_settings(settings, wanted)
    data = prepare_or_fail(settings, preprocessor, samples, identities, cache_dir, no_cache)
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
