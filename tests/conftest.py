"""Shared pytest fixtures and markers.

`gpu` tests run only where a Hopper GPU is visible; `testbed` tests need the shared pretrained tiny Llama
(`../shared/testbed`, or `shared/testbed` / `.testbed` inside the checkout on the GPU machine).

The CPU platform is split into `HOST_DEVICES` devices, so the sharding tests run meshes of 1 to 8 devices in this
process. XLA reads the flag when jax initialises its backends, so it is set here, before any test module imports
jax; everything else still runs on the first device, as before.
"""

import os
from pathlib import Path

import pytest

HOST_DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={HOST_DEVICES}".strip()
    )

REPO_ROOT = Path(__file__).resolve().parent.parent


def _find_testbed() -> Path | None:
    candidates = [REPO_ROOT.parent / "shared" / "testbed", REPO_ROOT / "shared" / "testbed", REPO_ROOT / ".testbed"]
    if os.environ.get("SEER_TESTBED"):
        candidates.insert(0, Path(os.environ["SEER_TESTBED"]))
    for path in candidates:
        if (path / "seer-tiny-llama" / "config.json").is_file():
            return path
    return None


def _hopper_available() -> bool:
    try:
        import jax

        return any(
            d.platform == "gpu" and getattr(d, "compute_capability", "") in ("9.0", "9.0a") for d in jax.devices()
        )
    except RuntimeError:
        return False


TESTBED = _find_testbed()
HOPPER = _hopper_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a Hopper GPU (H100/H200, sm_90) with jax[cuda]; none is visible here")
    skip_testbed = pytest.mark.skip(
        reason="needs the testbed (seer-tiny-llama + data): put it at ../shared/testbed or set SEER_TESTBED=DIR"
    )
    for item in items:
        if "gpu" in item.keywords and not HOPPER:
            item.add_marker(skip_gpu)
        if "testbed" in item.keywords and TESTBED is None:
            item.add_marker(skip_testbed)


@pytest.fixture(scope="session")
def testbed_dir() -> Path:
    assert TESTBED is not None  # the `testbed` marker skips otherwise
    return TESTBED
