"""The core's transcription of docs/SPEC.md and the recipe table."""

from __future__ import annotations

import pytest

from common.errors import UserFacingError
from common.recipes import BEST, BEST_SWA_ZOOM, DEFAULT_RECIPE, RECIPES, SEED, get_recipe, recipe_from_dict
from common.spec import LAYER_TABLE, TOTAL_PARAMS, format_layer_table
from tests.conftest import REPO_ROOT

SPEC_PATH = REPO_ROOT / "docs" / "SPEC.md"


def spec_table_block() -> str:
    """The layer table: the first code block of docs/SPEC.md."""
    return SPEC_PATH.read_text().split("```")[1].strip("\n")


def test_layer_table_renders_exactly_as_spec_md():
    assert format_layer_table(LAYER_TABLE) == spec_table_block()


def test_layer_table_totals():
    assert sum(row.params for row in LAYER_TABLE) == TOTAL_PARAMS == 4328
    assert [row.kind for row in LAYER_TABLE].count("Conv2d") == 6
    assert [row.kind for row in LAYER_TABLE].count("BatchNorm2d") == 5


def test_seed_recipe_is_the_original():
    assert (SEED.epochs, SEED.batch_size, SEED.lr, SEED.momentum) == (15, 256, 0.04, 0.9)
    assert (SEED.schedule.kind, SEED.schedule.step_size, SEED.schedule.gamma) == ("step", 10, 0.1)
    assert (SEED.augmentation.crop_prob, SEED.augmentation.crop_size, SEED.augmentation.max_rotation) == (0.1, 22, 15)
    assert (SEED.nesterov, SEED.weight_decay, SEED.dropout) == (False, 0.0, 0.15)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_survive_a_round_trip_through_json_data(name):
    assert recipe_from_dict(get_recipe(name).to_dict()) == get_recipe(name)


def test_overrides_replace_only_given_fields():
    changed = SEED.with_overrides(lr=0.1, epochs=None)
    assert changed.lr == 0.1 and changed.epochs == SEED.epochs


def test_the_default_recipe_keeps_the_model_and_the_epochs():
    """Issue 6's rules, kept by every recipe chosen since: the same 15 epochs and both dropout
    layers kept (a rate above 0); the default is the best recipe with averaging and zoom."""
    default = get_recipe(DEFAULT_RECIPE)
    assert default.epochs == SEED.epochs and 0 < default.dropout < 1
    assert default == BEST_SWA_ZOOM
    undone = BEST_SWA_ZOOM.with_overrides(name="best", schedule=BEST.schedule, augmentation=BEST.augmentation,
                                          average="none", swa_start=1, recalibrate_bn="none")
    assert undone == BEST


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(UserFacingError, match="choose one of: best, best-swa, best-swa-zoom, seed"):
        get_recipe("nope")
