"""Outputs written through a staging directory: normal permissions (not mkdtemp's 0700), and the staging
directories of killed earlier writes are removed by the next write (those of a live process are kept)."""

import json
import os
import stat

import pytest
from flax import nnx

from seer_jax.adapters import save_adapter
from seer_jax.checkpoint import save_converted
from seer_jax.model import CausalLM
from seer_jax.staging import new_staging_dir
from tests.seer_jax.test_adapters import SINGLE, bf16_base, gated
from tests.seer_jax.tiny_models import TINY, random_module
from tests.train.tiny import TINY_HF_CONFIG


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _leftovers(target):
    """A killed run's staging directory (a pid that cannot exist), an old mkdtemp-style one, a live one (ours)."""
    dead = target.parent / f".{target.name}.99999999-0bad.partial"
    legacy = target.parent / f".{target.name}.k2j4h5g6.partial"
    live = target.parent / f".{target.name}.{os.getpid()}-beef.partial"
    for path in (dead, legacy, live):
        path.mkdir(parents=True)
        (path / "half-written").write_text("x")
    return dead, legacy, live


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_staging_dir_has_the_umask_permissions(tmp_path, umask_022):
    assert _mode(new_staging_dir(tmp_path / "out")) == 0o755


@pytest.mark.parametrize("what", ["adapter", "converted"])
def test_outputs_get_normal_permissions_and_stale_staging_is_removed(tmp_path, umask_022, what):
    target = tmp_path / what
    dead, legacy, live = _leftovers(target)
    if what == "adapter":
        save_adapter(gated(bf16_base(), SINGLE), target, base_model="org/tiny", weights="safetensors")
    else:
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
        save_converted(random_module(lambda: CausalLM(TINY, rngs=nnx.Rngs(0)), 0), target, hf_dir=tmp_path / "hf")
    assert _mode(target) == 0o755
    assert not dead.exists() and not legacy.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [live.name]
