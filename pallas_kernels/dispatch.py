"""Choosing between an op's GPU kernel and its pure-jnp reference.

Each op has one GPU kernel, named for what it is written in: "mosaic" (Pallas Mosaic GPU: `block_sparse_attention`,
`attention_with_pooling`) or "triton" (Pallas Triton: `block_topk_mask`). Policy, shared by every op in this
package (`implementation=` argument):
  None         auto: the op's kernel on a Hopper (sm_90) GPU, the reference elsewhere. A kernel that raises
               `NotImplementedError` (unsupported shape, dtype or device) falls back to the reference.
  "mosaic" or
  "triton"     the op's kernel (the other name is a ValueError); its `NotImplementedError` propagates.
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

Kernel = Literal["mosaic", "triton"]
Implementation = Literal["mosaic", "triton", "reference"]
IMPLEMENTATIONS: tuple[Implementation, ...] = ("mosaic", "triton", "reference")
_KERNEL_NAMES: dict[Kernel, str] = {"mosaic": "Pallas Mosaic GPU", "triton": "Pallas Triton"}

_logger = logging.getLogger(__name__)
_Result = TypeVar("_Result")


def check_implementation(implementation: str | None, kernel: Kernel = "mosaic") -> None:
    """Raises ValueError unless `implementation` is None, "reference" or `kernel` (the op's kernel)."""
    if implementation is not None and implementation not in (kernel, "reference"):
        raise ValueError(
            f"implementation must be None (auto), {kernel!r} (this op's {_KERNEL_NAMES[kernel]} kernel) or "
            f"'reference', got {implementation!r}"
        )


@functools.cache
def hopper_available() -> bool:
    """True when JAX's default device is a Hopper (sm_90) GPU, where auto dispatch tries the kernels."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "") in ("9.0", "9.0a")


def run(
    op_name: str,
    implementation: Implementation | None,
    *,
    reference: Callable[[], _Result],
    mosaic: Callable[[], _Result] | None = None,
    triton: Callable[[], _Result] | None = None,
) -> tuple[Implementation, _Result]:
    """Calls the op's kernel (`mosaic()` or `triton()`, exactly one given) or `reference()` following the module's
    policy; returns (name of the one that ran, result)."""
    if (mosaic is None) == (triton is None):
        raise TypeError("pass exactly one kernel: mosaic= or triton=")
    kernel_name: Kernel = "mosaic" if mosaic is not None else "triton"
    kernel = mosaic or triton
    check_implementation(implementation, kernel_name)
    if implementation == "reference" or (implementation is None and not hopper_available()):
        chosen: Implementation = "reference"
        result = reference()
    else:
        try:
            chosen, result = kernel_name, kernel()
        except NotImplementedError as error:
            if implementation == kernel_name:
                raise
            _logger.debug(
                "%s: %s kernel declined (%s); falling back to the reference", op_name, _KERNEL_NAMES[kernel_name], error
            )
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
