"""Smoke test of the lowest dependency versions `pyproject.toml` allows (run by `.ci/run` in its own venv).

Not a pytest file (it lives outside `tests/`, which is all pytest collects): it checks, with whatever versions
are installed, the paths a user of those versions takes first:

1. `sfdlm train` (the library's training path: data, tokenizer, accelerate, `DiffusionTrainer`, checkpoint,
   `save_pretrained`, model card) for a few steps of a tiny model, ending with samples and an infill;
2. in a clean process where `hf_sfdlm` cannot be imported: `AutoModel.from_pretrained(folder,
   trust_remote_code=True)` on the saved folder (every remote-code file it needs must have been saved),
   `pipeline("fill-mask")` and `generate`;
3. the remote-code model's logits equal the installed class's on the same inputs;
4. PEFT: LoRA adapters on the model, one backward pass.

    python .ci/floor_smoke.py            # exits non-zero with the failing step's output
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

TINY = ["model.hidden_size=32", "model.stage_depths=[1,1]", "model.pool_factors=[2]", "model.ssm_state_size=4",
        "model.fourier_intermediate_size=64", "data.block_size=16", "data.synthetic_sentences=400",
        "training.batch_size=8", "training.eval_every=0", "training.checkpoint_every=2", "training.warmup_steps=1",
        "training.eval_max_sequences=16", "training.eval_num_samples=1", "training.progress_bar=false",
        "training.log_with=[jsonl]"]

# Runs in a process where `hf_sfdlm` is unimportable, however it is installed. argv: folder, inputs, outputs.
REMOTE = textwrap.dedent(
    """
    import json, sys
    class BlockPackage:
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
    from transformers import AutoModel, AutoTokenizer, pipeline
    folder, inputs, outputs = sys.argv[1:]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    data = torch.load(inputs)
    with torch.no_grad():
        logits = model(data["ids"], timesteps=data["t"]).logits
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    fill = pipeline("fill-mask", model=folder, trust_remote_code=True)
    found = fill(f"the {tokenizer.mask_token} dog sees a ball .", top_k=3)
    assert len(found) == 3 and all(0 < r["score"] <= 1 for r in found), found
    assert [r["score"] for r in found] == sorted((r["score"] for r in found), reverse=True), found
    assert all(r["token_str"] != tokenizer.mask_token for r in found), found
    prompt = tokenizer("the small dog", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=6, steps=6, generator=torch.Generator().manual_seed(0))
    n = prompt.input_ids.shape[1]
    assert out.shape == (1, n + 6) and torch.equal(out[:, :n], prompt.input_ids), out
    assert not (out == model.config.mask_token_id).any(), out
    torch.save({"logits": logits, "generated": out}, outputs)
    print("remote code:", type(model).__module__, "| fill-mask:", [r["token_str"] for r in found],
          "| generated:", tokenizer.decode(out[0]))
    """
)


def run(command: list[str], cwd: Path, env: dict[str, str], what: str) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        sys.exit(f"FAILED: {what} (exit {done.returncode})\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done.stdout


def versions() -> dict[str, str]:
    names = ["torch", "transformers", "accelerate", "datasets", "peft", "huggingface-hub", "tokenizers",
             "safetensors", "numpy"]
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def main() -> None:
    import torch

    print("floor smoke test with", json.dumps(versions()))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    with tempfile.TemporaryDirectory(prefix="sfdlm-floor-") as work:
        work = Path(work)
        env["HF_HOME"] = str(work / "hf")
        folder = work / "model"
        print(run([sys.executable, "-m", "hf_sfdlm.cli", "train", "--output-dir", str(folder), "--max-steps", "3",
                   "--num-samples", "1", "--sample-steps", "4", "--threads", "1", *TINY], work, env,
                  "sfdlm train").strip()[-600:])
        assert (folder / "model.safetensors").is_file() and (folder / "checkpoints" / "step-2").is_dir()

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        ids = tokenizer(["the small dog sees a red ball .", "a cat finds the key and runs ."], padding=True,
                        return_tensors="pt").input_ids
        t = torch.tensor([0.4, 0.9])
        torch.save({"ids": ids, "t": t}, work / "inputs.pt")
        clean = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        print(run([sys.executable, "-c", REMOTE, str(folder), str(work / "inputs.pt"), str(work / "out.pt")],
                  work, clean, "remote code without hf_sfdlm").strip())

        from hf_sfdlm import SFDLMForDiffusionLM

        model = SFDLMForDiffusionLM.from_pretrained(folder).eval()
        with torch.no_grad():
            expected = model(ids, timesteps=t).logits
        remote = torch.load(work / "out.pt")
        torch.testing.assert_close(remote["logits"], expected, rtol=1e-5, atol=1e-5)
        lora_step(model, ids, t)
    print("floor smoke test passed")


def lora_step(model, ids, t) -> None:
    """PEFT: LoRA adapters on the model, one backward pass; only adapter weights get gradients, and the
    untrained adapter leaves the outputs unchanged (LoRA's B starts at zero)."""
    import torch

    from hf_sfdlm.lora import apply_lora

    with torch.no_grad():
        before = model(ids, timesteps=t).logits
    peft_model = apply_lora(model.train(), r=4)
    output = peft_model(input_ids=ids, labels=ids, timesteps=t)
    output.loss.backward()
    with_grad = [name for name, p in peft_model.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in name for name in with_grad), with_grad
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(ids, timesteps=t).logits, before)
    print(f"peft: LoRA on {len(peft_model.targeted_module_names)} modules, loss {output.loss.item():.3f}")


if __name__ == "__main__":
    main()
