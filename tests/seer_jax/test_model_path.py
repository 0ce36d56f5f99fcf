"""`resolve_model_path`: directories as they are, hub ids from a fake local Hugging Face cache, never the network."""

import socket

import pytest
from huggingface_hub import constants

from seer_jax.model_path import ModelPathError, resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root, repo_id: str, files: dict[str, str], *, commit: str = COMMIT, ref: str = "main"):
    """Lays out `root` as the hub cache holds a downloaded model: models--org--name/{refs/<ref>, snapshots/<commit>}."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub uses, and no network: any connection attempt fails the test."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("resolve_model_path touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return cache


def test_a_directory_is_returned_as_is(tmp_path, hub_cache):
    assert resolve_model_path(tmp_path) == tmp_path
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_hub_id_resolves_to_the_cached_snapshot(hub_cache):
    snapshot = fake_hub_cache(hub_cache, "org/tiny-llama", {"config.json": "{}"})
    assert resolve_model_path("org/tiny-llama") == snapshot
    assert resolve_model_path(f"org/tiny-llama@{COMMIT}") == snapshot
    other = fake_hub_cache(hub_cache, "org/tiny-llama", {"config.json": "{}"}, commit="f" * 40, ref="v1")
    assert resolve_model_path("org/tiny-llama@v1") == other


@pytest.mark.parametrize("name", ["org/not-downloaded", "org/tiny-llama@v2", "single-name"])
def test_hub_id_not_in_the_cache_is_one_clear_line(hub_cache, name):
    fake_hub_cache(hub_cache, "org/tiny-llama", {"config.json": "{}"})
    with pytest.raises(ModelPathError, match="neither a local directory nor in the Hugging Face cache") as raised:
        resolve_model_path(name, flag="--gates")
    message = str(raised.value)
    assert message.startswith(f"--gates {name} ") and str(hub_cache) in message and "hf download" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["./missing", "runs/a/b", "/no/such/dir"])
def test_missing_path_is_not_looked_up(hub_cache, name):
    with pytest.raises(ModelPathError, match="is not a directory"):
        resolve_model_path(name)


def test_a_file_is_not_a_model(tmp_path, hub_cache):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").write_text("")
    with pytest.raises(ModelPathError, match="is not a directory"):
        resolve_model_path(tmp_path / "org" / "name")
