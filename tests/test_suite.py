"""Suites: matrix expansion, exclusion, overrides and one-line errors that name file and key."""

import pytest

from sparsebench.errors import ConfigError, UserError
from sparsebench.plan.suite import load_suite, parse_suite, shipped_suites

BASE = """
name = "t"
[data]
feature_bits = 10
[matrix]
"""


def parse(matrix_and_more: str):
    return parse_suite(BASE + matrix_and_more, "t.toml", "t")


def test_cartesian_product_with_defaults():
    cells = parse('batch_size = [64, 128]\nvariant = ["sparse_dense_matmul", "embedding_lookup_sparse"]\n'
                  'optimizer = ["sgd", "lazy_adam"]').cells()
    assert len(cells) == 8
    assert {(c.batch_size, c.model.variant, c.model.optimizer) for c in cells} == {
        (b, v, o) for b in (64, 128) for v in ("sparse_dense_matmul", "embedding_lookup_sparse") for o in ("sgd", "lazy_adam")
    }
    assert all(c.model.device == "cpu" and c.data.feature_bits == 10 for c in cells)
    assert len({c.cell_id for c in cells}) == 8


def test_exclude_and_include():
    suite = parse(
        'batch_size = [64, 128]\nvariant = ["sparse_dense_matmul", "embedding_lookup_sparse"]\n'
        '[[exclude]]\nvariant = "sparse_dense_matmul"\nbatch_size = 128\n'
        '[[include]]\nvariant = "embedding_lookup_sparse"\noptimizer = ["adam", "ftrl"]\n'
    )
    combos = {(c.batch_size, c.model.variant, c.model.optimizer) for c in suite.cells()}
    assert (128, "sparse_dense_matmul", "sgd") not in combos
    assert (64, "sparse_dense_matmul", "sgd") in combos
    assert {(64, "embedding_lookup_sparse", "adam"), (128, "embedding_lookup_sparse", "ftrl")} <= combos
    assert len(combos) == 3 + 4


def test_impossible_combinations_are_dropped_not_errors():
    cells = parse('variant = ["embedding_lookup_sparse", "row_partitioned", "col_partitioned"]\n'
                  'shards = [1, 4]\npartition_strategy = ["mod", "div"]').cells()
    labels = sorted(c.label for c in cells)
    assert labels == sorted(["els-b256-sgd-cpu", "row-mod1-b256-sgd-cpu", "row-div1-b256-sgd-cpu",
                             "row-mod4-b256-sgd-cpu", "row-div4-b256-sgd-cpu", "col-x1-b256-sgd-cpu", "col-x4-b256-sgd-cpu"])


def test_cell_ids_are_stable_and_ignore_measurement_settings():
    a = parse('batch_size = [64]').cells()[0]
    b = parse_suite(BASE + 'batch_size = [64]\n[measure]\nwindows = 9\n', "u.toml", "u").cells()[0]
    assert b.measure.windows == 9
    assert a.cell_id == b.cell_id
    c = parse_suite(BASE.replace("feature_bits = 10", "feature_bits = 11") + "batch_size = [64]", "t.toml", "t").cells()[0]
    assert c.cell_id != a.cell_id


def test_overrides():
    suite = parse('batch_size = [64]\nvariant = ["embedding_lookup_sparse"]')
    suite.override("batch_size=256,1024")
    suite.override("windows=7")
    suite.override("data.seed=3")
    suite.override("onednn=off")
    cells = suite.cells()
    assert [c.batch_size for c in cells] == [256, 1024]
    assert all(c.measure.windows == 7 and c.data.seed == 3 and c.threads.onednn is False for c in cells)
    with pytest.raises(UserError, match="--set colour: unknown axis or setting"):
        suite.override("colour=red")
    with pytest.raises(UserError, match="--set seed: ambiguous"):
        suite.override("seed=1")
    with pytest.raises(ConfigError, match="--set batch_size: -1 is not"):
        suite.override("batch_size=-1")
    with pytest.raises(ConfigError, match="--set windows: "):
        suite.override("windows=0")


@pytest.mark.parametrize(
    "text,message",
    [
        ("batch_size = [64\n", r"^t\.toml: invalid TOML: "),
        ("colour = [1]\n", r"^t\.toml: matrix\.colour: unknown axis"),
        ('variant = ["dense_magic"]\n', r"^t\.toml: matrix\.variant: 'dense_magic' is not a known variant"),
        ("batch_size = [-5]\n", r"^t\.toml: matrix\.batch_size: -5 is not an integer >= 1"),
        ("batch_size = []\n", r"^t\.toml: matrix\.batch_size: empty list"),
        ("", r"^t\.toml: matrix: missing or empty"),
        ('batch_size = [64]\n[[exclude]]\nbatch_size = 64\n', r"^t\.toml: matrix: expands to no cells"),
        ('batch_size = [64]\n[measure]\nwindows = "three"\n', r"^t\.toml: measure\.windows: expected an integer"),
        ('batch_size = [64]\n[model]\nout_dims = 3\n', r"^t\.toml: model\.out_dims: unknown setting"),
        ('batch_size = [64]\n[[exclude]]\nvarient = "x"\n', r"^t\.toml: exclude\[0\]\.varient: unknown axis"),
    ],
)
def test_malformed_suites_name_file_and_key(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse(text).cells()
    assert "\n" not in str(info.value)


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"^t\.toml: colour: unknown key"):
        parse_suite('colour = 1\n[matrix]\nbatch_size = [1]', "t.toml", "t")


def test_unknown_suite_name_lists_the_shipped_ones():
    with pytest.raises(UserError, match="unknown suite 'nope'; shipped suites: .*smoke"):
        load_suite("nope")


@pytest.mark.parametrize("name", sorted(shipped_suites()))
def test_every_shipped_suite_expands(name):
    cells = load_suite(name).cells()
    assert cells and all(c.suite == load_suite(name).name for c in cells)


def test_smoke_covers_every_variant_and_optimizer():
    from sparsebench.plan import spec

    cells = load_suite("smoke").cells()
    assert {c.model.variant for c in cells} == set(spec.VARIANTS)
    assert {c.model.optimizer for c in cells} == set(spec.OPTIMIZERS)
    assert all(c.measure.windows >= 3 for c in cells)


# -- every knob is set in one place (issue 10.1) ------------------------------------------
MODEL_ONLY = """
[data]
feature_bits = 10
[model]
optimizer = "adam"
variant = "sparse_dense_matmul"
[matrix]
batch_size = [64]
"""


def test_model_section_choices_are_not_overridden_by_default_axes():
    (cell,) = parse_suite(MODEL_ONLY, "m.toml", "m").cells()
    assert (cell.model.variant, cell.model.optimizer) == ("sparse_dense_matmul", "adam")
    assert cell.label == "sdm-b64-adam-cpu"


@pytest.mark.parametrize("assignment", ["model.optimizer=ftrl", "optimizer=ftrl"])
def test_set_replaces_a_model_knob_wherever_the_suite_set_it(assignment):
    suite = parse_suite(MODEL_ONLY, "m.toml", "m")
    suite.override(assignment)
    (cell,) = suite.cells()
    assert (cell.model.variant, cell.model.optimizer) == ("sparse_dense_matmul", "ftrl")
    assert "optimizer" not in suite.model  # one place: the override moved it to the matrix


def test_set_of_an_axis_list_through_its_section_name():
    suite = parse_suite(MODEL_ONLY, "m.toml", "m")
    suite.override("model.optimizer=sgd,lazy_adam")
    assert sorted(c.model.optimizer for c in suite.cells()) == ["lazy_adam", "sgd"]


def test_partitioned_variant_and_shards_from_the_model_section():
    text = MODEL_ONLY.replace('optimizer = "adam"\n', "shards = 4\n").replace("sparse_dense_matmul", "row_partitioned")
    (cell,) = parse_suite(text, "r.toml", "r").cells()
    assert (cell.model.variant, cell.model.shards) == ("row_partitioned", 4)


def test_a_knob_set_in_two_places_is_an_error_naming_both():
    text = MODEL_ONLY.replace("batch_size = [64]", 'batch_size = [64]\noptimizer = ["sgd"]')
    with pytest.raises(ConfigError, match=r"^m\.toml: model\.optimizer: also set as matrix\.optimizer"):
        parse_suite(text, "m.toml", "m")


def test_unpartitioned_model_with_shards_is_an_error_naming_the_key():
    text = MODEL_ONLY.replace('optimizer = "adam"\n', "shards = 4\n")
    with pytest.raises(ConfigError, match=r"^m\.toml: model\.shards: variant 'sparse_dense_matmul' is not partitioned"):
        parse_suite(text, "m.toml", "m")


def test_a_shards_axis_collapses_for_unpartitioned_variants_instead_of_dropping_them():
    cells = parse('variant = ["embedding_lookup_sparse", "row_partitioned"]\nshards = [4]').cells()
    assert sorted(c.label for c in cells) == ["els-b256-sgd-cpu", "row-mod4-b256-sgd-cpu"]


def test_exclude_matches_values_set_in_the_model_section():
    suite = parse_suite(MODEL_ONLY.replace("[64]", "[64, 128]") + '[[exclude]]\noptimizer = "adam"\nbatch_size = 128\n',
                        "m.toml", "m")
    assert [c.batch_size for c in suite.cells()] == [64]


def test_axis_values_cover_every_axis():
    from sparsebench.plan.suite import AXES

    (cell,) = parse_suite(MODEL_ONLY, "m.toml", "m").cells()
    assert set(cell.axis_values()) == set(AXES)


def test_labels_show_every_setting_that_tells_cells_apart():
    suite = parse('learning_rate = [0.01, 0.05]\nout_dim = [8]\ndiscretizer = [true]\nnormalization = [false]\n'
                  'kmp_blocktime = [0]')
    labels = sorted(c.label for c in suite.cells())
    assert labels == ["els-b256-sgd-lr0.01-cpu-out8-disc-nonorm-kmp0", "els-b256-sgd-lr0.05-cpu-out8-disc-nonorm-kmp0"]


# -- a window's length can be given in steps alone (issue 10.6) ---------------------------
def test_steps_per_window_alone_is_not_cut_by_a_default_time_limit():
    suite = parse('batch_size = [64]\n[measure]\nsteps_per_window = 50\n')
    (cell,) = suite.cells()
    assert cell.measure.window_limits() == (50, None)
    suite.override("seconds_per_window=1.5")
    assert suite.cells()[0].measure.window_limits() == (50, 1.5)
    suite.override("seconds_per_window=none")
    assert suite.cells()[0].measure.window_limits() == (50, None)
    assert parse('batch_size = [64]').cells()[0].measure.window_limits() == (None, 2.0)


def test_cells_that_differ_only_in_their_source_file_have_distinct_labels():
    suite = parse('format = ["libsvm"]\nsource = ["/d/day-01.libsvm", "/d/day-02.libsvm.gz", "/e/day-01.libsvm", '
                  '"/d/*.libsvm"]\n')
    labels = [c.label for c in suite.cells()]
    assert labels[0].endswith("-libsvm-memory-day-01") and labels[1].endswith("-day-02")
    assert labels[3].endswith("-*")
    # Same file name in two folders: the labels agree, the ids (label + identity hash) do not,
    # and report shows the ids where labels collide (tests/test_report.py).
    assert labels[0] == labels[2] and len({c.cell_id for c in suite.cells()}) == 4
