"""parse_budget and the device memory queries behind percentage budgets."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vramfx import parse_budget
from vramfx import budget as budget_mod


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8GB", 8 * 10**9),
        ("8GiB", 8 * 2**30),
        ("512MB", 512 * 10**6),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("8.2MB", 8_200_000),  # exact: float arithmetic gives 8,199,999
        ("0.1KB", 100),
        ("1.5GiB", 3 * 2**29),
        ("64KB", 64_000),
        ("64KiB", 65_536),
        ("2TB", 2 * 10**12),
        ("100B", 100),
        (" 8 GB ", 8 * 10**9),
        ("8gib", 8 * 2**30),
        ("8GIB", 8 * 2**30),
    ],
)
def test_size_strings(text, expected):
    assert parse_budget(text) == expected


def test_int_bytes():
    assert parse_budget(4096) == 4096


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["KB", "MB", "GB", "KiB", "MiB", "GiB"]))
def test_units_scale_by_their_power(number, unit):
    assert parse_budget(f"{number}{unit}") == number * budget_mod._UNITS[unit.upper()]


def test_percent_of_cpu_memory_available(monkeypatch):
    monkeypatch.setattr(budget_mod, "_cpu_available_bytes", lambda: 10_000)
    assert parse_budget("90%", device="cpu") == 9_000
    assert parse_budget("100%", device="cpu") == 10_000


def test_percent_reads_real_mem_available():
    assert 0 < parse_budget("50%", device="cpu") <= budget_mod.device_free_bytes("cpu")


def test_percent_of_cuda_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2_000, 8_000))
    assert parse_budget("50%", device="cuda") == 1_000


@pytest.mark.parametrize(
    "bad, match",
    [
        ("8 gigs", "not understood"),
        ("GB", "not understood"),
        ("8", "not understood"),
        ("-1GB", "not understood"),
        ("8Gb", "means bits"),
        ("8gb", "means bits"),
        ("0GB", "must be positive"),
        (0, "must be positive"),
        (-5, "must be positive"),
        ("0%", "percentage must be in"),
        ("150%", "percentage must be in"),
        (True, "is a bool"),
        (8.0, "has type float"),
        (None, "has type NoneType"),
    ],
)
def test_anything_else_is_a_value_error_listing_the_accepted_forms(bad, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_budget(bad)
    if "positive" not in match and "percentage" not in match:
        assert '"8GiB"' in str(info.value) and '"90%"' in str(info.value)


def test_unknown_device_type_for_percentage():
    with pytest.raises(ValueError, match="device='mps'"):
        parse_budget("50%", device="mps")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RssAnon is read from /proc/self/status")
def test_rss_anon_bytes_counts_this_process_memory():
    before = budget_mod.rss_anon_bytes()
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # touched pages: 64 MiB more anonymous memory
    grown = budget_mod.rss_anon_bytes() - before
    assert before > 0 and grown >= 48 * 2**20, grown
    del block
