"""Choosing between an op's Mosaic GPU kernel and its pure-jnp reference.

Policy, shared by every op in this package (`implementation=` argument):
  None         auto: the Mosaic GPU kernel on a Hopper (sm_90) GPU, the reference elsewhere. A kernel that raises
               `NotImplementedError` (unsupported shape, dtype or device) falls back to the reference.
  "mosaic"     the kernel; its `NotImplementedError` propagates.
  "reference"  the pure-jnp reference, on any device.

The choice is made while tracing (the kernels raise `NotImplementedError` from Python before building anything),
so under `jax.jit` it is made once per compilation. Each op's `*_implementation(...)` function answers, for given
arguments, which implementation the op would run; every choice is also logged at DEBUG level on this module's
logger (`logging.getLogger("pallas_kernels.dispatch")`).
"""

import functools
import logging
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import jax

Implementation = Literal["mosaic", "reference"]
IMPLEMENTATIONS: tuple[Implementation, ...] = ("mosaic", "reference")

_logger = logging.getLogger(__name__)
_Result = TypeVar("_Result")


def check_implementation(implementation: str | None) -> None:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None (auto), 'mosaic' or 'reference', got {implementation!r}")


@functools.cache
def hopper_available() -> bool:
    """True when JAX's default device is a Hopper (sm_90) GPU, the only target of our Mosaic GPU kernels."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "") in ("9.0", "9.0a")


def run(
    op_name: str,
    implementation: Implementation | None,
    *,
    mosaic: Callable[[], _Result],
    reference: Callable[[], _Result],
) -> tuple[Implementation, _Result]:
    """Calls `mosaic()` or `reference()` following the module's policy; returns (name of the one that ran, result)."""
    check_implementation(implementation)
    if implementation == "reference" or (implementation is None and not hopper_available()):
        chosen: Implementation = "reference"
        result = reference()
    else:
        try:
            chosen, result = "mosaic", mosaic()
        except NotImplementedError as error:
            if implementation == "mosaic":
                raise
            _logger.debug("%s: Mosaic GPU kernel declined (%s); falling back to the reference", op_name, error)
            chosen, result = "reference", reference()
    _logger.debug("%s: running the %s implementation", op_name, chosen)
    return chosen, result


def traced_choice(dispatch_fn: Callable[..., tuple[Implementation, Any]], *args) -> Implementation:
    """The implementation that `dispatch_fn(*args)` (an op's wrapper around `run`, returning (name, result)) picks,
    traced abstractly with `jax.eval_shape`: nothing is computed, and `args` may be `jax.ShapeDtypeStruct`s."""
    chosen = []

    def probe(*args):
        name, result = dispatch_fn(*args)
        chosen.append(name)
        return result

    jax.eval_shape(probe, *args)
    return chosen[0]
