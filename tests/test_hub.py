"""Hub: the exact commit a push would send (the Hub cannot be reached here), and a real pull by repo id
from a Hub-layout cache in a process that cannot import hf_sfdlm."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from huggingface_hub import CommitInfo, HfApi
from huggingface_hub.errors import OfflineModeIsEnabled

from hf_sfdlm import SFDLMForDiffusionLM
from hf_sfdlm.cli import main as cli_main
from hf_sfdlm.hub import commit_operations, load_pretrained, local_paths_in_card, push_model
from hf_sfdlm.lora import apply_lora, save_adapter
from hf_sfdlm.model_card import validate_model_card, write_model_card
from hf_sfdlm.synthetic import word_level_tokenizer

REMOTE_CODE = {"configuration_sfdlm.py", "modeling_sfdlm.py", "diffusion.py", "diffusion_lm.py"}



class RecordingApi(HfApi):
    """`HfApi` whose three network calls are recorded instead of sent."""

    def __init__(self):
        super().__init__(token="hf_not_a_real_token")
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def create_commit(self, repo_id, **kwargs):
        for operation in kwargs["operations"]:
            operation.upload_info.sha256  # read the bytes now, as the real upload would (temp dirs vanish)
        self.calls.append(("create_commit", repo_id, kwargs))
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="",
                          commit_description="", oid="0" * 40,
                          pr_url=f"https://huggingface.co/{repo_id}/discussions/1" if kwargs.get("create_pr") else None)


def save_model(folder: Path, seed: int = 0, with_tokenizer: bool = True) -> SFDLMForDiffusionLM:
    torch.manual_seed(seed)
    tokenizer = word_level_tokenizer()
    model = SFDLMForDiffusionLM(tiny_config(vocab_size=len(tokenizer), process="absorbing",
                                            mask_token_id=tokenizer.mask_token_id))
    model.save_pretrained(folder)
    if with_tokenizer:
        tokenizer.save_pretrained(folder)
    return model


def test_push_sends_exactly_the_model_files_in_one_commit(tmp_path):
    folder = tmp_path / "model"
    save_model(folder)
    saved = {p.name for p in folder.iterdir()}
    assert REMOTE_CODE | {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= saved
    # Training leftovers that must not be uploaded.
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"x")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out").write_bytes(b"x")
    (folder / ".DS_Store").write_bytes(b"x")
    (folder / "best").mkdir()
    (folder / "best" / "model.safetensors").write_bytes(b"x")

    api = RecordingApi()
    info = push_model(folder, "org/tiny-sfdlm", private=True, revision="v1", create_pr=True, api=api)

    assert info.pr_url == "https://huggingface.co/org/tiny-sfdlm/discussions/1"
    assert [call[0] for call in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[0][1:] == ("org/tiny-sfdlm", {"repo_type": "model", "private": True, "exist_ok": True})
    assert api.calls[1][1:] == ("org/tiny-sfdlm", {"branch": "v1", "repo_type": "model", "exist_ok": True})
    _, repo_id, commit = api.calls[2]
    assert repo_id == "org/tiny-sfdlm"
    assert {k: v for k, v in commit.items() if k != "operations"} == {
        "repo_type": "model", "revision": "v1", "create_pr": True, "commit_message": "Upload SFDLM model with hf_sfdlm"}
    operations = commit["operations"]
    assert [op.path_in_repo for op in operations] == sorted(saved | {"README.md"})
    for op in operations:  # each operation uploads the file's bytes (checked by its sha256)
        assert op.path_or_fileobj == str(folder / op.path_in_repo)
        assert op.upload_info.sha256 == hashlib.sha256((folder / op.path_in_repo).read_bytes()).digest()
    validate_model_card(folder)  # the card written on push
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModel"] == \
        "modeling_sfdlm.SFDLMForDiffusionLM"


def test_model_push_to_hub_sends_weights_config_and_remote_code(tmp_path, monkeypatch):
    """transformers' own `model.push_to_hub`, up to the network: one commit with the safetensors weights,
    config.json with auto_map, the remote-code files and the generation config (and transformers' generic
    card when the repo has none; `push_model` sends ours and the tokenizer)."""
    from huggingface_hub.errors import EntryNotFoundError

    model = save_model(tmp_path / "reference", with_tokenizer=False)
    api = RecordingApi()

    def no_card_on_the_hub(*args, **kwargs):
        raise EntryNotFoundError("no README.md")

    monkeypatch.setattr("transformers.utils.hub.hf_api", lambda: api)
    monkeypatch.setattr("transformers.utils.hub.ModelCard.load", no_card_on_the_hub)
    model.push_to_hub("org/tiny-sfdlm", private=True, revision="v1", create_pr=True)
    assert [call[0] for call in api.calls] == ["create_repo", "create_branch", "create_commit"]
    operations = {op.path_in_repo: op for op in api.calls[-1][2]["operations"]}
    saved = {p.name for p in (tmp_path / "reference").iterdir()}
    assert set(operations) == saved | {"README.md"}
    assert REMOTE_CODE | {"config.json", "model.safetensors", "generation_config.json"} <= set(operations)
    config_sha = hashlib.sha256((tmp_path / "reference" / "config.json").read_bytes()).digest()
    assert operations["config.json"].upload_info.sha256 == config_sha  # the config with its auto_map


def test_push_keeps_an_existing_card_and_pushes_adapters_the_same_way(tmp_path):
    base = save_model(tmp_path / "model", with_tokenizer=False)
    adapter_dir = tmp_path / "adapter"
    save_adapter(apply_lora(base, r=2), adapter_dir)
    api = RecordingApi()
    push_model(adapter_dir, "org/tiny-sfdlm-lora", api=api, base_model="org/tiny-sfdlm")
    operations = api.calls[-1][2]["operations"]
    assert [op.path_in_repo for op in operations] == ["README.md", "adapter_config.json",
                                                      "adapter_model.safetensors", "checksums.json",
                                                      "sfdlm_adapter.json"]
    assert api.calls[-1][2]["revision"] is None and [c[0] for c in api.calls] == ["create_repo", "create_commit"]
    card = (adapter_dir / "README.md").read_text()
    assert "library_name: peft" in card  # PEFT's placeholder card was replaced by ours
    push_model(adapter_dir, "org/tiny-sfdlm-lora", api=api)
    assert (adapter_dir / "README.md").read_text() == card  # a valid SFDLM card is kept as it is
    # The base is recorded as a Hub repo id so that the pushed adapter can find it.
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-sfdlm"


def test_an_adapter_whose_base_is_a_local_folder_needs_the_base_repo_id(tmp_path):
    base = save_model(tmp_path / "model", with_tokenizer=False)
    base.name_or_path = str(tmp_path / "model")
    adapter_dir = tmp_path / "adapter"
    save_adapter(apply_lora(base, r=2), adapter_dir)
    api = RecordingApi()
    with pytest.raises(ValueError, match="not a Hub repo id.*--base-model"):
        push_model(adapter_dir, "org/tiny-sfdlm-lora", api=api)
    assert api.calls == []


def test_without_a_stub_the_push_stops_at_the_network(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    save_model(folder, with_tokenizer=False)
    operations = push_model(folder, "org/tiny-sfdlm", dry_run=True)
    assert [op.path_in_repo for op in operations] == \
        sorted([op.path_in_repo for op in commit_operations(folder)] + ["README.md"])  # the card, in memory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineModeIsEnabled):
        push_model(folder, "org/tiny-sfdlm")


def test_push_cli_dry_run_lists_the_files(tmp_path, capsys):
    folder = tmp_path / "model"
    save_model(folder)
    assert cli_main(["push", "--model", str(folder), "--repo-id", "org/tiny-sfdlm", "--dry-run"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == sorted([p.name for p in folder.iterdir()] + ["README.md"])  # the card it would write
    assert not (folder / "README.md").exists()


@pytest.mark.parametrize("repo_id", ["org/na me", "a/b/c", "org/name--x", "org/.hidden", "", "org/name.git"])
def test_invalid_repo_ids_are_refused_before_anything_happens(tmp_path, repo_id):
    folder = tmp_path / "model"
    save_model(folder, with_tokenizer=False)
    api = RecordingApi()
    with pytest.raises(ValueError, match="Invalid Hub repo id"):
        push_model(folder, repo_id, api=api)
    assert api.calls == [] and not (folder / "README.md").exists()
    with pytest.raises(ValueError, match="Invalid Hub repo id"):
        load_pretrained(repo_id)


def test_bad_folders_and_revisions_are_refused(tmp_path):
    folder = tmp_path / "model"
    save_model(folder, with_tokenizer=False)
    api = RecordingApi()
    with pytest.raises(ValueError, match="revision"):
        push_model(folder, "org/x", revision="my branch", api=api)
    with pytest.raises(TypeError, match="create_pr"):
        push_model(folder, "org/x", create_pr="yes", api=api)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    for call in (lambda: push_model(empty, "org/x", api=api), lambda: load_pretrained(empty)):
        with pytest.raises(ValueError, match="has no config.json"):
            call()
    with pytest.raises(ValueError, match="does not exist"):
        push_model(tmp_path / "nowhere", "org/x", api=api)
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no auto_map"):
        push_model(folder, "org/x", api=api)
    assert api.calls == []


# ---------------------------------------------------------------------------------- push: verified, links refused
def folder_state(folder: Path) -> dict:
    """Every entry of a folder with its bytes and modification time: equal states mean nothing was written."""
    return {path.relative_to(folder).as_posix(): (path.read_bytes() if path.is_file() else None,
                                                  path.lstat().st_mtime_ns) for path in sorted(folder.rglob("*"))}


def test_a_dry_run_writes_nothing_and_lists_the_files_it_would_render(tmp_path, capsys):
    folder = tmp_path / "model"
    base = save_model(folder)
    base.name_or_path = str(folder)  # the adapter records a local base: push must rewrite its config
    adapter_dir = tmp_path / "adapter"
    save_adapter(apply_lora(base, r=2), adapter_dir)
    before, adapter_before = folder_state(folder), folder_state(adapter_dir)

    operations = push_model(folder, "org/tiny-sfdlm", dry_run=True)
    assert folder_state(folder) == before
    card = {op.path_in_repo: op for op in operations}["README.md"].path_or_fileobj
    assert isinstance(card, bytes)
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "README.md").write_bytes(card)
    validate_model_card(tmp_path / "card")  # the card a real push would write, rendered in memory

    operations = {op.path_in_repo: op.path_or_fileobj
                  for op in push_model(adapter_dir, "org/tiny-sfdlm-lora", dry_run=True, base_model="org/tiny-sfdlm")}
    assert folder_state(adapter_dir) == adapter_before
    assert json.loads(operations["adapter_config.json"])["base_model_name_or_path"] == "org/tiny-sfdlm"
    assert cli_main(["push", "--model", str(adapter_dir), "--repo-id", "org/tiny-sfdlm-lora", "--base-model",
                     "org/tiny-sfdlm", "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == sorted(operations)
    assert folder_state(adapter_dir) == adapter_before


def test_symbolic_links_are_refused_never_followed(tmp_path, capsys):
    folder = tmp_path / "model"
    save_model(folder, with_tokenizer=False)
    token = tmp_path / "token"
    token.write_text("hf_secret_token")
    (folder / "token").symlink_to(token)
    api = RecordingApi()
    with pytest.raises(ValueError, match=r"token \(a symbolic link to .*never follows links"):
        push_model(folder, "org/tiny-sfdlm", api=api)
    assert api.calls == [] and not (folder / "README.md").exists()
    assert cli_main(["push", "--model", str(folder), "--repo-id", "org/tiny-sfdlm", "--dry-run"]) == 2
    assert "symbolic link" in capsys.readouterr().err

    # Excluded explicitly, the link is left out and everything else is sent as it is.
    operations = push_model(folder, "org/tiny-sfdlm", dry_run=True, ignore_patterns=["token"])
    assert "token" not in [op.path_in_repo for op in operations]
    assert not any(op.path_or_fileobj == str(token) for op in operations)

    (folder / "token").unlink()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "token").write_text("hf_secret_token")
    (folder / "extra").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(ValueError, match=r"extra \(a link to"):
        push_model(folder, "org/tiny-sfdlm", dry_run=True)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-64])


def _halve(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _nan_embedding(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    (path.parent / "checksums.json").unlink()  # without a checksum, only the forward pass can tell
    tensors = load_file(path)
    name = next(key for key in tensors if "embed" in key)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, path, metadata={"format": "pt"})


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor's data: same size, valid header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, file, message", [
    (_truncate, "model.safetensors", "truncated"),
    (_halve, "tokenizer.json", "not valid JSON"),
    (_halve, "generation_config.json", "not valid JSON"),
    (_flip_a_byte, "model.safetensors", "SHA-256"),
    (_nan_embedding, "model.safetensors", "NaN or inf logits"),
])
def test_push_dry_run_refuses_a_folder_that_would_not_load(tmp_path, capsys, damage, file, message):
    folder = tmp_path / "model"
    save_model(folder)
    damage(folder / file)
    capsys.readouterr()
    assert cli_main(["push", "--model", str(folder), "--repo-id", "org/tiny-sfdlm", "--dry-run"]) == 2
    text = capsys.readouterr().err.splitlines()[-1]  # after transformers' progress bars, if it got that far
    assert text.startswith("sfdlm push: error:") and message in text
    assert message == "NaN or inf logits" or str(folder / file) in text  # the file is named


def test_a_card_carrying_a_local_absolute_path_is_not_pushed(tmp_path):
    folder = tmp_path / "model"
    save_model(folder, with_tokenizer=False)
    write_model_card(folder, repo_id="org/tiny-sfdlm", datasets=["ptb"])
    card = (folder / "README.md").read_text()
    data = tmp_path / "data" / "train.txt"
    assert "- ptb" in card
    (folder / "README.md").write_text(card.replace("- ptb", f"- {data}"))
    api = RecordingApi()
    with pytest.raises(ValueError, match=f"local absolute path.*{data}"):
        push_model(folder, "org/tiny-sfdlm", api=api)
    assert api.calls == []
    (folder / "README.md").unlink()  # the card push writes itself carries none
    operations = push_model(folder, "org/tiny-sfdlm", dry_run=True)
    card = next(op.path_or_fileobj for op in operations if op.path_in_repo == "README.md").decode()
    assert str(tmp_path) not in card and local_paths_in_card(card) == []


def test_local_paths_in_card_finds_paths_not_urls():
    text = ("---\ndatasets:\n- /tmp/x/train.txt\n- ptb\n---\n| data | `/tmp/y.txt` |\n"
            "See https://huggingface.co/org/x and 3/4 of tokens/s, or ~/notes.txt.\n")
    assert local_paths_in_card(text) == ["/tmp/x/train.txt", "/tmp/y.txt", "~/notes.txt"]


# ------------------------------------------------------------------------------------------ consent for code
def alter_code(folder: Path, marker: Path, model_type: str = "sfdlm") -> None:
    """Make the folder's configuration_sfdlm.py write `marker` when imported (and optionally rename its type)."""
    with open(folder / "configuration_sfdlm.py", "a", encoding="utf-8") as handle:
        handle.write(f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    if model_type != "sfdlm":
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = model_type
        (folder / "config.json").write_text(json.dumps(config))


def cli_refusal(capsys, argv: list[str]):
    """Run the command line, which reports an expected error in one line with exit status 2; raise it as a
    ValueError carrying that line."""
    capsys.readouterr()
    assert cli_main(argv) == 2
    raise ValueError(capsys.readouterr().err)


@pytest.mark.parametrize("model_type", ["sfdlm", "sfdlm_custom"])
def test_a_folder_with_altered_code_is_refused_and_its_code_never_runs(tmp_path, capsys, model_type):
    from hf_sfdlm.evaluation import load_model
    from hf_sfdlm.lm_eval_adapter import SFDLMEvalHarnessLM

    folder, marker = tmp_path / "model", tmp_path / "ran"
    save_model(folder)
    alter_code(folder, marker, model_type)
    loaders = {
        "load_pretrained": lambda: load_pretrained(folder),
        "evaluation.load_model": lambda: load_model(str(folder)),
        "lm-eval": lambda: SFDLMEvalHarnessLM(pretrained=str(folder)),
        "push": lambda: push_model(folder, "org/tiny-sfdlm", dry_run=True),
        "sfdlm generate": lambda: cli_refusal(capsys, ["generate", "--model", str(folder), "--max-new-tokens", "2"]),
        "sfdlm finetune": lambda: cli_refusal(capsys, ["finetune", "--model", str(folder), "--data", str(data),
                                                       "--output-dir", str(tmp_path / "out")]),
    }
    data = tmp_path / "data.txt"
    data.write_text("the small dog sees a ball .\n" * 20)
    for name, load in loaders.items():
        with pytest.raises(ValueError, match="trust_remote_code|expected 'sfdlm'"):
            load()
        assert not marker.exists(), name
    with pytest.raises(ValueError, match=r"configuration_sfdlm.py.*trust_remote_code=True"):
        load_pretrained(folder)


def test_an_adapter_whose_base_has_altered_code_is_refused(tmp_path):
    base_dir, adapter_dir, marker = tmp_path / "base", tmp_path / "adapter", tmp_path / "ran"
    base = save_model(base_dir, with_tokenizer=False)
    base.name_or_path = str(base_dir)
    save_adapter(apply_lora(base, r=2), adapter_dir)
    alter_code(base_dir, marker, "sfdlm_custom")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_pretrained(adapter_dir)
    assert not marker.exists()


def test_opting_in_loads_an_altered_folder(tmp_path, capsys):
    folder, marker = tmp_path / "model", tmp_path / "ran"
    model = save_model(folder).eval()
    alter_code(folder, marker)
    loaded = load_pretrained(folder, trust_remote_code=True).eval()
    ids, t = torch.tensor([[3, 4, 5, 6]]), torch.tensor([0.5])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, timesteps=t).logits, model(input_ids=ids, timesteps=t).logits)
    # transformers prefers the registered hf_sfdlm classes, so even with consent this folder's code did not run.
    assert type(loaded).__module__ == "hf_sfdlm.modeling_sfdlm" and not marker.exists()
    assert cli_main(["push", "--model", str(folder), "--repo-id", "org/tiny-sfdlm", "--dry-run",
                     "--trust-remote-code"]) == 0

    # A model type only the folder's code defines: with consent, transformers imports that code.
    custom = tmp_path / "custom"
    save_model(custom, with_tokenizer=False)
    alter_code(custom, marker, "sfdlm_custom")
    loaded = load_pretrained(custom, trust_remote_code=True)
    assert marker.exists() and type(loaded).__module__.startswith("transformers_modules.")


@pytest.mark.parametrize("command", [
    ["finetune", "--model", "m", "--data", "d.txt"], ["generate", "--model", "m"],
    ["infill", "--model", "m", "--text", "x"],
    ["eval", "m", "--text-file", "t.txt"], ["push", "--model", "m", "--repo-id", "org/x"],
])
def test_every_command_that_loads_a_model_takes_trust_remote_code_default_off(command):
    from hf_sfdlm.cli import build_parser

    parser = build_parser(command)
    assert parser.parse_args(command).trust_remote_code is False
    assert parser.parse_args(command + ["--trust-remote-code"]).trust_remote_code is True


# ------------------------------------------------------------------------------------------ pull
def populate_hub_cache(cache: Path, repo_id: str, folder: Path, branch: str = "main") -> str:
    """Lay `folder` out as huggingface_hub's cache does after a download: content-addressed blobs,
    a snapshot per commit of symlinks to them, and a ref naming the commit. Returns the commit hash."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(hashlib.sha256(p.read_bytes()).digest() for p in files)).hexdigest()
    for path in files:
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = repo / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return commit


PULL_SCRIPT = textwrap.dedent("""
    import site, sys
    sys.path.extend(site.getsitepackages())  # third-party packages, without .pth hooks such as editable installs
    try:
        import hf_sfdlm
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"hf_sfdlm is importable from {hf_sfdlm.__file__}")
    import json, os, torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    inputs = json.load(open("inputs.json"))
    ids, t = torch.tensor(inputs["ids"]), torch.tensor(inputs["t"])
    model = AutoModel.from_pretrained("org/tiny-sfdlm", trust_remote_code=True).eval()
    masked_lm = AutoModelForMaskedLM.from_pretrained("org/tiny-sfdlm", trust_remote_code=True, revision=inputs["commit"])
    config = AutoConfig.from_pretrained("org/tiny-sfdlm", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("org/tiny-sfdlm")
    adapted = PeftModel.from_pretrained(AutoModel.from_pretrained("org/tiny-sfdlm", trust_remote_code=True),
                                        "org/tiny-sfdlm-lora").eval()
    with torch.no_grad():
        out = {"class": type(model).__module__ + "." + type(model).__name__,
               "same_class": type(masked_lm) is type(model), "config_class": type(config).__name__,
               "mask_token": tokenizer.mask_token,
               "logits": model(input_ids=ids, timesteps=t).logits.tolist(),
               "adapted_logits": adapted(input_ids=ids, timesteps=t).logits.tolist()}
    json.dump(out, open("outputs.json", "w"))
""")


@pytest.mark.slow  # a fresh interpreter importing torch, transformers and peft: ~10-20 s on 2 busy cores
def test_pull_by_repo_id_from_a_hub_cache_in_a_process_without_hf_sfdlm(tmp_path):
    model_dir, adapter_dir, cache, work = (tmp_path / name for name in ("model", "adapter", "hub", "work"))
    model = save_model(model_dir)
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # open the adaLN gates so the adapter matters
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(model_dir)
    peft_model = apply_lora(model, r=2, target_modules="all-linear")
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    peft_model.peft_config["default"].base_model_name_or_path = "org/tiny-sfdlm"
    save_adapter(peft_model, adapter_dir)
    commit = populate_hub_cache(cache, "org/tiny-sfdlm", model_dir)
    populate_hub_cache(cache, "org/tiny-sfdlm-lora", adapter_dir)

    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    ids[ids == model.config.mask_token_id] = 5
    t = torch.tensor([0.3, 0.8])
    work.mkdir()
    (work / "inputs.json").write_text(json.dumps({"ids": ids.tolist(), "t": t.tolist(), "commit": commit}))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "PYTHON"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-I", "-S", "-c", PULL_SCRIPT], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((work / "outputs.json").read_text())

    assert out["class"].startswith("transformers_modules.") and out["class"].endswith(".SFDLMForDiffusionLM")
    assert out["same_class"] and out["config_class"] == "SFDLMConfig" and out["mask_token"] == "[MASK]"
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids, timesteps=t).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids, timesteps=t).logits
    assert not torch.allclose(adapted, plain, atol=1e-4)
    torch.testing.assert_close(torch.tensor(out["logits"]), plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(out["adapted_logits"]), adapted, rtol=0, atol=1e-5)

    # In-process, by repo id: the library helper resolves the adapter repo onto its base.
    loaded = load_pretrained("org/tiny-sfdlm-lora", cache_dir=cache).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, timesteps=t).logits, adapted, rtol=0, atol=1e-5)
