"""The per-cell progress line: the rate with its interval, and the windows' spread named as a
CV (a bare "±27%" read like an interval)."""

from sparsebench.execute.progress import describe_record
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
