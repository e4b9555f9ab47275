"""The offline examples (`examples/`) run as documented and leave what they promise.

Each script runs in this process (``runpy``, as ``__main__``) with short schedules on the built-in
tiny pipelines, in a temporary working folder; the Hub example and the LoRA example need a Hub or
a LoRA and are left out.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from PIL import Image

from cpe_adapter import CPEAdapter

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_erase_style_then_evaluate_and_red_team(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_example("erase_style.py", "--base", "tiny:sd", "--steps", "20", monkeypatch=monkeypatch)
    saved = tmp_path / "outputs" / "erase-style"
    adapter = CPEAdapter.from_pretrained(saved)
    assert adapter.config.concept_names == ["Van Gogh"] and adapter.config.preset == "styles"
    with Image.open(saved / "compare.png") as grid:
        assert grid.width > grid.height > 0  # original and erased side by side

    run_example("evaluate_and_red_team.py", "--base", "tiny:sd", "--adapter", str(saved), monkeypatch=monkeypatch)
    report = json.loads((tmp_path / "outputs" / "eval" / "report.json").read_text())
    assert report["erase_score"] > 0
    assert {"retain_drift", "attack_recovery", "embedding_attack_recovery", "image_erase_shift"} <= set(report)
    assert set(report["per_concept"]) == {"Van Gogh", "Claude Monet", "Rembrandt", "a red car"}


def test_erase_many_names_stacks_the_names_in_one_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_example("erase_many_names.py", "--base", "tiny:sd", "--count", "2", "--steps", "10", monkeypatch=monkeypatch)
    adapter = CPEAdapter.from_pretrained(tmp_path / "outputs" / "erase-names")
    assert adapter.num_concepts == 2 and adapter.config.preset == "names"
