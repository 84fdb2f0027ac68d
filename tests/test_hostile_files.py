"""Files and the Hub: a checkpoint whose marker and training state disagree is refused (and resume falls back
to the previous good checkpoint), the card's absolute-path check sees through markup and `file://` URLs, and
`push` uploads only known model/tokenizer/card files unless told otherwise, never secrets, hard links to
files elsewhere, code or huge stray files without an explicit pattern."""

import json
import os
import shutil
from pathlib import Path

import pytest
from test_hub import RecordingApi, save_model
from test_training import _fresh_accelerator_state, _manager_with_checkpoints, make_config, one_thread  # noqa: F401

from hf_sfdlm.cli import main
from hf_sfdlm.hub import check_upload_files, local_paths_in_card, push_model
from hf_sfdlm.pipelines import run_training


# ------------------------------------------------------------------------------------------ checkpoints
def test_a_marker_whose_step_disagrees_with_the_training_state_is_refused_and_resume_falls_back(
        tmp_path, one_thread, caplog):  # noqa: F811
    manager, trainer = _manager_with_checkpoints(tmp_path, steps=(5, 10))
    root = tmp_path / "checkpoints"
    forged = root / "step-1000"
    shutil.copytree(root / "step-5", forged)  # the state of step 5 ...
    marker = json.loads((forged / "complete.json").read_text())
    marker["step"] = 1000  # ... under a marker that says 1000: every file still matches its size and SHA-256
    (forged / "complete.json").write_text(json.dumps(marker))
    assert manager.verify(forged).step == 1000  # the files alone cannot tell
    shutil.copytree(root / "step-5", root / "step-15")  # the same under the step the resumed run saves next
    marker["step"] = 15
    (root / "step-15" / "complete.json").write_text(json.dumps(marker))

    with caplog.at_level("WARNING"):
        loaded = manager.load_latest(trainer._read_state)
    assert loaded.step == 10 and trainer.state.step == 10  # the previous good checkpoint
    assert "step-1000 is corrupt: its complete.json says step 1000 but its training state is at step 5" in caplog.text

    (root.parent / "checkpoints" / "finished.json").unlink()
    result, trainer = run_training(make_config(tmp_path, max_steps=15, checkpoint_every=5, eval_every=0,
                                               keep_checkpoints=5), resume=True)
    assert result.step == 15
    assert not forged.exists()  # pruned like any other unusable checkpoint, so it never shadows newer ones
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-10", "step-15", "step-5"]
    # step-15 is the new, good checkpoint written over the forged one (not pruned for the old one's fault)
    assert manager.load_latest(trainer._read_state).step == 15 and trainer.state.step == 15


# ------------------------------------------------------------------------------------------ card paths
def test_the_card_path_check_sees_through_markup_and_file_urls(tmp_path):
    home = str(tmp_path / "user" / "data.txt")  # an absolute path whose top folder exists on this machine
    bypasses = [f"file://{home}", f"file://localhost{home}", f"<code>{home}</code>", f"*{home}*", f"**{home}**",
                f"_{home}_", f"[data]({home})", f'<a href="file://{home}">x</a>', f"~~{home}~~", f"{{{home}}}"]
    for text in bypasses:
        found = local_paths_in_card(f"Trained on {text} for a while.")
        assert found and any(home in path for path in found), text
    assert local_paths_in_card("file:///C:/Users/me/data.txt") == ["C:/Users/me/data.txt"]
    for harmless in ["https://huggingface.co/org/x/tmp/y", "3/4 of tokens/s", "../data/x.txt", "a/tmp/b",
                     "nats/token", "data/train.txt"]:
        assert local_paths_in_card(harmless) == [], harmless


def test_push_refuses_a_card_carrying_a_file_url(tmp_path):
    folder = tmp_path / "model"
    save_model(folder, with_tokenizer=False)
    (folder / "README.md").write_text(f"---\nlicense: apache-2.0\n---\nData: <code>file://{tmp_path}/x.txt</code>\n")
    with pytest.raises(ValueError, match="local absolute path"):
        push_model(folder, "org/tiny", dry_run=True, write_card=False)


# ------------------------------------------------------------------------------------------ push: unknown files
@pytest.fixture
def stray_folder(tmp_path):
    folder = tmp_path / "model"
    save_model(folder)
    return folder


def pushed(folder, **kwargs) -> list[str]:
    return [op.path_in_repo for op in push_model(folder, "org/tiny", dry_run=True, **kwargs)]


def test_push_lists_unknown_files_and_needs_an_explicit_allow(stray_folder, capsys):
    baseline = pushed(stray_folder)
    (stray_folder / "notes.txt").write_text("my notes")
    (stray_folder / "eval").mkdir()
    (stray_folder / "eval" / "samples.json").write_text("{}")
    with pytest.raises(ValueError, match=r"not known model, tokenizer or card files: eval/samples.json, notes.txt"):
        pushed(stray_folder)
    assert sorted(pushed(stray_folder, include_patterns=["notes.txt"], ignore_patterns=["eval/*"])) == \
        sorted(baseline + ["notes.txt"])
    assert set(pushed(stray_folder, allow_unknown_files=True)) == set(baseline) | {"notes.txt", "eval/samples.json"}
    # the same through the CLI: one line, exit 2; then --include / --exclude / --allow-unknown-files
    argv = ["push", "--model", str(stray_folder), "--repo-id", "org/tiny", "--dry-run"]
    capsys.readouterr()
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "notes.txt" in error[0] and "--allow-unknown-files" in error[0]
    assert main([*argv, "--include", "notes.txt", "--exclude", "eval/*"]) == 0
    assert "notes.txt" in capsys.readouterr().out.split()
    assert main([*argv, "--allow-unknown-files"]) == 0


def test_push_never_uploads_private_keys(stray_folder):
    (stray_folder / "private").mkdir()
    (stray_folder / "private" / "id_rsa").write_text("not even a key")
    (stray_folder / "deploy.txt").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n")  # found by content
    for kwargs in ({}, {"allow_unknown_files": True}, {"include_patterns": ["*"]}):
        with pytest.raises(ValueError, match=r"private key or credential file\(s\) \['deploy.txt', 'private/id_rsa'\]"):
            pushed(stray_folder, **kwargs)


def test_push_needs_a_pattern_for_custom_generate_code_and_huge_files(stray_folder):
    (stray_folder / "custom_generate").mkdir()
    (stray_folder / "custom_generate" / "generate.py").write_text("import os\n")
    with pytest.raises(ValueError, match=r"code or pickle file\(s\) \['custom_generate/generate.py'\]"):
        pushed(stray_folder, allow_unknown_files=True)  # the blanket allow is not enough for code
    assert "custom_generate/generate.py" in pushed(stray_folder, include_patterns=["custom_generate/*"])
    shutil.rmtree(stray_folder / "custom_generate")

    with open(stray_folder / "stray.dat", "wb") as handle:  # 3 GiB, sparse: costs no disk
        handle.truncate(3 * 2**30)
    with pytest.raises(ValueError, match=r"large file\(s\) that are not a model's files: stray.dat \(3,072 MiB\)"):
        pushed(stray_folder, allow_unknown_files=True)
    assert "stray.dat" in pushed(stray_folder, include_patterns=["stray.dat"])


def test_push_refuses_hard_links_to_files_outside_the_folder(stray_folder, tmp_path):
    secret = tmp_path / "elsewhere.txt"
    secret.write_text("outside the folder")
    os.link(secret, stray_folder / "notes.txt")
    with pytest.raises(ValueError, match=r"hard link\(s\) \['notes.txt'\] to files outside the folder"):
        pushed(stray_folder, allow_unknown_files=True)
    # two names of one file, both inside the folder, are no leak
    (stray_folder / "notes.txt").unlink()
    (stray_folder / "a.txt").write_text("inside")
    os.link(stray_folder / "a.txt", stray_folder / "b.txt")
    check_upload_files(stray_folder, ["a.txt", "b.txt"], allow_unknown_files=True)


def test_a_finetune_style_folder_pushes_without_any_flag(stray_folder):
    """What the library itself writes is known: nothing to allow for a plain save or a training run."""
    (stray_folder / "train_report.json").write_text("{}")
    (stray_folder / "checkpoints").mkdir()
    (stray_folder / "checkpoints" / "junk.bin").write_bytes(b"x")  # training leftovers stay ignored
    api = RecordingApi()
    push_model(stray_folder, "org/tiny", api=api)
    sent = [op.path_in_repo for op in api.calls[-1][2]["operations"]]
    assert "train_report.json" in sent and not any(name.startswith("checkpoints/") for name in sent)
    assert all(Path(name).suffix != ".py" or (Path(__file__).parents[1] / "hf_sfdlm" / name).is_file()
               for name in sent)
