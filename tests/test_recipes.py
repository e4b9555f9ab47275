"""Training recipes (`cpe_adapter.recipes`): target variants, widened target sets, and their effect.

The behaviour test trains on the semantic testbed (a real MiniLM text encoder, so a paraphrase is
close to the concept in embedding space as it is in a real model) with few templates and anchors
and raised learning rates, so that a short run shows the difference between recipes.
"""

from __future__ import annotations

import pytest
import torch

import cpe_adapter  # noqa: F401  (installs the pipeline methods)
from cpe_adapter import CPEAdapterError, train_cpe
from cpe_adapter.evaluation import evaluate
from cpe_adapter.recipes import (
    DEFAULT_RECIPE,
    RECIPES,
    Recipe,
    augment_targets,
    card_figures,
    concept_variants,
    get_recipe,
    nearest_tokens,
    spellings,
    sub_spans,
    typos,
)
from cpe_adapter.testing import tiny_pipeline
from cpe_adapter.training_data import build_prompt_set

TEMPLATES = ["{}", "a painting by {}", "art in the style of {}", "a landscape by {}"]
ANCHORS = ["Claude Monet", "Paul Gauguin", "a red car", "a bowl of fruit", "Rembrandt", "a painter"]
EVAL_TEMPLATES = ["a portrait painted by {}", "a starry night sky by {}", "an oil painting by {}"]
FAST = {
    "templates": TEMPLATES,
    "anchors": ANCHORS,
    "first_stage_lr": 3e-3,
    "lr": 1e-3,
    "stages": 2,
    "adversaries": 4,
    "progress": False,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd-semantic")  # `make test` installs the semantic encoder; missing it is an error


# ------------------------------------------------------------------------------------- variants
def test_sub_spans_leave_out_particles_and_the_whole_name():
    assert sub_spans("Van Gogh") == ["Gogh"]
    spans = sub_spans("Leonardo da Vinci")
    assert "Leonardo da Vinci" not in spans and "da" not in spans
    assert {"Leonardo", "Vinci", "da Vinci", "Leonardo da"} <= set(spans)
    assert sub_spans("nudity") == []


def test_spellings_cover_casing_joins_and_possessive():
    out = spellings("Van Gogh")
    assert {"van gogh", "VAN GOGH", "VanGogh", "Van-Gogh", "Van Gogh's"} <= set(out)
    assert "VanGogh" not in spellings("Picasso") and "Picasso's" in spellings("Picasso")


def test_variants_read_differently_from_the_concept(pipe):
    variants = concept_variants(pipe, "Van Gogh", RECIPES["spans"])
    ids = [tuple(pipe.tokenizer(v, add_special_tokens=False)["input_ids"]) for v in variants]
    concept_ids = tuple(pipe.tokenizer("Van Gogh", add_special_tokens=False)["input_ids"])
    assert "Gogh" in variants
    assert "van gogh" not in variants  # the MiniLM tokenizer is uncased: it reads exactly as the concept
    assert concept_ids not in ids and len(set(ids)) == len(ids)


def test_typos_drop_double_or_swap_letters_only():
    out = typos("Van Gogh", 100)
    assert {"Vn Gogh", "Van Goghh", "Van Gohg"} <= set(out) and "Van Gogh" not in out
    assert "Van Gough" not in out  # no letter is inserted that the concept lacks
    assert all(set(t.replace(" ", "")) <= set("VanGogh") for t in out)
    spread = typos("Van Gogh", 4)
    assert len(spread) == 4 and spread[0] == out[0] and spread[-1] == out[-1]


def test_nearest_tokens_exclude_the_concept_and_kept_concepts(pipe):
    free = nearest_tokens(pipe, "Van Gogh", 6)
    assert len(free) == 6 and not {"van", "gogh"} & {w.lower() for w in free}
    kept = nearest_tokens(pipe, "Van Gogh", 6, exclude=[free[0]])
    assert free[0] not in kept and kept[:5] == free[1:6]


def test_unknown_recipe_is_refused_clearly(pipe):
    assert get_recipe(None).name == DEFAULT_RECIPE
    with pytest.raises(CPEAdapterError, match=r"recipe .bogus.*paper"):
        get_recipe("bogus")
    with pytest.raises(ValueError, match="recipe"):
        train_cpe(pipe, "Van Gogh", preset="styles", steps=2, recipe="bogus", **FAST)


# ---------------------------------------------------------------------------------- target sets
def test_paper_recipe_keeps_the_target_set(pipe):
    data = build_prompt_set(pipe, "Van Gogh", "real photograph", "styles", templates=TEMPLATES, anchors=ANCHORS)
    same = augment_targets(pipe, data, "Van Gogh", RECIPES["paper"], domain="styles")
    assert same.data is data and same.weights is None and same.variants == []


def test_widened_target_set_rows_and_weights(pipe):
    data = build_prompt_set(pipe, "Van Gogh", "real photograph", "styles", templates=TEMPLATES, anchors=ANCHORS)
    recipe = Recipe("test", sub_spans=True, spellings=True, mixups=2, concept_share=0.5)
    wide = augment_targets(pipe, data, "Van Gogh", recipe, domain="styles", seed=3)
    n, v = len(TEMPLATES), len(wide.variants)
    assert v >= 3
    assert wide.data.target.shape[0] == n * (1 + v + 2) == wide.data.neutral.shape[0] == len(wide.data.templates)
    assert torch.equal(wide.data.target[:n], data.target)
    assert torch.equal(wide.data.neutral[n : 2 * n], data.neutral)
    assert torch.allclose(wide.weights[:n].sum(), torch.tensor(0.5)) and torch.allclose(
        wide.weights.sum(), torch.tensor(1.0)
    )
    # A mixup row lies on the segment between two rows of the same template.
    rows = wide.data.target[: n * (1 + v)].view(1 + v, n, *data.target.shape[1:])
    mix = wide.data.target[n * (1 + v)]
    assert any(
        torch.allclose(torch.lerp(rows[b, 0], rows[a, 0], lam), mix, atol=1e-5)
        for a in range(1 + v)
        for b in range(1 + v)
        for lam in [
            float(
                ((mix - rows[b, 0]) * (rows[a, 0] - rows[b, 0])).sum()
                / (rows[a, 0] - rows[b, 0]).pow(2).sum().clamp_min(1e-12)
            )
        ]
    )


# ------------------------------------------------------------------------------------ behaviour
@pytest.fixture(scope="module")
def trained(pipe):
    """The same short run with the paper recipe and with the widened "typos" recipe."""
    return {
        recipe: train_cpe(pipe, "Van Gogh", preset="styles", steps=240, seed=0, recipe=recipe, **FAST)
        for recipe in ("paper", "typos")
    }


def _scores(pipe, adapter, paraphrases):
    name = pipe.load_cpe_adapter(adapter)
    try:
        report = evaluate(
            pipe,
            ["Van Gogh"],
            ["a red sports car"],
            paraphrases={"Van Gogh": paraphrases},
            templates=EVAL_TEMPLATES,
            attack=False,
            progress=False,
        )
    finally:
        pipe.unload_cpe_adapter(name)
    return report.per_concept["Van Gogh"]


def test_config_records_the_recipe_and_its_variants(trained):
    paper, widened = trained["paper"], trained["typos"]
    assert paper.config.training["recipe"] == "paper" and paper.config.training["variants"] == {"Van Gogh": []}
    assert widened.config.training["recipe"] == "typos"
    variants = widened.config.training["variants"]["Van Gogh"]
    assert "Gogh" in variants and "Van Goghh" in variants and "Van Gough" not in variants


def test_default_recipe_is_the_paper_run(pipe, trained):
    again = train_cpe(pipe, "Van Gogh", preset="styles", steps=240, seed=0, **FAST)
    paper = trained["paper"].file_state_dict()
    assert all(torch.equal(v, paper[k]) for k, v in again.file_state_dict().items())


def test_widening_waits_for_its_stage(pipe):
    """``region`` widens from stage 1: a one-stage run is the paper run bit for bit."""
    options = {**FAST, "stages": 1}
    paper = train_cpe(pipe, "Van Gogh", preset="styles", steps=12, recipe="paper", **options).file_state_dict()
    region = train_cpe(pipe, "Van Gogh", preset="styles", steps=12, recipe="region", **options)
    assert region.config.training["variants"]["Van Gogh"]
    assert all(torch.equal(v, paper[k]) for k, v in region.file_state_dict().items())


def test_widened_recipe_erases_a_held_out_misspelling_more_than_the_paper(pipe, trained):
    # "Van Gough" inserts a letter: the typo generator never produces it (it only drops, doubles or swaps).
    paper = _scores(pipe, trained["paper"], ["Van Gough"])
    widened = _scores(pipe, trained["typos"], ["Van Gough"])
    assert widened["paraphrase_erase_score"] > 0.1 > 10 * abs(paper["paraphrase_erase_score"])
    assert widened["erase_score"] > 0.8 * paper["erase_score"] > 0.2


def test_card_figures_reach_the_model_card(pipe, trained, tmp_path):
    adapter = trained["typos"]
    name = pipe.load_cpe_adapter(adapter)
    try:
        report = evaluate(
            pipe, ["Van Gogh"], paraphrases={"Van Gogh": ["Van Gough"]}, templates=EVAL_TEMPLATES[:1], attack=False
        )
    finally:
        pipe.unload_cpe_adapter(name)
    figures = card_figures(report, ["Van Gough"], "typos")
    assert figures["paraphrase_erase_score"] == report.figures["paraphrase_erase_score"]
    assert figures["paraphrases_evaluated"] == "Van Gough" and figures["recipe"] == "typos"
    adapter.config.evaluation = figures
    card = (adapter.save_pretrained(tmp_path / "card") / "README.md").read_text(encoding="utf-8")
    assert "paraphrase_erase_score" in card and "Van Gough" in card


# ----------------------------------------------------------------------------- user paraphrases
DESCRIPTION = "the Dutch post-impressionist painter of sunflowers"


def test_user_paraphrases_are_erased_next_to_the_concept(pipe, trained):
    given = train_cpe(
        pipe, "Van Gogh", preset="styles", steps=240, seed=0, paraphrases={"Van Gogh": [DESCRIPTION]}, **FAST
    )
    assert given.config.training["paraphrases"] == {"Van Gogh": [DESCRIPTION]}
    assert given.config.concept_names == ["Van Gogh", DESCRIPTION]
    assert given.config.concepts[1].neutral == given.config.concepts[0].neutral
    # The concept itself trains exactly as without paraphrases: its slice equals the paper run's.
    paper_weights = trained["paper"].file_state_dict()
    for key, value in given.file_state_dict().items():
        assert torch.equal(value[:1], paper_weights[key])
    paper = _scores(pipe, trained["paper"], [DESCRIPTION])
    with_list = _scores(pipe, given, [DESCRIPTION])
    # A description shares no token with the name: the paper recipe leaves it alone, the list erases it.
    assert with_list["paraphrase_erase_score"] > 0.2 > 10 * abs(paper["paraphrase_erase_score"])
    assert with_list["erase_score"] == pytest.approx(paper["erase_score"], rel=1e-3)


@pytest.mark.parametrize(
    ("paraphrases", "message"),
    [
        (["Vincent van Gogh"], "must map each concept"),
        ({"Van Gogh": []}, "non-empty list"),
        ({"Van Gogh": ["Vincent", "  "]}, "empty or non-string"),
        ({"Claude Monet": ["Monet"]}, "not among the concepts"),
    ],
)
def test_bad_paraphrases_are_refused_before_training(pipe, paraphrases, message):
    with pytest.raises(CPEAdapterError, match=message):
        train_cpe(pipe, "Van Gogh", preset="styles", steps=1, paraphrases=paraphrases, **FAST)
