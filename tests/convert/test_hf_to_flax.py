"""`python -m convert.hf_to_flax`: round trip, the testbed against HF torch, and every failure it must explain."""

import gzip
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert.hf_to_flax import main
from seer_jax.checkpoint import MARKER_FILE, is_converted, load_model
from seer_jax.generate import prefill

TINY_LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def tiny_hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama saved twice: as one model.safetensors and as shards with an index."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (single / "model.safetensors").is_file() and (sharded / "model.safetensors.index.json").is_file()
    return {"single": single, "sharded": sharded}


def editable_copy(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def run_failing(capsys, *args) -> str:
    """Runs the CLI expecting failure; returns its one-line message."""
    with pytest.raises(SystemExit) as raised:
        main([str(arg) for arg in args])
    message = raised.value.code if isinstance(raised.value.code, str) else capsys.readouterr().err
    assert raised.value.code != 0
    assert message.strip().count("\n") == 0, message
    return message


def assert_no_output(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a staging directory was left behind"


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_converted_equals_hf_dir(tiny_hf_dirs, tmp_path, layout, dtype):
    hf_dir = tiny_hf_dirs[layout]
    out = tmp_path / "converted"
    main(["--hf-dir", str(hf_dir), "--out", str(out), "--dtype", dtype])
    assert is_converted(out) and (out / "config.json").is_file()
    converted, config = load_model(out, param_dtype=jnp.dtype(dtype))
    direct, _ = load_model(hf_dir, param_dtype=jnp.dtype(dtype))
    assert config.num_layers == 2
    converted_state, direct_state = nnx.state(converted, nnx.Param), nnx.state(direct, nnx.Param)
    for ours, reference in zip(jax.tree.leaves(converted_state), jax.tree.leaves(direct_state), strict=True):
        assert ours.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(ours, reference)
    hf_tensors = load_file(tiny_hf_dirs["single"] / "model.safetensors")
    np.testing.assert_array_equal(
        np.asarray(converted.model.layers[1].self_attn.k_proj.kernel[...], np.float32),
        np.asarray(jnp.asarray(hf_tensors["model.layers.1.self_attn.k_proj.weight"]).astype(dtype), np.float32).T,
    )


def test_bad_dtype(capsys, tiny_hf_dirs, tmp_path):
    message = run_failing(capsys, "--hf-dir", tiny_hf_dirs["single"], "--out", tmp_path / "o", "--dtype", "fp16")
    assert "--dtype must be one of bfloat16, float32, got 'fp16'" in message
    assert_no_output(tmp_path / "o")


def test_missing_hf_dir(capsys, tmp_path):
    message = run_failing(capsys, "--hf-dir", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert "is not a directory" in message
    assert_no_output(tmp_path / "o")


def test_output_exists(capsys, tiny_hf_dirs, tmp_path):
    (tmp_path / "o").mkdir()
    message = run_failing(capsys, "--hf-dir", tiny_hf_dirs["single"], "--out", tmp_path / "o")
    assert "already exists; choose a new directory or remove it" in message


def test_missing_config(capsys, tiny_hf_dirs, tmp_path):
    hf_dir = editable_copy(tiny_hf_dirs["single"], tmp_path / "hf")
    (hf_dir / "config.json").unlink()
    message = run_failing(capsys, "--hf-dir", hf_dir, "--out", tmp_path / "o")
    assert "no config.json" in message
    assert_no_output(tmp_path / "o")


def test_unsupported_model_type(capsys, tiny_hf_dirs, tmp_path):
    hf_dir = editable_copy(tiny_hf_dirs["single"], tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    message = run_failing(capsys, "--hf-dir", hf_dir, "--out", tmp_path / "o")
    assert "model_type 'gpt2' is not supported" in message
    assert_no_output(tmp_path / "o")


def test_no_weights(capsys, tiny_hf_dirs, tmp_path):
    hf_dir = editable_copy(tiny_hf_dirs["single"], tmp_path / "hf")
    (hf_dir / "model.safetensors").unlink()
    message = run_failing(capsys, "--hf-dir", hf_dir, "--out", tmp_path / "o")
    assert "no model.safetensors or model.safetensors.index.json" in message
    assert_no_output(tmp_path / "o")


def test_missing_shard(capsys, tiny_hf_dirs, tmp_path):
    hf_dir = editable_copy(tiny_hf_dirs["sharded"], tmp_path / "hf")
    shard = sorted(hf_dir.glob("model-*.safetensors"))[-1]
    shard.unlink()
    message = run_failing(capsys, "--hf-dir", hf_dir, "--out", tmp_path / "o")
    assert f"lists shard files that are missing: {shard.name}" in message
    assert "re-download" in message
    assert_no_output(tmp_path / "o")


def test_shard_disagrees_with_index(capsys, tiny_hf_dirs, tmp_path):
    hf_dir = editable_copy(tiny_hf_dirs["sharded"], tmp_path / "hf")
    shard = sorted(hf_dir.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file({**tensors, "model.extra.weight": np.zeros((2,), np.float32)}, shard, metadata={"format": "pt"})
    message = run_failing(capsys, "--hf-dir", hf_dir, "--out", tmp_path / "o")
    assert f"{shard.name} does not match model.safetensors.index.json" in message
    assert f"missing: {dropped}; not in the index: model.extra.weight" in message
    assert_no_output(tmp_path / "o")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(capsys, tiny_hf_dirs, tmp_path, damage):
    hf_dir = editable_copy(tiny_hf_dirs["single"], tmp_path / "hf")
    weights = hf_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x13" * 64)
    message = run_failing(capsys, "--hf-dir", hf_dir, "--out", tmp_path / "o")
    assert "is not a readable safetensors file" in message and "re-download it" in message
    assert_no_output(tmp_path / "o")


def rewrite_tensors(hf_dir: Path, edit) -> None:
    weights = hf_dir / "model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})


def test_unmapped_tensor(capsys, tiny_hf_dirs, tmp_path):
    hf_dir = editable_copy(tiny_hf_dirs["single"], tmp_path / "hf")
    extra = np.zeros((4,), np.float32)
    rewrite_tensors(hf_dir, lambda tensors: tensors.update({"model.layers.0.self_attn.sinks.weight": extra}))
    message = run_failing(capsys, "--hf-dir", hf_dir, "--out", tmp_path / "o")
    assert "1 tensor(s)" in message and "match no model parameter: model.layers.0.self_attn.sinks.weight" in message
    assert_no_output(tmp_path / "o")


def test_missing_tensor(capsys, tiny_hf_dirs, tmp_path):
    hf_dir = editable_copy(tiny_hf_dirs["single"], tmp_path / "hf")
    rewrite_tensors(hf_dir, lambda tensors: tensors.pop("model.layers.1.mlp.up_proj.weight"))
    message = run_failing(capsys, "--hf-dir", hf_dir, "--out", tmp_path / "o")
    assert "1 model parameter(s) have no tensor" in message and "model.layers.1.mlp.up_proj.weight" in message
    assert_no_output(tmp_path / "o")


def test_shape_mismatch(capsys, tiny_hf_dirs, tmp_path):
    hf_dir = editable_copy(tiny_hf_dirs["single"], tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    message = run_failing(capsys, "--hf-dir", hf_dir, "--out", tmp_path / "o")
    assert "6 tensor shape(s) do not fit the model" in message
    assert "model.layers.0.mlp.down_proj.weight [32, 48] (expected [32, 64])" in message
    assert_no_output(tmp_path / "o")


def test_failure_while_writing_leaves_nothing(capsys, tiny_hf_dirs, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", fail)
    message = run_failing(capsys, "--hf-dir", tiny_hf_dirs["single"], "--out", tmp_path / "o")
    assert "disk full" in message
    assert_no_output(tmp_path / "o")


def test_marker_written_last(tiny_hf_dirs, tmp_path):
    """A directory without the marker (an interrupted copy) is not taken for a converted checkpoint."""
    out = tmp_path / "o"
    main(["--hf-dir", str(tiny_hf_dirs["single"]), "--out", str(out)])
    (out / MARKER_FILE).unlink()
    assert not is_converted(out)


@pytest.mark.testbed
def test_testbed_matches_hf_torch(testbed_dir, tmp_path):
    """seer-tiny-llama converted to fp32 equals HF torch (fp32) on 512 real tokens of held-out stdlib code."""
    hf_dir = testbed_dir / "seer-tiny-llama"
    out = tmp_path / "converted"
    main(["--hf-dir", str(hf_dir), "--out", str(out), "--dtype", "float32"])
    model, config = load_model(out)

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    with gzip.open(testbed_dir / "data" / "eval_stdlib.jsonl.gz", "rt") as lines:
        texts = [json.loads(next(lines))["text"] for _ in range(2)]
    length, padding = 512, 64
    tokens = np.full((2, length), config.pad_token_id, np.int64)
    for row, (text, start) in enumerate(zip(texts, (0, padding), strict=True)):
        ids = tokenizer(text[:20000], add_special_tokens=False).input_ids
        tokens[row, start:] = [config.bos_token_id, *ids[: length - start - 1]]
    mask = np.arange(length)[None, :] >= np.asarray([0, padding])[:, None]

    with jax.default_matmul_precision("highest"):  # GPUs would otherwise run float32 matmuls as TF32
        ours, _ = prefill(model, jnp.asarray(tokens), jnp.asarray(mask), max_length=length, return_all_logits=True)
    reference_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = reference_model(
            input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask.astype(np.int64))
        ).logits.numpy()
    ours = np.asarray(ours, np.float64)
    error = np.abs(ours - reference)[mask].max() / np.abs(reference[mask]).max()
    assert error <= 1e-4
