"""Training (hf_sfdlm.train_config, .trainer, .pipelines, .tracking, .checkpointing, .ema): presets, input checks, the loop,
checkpoints, kill-and-resume, two processes, and the embedded default job."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_sfdlm.checkpointing import CheckpointError, CheckpointManager
from hf_sfdlm.data import DataConfig
from hf_sfdlm.ema import create_ema, ema_decay
from hf_sfdlm.synthetic import SyntheticGrammar
from hf_sfdlm.pipelines import prepare_pipeline, run_training
from hf_sfdlm.tracking import read_metrics
from hf_sfdlm.train_config import TrainConfig, TrainingConfig, load_config
from hf_sfdlm.trainer import DiffusionTrainer, NonFiniteLossError

REPO = Path(__file__).resolve().parents[1]
# A model that trains a step in milliseconds; the data is the synthetic corpus, word-level tokenizer.
TEST_MODEL = dict(process="absorbing", hidden_size=32, stage_depths=[1, 1], pool_factors=[2], ssm_state_size=4,
                  fourier_intermediate_size=64, num_timesteps=None, noise_schedule="loglinear")


def make_config(out, model=None, data=None, **training) -> TrainConfig:
    values = dict(output_dir=str(out), max_steps=30, batch_size=8, learning_rate=3e-3, warmup_steps=5,
                  eval_every=10, eval_max_sequences=16, eval_num_samples=2, checkpoint_every=10, log_every=1,
                  log_with=["jsonl"], progress_bar=False, ema_decay=0.9)
    values.update(training)
    data_values = dict(block_size=16, synthetic_sentences=400)
    data_values.update(data or {})
    return TrainConfig(model=dict(TEST_MODEL, **(model or {})), data=DataConfig(**data_values),
                       training=TrainingConfig(**values))


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Each run builds its own `Accelerator`; accelerate keeps one process-wide state whose mixed precision
    cannot change, so start every test from a blank one (and leave one behind for other test files)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.fixture
def one_thread():
    """Single-threaded CPU maths: deterministic and comparable with the subprocesses of these tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(Path(out) / "logs" / "metrics.jsonl") if "train/loss" in r}


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


# ============================================================================================== configuration
def test_tiny_preset_file_matches_the_built_in_defaults():
    assert load_config(REPO / "training" / "configs" / "tiny.yaml") == TrainConfig()
    assert load_config(None) == TrainConfig()


@pytest.mark.parametrize("preset", ["small", "base"])
def test_gpu_presets_are_valid(preset):
    from hf_sfdlm import SFDLMConfig

    config = load_config(REPO / "training" / "configs" / f"{preset}.yaml")
    assert config.training.mixed_precision == "bf16" and config.tokenizer == "gpt2"
    SFDLMConfig(vocab_size=50259, mask_token_id=50257, **config.model)  # the model section validates
    assert config.data.block_size <= SFDLMConfig().max_position_embeddings


def test_accelerate_configs_declare_the_fsdp_wrap_unit():
    from hf_sfdlm.modeling_sfdlm import SFDLMBlock

    fsdp = yaml.safe_load((REPO / "training" / "accelerate_configs" / "fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP"
    assert fsdp["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == SFDLMBlock.__name__
    cpu = yaml.safe_load((REPO / "training" / "accelerate_configs" / "cpu.yaml").read_text())
    assert cpu["num_processes"] == 2 and not cpu["use_cpu"]  # torchrun launcher; gloo without CUDA


def test_overrides_and_unknown_keys():
    config = load_config(None, ["training.max_steps=7", "model.stage_depths=[1,1,1]", "model.pool_factors=[2,2]",
                                "data.dataset=my.txt", "training.ema_decay=null"])
    assert config.training.max_steps == 7 and config.model["stage_depths"] == [1, 1, 1]
    assert config.model["process"] == "absorbing"  # the preset's other model keys survive an override
    assert config.data.dataset == "my.txt" and config.training.ema_decay is None
    with pytest.raises(ValueError, match="max_stepz"):
        load_config(None, ["training.max_stepz=7"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["max_steps"])
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        TrainingConfig(batch_size=6, gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainingConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="lr_scheduler"):
        TrainingConfig(lr_scheduler="triangle")


def test_yaml_numbers_are_numbers_in_every_section(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-6` as a string; presets and overrides read it as the number it is."""
    preset = tmp_path / "preset.yaml"
    preset.write_text("model:\n  layer_norm_eps: 1e-6\n  initializer_range: 2E-2\n"
                      "training:\n  learning_rate: 3e-4\n  adam_epsilon: 1e-8\n"
                      "data:\n  validation_fraction: 5e-2\n  dataset: '1e5'\n")
    config = load_config(preset, ["model.ssm_dt_min=1e-3", "training.weight_decay=1e-2"])
    assert config.model["layer_norm_eps"] == 1e-6 and config.model["initializer_range"] == 0.02
    assert config.model["ssm_dt_min"] == 1e-3
    assert config.training.learning_rate == 3e-4 and config.training.adam_epsilon == 1e-8
    assert config.training.weight_decay == 0.01 and config.data.validation_fraction == 0.05
    assert config.data.dataset == "1e5"  # quoted: still a string
    assert all(isinstance(config.model[k], float) for k in ("layer_norm_eps", "initializer_range", "ssm_dt_min"))
    from hf_sfdlm.train_config import finetune_training_config

    assert finetune_training_config(["training.learning_rate=5e-4"]).learning_rate == 5e-4


def test_bad_model_values_are_refused_before_data_or_tokenizer_work(tmp_path):
    with pytest.raises(ValueError, match="`model` section is invalid.*hidden_size"):
        load_config(None, ["model.hidden_size=0"])
    # A config built in code: refused by `prepare_pipeline` before the corpus is read or a BPE trained.
    corpus = tmp_path / "notes.txt"
    corpus.write_text("\n".join(SyntheticGrammar().sample_sentences(50, generator=1)) + "\n")
    config = make_config(tmp_path / "out", model={"hidden_size": -8}, data={"dataset": str(corpus)})
    with pytest.raises(ValueError, match="`model` section is invalid.*hidden_size"):
        prepare_pipeline(config)
    assert not (tmp_path / "out").exists()  # no data copy, no tokenizer


# ============================================================================================== bad input
def test_block_size_beyond_the_model_is_refused_before_training(tmp_path):
    config = make_config(tmp_path, model={"max_position_embeddings": 8})
    with pytest.raises(ValueError, match="block_size`=16 exceeds .*max_position_embeddings`=8"):
        prepare_pipeline(config)


def test_tokenizer_larger_than_vocab_size_is_refused(tmp_path):
    config = make_config(tmp_path, model={"vocab_size": 100})
    with pytest.raises(ValueError, match=r"tokenizer has 233 tokens but the model's `vocab_size` is 100"):
        prepare_pipeline(config)


def test_missing_empty_and_columnless_data_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        prepare_pipeline(make_config(tmp_path, data={"dataset": str(tmp_path / "absent.txt")}))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        prepare_pipeline(make_config(tmp_path, data={"dataset": str(tmp_path / "empty.txt")}))
    (tmp_path / "d.jsonl").write_text('{"content": "a dog ."}\n')
    with pytest.raises(ValueError, match="no column 'text'"):
        prepare_pipeline(make_config(tmp_path, data={"dataset": str(tmp_path / "d.jsonl")}))


def test_training_set_smaller_than_a_batch_is_refused(tmp_path):
    pipeline = prepare_pipeline(make_config(tmp_path))
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        DiffusionTrainer(pipeline.model, make_config(tmp_path, batch_size=4096).training,
                         pipeline.train_dataset.select(range(10)), tokenizer=pipeline.tokenizer)


# ============================================================================================== the loop
def test_nonfinite_loss_stops_with_the_step_and_leaves_weights_finite(tmp_path, one_thread):
    pipeline = prepare_pipeline(make_config(tmp_path))

    def poisoned(model, batch):
        loss = model(**batch).loss
        return loss * float("nan") if trainer.state.step == 2 else loss  # the third step

    trainer = DiffusionTrainer(pipeline.model, make_config(tmp_path).training, pipeline.train_dataset,
                               tokenizer=pipeline.tokenizer, compute_loss=poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        trainer.train()
    assert trainer.state.step == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_gradient_accumulation_equals_the_full_batch(tmp_path, one_thread):
    """With a loss that has no noise, 2 micro-batches of 4 give the same update as one batch of 8."""
    weights = []
    for accumulation in (1, 2):
        out = tmp_path / f"ga{accumulation}"
        config = make_config(out, max_steps=3, gradient_accumulation_steps=accumulation, eval_every=0,
                             checkpoint_every=0, ema_decay=None)
        pipeline = prepare_pipeline(config)

        def clean_loss(model, batch):  # cross-entropy of the clean tokens at t = 0.5, no corruption
            logits = model.denoise(batch["input_ids"], torch.full((batch["input_ids"].shape[0],), 0.5))
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"].flatten())

        trainer = DiffusionTrainer(pipeline.model, config.training, pipeline.train_dataset,
                                   tokenizer=pipeline.tokenizer, compute_loss=clean_loss)
        trainer.train()
        weights.append({k: v.clone() for k, v in trainer.eval_model().state_dict().items()})
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=1e-6, rtol=1e-5)


def test_bf16_mixed_precision_trains_on_cpu(tmp_path, one_thread):
    result, trainer = run_training(make_config(tmp_path, max_steps=4, mixed_precision="bf16", eval_every=4,
                                               checkpoint_every=0))
    assert trainer.accelerator.mixed_precision == "bf16"
    assert math.isfinite(result.train_loss) and math.isfinite(result.eval_nelbo)


def test_ema_matches_an_independent_recursion():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = create_ema(model, decay=0.95)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    ema.update_parameters(model)  # the first update copies
    for n in range(1, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(model)
        d = min(0.95, (1 + n) / (10 + n))
        assert ema_decay(0.95, n) == d
        expected = {k: d * expected[k] + (1 - d) * v for k, v in model.state_dict().items()}
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=1e-6)


def test_run_saves_ema_weights_tokenizer_logs_and_best(tmp_path, one_thread):
    from transformers import AutoTokenizer

    from hf_sfdlm import SFDLMForDiffusionLM

    config = make_config(tmp_path, max_steps=20, log_with=["jsonl", "tensorboard"])
    result, trainer = run_training(config)
    saved = SFDLMForDiffusionLM.from_pretrained(tmp_path)
    for name, value in trainer.ema.module.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name], value)
    raw = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert any(not torch.equal(raw[k], v) for k, v in trainer.ema.module.state_dict().items())
    assert AutoTokenizer.from_pretrained(tmp_path).mask_token_id == saved.config.mask_token_id
    assert (tmp_path / "generation_config.json").exists() and (tmp_path / "best" / "model.safetensors").exists()
    records = read_metrics(tmp_path / "logs" / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 21))
    evals = [r for r in records if "eval/nelbo" in r]
    assert [r["step"] for r in evals] == [10, 20] and result.eval_nelbo == evals[-1]["eval/nelbo"]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "logs").rglob("*"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["finished.json", "step-10", "step-20"]


def test_cli_with_one_data_flag_trains_a_bpe_and_prints_samples(tmp_path, one_thread, capsys):
    from hf_sfdlm.commands.train import main

    corpus = tmp_path / "notes.txt"
    corpus.write_text("\n".join(SyntheticGrammar().sample_sentences(300, generator=5)).title() + "\n")
    out = tmp_path / "run"
    assert main(["--data", str(corpus), "--output-dir", str(out), "--max-steps", "4", "--num-samples", "1",
                 "--sample-steps", "2", "tokenizer_vocab_size=400", "model.hidden_size=32",
                 "model.fourier_intermediate_size=64", "data.block_size=16", "training.batch_size=8",
                 "training.eval_max_sequences=8", "training.progress_bar=false", "training.log_with=[jsonl]"]) == 0
    printed = capsys.readouterr().out
    assert "Held-out NELBO" in printed and "Infilling" in printed and "entropy rate" not in printed
    assert (out / "tokenizer" / "tokenizer.json").exists() and (out / "README.md").exists()
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == 4 and math.isfinite(report["eval_nelbo"])


def test_streaming_data_trains_and_resumes_exactly(tmp_path, one_thread):
    from hf_sfdlm.trainer import TrainerCallback

    corpus = tmp_path / "stream.txt"
    corpus.write_text("\n".join(SyntheticGrammar().sample_sentences(400, generator=2)) + "\n")
    data = {"dataset": str(corpus), "streaming": True, "validation_size": 20, "shuffle_buffer": 64}

    class Crash(TrainerCallback):
        def on_step_end(self, trainer, step, loss):
            if step == 9:
                raise KeyboardInterrupt

    def config(name):
        return make_config(tmp_path / name, data=data, max_steps=12, checkpoint_every=5, eval_every=6)

    reference, _ = run_training(config("reference"))
    with pytest.raises(KeyboardInterrupt):
        run_training(config("crashed"), callbacks=[Crash()])
    resumed, _ = run_training(config("crashed"), resume=True)
    assert resumed.resumed_from.name == "step-5"
    assert _losses(tmp_path / "crashed") == _losses(tmp_path / "reference")
    assert resumed.eval_nelbo == reference.eval_nelbo


def test_single_process_mpi_launch_is_reported(monkeypatch, capsys):
    from hf_sfdlm.commands.train import warn_if_mpi_launch_without_mpi

    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert warn_if_mpi_launch_without_mpi() and "--multi_gpu" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not warn_if_mpi_launch_without_mpi()


# ============================================================================================== checkpoints
def _manager_with_checkpoints(tmp_path, steps=(5, 10)):
    """Real accelerate checkpoints of a tiny run (no subprocess)."""
    config = make_config(tmp_path, max_steps=max(steps), checkpoint_every=5, eval_every=0, keep_checkpoints=5)
    result, trainer = run_training(config)
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=5, fingerprint=trainer.fingerprint)
    return manager, trainer


def test_checkpoint_verification_skips_truncated_incomplete_and_foreign(tmp_path, one_thread, caplog):
    manager, trainer = _manager_with_checkpoints(tmp_path)
    step10 = tmp_path / "checkpoints" / "step-10"
    assert manager.verify(step10).step == 10
    (tmp_path / "checkpoints" / ".tmp-step-15").mkdir()  # a save in progress is never listed
    assert [p.name for p in manager.checkpoint_dirs()] == ["step-10", "step-5"]

    weights = step10 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match=r"step-10 is truncated.*model.safetensors"):
        manager.verify(step10)
    best, rejected = manager.latest()
    assert best.step == 5 and "step-10" in str(rejected[0])

    with caplog.at_level("WARNING"):
        loaded = manager.load_latest(trainer._read_state)
    assert loaded.step == 5 and trainer.state.step == 5
    assert "step-10" in caplog.text and "truncated" in caplog.text

    (step10 / "complete.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        manager.verify(step10)
    foreign = CheckpointManager(manager.root, fingerprint={**manager.fingerprint, "batch_size": 64})
    with pytest.raises(CheckpointError, match="batch_size is 8 in the checkpoint but 64 in this run"):
        foreign.verify(tmp_path / "checkpoints" / "step-5")
    with pytest.raises(CheckpointError, match="No usable checkpoint"):
        foreign.load_latest(trainer._read_state)


def test_same_size_corruption_is_caught_by_the_checksum(tmp_path, one_thread):
    manager, _ = _manager_with_checkpoints(tmp_path, steps=(5,))
    weights = tmp_path / "checkpoints" / "step-5" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        manager.verify(weights.parent)


def test_keep_last_prunes_old_checkpoints(tmp_path, one_thread):
    run_training(make_config(tmp_path, max_steps=20, checkpoint_every=5, eval_every=0, keep_checkpoints=2))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["finished.json", "step-15", "step-20"]


def test_pruning_keeps_the_newest_usable_checkpoints_not_the_newest_folders(tmp_path, one_thread, caplog):
    _manager_with_checkpoints(tmp_path, steps=(5, 10, 15, 20))
    root = tmp_path / "checkpoints"
    newest = root / "step-20" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])  # the newest checkpoint is now unusable
    _, trainer = _manager_with_checkpoints(tmp_path / "again", steps=(5,))
    fingerprint = json.loads((root / "step-5" / "complete.json").read_text())["fingerprint"]
    manager = CheckpointManager(root, keep_last=1, fingerprint=fingerprint)
    with caplog.at_level("WARNING"):
        deleted = manager.prune()
    assert sorted(p.name for p in deleted) == ["step-10", "step-20", "step-5"]
    assert "step-20" in caplog.text and "truncated" in caplog.text
    assert [p.name for p in manager.checkpoint_dirs()] == ["step-15"]
    assert manager.load_latest(trainer._read_state).step == 15  # what a resume now finds


def test_resume_across_an_epoch_boundary_logs_and_ends_like_the_uninterrupted_run(tmp_path, one_thread):
    """Stop mid-run (an exception after step 15), resume from step 10, cross into the next epoch (about 23
    batches per epoch here) and end exactly where the uninterrupted run ends. The loss is logged every 4 steps,
    so the window 9-12 straddles the resume: its mean must still be the uninterrupted run's."""
    from hf_sfdlm.trainer import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, trainer, step, loss):
            if step == 15:
                raise KeyboardInterrupt

    def config(name):
        return make_config(tmp_path / name, max_steps=30, log_every=4, eval_every=8)

    reference, _ = run_training(config("reference"))
    with pytest.raises(KeyboardInterrupt):
        run_training(config("crashed"), callbacks=[Crash()])
    resumed, trainer = run_training(config("crashed"), resume=True)
    assert resumed.resumed_from.name == "step-10" and trainer.state.epoch >= 1
    reference_records = [{k: v for k, v in r.items() if k not in ("time", "train/tokens_per_second")}
                         for r in read_metrics(tmp_path / "reference" / "logs" / "metrics.jsonl")]
    crashed_records = [{k: v for k, v in r.items() if k not in ("time", "train/tokens_per_second")}
                       for r in read_metrics(tmp_path / "crashed" / "logs" / "metrics.jsonl")]
    assert [r["step"] for r in crashed_records if "train/loss" in r] == [4, 8, 12, 16, 20, 24, 28, 30]
    assert crashed_records == reference_records  # every logged value, loss windows and evaluations included
    assert (resumed.train_loss, resumed.eval_nelbo) == (reference.train_loss, reference.eval_nelbo)
    a, b = load_file(tmp_path / "crashed" / "model.safetensors"), load_file(tmp_path / "reference" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


# ---------------------------------------------------------------------------------------------- no pickle
class _Payload:
    """Unpickling this writes a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def _plant(checkpoint: Path, names: list[str], marker: Path, format_version: int | None = None) -> None:
    """Write a malicious pickle under each name and list it in `complete.json` with a correct size and SHA-256
    (whoever can write the folder can do both)."""
    import hashlib

    complete = json.loads((checkpoint / "complete.json").read_text())
    for name in names:
        torch.save({"state": _Payload(marker)}, checkpoint / name)
        data = (checkpoint / name).read_bytes()
        complete["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if format_version is not None:
        complete["format"] = format_version
    (checkpoint / "complete.json").write_text(json.dumps(complete))


def test_checkpoints_hold_no_pickle_and_planted_pickles_never_run(tmp_path, one_thread, caplog):
    marker = tmp_path / "pwned.txt"
    run_training(make_config(tmp_path / "run", max_steps=10, checkpoint_every=5, eval_every=0))
    checkpoints = tmp_path / "run" / "checkpoints"
    written = {p.relative_to(checkpoints): p.read_bytes()[:4] for p in checkpoints.rglob("*") if p.is_file()}
    # Where accelerate's state lived (custom objects: loaded with weights_only=False), and more.
    _plant(checkpoints / "step-10", ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl"],
           marker)
    # An old-format checkpoint (accelerate's files) newer than the rest: refused, never unpickled.
    old = checkpoints / "step-15"
    old.mkdir()
    (old / "complete.json").write_text(json.dumps({"format": 1, "step": 15, "files": {}, "fingerprint": {}}))
    _plant(old, ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"], marker, format_version=1)
    with caplog.at_level("WARNING"):
        result, trainer = run_training(make_config(tmp_path / "run", max_steps=14, checkpoint_every=5,
                                                   eval_every=0), resume=True)
    assert not marker.exists()  # (before this change: written while resuming)
    assert result.resumed_from.name == "step-10" and result.step == 14
    assert "step-15 has format 1" in caplog.text and "never loaded" in caplog.text
    for path, head in written.items():  # what the first run wrote
        assert path.suffix in (".json", ".safetensors") and head != b"PK\x03\x04", path  # no torch.save zip


def test_state_files_round_trip_exactly(tmp_path):
    from hf_sfdlm.state_files import load_tree, rng_state, save_tree, set_rng_state

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tree = {"optimizer": optimizer.state_dict(), "inf": math.inf, "nan": float("nan"), "tuple": (1, "a", None),
            3: [True, 2.5, {"x": torch.arange(3)}]}
    save_tree(tree, tmp_path, "tree")
    back = load_tree(tmp_path, "tree")
    assert back["inf"] == math.inf and math.isnan(back["nan"]) and back["tuple"] == (1, "a", None)
    assert back[3][:2] == [True, 2.5] and torch.equal(back[3][2]["x"], torch.arange(3))
    assert back["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    for key, state in optimizer.state_dict()["state"].items():
        assert all(torch.equal(state[name], back["optimizer"]["state"][key][name]) for name in state)
    with pytest.raises(TypeError, match="tree.bad of type object"):
        save_tree({"bad": object()}, tmp_path, "tree")

    import random

    import numpy as np

    torch.manual_seed(1)
    save_tree(rng_state(), tmp_path, "rng")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.random(), np.random.rand(), torch.rand(5)
    set_rng_state(load_tree(tmp_path, "rng"))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


# ---------------------------------------------------------------------------------------------- runs never mix
def test_a_used_output_folder_is_refused_unless_resume_or_overwrite(tmp_path, one_thread, caplog):
    out = tmp_path / "out"
    first, _ = run_training(make_config(out, max_steps=20, checkpoint_every=10, eval_every=0))
    # A different run (another seed) in the same folder: refused before any data is read.
    other = make_config(out, max_steps=10, checkpoint_every=10, eval_every=0, seed=1,
                        data={"dataset": str(tmp_path / "absent.txt")})
    with pytest.raises(ValueError, match=r"holds another run \(checkpoints/finished.json, checkpoints/step-10"
                                         r".*--resume.*--overwrite"):
        run_training(other)
    other = make_config(out, max_steps=10, checkpoint_every=10, eval_every=0, seed=1)
    with pytest.raises(CheckpointError, match="seed is 0 in the checkpoint but 1 in this run"):
        run_training(other, resume=True)  # resume only continues the same run
    with pytest.raises(ValueError, match="exclude each other"):
        run_training(other, resume=True, overwrite=True)

    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "tokenizer.json").write_text("{}")  # the old run's BPE: never reused by the new one
    result, _ = run_training(other, overwrite=True)
    assert not (out / "tokenizer").exists()
    assert result.step == 10 and result.resumed_from is None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["finished.json", "step-10"]
    assert [r["step"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "train/loss" in r] == \
        list(range(1, 11))  # the first run's log is gone, not continued
    saved = load_file(out / "checkpoints" / "step-10" / "model.safetensors")
    reference, _ = run_training(make_config(tmp_path / "fresh", max_steps=10, checkpoint_every=10, eval_every=0,
                                            seed=1))
    fresh = load_file(tmp_path / "fresh" / "checkpoints" / "step-10" / "model.safetensors")
    assert all(torch.equal(saved[k], fresh[k]) for k in fresh)  # exactly a fresh run, nothing of the old one

    empty = make_config(tmp_path / "empty", max_steps=2, checkpoint_every=0, eval_every=0)
    with caplog.at_level("WARNING"):
        assert run_training(empty, resume=True)[0].resumed_from is None
    assert "no checkpoint in" in caplog.text and "starting from scratch" in caplog.text


def test_resuming_a_finished_run_changes_nothing(tmp_path, one_thread, capsys):
    from hf_sfdlm.commands.train import main

    out = tmp_path / "run"
    flags = ["--output-dir", str(out), "--max-steps", "6", "--num-samples", "0", "model.hidden_size=32",
             "model.fourier_intermediate_size=64", "model.stage_depths=[1,1]", "data.block_size=16",
             "data.synthetic_sentences=300", "training.batch_size=8", "training.eval_every=3",
             "training.checkpoint_every=3", "training.eval_max_sequences=8", "training.progress_bar=false",
             "training.log_with=[jsonl]"]
    assert main(flags) == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "data" not in p.parts}
    assert {"README.md", "train_report.json", "model.safetensors"} <= {p.name for p in files}
    capsys.readouterr()
    assert main(flags + ["--resume"]) == 0
    assert "already finished at step 6" in capsys.readouterr().out
    changed = [str(p.relative_to(out)) for p, data in files.items() if not p.exists() or p.read_bytes() != data]
    assert changed == []  # card, report, model, logs and checkpoints untouched
    assert main(flags) == 2 and "holds another run" in capsys.readouterr().err  # one-line CLI error
    assert main(flags + ["--overwrite", "--max-steps", "3"]) == 0
    assert json.loads((out / "train_report.json").read_text())["steps"] == 3


def test_an_interrupted_final_save_stays_inside_the_output_folder_and_is_redone(tmp_path, one_thread):
    from hf_sfdlm.trainer import TrainerCallback

    class DieInFinalSave(TrainerCallback):
        def on_save(self, trainer, directory):
            if trainer.state.step == 6 and Path(directory).name.startswith(".tmp-save-model"):
                raise KeyboardInterrupt

    out = tmp_path / "parent" / "run"
    config = make_config(out, max_steps=6, checkpoint_every=3, eval_every=3)
    with pytest.raises(KeyboardInterrupt):
        run_training(config, callbacks=[DieInFinalSave()])
    assert [p.name for p in (tmp_path / "parent").iterdir()] == ["run"]  # nothing left beside the run
    assert len(list(out.glob(".tmp-save-model-*"))) == 1
    result, _ = run_training(config, resume=True)
    assert result.resumed_from.name == "step-6" and result.eval_nelbo is not None  # the checkpoint's evaluation
    assert not list(out.glob(".tmp-*")) and (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- SIGKILL
DRIVER = """
import json, sys, time
import torch
torch.set_num_threads(1)
from hf_sfdlm import trainer as trainer_module
from hf_sfdlm.pipelines import run_training
from hf_sfdlm.train_config import TrainConfig
from hf_sfdlm.trainer import TrainerCallback

pause = float(sys.argv[2])

class Slow(TrainerCallback):  # widens the windows a kill can land in; changes no number
    def on_step_end(self, trainer, step, loss):
        time.sleep(pause)

    def on_save(self, trainer, directory):  # inside every model save (best/ and the final one)
        time.sleep(4 * pause)

def slow(function):
    def wrapped(*args, **kwargs):
        time.sleep(pause)
        return function(*args, **kwargs)
    return wrapped

trainer_module.save_tree = slow(trainer_module.save_tree)  # inside every checkpoint write
trainer_module.save_module = slow(trainer_module.save_module)
run_training(TrainConfig.from_dict(json.loads(open(sys.argv[1]).read())), resume=True, callbacks=[Slow()])
"""


def _kill_when(process, condition, what: str, deadline_s: float = 240) -> None:
    deadline = time.time() + deadline_s
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: " + process.stderr.read().decode()[-3000:]
        assert time.time() < deadline, f"never reached {what}"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_identical_weights(tmp_path, one_thread, caplog):
    """SIGKILL at a random moment, in the middle of a checkpoint write and in the middle of the final save,
    resuming each time; then damage the newest checkpoint and resume to the end: bit-identical weights and
    logs to the uninterrupted run, and no temporary folder left anywhere. (A 25-kill campaign: README.)"""
    steps = 40
    out = tmp_path / "killed"
    killed = make_config(out, max_steps=steps, checkpoint_every=10, keep_checkpoints=2, eval_every=10)
    config_file = tmp_path / "killed.json"
    config_file.write_text(json.dumps(killed.to_dict()))
    rng = random.Random()

    def logged():
        path = out / "logs" / "metrics.jsonl"
        return path.exists() and path.stat().st_size > 0

    def at_random():
        start = []

        def condition():
            if not start and logged():
                start.append(time.time() + rng.uniform(0.0, 1.0))
            return bool(start) and time.time() >= start[0]
        return condition

    phases = [("a random moment", at_random()),
              ("a checkpoint write", lambda: any((out / "checkpoints").glob(".tmp-step-*"))),
              ("the final save", lambda: any(out.glob(".tmp-save-model-*")))]
    for what, condition in phases:
        process = subprocess.Popen([sys.executable, "-c", DRIVER, str(config_file), "0.05"], env=_subprocess_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _kill_when(process, condition, what)

    # Damage the newest complete checkpoint: resume must name it, skip it and use the one before.
    checkpoints = CheckpointManager(out / "checkpoints").checkpoint_dirs()
    newest = checkpoints[0]
    (newest / "optimizer.safetensors").write_bytes((newest / "optimizer.safetensors").read_bytes()[:1000])
    with caplog.at_level("WARNING"):
        resumed, _ = run_training(killed, resume=True)
    assert resumed.resumed_from == checkpoints[1]
    assert newest.name in caplog.text and "truncated" in caplog.text

    reference, _ = run_training(make_config(tmp_path / "reference", max_steps=steps, checkpoint_every=10,
                                            eval_every=10))
    assert resumed.step == reference.step == steps
    for name in ("checkpoints/step-40/model.safetensors", "model.safetensors", "best/model.safetensors"):
        a, b = load_file(out / name), load_file(tmp_path / "reference" / name)  # raw weights, EMA, best
        assert all(torch.equal(a[k], b[k]) for k in b), name
    ignore = ("time", "train/tokens_per_second")
    records = [[{k: v for k, v in r.items() if k not in ignore} for r in read_metrics(d / "logs" / "metrics.jsonl")]
               for d in (out, tmp_path / "reference")]
    assert records[0] == records[1]
    assert (resumed.eval_nelbo, resumed.best_step) == (reference.eval_nelbo, reference.best_step)
    leftovers = [p for p in tmp_path.rglob(".tmp*")]
    assert leftovers == [], leftovers


# ============================================================================================== two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_loss(model, batch):
    """A loss without corruption noise (cross-entropy of the clean tokens at t = 0.5): two processes and one
    process must then follow the same trajectory up to float summation order."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids, timesteps=torch.full((ids.shape[0],), 0.5, device=ids.device)).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


EXACT_DRIVER = """
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from test_training import clean_loss
from hf_sfdlm.pipelines import prepare_pipeline
from hf_sfdlm.train_config import TrainConfig
from hf_sfdlm.trainer import DiffusionTrainer
config = TrainConfig.from_dict(json.loads(open(sys.argv[1]).read()))
pipeline = prepare_pipeline(config)
DiffusionTrainer(pipeline.model, config.training, pipeline.train_dataset, tokenizer=pipeline.tokenizer,
                 compute_loss=clean_loss).train()
"""


def _launch_two_cpu_processes(script_and_args: list[str]) -> None:
    # accelerate's multi-process launcher (torchrun); without CUDA the processes use the CPU and gloo.
    # (`--cpu --num_processes 2` would start a single process without MPI: see accelerate_configs/cpu.yaml.)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "training" / "accelerate_configs" / "cpu.yaml"), "--main_process_port", str(_free_port()),
               *script_and_args]
    done = subprocess.run(command, env=dict(_subprocess_env(), CUDA_VISIBLE_DEVICES=""), capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_cpu_processes_follow_one_process_exactly_without_noise(tmp_path, one_thread):
    """DDP semantics: with a noiseless loss, 2 processes x 4 sequences take the same steps as 1 x 8."""
    config = make_config(tmp_path / "two", max_steps=15, checkpoint_every=0, eval_every=0, ema_decay=None)
    config_file = tmp_path / "two.json"
    config_file.write_text(json.dumps(config.to_dict()))
    script = tmp_path / "driver.py"
    script.write_text(EXACT_DRIVER)
    _launch_two_cpu_processes([str(script), str(config_file), str(Path(__file__).parent)])
    assert (tmp_path / "two" / "checkpoints" / "step-15" / "rng_state_1.json").exists()  # really 2 processes

    one = make_config(tmp_path / "one", max_steps=15, checkpoint_every=0, eval_every=0, ema_decay=None)
    pipeline = prepare_pipeline(one)
    DiffusionTrainer(pipeline.model, one.training, pipeline.train_dataset, tokenizer=pipeline.tokenizer,
                     compute_loss=clean_loss).train()
    two_loss, one_loss = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert sorted(two_loss) == list(range(1, 16))
    for step, value in one_loss.items():
        assert math.isclose(two_loss[step], value, rel_tol=1e-5), (step, two_loss[step], value)
    a, b = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)  # measured: 2.4e-7


@pytest.mark.slow
def test_two_cpu_processes_match_the_one_process_loss_curve(tmp_path, one_thread):
    """`accelerate launch ... training/train.py` on 2 CPU processes, the real NELBO objective: the same global
    batch (tokens per step) and the same loss curve up to the corruption noise, which each process draws
    for its own rows (window means of 10 steps within 15%: four seeds of one process spread by up to 14%)."""
    steps = 40
    common = dict(max_steps=steps, batch_size=16, checkpoint_every=0, eval_every=steps, eval_max_sequences=32,
                  eval_num_samples=4)
    config_file = tmp_path / "two.yaml"
    config_file.write_text(yaml.safe_dump(make_config(tmp_path / "two", **common).to_dict()))
    _launch_two_cpu_processes([str(REPO / "training" / "train.py"), "--config", str(config_file),
                               "--num-samples", "0"])
    assert (tmp_path / "two" / "checkpoints" / f"step-{steps}" / "rng_state_1.json").exists()
    one_result, _ = run_training(make_config(tmp_path / "one", **common))

    two_records = read_metrics(tmp_path / "two" / "logs" / "metrics.jsonl")
    one_records = read_metrics(tmp_path / "one" / "logs" / "metrics.jsonl")
    assert [r["train/tokens"] for r in two_records if "train/tokens" in r] == \
        [r["train/tokens"] for r in one_records if "train/tokens" in r]
    two_loss, one_loss = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert sorted(two_loss) == sorted(one_loss) == list(range(1, steps + 1))
    assert math.isclose(two_loss[1], one_loss[1], rel_tol=0.1)  # same weights and batch; only the noise differs
    for start in range(1, steps + 1, 10):
        a = sum(two_loss[s] for s in range(start, start + 10)) / 10
        b = sum(one_loss[s] for s in range(start, start + 10)) / 10
        assert abs(a - b) / b < 0.15, (start, a, b)
    two_eval = [r["eval/nelbo"] for r in two_records if "eval/nelbo" in r][-1]
    assert abs(two_eval - one_result.eval_nelbo) / one_result.eval_nelbo < 0.15


# ============================================================================================== embedded default
@pytest.mark.slow
def test_embedded_default_learns_the_grammar(tmp_path, one_thread):
    """A shortened `sfdlm train` (100 steps, hidden size 64, 32-token blocks): the held-out NELBO must end
    below 1.35 x the source entropy rate. The unigram entropy of the stream is 1.45 x, so the model must use
    context to pass; the full tiny preset reaches about 1.08 x (README, "Training")."""
    config = load_config(None, [f"training.output_dir={tmp_path}", "training.max_steps=100",
                                "training.warmup_steps=10", "training.eval_every=0", "training.checkpoint_every=0",
                                "training.progress_bar=false", "training.log_with=[jsonl]",
                                "model.hidden_size=64", "model.fourier_intermediate_size=128",
                                "data.block_size=32", "data.synthetic_sentences=3000"])
    assert config.model["process"] == "absorbing" and config.training.batch_size == 32
    result, _ = run_training(config)
    rate = SyntheticGrammar().entropy_rate()
    assert result.eval_nelbo < 1.35 * rate, result.eval_nelbo / rate
