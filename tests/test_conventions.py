"""Hugging Face conventions, through the real clients: the lm-eval CLI, PEFT, AutoTokenizer and
AutoPeftModel in a process without hf_sfdlm, pipelines, Trainer, torch.compile."""

import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config
from test_hub import third_party_path

from hf_sfdlm import SFDLMForDiffusionLM
from hf_sfdlm.lora import apply_lora, save_adapter
from hf_sfdlm.synthetic import word_level_tokenizer


def open_gates(model, seed: int = 0):
    """Perturb every weight, as after pretraining (adaLN-Zero blocks are the identity at init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def train_adapter_by_hand(peft_model, seed: int):
    """Give the LoRA B matrices (zero at init) values, as a few training steps would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return peft_model


@pytest.fixture(scope="module")
def saved_absorbing(tmp_path_factory):
    """A tiny absorbing SFDLM over the word-level tokenizer, saved with its tokenizer and generation config."""
    tokenizer = word_level_tokenizer()
    config = tiny_config(vocab_size=len(tokenizer), process="absorbing", mask_token_id=tokenizer.mask_token_id)
    torch.manual_seed(0)
    model = open_gates(SFDLMForDiffusionLM(config)).eval()
    path = tmp_path_factory.mktemp("absorbing")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


# ------------------------------------------------------------------------------------------ lm-eval (item 5)
@pytest.mark.slow  # the harness indexes its ~10k bundled task files on every start: ~15 s of CPU
def test_lm_eval_cli_runs_the_sfdlm_model_on_a_local_task_and_falls_back_to_cpu(saved_absorbing, tmp_path):
    from hf_sfdlm.cli import main

    path, model, tokenizer = saved_absorbing
    words = [w for w in tokenizer.get_vocab() if not w.startswith("[")][:12]
    rows = [{"question": " ".join(words[i:i + 3]), "choices": [words[i + 3], words[i + 4]], "answer": 0}
            for i in range(3)]
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "tiny_mc.yaml").write_text(
        f"task: tiny_sfdlm_cli\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'tiny.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    argv = ["lm-eval", "--model", "sfdlm", "--model_args", f"pretrained={path},num_samples=4,max_length=32",
            "--tasks", "tiny_sfdlm_cli", "--include_path", str(tmp_path), "--device", "cuda:0",
            "--output_path", str(tmp_path / "out"), "--log_samples"]
    if torch.cuda.is_available():
        assert main(argv) == 0
    else:  # the harness's usual `--device cuda:0` on a CPU machine
        with pytest.warns(UserWarning, match="CUDA is not available; running on the CPU"):
            assert main(argv) == 0
    (results_file,) = glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))
    assert 0.0 <= json.load(open(results_file))["results"]["tiny_sfdlm_cli"]["acc,none"] <= 1.0
    (samples_file,) = glob.glob(str(tmp_path / "out" / "*" / "samples_tiny_sfdlm_cli_*.jsonl"))
    sample = json.loads(open(samples_file).readline())
    context, continuation = sample["arguments"]["gen_args_0"]["arg_0"], sample["arguments"]["gen_args_0"]["arg_1"]
    # The loglikelihood the harness recorded is the model's conditional NELBO, computed here directly.
    ids = tokenizer(context + continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    labels = ids.clone()
    labels[:, :len(tokenizer(context, add_special_tokens=False)["input_ids"])] = -100
    expected = -float(model.nelbo(ids, labels=labels, num_samples=4, generator=torch.Generator().manual_seed(0)))
    assert float(sample["resps"][0][0][0]) == pytest.approx(expected, rel=1e-5)


def test_python_m_hf_sfdlm_lm_eval_and_sfdlm_help_name_the_wrapper(capsys):
    from hf_sfdlm.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "lm-eval" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # every flag goes to the harness's own parser
        main(["lm-eval", "--help"])
    assert exit_info.value.code == 0
    assert "--model_args" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ PEFT (item 4)
def _input(model):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=generator)
    ids[ids == model.config.mask_token_id] = 5
    return ids


@pytest.mark.parametrize("task_type", [None, "FEATURE_EXTRACTION", "CAUSAL_LM"])
def test_peft_habitual_recipe_trains_for_the_task_types_users_try(task_type):
    from peft import LoraConfig, get_peft_model

    model = open_gates(SFDLMForDiffusionLM(tiny_config(process="absorbing", mask_token_id=31)))
    peft_model = get_peft_model(model, LoraConfig(task_type=task_type, target_modules="all-linear", r=2))
    assert peft_model.targeted_module_names and "lm_head" not in peft_model.targeted_module_names
    ids = _input(model)
    loss = peft_model(input_ids=ids, labels=ids, generator=torch.Generator().manual_seed(0)).loss
    loss.backward()
    grads = {name: p.grad for name, p in peft_model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in name for name in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())
    out = peft_model.generate(ids[:, :4], max_new_tokens=3, steps=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 7)


def test_auto_peft_model_loads_an_adapter_saved_by_save_adapter(saved_absorbing, tmp_path):
    from peft import AutoPeftModel
    from transformers import AutoModel

    path, model, _ = saved_absorbing
    peft_model = apply_lora(AutoModel.from_pretrained(path, trust_remote_code=True), r=2, target_modules="all-linear")
    train_adapter_by_hand(peft_model, seed=3)
    save_adapter(peft_model, tmp_path / "adapter")
    ids, t = _input(model), torch.tensor([0.3, 0.8])
    loaded = AutoPeftModel.from_pretrained(tmp_path / "adapter", trust_remote_code=True).eval()
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, timesteps=t).logits
        torch.testing.assert_close(loaded(input_ids=ids, timesteps=t).logits, expected, rtol=0, atol=1e-5)
        assert not torch.allclose(expected, model(input_ids=ids, timesteps=t).logits, atol=1e-3)


# ------------------------------------------- a process that cannot import hf_sfdlm (items 4 and 7, remote code)
CLEAN_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.extend(json.loads(sys.argv[1]))
    try:
        import hf_sfdlm
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"hf_sfdlm is importable from {hf_sfdlm.__file__}")
    import torch
    from peft import AutoPeftModel
    from transformers import AutoTokenizer

    model_dir, adapter_dir = sys.argv[2], sys.argv[3]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    adapted = AutoPeftModel.from_pretrained(adapter_dir, trust_remote_code=True).eval()
    inputs = torch.load(sys.argv[4])
    with torch.no_grad():
        logits = adapted(input_ids=inputs["ids"], timesteps=inputs["t"]).logits
    from transformers import pipeline
    fill = pipeline("fill-mask", model=sys.argv[6], trust_remote_code=True)
    predictions = fill("the [MASK] dog sees a ball .", top_k=5)
    json.dump({"mask_token": tokenizer.mask_token, "vocab": len(tokenizer), "logits": logits.tolist(),
               "base_module": type(adapted.base_model.model).__module__,
               "fill_module": type(fill.model).__module__,
               "fill": [[p["token"], p["score"]] for p in predictions]}, open(sys.argv[5], "w"))
""")


@pytest.mark.slow  # a fresh interpreter importing torch, transformers and peft
def test_tokenizer_auto_peft_model_and_fill_mask_work_without_hf_sfdlm(saved_absorbing, trained_by_sfdlm_train,
                                                                        tmp_path):
    from transformers import pipeline

    path, model, tokenizer = saved_absorbing
    peft_model = apply_lora(model.__class__.from_pretrained(path), r=2, target_modules="all-linear")
    train_adapter_by_hand(peft_model, seed=4)
    save_adapter(peft_model, tmp_path / "adapter")
    ids, t = _input(model), torch.tensor([0.3, 0.8])
    torch.save({"ids": ids, "t": t}, tmp_path / "inputs.pt")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "PYTHON"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CLEAN_SCRIPT, json.dumps(third_party_path()), str(path),
         str(tmp_path / "adapter"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.json"),
         str(trained_by_sfdlm_train)],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["mask_token"] == "[MASK]" and out["vocab"] == len(tokenizer)
    assert out["base_module"].startswith("transformers_modules.")
    # fill-mask through the saved remote code gives what it gives with the installed package
    assert out["fill_module"].startswith("transformers_modules.")
    local = pipeline("fill-mask", model=str(trained_by_sfdlm_train))("the [MASK] dog sees a ball .", top_k=5)
    assert [token for token, _ in out["fill"]] == [p["token"] for p in local]
    assert [score for _, score in out["fill"]] == pytest.approx([p["score"] for p in local], rel=1e-4)
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(out["logits"]), peft_model(input_ids=ids, timesteps=t).logits,
                                   rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ torch.compile (item 6)
def _denoising_step(model):
    def step(x_t, t, s):
        logits = model.denoise(x_t, t)
        schedule, diffusion = model.diffusion.schedule, model.diffusion
        probs = diffusion.reverse_probs(diffusion.x0_probs(logits, x_t), x_t, schedule.alpha(s), schedule.alpha(t))
        return probs.flatten(0, 1).multinomial(1).view(x_t.shape)
    return step


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
def test_dynamo_finds_no_graph_break_in_forward_and_in_a_denoising_step(process):
    import torch._dynamo

    model = SFDLMForDiffusionLM(tiny_config(process=process, mask_token_id=31 if process == "absorbing" else None))
    ids, t, s = torch.randint(0, 31, (2, 12)), torch.tensor([0.7, 0.4]), torch.tensor([0.6, 0.3])
    calls = {"forward": lambda ids, t: model(input_ids=ids, timesteps=t).logits,
             "forward+backward": lambda ids, t: model(input_ids=ids, timesteps=t).logits.logsumexp(-1).mean(),
             "denoising step": lambda ids, t: _denoising_step(model)(ids, t, s),
             "training loss": lambda ids, t: model(input_ids=ids, labels=ids).loss}
    for name, call in calls.items():
        torch._dynamo.reset()
        with torch.set_grad_enabled(name in ("forward+backward", "training loss")):
            explanation = torch._dynamo.explain(call)(ids, t)
        assert explanation.graph_break_count == 0, (name, [b.reason for b in explanation.break_reasons])
        assert explanation.graph_count == 1


def test_compiled_model_matches_eager_and_still_validates_token_ids():
    model = open_gates(SFDLMForDiffusionLM(tiny_config(process="absorbing", mask_token_id=31))).eval()
    ids, t = torch.randint(0, 31, (2, 12)), torch.tensor([0.7, 0.4])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # inductor is measured in benchmarks/
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids, timesteps=t).logits, model(input_ids=ids, timesteps=t).logits)
        bad = ids.clone()
        bad[1, 3] = 32
        with pytest.raises(RuntimeError, match=r"Token ids must lie in \[0, vocab_size=32\)"):
            compiled(input_ids=bad, timesteps=t)
    with pytest.raises(ValueError, match="Token id 32 is outside"):  # eager keeps the ValueError naming the id
        model(input_ids=bad, timesteps=t)


def _train_losses(out, **training):
    from accelerate.state import AcceleratorState
    from test_training import _losses, make_config

    from hf_sfdlm.pipelines import prepare_pipeline
    from hf_sfdlm.trainer import DiffusionTrainer

    AcceleratorState._reset_state()
    config = make_config(out, max_steps=3, eval_every=0, checkpoint_every=0, ema_decay=None, **training)
    pipeline = prepare_pipeline(config)
    trainer = DiffusionTrainer(pipeline.model, config.training, pipeline.train_dataset, tokenizer=pipeline.tokenizer)
    trainer.train()
    AcceleratorState._reset_state()
    return trainer, _losses(out)


def test_training_compile_compiles_the_model_in_place_and_trains_the_same(tmp_path):
    from hf_sfdlm.train_config import TrainingConfig, load_config

    _, eager = _train_losses(tmp_path / "eager")
    torch._dynamo.reset()
    trainer, compiled = _train_losses(tmp_path / "compiled", compile="aot_eager")  # inductor: benchmarks/
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model._compiled_call_impl is not None  # nn.Module.compile: compiled, names unchanged
    assert not any(name.startswith("_orig_mod") for name in model.state_dict())
    assert eager.keys() == compiled.keys() == {1, 2, 3}
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4)
    assert load_config(overrides=["training.compile=true"]).training.compile is True
    with pytest.raises(ValueError, match="training.compile"):
        TrainingConfig(compile="no-such-backend")


# ------------------------------------------------------------------ no timesteps: pipelines, masked-LM clients (item 1)
@pytest.fixture(scope="module")
def trained_by_sfdlm_train(tmp_path_factory):
    """A folder written by `sfdlm train` (the embedded default: absorbing, word-level tokenizer), tiny budget."""
    from accelerate.state import AcceleratorState

    from hf_sfdlm.cli import main

    out = tmp_path_factory.mktemp("sfdlm_train") / "model"
    AcceleratorState._reset_state()
    assert main(["train", "--output-dir", str(out), "--max-steps", "3", "--num-samples", "0",
                 "model.hidden_size=32", "model.stage_depths=[1,1]", "model.fourier_intermediate_size=64",
                 "data.synthetic_sentences=300", "data.block_size=16", "training.batch_size=8",
                 "training.eval_every=0", "training.checkpoint_every=0", "training.progress_bar=false",
                 "training.log_with=[jsonl]"]) == 0
    AcceleratorState._reset_state()
    return out


def test_absorbing_model_reads_the_noise_level_from_the_masked_fraction():
    config = tiny_config(process="absorbing", mask_token_id=31, noise_schedule="cosine")
    model = open_gates(SFDLMForDiffusionLM(config)).eval()
    ids = torch.randint(0, 31, (3, 16), generator=torch.Generator().manual_seed(0))
    ids[0, :4] = 31                       # 4 of 16 masked
    ids[1, :] = 31                        # all masked
    attention_mask = torch.ones_like(ids)
    attention_mask[2, 10:] = 0            # row 2: 10 real positions, 5 of them masked; padding does not count
    ids[2, :5] = 31
    ids[2, 12] = 31                       # a mask id at a padded position is not counted
    fractions = torch.tensor([4 / 16, 1.0, 5 / 10], dtype=torch.float64)
    t = model.infer_timesteps(ids, attention_mask)
    # cosine schedule: 1 - alpha(t) = 1 - cos(pi t / 2), inverted independently here
    expected = torch.arccos(1 - fractions) * 2 / torch.pi
    torch.testing.assert_close(t.double(), expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention_mask)
        torch.testing.assert_close(out.logits, model(input_ids=ids, attention_mask=attention_mask, timesteps=t).logits)
    torch.testing.assert_close(out.timesteps, t)
    discrete = SFDLMForDiffusionLM(tiny_config(process="absorbing", mask_token_id=31, num_timesteps=10,
                                               noise_schedule="loglinear"))
    row = torch.full((1, 16), 5)
    row[0, :5] = 31  # 5/16 masked: t = 0.3125 under loglinear, on the step grid 3/10
    assert discrete.infer_timesteps(row).tolist() == [pytest.approx(0.3)]


def test_uniform_model_without_timesteps_says_what_to_pass():
    model = SFDLMForDiffusionLM(tiny_config(process="uniform"))
    with pytest.raises(ValueError, match=r"pass `timesteps`.*pipelines, need an absorbing model"):
        model(input_ids=torch.randint(0, 32, (2, 8)))


def test_fill_mask_pipeline_on_a_model_saved_by_sfdlm_train(trained_by_sfdlm_train):
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(trained_by_sfdlm_train))  # remote code: the clean-process test below
    tokenizer = fill.tokenizer
    vocabulary = len(tokenizer)
    predictions = fill("the [MASK] dog sees a ball .", top_k=vocabulary - 1)  # everything but one token
    assert len(predictions) == vocabulary - 1
    assert tokenizer.mask_token_id not in {p["token"] for p in predictions}
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)
    # The scores are the model's p_hat(x_0 | x_t) at the noise level of 1 masked position in 7.
    ids = tokenizer("the [MASK] dog sees a ball .", return_tensors="pt")["input_ids"]
    t = torch.tensor([1 - 6 / 7])  # loglinear schedule: 1 - alpha(t) = t
    with torch.no_grad():
        probs = fill.model(input_ids=ids, timesteps=t).logits[0, 1].softmax(-1)
    best = predictions[0]
    assert best["token"] == int(probs.argmax()) and best["score"] == pytest.approx(float(probs.max()), rel=1e-4)


def test_trainer_with_a_collator_without_labels_says_no_loss(tmp_path):
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    tokenizer = word_level_tokenizer()
    model = SFDLMForDiffusionLM(tiny_config(vocab_size=len(tokenizer), process="absorbing",
                                            mask_token_id=tokenizer.mask_token_id))
    data = Dataset.from_dict({"text": ["the small dog sees a ball ."] * 4}).map(
        lambda row: tokenizer(row["text"]), remove_columns=["text"])
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True),
                      train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer))
    with pytest.raises(ValueError, match="did not return a loss"):
        trainer.train()


# ------------------------------------------------------------------ Trainer and gradient accumulation (item 2)
def _trainer_run(out, accumulation: int):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    torch.manual_seed(0)
    model = open_gates(SFDLMForDiffusionLM(tiny_config(process="absorbing", mask_token_id=31)))
    ids = torch.randint(0, 31, (16, 12), generator=torch.Generator().manual_seed(5))
    # t = 1 masks every position, so the loss is exactly determined by the data (no random draw to differ
    # between one batch of 8 and four micro-batches of 2).
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(), "timesteps": [1.0] * 16})
    args = TrainingArguments(str(out), per_device_train_batch_size=8 // accumulation,
                             gradient_accumulation_steps=accumulation, max_steps=2, learning_rate=1e-2,
                             logging_steps=1, report_to=[], use_cpu=True, seed=0, lr_scheduler_type="constant",
                             optim="sgd",  # Adam would magnify float rounding where a gradient is ~0
                             save_strategy="no", dataloader_drop_last=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_trainer_gradient_accumulation_logs_and_steps_the_full_batch_loss(tmp_path):
    full_losses, full_weights = _trainer_run(tmp_path / "ga1", 1)
    accumulated_losses, accumulated_weights = _trainer_run(tmp_path / "ga4", 4)
    assert len(full_losses) == len(accumulated_losses) == 2
    assert accumulated_losses == pytest.approx(full_losses, rel=1e-4)
    for name, weight in full_weights.items():
        torch.testing.assert_close(accumulated_weights[name], weight, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ return_dict, hidden states, inputs_embeds (item 3)
def test_return_dict_false_gives_the_tuple_transformers_models_give():
    model = open_gates(SFDLMForDiffusionLM(tiny_config(process="absorbing", mask_token_id=31))).eval()
    ids, t = _input(model), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        as_dict = model(input_ids=ids, timesteps=t)
        as_tuple = model(input_ids=ids, timesteps=t, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2  # (logits, timesteps)
    torch.testing.assert_close(as_tuple[0], as_dict.logits)
    trained = model(input_ids=ids, labels=ids, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(trained, tuple) and trained[0].dim() == 0 and trained[1].shape == (2, 10, 32)
    backbone = model.model(input_ids=ids, timesteps=t, return_dict=False)
    assert isinstance(backbone, tuple) and len(backbone) == 1


def test_output_hidden_states_gives_every_stage_and_respects_padding():
    config = tiny_config(process="absorbing", mask_token_id=31, stage_depths=[1, 1, 1], pool_factors=[2, 2])
    model = open_gates(SFDLMForDiffusionLM(config)).eval()
    ids, t = torch.randint(0, 31, (2, 10)), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        out = model(input_ids=ids, timesteps=t, output_hidden_states=True)
        states = out.hidden_states
        # embeddings, 2 down stages, bottleneck, 2 up stages
        assert [s.shape[1] for s in states] == [10, 10, 5, 3, 5, 10]
        torch.testing.assert_close(states[0], model.model.embed_tokens(ids))
        torch.testing.assert_close(states[-1], model.model(input_ids=ids, timesteps=t).last_hidden_state)
        torch.testing.assert_close(out.logits, model(input_ids=ids, timesteps=t).logits)
        # A padded row's states equal the row's states alone (full-length stages at the real positions,
        # pooled stages from position 0).
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        padded = model(input_ids=ids, attention_mask=mask, timesteps=t, output_hidden_states=True).hidden_states
        alone = model(input_ids=ids[1:, 3:], timesteps=t[1:], output_hidden_states=True).hidden_states
        for full, single in zip(padded, alone):
            if full.shape[1] == 10:
                torch.testing.assert_close(full[1, 3:], single[0], rtol=1e-5, atol=1e-5)
                assert full[1, :3].abs().sum() == 0
            else:
                torch.testing.assert_close(full[1, :single.shape[1]], single[0], rtol=1e-5, atol=1e-5)


def test_inputs_embeds_gives_the_logits_of_the_ids_and_is_refused_where_it_cannot_work():
    model = open_gates(SFDLMForDiffusionLM(tiny_config(process="absorbing", mask_token_id=31))).eval()
    ids, t = _input(model), torch.tensor([0.3, 0.8])
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds, timesteps=t).logits,
                                   model(input_ids=ids, timesteps=t).logits)
    with pytest.raises(ValueError, match="exactly one of"):
        model(input_ids=ids, inputs_embeds=embeds, timesteps=t)
    with pytest.raises(ValueError, match="pass `timesteps`"):  # a noise level cannot be read from embeddings
        model(inputs_embeds=embeds)
    with pytest.raises(ValueError, match="cannot start from `inputs_embeds`"):
        model(inputs_embeds=embeds, labels=ids)
    with pytest.raises(ValueError, match="hidden_size=16"):
        model(inputs_embeds=embeds[..., :8], timesteps=t)
    with pytest.raises(ValueError, match="no attention layers"):
        model(input_ids=ids, timesteps=t, output_attentions=True)


# ------------------------------------------------ pipeline("feature-extraction") gives hidden states (issue 22, item 5)
@pytest.fixture(scope="module")
def saved_for_features(tmp_path_factory):
    """Absorbing and uniform (both noise-conditioned) word-level models with their tokenizer, weights opened."""
    tokenizer = word_level_tokenizer()
    folders = {}
    for process in ("absorbing", "uniform"):
        model = SFDLMForDiffusionLM(tiny_config(vocab_size=len(tokenizer), process=process,
                                                mask_token_id=tokenizer.mask_token_id)).eval()
        open_gates(model, seed=5)
        folder = tmp_path_factory.mktemp(f"features_{process}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[process] = (folder, model)
    return folders, tokenizer


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
def test_feature_extraction_pipeline_returns_the_backbone_hidden_states(saved_for_features, process):
    """The real `pipeline("feature-extraction")` returns last_hidden_state (1, L, hidden_size) of the backbone at
    the noise level read from the text (absorbing: its masked fraction; uniform: 0), not (1, L, V) logits;
    `timesteps=` sets it. Through the folder's code (trust_remote_code=True) and, with hf_sfdlm installed,
    through `pipeline_class=` without running folder code; without either transformers refuses."""
    from transformers import pipeline

    from hf_sfdlm import SFDLMFeatureExtractionPipeline

    folders, tokenizer = saved_for_features
    folder, model = folders[process]
    text = "the small dog [MASK] a ball ."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    t = model.infer_timesteps(ids) if process == "absorbing" else torch.zeros(1)
    assert (t > 0).all() == (process == "absorbing")
    with torch.no_grad():
        expected = model.model(ids, timesteps=t).last_hidden_state
        other_t = model.model(ids, timesteps=0.7).last_hidden_state
    assert expected.shape == (1, ids.shape[1], model.config.hidden_size) != model.config.vocab_size
    remote = pipeline("feature-extraction", model=str(folder), trust_remote_code=True)
    assert type(remote).__module__.startswith("transformers_modules.")
    local = pipeline("feature-extraction", model=str(folder), pipeline_class=SFDLMFeatureExtractionPipeline)
    assert type(local.model).__module__ == "hf_sfdlm.modeling_sfdlm"
    for extractor in (remote, local):
        torch.testing.assert_close(extractor(text, return_tensors=True), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(extractor(text, return_tensors=True, timesteps=0.7), other_t, rtol=0, atol=1e-6)
        assert torch.tensor(extractor(text)).shape == expected.shape  # the default nested list
    assert not torch.allclose(expected, other_t, atol=1e-4)  # the noise level matters to these weights
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        pipeline("feature-extraction", model=str(folder))


def test_auto_model_still_generates_and_fill_mask_still_predicts_after_the_pipeline_entry(saved_for_features):
    from transformers import AutoModel, pipeline

    folders, tokenizer = saved_for_features
    folder, model = folders["absorbing"]
    assert json.loads((folder / "config.json").read_text())["custom_pipelines"] == {
        "feature-extraction": {"impl": "feature_extraction_sfdlm.SFDLMFeatureExtractionPipeline", "pt": ["AutoModel"]}}
    loaded = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    ids = tokenizer("the small dog", return_tensors="pt")["input_ids"]
    out = loaded.generate(ids, max_new_tokens=4, steps=4, do_sample=False)
    assert torch.equal(out, model.generate(ids, max_new_tokens=4, steps=4, do_sample=False))
    predictions = pipeline("fill-mask", model=str(folder))("the [MASK] dog sees a ball .", top_k=3)
    with torch.no_grad():
        ids = tokenizer("the [MASK] dog sees a ball .", return_tensors="pt")["input_ids"]
        probs = model(input_ids=ids).logits[0, 1].softmax(-1)
    assert [p["token"] for p in predictions] == probs.topk(3).indices.tolist()


FEATURES_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.extend(json.loads(sys.argv[1]))
    try:
        import hf_sfdlm
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"hf_sfdlm is importable from {hf_sfdlm.__file__}")
    from transformers import pipeline
    extractor = pipeline("feature-extraction", model=sys.argv[2], trust_remote_code=True)
    features = extractor("the small dog [MASK] a ball .", return_tensors=True)
    json.dump({"module": type(extractor).__module__, "features": features.tolist()}, open(sys.argv[3], "w"))
""")


@pytest.mark.slow  # a fresh interpreter importing torch and transformers
def test_feature_extraction_pipeline_works_through_remote_code_alone(saved_for_features, tmp_path):
    from transformers import pipeline

    from hf_sfdlm import SFDLMFeatureExtractionPipeline

    folders, _ = saved_for_features
    folder, _ = folders["absorbing"]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "PYTHON"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-I", "-S", "-c", FEATURES_SCRIPT, json.dumps(third_party_path()),
                             str(folder), str(tmp_path / "out.json")],
                            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["module"].startswith("transformers_modules.")
    local = pipeline("feature-extraction", model=str(folder), pipeline_class=SFDLMFeatureExtractionPipeline)
    torch.testing.assert_close(torch.tensor(out["features"]), local("the small dog [MASK] a ball .", return_tensors=True),
                               rtol=0, atol=1e-5)
