"""The CLIs answer `--help` without importing jax, show their defaults, and the values their flags show are
the library's; the warm-up default scales with `--steps`."""

import subprocess
import sys

import pytest

from convert import flax_to_hf
from seer_jax.attention import IMPLEMENTATIONS
from seer_jax.decode_config import DECODE_ALLOCATION_RULES, Q_HEAD_POOLINGS
from seer_jax.hf_export import EXPORT_DTYPES
from tests.conftest import REPO_ROOT
from train import distill_gates, finetune
from train.distill import DTYPES, GATE_OPTIMIZER
from train.lm_training import COMPUTE_DTYPES
from train.losses import DECODE_SLICE_RATIO, DISTILLATION_TARGETS
from train.model_source import PRESETS
from train.optimizer import SCHEDULES, scaled_warmup_steps


@pytest.mark.parametrize(
    "module",
    [
        "train.distill_gates",
        "train.finetune",
        "train.eval_ppl",
        "train.demo",
        "seer_jax.generate",
        "convert.hf_to_flax",
        "convert.flax_to_hf",
    ],
)
def test_help_imports_no_jax_and_shows_defaults(module):
    code = (
        "import runpy, sys; sys.argv = ['x', '--help']\n"
        f"try:\n    runpy.run_module({module!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('JAX' if 'jax' in sys.modules else 'NO-JAX')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert result.stdout.rstrip().endswith("NO-JAX")
    assert "default" in result.stdout


def test_demo_flags_show_the_library_values():
    import dataclasses
    from pathlib import Path

    from train.demo.__main__ import DEFAULTS
    from train.demo.model import DemoModelConfig

    library = dataclasses.asdict(DemoModelConfig(cache_dir=Path()))
    assert {name: library[name] for name in DEFAULTS} == DEFAULTS


def test_distill_flags_show_the_library_values():
    assert distill_gates.TARGETS == DISTILLATION_TARGETS
    assert distill_gates.DTYPE_CHOICES == DTYPES
    assert distill_gates.Q_HEAD_POOLING_CHOICES == Q_HEAD_POOLINGS
    assert GATE_OPTIMIZER.learning_rate == distill_gates.RECIPE_LEARNING_RATE
    assert GATE_OPTIMIZER.warmup_steps == distill_gates.RECIPE_WARMUP_STEPS
    assert distill_gates.DECODE_SLICE == DECODE_SLICE_RATIO
    assert ("none", *DECODE_ALLOCATION_RULES) == distill_gates.DECODE_ALLOCATION_CHOICES


def test_finetune_flags_show_the_library_values():
    assert tuple(sorted(PRESETS)) == finetune.PRESET_CHOICES
    assert finetune.SCHEDULE_CHOICES == SCHEDULES
    assert finetune.DTYPE_CHOICES == COMPUTE_DTYPES
    assert finetune.ATTENTION_CHOICES == IMPLEMENTATIONS
    assert finetune.EXPORT_DTYPE_CHOICES == EXPORT_DTYPES
    assert flax_to_hf.EXPORT_DTYPES == EXPORT_DTYPES


def test_finetune_warmup_scales_with_the_run(tmp_path):
    flags = ["--preset", "demo-llama", "--tokenizer-dir", str(tmp_path), "--data", str(tmp_path / "docs.txt")]
    flags += ["--seq-len", "64", "--batch-size", "1", "--out", str(tmp_path / "run")]
    short = finetune.config_from_args(finetune.build_parser().parse_args([*flags, "--steps", "30"]))
    assert short.optimizer.warmup_steps == 3
    long = finetune.config_from_args(finetune.build_parser().parse_args([*flags, "--steps", "1000"]))
    assert long.optimizer.warmup_steps == finetune.RECIPE_WARMUP_STEPS


def _config(flags: list[str], tmp_path):
    args = distill_gates.build_parser().parse_args(flags)
    data, out = (tmp_path / "docs.txt",), tmp_path / "run"
    return distill_gates.distill_config_from_args(
        args, model=tmp_path, data=data, out=out, corpus_cache=None, dtype="float32"
    )


@pytest.mark.parametrize(("steps", "warmup"), [(20, 2), (80, 8), (200, 20), (5000, 20), (5, 0)])
def test_warmup_scales_with_the_run(steps, warmup, tmp_path):
    assert scaled_warmup_steps(GATE_OPTIMIZER.warmup_steps, steps) == warmup
    assert _config(["--steps", str(steps)], tmp_path).optimizer.warmup_steps == warmup
    assert _config(["--steps", str(steps), "--warmup-steps", "1"], tmp_path).optimizer.warmup_steps == 1
