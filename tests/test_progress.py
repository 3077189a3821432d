"""The per-cell progress line: the rate with its interval, and the windows' spread named as a
CV (a bare "±27%" read like an interval)."""

import io
import types

import pytest

from sparsebench.execute.progress import Progress, describe_record, wants_live
from sparsebench.record import Record


def _record(**fields) -> Record:
    return Record(cell_id="c", axes={}, status="ok", round=1, samples_per_sec=131_000.0,
                  windows=[128_000.0, 131_000.0, 135_000.0], step_ms_p50=7.8, auc=0.6, **fields)


def test_the_line_gives_the_interval_and_names_the_cv():
    line = describe_record(_record(samples_per_sec_low=127_500.0, samples_per_sec_high=134_900.0, cv=0.027))
    assert line.startswith("131k samples/s [128k-135k], CV 2.7% over 3 windows")
    assert "±" not in line


def test_a_record_without_an_interval_still_names_its_cv():
    line = describe_record(_record(cv=0.31))
    assert "131k samples/s, CV 31.0% over 3 windows" in line and "NOISY (CV 31.0%" in line


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def _cell(label: str = "els-b512-sgd-cpu"):
    return types.SimpleNamespace(label=label)


def test_off_a_terminal_a_heartbeat_names_the_cell_and_its_phase():
    clock, err, out = _Clock(), _Stream(False), _Stream(False)
    progress = Progress(4, out=out, err=err, heartbeat_s=30, clock=clock)
    cell = _cell()
    progress.start(cell)
    clock.now = 10
    progress.phase(cell, "starting the worker (importing TensorFlow)")
    assert err.getvalue() == ""  # not yet 30 s
    clock.now = 31
    progress.phase(cell, "starting the worker (importing TensorFlow)")
    clock.now = 45
    progress.phase(cell, "timing 5 windows")
    clock.now = 62
    progress.phase(cell, "timing 5 windows")
    lines = err.getvalue().splitlines()
    assert lines == ["... 0/4 done, 0:31 elapsed; running els-b512-sgd-cpu: starting the worker (importing "
                     "TensorFlow) for 21 s",
                     "... 0/4 done, 1:02 elapsed; running els-b512-sgd-cpu: timing 5 windows for 17 s"]
    progress.finish(cell, _record(cv=0.02))
    assert out.getvalue().startswith("[1/4] els-b512-sgd-cpu")
    progress.start(cell)
    clock.now = 93
    progress.phase(cell, "warm-up: 5 steps")
    assert "1/4 done, 1:33 elapsed, ETA 4:39" in err.getvalue().splitlines()[-1]


def test_quiet_has_no_heartbeat():
    clock, err = _Clock(), _Stream(False)
    progress = Progress(2, quiet=True, err=err, out=_Stream(False), heartbeat_s=1, clock=clock)
    progress.start(_cell())
    clock.now = 100
    progress.phase(_cell(), "timing")
    assert err.getvalue() == ""


@pytest.mark.parametrize("term, live", [("xterm-256color", True), ("dumb", False)])
def test_a_live_view_only_on_a_terminal_that_can_redraw(monkeypatch, term, live):
    monkeypatch.setenv("TERM", term)
    assert wants_live(_Stream(True)) is live
    assert wants_live(_Stream(False)) is False


def test_the_live_view_names_the_phase_and_respects_no_color(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("NO_COLOR", "1")
    err, out = _Stream(True), _Stream(False)
    progress = Progress(3, err=err, out=out)
    assert progress.live
    cell = _cell()
    progress.start(cell)
    progress.phase(cell, "quality: 40 steps (the first trace the graph)")
    progress._view.refresh()
    progress.finish(cell, _record(cv=0.02))
    progress._view.refresh()
    progress.close()
    drawn = err.getvalue()
    assert "quality: 40 steps" in drawn and "1/3" in drawn
    assert "\x1b[3" not in drawn and "\x1b[9" not in drawn  # no colour codes under NO_COLOR
    assert out.getvalue().startswith("[1/3] els-b512-sgd-cpu")  # results stay on stdout


@pytest.mark.parametrize("text", ["0", "-5", "ten", "nan", "inf"])
def test_an_invalid_heartbeat_interval_is_refused_by_name(text, monkeypatch):
    """It fell back to 30 s without a word: a user who set 0 or "ten" got the default."""
    from sparsebench.errors import ConfigError
    from sparsebench.execute.progress import heartbeat_seconds

    monkeypatch.setenv("SPARSEBENCH_HEARTBEAT_S", text)
    with pytest.raises(ConfigError, match=f"SPARSEBENCH_HEARTBEAT_S={text!r}"):
        heartbeat_seconds()


def test_a_valid_or_unset_heartbeat_interval_is_taken(monkeypatch):
    from sparsebench.execute.progress import HEARTBEAT_S, heartbeat_seconds

    monkeypatch.setenv("SPARSEBENCH_HEARTBEAT_S", "2.5")
    assert heartbeat_seconds() == 2.5
    monkeypatch.delenv("SPARSEBENCH_HEARTBEAT_S")
    assert heartbeat_seconds() == HEARTBEAT_S
