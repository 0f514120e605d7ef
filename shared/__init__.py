"""Gestalt's common package: settings, database, models, storage and the ML code."""
