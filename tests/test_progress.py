"""Slow steps show a progress line; the usual switches silence it."""

from __future__ import annotations

import logging
import time

import pytest

from vramfx import progress


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.05)
    monkeypatch.setattr(progress, "REDRAW_S", 0.02)
    for switch in ("VRAMFX_PROGRESS", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        monkeypatch.delenv(switch, raising=False)


def test_a_slow_step_shows_its_name_and_count(quick, capsys):
    pytest.importorskip("tqdm")
    with progress.step("loading resident weights", total=3) as advance:
        for _ in range(3):
            time.sleep(0.05)
            advance()
    assert "vramfx: loading resident weights" in capsys.readouterr().err


def test_a_quick_step_shows_nothing(monkeypatch, capsys):
    monkeypatch.delenv("VRAMFX_PROGRESS", raising=False)
    with progress.step("planning"):
        pass
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("switch", ["VRAMFX_PROGRESS=0", "HF_HUB_DISABLE_PROGRESS_BARS=1", "TQDM_DISABLE=1"])
def test_the_usual_switches_silence_it(quick, monkeypatch, capsys, switch):
    name, value = switch.split("=")
    monkeypatch.setenv(name, value)
    assert not progress.enabled()
    with progress.step("capturing"):
        time.sleep(0.15)
    assert capsys.readouterr().err == ""


def test_the_logging_level_silences_it_and_vramfx_progress_1_overrides(quick, monkeypatch):
    logger = logging.getLogger("vramfx")
    old = logger.level
    try:
        logger.setLevel(logging.ERROR)
        assert not progress.enabled()
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        monkeypatch.setenv("VRAMFX_PROGRESS", "1")
        assert progress.enabled()
    finally:
        logger.setLevel(old)
