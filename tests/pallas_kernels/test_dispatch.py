"""The implementation policy shared by the ops: auto, explicit choices, fallback, and how the choice is reported."""

import logging

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import dispatch
from pallas_kernels.attention_with_pooling import attention_with_pooling_implementation
from pallas_kernels.block_sparse_attention import block_sparse_attention_implementation


def _declines():
    raise NotImplementedError("unsupported here")


@pytest.fixture
def on_hopper(monkeypatch):
    monkeypatch.setattr(dispatch, "hopper_available", lambda: True)


@pytest.fixture
def off_hopper(monkeypatch):
    monkeypatch.setattr(dispatch, "hopper_available", lambda: False)


def test_auto_off_hopper_runs_the_reference(off_hopper):
    assert dispatch.run("op", None, mosaic=_declines, reference=lambda: 1) == ("reference", 1)


def test_auto_on_hopper_prefers_the_kernel(on_hopper):
    assert dispatch.run("op", None, mosaic=lambda: 2, reference=lambda: 1) == ("mosaic", 2)


def test_auto_falls_back_when_the_kernel_declines(on_hopper, caplog):
    with caplog.at_level(logging.DEBUG, logger="pallas_kernels.dispatch"):
        assert dispatch.run("op", None, mosaic=_declines, reference=lambda: 1) == ("reference", 1)
    assert "unsupported here" in caplog.text
    assert "running the reference implementation" in caplog.text


@pytest.mark.usefixtures("on_hopper")
def test_explicit_choices():
    assert dispatch.run("op", "reference", mosaic=lambda: 2, reference=lambda: 1) == ("reference", 1)
    with pytest.raises(NotImplementedError, match="unsupported here"):
        dispatch.run("op", "mosaic", mosaic=_declines, reference=lambda: 1)
    with pytest.raises(ValueError, match="implementation must be"):
        dispatch.run("op", "xla", mosaic=lambda: 2, reference=lambda: 1)


@pytest.mark.usefixtures("on_hopper")
def test_a_triton_kernel_is_named_triton(caplog):
    """An op whose kernel is Pallas Triton reports and accepts "triton", never "mosaic"."""
    with caplog.at_level(logging.DEBUG, logger="pallas_kernels.dispatch"):
        assert dispatch.run("op", None, triton=lambda: 2, reference=lambda: 1) == ("triton", 2)
        assert dispatch.run("op", None, triton=_declines, reference=lambda: 1) == ("reference", 1)
    assert "Pallas Triton kernel declined" in caplog.text
    assert dispatch.run("op", "triton", triton=lambda: 2, reference=lambda: 1) == ("triton", 2)
    with pytest.raises(ValueError, match="'triton'"):
        dispatch.run("op", "mosaic", triton=lambda: 2, reference=lambda: 1)
    with pytest.raises(TypeError, match="exactly one kernel"):
        dispatch.run("op", None, mosaic=lambda: 2, triton=lambda: 2, reference=lambda: 1)


@pytest.mark.usefixtures("on_hopper")
def test_ops_report_the_fallback_from_their_kernels():
    """On 'Hopper' the kernels are tried; the placeholders decline, so auto reports the reference."""
    q = jax.ShapeDtypeStruct((1, 128, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((1, 4, 2, 2), jnp.bool_)
    assert attention_with_pooling_implementation(q, kv, kv) in dispatch.IMPLEMENTATIONS
    assert block_sparse_attention_implementation(q, kv, kv, block_mask=mask) in dispatch.IMPLEMENTATIONS
    assert attention_with_pooling_implementation(q, kv, kv, implementation="reference") == "reference"
    assert block_sparse_attention_implementation(q, kv, kv, block_mask=mask, implementation="reference") == "reference"
