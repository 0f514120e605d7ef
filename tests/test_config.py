"""A boolean or choice setting that is none of its values stops the process at start, naming the variable, its
value and the values allowed; it never falls back to a default in silence."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.config import BOOLEANS, CHOICES, ConfigError, Settings
from tests.conftest import ROOT


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No GESTALT_* setting from the caller, and a data directory without a running stack."""
    for name in [n for n in os.environ if n.startswith("GESTALT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("GESTALT_DATA_DIR", str(tmp_path))
    return monkeypatch


@pytest.mark.parametrize("raw, value", [("1", True), ("TRUE", True), (" yes ", True), ("on", True),
                                        ("0", False), ("False", False), ("no", False), ("off", False)])
def test_a_boolean_reads_its_spellings(clean_env, raw, value):
    clean_env.setenv("GESTALT_SECURE_COOKIES", raw)
    assert Settings().secure_cookies is value


def test_a_boolean_typo_stops_with_its_name_value_and_the_values_allowed(clean_env):
    clean_env.setenv("GESTALT_SECURE_COOKIES", "ture")
    with pytest.raises(ConfigError) as err:
        Settings()
    message = str(err.value)
    assert "GESTALT_SECURE_COOKIES" in message and "'ture'" in message
    assert all(spelling in message for spelling in BOOLEANS)


@pytest.mark.parametrize("name, good, bad", [
    ("GESTALT_FUSE_STAGES", "off", "of"), ("GESTALT_INFER_PRECISION", "bf16", "bfloat16"),
    ("GESTALT_DEVICE", "cuda:1", "cuda1"), ("GESTALT_DETECTOR", "mediapipe", "retina"),
    ("GESTALT_LANDMARKER", "fan", "dlib")])
def test_a_choice_stops_at_start_unless_it_is_one_of_its_values(clean_env, name, good, bad):
    clean_env.setenv(name, good)
    Settings()
    clean_env.setenv(name, bad)
    with pytest.raises(ConfigError, match=f"{name}='{bad}' is not one of the values allowed: auto"):
        Settings()


def test_the_backend_choices_are_the_registries():
    from shared.ml.preprocess import backends

    assert CHOICES["detector_backend"][1] == ("auto", *backends.DETECTORS)
    assert CHOICES["landmark_backend"][1] == ("auto", *backends.LANDMARKERS)


@pytest.mark.parametrize("command", [["web"], ["worker", "-Q", "default"], ["up"]])
def test_a_bad_setting_stops_the_services(clean_env, tmp_path, command):
    """`gestalt web`, `gestalt worker` and `gestalt up` refuse to start (before any engine or server does; the
    database URL only keeps an `up` that reads the typo as false from starting engines here)."""
    env = {**os.environ, "GESTALT_SECURE_COOKIES": "ture", "GESTALT_DATABASE_URL": "postgresql://nowhere.invalid/x",
           "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "shared.cli", *command], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 2, out[-2000:]
    assert "GESTALT_SECURE_COOKIES='ture' is not a boolean; allowed: 1, true, yes, on, 0, false, no, off" in out
