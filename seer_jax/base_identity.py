"""The identity of the base model a gate adapter was trained on, recorded in the adapter and checked on attach.

Gates are trained against one base model's attention: attached to another (a different checkpoint of the same
shape, another head layout) they select blocks for attention they never saw, silently. `save_adapter` records

    {"config": the base `ModelConfig` as JSON, "fingerprint": sha256 of a sample of the base weights}

and `check_base_identity` compares it with the base the adapter is about to be attached to, raising
`CheckpointError` with the differences unless told to allow another base. The fingerprint hashes each base
parameter's state path, shape, and its first and last 16 entries along the last axis of its first and last rows,
rounded to bfloat16: the same for a checkpoint loaded in float32 or bfloat16 (bf16 → f32 → bf16 is exact, and a
float32 checkpoint cast to bf16 on load rounds as this does), different for any other weights. Only a few entries
of each array are read, so a sharded model is never gathered.

Official adapters (`config.json` with `seerattn_*` keys) carry their base's config but no fingerprint: only the
config is compared.
"""

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seer_jax.config import ModelConfig
from seer_jax.gate import GateParam
from seer_jax.hf_weights import CheckpointError

_SAMPLE = 16
# ModelConfig fields that do not describe the weights' meaning (token ids, the random-init scale).
_NOT_COMPARED = ("initializer_range", "bos_token_id", "eos_token_ids", "pad_token_id")
# config.json keys of an official adapter → ModelConfig fields.
_OFFICIAL_KEYS = {
    "model_type": "model_type",
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_q_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
}


def config_identity(config: ModelConfig) -> dict[str, Any]:
    """The architecture part of the identity: the ModelConfig as JSON values, token ids left out."""
    values = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    return {name: value for name, value in values.items() if name not in _NOT_COMPARED}


def official_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The identity an official adapter's config.json gives: the base's architecture fields it holds."""
    return {"config": {ours: config[key] for key, ours in _OFFICIAL_KEYS.items() if config.get(key) is not None}}


def base_identity(model: nnx.Module) -> dict[str, Any]:
    """{"config", "fingerprint"} of `model`'s base (a `CausalLM`, or a `SeerCausalLM`, whose gates are left out)."""
    digest = hashlib.sha256()
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(GateParam)))
    for path, variable in sorted(nnx.to_flat_state(state), key=lambda item: tuple(map(str, item[0]))):
        value = variable.get_value()
        digest.update(".".join(map(str, path)).encode() + str(tuple(value.shape)).encode())
        if value.ndim == 0 or value.size == 0:
            continue
        first, last = value[(0,) * (value.ndim - 1)][:_SAMPLE], value[(-1,) * (value.ndim - 1)][-_SAMPLE:]
        for sample in (first, last):
            digest.update(np.asarray(jax.device_get(jnp.asarray(sample).astype(jnp.bfloat16))).tobytes())
    return {"config": config_identity(model.config), "fingerprint": digest.hexdigest()}


def check_base_identity(
    recorded: Mapping[str, Any] | None, base: nnx.Module, *, adapter: str, allow_other_base: bool = False
) -> None:
    """Raises `CheckpointError` when `base` is not the model the adapter (named `adapter` in messages) recorded;
    does nothing when nothing was recorded (adapters written before this check existed) or `allow_other_base`."""
    if recorded is None or allow_other_base:
        return
    differences = []
    if "config" in recorded:
        ours = config_identity(base.config)
        theirs = recorded["config"]
        differences += [
            f"{name} {theirs.get(name)!r} ≠ {ours.get(name)!r}"
            for name in sorted(theirs)  # what the adapter recorded (an official one: a few fields)
            if name in ours and theirs[name] != ours[name]
        ]
    if not differences and recorded.get("fingerprint") not in (None, base_identity(base)["fingerprint"]):
        differences.append("the weights differ (another checkpoint of the same architecture)")
    if differences:
        raise CheckpointError(
            f"the gate adapter {adapter} was trained on another base model: {'; '.join(differences)}. Attach it to "
            "the base it was trained on, or allow another base explicitly (allow_other_base=True, CLI "
            "--allow-other-base) if that is intended"
        )
