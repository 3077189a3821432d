"""`sparsebench history`: results placed on commits, steps found where they were planted
and nowhere in noise, every output format."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparsebench.analyze import history
from sparsebench.execute import runner

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import make_fixtures  # noqa: E402

HISTORY = Path(__file__).parent / "fixtures" / "history"
ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sparsebench", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_the_planted_step_is_found_at_its_commit_and_the_noisy_flat_cell_has_none():
    found = history.load_history([HISTORY])
    trends = {t.label: t for t in found.trends}
    assert set(trends) == {"els-b512-sgd-cpu", "fused-b512-sgd-cpu"}
    assert len(found.commits) == make_fixtures.HISTORY_COMMITS
    [step] = trends["els-b512-sgd-cpu"].steps
    assert step.after == make_fixtures.history_commit(make_fixtures.HISTORY_STEP_AT)
    assert step.before == make_fixtures.history_commit(make_fixtures.HISTORY_STEP_AT - 1)
    assert step.low < make_fixtures.HISTORY_STEP < step.high and step.high < 1
    assert step.p < 0.01
    assert trends["fused-b512-sgd-cpu"].steps == []  # 10% run-to-run noise, no step


def test_the_detector_is_calibrated_on_many_seeded_series():
    """Flat series of 10 commits with 10% noise: at most alpha's share of false steps;
    a 15% step with 3% noise: found at its exact commit almost always."""
    rng = np.random.default_rng(7)
    false_alarms = sum(bool(history.confirmed_steps(rng.normal(0, 0.10, 10), 0.01, 0.03)[0]) for _ in range(300))
    assert false_alarms <= 6  # 2% of 300: alpha is 1%
    step = np.where(np.arange(10) >= 6, np.log(0.85), 0.0)
    exact = sum(history.confirmed_steps(step + rng.normal(0, 0.03, 10), 0.01, 0.03)[0] == [6] for _ in range(300))
    assert exact >= 270


def test_a_search_that_always_finds_a_split_does_not_make_a_step():
    """PELT proposes splits in pure noise; the max-statistic test must refuse them."""
    rng = np.random.default_rng(3)
    proposed = kept = 0
    for _ in range(100):
        values = rng.normal(0, 0.1, 12)
        found, count, _ = history.confirmed_steps(values, 0.01, 0.0)
        proposed += count
        kept += len(found)
    assert proposed > 10 and kept <= 2


def test_files_are_ordered_by_commit_time_not_by_name(tmp_path):
    names = sorted(HISTORY.glob("*.jsonl"))
    for i, path in enumerate(names):  # the newest commit gets the alphabetically first name
        shutil.copy(path, tmp_path / f"{len(names) - i:02d}.jsonl")
    found = history.load_history([tmp_path])
    assert found.commits == [make_fixtures.history_commit(i) for i in range(len(names))]


def _edited(source: Path, target: Path, header=lambda h: None, record=lambda r: None) -> Path:
    lines = [json.loads(line) for line in source.read_text().splitlines()]
    header(lines[0])
    for line in lines[1:]:
        record(line)
    target.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return target


def test_two_files_of_one_commit_are_its_processes_and_a_byte_identical_copy_is_not(tmp_path):
    """A copy of a file counted as a second process and narrowed the commit's interval."""
    first = sorted(HISTORY.glob("*.jsonl"))[0]
    shutil.copy(first, tmp_path / "a.jsonl")
    _edited(first, tmp_path / "b.jsonl", record=lambda r: r.get("windows") and r.update(
        windows=[w * 1.01 for w in r["windows"]]))  # another process of the same commit
    found = history.load_history([tmp_path])
    assert len(found.commits) == 1
    assert all(t.points[0].processes == 2 for t in found.trends)
    shutil.copy(first, tmp_path / "c.jsonl")
    found = history.load_history([tmp_path])
    assert all(t.points[0].processes == 2 for t in found.trends)
    assert any("c.jsonl: a byte-identical copy of" in w and "a.jsonl" in w for w in found.warnings), found.warnings


def test_the_two_sides_of_an_ab_run_are_left_out_by_name(tmp_path):
    """`ab`'s a.jsonl and b.jsonl in a history folder were merged into one commit point."""
    files = sorted(HISTORY.glob("*.jsonl"))
    for path in files[:4]:
        shutil.copy(path, tmp_path / path.name)
    for side in ("a", "b"):
        _edited(files[4], tmp_path / f"{side}.jsonl", header=lambda h, side=side: h.update(
            ab={"side": side.upper(), "python": "python", "overrides": [], "rounds": 8}))
    found = history.load_history([tmp_path])
    assert len(found.commits) == 4
    assert sum("of a `sparsebench ab` run; left out" in w for w in found.warnings) == 2, found.warnings


@pytest.mark.parametrize("windows", [[None, None, None], [0.0, 0.0, 0.0], [None, 1000.0, 0.0]])
def test_windows_that_are_no_rate_are_left_out_and_named(tmp_path, windows):
    """A null window (how a NaN is stored) crashed `history` and `compare`; all-zero windows
    crashed inside ruptures."""
    files = sorted(HISTORY.glob("*.jsonl"))
    for path in files[:6]:
        shutil.copy(path, tmp_path / path.name)
    odd = _edited(files[6], tmp_path / files[6].name, record=lambda r: r.get("windows") and r.update(
        windows=list(windows)))
    found = history.load_history([tmp_path])
    assert any("windows that are not rates above zero" in w and files[6].name in w for w in found.warnings)
    assert all(p.rate > 0 for t in found.trends for p in t.points)
    done = cli("compare", files[5], odd)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode in (0, 1) or (done.returncode == 2 and "nothing compared" in done.stderr), done.stderr


def test_a_file_without_a_commit_is_placed_by_its_start_and_said_so(tmp_path):
    lines = sorted(HISTORY.glob("*.jsonl"))[0].read_text().splitlines()
    header = json.loads(lines[0])
    del header["run"]["git"]
    (tmp_path / "r.jsonl").write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    found = history.load_history([tmp_path], repo=None)
    assert found.placements[0].when_source == "run"
    assert any("no commit in its header" in w for w in found.warnings)


def test_a_header_commit_that_is_an_option_is_refused_and_git_writes_nothing(tmp_path):
    """A results header is data: its commit reached `git show` as is, and "--output=FILE"
    made git create FILE. Now only hex object names pass, each file's error names it."""
    lines = sorted(HISTORY.glob("*.jsonl"))[0].read_text().splitlines()
    header = json.loads(lines[0])
    planted = tmp_path / "written-by-git"
    header["run"]["git"] = {"commit": f"--output={planted}", "committed_at": None}
    folder = tmp_path / "history"
    folder.mkdir()
    (folder / "r.jsonl").write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    done = cli("history", folder, "--repo", ROOT)
    assert done.returncode == 2 and not planted.exists()
    [line] = done.stderr.strip().splitlines()
    assert "r.jsonl" in line and "is not a commit id" in line and "Traceback" not in done.stderr


def test_cells_and_since_filters():
    found = history.load_history([HISTORY], cells=["fused*"], since=make_fixtures.history_commit(4)[:7])
    assert [t.label for t in found.trends] == ["fused-b512-sgd-cpu"]
    assert found.commits == [make_fixtures.history_commit(i) for i in range(4, 10)]
    assert len(history.load_history([HISTORY], since="2026-11-08").commits) == 3


def test_the_commit_comes_from_the_environment_outside_a_checkout(monkeypatch):
    def no_git(*args, **kwargs):
        return subprocess.CompletedProcess(args, 128, "", "not a git repository")

    monkeypatch.setattr(runner.subprocess, "run", no_git)
    monkeypatch.delenv("SPARSEBENCH_COMMIT", raising=False)
    monkeypatch.setenv("GITHUB_SHA", "abc123")
    assert runner.git_revision()["commit"] == "abc123"
    monkeypatch.setenv("SPARSEBENCH_COMMIT", "def456")
    assert runner.git_revision() == {"commit": "def456", "dirty": None, "committed_at": None,
                                     "source": "SPARSEBENCH_COMMIT"}
    monkeypatch.delenv("SPARSEBENCH_COMMIT")
    monkeypatch.delenv("GITHUB_SHA")
    assert runner.git_revision() is None


def test_a_checkout_records_its_commit_time():
    revision = runner.git_revision()
    if revision is None or revision["source"] != "checkout":
        pytest.skip("sparsebench does not run from a git checkout here")
    assert history._parse_time(revision["committed_at"]) is not None


def test_text_markdown_json_html_and_plots(tmp_path):
    done = cli("history", HISTORY, "--plots", tmp_path / "plots")
    assert done.returncode == 0, done.stderr
    step_commits = f"{make_fixtures.history_commit(5)[:9]}..{make_fixtures.history_commit(6)[:9]}"
    assert "1 step(s)" in done.stdout and step_commits in done.stdout
    assert (tmp_path / "plots" / "history.png").stat().st_size > 1000
    markdown = cli("history", HISTORY, "--format", "markdown").stdout
    assert "| els-b512-sgd-cpu" in markdown and "**1 step(s)**" in markdown
    payload = json.loads(cli("history", HISTORY, "--format", "json").stdout)
    cells = {c["label"]: c for c in payload["cells"]}
    assert cells["els-b512-sgd-cpu"]["steps"][0]["after"] == make_fixtures.history_commit(6)
    assert len(cells["fused-b512-sgd-cpu"]["points"]) == 10 and cells["fused-b512-sgd-cpu"]["steps"] == []
    page = cli("history", HISTORY, "--format", "html", "-o", tmp_path / "h.html")
    assert page.returncode == 0, page.stderr
    text = (tmp_path / "h.html").read_text()
    assert text.count("data:image/png;base64,") == 2 and step_commits in text


def test_no_step_is_said_plainly():
    done = cli("history", HISTORY, "--cells", "fused*")
    assert done.returncode == 0, done.stderr
    assert "no step found" in done.stdout


def test_busy_measurements_are_ringed_warned_about_and_skipped_on_request(tmp_path):
    """A run beside other load at one commit: named in a warning, marked on its point, and
    left out with --skip-busy (the els cell then has 9 commits, and still its step)."""
    for path in sorted(HISTORY.glob("*.jsonl")):
        lines = path.read_text().splitlines()
        if path.name.startswith("2026-11-03"):
            records = [json.loads(line) for line in lines[1:]]
            for record in records:
                if record["cell_id"].startswith("els"):
                    record["other_cores"], record["window_seconds"] = 1.1, [0.4] * 5
            lines = [lines[0], *map(json.dumps, records)]
        (tmp_path / path.name).write_text("\n".join(lines) + "\n")
    found = history.load_history([tmp_path])
    els = next(t for t in found.trends if t.label.startswith("els"))
    assert els.points[2].busy == ["2026-11-03-smoke.jsonl: 1.1 other cores"]
    assert any("1 of 20 cell measurements ran on a busy machine" in w for w in found.warnings)
    skipped = history.load_history([tmp_path], skip_busy=True)
    els = next(t for t in skipped.trends if t.label.startswith("els"))
    assert len(els.points) == 9 and not any(p.busy for p in els.points)
    assert [s.after for s in els.steps] == [make_fixtures.history_commit(make_fixtures.HISTORY_STEP_AT)]
    assert any("--skip-busy: left out 1 measurement(s)" in w for w in skipped.warnings)


@pytest.mark.parametrize("cells", [["els*"], []])
def test_the_history_plots_caption_stays_inside_the_figure(cells):
    """Its one-line caption ran off the right edge of a one-panel figure (cut to "levels betwe")."""
    from sparsebench.analyze.history_view import figure

    found = history.load_history([HISTORY], cells=cells)
    fig = figure(found)
    box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1, box
