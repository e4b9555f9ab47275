"""Stage checkpoints (`cpe_adapter.checkpoints`): resuming equals an uninterrupted run, and a checkpoint
that is another run's, another version's, incomplete or corrupt is refused."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from conftest import SHORT_TRAINING, adapter_weights
from cpe_adapter import CPEAdapterError
from cpe_adapter.testing import tiny_pipeline
from cpe_adapter.training import train_cpe

SMALL = SHORT_TRAINING


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd")


class _Stop(Exception):
    pass


@pytest.mark.parametrize("searches", [{}, {"prompt_searches": 1, "prompt_search_budget": 16}])
def test_resume_from_a_stage_checkpoint_equals_an_uninterrupted_run(pipe, tmp_path, searches):
    """Also with discrete adversaries, whose found prompts are part of the checkpointed state."""
    SMALL = {**globals()["SMALL"], **searches}
    concepts = ["Van Gogh", "Monet"]
    uninterrupted = adapter_weights(train_cpe(pipe, concepts, preset="styles", seed=3, **SMALL))

    def stop_after_second_concepts_first_stage(stage, step, logs):
        if logs["phase"] == "stage_end" and logs["concept_index"] == 1 and stage == 0:
            raise _Stop

    with pytest.raises(_Stop):
        train_cpe(
            pipe,
            concepts,
            preset="styles",
            seed=3,
            checkpoint_dir=tmp_path,
            callback=stop_after_second_concepts_first_stage,
            **SMALL,
        )
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["concepts"]["0"]["done"] is True
    assert state["concepts"]["1"] == {**state["concepts"]["1"], "next_stage": 1, "done": False}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        state["concepts"]["0"]["file"],
        "concept_0001_stage_001.safetensors",
        "trainer_state.json",
    ], "one tensor file per concept: the previous stage's is removed once the JSON names the new one"
    ran: set[tuple[int, int]] = set()

    def record(stage, step, logs):
        ran.add((logs["concept_index"], stage))

    resumed = train_cpe(pipe, concepts, preset="styles", seed=3, resume_from=tmp_path, callback=record, **SMALL)
    assert ran == {(1, 1), (1, 2)}, "only the second concept's remaining stages run again"
    weights = adapter_weights(resumed)
    assert all(torch.equal(uninterrupted[k], weights[k]) for k in uninterrupted)
    assert len(resumed.config.training["history"]["Monet"]) == 3
    with pytest.raises(CPEAdapterError, match="another training run"):
        train_cpe(pipe, concepts, preset="styles", seed=4, resume_from=tmp_path, **SMALL)
    # A finished run resumes to the same adapter at once; a lost tensor file is reported clearly.
    again = adapter_weights(train_cpe(pipe, concepts, preset="styles", seed=3, resume_from=tmp_path, **SMALL))
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    (tmp_path / json.loads((tmp_path / "trainer_state.json").read_text())["concepts"]["1"]["file"]).unlink()
    with pytest.raises(CPEAdapterError, match="incomplete"):
        train_cpe(pipe, concepts, preset="styles", seed=3, resume_from=tmp_path, **SMALL)


def test_resume_on_another_pipeline_of_the_same_name_is_refused(pipe, tmp_path):
    train_cpe(pipe, "Van Gogh", preset="styles", seed=3, checkpoint_dir=tmp_path, **SMALL)
    with pytest.raises(CPEAdapterError, match="already holds the checkpoint"):
        train_cpe(pipe, "Van Gogh", preset="styles", seed=3, checkpoint_dir=tmp_path, **SMALL)
    other = tiny_pipeline("sd", seed=1)  # same kind and name, other weights
    with pytest.raises(CPEAdapterError, match="pipeline"):
        train_cpe(other, "Van Gogh", preset="styles", seed=3, resume_from=tmp_path, **SMALL)
    retuned = tiny_pipeline("sd")  # the same UNet, a fine-tuned text encoder
    with torch.no_grad():
        list(retuned.text_encoder.parameters())[-1].add_(1e-3)
    with pytest.raises(CPEAdapterError, match="pipeline"):
        train_cpe(retuned, "Van Gogh", preset="styles", seed=3, resume_from=tmp_path, **SMALL)


def test_a_crash_between_the_two_checkpoint_writes_resumes_exactly(pipe, tmp_path, monkeypatch):
    from cpe_adapter import checkpoints

    uninterrupted = adapter_weights(train_cpe(pipe, "Van Gogh", preset="styles", seed=3, **SMALL))
    write = checkpoints.atomic_write_bytes
    states = itertools.count()

    def dies_at_the_second_state(path, data):
        if path.name == "trainer_state.json" and next(states) == 1:
            raise KeyboardInterrupt  # the stage-2 tensors are on disk, the JSON still says stage 1
        write(path, data)

    monkeypatch.setattr(checkpoints, "atomic_write_bytes", dies_at_the_second_state)
    with pytest.raises(KeyboardInterrupt):
        train_cpe(pipe, "Van Gogh", preset="styles", seed=3, checkpoint_dir=tmp_path, **SMALL)
    monkeypatch.undo()
    resumed = adapter_weights(train_cpe(pipe, "Van Gogh", preset="styles", seed=3, resume_from=tmp_path, **SMALL))
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_corrupt_checkpoint_contents_are_refused(pipe, tmp_path):
    from safetensors.torch import load_file, save_file

    train_cpe(pipe, "Van Gogh", preset="styles", seed=3, checkpoint_dir=tmp_path, **SMALL)
    state_path = tmp_path / "trainer_state.json"
    state = json.loads(state_path.read_text())
    tensors_path = tmp_path / state["concepts"]["0"]["file"]
    tensors = load_file(tensors_path)
    save_file({**tensors, "up": torch.full_like(tensors["up"], float("nan"))}, tensors_path)
    with pytest.raises(CPEAdapterError, match="non-finite"):
        train_cpe(pipe, "Van Gogh", preset="styles", seed=3, resume_from=tmp_path, **SMALL)
    save_file(tensors, tensors_path)  # good tensors again: only the stage is wrong now
    state["concepts"]["0"]["next_stage"] = 99
    state_path.write_text(json.dumps(state))
    with pytest.raises(CPEAdapterError, match=r"is corrupt \(concept 0"):
        train_cpe(pipe, "Van Gogh", preset="styles", seed=3, resume_from=tmp_path, **SMALL)


def test_a_checkpoint_of_another_format_version_says_so(pipe, tmp_path):
    train_cpe(pipe, "Van Gogh", preset="styles", seed=3, checkpoint_dir=tmp_path, **SMALL)
    state_path = tmp_path / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["version"] = 1
    state_path.write_text(json.dumps(state))
    with pytest.raises(CPEAdapterError, match="another version of cpe-adapter"):
        train_cpe(pipe, "Van Gogh", preset="styles", seed=3, resume_from=tmp_path, **SMALL)


def test_resuming_into_a_folder_holding_another_run_is_refused(pipe, tmp_path):
    first, other = tmp_path / "first", tmp_path / "other"
    train_cpe(pipe, "Van Gogh", preset="styles", seed=3, checkpoint_dir=first, **SMALL)
    train_cpe(pipe, "Monet", preset="styles", seed=3, checkpoint_dir=other, **SMALL)
    before = (other / "trainer_state.json").read_bytes()
    with pytest.raises(CPEAdapterError, match="another run"):
        train_cpe(pipe, "Van Gogh", preset="styles", seed=3, resume_from=first, checkpoint_dir=other, **SMALL)
    assert (other / "trainer_state.json").read_bytes() == before
    copy = tmp_path / "copy"
    resumed = train_cpe(pipe, "Van Gogh", preset="styles", seed=3, resume_from=first, checkpoint_dir=copy, **SMALL)
    state = json.loads((copy / "trainer_state.json").read_text())
    assert (copy / state["concepts"]["0"]["file"]).is_file()
    assert resumed.config.concept_names == ["Van Gogh"]
