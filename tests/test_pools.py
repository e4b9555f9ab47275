"""Tests for the bundled data lists and the :mod:`cpe_adapter.pools` loader."""

from __future__ import annotations

from importlib import resources

import pytest

from cpe_adapter import pools

ALL_LISTS = (
    "public_figures",
    "artists",
    "general_people",
    "general_styles",
    "general_explicit",
    "templates_names",
    "templates_styles",
    "templates_explicit",
    "eval_templates_names",
    "eval_templates_styles",
    "eval_templates_explicit",
    "everyday_sentences",
)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def test_package_data_present_via_importlib_resources() -> None:
    data = resources.files("cpe_adapter").joinpath("data")
    for name in ALL_LISTS:
        entry = data.joinpath(f"{name}.txt")
        assert entry.is_file(), name
        assert entry.read_text(encoding="utf-8").strip()
    assert set(ALL_LISTS) <= set(pools.available_lists())


@pytest.mark.parametrize("name", ALL_LISTS)
def test_raw_file_format(name: str) -> None:
    raw = resources.files("cpe_adapter").joinpath("data", f"{name}.txt").read_text(encoding="utf-8")
    lines = raw.split("\n")
    if lines[-1] == "":
        lines = lines[:-1]
    assert lines, name
    for line in lines:
        assert line, f"{name}: empty line"
        assert line == line.strip(), f"{name}: surrounding whitespace in {line!r}"
        assert "#" not in line, f"{name}: '#' in {line!r}"
        assert "\r" not in line and "\t" not in line


@pytest.mark.parametrize("name", ALL_LISTS)
def test_unique_case_insensitive(name: str) -> None:
    items = pools.load_list(name)
    lowered = [_norm(x) for x in items]
    dups = sorted({x for x in lowered if lowered.count(x) > 1})
    assert not dups, f"{name}: duplicates {dups}"


def test_counts() -> None:
    assert len(pools.load_list("public_figures")) >= 520
    assert len(pools.load_list("artists")) >= 1050
    assert len(pools.load_list("everyday_sentences")) >= 240
    for domain in pools.DOMAINS:
        assert len(pools.templates(domain)) >= 40
        assert len(pools.templates(domain, held_out=True)) >= 15
        assert 20 <= len(pools.general_words(domain)) <= 80


@pytest.mark.parametrize("domain", pools.DOMAINS)
def test_templates_have_one_placeholder(domain: str) -> None:
    train = pools.templates(domain)
    held = pools.templates(domain, held_out=True)
    assert "{}" in train
    for tpl in train + held:
        assert tpl.count("{}") == 1, tpl
        assert tpl.count("{") == 1 and tpl.count("}") == 1, tpl
        assert tpl.format("X").count("X") == 1


@pytest.mark.parametrize("domain", pools.DOMAINS)
def test_eval_templates_disjoint_from_training(domain: str) -> None:
    train = {_norm(t) for t in pools.templates(domain)}
    held = {_norm(t) for t in pools.templates(domain, held_out=True)}
    assert not (train & held)


def test_domain_mapping() -> None:
    assert pools.DOMAINS == ("names", "styles", "explicit")
    assert pools.concept_pool("names") == pools.load_list("public_figures")
    assert pools.concept_pool("styles") == pools.load_list("artists")
    assert pools.concept_pool("explicit") == pools.load_list("everyday_sentences")
    assert "Taylor Swift" in pools.concept_pool("names")
    assert "Vincent van Gogh" in pools.concept_pool("styles")
    assert "a person" in pools.general_words("names")
    assert "a painting" in pools.general_words("styles")


def test_load_list_returns_copy() -> None:
    first = pools.load_list("artists")
    first.clear()
    assert pools.load_list("artists")


def test_unknown_list_raises() -> None:
    with pytest.raises(ValueError, match="artists"):
        pools.load_list("no_such_list")


@pytest.mark.parametrize("func", [pools.concept_pool, pools.general_words, pools.templates])
def test_unknown_domain_raises(func) -> None:
    with pytest.raises(ValueError, match="names, styles, explicit"):
        func("faces")
