"""The vram_config dict and vram_limit: fallbacks, "disk", and clear errors."""

from __future__ import annotations

import pytest
import torch

from vramfx.swap.config import GIGABYTE, KEYS, Placement, VramConfig, parse_vram_limit


def test_omitted_fields_fall_back_to_the_computation_state():
    config = VramConfig.from_dict(dict(offload_dtype=torch.bfloat16, computation_dtype=torch.float32,
                                       computation_device="cpu"))
    assert config.offload == Placement(torch.device("cpu"), torch.bfloat16)
    assert config.onload == config.computation == Placement(torch.device("cpu"), torch.float32)
    assert config.device == torch.device("cpu")
    # Kept weights are held as streamed ones are unless a preparing dtype is asked for.
    assert config.preparing == Placement(torch.device("cpu"), None)


def test_disk_means_the_disk_map_for_either_field():
    for fields in (dict(offload_device="disk"), dict(offload_dtype="disk"),
                   dict(offload_dtype="disk", offload_device="disk")):
        config = VramConfig.from_dict({**fields, "computation_device": "cpu", "computation_dtype": torch.bfloat16})
        assert config.offload == Placement(None, None), "on disk, an omitted dtype is the file's"
        assert not config.onload.on_disk


def test_a_dtype_on_disk_is_what_values_read_from_it_are_rounded_to():
    config = VramConfig.from_dict(dict(offload_device="disk", offload_dtype=torch.float8_e4m3fn,
                                       computation_dtype=torch.bfloat16, computation_device="cpu"))
    assert config.offload == Placement(None, torch.float8_e4m3fn) and config.offload.on_disk


def test_a_dtype_applies_to_floating_tensors_only():
    placement = Placement(torch.device("cpu"), torch.bfloat16)
    assert placement.dtype_for(torch.float32) == torch.bfloat16
    assert placement.dtype_for(torch.int64) == torch.int64
    assert Placement(torch.device("cpu"), None).dtype_for(torch.float16) == torch.float16


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(offload_dtypes=torch.float16), r"unknown key\(s\) offload_dtypes; the keys are offload_dtype"),
        (dict(offload_device="cpu", offload_dtype="disk"), r'"offload_device"\]=\'cpu\' conflicts with offload_dtype="disk"'),
        (dict(computation_device="disk"), r'"computation_device"\] cannot be "disk"'),
        (dict(computation_dtype="disk"), r'"computation_dtype"\] cannot be "disk"'),
        (dict(preparing_device="disk"), r'"preparing_device"\] must be the computation device'),
        (dict(onload_device="tpu"), r'"onload_device"\]=\'tpu\' is not a device'),
        (dict(onload_dtype="bfloat16"), r'"onload_dtype"\]=\'bfloat16\' is not a torch dtype'),
    ],
)
def test_bad_configs_name_the_key_and_the_fix(config, match):
    with pytest.raises(ValueError, match=match):
        VramConfig.from_dict({"computation_device": "cpu", **config})


def test_the_eight_keys():
    assert KEYS == ("offload_dtype", "offload_device", "onload_dtype", "onload_device", "preparing_dtype",
                    "preparing_device", "computation_dtype", "computation_device")


def test_vram_limit_is_gb_as_the_original_counts_them_or_a_budget_string():
    cpu = torch.device("cpu")
    assert parse_vram_limit(None, cpu) is None
    assert parse_vram_limit(0, cpu) == 0
    assert parse_vram_limit(6, cpu) == 6 * GIGABYTE == 6 * 2**30
    assert parse_vram_limit(0.5, cpu) == 2**29
    assert parse_vram_limit("8GB", cpu) == 8 * 10**9
    assert parse_vram_limit("1234B", cpu) == 1234
    assert 0 < parse_vram_limit("50%", cpu) < parse_vram_limit("100%", cpu) * 0.6


@pytest.mark.parametrize("limit, match", [(-1, ">= 0"), (True, "is a bool"), ("lots", "vram_limit: budget='lots'"),
                                          ([1], "has type list")])
def test_bad_vram_limits_are_refused(limit, match):
    with pytest.raises(ValueError, match=match):
        parse_vram_limit(limit, torch.device("cpu"))
