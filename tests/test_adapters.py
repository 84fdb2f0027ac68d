"""Adapters written by `sfdlm finetune` load the way the README says: with `AutoPeftModel` in a fresh
process that cannot import hf_sfdlm, from another working directory (the base was given as a relative
folder), and through `sfdlm eval` / `evaluation.load_model`."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_hub import third_party_path
from test_lora import fixed_logits, sft_files

from hf_sfdlm.cli import main as cli_main
from hf_sfdlm.lora import load_adapter

CLEAN_LOAD = textwrap.dedent("""
    import json, sys
    sys.path.extend(json.loads(sys.argv[1]))  # the parent's third-party packages, without hf_sfdlm
    try:
        import hf_sfdlm
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"hf_sfdlm is importable from {hf_sfdlm.__file__}")
    import torch
    from peft import AutoPeftModel

    model = AutoPeftModel.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
    inputs = json.load(open(sys.argv[3]))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(inputs["ids"]), timesteps=torch.tensor(inputs["t"])).logits
    print(json.dumps({"class": type(model.get_base_model()).__module__, "logits": logits.tolist()}))
""")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """`sfdlm finetune --model models/base` run from a project folder, as a user would: base given relative."""
    root = tmp_path_factory.mktemp("project")
    base, data = sft_files(root)
    (root / "models").mkdir()
    os.replace(base, root / "models" / "base")
    previous = os.getcwd()
    os.chdir(root)
    try:
        assert cli_main(["finetune", "--model", "models/base", "--data", str(data), "--output-dir", "out",
                         "--max-steps", "2", "--lora-r", "4", "--block-size", "32", "training.batch_size=4",
                         "training.learning_rate=0.05", "training.progress_bar=false", "training.log_with=[]",
                         "training.eval_every=0"]) == 0
    finally:
        os.chdir(previous)
    return root


def test_finetune_adapter_config_names_transformers_and_an_absolute_base(finetuned):
    config = json.loads((finetuned / "out" / "adapter_config.json").read_text())
    assert config["auto_mapping"] == {"base_model_class": "AutoModel", "parent_library": "transformers"}
    assert config["base_model_name_or_path"] == str((finetuned / "models" / "base").resolve())
    best = json.loads((finetuned / "out" / "best" / "adapter_config.json").read_text())  # the other save path
    assert best["auto_mapping"]["parent_library"] == "transformers"


@pytest.mark.slow  # a fresh interpreter importing torch, transformers and peft
def test_auto_peft_model_loads_the_finetune_adapter_in_a_clean_process_elsewhere(finetuned, tmp_path):
    from transformers import AutoModel

    base = AutoModel.from_pretrained(finetuned / "models" / "base", trust_remote_code=True)
    adapted = load_adapter(base, finetuned / "out")
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=generator)
    ids[ids == base.config.mask_token_id] = 5
    t = torch.tensor([0.3, 0.7])
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"ids": ids.tolist(), "t": t.tolist()}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "PYTHON"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-I", "-S", "-c", CLEAN_LOAD, json.dumps(third_party_path()),
                             str(finetuned / "out"), str(inputs)], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["class"].startswith("transformers_modules.")
    adapted.eval()
    with torch.no_grad():
        expected = adapted(input_ids=ids, timesteps=t).logits
        with adapted.disable_adapter():
            plain = adapted(input_ids=ids, timesteps=t).logits
    assert not torch.allclose(expected, plain, atol=1e-4)  # the adapter changes the outputs
    torch.testing.assert_close(torch.tensor(out["logits"]), expected, rtol=0, atol=1e-5)


def test_eval_and_load_model_read_an_adapter_folder(finetuned, tmp_path, capsys, monkeypatch):
    from hf_sfdlm.evaluation import load_model

    monkeypatch.chdir(tmp_path)  # the adapter's base is found from another working directory
    model = load_model(str(finetuned / "out"))
    assert hasattr(model, "peft_config") and not model.training
    reference = load_adapter(load_model(str(finetuned / "models" / "base")), finetuned / "out")
    torch.testing.assert_close(fixed_logits(model), fixed_logits(reference), rtol=0, atol=0)
    text = tmp_path / "text.txt"
    text.write_text("the dog sees a ball .\nthe cat runs .\n")
    assert cli_main(["eval", str(finetuned / "out"), "--text-file", str(text), "--no-progress",
                     "--nelbo-samples", "2", "--block-size", "16", "--json", "result.json"]) == 0
    assert "PeftModel" in capsys.readouterr().out
    assert json.loads((tmp_path / "result.json").read_text())["num_tokens"] > 0


def test_the_finetune_output_folder_pushes_without_allowing_anything(finetuned, capsys):
    """Everything `sfdlm finetune` writes next to the adapter is a known file or an ignored training leftover."""
    capsys.readouterr()
    assert cli_main(["push", "--model", str(finetuned / "out"), "--repo-id", "org/tiny-lora", "--base-model",
                     "org/tiny", "--dry-run"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "sfdlm_adapter.json"} <= set(listed)
    assert not any(name.startswith(("checkpoints/", "logs/", "best/")) for name in listed)


def test_eval_of_an_adapter_folder_without_tokenizer_uses_its_base_tokenizer(finetuned, tmp_path, capsys):
    from transformers import AutoModel

    from hf_sfdlm.lora import apply_lora, save_adapter

    base = AutoModel.from_pretrained(finetuned / "models" / "base", trust_remote_code=True)
    adapter = tmp_path / "plain-adapter"
    save_adapter(apply_lora(base, r=2), adapter)  # PEFT files only: no tokenizer
    assert not (adapter / "tokenizer_config.json").exists()
    text = tmp_path / "text.txt"
    text.write_text("the dog sees a ball .\n")
    assert cli_main(["eval", str(adapter), "--text-file", str(text), "--no-progress", "--nelbo-samples", "2"]) == 0
    assert "tokenizer: " in capsys.readouterr().out
