"""Rate limits (Flask-Limiter): logins, uploads and the requests that cost the portal or the workers real work.

Counts live in Redis, so every gunicorn worker (and every portal replica) shares them. A request over a limit
is answered 429 with ``Retry-After`` (the seconds until the window frees a slot). Each limit is a
``GESTALT_*_RATE_LIMIT`` setting in Flask-Limiter's syntax (``"20 per minute"``, ``"10 per minute;50 per hour"``).

Per-user limits count per account (``user:<id>``), whatever address the requests come from; requests with no
login (refused right after) count per client address. The client address is the one the trusted proxies saw
(``GESTALT_TRUSTED_PROXIES``, werkzeug's ProxyFix in ``web.create_app``).
"""
from __future__ import annotations

from flask import request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import current_user

from shared.config import get_settings

limiter = Limiter(key_func=get_remote_address, default_limits=[])


def user_key() -> str:
    """The logged-in account (session or API token), else the client address."""
    if current_user.is_authenticated:
        return f"user:{current_user.id}"
    return f"address:{get_remote_address()}"


def photos_in_request() -> int:
    """What an upload costs against the photo limit: one per attached photo."""
    return max(1, sum(1 for f in request.files.getlist("photo") if f.filename))


def _accepted(response) -> bool:
    return response.status_code == 201


# The portal's form and the API share one count of photos per user: only accepted uploads count.
photos = limiter.shared_limit(
    lambda: get_settings().photo_rate_limit, scope="photos", key_func=user_key, cost=photos_in_request,
    deduct_when=_accepted, error_message="too many photos uploaded in the last while; wait and try again")
# The page's and the API's heatmap routes share one count.
heatmaps = limiter.shared_limit(
    lambda: get_settings().heatmap_rate_limit, scope="heatmaps", key_func=user_key,
    error_message="too many heatmaps requested; wait a minute and try again")
reports = limiter.shared_limit(
    lambda: get_settings().report_rate_limit, scope="reports", key_func=user_key,
    error_message="too many reports requested; wait a minute and try again")
rescores = limiter.shared_limit(
    lambda: get_settings().rescore_rate_limit, scope="rescores", key_func=user_key,
    error_message="too many rescores asked for; wait a minute and try again")
# An admin's photo archive imports, from the API and the admin console; refused ones count too (each was unpacked).
imports = limiter.shared_limit(
    lambda: get_settings().import_rate_limit, scope="imports", key_func=user_key,
    error_message="too many archive imports in the last while; wait and try again")
