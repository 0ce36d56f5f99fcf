"""One optimisation step, generic over what trains: a loss function, an optax optimizer, an NNX filter.

The model is split once by a filter into the trainable variables and the frozen rest:

    graphdef, params, frozen = split_trainable(model, trainable)     # e.g. trainable=nnx.Param, or a gate type

Only `params` are differentiated, given to the optimizer (so it holds no state for frozen variables) and saved in
training checkpoints; `frozen` is passed to the jitted step as an argument (not captured as a constant, which
would copy it into the compiled program). A step merges the two back into a model and calls the loss function:

    loss_fn(model, batch, rng) -> (loss, metrics)

`batch` is int32 tokens [B, T] (packed rows, see `train.data`); `rng` is a typed PRNG key that is a function of
(run seed, step), so a resumed run draws the same keys; `loss` is a float32 scalar and `metrics` a dict of float32
scalars that is reported alongside it (e.g. a distillation loss's parts). The step adds `loss`, `grad_norm` (global
L2 norm of the raw gradients, before clipping) and `lr` (when given a schedule) to the metrics.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Metrics = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, jax.Array, jax.Array], tuple[jax.Array, Metrics]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainState:
    """Everything a training run changes; a pytree.

    params: the trainable variables (an `nnx.State` holding only what the filter selected).
    opt_state: the optax state over `params`.
    step: int32 [], optimizer updates applied so far.
    rng: the run's base key (typed); step k draws `jax.random.fold_in(rng, k)`.
    """

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array


StepFn = Callable[[TrainState, jax.Array], tuple[TrainState, Metrics]]


def split_trainable(model: nnx.Module, trainable: nnx.filterlib.Filter) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable variables, every other variable) of `model`; raises ValueError if nothing trains."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    if not jax.tree.leaves(params):
        raise ValueError(f"trainable: the filter {trainable!r} selects no variable of {type(model).__name__}")
    return graphdef, params, frozen


def init_train_state(params: nnx.State, optimizer: optax.GradientTransformation, *, seed: int) -> TrainState:
    """Step 0: the optimizer initialised over `params`, the base key from `seed`."""
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key(seed),
    )


def build_train_step(
    graphdef: nnx.GraphDef,
    frozen: nnx.State,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    learning_rate: optax.Schedule | None = None,
    out_shardings: tuple[Any, Any] | None = None,
) -> StepFn:
    """A jitted `(state, batch) -> (state, metrics)`; the input state's buffers are donated.

    Args:
      graphdef, frozen: from `split_trainable`.
      loss_fn: see the module docstring.
      optimizer: applied to the gradients of the trainable variables.
      learning_rate: the optimizer's schedule, only to report `lr` (the rate step k uses) in the metrics.
      out_shardings: (the new state's shardings, the metrics'), to keep a sharded state where it is on its mesh
        (`seer_jax.sharding.tree_shardings`); None: one device, or wherever XLA puts them.
    """

    @functools.partial(jax.jit, donate_argnums=1, out_shardings=out_shardings)
    def step(frozen: nnx.State, state: TrainState, batch: jax.Array) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_of(params: nnx.State) -> tuple[jax.Array, Metrics]:
            return loss_fn(nnx.merge(graphdef, params, frozen), batch, rng)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss.astype(jnp.float32), "grad_norm": optax.tree.norm(grads)}
        if learning_rate is not None:
            metrics["lr"] = jnp.asarray(learning_rate(state.step), jnp.float32)
        new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1, rng=state.rng)
        return new_state, metrics

    return lambda state, batch: step(frozen, state, batch)
