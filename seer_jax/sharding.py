"""Scale-out on JAX's own engine: a device mesh, logical-axis rules, and parameters and state placed on the mesh.

Mesh axes (`MESH_AXES`, always in this order, each of size >= 1; their product is the number of devices):

    data    data parallelism: batch rows are split, parameters and optimizer state are replicated.
    fsdp    fully-sharded data parallelism: batch rows are split, and so are parameters and optimizer state (along
            `embed` for the model's weights, along the gate hidden size E for the gates); XLA gathers a weight where
            a layer needs it.
    tensor  tensor parallelism: query and kv heads (the q/k/v/o projections and the per-head gate weights, so a
            gate lives with its heads), the MLP hidden size F and the vocabulary.

Every parameter carries logical axis names as `out_sharding` metadata (`seer_jax.layers`, `seer_jax.gate`); the
rules (`logical_rules`) map them to mesh axes:

    batch -> (data, fsdp)     embed -> fsdp     gate_hidden -> fsdp
    vocab, mlp, q_heads -> tensor               kv_heads -> tensor (replicated when K < tensor size)
    norm, gate_in -> replicated

Query heads must divide evenly over `tensor` (`check_model_fits` raises otherwise); kv heads must either divide
over it or divide it (K < tensor: each device needs the one kv head its query heads read, so k_proj/v_proj stay
replicated over `tensor` and `seer_jax.head_parallel` repeats k/v heads up to the tensor size). Any other dimension
that its mesh axes do not divide (an odd vocabulary, say) is replicated along them.

Optimizer state is sharded like the parameters it mirrors: optax keeps each parameter's `nnx.Variable` wrapper
(and so its logical names) in its moments, so `tree_shardings` of a whole `TrainState` gives every moment its
parameter's sharding and every other array (step counters, keys) full replication.
"""

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from seer_jax.config import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
Rules = dict[str, tuple[str, ...]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """The sizes of the mesh axes `data`, `fsdp` and `tensor` (see the module docstring)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for name in MESH_AXES:
            size = getattr(self, name)
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError(f"{name}: mesh axis size must be a positive int, got {size!r}")

    @classmethod
    def parse(cls, text: str) -> "MeshConfig":
        """`"data=1,fsdp=2,tensor=2"` → MeshConfig; axes left out have size 1."""
        sizes: dict[str, int] = {}
        for item in text.split(","):
            name, equals, value = item.strip().partition("=")
            name = name.strip()
            if not equals or not name:
                raise ValueError(f"mesh: {text!r} must look like 'data=1,fsdp=2,tensor=2' (item {item!r})")
            if name not in MESH_AXES:
                raise ValueError(f"mesh: unknown axis {name!r} in {text!r}; the axes are {', '.join(MESH_AXES)}")
            if name in sizes:
                raise ValueError(f"mesh: axis {name!r} appears twice in {text!r}")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ValueError(f"{name}: mesh axis size must be a positive int, got {value.strip()!r}") from None
        return cls(**sizes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data, self.fsdp, self.tensor

    @property
    def batch_shards(self) -> int:
        """How many ways batch rows are split: data × fsdp."""
        return self.data * self.fsdp

    @property
    def num_devices(self) -> int:
        return self.data * self.fsdp * self.tensor

    def __str__(self) -> str:
        return ",".join(f"{name}={size}" for name, size in zip(MESH_AXES, self.shape, strict=True))


def build_mesh(config: MeshConfig, devices: list[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes (data, fsdp, tensor) over `devices` (default: every device of every process).

    Axes are `AxisType.Auto`: outside `shard_map` XLA's SPMD partitioner decides the layout of intermediates.
    """
    devices = jax.devices() if devices is None else list(devices)
    if config.num_devices != len(devices):
        raise ValueError(
            f"mesh: {config} spans {config.num_devices} devices, but there are {len(devices)} "
            f"({jax.process_count()} process(es)); the sizes of {', '.join(MESH_AXES)} must multiply to the device "
            "count"
        )
    return jax.make_mesh(config.shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _axis_size(mesh: Mesh, axis: str) -> int:
    return dict(mesh.shape).get(axis, 1)


def check_model_fits(config: ModelConfig, mesh: Mesh) -> None:
    """Raises ValueError unless the model's heads split over the mesh's `tensor` axis (see the module docstring)."""
    tensor = _axis_size(mesh, HEAD_AXIS)
    if config.num_q_heads % tensor:
        raise ValueError(
            f"mesh: tensor={tensor} does not divide the model's {config.num_q_heads} query heads; choose a tensor "
            "size that does (and use fsdp or data for the other devices)"
        )
    if config.num_kv_heads % tensor and tensor % config.num_kv_heads:
        raise ValueError(
            f"mesh: tensor={tensor} and the model's {config.num_kv_heads} kv heads do not divide one another; "
            "choose a tensor size that divides the kv heads or is a multiple of them"
        )


def logical_rules(config: ModelConfig, mesh: Mesh) -> Rules:
    """Logical axis name → mesh axes, for this model on this mesh; checks `check_model_fits` first."""
    check_model_fits(config, mesh)
    kv_heads = (HEAD_AXIS,) if config.num_kv_heads % _axis_size(mesh, HEAD_AXIS) == 0 else ()
    return {
        "batch": BATCH_AXES,
        "embed": ("fsdp",),
        "gate_hidden": ("fsdp",),
        "vocab": (HEAD_AXIS,),
        "mlp": (HEAD_AXIS,),
        "q_heads": (HEAD_AXIS,),
        "kv_heads": kv_heads,
        "norm": (),
        "gate_in": (),
    }


def partition_spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> PartitionSpec:
    """The `PartitionSpec` of an array of `shape` whose dimensions have the logical `names`.

    A dimension its mesh axes do not divide is replicated (size-1 mesh axes are dropped). Unknown names raise.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical axes {names} do not match the shape {shape}")
    spec = []
    for name, size in zip(names, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule (known: {sorted(rules)})")
        axes = tuple(axis for axis in rules[name] if _axis_size(mesh, axis) > 1)
        if not axes or size % int(np.prod([_axis_size(mesh, axis) for axis in axes])):
            spec.append(None)
        else:
            spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def tree_shardings(tree, mesh: Mesh, rules: Rules):
    """`NamedSharding`s for a pytree of `nnx.Variable`s and arrays (an `nnx.State`, a `TrainState`, optax state).

    A Variable's comes from its logical names (`out_sharding` metadata) through `rules`; any other array (or
    `jax.ShapeDtypeStruct`) is replicated. The result has `tree`'s structure, for `jax.device_put` or `jax.jit`.
    """

    def sharding_of(leaf):
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            names = leaf.get_metadata().get("out_sharding") or (None,) * value.ndim
            return leaf.replace(NamedSharding(mesh, partition_spec(tuple(names), value.shape, mesh, rules)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(sharding_of, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules) -> None:
    """Moves every variable of `model` onto `mesh` as `rules` say, in place."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, tree_shardings(state, mesh, rules)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches [B, T]: rows split over (data, fsdp), positions whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def check_batch_size(batch_size: int, config: MeshConfig) -> None:
    """Raises ValueError unless `batch_size` rows split evenly over data × fsdp."""
    if batch_size % config.batch_shards:
        raise ValueError(
            f"batch_size: {batch_size} rows do not split over data × fsdp = {config.batch_shards} devices of mesh "
            f"{config}; use a multiple of {config.batch_shards}"
        )


def batch_rows(mesh: Mesh) -> int:
    """How many ways `mesh` splits batch rows: data × fsdp."""
    return int(np.prod([_axis_size(mesh, axis) for axis in BATCH_AXES]))


def shard_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host batch [B, T] (the same on every process) as one global array with `batch_sharding`.

    Each process copies only the rows its own devices hold, so this also works across hosts.
    """
    rows = batch_rows(mesh)
    if batch.shape[0] % rows:
        raise ValueError(
            f"batch_size: {batch.shape[0]} rows do not split over data × fsdp = {rows} devices; "
            f"use a multiple of {rows}"
        )
    sharding = batch_sharding(mesh)
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])
