"""Hypothesis profiles: ``ci`` (default, fast) and ``slow`` (thousands of examples).

Select with the environment variable ``HYPOTHESIS_PROFILE=slow``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "slow",
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import tempfile  # noqa: E402

import pytest  # noqa: E402

# Fixtures wider than one test (module or session scope) run before the per-test cache below:
# they too never write to the user's cache directory.
os.environ["VRAMFX_CACHE_DIR"] = tempfile.mkdtemp(prefix="vramfx-test-cache-")


@pytest.fixture(autouse=True)
def capture_cache_dir(tmp_path_factory, monkeypatch):
    """Every test gets an empty capture cache of its own: the suite never writes to the user's
    cache directory, and no test reads what another captured."""
    folder = tmp_path_factory.mktemp("vramfx-cache")
    monkeypatch.setenv("VRAMFX_CACHE_DIR", str(folder))
    monkeypatch.delenv("VRAMFX_CACHE", raising=False)
    return folder
