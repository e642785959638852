"""Tests of gold_ray.devices: the default device and the dtypes the teacher and student compute in."""

from __future__ import annotations

import pytest
import torch

from gold_ray.devices import autocast, cpu_has_fast_bf16, resolve_dtype, training_dtype


def test_resolve_dtype():
    assert resolve_dtype("float32", "cpu") is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8", "cpu")


def test_training_dtype_follows_the_cpu_for_auto_and_refuses_float16():
    assert training_dtype("float32", "cpu") is torch.float32
    assert training_dtype("bfloat16", "cpu") is torch.bfloat16
    assert training_dtype("auto", "cpu") is (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    # float16 would need loss scaling, which the training loop does not do.
    with pytest.raises(ValueError, match="student.precision 'float16'"):
        training_dtype("float16", "cpu")


def test_autocast_computes_matmuls_in_the_dtype_and_float32_leaves_them_alone():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(torch.bfloat16, "cpu"):
        assert (a @ b).dtype is torch.bfloat16
    with autocast(torch.float32, "cpu"):
        assert (a @ b).dtype is torch.float32
    assert (a @ b).dtype is torch.float32  # nothing left switched on after the block
