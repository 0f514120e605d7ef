"""Saliency heatmaps of a scored photo (the work is :mod:`shared.services.heatmaps`'s).

Owner or admin only, like the photo itself; every view is audited.
"""
from __future__ import annotations

from flask import Blueprint, Response, abort, jsonify, request
from flask_login import current_user

from shared.services import Refusal
from web import limits
from web.access import case_or_404
from web.db import get_db
from web.openapi import operation
from web.schemas import HeatmapQuery, parse

bp = Blueprint("heatmaps", __name__)


@bp.get("/cases/<int:case_id>/images/<int:image_id>/heatmap.png")
@bp.get("/api/v1/cases/<int:case_id>/images/<int:image_id>/heatmap.png", endpoint="api_heatmap_png")
@operation({200: "image/png"}, query=HeatmapQuery, errors={
    400: "The syndrome is not in the photo's ranking, or the region not one of the model's",
    404: "No such case or photo, or not yours; or the photo has no result, crops or model yet"})
@limits.heatmaps
def heatmap_png(case_id: int, image_id: int):
    """Grad-CAM heatmap of one syndrome over the aligned face (PNG), by the model that scored the photo"""
    from shared.services.heatmaps import heatmap

    case = case_or_404(case_id)
    image = next((i for i in case.images if i.id == image_id), None)
    if image is None:
        abort(404)
    api = request.path.startswith("/api/")
    try:
        query = parse(HeatmapQuery, request.args.to_dict())
        made = heatmap(get_db(), image, query.syndrome, query.region, current_user.id, request.remote_addr,
                       "api" if api else "portal")
    except Refusal as exc:
        if api:
            return jsonify(error=exc.message), exc.status
        return Response(exc.message, exc.status, mimetype="text/plain")
    return Response(made.png, mimetype="image/png", headers={"Cache-Control": "private, no-store"})
