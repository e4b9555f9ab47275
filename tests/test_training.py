"""Training erasers (`cpe_adapter.training`): learning, adversary, determinism, routing, errors.

The loss math has its own tests (test_losses.py), and so do stage checkpoints (test_checkpoints.py).

Everything runs on the tiny random-weight SD pipeline with few templates/anchors and small `steps`;
learning rates and the anchor weight are raised so that a few hundred steps show clear effects.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import cpe_adapter
from conftest import FAST_TRAINING, SHORT_TRAINING, adapter_weights, kv_projections
from cpe_adapter import CPEAdapterError
from cpe_adapter.config import ConceptSpec
from cpe_adapter.gate import gate_values
from cpe_adapter.losses import build_stack
from cpe_adapter.presets import get_preset
from cpe_adapter.targets import find_target_layers
from cpe_adapter.testing import tiny_pipeline
from cpe_adapter.training import train_cpe
from cpe_adapter.training_data import anchor_prompts, encode_prompts, fill_rotating
from cpe_adapter.training_plan import concept_seed, stage_schedule

TEMPLATES = FAST_TRAINING["templates"]
ANCHORS = FAST_TRAINING["anchors"]
FAST = FAST_TRAINING


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd")


@pytest.fixture(scope="module")
def trained(pipe):
    """One run of 240 erase steps, with every callback call recorded."""
    calls = []
    adapter = train_cpe(
        pipe, "Van Gogh", preset="styles", steps=240, seed=0, callback=lambda *a: calls.append(a), **FAST
    )
    return adapter, calls


def _weighted_norm(x: torch.Tensor, column_weight: torch.Tensor) -> torch.Tensor:
    return (x.pow(2) * column_weight).sum().sqrt()


# ------------------------------------------------------------------------------- encoding
def test_encoding_equals_what_generation_uses():
    sdxl = tiny_pipeline("sdxl")
    prompts = ["a photo of a cat", "", "a painting by Monet"]
    with torch.no_grad():
        expected = sdxl.encode_prompt(
            prompt=prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )[0]
    got = encode_prompts(sdxl, prompts)
    assert got.shape == expected.shape == (3, 77, 64)
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------------- schedule
def test_anchor_templates_rotate_so_the_anchors_cover_every_template():
    templates = [f"t{i} {{}}" for i in range(7)]
    concepts = ["a", "b", "c", "d", "e"]
    prompts = fill_rotating(templates, concepts, 3)
    assert len(prompts) == 15
    for k, concept in enumerate(concepts):
        mine = prompts[3 * k : 3 * k + 3]
        assert all(p.endswith(f" {concept}") for p in mine)
        assert len(set(p.split()[0] for p in mine)) == 3  # three different templates each
    assert {p.split()[0] for p in prompts} == {f"t{i}" for i in range(7)}  # together: all of them
    assert fill_rotating(templates, concepts, None) == [t.replace("{}", c) for c in concepts for t in templates]
    assert fill_rotating(templates, concepts, 50) == fill_rotating(templates, concepts, None)


@pytest.mark.parametrize(("target", "domain"), [("Cubism", "styles"), ("impressionism", "styles")])
def test_no_anchor_contains_the_target(pipe, target, domain):
    """Not even a general word of the domain ("cubism" when "Cubism" is erased) or an everyday
    sentence: anchoring the target would hold in place what the erase loss moves."""
    from cpe_adapter import pools

    shared, specific = anchor_prompts(
        pipe, target, domain, pools.templates(domain), anchors=None, similar=5, per_concept=2
    )
    assert shared or specific
    assert not [p for p in shared + specific if target.lower() in p.lower()]
    assert any(target.lower() in word.lower() for word in pools.general_words(domain)), "such general words exist"


def test_concepts_and_device_of_the_wrong_kind_are_refused(pipe):
    with pytest.raises(CPEAdapterError, match="must be a string"):
        train_cpe(pipe, 5, preset="styles", steps=2)
    with pytest.raises(CPEAdapterError, match="unknown device"):
        train_cpe(pipe, "Van Gogh", preset="styles", steps=2, device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(CPEAdapterError, match="no cuda device"):
            train_cpe(pipe, "Van Gogh", preset="styles", steps=2, device="cuda")


def test_steps_scale_the_stage_schedule():
    styles = get_preset("styles")
    assert stage_schedule(styles, None) == ((1800,) + (450,) * 9, 450)
    erase, attack = stage_schedule(styles, 585)
    assert sum(erase) == 585 and len(erase) == 10
    assert erase[0] == 180 and set(erase[1:]) <= {45} and attack == 45
    erase, attack = stage_schedule(styles, 3)
    assert erase == (1, 1, 1) and attack == 1
    with pytest.raises(CPEAdapterError, match="steps"):
        stage_schedule(styles, 0)


# ------------------------------------------------------------------------------- learning
def test_training_moves_the_target_and_keeps_other_concepts(pipe, trained):
    adapter, _ = trained
    stack = build_stack(pipe.unet, find_target_layers(pipe.unet), 77, "cpu")
    targets = encode_prompts(pipe, [t.format("Van Gogh") for t in TEMPLATES])
    neutrals = encode_prompts(pipe, [t.format("real photograph") for t in TEMPLATES])
    others = encode_prompts(pipe, [t.format(c) for c in ("a dog", "a house", "Picasso") for t in TEMPLATES])
    before_t, before_n, before_o = (
        kv_projections(pipe, targets),
        kv_projections(pipe, neutrals),
        kv_projections(pipe, others),
    )
    name = pipe.load_cpe_adapter(adapter)
    try:
        after_t, after_o = kv_projections(pipe, targets), kv_projections(pipe, others)
    finally:
        pipe.unload_cpe_adapter(name)
    goal = 1.5 * before_n - 0.5 * before_t
    closed = 1 - _weighted_norm(after_t - goal, stack.column_weight) / _weighted_norm(
        before_t - goal, stack.column_weight
    )
    drift = _weighted_norm(after_o - before_o, stack.column_weight) / _weighted_norm(before_o, stack.column_weight)
    moved = _weighted_norm(after_t - before_t, stack.column_weight) / _weighted_norm(before_t, stack.column_weight)
    assert closed > 0.3, f"only {float(closed):.3f} of the erase gap closed"
    assert drift < 0.035, f"other concepts drifted by {float(drift):.4f}"
    assert moved > 8 * drift
    final = adapter.config.training["final_loss"]["Van Gogh"]
    assert final["erase"] < 0.7 * final["erase_initial"]


def test_adversary_raises_the_loss_and_the_next_stage_lowers_it(trained):
    history = trained[0].config.training["history"]["Van Gogh"]
    assert len(history) == 4 and "attack_start" not in history[-1]
    for record in history[:-1]:
        # The attack pulls erased projections of E_t + Delta back to the originals ...
        assert record["after_attack"]["attack"] < 0.5 * record["attack_start"]["attack"]
        # ... which moves them away from the erase target.
        assert record["after_attack"]["adv"] > 1.2 * record["attack_start"]["adv"]
    for previous, record in itertools.pairwise(history):
        assert record["before"]["adv"] == previous["after_attack"]["adv"]
        assert record["after_erase"]["adv"] < record["before"]["adv"]


def test_callback_and_config_record_the_run(pipe, trained):
    adapter, calls = trained
    config = adapter.config
    assert config.preset == "styles" and config.concept_names == ["Van Gogh"]
    assert config.concepts[0].neutral == "real photograph" and config.concepts[0].eta == 0.5
    training = config.training
    assert training["seed"] == 0 and training["steps"] == 240 and sum(training["erase_iters"]) == 240
    assert training["first_stage_iters"] == training["erase_iters"][0] < 1800, "the schedule as run, not the preset's"
    assert training["anchor_weight"] == 10.0 and training["stages"] == 4 and training["anchors"] == ANCHORS
    assert training["concept_seeds"]["Van Gogh"] == concept_seed(0, 0, "Van Gogh")
    assert set(training["final_loss"]["Van Gogh"]) >= {"erase", "anchor", "adv", "attack", "erase_initial"}
    json.dumps(config.to_dict())
    phases = {logs["phase"] for _, _, logs in calls}
    assert phases == {"erase", "attack", "stage_end"}
    erase_logs = [logs for _, _, logs in calls if logs["phase"] == "erase"]
    assert all({"loss", "erase", "anchor", "lr", "concept", "iters"} <= set(logs) for logs in erase_logs)
    assert any("adv" in logs for logs in erase_logs) and not all("adv" in logs for logs in erase_logs)
    ends = [(stage, logs) for stage, _, logs in calls if logs["phase"] == "stage_end"]
    assert [stage for stage, _ in ends] == [0, 1, 2, 3]
    assert ends[0][1]["after_erase"] == training["history"]["Van Gogh"][0]["after_erase"]


# ------------------------------------------------------------------------ determinism/resume
SMALL = SHORT_TRAINING


def test_same_seed_same_weights_other_seed_otheradapter_weights(pipe):
    torch.manual_seed(123)
    first = adapter_weights(train_cpe(pipe, "Van Gogh", preset="styles", seed=7, **SMALL))
    torch.manual_seed(999)
    second = adapter_weights(train_cpe(pipe, "Van Gogh", preset="styles", seed=7, **SMALL))
    other = adapter_weights(train_cpe(pipe, "Van Gogh", preset="styles", seed=8, **SMALL))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["gate.A"], other["gate.A"])
    assert not torch.equal(
        first["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.up"],
        other["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.up"],
    )


def test_training_leaves_the_global_rng_alone(pipe):
    torch.manual_seed(5)
    state = torch.get_rng_state()
    train_cpe(pipe, "Van Gogh", preset="styles", **{**SMALL, "steps": 6})
    assert torch.equal(state, torch.get_rng_state())


def test_prompt_searches_find_real_prompts_and_the_next_stages_erase_them(pipe):
    options = {**FAST, "steps": 240}
    searches = {"prompt_searches": 2, "prompt_search_budget": 32}
    searched = train_cpe(pipe, "Van Gogh", preset="styles", seed=0, **searches, **options)
    found = [f for record in searched.config.training["history"]["Van Gogh"] for f in record.get("found_prompts", [])]
    assert found, "no search beat its start prompt"
    starts = [TEMPLATES[f["template"]].replace("{}", "Van Gogh") for f in found]
    assert all(isinstance(f["prompt"], str) and f["prompt"] != start for f, start in zip(found, starts, strict=True))
    plain = train_cpe(pipe, "Van Gogh", preset="styles", seed=0, **options)

    # Each found prompt's erase error: how far its erased K/V are from the erase target of the
    # prompt its search started from, (1 + eta) P(E_n) - eta P(E_t) = P((1 + eta) E_n - eta E_t).
    # Trained against them, the later stages move the found prompts to that target.
    eta = get_preset("styles").eta
    neutrals = [TEMPLATES[f["template"]].replace("{}", "real photograph") for f in found]
    goal = (1 + eta) * encode_prompts(pipe, neutrals, cache=False) - eta * encode_prompts(pipe, starts, cache=False)
    targets = kv_projections(pipe, goal)
    prompts = encode_prompts(pipe, [f["prompt"] for f in found], cache=False)
    stack = build_stack(pipe.unet, find_target_layers(pipe.unet), prompts.shape[1], "cpu")
    errors = {}
    for label, adapter in (("searched", searched), ("plain", plain)):
        name = pipe.load_cpe_adapter(adapter)
        try:
            erased = kv_projections(pipe, prompts)
        finally:
            pipe.unload_cpe_adapter(name)
        errors[label] = float(_weighted_norm(erased - targets, stack.column_weight))
    assert errors["searched"] < 0.9 * errors["plain"], errors


# ------------------------------------------------------------------------------- routing
def test_several_concepts_stack_and_route_per_token():
    """On the pipeline with a real (MiniLM) text encoder, where names carry meaning."""
    pipe = tiny_pipeline("sd-semantic")
    options = {**FAST, "steps": 300, "anchor_weight": 30.0}
    specs = ["Van Gogh", ConceptSpec("Picasso", "a photograph", 0.3)]
    adapter = train_cpe(pipe, specs, preset="styles", seed=0, **options)
    assert adapter.config.concept_names == ["Van Gogh", "Picasso"]
    assert adapter.config.concepts[1].neutral == "a photograph" and adapter.config.concepts[1].eta == 0.3
    embeds = encode_prompts(pipe, ["a painting by Van Gogh", "a painting by Picasso"])
    with torch.no_grad():
        gates, _ = gate_values(embeds, adapter.gate_a, adapter.key_weight(), adapter.gate_v)
        residuals = adapter.residuals(embeds)  # [concept, prompt, T, sum(d_out)], unrouted
    winner = gates.argmax(0)  # [prompt, T]
    # Each prompt's own concept opens wider on most of the prompt's real tokens ...
    real = pipe.tokenizer(["a painting by Van Gogh", "a painting by Picasso"], padding="max_length")["attention_mask"]
    real = torch.tensor(real, dtype=torch.bool)
    assert (winner[0][real[0]] == 0).float().mean() > 0.8, gates[:, 0]
    assert (winner[1][real[1]] == 1).float().mean() > 0.8, gates[:, 1]
    before = kv_projections(pipe, embeds)
    name = pipe.load_cpe_adapter(adapter)
    try:
        routed = kv_projections(pipe, embeds)
    finally:
        pipe.unload_cpe_adapter(name)
    # ... and the pipeline applies, token by token, only the winning concept's residual.
    expected = torch.where((winner == 0).unsqueeze(-1), residuals[0], residuals[1])
    scale = float(residuals.abs().max())
    torch.testing.assert_close(routed - before, expected, atol=1e-5 * scale, rtol=1e-4)
    assert not torch.allclose(routed[1] - before[1], residuals[0, 1], atol=1e-2 * scale)


# -------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("concepts", "kwargs", "message"),
    [
        ("", {}, "empty"),
        ("   ", {}, "empty"),
        ([], {}, "No concepts"),
        (" ".join(["word"] * 90), {}, "tokens long"),
        ("Van Gogh", {"preset": "celebs"}, "Unknown preset"),
        ("Van Gogh", {"learning_rate": 1.0}, "Unknown training option"),
        (["Van Gogh", "van gogh"], {}, "listed twice"),
        ("Van Gogh", {"steps": -3}, "steps"),
        ("Van Gogh", {"anchors": ["Van Gogh's sunflowers"]}, "anchors"),
        ("Van Gogh", {"anchor_templates": 0}, "anchor_templates"),
    ],
)
def test_bad_input_is_refused_clearly(pipe, concepts, kwargs, message):
    options = {"progress": False, "templates": TEMPLATES, **kwargs}
    with pytest.raises(CPEAdapterError, match=message):
        train_cpe(pipe, concepts, **options)


def test_errors_are_value_errors():
    assert issubclass(CPEAdapterError, ValueError)
    assert cpe_adapter.CPEAdapterError is CPEAdapterError


# ---------------------------------------------------------------------- determinism and resuming
def test_projection_stack_is_the_same_at_any_thread_count():
    """The stack (Gram matrix, eigenvectors, c_l) is built on a fixed thread count, so a seed gives
    the same adapter in a process with one thread as in one with several (as under launchers)."""
    from cpe_adapter.training import make_context
    from cpe_adapter.training_plan import resolve_plan

    semantic = pytest.importorskip("cpe_adapter.testing").tiny_pipeline("sd-semantic")
    plan, _ = resolve_plan("styles", 40, None, {})
    previous = torch.get_num_threads()
    contexts = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            contexts.append(make_context(semantic, plan))
    finally:
        torch.set_num_threads(previous)
    first, second = (c.stack for c in contexts)
    for name in ("gram", "eigenvalues", "eigenvectors", "layer_weight"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert contexts[0].fingerprint == contexts[1].fingerprint


# ------------------------------------------------------------------------------ bad settings
def test_a_diverging_run_stops_with_a_clear_error(pipe):
    with pytest.raises(CPEAdapterError, match="diverged in stage 1"):
        train_cpe(pipe, "Van Gogh", preset="styles", seed=0, **{**SMALL, "first_stage_lr": 1e30})


@pytest.mark.parametrize(
    ("concepts", "options", "message"),
    [
        ("a person", {"preset": "names"}, "its own neutral phrase"),
        (ConceptSpec("Van Gogh", "van gogh"), {}, "its own neutral phrase"),
        ("Van Gogh", {"eta": -1.0}, "above -1"),
        (ConceptSpec("Van Gogh", "a photo", "abc"), {}, "eta must be a finite number"),
        ("Van Gogh", {"tie_gate_qk": "false"}, "True or False"),
        ("Van Gogh", {"residual_rank": 0}, "residual_rank"),
        ("Van Gogh", {"gate_rank": 1.5}, "gate_rank"),
        ("Van Gogh", {"lr": "1e-3"}, "'lr' must be a finite number"),
        ("Van Gogh", {"warmup_steps": -5}, "warmup_steps"),
        ("Van Gogh", {"anchor_weight": -1.0}, "'anchor_weight' must be >= 0"),
        ("Van Gogh", {"num_threads": 0}, "num_threads"),
        ("Van Gogh", {"seed": 1.7}, "seed"),
        ("Van Gogh", {"callback": "print"}, "callable"),
        ([5], {}, "string or a ConceptSpec"),
    ],
)
def test_bad_settings_are_refused_before_training(pipe, concepts, options, message):
    options = {"preset": "styles", **FAST, "steps": 20, **options}
    with pytest.raises(CPEAdapterError, match=message):
        train_cpe(pipe, concepts, **options)


def test_the_other_erased_concepts_are_never_anchors(pipe):
    from cpe_adapter import pools

    templates = ["a painting by {}"]
    _, alone = anchor_prompts(pipe, "Claude Monet", "styles", templates, anchors=None, similar=5)
    neighbour = alone[0].removeprefix("a painting by ")
    _, together = anchor_prompts(
        pipe, "Claude Monet", "styles", templates, anchors=None, similar=5, erased=["Claude Monet", neighbour]
    )
    assert neighbour in pools.concept_pool("styles")
    assert not any(neighbour in prompt for prompt in together) and len(together) == len(alone)


def test_every_concept_of_a_run_is_kept_out_of_the_others_anchors(pipe, monkeypatch):
    from cpe_adapter import training

    seen = []
    real = training.build_prompt_set
    monkeypatch.setattr(training, "build_prompt_set", lambda *a, **k: seen.append(k["erased"]) or real(*a, **k))
    train_cpe(pipe, ["Van Gogh", "Monet"], preset="styles", **{**FAST, "steps": 20})
    assert seen == [("Van Gogh", "Monet")] * 2


def test_paraphrases_differing_only_in_case_are_not_trained_twice(pipe):
    adapter = train_cpe(
        pipe,
        "Van Gogh",
        preset="styles",
        paraphrases={"Van Gogh": ["VAN GOGH", "Vincent", "vincent"]},
        **{**FAST, "steps": 20},
    )
    assert adapter.config.concept_names == ["Van Gogh", "Vincent"]


def test_callbacks_cannot_edit_the_recorded_history(pipe):
    def vandal(stage, step, logs):
        if logs["phase"] == "stage_end":
            logs["after_erase"]["erase"] = -999.0

    adapter = train_cpe(pipe, "Van Gogh", preset="styles", callback=vandal, **{**FAST, "steps": 20})
    assert all(r["after_erase"]["erase"] != -999.0 for r in adapter.config.training["history"]["Van Gogh"])


def test_numbers_from_numpy_and_a_zero_anchor_weight_are_accepted(pipe):
    import numpy as np

    adapter = train_cpe(
        pipe,
        "Van Gogh",
        preset="styles",
        seed=np.int64(2),
        **{**FAST, "steps": 20, "anchor_weight": 0.0, "residual_rank": np.int64(2), "eta": np.float32(0.4)},
    )
    training = adapter.config.training
    assert (training["residual_rank"], training["anchor_weight"], training["seed"]) == (2, 0.0, 2)
    assert type(training["residual_rank"]) is int and type(training["eta"]) is float
