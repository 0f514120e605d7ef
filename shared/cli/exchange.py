"""``gestalt export phenopackets`` and ``gestalt import phenopackets``: cases in and out as GA4GH Phenopackets v2."""
from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

console = Console(stderr=True)


def _owner(session, email: str):
    from shared.users import find_user

    user = find_user(session, email)
    if user is None:
        raise click.ClickException(f"no user {email}")
    return user


@click.group("export")
def export_group() -> None:
    """Export cases for other tools."""


@export_group.command("phenopackets")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for <packet id>.json files and their photos/.")
@click.option("--case", "case_ids", type=int, multiple=True, help="Case id (repeatable; default: all of --owner).")
@click.option("--owner", "owner_email", default=None, help="Every case of this user.")
def export_phenopackets(out_dir: Path, case_ids: tuple[int, ...], owner_email: str | None) -> None:
    """Write cases as Phenopacket v2 JSON, with their photos beside them (audited)."""
    from sqlalchemy import select

    from shared.audit import audit
    from shared.db import session_scope
    from shared.models import Case
    from shared.phenopackets import export_cases
    from shared.storage import get_storage

    if not case_ids and not owner_email:
        raise click.UsageError("name cases with --case ID or all of a user's cases with --owner EMAIL")
    with session_scope() as session:
        stmt = select(Case).order_by(Case.id)
        if case_ids:
            stmt = stmt.where(Case.id.in_(case_ids))
        if owner_email:
            stmt = stmt.where(Case.owner_id == _owner(session, owner_email).id)
        cases = session.scalars(stmt).all()
        missing = sorted(set(case_ids) - {c.id for c in cases})
        if missing:
            raise click.ClickException(f"no case {', '.join(map(str, missing))}")
        try:
            written = export_cases(session, get_storage(), cases, out_dir)
        except ValueError as exc:
            raise click.ClickException(f"the export stopped: {exc}") from exc
        for case in cases:
            audit(session, "phenopacket_export", None, "case", case.id, via="cli", out=str(out_dir))
    console.print(f"{len(written)} Phenopacket(s) written to {out_dir}")


@click.group("import")
def import_group() -> None:
    """Import cases from other tools."""


@import_group.command("phenopackets")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--owner", "owner_email", required=True, help="The clinician who will own the imported cases.")
def import_phenopackets(folder: Path, owner_email: str) -> None:
    """Create cases from the *.json Phenopackets of FOLDER (photos by relative path): all of them or none.

    A packet imported before for the same owner is skipped, so running it again creates nothing."""
    from shared.phenopackets import plan_packets

    def plan(session):
        return plan_packets(session, folder), "packet(s)"

    _import(owner_email, plan, "phenopacket")


@import_group.command("photos")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--owner", "owner_email", required=True, help="The clinician who will own the imported cases.")
@click.option("--consent", default=None, metavar="yes",
              help="Required: 'yes' states that every patient of FOLDER consented to the reuse of their photos.")
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV with the columns folder,syndrome: maps syndrome folders to catalogue names or OMIM/ORPHA ids.")
@click.option("--kind", type=click.Choice(["clinical", "molecular"]), default="clinical", show_default=True,
              help="How the diagnoses were confirmed.")
def import_photos(folder: Path, owner_email: str, consent: str | None, labels_path: Path | None, kind: str) -> None:
    """Seed the gallery from FOLDER/<syndrome>/<patient>/<photo>: each patient a case of --owner with a confirmed,
    consented diagnosis, its photos queued for the pipeline. Everything is checked first; all or nothing.

    A syndrome folder is a catalogue name or an OMIM/ORPHA id (OMIM:147920, ORPHA:2322), or mapped to one by --labels;
    a patient folder's name is the case's pseudonymous reference. Patients imported before are skipped."""
    from shared.photo_import import CONSENT_REQUIRED, plan_photo_folder

    if consent != "yes":
        raise click.UsageError(f"nothing was imported: {CONSENT_REQUIRED} (--consent yes)")

    def plan(session):
        labels = labels_path.read_bytes() if labels_path else None
        found = plan_photo_folder(session, folder, consent=True, kind=kind, labels=labels,
                                  labels_name=labels_path.name if labels_path else "labels")
        if found.ignored:
            console.print(f"skipped {len(found.ignored)} system file(s): {', '.join(found.ignored[:5])}"
                          f"{' ...' if len(found.ignored) > 5 else ''}")
        return found.cases, "patient(s)"

    _import(owner_email, plan, "photo-folder")


def _import(owner_email: str, plan, via: str) -> None:
    """Plan (check everything), write all of it or nothing, then queue the new photos; prints what it did."""
    from shared.db import session_scope
    from shared.imports import ImportRefused, enqueue_images, write_cases
    from shared.storage import get_storage

    with session_scope() as session:
        owner = _owner(session, owner_email)
        try:
            plans, what = plan(session)
            result = write_cases(session, get_storage(), plans, owner.id, via=via)
        except ImportRefused as exc:
            raise click.ClickException("nothing was imported:\n  " + "\n  ".join(exc.problems)) from exc
        created = [(c.id, c.external_id, len(c.images)) for c in result.cases]
    for image_id in enqueue_images(result.image_ids):
        console.print(f"photo {image_id} will be queued by the sweeper (the broker did not answer)")
    for case_id, external_id, photos in created:
        click.echo(f"case {case_id} <- {external_id} ({photos} photo(s))")
    console.print(f"{len(created)} case(s) and {len(result.image_ids)} photo(s) imported; "
                  f"{len(result.skipped)} {what} were imported before and skipped")
