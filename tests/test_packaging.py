"""Hugging Face packaging: Auto classes, save/load round trips, remote code without the package."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from conftest import tiny_config
from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM

REMOTE_CODE_FILES = {"configuration_sfdlm.py", "modeling_sfdlm.py", "diffusion.py", "diffusion_lm.py",
                     "generation_sfdlm.py", "sampling_sfdlm.py"}


@pytest.fixture
def saved_model(tmp_path):
    config = tiny_config(process="absorbing", mask_token_id=31)
    model = SFDLMForDiffusionLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_save_writes_safetensors_auto_map_and_the_remote_code(saved_model):
    _, folder = saved_model
    files = {path.name for path in folder.iterdir()}
    assert "model.safetensors" in files and not any(name.endswith(".bin") for name in files)
    assert REMOTE_CODE_FILES <= files
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_sfdlm.SFDLMConfig",
        "AutoModel": "modeling_sfdlm.SFDLMForDiffusionLM",
        "AutoModelForMaskedLM": "modeling_sfdlm.SFDLMForDiffusionLM",
    }
    # the copied remote code imports nothing from the package
    for name in REMOTE_CODE_FILES:
        assert "from hf_sfdlm" not in (folder / name).read_text() and "import hf_sfdlm" not in (folder / name).read_text()


def test_round_trip_gives_identical_logits_through_every_auto_class(saved_model):
    model, folder = saved_model
    ids = torch.randint(0, 31, (2, 13))
    t = torch.tensor([0.2, 0.7])
    expected = model(ids, timesteps=t).logits
    assert isinstance(AutoConfig.from_pretrained(folder), SFDLMConfig)
    for loader in (SFDLMForDiffusionLM, AutoModel, AutoModelForMaskedLM):
        loaded = loader.from_pretrained(folder).eval()
        assert type(loaded) is SFDLMForDiffusionLM
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids, timesteps=t).logits, expected, rtol=0, atol=0)


def test_dtype_loading(saved_model):
    _, folder = saved_model
    loaded = AutoModel.from_pretrained(folder, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    logits = loaded(torch.randint(0, 31, (1, 8)), timesteps=torch.tensor([0.5])).logits
    assert logits.dtype == torch.bfloat16


def test_trust_remote_code_loads_where_the_package_cannot_be_imported(saved_model, tmp_path_factory):
    model, folder = saved_model
    ids = torch.randint(0, 31, (2, 9))
    t = torch.tensor([0.4, 0.9])
    with torch.no_grad():
        expected = model(ids, timesteps=t).logits
    work = tmp_path_factory.mktemp("elsewhere")
    torch.save({"ids": ids, "t": t}, work / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys
        class BlockPackage:  # make `hf_sfdlm` unimportable, however it is installed
            def find_spec(self, name, path=None, target=None):
                if name == "hf_sfdlm" or name.startswith("hf_sfdlm."):
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, BlockPackage())
        try:
            import hf_sfdlm
            raise SystemExit("hf_sfdlm should not be importable here")
        except ImportError:
            pass
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = torch.load("inputs.pt")
        with torch.no_grad():
            torch.save(model(inputs["ids"], timesteps=inputs["t"]).logits, "logits.pt")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=work, capture_output=True, text=True, timeout=300,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(work / "hf")})
    assert result.returncode == 0, result.stderr[-3000:]
    # another process may use another thread count: equal up to float32 reduction order
    torch.testing.assert_close(torch.load(work / "logits.pt"), expected, rtol=1e-5, atol=1e-5)


def test_corrupt_weights_fail_loudly(saved_model):
    _, folder = saved_model
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(Exception):
        SFDLMForDiffusionLM.from_pretrained(folder)
