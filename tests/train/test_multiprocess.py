"""The CLIs in a real multi-process job: two JAX processes × 4 CPU devices on this machine, joined with
`--distributed --coordinator localhost:PORT` (gloo collectives, jax's default on CPU), against single-process runs
of the same commands in this pytest process (1 device, or its 8 devices, tests/conftest.py).

* Gate distillation on `data=2,fsdp=2,tensor=2` (the data axis spans the processes): SIGTERM reaches one process
  only after step 2, both stop at step 3 with a checkpoint (exit 143), the job resumes and finishes; its losses
  and its adapter equal a 1-device run's. The stopped run's checkpoint also resumes in one process on 8 devices.
* Fine-tuning in SeerAttention mode on `fsdp=4,tensor=2` (the fsdp axis spans the processes, so no process holds
  any whole weight): the same stop and resume; losses, the converted model, the HF export and the gate adapter equal
  a 1-device run's; the stopped run's checkpoint (shards from both processes) resumes on 1 device.
* Evaluation on `data=2,fsdp=2,tensor=2`: every document's NLL and the densities equal a 1-device evaluation's.

In every job only process 0 logs at INFO, draws progress bars and writes metrics.jsonl (one line per step).
The jobs share a persistent compilation cache (tmp_path), so a resumed job does not compile its step again.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from seer_jax.adapters import read_adapter, save_adapter
from seer_jax.checkpoint import load_model, save_converted
from seer_jax.config import ModelConfig
from seer_jax.gate import GateConfig
from seer_jax.model import CausalLM
from seer_jax.seer import seer_from_base
from seer_jax.seer_config import SeerConfig
from tests.seer_jax.tiny_models import random_module
from tests.train.test_distill import MODEL_CONFIG as DISTILL_MODEL_CONFIG
from tests.train.tiny import write_docs
from train.distill_gates import main as distill_main
from train.eval_ppl import main as eval_main
from train.finetune import main as finetune_main
from train.trainer import read_metrics

pytestmark = [
    pytest.mark.xdist_group("multiprocess"),  # one worker: the module fixtures build once (--dist loadgroup)
    pytest.mark.slow,
    pytest.mark.skipif(
        jax.default_backend() != "cpu" or jax.device_count() < 8,
        reason="the one-process references run on 8 CPU devices (tests/conftest.py splits the CPU into 8), as the "
        "jobs do",
    ),
]

MODEL_CONFIG = {**DISTILL_MODEL_CONFIG, "num_hidden_layers": 1}  # one layer: each job compiles faster
REPO_ROOT = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("multiprocess_cli.py")
PROCESSES, DEVICES_PER_PROCESS = 2, 4
JOB_TIMEOUT_S = 300
STEPS = ["--steps", "4", "--checkpoint-every", "2"]
LOSS_RTOL = 1e-5  # tests/train/test_sharded_training.py's, for the same comparison on one process
# Weights after 4 AdamW steps, as test_sharded_training.py compares gradients: rtol 1e-4, atol 1e-5 × the largest
# entry (AdamW's m/√v magnifies the reductions' rounding where a gradient entry is near 0).
WEIGHT_RTOL, WEIGHT_ATOL_SCALE = 1e-4, 1e-5


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, stdlib_texts, tokenizer_dir):
    """The data, a converted tiny base model, a gate adapter for it (random gates) and the flags they need."""
    root = tmp_path_factory.mktemp("multiprocess")
    write_docs(root / "docs.jsonl.gz", stdlib_texts[:20])
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text(json.dumps(MODEL_CONFIG))
    base = random_module(lambda: CausalLM(ModelConfig.from_hf(MODEL_CONFIG), rngs=nnx.Rngs(0)), 3, weight_std=0.3)
    save_converted(base, root / "model", hf_dir=root / "hf")
    seer = seer_from_base(base, SeerConfig(gate=GateConfig(hidden_size=32)), rngs=nnx.Rngs(1))
    save_adapter(seer, root / "gates", base_model=str(root / "model"), weights="safetensors")
    data = ["--model", root / "model", "--data", root / "docs.jsonl.gz", "--tokenizer-dir", tokenizer_dir]
    return root, [str(arg) for arg in data]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _run_job(module: str, args: list, work: Path, *, sigterm_after_step: int | None = None, expect: int = 0):
    """Runs `python -m module args` as a job of PROCESSES processes (PYTHONPATH: this checkout); a SIGTERM goes to
    the last process only. Returns each process's output."""
    port, name = _free_port(), f"{module}-{len(list(work.glob('*.log'))) // PROCESSES}"
    env = os.environ | {
        "PYTHONPATH": str(REPO_ROOT),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
        "JAX_COMPILATION_CACHE_DIR": str(work / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    distributed = ["--distributed", "--coordinator", f"localhost:{port}", "--num-processes", str(PROCESSES)]
    logs = [work / f"{name}.{index}.log" for index in range(PROCESSES)]
    processes = []
    try:
        for index, log in enumerate(logs):
            signal_flags = []
            if sigterm_after_step is not None and index == PROCESSES - 1:
                signal_flags = ["--sigterm-after-step", str(sigterm_after_step)]
            command = [sys.executable, str(HELPER), *signal_flags, module, *map(str, args), *distributed]
            with log.open("w") as out:
                processes.append(
                    subprocess.Popen(
                        [*command, "--process-id", str(index)], stdout=out, stderr=subprocess.STDOUT, env=env
                    )
                )
        codes = _wait_all(processes, expect)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    outputs = [log.read_text() for log in logs]
    assert codes == [expect] * PROCESSES, "\n".join(f"--- process {i}:\n{out[-3000:]}" for i, out in enumerate(outputs))
    return outputs


def _wait_all(processes: list[subprocess.Popen], expect: int) -> list[int | None]:
    """The exit codes, once every process has ended or one has ended otherwise than `expect` (its peers would wait
    for it at their next collective until JAX's own timeout: they are killed, code None); TimeoutExpired after
    JOB_TIMEOUT_S."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while any(process.poll() is None for process in processes):
        if any(process.returncode not in (None, expect) for process in processes):
            break
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(processes[0].args, JOB_TIMEOUT_S)
        time.sleep(0.2)
    return [process.returncode for process in processes]


def _check_process_0_reports(outputs: list[str], logger: str, *, table: bool = False) -> None:
    """Process 0 logs, draws the bar (and prints the evaluation table); the others only warn (gloo's own lines
    aside)."""
    bars = ("step/s", "s/step", "forward/s", "s/forward")
    assert f"{logger}: " in outputs[0] and any(bar in outputs[0] for bar in bars)
    assert ("| dense |" in outputs[0]) == table
    for output in outputs[1:]:
        assert f"{logger}: " not in output and "train.trainer: " not in output and "| dense |" not in output
        assert not any(bar in output for bar in bars)


def _losses(out_dir: Path) -> dict[str, list[float]]:
    lines = read_metrics(out_dir)
    return {
        "step": [line["step"] for line in lines],
        **{key: [line[key] for line in lines] for key in ("loss", "grad_norm")},
    }


def _check_same_run(got: Path, want: Path) -> None:
    got, want = _losses(got), _losses(want)
    assert got["step"] == want["step"]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(got[key], want[key], rtol=LOSS_RTOL, err_msg=key)


def _check_same_tensors(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for name in want:
        expected = np.asarray(want[name], np.float32)
        atol = WEIGHT_ATOL_SCALE * np.abs(expected).max()
        np.testing.assert_allclose(
            np.asarray(got[name], np.float32), expected, rtol=WEIGHT_RTOL, atol=atol, err_msg=f"{what}: {name}"
        )


def _steps_saved(out_dir: Path) -> list[int]:
    return sorted(int(path.name) for path in (out_dir / "checkpoints").iterdir() if path.name.isdigit())


def test_gate_distillation_stops_resumes_and_matches_one_process(inputs, tmp_path):
    root, data = inputs
    common = [*data, "--corpus-cache", root / "cache", "--seq-len", "128", "--batch-size", "4", "--warmup-steps", "1",
              "--dtype", "float32", "--gate-hidden-size", "32", *STEPS]  # fmt: skip
    job = tmp_path / "job"
    args = [*common, "--out", job, "--mesh", "data=2,fsdp=2,tensor=2"]
    outputs = _run_job("train.distill_gates", args, tmp_path, sigterm_after_step=2, expect=128 + signal.SIGTERM)
    _check_process_0_reports(outputs, "train.distill_gates")
    assert _losses(job)["step"] == [1, 2, 3] and _steps_saved(job) == [2, 3]  # one stop, agreed by both
    assert not (job / "adapter").exists()
    shutil.copytree(job, tmp_path / "moved")
    _check_process_0_reports(_run_job("train.distill_gates", [*args, "--resume"], tmp_path), "train.distill_gates")

    distill_main([*map(str, common), "--out", str(tmp_path / "one")])  # one process, one device
    _check_same_run(job, tmp_path / "one")
    want = read_adapter(tmp_path / "one" / "adapter").tensors
    _check_same_tensors(read_adapter(job / "adapter").tensors, want, "adapter")

    # The checkpoint of step 3, written by two processes, resumed by one on 8 devices (another mesh too).
    distill_main([*map(str, common), "--out", str(tmp_path / "moved"), "--resume", "--mesh", "fsdp=4,tensor=2"])
    _check_same_run(tmp_path / "moved", tmp_path / "one")
    _check_same_tensors(read_adapter(tmp_path / "moved" / "adapter").tensors, want, "adapter resumed in one process")


def test_seer_fine_tuning_stops_resumes_exports_and_matches_one_process(inputs, tmp_path):
    root, data = inputs
    common = [*data, "--corpus-cache", root / "cache", "--seq-len", "128", "--batch-size", "4", "--lr", "1e-3",
              "--warmup-steps", "1", "--dtype", "float32", "--seer-gates", root / "gates", "--export-dtype", "float32",
              *STEPS]  # fmt: skip
    job = tmp_path / "job"
    args = [*common, "--out", job, "--export-hf", tmp_path / "job_hf", "--mesh", "fsdp=4,tensor=2"]
    outputs = _run_job("train.finetune", args, tmp_path, sigterm_after_step=2, expect=128 + signal.SIGTERM)
    _check_process_0_reports(outputs, "train.finetune")
    assert _losses(job)["step"] == [1, 2, 3] and _steps_saved(job) == [2, 3]
    assert not (job / "model").exists() and not (tmp_path / "job_hf").exists()
    shutil.copytree(job, tmp_path / "moved")
    _check_process_0_reports(_run_job("train.finetune", [*args, "--resume"], tmp_path), "train.finetune")

    finetune_main([*map(str, common), "--out", str(tmp_path / "one"), "--export-hf", str(tmp_path / "one_hf")])
    _check_same_run(job, tmp_path / "one")
    want_model = _model_weights(tmp_path / "one" / "model")
    want_gates = read_adapter(tmp_path / "one" / "adapter").tensors
    _check_same_tensors(_model_weights(job / "model"), want_model, "converted model")
    _check_same_tensors(read_adapter(job / "adapter").tensors, want_gates, "adapter")
    _check_same_tensors(_hf_weights(tmp_path / "job_hf"), _hf_weights(tmp_path / "one_hf"), "HF export")
    assert json.loads((tmp_path / "job_hf" / "config.json").read_text()) == json.loads(
        (tmp_path / "one_hf" / "config.json").read_text()
    )

    # The checkpoint of step 3 (each weight's shards written by both processes) resumed on one device.
    finetune_main([*map(str, common), "--out", str(tmp_path / "moved"), "--resume"])
    _check_same_run(tmp_path / "moved", tmp_path / "one")
    _check_same_tensors(_model_weights(tmp_path / "moved" / "model"), want_model, "model resumed on one device")


def test_evaluation_matches_one_process(inputs, tmp_path):
    root, data = inputs
    common = [*data, "--gates", root / "gates", "--cache-dir", root / "cache", "--lengths", "128", "--num-docs", "4",
              "--batch-size", "4", "--methods", "dense", "gate", "oracle", "--nz-ratios", "0.5"]  # fmt: skip
    args = [*common, "--out", tmp_path / "job", "--mesh", "data=2,fsdp=2,tensor=2"]
    _check_process_0_reports(_run_job("train.eval_ppl", args, tmp_path), "train.eval_ppl", table=True)
    eval_main([*map(str, common), "--out", str(tmp_path / "one")])
    got, want = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("job", "one"))
    assert [row["method"] for row in got["rows"]] == ["dense", "gate", "oracle"]
    assert got["num_docs"] == want["num_docs"] == {"128": 4}
    for got_row, want_row in zip(got["rows"], want["rows"], strict=True):
        np.testing.assert_allclose(got_row["doc_nll"], want_row["doc_nll"], rtol=LOSS_RTOL)
        np.testing.assert_allclose(got_row["layer_density"], want_row["layer_density"], atol=1e-6)


def _model_weights(model_dir: Path) -> dict[str, np.ndarray]:
    model, _ = load_model(model_dir)
    return {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}


def _hf_weights(hf_dir: Path) -> dict[str, np.ndarray]:
    return load_file(hf_dir / "model.safetensors")


@pytest.mark.parametrize("flag", [["--coordinator", "localhost:1234"], ["--num-processes", "2"], ["--process-id", "0"]])
def test_job_flags_need_distributed(inputs, tmp_path, flag):
    _, data = inputs
    with pytest.raises(SystemExit, match=f"error: {flag[0]} needs --distributed"):
        distill_main([*data, "--out", str(tmp_path / "run"), "--mesh", "data=2", *flag])
