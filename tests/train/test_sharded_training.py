"""Training on a device mesh: the distillation and fine-tuning losses and gradients equal the unsharded ones, the
loop's steps and checkpoints are the same, a checkpoint written on one mesh restores on another, and
`python -m train.distill_gates --mesh` runs end to end (tests/conftest.py splits the CPU into 8 devices)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from seer_jax.adapters import ADAPTER_FILE
from seer_jax.checkpoint import load_model, save_converted
from seer_jax.config import ModelConfig
from seer_jax.decode_config import DecodeConfig
from seer_jax.decode_gate import DECODE_GATE_PARAMS
from seer_jax.gate import GateConfig, GateParam
from seer_jax.hf_export import save_hf
from seer_jax.model import CausalLM
from seer_jax.seer import SeerCausalLM, SeerConfig
from seer_jax.sharding import MeshConfig, build_mesh, logical_rules, shard_batch, shard_model, tree_shardings
from seer_jax.sparsity import Selection
from tests.seer_jax.tiny_models import TINY, random_module, random_tokens
from tests.train.test_distill import MODEL_CONFIG
from tests.train.tiny import write_docs
from train.data import LoaderState
from train.distill_gates import main as distill_main
from train.eval_ppl import main as eval_main
from train.losses import distillation_loss, next_token_loss, seer_next_token_loss
from train.train_checkpoints import TrainCheckpointer
from train.train_step import init_train_state, split_trainable
from train.trainer import TrainLoopConfig, fit, read_metrics

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8 for CPU, "
    "but jax was initialised before it (or runs on fewer accelerators)",
)

GATE = GateConfig(hidden_size=16)
DECODE = DecodeConfig(hidden_size=16, block_size=32, qk_norm=True)


def _mesh(text: str):
    config = MeshConfig.parse(text)
    return build_mesh(config, jax.devices()[: config.num_devices])


def _seer(nz_ratio: float = 1.0, decode: DecodeConfig | None = None) -> SeerCausalLM:
    config = SeerConfig(gate=GATE, selection=Selection(nz_ratio=nz_ratio), decode=decode)
    return random_module(lambda: SeerCausalLM(TINY, config, rngs=nnx.Rngs(0)), 0, weight_std=0.3)


LOSSES = {
    # name: (model, loss function, what trains)
    "distill": (functools.partial(_seer, 1.0), distillation_loss(scale=10.0), GateParam),
    "distill-decode": (
        functools.partial(_seer, 1.0, DECODE),
        distillation_loss(scale=10.0, target="decode"),
        DECODE_GATE_PARAMS,
    ),
    "distill-both": (functools.partial(_seer, 1.0, DECODE), distillation_loss(scale=10.0, target="both"), GateParam),
    "finetune": (lambda: random_module(lambda: CausalLM(TINY, rngs=nnx.Rngs(0)), 0), next_token_loss, nnx.Param),
    "finetune-seer": (
        functools.partial(_seer, 0.5),
        functools.partial(seer_next_token_loss, gate_loss_scale=10.0),
        nnx.Param,
    ),
}


def _loss_and_grads(model, loss_fn, trainable, tokens):
    graphdef, params, frozen = split_trainable(model, trainable)

    @jax.jit
    def run(params, frozen, tokens):
        def loss_of(params):
            return loss_fn(nnx.merge(graphdef, params, frozen), tokens, jax.random.key(0))[0]

        return jax.value_and_grad(loss_of)(params)

    return jax.device_get(run(params, frozen, tokens))


# Every loss on every axis at once; tensor parallelism alone for the two losses that contain the others' terms
# (fsdp without data adds no collective the full mesh lacks).
@pytest.mark.parametrize(
    "loss_name, mesh_text",
    [(name, "data=2,fsdp=2,tensor=2") for name in sorted(LOSSES)]
    + [("distill-both", "tensor=2"), ("finetune-seer", "tensor=2")],
)
def test_loss_and_gradients_match_the_unsharded_step(loss_name, mesh_text):
    build, loss_fn, trainable = LOSSES[loss_name]
    tokens = random_tokens(0, 4, 256)
    expected_loss, expected_grads = _loss_and_grads(build(), loss_fn, trainable, jnp.asarray(tokens))
    mesh = _mesh(mesh_text)
    model = build()
    shard_model(model, mesh, logical_rules(TINY, mesh))
    with jax.set_mesh(mesh):
        loss, grads = _loss_and_grads(model, loss_fn, trainable, shard_batch(tokens, mesh))
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    flat, expected_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(expected_grads))
    assert len(flat) == len(expected_flat)
    for path, grad in flat:
        want = expected_flat[path].get_value()
        scale = np.abs(want).max()
        np.testing.assert_allclose(grad.get_value(), want, rtol=1e-4, atol=1e-5 * scale, err_msg=str(path))


class _Batches:
    """A loader over fixed random batches [4, 256], resumable at a row."""

    def __init__(self, state: LoaderState):
        self._state = state

    def __next__(self) -> np.ndarray:
        batch = random_tokens(self._state.row, 4, 256)
        self._state = LoaderState(epoch=0, row=self._state.row + 1)
        return batch

    @property
    def state(self) -> LoaderState:
        return self._state


def _fit(out_dir, steps: int, mesh_text: str | None, *, resume: bool = False):
    model = _seer()
    result = fit(
        model,
        loss_fn=distillation_loss(scale=10.0),
        optimizer=optax.sgd(0.05),
        config=TrainLoopConfig(out_dir=out_dir, total_steps=steps, checkpoint_every=2, resume=resume),
        make_loader=_Batches,
        trainable=GateParam,
        mesh=None if mesh_text is None else _mesh(mesh_text),
    )
    return model, result


def test_fit_on_a_mesh_then_restore_and_resume_on_another(tmp_path):
    _fit(tmp_path / "one_device", 3, None)
    model, sharded = _fit(tmp_path / "sharded", 2, "fsdp=2,tensor=2")
    gate = model.model.layers[0].self_attn.attn_gate.mask_linear_k.weight.get_value()
    assert gate.sharding.spec == P("tensor", None, "fsdp")  # trained in place, on the mesh
    one_device, on_mesh = read_metrics(tmp_path / "one_device"), read_metrics(tmp_path / "sharded")
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in on_mesh], [m[key] for m in one_device[:2]], rtol=1e-5)

    # The step-2 checkpoint (written sharded over fsdp=2,tensor=2) read onto data=2,tensor=4: bit-identical values
    # in the new mesh's shardings.
    new_mesh = _mesh("data=2,tensor=4")
    _, params, _ = split_trainable(_seer(), GateParam)
    template = init_train_state(params, optax.sgd(0.05), seed=0)
    template = jax.device_put(template, tree_shardings(template, new_mesh, logical_rules(TINY, new_mesh)))
    with TrainCheckpointer(tmp_path / "sharded", keep=3) as checkpointer:
        restored = checkpointer.restore(2, template).state
    leaves = (jax.tree.leaves(tree) for tree in (sharded.state.params, restored.params, template.params))
    for saved, read, placed in zip(*leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(read), np.asarray(saved))
        assert read.sharding == placed.sharding and read.sharding.mesh.shape == new_mesh.shape
    assert int(restored.step) == 2

    # Resuming that run on the other mesh continues it exactly where the single-device run went.
    _fit(tmp_path / "sharded", 3, "data=2,tensor=4", resume=True)
    np.testing.assert_allclose(read_metrics(tmp_path / "sharded")[-1]["loss"], one_device[-1]["loss"], rtol=1e-5)


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, stdlib_texts, tokenizer_dir):
    root = tmp_path_factory.mktemp("sharded_cli")
    write_docs(root / "docs.jsonl.gz", stdlib_texts[:20])
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text(json.dumps(MODEL_CONFIG))
    base = random_module(lambda: CausalLM(ModelConfig.from_hf(MODEL_CONFIG), rngs=nnx.Rngs(0)), 0)
    save_converted(base, root / "model", hf_dir=root / "hf")
    save_hf(base, MODEL_CONFIG, root / "hf_export", dtype="float32")
    common = ["--model", root / "model", "--data", root / "docs.jsonl.gz", "--tokenizer-dir", tokenizer_dir,
              "--corpus-cache", root / "cache", "--seq-len", "256", "--warmup-steps", "1", "--dtype", "float32",
              "--gate-hidden-size", "32"]  # fmt: skip
    return root, [str(a) for a in common]


def test_distill_gates_cli_runs_on_a_mesh(cli_inputs):
    root, common = cli_inputs
    out = root / "run"
    distill_main([*common, "--batch-size", "4", "--steps", "2", "--out", str(out), "--mesh", "data=2,fsdp=2,tensor=2"])
    losses = [line["loss"] for line in read_metrics(out)]
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert (out / "adapter" / ADAPTER_FILE).is_file()


def test_decode_distillation_cli_runs_on_a_mesh(cli_inputs):
    root, common = cli_inputs
    out = root / "run_decode"
    flags = ["--target", "decode", "--decode-block-size", "32", "--mesh", "data=2,fsdp=2,tensor=2"]
    flags += ["--decode-allocation", "recall", "--decode-quest-weight", "0.5", "--decode-quest-in-loss"]
    distill_main([*common, "--batch-size", "4", "--steps", "2", "--out", str(out), *flags])
    lines = read_metrics(out)
    assert len(lines) == 2 and np.isfinite([line["loss"] for line in lines]).all() and "decode_kl/layer_1" in lines[0]
    run_config = json.loads((out / "distill.json").read_text())
    assert run_config["target"] == "decode" and run_config["decode_quest_in_loss"] is True  # trained on the hybrid
    assert run_config["decode"]["hidden_size"] == MODEL_CONFIG["head_dim"]  # the default E: the model's head_dim
    marker = json.loads((out / "adapter" / ADAPTER_FILE).read_text())
    assert marker["seer_config"]["decode"]["block_size"] == 32
    assert marker["seer_config"]["decode"]["quest_weight"] == 0.5  # the flag's; the default, 0, is not written
    # The decode allocation is calibrated on the sharded model after training.
    assert marker["format"] == 4 and marker["seer_config"]["decode"]["allocation"]["rule"] == "recall"  # 4: a weight


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mesh", "data=3"], "spans 3 devices, but there are 8"),
        (["--mesh", "pipeline=8"], "unknown axis 'pipeline'"),
        (["--mesh", "data=0,tensor=8"], "data: mesh axis size must be a positive int"),
        (["--mesh", "data=4,fsdp=2", "--batch-size", "4"], "batch_size: 4 rows do not split over data × fsdp = 8"),
        (["--mesh", "tensor=8"], "tensor=8 does not divide the model's 4 query heads"),
    ],
)
def test_distill_gates_cli_rejects_bad_meshes(cli_inputs, flags, message):
    root, common = cli_inputs
    args = ["--batch-size", "8", "--steps", "2", "--out", str(root / "bad"), *flags]
    with pytest.raises(SystemExit, match=message):
        distill_main([*common, *args])


@pytest.mark.parametrize("directory", ["model", "hf_export"])
def test_load_model_places_each_weight_on_the_mesh(cli_inputs, directory):
    root, _ = cli_inputs
    expected, _ = load_model(root / directory)
    mesh = _mesh("data=2,fsdp=2,tensor=2")
    model, config = load_model(root / directory, mesh=mesh)
    q_proj = model.model.layers[1].self_attn.q_proj.kernel.get_value()
    assert q_proj.sharding.spec == P("fsdp", "tensor") and q_proj.sharding.mesh.shape == mesh.shape
    shardings = tree_shardings(nnx.state(model), mesh, logical_rules(config, mesh))
    for value, sharding, want in zip(
        jax.tree.leaves(nnx.state(model)), jax.tree.leaves(shardings), jax.tree.leaves(nnx.state(expected)), strict=True
    ):
        assert value.sharding == sharding
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want))


def test_eval_ppl_on_a_mesh_matches_one_device(cli_inputs):
    """2 documents per batch on data=2,fsdp=2 (4 rows of devices): attention runs every row on each device."""
    root, common = cli_inputs
    flags = dict(zip(common[::2], common[1::2], strict=True))
    args = ["--model", flags["--model"], "--data", flags["--data"], "--tokenizer-dir", flags["--tokenizer-dir"],
            "--cache-dir", flags["--corpus-cache"], "--lengths", "256", "--num-docs", "2", "--batch-size", "2",
            "--methods", "dense", "oracle", "--nz-ratios", "0.5"]  # fmt: skip
    eval_main([*args, "--out", str(root / "eval_one")])
    eval_main([*args, "--out", str(root / "eval_mesh"), "--mesh", "data=2,fsdp=2,tensor=2"])
    one, mesh = (json.loads((root / name / "results.json").read_text()) for name in ("eval_one", "eval_mesh"))
    assert [row["method"] for row in mesh["rows"]] == ["dense", "oracle"]
    for want, got in zip(one["rows"], mesh["rows"], strict=True):
        np.testing.assert_allclose(got["doc_nll"], want["doc_nll"], rtol=1e-5)
        assert got["density"] == pytest.approx(want["density"], abs=1e-6)
