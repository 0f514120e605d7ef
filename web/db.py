"""One database session per request."""
from __future__ import annotations

from flask import Flask, g
from sqlalchemy.orm import Session

from shared.db import get_sessionmaker


def get_db() -> Session:
    if "db" not in g:
        g.db = get_sessionmaker()()
    return g.db


def init_app(app: Flask) -> None:
    @app.teardown_appcontext
    def close_db(exc):
        session = g.pop("db", None)
        if session is not None:
            if exc is not None:
                session.rollback()
            session.close()
