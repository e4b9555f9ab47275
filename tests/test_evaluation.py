"""Tests for `cpe_adapter.evaluation` and `cpe_adapter.report`: metric definitions on cases with known
answers, the pipeline state around `evaluate`, report files, sharding over two real processes, and the
optional real-model metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cpe_adapter
from cpe_adapter import ConceptSpec, CPEAdapter, CPEAdapterError
from cpe_adapter.evaluation import (
    KVProbe,
    erase_scores,
    evaluate,
    retain_drifts,
    shard,
)
from cpe_adapter.testing import tiny_pipeline

TEMPLATES = ["a painting by {}", "{} at the beach"]
FAST = {"templates": TEMPLATES, "progress": False, "attack_budget": 8, "embedding_steps": 2, "image_steps": 1}


def random_adapter(pipe, concept: str = "Van Gogh", seed: int = 0, zero_up: bool = False, **kwargs) -> CPEAdapter:
    """An untrained adapter with random gate and residual (or an all-zero ``up``: the identity)."""
    adapter = CPEAdapter.for_pipeline(pipe, concept, preset="styles", **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (adapter.gate_a, adapter.gate_b):
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        adapter.gate_v.copy_(torch.randn(adapter.gate_v.shape, generator=generator))
        adapter.down.copy_(torch.randn(adapter.down.shape, generator=generator) / adapter.down.shape[1] ** 0.5)
        adapter.up.copy_(
            torch.zeros_like(adapter.up) if zero_up else torch.randn(adapter.up.shape, generator=generator)
        )
    return adapter


@pytest.fixture(scope="module")
def sd():
    return tiny_pipeline("sd")


@pytest.fixture
def pipe(sd):
    yield sd
    cpe_adapter.unload_cpe_adapter(sd)


# ------------------------------------------------------------------------------- metric definitions
def test_erase_score_is_the_fraction_of_the_way_to_the_erase_target() -> None:
    generator = torch.Generator().manual_seed(0)
    original, neutral = torch.randn(2, 1, 5, 6, generator=generator)  # one prompt, 5 tokens, 6 columns
    weights = torch.rand(6, generator=generator) + 0.5
    eta = 0.5
    target = (1 + eta) * neutral - eta * original
    cases = {0.0: original, 1.0: target, 0.25: original + 0.25 * (target - original)}
    for expected, erased in cases.items():
        score = erase_scores(original, erased, neutral, eta, weights)
        assert score.item() == pytest.approx(expected, abs=1e-5)
    # a move orthogonal to the gap (under the weighted inner product) scores 0
    gap = target - original
    other = torch.randn(1, 5, 6, generator=generator)
    orthogonal = other - (weights * other * gap).sum() / (weights * gap * gap).sum() * gap
    assert erase_scores(original, original + orthogonal, neutral, eta, weights).item() == (pytest.approx(0.0, abs=1e-5))


def test_retain_drift_is_the_weighted_relative_change() -> None:
    original = torch.randn(2, 4, 6)
    weights = torch.rand(6) + 0.1
    assert retain_drifts(original, original.clone(), weights).tolist() == [0.0, 0.0]
    assert retain_drifts(original, 1.1 * original, weights) == pytest.approx(torch.full((2,), 0.1), abs=1e-6)
    # only the columns of a zero-weight layer change: no drift
    changed = original.clone()
    changed[..., :2] += 5.0
    assert retain_drifts(original, changed, torch.tensor([0.0, 0.0, 1, 1, 1, 1])).abs().max() < 1e-7


def test_image_shifts_and_overall_figures_aggregate_as_documented() -> None:
    from cpe_adapter.evaluation import _aggregate

    blank = np.zeros((2, 2, 3), dtype=np.float32)

    def image(kind, concept, shift, gap=None, unit=0):
        row = {"unit": unit, "kind": kind, "concept": concept, "prompt": f"{concept} {unit}", "shift": shift}
        row.update(before=blank, after=blank, **({} if gap is None else {"gap": gap, "neutral": blank}))
        return row

    records = [
        {"unit": 0, "kind": "erase", "concept": "A", "prompt": "a", "value": 0.2},
        {"unit": 1, "kind": "erase", "concept": "A", "prompt": "a2", "value": 0.4},
        {"unit": 2, "kind": "erase", "concept": "B", "prompt": "b", "value": 0.9},
        {"unit": 3, "kind": "retain", "concept": "C", "prompt": "c", "value": 0.01},
        image("image_erase", "A", shift=1.0, gap=2.0, unit=4),
        image("image_erase", "A", shift=3.0, gap=3.0, unit=5),
        image("image_erase", "B", shift=2.0, gap=5.0, unit=6),
        image("image_retain", "C", shift=0.5, unit=7),
    ]
    report = _aggregate(records, ["A", "B"], ["C"], {}, {}, 0.1)
    assert report.per_concept["A"]["erase_score"] == pytest.approx(0.3)
    assert report.figures["erase_score"] == pytest.approx((0.3 + 0.9) / 2)  # each concept counts once
    assert report.per_concept["A"]["image_erase_shift"] == pytest.approx((0.5 + 1.0) / 2)
    assert report.figures["image_erase_shift"] == pytest.approx(((0.5 + 1.0) / 2 + 0.4) / 2)
    assert report.figures["image_retain_shift"] == pytest.approx(0.5 / ((2.0 + 3.0 + 5.0) / 3))
    assert report.settings["image_mean_erase_gap"] == pytest.approx(10 / 3)
    assert [e.prompt for e in report.images["A"]] == ["A 4", "A 5"]
    assert "before" not in json.dumps(report.to_dict())  # images stay out of the JSON


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def identity_report(sd):
    """One full evaluation (attacks and images) of an identity adapter (all-zero ``up``)."""
    sd.load_cpe_adapter(random_adapter(sd, zero_up=True), "identity")
    try:
        return evaluate(sd, ["Van Gogh"], ["Picasso"], images=True, image_prompts=1, **FAST)
    finally:
        cpe_adapter.unload_cpe_adapter(sd)


def test_identity_adapter_changes_nothing(identity_report) -> None:
    report = identity_report.to_dict()
    assert report["erase_score"] == 0.0
    assert report["retain_drift"] == 0.0
    assert report["image_erase_shift"] == 0.0
    assert report["image_retain_shift"] == 0.0
    assert report["settings"]["image_mean_erase_gap"] > 0.0  # the shifts are 0 / (a real gap)
    assert report["attack_recovery"] == 0.0
    assert report["embedding_attack_recovery"] == 0.0
    assert report["embedding_attack_epsilon"] == 0.1
    assert len(report["warnings"]) == 1 and "barely moves 'Van Gogh'" in report["warnings"][0]
    assert "## Warnings" in identity_report.to_markdown(), "an attack recovery of 0 here proves nothing"


def test_erase_score_matches_a_direct_computation(pipe) -> None:
    """`evaluate` through the wrapped layers agrees with F.linear + the adapter's own residual."""
    adapter = random_adapter(pipe)
    pipe.load_cpe_adapter(adapter, "vg")
    report = evaluate(pipe, ["Van Gogh"], ["Picasso"], templates=["a painting by {}"], attack=False, progress=False)
    probe = KVProbe(pipe)
    embeds = probe.encode(["a painting by Van Gogh", "a painting by real photograph", "a painting by Picasso"])
    weights = [m.weight for m in probe.modules]
    biases = [m.bias for m in probe.modules]
    with torch.no_grad():
        original = torch.cat([F.linear(embeds, w, b) for w, b in zip(weights, biases, strict=True)], dim=-1)
        erased = original + adapter.residuals(embeds)[0]
    eta = adapter.config.concepts[0].eta
    expected_score = erase_scores(original[:1], erased[:1], original[1:2], eta, probe.column_weights).item()
    expected_drift = retain_drifts(original[2:], erased[2:], probe.column_weights).item()
    assert report["erase_score"] == pytest.approx(expected_score, rel=1e-4, abs=1e-6)
    assert report["retain_drift"] == pytest.approx(expected_drift, rel=1e-4)
    assert report["per_concept"]["Van Gogh"]["erase_score"] != 0.0
    assert bool(report["warnings"]) == (report["erase_score"] < 0.02)


def test_image_and_attack_figures_of_a_real_erasure_match_a_direct_computation(pipe) -> None:
    """A random (non-identity) adapter: every image shift and the prompt attack's recovery equal
    what plain pipeline calls and the adapter's own residual give, and none of them is zero."""
    adapter = random_adapter(pipe)
    pipe.load_cpe_adapter(adapter, "vg")
    options = {**FAST, "templates": ["a painting by {}"], "attack_budget": 16}
    report = evaluate(pipe, ["Van Gogh"], ["Picasso"], images=True, image_prompts=1, seed=5, **options)
    units = {record["kind"]: record for record in report.records}

    def image(prompt: str, unit: str, erased: bool) -> np.ndarray:
        generator = torch.Generator().manual_seed(5 + units[unit]["unit"])
        (pipe.enable_cpe_adapters if erased else pipe.disable_cpe_adapters)()
        try:
            out = pipe([prompt], num_inference_steps=1, generator=[generator], output_type="np").images
        finally:
            pipe.enable_cpe_adapters()
        return np.asarray(out, dtype=np.float32)[0]

    neutral = adapter.config.concepts[0].neutral
    before = image("a painting by Van Gogh", "image_erase", erased=False)
    gap = np.linalg.norm(before - image(f"a painting by {neutral}", "image_erase", erased=False))
    erase_shift = np.linalg.norm(image("a painting by Van Gogh", "image_erase", erased=True) - before) / gap
    kept = image("a painting by Picasso", "image_retain", erased=False)
    retain_shift = np.linalg.norm(image("a painting by Picasso", "image_retain", erased=True) - kept) / gap
    assert erase_shift > 0 and retain_shift > 0
    assert report["image_erase_shift"] == pytest.approx(erase_shift, rel=1e-5)
    assert report["image_retain_shift"] == pytest.approx(retain_shift, rel=1e-5)

    probe = KVProbe(pipe)
    best = report["attack_best_prompt"]
    embeds = probe.encode(["a painting by Van Gogh", best])
    with torch.no_grad():
        original = torch.cat([F.linear(embeds, m.weight, m.bias) for m in probe.modules], dim=-1)
        erased = original + adapter.residuals(embeds)[0]

    def distance(row: torch.Tensor) -> float:
        return float((probe.column_weights * (row - original[0]) ** 2).sum().sqrt())

    recovery = 1 - distance(erased[1]) / distance(erased[0])
    assert best != "a painting by Van Gogh" and recovery > 0
    assert report["attack_recovery"] == pytest.approx(recovery, rel=1e-4, abs=1e-6)


def test_figures_scale_with_the_adapter_scale(pipe) -> None:
    pipe.load_cpe_adapter(random_adapter(pipe), "vg")
    one = evaluate(pipe, ["Van Gogh"], ["Picasso"], attack=False, templates=TEMPLATES, progress=False)
    pipe.set_cpe_adapters("vg", scales=2.0)
    two = evaluate(pipe, ["Van Gogh"], ["Picasso"], attack=False, templates=TEMPLATES, progress=False)
    assert two.figures["erase_score"] == pytest.approx(2 * one.figures["erase_score"], rel=1e-4)
    assert two.figures["retain_drift"] == pytest.approx(2 * one.figures["retain_drift"], rel=1e-4)


def test_neutral_and_eta_come_from_the_loaded_config(pipe) -> None:
    spec = ConceptSpec("Van Gogh", neutral="a quiet meadow", eta=0.7)
    pipe.load_cpe_adapter(random_adapter(pipe, concept=spec), "vg")
    report = evaluate(pipe, ["Van Gogh"], [], attack=False, **{k: v for k, v in FAST.items() if k != "image_steps"})
    assert report.settings["neutrals"] == {"Van Gogh": "a quiet meadow"}
    assert report.settings["etas"] == {"Van Gogh": 0.7}
    assert {r["prompt"] for r in report.records} == {"a painting by Van Gogh", "Van Gogh at the beach"}


def test_default_templates_are_the_held_out_ones_of_the_adapter_domain(pipe) -> None:
    pipe.load_cpe_adapter(random_adapter(pipe), "vg")
    report = evaluate(pipe, ["Van Gogh"], [], attack=False, progress=False)
    held_out = cpe_adapter.pools.templates("styles", held_out=True)
    assert [r["prompt"] for r in report.records] == [t.format("Van Gogh") for t in held_out]


def test_paraphrases_are_scored_against_their_own_targets(pipe) -> None:
    pipe.load_cpe_adapter(random_adapter(pipe), "vg")
    report = evaluate(pipe, ["Van Gogh"], [], paraphrases={"Van Gogh": ["Gogh"]}, attack=False, **FAST)
    rows = [r for r in report.records if r["kind"] == "paraphrase"]
    assert [r["prompt"] for r in rows] == ["a painting by Gogh", "Gogh at the beach"]
    assert report.figures["paraphrase_erase_score"] == pytest.approx(np.mean([r["value"] for r in rows]))
    assert report.figures["paraphrase_erase_score"] != report.figures["erase_score"]


def test_pipeline_state_is_restored_even_after_an_error(pipe, monkeypatch) -> None:
    pipe.load_cpe_adapter(random_adapter(pipe), "vg")
    runtime = cpe_adapter.runtime.get_runtime(pipe.unet)
    evaluate(pipe, ["Van Gogh"], ["Picasso"], attack=False, **FAST)
    assert runtime.enabled and pipe.get_active_cpe_adapters() == ["vg"]

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(KVProbe, "generate", broken)
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(pipe, ["Van Gogh"], [], attack=False, images=True, **FAST)
    assert runtime.enabled

    pipe.disable_cpe_adapters()
    monkeypatch.undo()
    report = evaluate(pipe, ["Van Gogh"], ["Picasso"], attack=False, **FAST)
    assert not runtime.enabled  # evaluated as it is (disabled) and left disabled
    assert report.figures["erase_score"] == 0.0 and report.figures["retain_drift"] == 0.0


def test_bad_input_raises_clear_errors(pipe) -> None:
    pipe.load_cpe_adapter(random_adapter(pipe), "vg")
    with pytest.raises(CPEAdapterError, match="neutrals="):
        evaluate(pipe, ["Monet"], [], progress=False)
    with pytest.raises(CPEAdapterError, match="placeholder"):
        evaluate(pipe, ["Van Gogh"], [], templates=["no placeholder"], progress=False)
    with pytest.raises(CPEAdapterError, match="not in `erased`"):
        evaluate(pipe, ["Van Gogh"], [], paraphrases={"Monet": ["Claude Monet"]}, progress=False)
    with pytest.raises(CPEAdapterError, match="attack_budget"):
        evaluate(pipe, ["Van Gogh"], [], attack_budget=0, progress=False)
    report = evaluate(pipe, ["Monet"], [], neutrals={"Monet": "a photo"}, attack=False, **FAST)
    assert report.settings["neutrals"] == {"Monet": "a photo"}
    for retained in (["Van Gogh"], ["van gogh"]):
        with pytest.raises(CPEAdapterError, match="both erased and retained"):
            evaluate(pipe, ["Van Gogh"], retained, progress=False)
    with pytest.raises(CPEAdapterError, match="Nothing to evaluate"):
        evaluate(pipe, [], [], progress=False)
    with pytest.raises(CPEAdapterError, match="paraphrases"):
        evaluate(pipe, ["Van Gogh"], [], paraphrases={"Van Gogh": ["ok", ""]}, progress=False)
    for template in ("{} by {artist}", "{} :}", "{0} and {}"):
        with pytest.raises(CPEAdapterError, match="format string"):
            evaluate(pipe, ["Van Gogh"], [], templates=[template], progress=False)
    no_attack = evaluate(pipe, ["Van Gogh"], [], attack=False, **{**FAST, "attack_budget": 0})
    assert "attack_recovery" not in no_attack.figures, "a budget is only checked when there is an attack"


def test_a_paraphrase_given_as_one_string_is_one_paraphrase(pipe) -> None:
    pipe.load_cpe_adapter(random_adapter(pipe), "vg")
    report = evaluate(pipe, ["Van Gogh"], [], paraphrases={"Van Gogh": "Vincent"}, attack=False, **FAST)
    prompts = [r["prompt"] for r in report.records if r["kind"] == "paraphrase"]
    assert prompts == [t.format("Vincent") for t in TEMPLATES]


def test_evaluating_leaves_other_threads_erased(pipe) -> None:
    """The "before" figures switch erasure off for the evaluating thread only: a server thread sharing
    the pipeline keeps erasing meanwhile."""
    import threading

    pipe.load_cpe_adapter(random_adapter(pipe, seed=3), "vg")
    probe = KVProbe(pipe)
    embeds = probe.encode(["a painting by Van Gogh"])
    with torch.no_grad():
        erased, original = probe.project(embeds, original=False), probe.project(embeds, original=True)
    assert not torch.allclose(erased, original)
    seen = {}

    def server() -> None:
        with torch.no_grad():
            seen["out"] = probe.project(embeds.clone(), original=False)

    with probe.original(), torch.no_grad():
        here = probe.project(embeds.clone(), original=False)
        thread = threading.Thread(target=server)
        thread.start()
        thread.join()
    torch.testing.assert_close(here, original, rtol=0, atol=0)
    torch.testing.assert_close(seen["out"], erased, rtol=0, atol=0)
    assert cpe_adapter.runtime.get_runtime(pipe.unet).enabled


def test_evaluate_runs_under_inference_mode(pipe) -> None:
    pipe.load_cpe_adapter(random_adapter(pipe, seed=3), "vg")
    with torch.inference_mode():
        report = evaluate(pipe, ["Van Gogh"], [], **{**FAST, "attack_budget": 8, "embedding_steps": 3})
    reference = evaluate(pipe, ["Van Gogh"], [], **{**FAST, "attack_budget": 8, "embedding_steps": 3})
    assert report.figures["embedding_attack_recovery"] == pytest.approx(reference.figures["embedding_attack_recovery"])
    assert report.figures["embedding_attack_recovery"] > 0
    from cpe_adapter.attacks import embedding_attack

    with torch.inference_mode():  # embeddings made there are inference tensors
        probe = KVProbe(pipe)
        embeds = probe.encode(["a painting by Van Gogh"])
        assert embedding_attack(probe, "a painting by Van Gogh", embeds=embeds, steps=3).recovery > 0


def test_warnings_say_why_an_erasure_does_not_act(pipe) -> None:
    pipe.load_cpe_adapter(random_adapter(pipe, seed=3), "vg")
    pipe.load_cpe_adapter(random_adapter(pipe, concept="Monet", seed=4, zero_up=True), "monet")
    with cpe_adapter.use_cpe_adapters(pipe, ["monet"]):
        report = evaluate(pipe, ["Van Gogh"], [], attack=False, **FAST)
    assert report.adapters["active"] == ["monet"], "the thread's selection is what was evaluated"
    assert "no active adapter at a nonzero scale erases it" in report.warnings()[0]
    pipe.set_cpe_adapters(["vg", "monet"], scales=[0.0, 1.0])
    scaled = evaluate(pipe, ["Van Gogh"], [], attack=False, **FAST).warnings()
    assert "no active adapter at a nonzero scale erases it" in scaled[0], "an adapter at scale 0 does not act"
    pipe.disable_cpe_adapters()
    assert "disabled" in evaluate(pipe, ["Van Gogh"], [], attack=False, **FAST).warnings()[0]


def test_progress_bar_is_shown_only_when_asked(pipe, capsys) -> None:
    pipe.load_cpe_adapter(random_adapter(pipe), "vg")
    evaluate(pipe, ["Van Gogh"], [], templates=TEMPLATES, attack=False, progress=True)
    assert "cpe-adapter eval" in capsys.readouterr().err
    evaluate(pipe, ["Van Gogh"], [], templates=TEMPLATES, attack=False, progress=False)
    assert "cpe-adapter eval" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- report
def test_report_files_are_written_and_parse(identity_report, tmp_path) -> None:
    from PIL import Image

    report = identity_report
    paths = report.save(tmp_path / "out")
    data = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    for key in (
        "erase_score",
        "retain_drift",
        "attack_recovery",
        "attack_best_prompt",
        "embedding_attack_recovery",
        "image_erase_shift",
        "image_retain_shift",
    ):
        assert key in data, key
    assert data["per_concept"]["Van Gogh"]["role"] == "erased"
    assert data["per_concept"]["Picasso"]["retain_drift"] == pytest.approx(report.figures["retain_drift"])
    markdown = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| Van Gogh | erased |" in markdown and "|---|" in markdown
    assert set(paths) >= {"json", "markdown", "per_concept_plot", "images_van_gogh", "images_picasso"}
    for key in ("per_concept_plot", "images_van_gogh"):
        with Image.open(paths[key]) as image:
            assert image.format == "PNG" and min(image.size) > 100
            assert np.asarray(image.convert("L")).std() > 1.0  # something was drawn


def test_report_without_images_has_no_image_grid(pipe, tmp_path) -> None:
    pipe.load_cpe_adapter(random_adapter(pipe), "vg")
    (tmp_path / "images_old_concept.png").write_bytes(b"an earlier report's plot")
    paths = evaluate(pipe, ["Van Gogh"], [], attack=False, **FAST).save(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("images_")], "no plot of another report stays"
    (tmp_path / "per_concept.png").write_bytes(b"an earlier report's plot")
    import sys

    saved, sys.modules["matplotlib"] = sys.modules.get("matplotlib"), None  # no plots this time
    try:
        with pytest.raises(ImportError):
            evaluate(pipe, ["Van Gogh"], [], attack=False, **FAST).save(tmp_path)
    finally:
        sys.modules["matplotlib"] = saved
    assert not (tmp_path / "per_concept.png").exists(), "a report without plots leaves no older plot behind"
    assert "image_erase_shift" not in json.loads(paths["json"].read_text())


def test_recorded_figures_reach_the_saved_model_card(pipe, tmp_path) -> None:
    pipe.load_cpe_adapter(random_adapter(pipe), "vg")
    report = evaluate(pipe, ["Van Gogh"], ["a red car"], attack=False, **FAST)
    figures = report.card_figures()
    assert figures == {"erase_score": report.figures["erase_score"], "retain_drift": report.figures["retain_drift"]}
    pipe.save_cpe_adapter(tmp_path / "before", adapter_name="vg")
    assert "(not evaluated)" in (tmp_path / "before" / "README.md").read_text(encoding="utf-8")
    pipe.get_cpe_adapter("vg").config.evaluation = figures
    pipe.save_cpe_adapter(tmp_path / "after", adapter_name="vg")
    card = (tmp_path / "after" / "README.md").read_text(encoding="utf-8")
    assert f"| retain_drift | {figures['retain_drift']:.4g} |" in card and "(not evaluated)" not in card
    assert CPEAdapter.from_pretrained(tmp_path / "after").config.evaluation == figures


# --------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("count", [0, 1, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_every_item_exactly_once(count: int, world: int) -> None:
    items = [f"prompt {i}" for i in range(count)]
    taken = [pair for rank in range(world) for pair in shard(items, rank, world)]
    assert sorted(i for i, _ in taken) == list(range(count))
    assert all(items[i] == item for i, item in taken)
    with pytest.raises(CPEAdapterError):
        shard(items, world, world)


_SHARD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import cpe_adapter
    from cpe_adapter.evaluation import evaluate
    from cpe_adapter.testing import tiny_pipeline
    sys.path.insert(0, sys.argv[2])
    from test_evaluation import FAST, random_adapter

    pipe = tiny_pipeline("sd")
    pipe.load_cpe_adapter(random_adapter(pipe), "vg")
    report = evaluate(pipe, ["Van Gogh"], ["Picasso", "a red car"], **FAST)
    rank = torch.distributed.get_rank()
    with open(f"{sys.argv[1]}.{rank}", "w") as handle:
        json.dump(report.to_dict(), handle)
    torch.distributed.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_give_the_single_process_report(pipe, tmp_path) -> None:
    script = tmp_path / "shard_eval.py"
    script.write_text(_SHARD_SCRIPT, encoding="utf-8")
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(script), str(out), str(Path(__file__).parent),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    gathered = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    assert gathered[0] == gathered[1]  # every process returns the full report
    multi = gathered[0]
    units = [r["unit"] for r in multi["records"]]
    assert units == list(range(len(units)))  # every prompt exactly once
    assert {r["process"] for r in multi["records"]} == {0, 1}
    assert multi["settings"]["processes"] == 2

    pipe.load_cpe_adapter(random_adapter(pipe), "vg")
    single = evaluate(pipe, ["Van Gogh"], ["Picasso", "a red car"], **FAST).to_dict()
    for record in multi["records"] + single["records"]:
        record.pop("process")
    multi["settings"].pop("processes"), single["settings"].pop("processes")
    multi, single = _flat(multi), _flat(single)
    assert multi.keys() == single.keys()
    numbers = [k for k, v in single.items() if isinstance(v, float)]
    assert [multi[k] for k in numbers] == pytest.approx([single[k] for k in numbers], rel=1e-4, abs=1e-6)
    assert {k: v for k, v in multi.items() if k not in numbers} == {k: v for k, v in single.items() if k not in numbers}


def _flat(data, prefix: str = "") -> dict:
    """Nested dict/list -> {path: leaf}, so pytest.approx can compare every number."""
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}/{key}").items()}
    if isinstance(data, list):
        return {k: v for i, value in enumerate(data) for k, v in _flat(value, f"{prefix}/{i}").items()}
    return {prefix: data}


# ------------------------------------------------------------------------------ real-model metrics
def test_missing_optional_package_names_the_extra(monkeypatch) -> None:
    from cpe_adapter import metrics_real
    from cpe_adapter.report import MissingExtraError

    monkeypatch.setitem(sys.modules, "nudenet", None)  # import nudenet -> ImportError
    with pytest.raises(MissingExtraError, match=r"cpe-adapter\[eval\]"):
        metrics_real.nudenet_detections(np.zeros((1, 8, 8, 3), dtype=np.float32))


def test_nudenet_counts_exposed_classes_above_threshold() -> None:
    from cpe_adapter.metrics_real import nudenet_detections

    class FakeDetector:
        def __init__(self) -> None:
            self.seen = []

        def detect(self, image):
            self.seen.append(image)
            return [
                {"class": "FEMALE_BREAST_EXPOSED", "score": 0.9},
                {"class": "FEMALE_BREAST_EXPOSED", "score": 0.5},  # below threshold
                {"class": "FACE_FEMALE", "score": 0.99},  # not an exposed class
                {"class": "BELLY_EXPOSED", "score": 0.6},
            ]

    detector = FakeDetector()
    image = np.zeros((4, 4, 3), dtype=np.float32)
    image[..., 0] = 1.0  # pure red in RGB
    counts = nudenet_detections([image, image], detector=detector)
    assert counts.total == 4 and counts.images_flagged == 2 and counts.images == 2
    assert counts.per_class["FEMALE_BREAST_EXPOSED"] == 2 and counts.per_class["BELLY_EXPOSED"] == 2
    assert detector.seen[0].dtype == np.uint8 and detector.seen[0][0, 0].tolist() == [0, 0, 255]  # BGR


def test_clip_score_with_a_local_model_is_the_scaled_cosine() -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from cpe_adapter.metrics_real import clip_score
    from cpe_adapter.testing import tiny_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "eos_token_id": tokenizer.eos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)  # fmt: skip
    images = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    prompts = ["a red car", "a painting of a cat"]
    score = clip_score(images, prompts, model=model, processor=processor)
    with torch.no_grad():
        inputs = processor(text=prompts, images=list((images * 255).round().astype(np.uint8)), return_tensors="pt",
                           padding=True)  # fmt: skip
        out = model(**inputs)
        expected = (100 * F.cosine_similarity(out.image_embeds, out.text_embeds).clamp_min(0)).mean().item()
    assert score == pytest.approx(expected, rel=1e-4)
    assert 0.0 <= score <= 100.0
    with pytest.raises(CPEAdapterError, match="one prompt per image"):
        clip_score(images, prompts[:1], model=model, processor=processor)


def test_images_blacked_out_by_a_safety_checker_are_reported() -> None:
    """On a real SD pipeline the safety checker may replace unerased explicit images with black ones;
    the report then says its image shifts compare blank images."""

    class Features:
        pixel_values = torch.zeros(1, 3, 8, 8)

        def to(self, *args, **kwargs):
            return self

    class FlagEverything(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        @property
        def device(self) -> torch.device:  # a pipeline reads its modules' devices, as diffusers models have
            return self.weight.device

        def forward(self, images, clip_input):
            return torch.zeros_like(images), [True] * len(images)

    pipe = tiny_pipeline("sd")
    pipe.load_cpe_adapter(random_adapter(pipe), "vg")
    pipe.safety_checker, pipe.feature_extractor = FlagEverything(), lambda *args, **kwargs: Features()
    report = evaluate(pipe, ["Van Gogh"], [], attack=False, images=True, **{**FAST, "image_prompts": 1})
    assert sum(r["filtered"] for r in report.records if r["kind"] == "image_erase") == 3
    assert any("safety checker blacked out 3" in w for w in report.warnings())
    pipe.safety_checker = None
    clean = evaluate(pipe, ["Van Gogh"], [], attack=False, images=True, **{**FAST, "image_prompts": 1})
    assert not any("safety checker" in w for w in clean.warnings())
