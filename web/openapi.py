"""The OpenAPI 3 document of /api/v1 (served at /api/v1/openapi.json)."""
from __future__ import annotations

from web.schemas import SEXES

ERROR = {"description": "A message a person can act on",
         "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
ID = {"name": "{}", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}


def _id(name: str) -> dict:
    return {**ID, "name": name}


def _json(ref: str) -> dict:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _search(example: str) -> list[dict]:
    return [{"name": "q", "in": "query", "required": True, "schema": {"type": "string", "maxLength": 100},
             "example": example},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 50}}]


SPEC = {
    "openapi": "3.0.3",
    "info": {"title": "Gestalt API", "version": "1",
             "description": "Cases, photos, results and diagnoses. Authenticate with a per-user token "
                            "(`Authorization: Bearer gst_...`, see `gestalt tokens create`)."},
    "servers": [{"url": "/api/v1"}],
    "security": [{"bearer": []}],
    "paths": {
        "/cases": {
            "get": {"summary": "Your cases (all cases for admins)", "responses": {
                "200": {"description": "Cases", **_json("CaseList")}, "401": ERROR}},
            "post": {"summary": "Create a case", "requestBody": {"required": True, **_json("NewCase")},
                     "responses": {"201": {"description": "The case", **_json("Case")}, "400": ERROR, "401": ERROR}},
        },
        "/cases/{case_id}": {"get": {"summary": "A case with its photos, statuses and results",
                                     "parameters": [_id("case_id")],
                                     "responses": {"200": {"description": "The case", **_json("Case")},
                                                   "401": ERROR, "404": ERROR}},
                             "patch": {"summary": "Correct a case's details; fields left out keep their value",
                                       "parameters": [_id("case_id")],
                                       "requestBody": {"required": True, **_json("CaseUpdate")},
                                       "responses": {"200": {"description": "The case", **_json("Case")},
                                                     "400": ERROR, "401": ERROR, "404": ERROR}}},
        "/cases/{case_id}/images": {"post": {
            "summary": "Add photos (multipart, field `photo`, repeatable); all are stored or none",
            "parameters": [_id("case_id")],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["photo"],
                "properties": {"photo": {"type": "string", "format": "binary"}}}}}},
            "responses": {"201": {"description": "Accepted photos", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"images": {"type": "array", "items": {
                    "type": "object", "properties": {"id": {"type": "integer"}, "status": {"type": "string"}}}}}}}}},
                "400": ERROR, "401": ERROR, "404": ERROR, "413": ERROR, "415": ERROR}}},
        "/cases/{case_id}/diagnosis": {method: {
            "summary": "Record or update the confirmed diagnosis; fields left out keep their stored value",
            "parameters": [_id("case_id")], "requestBody": {"required": True, **_json("Diagnosis")},
            "responses": {"200": {"description": "The diagnosis"}, "400": ERROR, "401": ERROR, "404": ERROR}}
            for method in ("post", "patch")},
        "/cases/{case_id}/phenopacket": {"get": {
            "summary": "The case as a GA4GH Phenopacket v2 (subject, HPO terms, diagnosis, measurements, photo hashes)",
            "parameters": [_id("case_id")],
            "responses": {"200": {"description": "Phenopacket v2 JSON", "content": {"application/json": {"schema": {
                "type": "object"}}}}, "401": ERROR, "404": ERROR}}},
        "/hpo": {"get": {
            "summary": "HPO terms matching a text (ID, name or synonym), for autocomplete",
            "parameters": _search("hyperte"),
            "responses": {"200": {"description": "Matching terms, best first", **_json("HpoTerms")}, "401": ERROR}}},
        "/syndromes": {"get": {
            "summary": "Catalogue syndromes matching a name, OMIM/Orphanet ID or gene symbol",
            "parameters": _search("kabuki"),
            "responses": {"200": {"description": "Matching syndromes with their genes", **_json("Syndromes")},
                          "401": ERROR}}},
        "/images/{image_id}": {"get": {"summary": "One photo's status and result", "parameters": [_id("image_id")],
                                       "responses": {"200": {"description": "The photo"}, "401": ERROR,
                                                     "404": ERROR}}},
        "/images/{image_id}/aligned": {"get": {
            "summary": "A presigned URL (300 s) of the aligned face", "parameters": [_id("image_id")],
            "responses": {"200": {"description": "URL"}, "401": ERROR, "404": ERROR}}},
        "/images/{image_id}/rescore": {"post": {
            "summary": "Score the photo again with the active model", "parameters": [_id("image_id")],
            "responses": {"202": {"description": "Queued"}, "401": ERROR, "404": ERROR, "409": ERROR}}},
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            "NewCase": {"type": "object", "required": ["patient_ref"], "additionalProperties": False, "properties": {
                "patient_ref": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$",
                                "description": "Pseudonymous ID; never a name"},
                "sex": {"type": "string", "enum": list(SEXES)},
                "age_years": {"type": "number", "minimum": 0, "maximum": 120, "nullable": True},
                "ancestry": {"type": "string", "maxLength": 64, "nullable": True,
                             "description": "Self-reported ancestry (optional)"},
                "hpo_terms": {"type": "array", "maxItems": 200, "items": {"type": "string", "pattern": "^HP:[0-9]{7}$"},
                              "description": "HPO term IDs; unknown IDs are refused (400)"}}},
            "CaseUpdate": {"type": "object", "additionalProperties": False, "properties": {
                "patient_ref": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
                "sex": {"type": "string", "enum": list(SEXES)},
                "age_years": {"type": "number", "minimum": 0, "maximum": 120, "nullable": True},
                "ancestry": {"type": "string", "maxLength": 64, "nullable": True},
                "hpo_terms": {"type": "array", "maxItems": 200,
                              "items": {"type": "string", "pattern": "^HP:[0-9]{7}$"}}}},
            "HpoTerms": {"type": "object", "properties": {"terms": {"type": "array", "items": {
                "type": "object", "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                                                 "synonyms": {"type": "array", "items": {"type": "string"}},
                                                 "label": {"type": "string"}}}}}},
            "Syndromes": {"type": "object", "properties": {"syndromes": {"type": "array", "items": {
                "type": "object", "properties": {
                    "id": {"type": "integer"}, "name": {"type": "string"}, "label": {"type": "string"},
                    "omim": {"type": "string", "nullable": True}, "orpha": {"type": "string", "nullable": True},
                    "source": {"type": "string"}, "genes": {"type": "array", "items": {"type": "string"}}}}}}},
            "Case": {"type": "object", "properties": {
                "id": {"type": "integer"}, "patient_ref": {"type": "string"}, "sex": {"type": "string"},
                "age_years": {"type": "number", "nullable": True}, "images": {"type": "array", "items": {}}}},
            "CaseList": {"type": "object", "properties": {"cases": {"type": "array", "items": {}}}},
            "Diagnosis": {"type": "object", "additionalProperties": False, "description": (
                "A case's first diagnosis needs `syndrome`; later updates change only the fields they name. "
                "`consent: false` withdraws consent to use the photos for training (audited)."), "properties": {
                "syndrome": {"oneOf": [{"type": "string", "minLength": 1, "maxLength": 300},
                                       {"type": "integer", "minimum": 1}],
                             "description": "Catalogue name, id, or OMIM/Orphanet ID (OMIM:122470, ORPHA:2322)"},
                "kind": {"type": "string", "enum": ["clinical", "molecular"]},
                "gene": {"type": "string", "maxLength": 32, "nullable": True},
                "variant": {"type": "string", "maxLength": 255, "nullable": True},
                "consent": {"type": "boolean", "description": "A JSON boolean; anything else is a 400"}}},
        },
    },
}

# Saliency heatmaps (web/heatmaps.py).
SPEC["paths"]["/cases/{case_id}/images/{image_id}/heatmap.png"] = {"get": {
    "summary": "Grad-CAM heatmap of one syndrome over the aligned face (PNG), by the model that scored the photo",
    "parameters": [_id("case_id"), _id("image_id"),
                   {"name": "syndrome", "in": "query", "required": True, "schema": {"type": "string", "maxLength": 255},
                    "description": "Class index in the model's class list, or the syndrome's name as ranked",
                    "example": "0"},
                   {"name": "region", "in": "query", "schema": {"type": "string", "maxLength": 32, "default": "all"},
                    "description": "`all` (every region combined) or one of the model's regions, e.g. `upper_half`"}],
    "responses": {"200": {"description": "The overlay", "content": {"image/png": {"schema": {
        "type": "string", "format": "binary"}}}}, "400": ERROR, "401": ERROR, "404": ERROR}}}
