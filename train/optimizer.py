"""The one optimizer recipe of every training job: AdamW with warmup and a decay schedule, gradient clipping and
weight decay on matrices only.

HF Trainer's AdamW (docs/design.md §5: `max_grad_norm` 1.0, warmup then linear or cosine decay), in optax; gate
distillation runs it with `train.distill.GATE_OPTIMIZER`, full fine-tuning with `python -m train.finetune`'s flags:

    clip_by_global_norm(grad_clip_norm) → adamw(schedule, b1, b2, eps, weight_decay, mask=ndim >= 2)

The schedule rises linearly from 0 over `warmup_steps` (step 0 uses rate 0, as HF's does) to `learning_rate`, then
decays (cosine or linearly) to `min_learning_rate` at `total_steps`, or stays constant. Weight decay applies to
weight matrices and embeddings only, never to norm scales or biases (HF Trainer's rule).
"""

import dataclasses

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """learning_rate: peak rate. warmup_steps: linear warmup length. schedule: one of `SCHEDULES` (decay after the
    warmup). min_learning_rate: rate reached at the last step. beta1, beta2, epsilon: Adam's. weight_decay:
    decoupled decay of matrices. grad_clip_norm: clip the global gradient norm to this; None: no clipping.
    """

    learning_rate: float
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_learning_rate: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    epsilon: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float | None = 1.0

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: {self.learning_rate} must be positive")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: {self.warmup_steps} must be non-negative")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: {self.schedule!r} is not one of {SCHEDULES}")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError(f"min_learning_rate: {self.min_learning_rate} must lie in [0, learning_rate]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must lie in [0, 1)")
        if not self.epsilon > 0:
            raise ValueError(f"epsilon: {self.epsilon} must be positive")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: {self.weight_decay} must be non-negative")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm: {self.grad_clip_norm} must be positive (or None: no clipping)")


def scaled_warmup_steps(recipe_warmup_steps: int, total_steps: int) -> int:
    """A recipe's warm-up for a run of `total_steps`: the recipe's, but at most a tenth of the run (a short run
    would otherwise be all warm-up, or fail: warm-up must be shorter than the run)."""
    return min(recipe_warmup_steps, total_steps // 10)


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The rate step k (0-based) uses; see the module docstring."""
    if total_steps <= config.warmup_steps:
        raise ValueError(f"total_steps: {total_steps} must exceed warmup_steps ({config.warmup_steps})")
    peak, warmup, decay_steps = config.learning_rate, config.warmup_steps, total_steps - config.warmup_steps
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_learning_rate / peak)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(peak, config.min_learning_rate, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def build_optimizer(config: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(the optax transformation, its learning-rate schedule)."""
    schedule = learning_rate_schedule(config, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=config.beta1,
        b2=config.beta2,
        eps=config.epsilon,
        weight_decay=config.weight_decay,
        mask=lambda params: jax.tree.map(lambda leaf: leaf.ndim >= 2, params),
    )
    if config.grad_clip_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw), schedule
