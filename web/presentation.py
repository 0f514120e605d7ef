"""What a clinician reads instead of internal names: one mapping for regions, photo states and the
plain-language band of a gestalt score, and the validation a model version carries. The case page, the
printed report and the API's display fields use these."""
from __future__ import annotations

from shared.models import ModelVersion

REGION_LABELS = {"full_face": "Whole face", "upper_half": "Upper face", "middle_face": "Mid face (ear to ear)",
                 "lower_half": "Lower face", "eyes": "Eyes", "nose": "Nose", "mouth": "Mouth and philtrum",
                 "identity": "Whole face (identity encoder)"}
STATUS_LABELS = {"queued": "Queued", "detecting": "Finding the face", "aligning": "Aligning the face",
                 "scoring": "Scoring", "done": "Scored", "rejected": "Not usable",
                 "awaiting_model": "Waiting for a model", "failed": "Failed"}
STATUS_HINTS = {"awaiting_model": "No model is active yet; the photo is scored as soon as an administrator "
                                  "activates one, with nothing for you to do.",
                "failed": "Processing failed after several tries; an administrator can retry it."}
DISCLAIMER = ("A gestalt score is the relative facial similarity of the patient to each syndrome the model knows, "
              "compared with the other syndromes it knows. It is not a probability of disease and not a "
              "diagnosis; a syndrome the model was not trained on cannot appear. Gestalt supports, and does not "
              "replace, a clinical geneticist's assessment.")


def region_label(region: str) -> str:
    return REGION_LABELS.get(region, region.replace("_", " ").capitalize())


def status_label(status: str) -> str:
    return STATUS_LABELS.get(status, status.replace("_", " "))


def similarity_band(score: float, top: float) -> str:
    """A plain-language band for a gestalt score, relative to the case's best score."""
    if top <= 0:
        return "low"
    ratio = score / top
    return "high" if ratio >= 0.66 else "medium" if ratio >= 0.33 else "low"


def validation_summary(version: ModelVersion | None) -> dict | None:
    """How the model was validated: held-out top-1/top-10 (or top-5) and the split size, from its metrics."""
    if version is None:
        return None
    metrics = version.metrics or {}
    val = metrics.get("validation") or {}
    agg = val.get("aggregate") or {}
    if agg:
        top10 = agg.get("top10", agg.get("top5"))
        return {"top1": agg.get("top1"), "topk": top10, "k": 10 if "top10" in agg else 5, "n": val.get("n"),
                "subjects": val.get("subjects"), "source": "validation split at training"}
    hold = (metrics.get("holdout") or {}).get("per_image") or {}
    if hold.get("top1"):
        k = 10 if "top10" in hold else 5
        return {"top1": hold["top1"].get("value"), "topk": (hold.get(f"top{k}") or {}).get("value"), "k": k,
                "n": (metrics.get("holdout") or {}).get("images"), "subjects": None, "source": "nightly holdout"}
    return None
