"""Sharded training: accelerate's FSDP2 (full sharding) through `DiffusionTrainer`, on 2 CPU processes (gloo)
with `training/accelerate_configs/fsdp_cpu.yaml`, and on GPUs with `fsdp.yaml` where CUDA is available.

On CPU: the sharded run takes the same steps as one process (noiseless loss), writes sharded checkpoints (one
file per process), resumes from one to the uninterrupted run's exact weights, and saves a normal model folder."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_sfdlm.pipelines import prepare_pipeline
from hf_sfdlm.tracking import read_metrics
from hf_sfdlm.trainer import DiffusionTrainer, _shard_on_cpu

sys.path.insert(0, str(Path(__file__).parent))
from test_training import _free_port, _losses, _subprocess_env, clean_loss, make_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "accelerate_configs"

# argv: config JSON, tests folder, "clean" (noiseless loss) or "nelbo", "resume" or "fresh".
DRIVER = """
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from test_training import clean_loss
from hf_sfdlm.pipelines import prepare_pipeline
from hf_sfdlm.tracking import read_metrics
from hf_sfdlm.train_config import TrainConfig
from hf_sfdlm.trainer import DiffusionTrainer
config = TrainConfig.from_dict(json.loads(open(sys.argv[1]).read()))
pipeline = prepare_pipeline(config)
trainer = DiffusionTrainer(pipeline.model, config.training, pipeline.train_dataset, pipeline.eval_dataset,
                           tokenizer=pipeline.tokenizer, compute_loss=clean_loss if sys.argv[3] == "clean" else None)
assert trainer.accelerator.distributed_type == "FSDP" and trainer.accelerator.is_fsdp2
trainer.train(resume=sys.argv[4] == "resume")
"""


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _launch(config_file: Path, config, tmp_path: Path, loss: str, mode: str = "fresh", **env) -> str:
    """`accelerate launch --config_file <config_file>` of the driver on `config`; returns the log."""
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "run.json").write_text(json.dumps(config.to_dict()))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
               "--main_process_port", str(_free_port()), str(tmp_path / "driver.py"), str(tmp_path / "run.json"),
               str(Path(__file__).parent), loss, mode]
    done = subprocess.run(command, env=dict(_subprocess_env(), **env), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


# ============================================================================================== configurations
def test_cpu_configuration_shards_like_the_gpu_one():
    """fsdp_cpu.yaml is fsdp.yaml (FSDP2, full sharding, sharded checkpoints) on 2 processes without bf16."""
    gpu = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())
    cpu = yaml.safe_load((CONFIGS / "fsdp_cpu.yaml").read_text())
    assert cpu["distributed_type"] == gpu["distributed_type"] == "FSDP"
    assert cpu["fsdp_config"] == gpu["fsdp_config"]
    assert gpu["fsdp_config"]["fsdp_version"] == 2 and gpu["fsdp_config"]["fsdp_reshard_after_forward"] is True
    assert cpu["num_processes"] == 2 and cpu["mixed_precision"] == "no" and not cpu["use_cpu"]


def _fake_accelerator(distributed_type):
    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType(distributed_type), num_processes=1,
                           state=SimpleNamespace())


def test_fsdp_on_cpu_needs_fsdp2_and_several_processes(monkeypatch):
    from accelerate.state import PartialState

    monkeypatch.setitem(PartialState._shared_state, "distributed_type", None)  # restored after the test
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        _shard_on_cpu(_fake_accelerator("MULTI_CPU"))
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match="at least 2 processes"):
        _shard_on_cpu(_fake_accelerator("NO"))
    accelerator = _fake_accelerator("MULTI_CPU")
    _shard_on_cpu(accelerator)
    assert accelerator.state.distributed_type == "FSDP" and accelerator.state.fsdp_plugin.fsdp_version == 2


def test_fsdp_refuses_a_model_it_cannot_save_before_training(tmp_path, monkeypatch):
    """A PEFT model (or any module that is not a PreTrainedModel) is refused at construction under FSDP."""
    from hf_sfdlm.lora import apply_lora

    monkeypatch.setattr(DiffusionTrainer, "_fsdp", property(lambda self: True))
    config = make_config(tmp_path / "peft", ema_decay=None)
    pipeline = prepare_pipeline(config)
    with pytest.raises(ValueError, match="PeftModel; train adapters"):
        DiffusionTrainer(apply_lora(pipeline.model), config.training, pipeline.train_dataset,
                         tokenizer=pipeline.tokenizer)
    assert not (tmp_path / "peft" / "checkpoints").exists()


# ============================================================================================== 2 CPU processes
@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_takes_the_one_process_steps(tmp_path, one_thread):
    """Sharding changes where parameters live, not the maths: with a noiseless loss, FSDP2 on 2 processes x 4
    sequences takes the same steps as 1 process x 8 (float summation order aside)."""
    common = dict(max_steps=8, checkpoint_every=0, eval_every=0, ema_decay=None)
    log = _launch(CONFIGS / "fsdp_cpu.yaml", make_config(tmp_path / "fsdp", **common), tmp_path, "clean",
                  CUDA_VISIBLE_DEVICES="")
    assert "FSDP2 on 2 CPU processes" in log
    one = make_config(tmp_path / "one", **common)
    pipeline = prepare_pipeline(one)
    DiffusionTrainer(pipeline.model, one.training, pipeline.train_dataset, tokenizer=pipeline.tokenizer,
                     compute_loss=clean_loss).train()
    fsdp_loss, one_loss = _losses(tmp_path / "fsdp"), _losses(tmp_path / "one")
    assert sorted(fsdp_loss) == list(range(1, 9))
    for step, value in one_loss.items():
        assert math.isclose(fsdp_loss[step], value, rel_tol=1e-5), (step, fsdp_loss[step], value)
    a, b = load_file(tmp_path / "fsdp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_fsdp_checkpoints_are_sharded_and_resume_exactly(tmp_path, one_thread):
    """The NELBO objective (its noise drawn per process): a run of 8 steps, and a run resumed from the first
    run's step-4 checkpoint, end with identical weights and log identical losses. The checkpoint holds one
    model and one optimizer shard per process; the final folder is a normal model folder (the model's own
    remote code, tied embeddings) that loads."""
    from hf_sfdlm import SFDLMForDiffusionLM

    common = dict(max_steps=8, checkpoint_every=4, eval_every=4, ema_decay=None)
    reference = tmp_path / "reference"
    _launch(CONFIGS / "fsdp_cpu.yaml", make_config(reference, **common), tmp_path, "nelbo",
            CUDA_VISIBLE_DEVICES="")
    step4 = reference / "checkpoints" / "step-4"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (step4 / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    # The interrupted run: the reference folder as it was right after its step-4 checkpoint.
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed, ignore=shutil.ignore_patterns("step-8", "finished.json", "best"))
    for path in resumed.iterdir():
        if path.is_file() and path.name not in ("tokenizer.json", "tokenizer_config.json"):
            path.unlink()  # the final model: written again at the end
    log = _launch(CONFIGS / "fsdp_cpu.yaml", make_config(resumed, **common), tmp_path, "nelbo", "resume",
                  CUDA_VISIBLE_DEVICES="")
    assert "Resumed from" in log and "step-4" in log
    assert _losses(resumed) == _losses(reference) and sorted(_losses(reference)) == list(range(1, 9))
    evaluations = [[(r["step"], r["eval/nelbo"]) for r in read_metrics(run / "logs" / "metrics.jsonl")
                    if "eval/nelbo" in r] for run in (resumed, reference)]
    assert evaluations[0] == evaluations[1] and [s for s, _ in evaluations[0]] == [4, 8]
    a, b = load_file(resumed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)

    assert (reference / "modeling_sfdlm.py").is_file() and not list(reference.glob("_fsdp*.py"))
    model = SFDLMForDiffusionLM.from_pretrained(reference)
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings
    for key, value in model.state_dict().items():
        if key in b:
            assert torch.equal(value, b[key]), key


# ============================================================================================== GPUs
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fsdp.yaml: NCCL, bf16)")
def test_fsdp_gpu_configuration_trains_and_resumes(tmp_path):
    """fsdp.yaml on the GPUs present (at most 2, and one process when there is one GPU): train, resume."""
    processes = min(torch.cuda.device_count(), 2)
    config_file = tmp_path / "fsdp.yaml"
    gpu = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())
    config_file.write_text(yaml.safe_dump(dict(gpu, num_processes=processes)))
    common = dict(max_steps=8, checkpoint_every=4, eval_every=4, ema_decay=None, mixed_precision="bf16",
                  batch_size=8)
    out = tmp_path / "run"
    _launch(config_file, make_config(out, **{**common, "max_steps": 4}), tmp_path, "nelbo")
    log = _launch(config_file, make_config(out, **common), tmp_path, "nelbo", "resume")
    assert "Resumed from" in log
    assert sorted(_losses(out)) == list(range(1, 9)) and all(math.isfinite(v) for v in _losses(out).values())
    assert (out / "model.safetensors").is_file() and (out / "modeling_sfdlm.py").is_file()
