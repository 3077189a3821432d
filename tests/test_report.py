"""`sparsebench report` against hand-made results files (tests/fixtures/make_fixtures.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparsebench import stats
from sparsebench.analyze import report
from sparsebench.analyze.html import render_html
from sparsebench.analyze.plots import write_plots
from sparsebench.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
TALK, TALK_GPU, THREADS = FIXTURES / "talk.jsonl", FIXTURES / "talk_gpu.jsonl", FIXTURES / "threads.jsonl"
ROOT = Path(__file__).resolve().parent.parent


def test_talk_view_values_rounding_and_status_cells():
    view = report.build_view(report.load([TALK]), "talk")
    rows = view.table.set_index("batch size")
    # every figure with its 95% interval; † one process (run-to-run noise not measured)
    assert rows.loc[256, "CPU baseline"] == "4,000 [3,900-4,100] †"
    assert rows.loc[256, "CPU optimized"] == "21,000 [20,500-21,500] †"  # the faster of the two lookups
    low, high = stats.ratio_interval([[4000.0, 4100.0, 3900.0]], [[21000.0, 21500.0, 20500.0]])
    assert rows.loc[256, "CPU speedup"] == f"5.25x [{low:.2f}-{high:.2f}]" and low < 5.25 < high
    assert rows.loc[1024, "CPU optimized"].startswith("25,000* [")  # noisy (CV 20%); the failed one is not picked
    assert rows.loc[1024, "CPU speedup"].startswith("2.50x [")
    assert rows.loc[256, "GPU baseline"] == "skipped: no GPU" == rows.loc[1024, "GPU optimized"]
    assert rows.loc[256, "GPU/CPU optimized"] == "n/a"
    assert any("noisy" in note for note in view.notes)
    text = report.render_markdown(view)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    assert ["256", "4,000 [3,900-4,100] †", "21,000 [20,500-21,500] †"] == rows[2][:3]
    assert rows[2][3].startswith("5.25x [") and rows[2][4] == "skipped: no GPU"
    assert rows[1][0].endswith(":") and not rows[1][4].endswith(":")  # numbers right-aligned, text left
    assert "- \\* noisy:" in text  # the note keeps its mark in markdown


def test_markdown_escapes_pipes_and_leading_marks():
    from sparsebench.tables import render_table

    text = render_table(["a", "b"], [["x|y", "1"]], "markdown")
    assert "x\\|y" in text
    assert report.markdown_text("* noisy") == "\\* noisy" and report.markdown_text("fine") == "fine"


def test_several_runs_combine_with_the_run_as_a_column():
    view = report.build_view(report.load([TALK, TALK_GPU]), "talk")
    gpu_run = view.table[view.table["run"] == "talk_gpu"].iloc[0]
    assert gpu_run["machine"] == "Other CPU 42"
    assert (gpu_run["GPU baseline"], gpu_run["GPU optimized"], gpu_run["GPU speedup"]) == (
        "5,500 [5,500-5,500] †", "22,000 [22,000-22,000] †", "4.00x [4.00-4.00]")  # identical windows
    assert gpu_run["GPU/CPU optimized"] == "2.93x [2.93-2.93]"  # 22,000 / 7,500
    assert len(view.table) == 3
    matrix = report.build_view(report.load([TALK, TALK_GPU]), "matrix")
    assert list(matrix.table.columns[:2]) == ["run", "cell"] and len(matrix.table) == 14


def test_pivot_and_best_views():
    loaded = report.load([THREADS])
    pivot = report.build_view(loaded, "pivot", rows="intra_op_threads", cols="inter_op_threads")
    table = pivot.table.set_index("intra_op_threads")
    assert table.loc[1, "1"] == "1,100 [1,100-1,100]" and table.loc[2, "2"] == "2,200 [2,200-2,200]"
    csv = report.render(loaded, "csv", view="pivot", rows="intra_op_threads", cols="inter_op_threads")
    assert csv.splitlines()[0] == "intra_op_threads,1,2,1_low,2_low,1_high,2_high"
    best = report.build_view(report.load([TALK]), "best").table
    first = best[(best["batch size"] == 256) & (best["device"] == "cpu")].iloc[0]
    low, high = stats.ratio_interval([[20000.0, 20500.0, 19500.0]], [[21000.0, 21500.0, 20500.0]])
    assert first["fastest"] == "elsfast-b256-sgd-cpu" and first["margin [95% CI]"] == f"1.05x [{low:.2f}-{high:.2f}]"
    assert first["samples/s [95% CI]"] == "21,000 [20,500-21,500] †"
    best_csv = report.render(report.load([TALK]), "csv", view="best")
    assert "samples_per_sec_low" in best_csv.splitlines()[0] and "margin_high" in best_csv.splitlines()[0]
    with pytest.raises(UserError, match="--rows colour: not a column"):
        report.build_view(loaded, "pivot", rows="colour", cols="variant")


def test_a_pivot_on_an_axis_some_cells_lack_labels_them_na():
    """ps_tasks of local cells is missing: those cells form an "n/a" column, whole numbers
    stay whole, and a note says why."""
    loaded = report.load([THREADS])
    frame = loaded.frame.copy()
    frame["ps_tasks"] = [None if i % 2 else 1 + (i // 2) % 2 for i in range(len(frame))]
    loaded = report.Loaded(frame, loaded.runs, loaded.warnings)
    pivot = report.build_view(loaded, "pivot", rows="intra_op_threads", cols="ps_tasks")
    assert list(pivot.table.columns) == ["intra_op_threads", "1", "2", "n/a"]
    assert any("ps_tasks n/a" in note for note in pivot.notes)


def test_the_matrix_says_which_pipeline_cells_are_input_bound():
    loaded = report.load([THREADS])
    frame = loaded.frame.copy()
    frame["input_samples_per_sec"] = [17134.0, 90000.0] + [None] * (len(frame) - 2)
    frame["input_bound"] = [True, False] + [None] * (len(frame) - 2)
    table = report.build_view(report.Loaded(frame, loaded.runs, loaded.warnings), "matrix").table
    assert list(table["input"][:3]) == ["input-bound (alone 17,100)", "not input-bound (alone 90,000)", ""]
    assert "input" not in report.build_view(loaded, "matrix").table.columns  # no pipeline cell, no column


@pytest.mark.parametrize("value,text", [(12345.6, "12,300"), (999.5, "1,000"), (1.234, "1.23"), (0.0, "0"), (None, "")])
def test_three_significant_digits(value, text):
    assert report.sig3(value) == text


def test_json_keys_and_csv():
    loaded = report.load([TALK])
    rows = json.loads(report.render(loaded, "json"))
    assert len(rows) == 10
    assert rows[0]["windows"] == [4000.0, 4100.0, 3900.0] and rows[0]["grad_type"] == "dense"
    assert rows[3]["status"] == "skipped" and rows[3]["samples_per_sec"] is None
    csv = report.render(loaded, "csv", view="talk")
    header, first = csv.splitlines()[:2]
    assert header.startswith("batch_size,cpu_baseline,cpu_baseline_low,cpu_baseline_high,cpu_optimized,"
                             "cpu_optimized_low,cpu_optimized_high,cpu_speedup,cpu_speedup_low,cpu_speedup_high")
    assert first.startswith("256,4000.0,3900.0,4100.0,21000.0,20500.0,21500.0,5.25,")


def test_default_view_is_talk_for_gpu_vs_cpu():
    assert report.default_view(report.load([TALK])) == "talk"
    assert report.default_view(report.load([THREADS])) == "matrix"


def test_plots_are_written_and_non_empty(tmp_path):
    written = write_plots(report.load([TALK, TALK_GPU]), tmp_path / "a")
    names = {p.name for p in written}
    assert {"throughput_vs_batch.png", "throughput_vs_batch.svg", "speedup.png", "speedup.svg"} <= names
    written += write_plots(report.load([THREADS]), tmp_path / "b")
    assert {"thread_scaling.png", "thread_scaling.svg"} <= {p.name for p in written}
    for path in written:
        assert path.stat().st_size > 1000
    assert (tmp_path / "a" / "throughput_vs_batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_escapes_text_from_results_files(tmp_path):
    lines = TALK.read_text().splitlines()
    record = json.loads(lines[8])
    record["reason"] = "<script>alert('x')</script>"
    lines[8] = json.dumps(record)
    evil = tmp_path / "evil.jsonl"
    evil.write_text("\n".join(lines) + "\n")
    page = render_html(report.load([evil]), None, None, None, "samples_per_sec")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count("data:image/png;base64,") >= 2


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(chromium() is None, reason="no chromium on this machine (.ci/run installs Debian's chromium)")
def test_html_page_renders_in_a_real_headless_browser(tmp_path):
    page = tmp_path / "report.html"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "sparsebench", "report", str(TALK), "--format", "html",
                           "--output", str(page)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium(), *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=600)
    assert "the talk's table" in dom.stdout and "skipped: no GPU" in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run([chromium(), *flags, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                   capture_output=True, timeout=600)
    assert shot.exists() and shot.stat().st_size > 10_000


def test_cells_whose_labels_collide_are_shown_by_their_ids(tmp_path):
    from fixtures.make_fixtures import ok, write_to

    from sparsebench.plan.cell import Cell
    from sparsebench.plan.spec import DataSpec, ModelSpec

    cells = [Cell("s", 64, ModelSpec(), DataSpec(source=f"/{folder}/x.libsvm", format="libsvm"))
             for folder in ("a", "b")]
    path = tmp_path / "r.jsonl"
    write_to(path, [ok(c, [100.0, 101.0]) for c in cells], "s")
    shown = list(report.build_view(report.load([path]), "matrix").table["cell"])
    assert shown == [c.cell_id for c in cells] and shown[0] != shown[1]


def test_report_says_when_quality_rests_on_different_step_counts(tmp_path):
    from fixtures.make_fixtures import cell, ok, write_to

    cells = [cell("s", v, 256) for v in ("embedding_lookup_sparse", "sparse_dense_matmul")]
    alike, mixed = tmp_path / "alike.jsonl", tmp_path / "mixed.jsonl"
    write_to(alike, [ok(c, [100.0, 101.0]).replace(quality_steps=100) for c in cells], "s")
    write_to(mixed, [ok(cells[0], [100.0, 101.0]).replace(quality_steps=100), ok(cells[1], [100.0, 101.0])], "s")
    assert not any("different training" in n for n in report.build_view(report.load([alike]), "matrix").notes)
    notes = report.build_view(report.load([mixed]), "matrix").notes
    assert any("loss and AUC rest on different training: 100 steps, after the timed windows" in n for n in notes)
    pivot = report.build_view(report.load([mixed]), "pivot", rows="batch_size", cols="variant", metric="auc")
    assert any("different training" in n for n in pivot.notes)


def test_the_shards_plot_shows_only_partitioned_variants_and_titles_stay_inside_the_figure(tmp_path):
    """13 unpartitioned series used to pile up at shards=1; a long title ran off the left edge."""
    sys.path.insert(0, str(FIXTURES))
    import make_fixtures as mk
    from sparsebench.analyze.plots import figures
    from sparsebench.plan.cell import Cell, Threads
    from sparsebench.plan.spec import DataSpec, MeasureSpec, ModelSpec

    def cell(variant, shards=1, optimizer="sgd"):
        model = ModelSpec(variant=variant, optimizer=optimizer, **({"shards": shards} if shards > 1 else {}))
        return Cell(suite="shards", batch_size=512, model=model, data=DataSpec(feature_bits=20), threads=Threads(),
                    measure=MeasureSpec())

    records = [mk.ok(cell(v, n), [1000.0 * n, 1010.0 * n, 990.0 * n])
               for v in ("row_partitioned", "col_partitioned") for n in (2, 4)]
    records += [mk.ok(cell(v, optimizer=o), [900.0, 910.0, 890.0])
                for v in ("embedding_lookup_sparse", "sparse_dense_matmul") for o in ("sgd", "adam", "adagrad")]
    path = tmp_path / "shards.jsonl"
    mk.write_to(path, records, "shards" + "-a-rather-long-suite-name" * 4)
    figs = figures(report.load([path]).frame)
    ax = figs["shards"].axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert len(labels) == 2 and all("partitioned" in label for label in labels), labels
    assert "2 unpartitioned variant(s) not shown" in \
        ax.get_title(loc="left").replace("\n", " ")
    for fig in figs.values():
        renderer = fig.canvas.get_renderer()
        title = fig.axes[0].title if fig.axes[0].get_title() else fig.axes[0]._left_title
        box = title.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= fig.bbox.x1, (fig.axes[0].get_title(loc="left"), box)


# A real run of the distributed suite (2-core VM, loopback clusters in private network
# namespaces, at commit 01f44c4): `sparsebench run --suite distributed`.
DISTRIBUTED = FIXTURES / "distributed.jsonl"


def test_the_traffic_view_gives_bytes_per_example_and_the_fused_layouts_saving():
    view = report.build_view(report.load([DISTRIBUTED]), "traffic")
    rows = view.table.set_index("cell")
    assert len(rows) == 12  # the parameter-server cells only
    fused = rows.loc["fused-b1024-sgd-cpu-ps1w2"]
    assert fused["PS x workers"] == "1 x 2"
    assert fused["per PS task and step"] == "ps:0 1.04 MB in / 215 KB out"
    assert fused["bytes/example"] == "1.22 KB"
    assert fused["vs best stock"] == "15.0x fewer than col-x2-b1024-sgd-cpu-ps1w2"
    assert rows.loc["fused-b1024-sgd-cpu-ps2w2", "vs best stock"] == "11.9x fewer than col-x2-b1024-sgd-cpu-ps2w2"
    assert rows.loc["fused-b1024-lazy_adam-cpu-ps2w2", "vs best stock"] == "31.8x fewer than col-x2-b1024-lazy_adam-cpu-ps2w2"
    assert rows.loc["row-mod2-b1024-sgd-cpu-ps1w2", "bytes/example"] == "43.3 KB"
    assert rows.loc["row-mod2-b1024-sgd-cpu-ps1w2", "vs best stock"] == ""  # only the fused layout is compared
    # The numbers behind the strings, against the records' own per-task counters.
    numeric = view.numeric.set_index("cell")
    lines = [json.loads(line) for line in DISTRIBUTED.read_text().splitlines()[1:]]
    record = next(r for r in lines if r["cell_id"].startswith("fused-b1024-sgd-cpu-ps2w2"))
    per_step = sum(t["sent"] + t["received"] for t in record["cluster"]["ps_bytes_per_step"].values())
    assert numeric.loc["fused-b1024-sgd-cpu-ps2w2", "bytes_per_example"] == pytest.approx(per_step / 1024)
    stock = next(r for r in lines if r["cell_id"].startswith("col-x2-b1024-sgd-cpu-ps2w2"))
    stock_step = sum(t["sent"] + t["received"] for t in stock["cluster"]["ps_bytes_per_step"].values())
    assert numeric.loc["fused-b1024-sgd-cpu-ps2w2", "times_fewer_bytes"] == pytest.approx(stock_step / per_step)
    assert any("loopback" in note for note in view.notes)


def test_plots_of_results_that_support_none_say_so(tmp_path):
    """`report distributed.jsonl --plots DIR` wrote nothing and said nothing."""
    done = subprocess.run([sys.executable, "-m", "sparsebench", "report", str(DISTRIBUTED), "--plots",
                           str(tmp_path / "plots")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert f"note: no plot written to {tmp_path / 'plots'}" in done.stderr
    assert list((tmp_path / "plots").iterdir()) == []


def test_the_op_category_plot_promises_no_error_bars():
    """Its caption said one-process cells' error bars leave out run-to-run noise: it draws none."""
    from sparsebench.analyze.plots import figures

    profiled = FIXTURES / "distributed-profile-ps1.jsonl"
    [fig] = figures(report.load([profiled]).frame).values()
    title = fig.axes[0].get_title(loc="left").replace("\n", " ")
    assert title.startswith("Step time by op category") and "error bars" not in title


def test_the_op_category_plot_leaves_out_ops_that_wrap_other_ops():
    """A parameter-server profile's `Enqueue` and `__inference_run_steps` events span the ops
    they run: counted beside them, "other" was 63-83% of every bar."""
    from sparsebench.analyze.plots import figures

    profiled = FIXTURES / "distributed-profile-ps1.jsonl"
    [fig] = figures(report.load([profiled]).frame).values()
    ax = fig.axes[0]
    heights: dict[str, float] = {}
    for container, label in zip(ax.containers, ax.get_legend_handles_labels()[1]):
        heights[label] = sum(bar.get_height() for bar in container)
    assert heights["other"] / sum(heights.values()) < 0.5, heights
    assert "function-call ops, which hold other ops' time, left out" in ax.get_title(loc="left").replace("\n", " ")
