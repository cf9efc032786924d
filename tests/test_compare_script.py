"""scripts/compare_methods.py: which rows a rerun reuses, where each row's run goes, what the table says about it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lsr.recipe import Recipe, merge

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_methods.py"


@pytest.fixture(scope="module")
def cm():
    spec = importlib.util.spec_from_file_location("compare_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_recipe(name: str = "quarot", **overrides) -> dict:
    """The config's recipe as the CLI hands it over: a preset's fields, its name, the overrides applied."""
    return merge(Recipe.from_name(name), overrides).to_dict()


def test_presets_run_under_their_plain_names(cm):
    recipe = cm.recipe_for("lsr", "gptq", 1, config_recipe())
    assert recipe.name == "lsr-gptq" and recipe.rotate.seed == 1
    assert cm.run_tag(recipe) == "" and cm.overrides(recipe.to_dict()) == []


def test_overrides_get_their_own_run_directory_and_are_listed(cm):
    cfg = config_recipe("lsr-gptq", learn={"epochs": 6, "schedule": "cosine"})
    tuned = cm.recipe_for("lsr", "gptq", 0, cfg)
    assert tuned.learn.epochs == 6
    assert cm.overrides(tuned.to_dict()) == ["learn.epochs=6", "learn.schedule=cosine"]
    tag = cm.run_tag(tuned)
    assert tag.startswith("-") and len(tag) == 9
    other = cm.recipe_for("lsr", "gptq", 0, config_recipe("lsr-gptq", learn={"epochs": 4}))
    assert cm.run_tag(other) != tag
    # the overrides reach the named preset only; KV cache and R4 layout reach every row, with their own tags
    assert cm.recipe_for("lsr", "gptaq", 0, cfg) == cm.recipe_for("lsr", "gptaq", 0, config_recipe())
    kv = cm.recipe_for("quarot", "gptq", 0, config_recipe(kv_cache={"bits": 4}))
    assert cm.run_tag(kv) == "-kv4" and cm.overrides(kv.to_dict()) == []


def test_rows_are_reused_only_for_the_recipe_they_ran(cm, tmp_path):
    plain = config_recipe()
    tuned = config_recipe("lsr-gptq", learn={"epochs": 6})
    row = {"recipe": "lsr", "weights": "gptq", "seed": 0,
           "recipe_config": cm.recipe_for("lsr", "gptq", 0, plain).to_dict()}
    key = cm.key_of(row)
    assert cm.reusable(row, key, plain)
    assert not cm.reusable(row, key, tuned)
    assert not cm.reusable({**row, "error": "boom"}, key, plain)
    quarot = {"recipe": "quarot", "weights": "rtn", "seed": 0,
              "recipe_config": cm.recipe_for("quarot", "rtn", 0, plain).to_dict()}
    assert cm.reusable(quarot, cm.key_of(quarot), tuned)  # other presets' rows survive the override
    assert not cm.reusable({"recipe": "lsr", "weights": "gptq", "seed": 0, "run": str(tmp_path / "gone")}, key, plain)


def test_a_results_file_is_kept_across_recipes_but_not_across_data(cm, tmp_path):
    path = tmp_path / "out.json"
    settings = {"config": "c.yaml", "data": {"num_calibration": 16}, "threads": 2, "recipe": {"name": "quarot"},
                "extra": []}
    rows = {("FP", None, None): {"recipe": "FP", "weights": None, "seed": None, "ppl": {"x": 1.0}, "eval_s": 1.0}}
    cm.save(path, settings, rows, list(rows))
    assert cm.previous_rows(path, {**settings, "recipe": {"name": "lsr-gptq"}, "extra": ["--x"]}) == rows
    assert cm.previous_rows(path, {**settings, "data": {"num_calibration": 8}}) == {}
    assert path.with_name("out.json.old").is_file() and not path.exists()


def test_rows_written_before_a_recipe_field_existed_are_still_reused(cm, tmp_path):
    """A row records its recipe as it was then: fields added since read as their defaults, so the row is reused for
    the same recipe, and not for one that sets the new field."""
    plain = config_recipe("lsr-gptq")
    recorded = cm.recipe_for("lsr", "gptq", 0, plain).to_dict()
    del recorded["learn"]["linear_loss"]  # as written before learn.linear_loss existed
    row = {"recipe": "lsr", "weights": "gptq", "seed": 0, "recipe_config": recorded, "int4_ppl": {"x": 20.0}}
    path, settings = tmp_path / "out.json", {"threads": 2, "recipe": plain, "extra": []}
    cm.save(path, settings, {cm.key_of(row): row}, [cm.key_of(row)])
    (read,) = cm.previous_rows(path, settings).values()
    assert cm.reusable(read, cm.key_of(row), plain)
    assert not cm.reusable(read, cm.key_of(row), config_recipe("lsr-gptq", learn={"linear_loss": 0.1}))


def test_the_table_names_a_rows_overrides(cm):
    recipe = cm.recipe_for("lsr", "gptq", 0, config_recipe("lsr-gptq", learn={"epochs": 6}))
    settings = {"eval_sources": ["wiki"], "data": {"num_calibration": 16, "seq_len": 512, "source": "wiki"},
                "recipe": {"name": "lsr-gptq"}, "model": {"name": "m", "dtype": "float32"}, "eval_windows": 4,
                "threads": 2, "python": "3", "torch": "2"}
    row = {"recipe": "lsr", "weights": "gptq", "seed": 0, "recipe_config": recipe.to_dict(),
           "int4_ppl": {"wiki": 20.0}, "full_layer_mean_error": 0.02, "fit_s": 1.0, "eval_s": 1.0}
    table = cm.render({"settings": settings, "rows": [row]})
    assert "- lsr gptq: learn.epochs=6" in table
