"""The `sparsebench` command line. Never imports TensorFlow (workers do).

Every command shares one error path: a `UserError` becomes one line on stderr and exit 2,
with no traceback (asv's model). Exit codes: 0 success, 1 a cell failed or timed out,
2 bad input, 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from . import WORKER_PROTOCOL, __version__
from .errors import UserError
from .modules import module_command
from .execute.side import PROTOCOL as SIDE_PROTOCOL
from .plan.spec import DATA_FORMATS, DataSpec
from .results import VERSION as RESULTS_VERSION


# What every command shares, said once: under the command list of `sparsebench --help`,
# and in the docs (README "Commands"); tests/test_layout.py checks that both say it.
EPILOG = """\b
Exit codes, every command:
  0    done: every cell ok or skipped, no regression, the check passed
  1    run, profile, bound: a cell failed or timed out;
       ab, compare: a regression, or a cell that failed where
       the baseline measured it; history: the gate's ledger drifted
       beyond its bound; env --check: this machine is not fit to
       measure now; ops status: the op is not built
  2    bad input or nothing to decide (one line on stderr, no traceback)
  130  interrupted (finished cells are kept: --resume runs the rest)

\b
Conventions: -o/--output names a file where a command writes one (run, report,
history) and a folder where it writes several (ab, bisect, profile, bound);
--format chooses how a report is printed (table or text, markdown, csv, json,
html as the command offers); --json is JSON where --format names a data file's
format (data inspect) or there is no report (env); -q quiets progress where a
command has it. Figures printed come from the files read or the run just made.

\b
Requires Linux (process groups, /proc, fcntl locks) and Python 3.11+."""


def _plain_as(name: str):
    """--format's plain-text rendering answers to both "table" and "text" on every command
    (one convention); the command sees its own name for it."""
    return lambda ctx, param, value: name if value in ("table", "text") else value


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="sparsebench",
                      message=f"%(prog)s %(version)s (results format {RESULTS_VERSION}, worker protocol {WORKER_PROTOCOL}, "
                              f"side protocol {SIDE_PROTOCOL})")
def cli() -> None:
    """Benchmark and profile sparse linear layers and sparse ranking models in TensorFlow."""


@cli.command(short_help="Run a suite's cells, each in its own worker process.")
@click.option("--suite", "suite_arg", metavar="NAME|PATH", help="A shipped suite name or a TOML file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=V1[,V2...]",
              help="Override a matrix axis (batch_size=256,1024) or a setting (windows=3). Repeatable.")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Results file (default results/<suite>-<time>.jsonl).")
@click.option("--resume", type=click.Path(path_type=Path), help="Run only the cells missing or failed in this results file.")
@click.option("--processes", type=click.IntRange(min=1), metavar="N",
              help="Measure each cell in N fresh worker processes, in rounds (same as --set processes=N).")
@click.option("--isolation", type=click.Choice(["cell", "env"]), help="Override the suite's process isolation.")
@click.option("--allow-env-change", is_flag=True,
              help="With --resume: go on although this machine differs from the one that started the run.")
@click.option("--require-gpu", is_flag=True, help="Record GPU cells on a machine without a GPU as failed, not skipped.")
@click.option("--quiet", "-q", is_flag=True, help="No progress view or heartbeat; print only failures and the summary.")
@click.option("--verbose", "-v", is_flag=True, help="Stream each worker's log (TensorFlow's messages) to stderr.")
@click.option("--dry-run", is_flag=True, help="List the cells and exit.")
@click.option("--cluster", metavar="FILE",
              help="Run the parameter-server cells against this real cluster (JSON: {\"chief\": [this host:port], "
                   "\"ps\": [...], \"worker\": [...]}) instead of a local one per cell.")
def run(suite_arg, overrides, output, resume, processes, isolation, allow_env_change, require_gpu, quiet, verbose,
        dry_run, cluster):
    """Run a suite's cells, each in its own worker process, and record the results.

    On a terminal a live view names the running cell and its phase (starting the worker,
    quality steps, warm-up, timing, memory bound); off one a heartbeat line every 30 s
    (SPARSEBENCH_HEARTBEAT_S) shows life in a CI log. The first run on a machine also
    compiles the fused op (its time is printed)."""
    from .execute import runner
    from .execute.progress import heartbeat_seconds

    heartbeat_seconds()  # a bad SPARSEBENCH_HEARTBEAT_S is refused before anything is written
    overrides = list(overrides) + ([f"processes={processes}"] if processes is not None else [])
    if dry_run:
        if suite_arg is None:
            raise UserError("run --dry-run: give --suite")
        _, cells = runner.prepare(suite_arg, list(overrides), check_files=False)
        for cell in cells:
            click.echo(f"{cell.cell_id}")
        click.echo(f"{len(cells)} cells")
        return 0
    try:
        summary = runner.run(suite_arg=suite_arg, overrides=list(overrides), output=output, resume=resume, quiet=quiet,
                             require_gpu=require_gpu, isolation=isolation, allow_env_change=allow_env_change,
                             cluster=cluster, verbose=verbose)
    except KeyboardInterrupt:
        target = resume or output
        hint = f" with --resume {target}" if target else " with --resume <the results file above>"
        click.echo(f"\ninterrupted: finished cells are saved; complete the run{hint}", err=True)
        return 130
    click.echo(summary.line())
    if summary.busy_warning:
        click.echo(f"warning: {summary.busy_warning}", err=True)
    if summary.exit_code:
        click.echo(f"resume the failed cells with: sparsebench run --resume {summary.path}", err=True)
    return summary.exit_code


@cli.command()
@click.option("--cluster", metavar="FILE", help="The cluster (JSON, bare or TF_CONFIG-style); default: TF_CONFIG.")
@click.option("--task", metavar="JOB:N", help="This machine's task: ps:N or worker:N (with --cluster).")
@click.option("--intra-op-threads", type=click.IntRange(min=0), default=0, help="TensorFlow intra-op threads (0: default).")
@click.option("--inter-op-threads", type=click.IntRange(min=0), default=0, help="TensorFlow inter-op threads (0: default).")
@click.option("--custom-op", "custom_op", default="try", show_default=True, metavar="try|off|PATH",
              help="The fused op library, loaded before the server starts (fused_custom_op cells need it on every "
                   "task): try = build or load it where this machine can (a first build runs the compiler), else "
                   "serve the stock layouts only; off; or a library's path, which must load.")
def serve(cluster, task, intra_op_threads, inter_op_threads, custom_op):
    """Serve one task (PS or worker) of a real cluster until killed.

    TensorFlow's servers listen on every interface and authenticate nothing: run them only
    on a network you trust. The coordinating machine runs `sparsebench run --cluster FILE`."""
    import json
    import os
    import sys

    from .plan.cluster_file import check_ports_free, from_tf_config, parse_task, read_cluster

    if cluster is None and task is None:
        spec, task = from_tf_config()
    elif cluster is None or task is None:
        raise UserError("serve: give both --cluster FILE and --task ps:N (or neither, with TF_CONFIG)")
    else:
        spec = read_cluster(cluster)
    job, index = parse_task(task, spec)
    if custom_op not in ("try", "off"):
        _check_op_library(custom_op)
    check_ports_free(spec, job, index)
    command = module_command(sys.executable, "sparsebench.train.ps.cluster_task", "--cluster", json.dumps(spec),
                             "--task", task, "--intra-op-threads", str(intra_op_threads),
                             "--inter-op-threads", str(inter_op_threads), "--custom-op", custom_op)
    click.echo(f"serving {task} of {cluster or 'TF_CONFIG'} (TensorFlow starts in this process; Ctrl-C stops it)",
               err=True)
    os.execv(sys.executable, command)  # the task replaces this process: TensorFlow stays out of the CLI's code


def _check_op_library(path: str) -> None:
    """`serve --custom-op PATH`: a PATH that is no shared library is refused here, in one line
    with exit 2, before TensorFlow starts and logs (the task itself exits 3 for one that is
    an ELF file and still will not load: its coordinator reads that as "skip the cell")."""
    try:
        with open(path, "rb") as library:
            magic = library.read(4)
    except OSError as exc:
        raise UserError(f"serve --custom-op {path}: {exc.strerror.lower()}") from None
    if magic != b"\x7fELF":
        raise UserError(f"serve --custom-op {path}: not a shared library (no ELF header); give the fused op "
                        f"library's path (`sparsebench ops build` prints it), try or off")


@cli.group()
def data():
    """Write, describe or convert data files (libsvm, Criteo, TFRecord).

    Each command reads and writes libsvm, Criteo TSV, TFRecord and the blocks format."""


FEATURE_BITS = click.IntRange(1, 30)  # as DataSpec.validate


def _data_tool(action: str, path: str, options: dict, *more_paths: str) -> None:
    """Run the worker side's data tool (TFRecord needs TensorFlow), replacing this process:
    the options were checked here, so its errors are about the data, not the command line."""
    import os

    argv = [action, path, *more_paths]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.execv(sys.executable, module_command(sys.executable, "sparsebench.train.inputs.datatool", *argv))


@data.command("write", short_help="Write the synthetic generator's examples to PATH.")
@click.argument("path")
@click.option("--format", "fmt", type=click.Choice(DATA_FORMATS), required=True, help="The file format.")
@click.option("--examples", type=click.IntRange(min=1), required=True, help="How many examples.")
@click.option("--feature-bits", type=FEATURE_BITS, default=DataSpec.feature_bits, show_default=True,
              help="Keys modulo 2**B.")
@click.option("--mean-active", type=click.FloatRange(min=0, min_open=True, max=1e6), default=DataSpec.mean_active,
              show_default=True, help="Mean active features per example.")
@click.option("--zipf-exponent", type=click.FloatRange(min=0, max=100), default=DataSpec.zipf_exponent,
              show_default=True,
              help="Key popularity ~ 1 / rank**S.")
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=0, show_default=True,
              help="The generator's seed.")
@click.option("--gzip", is_flag=True, help="Compress (also implied by a .gz name).")
@click.option("--force", is_flag=True, help="Replace PATH if it exists.")
def data_write(path, fmt, examples, feature_bits, mean_active, zipf_exponent, seed, gzip, force):
    """Write the synthetic generator's examples to PATH (to try a file source, and for tests)."""
    _data_tool("write", path, {"format": fmt, "examples": examples, "feature_bits": feature_bits,
                               "mean_active": mean_active, "zipf_exponent": zipf_exponent, "seed": seed, "gzip": gzip,
                               "force": force})


@data.command("inspect", short_help="Describe a data file in the generator's terms.")
@click.argument("path")
@click.option("--format", "fmt", type=click.Choice(DATA_FORMATS), required=True, help="The file format.")
@click.option("--feature-bits", type=FEATURE_BITS, default=DataSpec.feature_bits, show_default=True,
              help="Keys modulo 2**B.")
@click.option("--limit", type=click.IntRange(min=1), help="Read at most N examples.")
@click.option("--ids-feature", default="ids", show_default=True, help="TFRecord: the int64 ids feature.")
@click.option("--values-feature", default="values", show_default=True, help="TFRecord: the float values feature.")
@click.option("--label-feature", default="label", show_default=True, help="TFRecord: the float label feature.")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def data_inspect(path, fmt, feature_bits, limit, ids_feature, values_feature, label_feature, as_json):
    """Describe a data file in the generator's terms (active features, Zipf exponent, values),
    so the generator can be set to mimic it."""
    _data_tool("inspect", path, {"format": fmt, "feature_bits": feature_bits, "limit": limit,
                                 "ids_feature": ids_feature, "values_feature": values_feature,
                                 "label_feature": label_feature, "json": as_json})


@data.command("convert", short_help="Convert SRC to the binary blocks format.")
@click.argument("src")
@click.argument("dst")
@click.option("--format", "fmt", type=click.Choice([f for f in DATA_FORMATS if f != "blocks"]), required=True,
              help="SRC's format (plain or gzip; a glob reads its files in sorted order).")
@click.option("--feature-bits", type=FEATURE_BITS, default=DataSpec.feature_bits, show_default=True,
              help="Keys modulo 2**B (cells with fewer bits can read the file; more cannot).")
@click.option("--block-examples", type=click.IntRange(min=1, max=1 << 20), default=256, show_default=True,
              help="Examples per block.")
@click.option("--ids-feature", default="ids", show_default=True, help="TFRecord: the int64 ids feature.")
@click.option("--values-feature", default="values", show_default=True, help="TFRecord: the float values feature.")
@click.option("--label-feature", default="label", show_default=True, help="TFRecord: the float label feature.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
def data_convert(src, dst, fmt, feature_bits, block_examples, ids_feature, values_feature, label_feature, force):
    """Convert SRC to the binary blocks format (the fastest input path): examples as raw
    arrays a block at a time; SRC's malformed lines are counted and named in DST's header."""
    _data_tool("convert", src, {"format": fmt, "feature_bits": feature_bits, "block_examples": block_examples,
                                "ids_feature": ids_feature, "values_feature": values_feature,
                                "label_feature": label_feature, "force": force}, dst)


@cli.command()
def suites():
    """List the shipped suites with their cell counts."""
    from .plan.suite import load_suite, shipped_suites

    rows = []
    for name in sorted(shipped_suites()):
        suite = load_suite(name)
        rows.append((name, len(suite.cells()), suite.description))
    width = max(len(r[0]) for r in rows)
    click.echo(f"{'suite':<{width}}  cells  description")
    for name, count, description in rows:
        click.echo(f"{name:<{width}}  {count:>5}  {description}")
    return 0


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the fingerprint as JSON.")
@click.option("--check", is_flag=True,
              help="Instead: watch the machine for --seconds and say whether it is fit to measure now (other "
                   "processes, steal, iowait, load average, frequency governor); exit 1 when it is not.")
@click.option("--seconds", type=click.FloatRange(0.1, 60), default=2.0, show_default=True,
              help="--check: how long to watch.")
def env(as_json, check, seconds):
    """Print the environment fingerprint stored with every run."""
    if check:
        return _env_check(seconds, as_json)
    from .execute.env import fingerprint

    info = fingerprint()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return 0
    tf = info.get("tensorflow", {})
    gpus = ", ".join(f"{g['name']} ({g['memory_total_mb']} MiB, driver {g['driver']})" for g in info["gpus"]) or "none"
    lines = [
        ("CPU", info["cpu"]["model"]),
        ("CPU flags", " ".join(info["cpu"].get("key_flags", []))),
        ("cores", f"{info['cores_available']} available, {info['cores_logical']} logical, {info['cores_physical']} physical"),
        ("memory", f"{info['memory']['total_gb']} GiB"),
        ("GPUs (NVML)", gpus),
        ("TensorFlow", tf.get("version", tf.get("error", "?"))),
        ("TF oneDNN build", tf.get("onednn_built")),
        ("TF CUDA build", tf.get("build", {}).get("is_cuda_build")),
        ("TF GPUs visible", ", ".join(tf.get("gpus_visible", [])) or "none"),
        ("Python", info["python"]),
        ("OS", info["os"]),
    ]
    for key, value in lines:
        click.echo(f"{key + ':':<17} {value}")
    return 0


def _env_check(seconds: float, as_json: bool) -> int:
    """`env --check`: pyperf's `system show` for this tool, in a few lines and an exit code."""
    from dataclasses import asdict

    from .load import BUSY_CORES, check_machine

    found = check_machine(seconds)
    if as_json:
        click.echo(json.dumps({**asdict(found), "fit": found.fit}, indent=2))
        return 0 if found.fit else 1
    load, averages, freq = found.load, found.load_average, found.frequency
    if load is not None:
        click.echo(f"over {load.seconds:.1f} s: other processes {load.other_cores:.2f} cores, steal "
                   f"{load.steal_cores:.2f}, iowait {load.iowait_cores:.2f} (of {load.cores}; busy from "
                   f"{BUSY_CORES:g})")
    if averages is not None:
        click.echo(f"load average: {averages[0]:.2f} {averages[1]:.2f} {averages[2]:.2f} (1, 5, 15 minutes)")
    click.echo(f"frequency: governor {', '.join(freq.governors) or 'not readable'}"
               + (f", {freq.current_mhz:.0f} of {freq.max_mhz:.0f} MHz" if freq.ratio is not None else ""))
    for name, pid, cores in found.busiest:
        click.echo(f"busy: {name} (pid {pid}) {cores:.2f} cores")
    for note in found.notes:
        click.echo(f"note: {note}")
    for problem in found.problems:
        click.echo(f"NOT FIT: {problem}")
    click.echo("fit to measure" if found.fit else "not fit to measure: figures taken now are likely low and noisy")
    return 0 if found.fit else 1


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["table", "text", "markdown", "csv", "json", "html"]), default="table",
              callback=_plain_as("table"),
              show_default=True, help="json: one object per cell with stable keys, whatever the view.")
@click.option("--view", type=click.Choice(["talk", "matrix", "pivot", "best", "ops", "traffic", "projection"]),
              help="Default: ops for profiles, talk for a gpu-vs-cpu run, matrix otherwise.")
@click.option("--rows", help="pivot: the axis down the side (e.g. batch_size).")
@click.option("--cols", help="pivot: the axis across the top (e.g. variant).")
@click.option("--metric", default="samples_per_sec", show_default=True, help="pivot: the value shown.")
@click.option("--where", "conditions", multiple=True, metavar="AXIS=V1[,V2]",
              help="Keep only matching cells (e.g. variant=embedding_lookup_sparse). Repeatable.")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write here instead of stdout (html: the page).")
@click.option("--plots", type=click.Path(path_type=Path), help="Also write PNG and SVG plots into this folder.")
@click.option("--network", metavar="GBIT[,GBIT]", help="projection: link speeds in Gbit/s (default 10,25).")
@click.option("--ps", "ps_counts", metavar="N[,N]", help="projection: PS task counts (default 4,8,16).")
@click.option("--workers", "worker_counts", metavar="N[,N]", help="projection: worker task counts (default 4,16,64).")
@click.option("--task-cores", type=click.FloatRange(min=0, min_open=True), metavar="CORES",
              help="projection: cores of each task's machine (default: the profiled machine's).")
def report(paths, fmt, view, rows, cols, metric, conditions, output, plots, network, ps_counts, worker_counts,
           task_cores):
    """Tables, plots and an HTML page from one or more results files."""
    from .analyze import report as reporting

    settings = None
    if view == "projection":
        from .analyze import projection

        settings = projection.Settings(
            ps=projection.parse_counts(ps_counts, projection.DEFAULT_PS, "ps"),
            workers=projection.parse_counts(worker_counts, projection.DEFAULT_WORKERS, "workers"),
            network_gbit=projection.parse_counts(network, projection.DEFAULT_NETWORK_GBIT, "network", float),
            task_cores=task_cores)
    elif any(option is not None for option in (network, ps_counts, worker_counts, task_cores)):
        raise UserError("report: --network, --ps, --workers and --task-cores belong to --view projection")
    loaded = reporting.load(list(paths))
    if conditions:
        loaded = reporting.filter_rows(loaded, list(conditions))
    for warning in loaded.warnings:
        click.echo(f"warning: {warning}", err=True)
    written = []
    if plots is not None or fmt == "html":
        from .analyze.plots import write_plots

        written = write_plots(loaded, plots) if plots is not None else []
        if plots is not None and not written:
            from .analyze.plots import PLOTS_NEED

            click.echo(f"note: no plot written to {plots}: these results have none of what a plot compares "
                       f"({', '.join(PLOTS_NEED)}) among their ok cells", err=True)
    if fmt == "html":
        from .analyze.html import render_html

        text = render_html(loaded, view, rows, cols, metric, settings)
    else:
        text = reporting.render(loaded, fmt, view, rows, cols, metric, settings)
    if output is not None:
        _write_text(output, text, "report")
    else:
        click.echo(text)
    for path in written:
        click.echo(f"wrote {path}", err=True)
    return 0


def gate_options(alpha: float, regression_help: str, max_regression: float = 10.0):
    """The options `compare` and `ab` share: how a verdict is reached and how it is shown."""
    def wrap(command):
        for option in reversed([
            click.option("--max-regression", default=max_regression, show_default=True, metavar="PCT",
                         help=regression_help),
            click.option("--alpha", default=alpha, show_default=True, help="Significance level of the test."),
            click.option("--format", "fmt", type=click.Choice(["table", "text", "markdown", "json"]), default="table",
                         callback=_plain_as("table"),
                         show_default=True),
            click.option("--github-benchmark", type=click.Path(path_type=Path),
                         help="Also write the current (B) side in github-action-benchmark's customBiggerIsBetter "
                              "JSON."),
        ]):
            command = option(command)
        return command
    return wrap


def _emit(reports, fmt: str, github_benchmark: Path | None, current, fail_on: str = "any",
          json_file: Path | None = None) -> int:
    """Print the reports (wall time, then CPU time where measured); exit 1 if any fails
    (`fail_on` "suite": only a suite-level regression or a failed cell counts), 2 if one
    compared nothing. `json_file`: the JSON rendering also goes there."""
    from .analyze.difference import github_benchmark as benchmark_json
    from .analyze.difference import render_all

    click.echo(render_all(reports, fmt))
    if json_file is not None:
        _write_text(json_file, render_all(reports, "json"), "the comparison's JSON")
    if github_benchmark is not None:
        try:
            github_benchmark.write_text(json.dumps(benchmark_json(current), indent=2))
        except OSError as exc:
            raise UserError(f"{github_benchmark}: cannot write: {exc.strerror}") from None
    unchecked = next((r.unchecked() for r in reports if r.unchecked()), None)
    if unchecked:  # a comparison that could not run: the project's one-line error, after its table
        click.echo(f"sparsebench: error: nothing compared: {unchecked}", err=True)
    return max(report.exit_code_for(fail_on) for report in reports)


@cli.command(short_help="Gate two stored runs; exit 1 if CURRENT regressed.")
@click.argument("baseline", type=click.Path(path_type=Path))
@click.argument("current", type=click.Path(path_type=Path))
@gate_options(0.01, "Slowdown (percent of the baseline median) a cell must exceed to regress.")
@click.option("--noise-factor", default=None, type=float, metavar="F",
              help="How much a cell measured in one process must change beyond the shared shift, either way, to "
                   "be flagged (its run-to-run noise is unknown). Default 2: it must halve or double.")
@click.option("--max-shift", default=None, type=float, metavar="PCT",
              help="Change shared by all cells that counts as a regression of the whole run. Default 20.")
@click.option("--strict-env", is_flag=True, help="Refuse to compare runs whose environment fingerprints differ.")
def compare(baseline, current, max_regression, alpha, fmt, github_benchmark, noise_factor, max_shift, strict_env):
    """Gate on throughput: exit 1 if a cell of CURRENT regressed against BASELINE (two stored runs)."""
    from .analyze import compare as comparing
    from .results import read_results

    base, cur = read_results(baseline), read_results(current)
    for warning in base.warnings + cur.warnings:
        click.echo(f"warning: {warning}", err=True)
    factor = comparing.STORED_NOISE_FACTOR if noise_factor is None else noise_factor
    shift = comparing.STORED_MAX_SHIFT if max_shift is None else max_shift / 100.0
    reports = [comparing.difference_report(base, cur, max_regression=max_regression / 100.0, alpha=alpha,
                                           noise_factor=factor, max_shift=shift, metric=metric)
               for metric in comparing.metrics_in(base, cur)]
    if strict_env and reports[0].environment_warnings:
        raise UserError("--strict-env: " + "; ".join(reports[0].environment_warnings))
    for later in reports[1:]:
        later.environment_warnings = []  # the same machines: said once, above the first table
    from .load import busy_warning

    reports[0].power_warnings += [w for w in (busy_warning(base.latest(), f"baseline {baseline}"),
                                              busy_warning(cur.latest(), f"current {current}")) if w]
    return _emit(reports, fmt, github_benchmark, cur)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "table", "markdown", "json", "html"]), default="text",
              callback=_plain_as("text"),
              show_default=True)
@click.option("--cells", "cells", multiple=True, metavar="PATTERN",
              help="Only cells whose label or id matches (shell pattern, e.g. 'fused*'). Repeatable.")
@click.option("--since", metavar="DATE|COMMIT", help="Only results from this date (YYYY-MM-DD) or commit on.")
@click.option("--repo", type=click.Path(path_type=Path, file_okay=False), default=".", show_default=True,
              help="A git checkout that knows the commits, for results whose header has no commit time.")
@click.option("--alpha", default=0.01, show_default=True, help="Significance level a step must reach (Holm).")
@click.option("--min-step", default=3.0, show_default=True, metavar="PCT",
              help="The smallest step reported, in percent.")
@click.option("--skip-busy", is_flag=True,
              help="Leave out measurements taken on a busy machine (other processes, steal or iowait of half a core "
                   "or more); each is named in a warning.")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write here instead of stdout.")
@click.option("--plots", type=click.Path(path_type=Path), help="Also write history.png and history.svg here.")
def history(paths, fmt, cells, since, repo, alpha, min_step, skip_busy, output, plots):
    """Each cell's samples/s across commits, and the steps in it.

    PATHS are results files or folders of them (searched for *.jsonl), one or more per
    commit: a nightly job's `results/`. Each file is placed on the commit its header names
    (ordered by commit time); several files of one commit are its processes. A step is a
    level change proposed by PELT and confirmed by testing the commits on its two sides
    against step-free series of their length; it needs two commits on each side. Reading a
    few dozen files takes seconds.

    PATHS may instead be the self-gate's ledger (results/gate/, one *.json per landing):
    then each landing's measured change against its reference is chained from the newest
    back, and the cumulative change of every tier is checked against its bound (exit 1 on
    drift, 2 when an entry is missing in between)."""
    from .analyze.drift import entries_in
    from .analyze.history import load_history
    from .analyze.history_view import render, write_plot

    ledger = entries_in(list(paths))
    if ledger:
        return _history_of_ledger(ledger, repo, fmt, output)
    patterns = [p for c in cells for p in c.split(",") if p]
    found = load_history(list(paths), cells=patterns, since=since, repo=repo, alpha=alpha, min_step=min_step / 100,
                         skip_busy=skip_busy)
    for warning in found.warnings:
        click.echo(f"warning: {warning}", err=True)
    text = render(found, fmt)
    if output is not None:
        _write_text(output, text, "history")
    else:
        click.echo(text)
    if plots is not None:
        try:
            written = write_plot(found, plots)
        except OSError as exc:
            raise UserError(f"{plots}: cannot write plots: {exc.strerror}") from None
        for path in written:
            click.echo(f"wrote {path}", err=True)
    return 0


def _history_of_ledger(paths: list[Path], repo: Path, fmt: str, output: Path | None) -> int:
    """`history` over the gate's ledger (results/gate/*.json): the landings chained from the
    newest back, and the cumulative change of every tier; exit 1 on drift beyond its bound,
    2 when the chain cannot reach the newest entry's reference."""
    from .analyze.drift import drift, read_entry
    from .execute.commits import changed_paths, first_parents

    entries = [read_entry(p) for p in paths]
    order = {commit: i for i, commit in enumerate(first_parents(repo))}
    newest = min(entries, key=lambda e: (order.get(e.commit, len(order)), -_stamp(e.recorded_at)))
    found = drift(newest, entries, lambda a, b: changed_paths(repo, a, b))
    if fmt == "json":
        text = json.dumps({"chain": [e.commit for e in found.chain], "problems": found.problems, "notes": found.notes,
                           "trends": [{"tier": t.tier, "metric": t.metric, "cell": t.cell, "change": t.total,
                                       "landings": len(t.landings), "bound": t.bound, "p": t.p_adjusted,
                                       "drifted": t.drifted, "restarted_after": t.restarted_after}
                                      for t in found.trends]}, indent=2)
    elif fmt in ("text", "markdown"):
        text = "\n".join(found.lines())
    else:
        raise UserError(f"history --format {fmt}: the gate's ledger is shown as text, markdown or json")
    if output is not None:
        _write_text(output, text, "history")
    else:
        click.echo(text)
    return found.exit_code


def _stamp(text: str) -> float:
    from datetime import datetime

    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return 0.0


def _write_text(output: Path, text: str, what: str) -> None:
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    except OSError as exc:
        raise UserError(f"{output}: cannot write {what}: {exc.strerror}") from None
    click.echo(f"wrote {output}", err=True)


@cli.command(short_help="Interleaved A/B on this machine; exit 1 if B regressed.")
@click.option("--suite", "suite_arg", default="gate", show_default=True, metavar="NAME|PATH",
              help="A shipped suite name or a TOML file (gate: every variant and optimizer, sized for CI).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=V1[,V2...]", help="Override for both sides.")
@click.option("--a-set", "a_overrides", multiple=True, metavar="KEY=V", help="Override for side A only.")
@click.option("--b-set", "b_overrides", multiple=True, metavar="KEY=V", help="Override for side B only.")
@click.option("--a-python", metavar="PATH", help="Interpreter of side A (default: this one).")
@click.option("--b-python", metavar="PATH", help="Interpreter of side B (default: this one).")
@click.option("--rounds", default=4, show_default=True, type=click.IntRange(min=2),
              help="Rounds, each measuring every cell on both sides (A B, B A, A B, ...).")
@click.option("--test", "test", type=click.Choice(["t", "wilcoxon"]), default="t", show_default=True,
              help="Paired test over the rounds, on the log ratios B/A.")
@click.option("--interleave", type=click.Choice(["cell", "suite"]), default="cell", show_default=True,
              help="cell: the sides take turns cell by cell (both interpreters must run this sparsebench's "
                   "worker protocol; else it falls back to suite); suite: each side runs the whole suite per round.")
@gate_options(0.05, "Slowdown of B (percent of A) a cell must exceed to regress (its test Holm-adjusted over the "
                    "cells).", max_regression=5.0)
@click.option("--max-suite-regression", default=2.0, show_default=True, metavar="PCT",
              help="Slowdown of the whole suite (geometric mean of the cells) that regresses it.")
@click.option("--suite-alpha", default=0.01, show_default=True,
              help="Significance level of the suite-level test.")
@click.option("--mode-floor", default=20.0, show_default=True, metavar="PCT",
              help="A process that ran slower than side A's median by more than this is slow.")
@click.option("--mode-alpha", default=0.005, show_default=True,
              help="A cell where B had more slow processes than A (at least 2; Fisher's exact test at this level) "
                   "regressed: a slow mode B alone has.")
@click.option("--fail-on", type=click.Choice(["any", "suite"]), default="any", show_default=True,
              help="any: exit 1 on a regressed cell (its mean change or a slow mode) or suite; suite: only on the "
                   "suite-level test (and on a cell B failed).")
@click.option("--count", "counted", is_flag=True,
              help="The counted tier instead: each side's cells under valgrind's callgrind (one thread, fixed "
                   "steps), gated on instructions and estimated cycles per example.")
@click.option("--count-steps", default=5, show_default=True, type=click.IntRange(min=1),
              help="--count: train steps counted per cell (after uncounted warm-up).")
@click.option("--count-threshold", default=1.0, show_default=True, metavar="PCT",
              help="--count: change of a cell's (or the suite's) instructions per example that is a finding.")
@click.option("--cycles-threshold", default=None, type=float, metavar="PCT",
              help="--count: also gate on estimated cycles beyond this change. Off by default: their simulated "
                   "cache misses vary with where memory lands, so A/A runs move them far more than instructions "
                   "(README, \"Comparing runs in CI\", has the measured spread); the cycles table is printed "
                   "either way.")
@click.option("--output", "-o", type=click.Path(path_type=Path),
              help="Folder for both sides' results and logs (default results/ab-<suite>-<time>).")
@click.option("--json", "json_file", type=click.Path(path_type=Path),
              help="Also write the comparison as JSON (the --format json document) to this file.")
@click.option("--cells", "cell_patterns", multiple=True, metavar="PATTERN",
              help="Only cells whose id or label matches (shell pattern, e.g. 'fused-*'). Repeatable.")
@click.option("--count-also", "count_also", multiple=True, metavar="SUITE@PATTERN",
              help="--count: also count this suite's cells that match PATTERN, in the same workers (one valgrind "
                   "start-up for all). Repeatable.")
@click.option("--cycles-cells", "cycles_cells", multiple=True, metavar="PATTERN",
              help="--count --cycles-threshold: gate estimated cycles only for these cells (the others shown).")
def ab(suite_arg, overrides, a_overrides, b_overrides, a_python, b_python, rounds, test, interleave, max_regression,
       alpha, fmt, github_benchmark, max_suite_regression, suite_alpha, mode_floor, mode_alpha, fail_on, counted,
       count_steps, count_threshold, cycles_threshold, output, json_file, cell_patterns, count_also, cycles_cells):
    """Interleaved A/B comparison on this machine: exit 1 if side B regressed against side A
    (a cell, or the suite as a whole; in wall time or in CPU time)."""
    from .analyze.paired import METRICS, check_options, paired_report
    from .execute import ab as ab_runner
    from .machine import side_differences
    from .results import read_results

    decision = dict(max_regression=max_regression / 100.0, alpha=alpha, test=test, suite_alpha=suite_alpha,
                    max_suite_regression=max_suite_regression / 100.0, mode_floor=mode_floor / 100.0,
                    mode_alpha=mode_alpha)
    check_options(**decision)
    a = ab_runner.Side("A", ab_runner.python_of(a_python), list(a_overrides))
    b = ab_runner.Side("B", ab_runner.python_of(b_python), list(b_overrides))
    folder = output or ab_runner.default_folder(suite_arg)
    patterns = tuple(p for c in cell_patterns for p in c.split(",") if p)
    if (count_also or cycles_cells) and not counted:
        raise UserError("--count-also and --cycles-cells belong to the counted tier: add --count")
    if counted:
        return _ab_counted(suite_arg, list(overrides), a, b, folder, count_steps, patterns, tuple(count_also),
                           tuple(cycles_cells),
                           {"instructions": count_threshold / 100.0,
                            "cycles": cycles_threshold / 100.0 if cycles_threshold is not None else None}, fmt,
                           github_benchmark, fail_on, json_file)
    notes = []
    launchers = {side.name: ab_runner.side_launcher(side.python) for side in (a, b)} if interleave == "cell" else {}
    if interleave == "cell" and not all(launchers.values()):
        interleave = "suite"
        notes.append("a side's sparsebench cannot host a side server (an older version): each side ran its own "
                     "`sparsebench run` of the whole suite per round, so the two halves of a pair are a suite apart")
    notes += [f"side {name}'s sparsebench predates the side server: it ran this sparsebench's side server against its "
              f"own installation (its own orchestrator, worker defaults and cells)"
              for name, launcher in launchers.items() if launcher is not None and launcher.shipped]
    if patterns and interleave != "cell":
        raise UserError("ab --cells: picking cells needs both sides' side servers (--interleave cell, a sparsebench "
                        "with the side protocol on both sides)")
    try:
        if interleave == "cell":
            run = ab_runner.run_interleaved(suite_arg=suite_arg, overrides=list(overrides), a=a, b=b, rounds=rounds,
                                            folder=folder, launchers=launchers, cells=patterns)
        else:
            run = ab_runner.run_ab(suite_arg=suite_arg, overrides=list(overrides), a=a, b=b, rounds=rounds,
                                   folder=folder)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: the finished rounds' files are in {folder}", err=True)
        return 130
    side_a, side_b = read_results(run.results["A"]), read_results(run.results["B"])
    measured = [m for m in METRICS if m == "wall" or any(r.cpu_samples_per_sec for r in side_a.records + side_b.records)]
    reports = [paired_report(side_a, side_b, aa=ab_runner.identical(a, b), metric=m, **decision) for m in measured]
    reports[0].side_differences = side_differences(side_a.header, side_b.header)
    order = " ".join(run.order[:8]) + (" ..." if len(run.order) > 8 else "")
    reports[0].notes += notes + [f"{rounds} rounds in {run.seconds / 60:.1f} min, interleaved by {interleave}, order "
                                 f"{order}; A: {a.describe()}; B: {b.describe()}; results: {run.results['A']} and "
                                 f"{run.results['B']}"]
    return _emit(reports, fmt, github_benchmark, side_b, fail_on, json_file)


def _ab_counted(suite_arg, overrides, a, b, folder, steps, patterns, also, cycles_cells, thresholds, fmt,
                github_benchmark, fail_on, json_file) -> int:
    from .analyze.counted import COUNTED_METRICS, counted_report
    from .execute import ab as ab_runner
    from .machine import side_differences
    from .results import read_results

    for option, metric in (("--count-threshold", "instructions"), ("--cycles-threshold", "cycles")):
        if thresholds[metric] is not None and not 0 < thresholds[metric] < 1:
            raise UserError(f"{option}: must be between 0 and 100 percent, got {thresholds[metric] * 100:g}")
    try:
        run = ab_runner.run_counted(suite_arg=suite_arg, overrides=overrides, a=a, b=b, folder=folder, steps=steps,
                                    cells=patterns, also=also)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: the counted cells' files are in {folder}", err=True)
        return 130
    side_a, side_b = read_results(run.results["A"]), read_results(run.results["B"])
    differences = side_differences(side_a.header, side_b.header)
    reports = [counted_report(side_a, side_b, metric=m, threshold=thresholds[m] or 0.01, gated=thresholds[m] is not None,
                              gated_cells=cycles_cells if m == "cycles" else ())
               for m in ("instructions", "cycles")]
    assert set(COUNTED_METRICS) == {r.metric for r in reports}
    reports[0].side_differences = differences
    reports[0].notes += [f"side {name}'s sparsebench predates the side server: it ran this sparsebench's side server "
                         f"against its own installation" for name in run.shipped]
    reports[0].notes.append(f"counted {steps} steps per cell on one thread under callgrind, both sides at once, in "
                            f"{run.seconds / 60:.1f} min; A: {a.describe()}; B: {b.describe()}; results: "
                            f"{run.results['A']} and {run.results['B']}")
    return _emit(reports, fmt, github_benchmark, side_b, fail_on, json_file)


@cli.command(short_help="The first commit between GOOD and BAD that made cells slower.")
@click.argument("good")
@click.argument("bad")
@click.option("--suite", "suite_arg", default="gate", show_default=True, metavar="NAME|PATH",
              help="The suite each comparison runs (a shipped name or a TOML file).")
@click.option("--cells", "cell_patterns", multiple=True, metavar="PATTERN",
              help="Only cells whose id or label matches (shell pattern). Repeatable.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=V", help="Override for every comparison.")
@click.option("--rounds", default=6, show_default=True, type=click.IntRange(min=2),
              help="Rounds of each timed comparison (when the counted tier sees no change).")
@click.option("--count-steps", default=3, show_default=True, type=click.IntRange(min=1),
              help="Steps counted per cell in each counted comparison.")
@click.option("--no-count", is_flag=True, help="Bisect with the time tier only (no valgrind).")
@click.option("--repo", type=click.Path(path_type=Path, file_okay=False), default=".", show_default=True,
              help="The sparsebench checkout whose commits are bisected.")
@click.option("--output", "-o", type=click.Path(path_type=Path),
              help="Folder for every comparison's results and logs (default results/bisect-<time>).")
def bisect(good, bad, suite_arg, cell_patterns, overrides, rounds, count_steps, no_count, repo, output):
    """The first commit between GOOD and BAD that made the suite's cells slower.

    Installs the commits it needs in venvs of their own (cached under
    ~/.cache/sparsebench/commits, with this interpreter's package versions), chooses the
    counted tier when instructions moved between GOOD and BAD and the time tier otherwise,
    and bisects the first-parent commits in at most ceil(log2 N) + 2 comparisons, printing
    each; for a counted culprit, the functions whose cost changed against its parent."""
    from .analyze.gate import slower
    from .execute.bisect import bisect as run_bisect
    from .execute.bisect import render

    folder = (output or Path("results") / f"bisect-{__import__('time').strftime('%Y%m%d-%H%M%S')}").resolve()
    patterns = tuple(p for c in cell_patterns for p in c.split(",") if p)
    found = run_bisect(repo.resolve(), good, bad, suite=suite_arg, judge=slower, cells=patterns, overrides=list(overrides),
                       rounds=rounds, count_steps=count_steps, work=folder, use_counted=not no_count)
    click.echo(render(found, repo.resolve()))
    return 0


@cli.command(short_help="Profile each cell's train step op by op (TensorBoard).")
@click.option("--suite", "suite_arg", required=True, metavar="NAME|PATH", help="A shipped suite name or a TOML file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=V1[,V2...]", help="Override an axis or setting.")
@click.option("--steps", default=20, show_default=True, help="Steady-state steps profiled per cell (after warm-up).")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Folder (default results/profile-<suite>-<time>).")
@click.option("--isolation", type=click.Choice(["cell", "env"]), help="Override the suite's process isolation.")
@click.option("--top", default=12, show_default=True, help="Ops shown per cell.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def profile(suite_arg, overrides, steps, output, isolation, top, quiet):
    """Profile each cell's training step op by op (TensorBoard profile, Chrome trace, op tables)."""
    from .analyze import profile as profiling
    from .execute import runner

    folder, profiled, summary = runner.profile(suite_arg=suite_arg, overrides=list(overrides), steps=steps,
                                               output=output, quiet=quiet, isolation=isolation)
    ok = [(cell, record) for cell, record in profiled if record.ok]
    for cell, record in ok:
        click.echo("")
        click.echo(profiling.format_cell(record.profile, cell.label, top))
        sizes = sorted((record.variables_mb or {}).items(), key=lambda kv: kv[1], reverse=True)[:3]
        memory = ", ".join(f"{name} {mb:.1f} MB" for name, mb in sizes)
        gpu = f", GPU peak {record.gpu_peak_mb:.0f} MB" if record.gpu_peak_mb is not None else ""
        click.echo(f"  memory: peak RSS {record.peak_rss_mb:.0f} MB{gpu}; largest variables: {memory}")
    if len(ok) > 1:
        click.echo("")
        click.echo(profiling.format_side_by_side([(cell.label, record.profile) for cell, record in ok], top))
    click.echo("")
    click.echo(f"profiles in {folder}/<cell>/ (TensorBoard: tensorboard --logdir {folder}/<cell>; "
               f"trace.json opens in ui.perfetto.dev); {summary.line()}")
    return summary.exit_code


@cli.command(short_help="Each cell's memory bound, its layer's memory traffic alone.")
@click.option("--suite", "suite_arg", required=True, metavar="NAME|PATH", help="A shipped suite name or a TOML file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=V1[,V2...]", help="Override an axis or setting.")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Folder (default results/bound-<suite>-<time>).")
@click.option("--isolation", type=click.Choice(["cell", "env"]), help="Override the suite's process isolation.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def bound(suite_arg, overrides, output, isolation, quiet):
    """Each cell's memory bound: the samples/s its layer's memory traffic alone allows.

    Replays the cell's own batches (forward row reads, each distinct key's rows read and
    written as its optimizer does) with the cell's threads, in a worker, training nothing.
    `run` measures the same bound after every cell's windows; `report` shows each cell's
    share of it."""
    from .execute import runner

    folder, measured, summary = runner.bound(suite_arg=suite_arg, overrides=list(overrides), output=output,
                                             quiet=quiet, isolation=isolation)
    rows = [(cell.label, record) for cell, record in measured if record.ok]
    if rows:
        width = max(len(label) for label, _ in rows)
        click.echo(f"{'cell':<{width}}  {'bound samples/s':>16}  {'bytes/sample':>12}  {'GB/s':>6}  passes")
        for label, record in rows:
            rates = record.bound_windows or []
            click.echo(f"{label:<{width}}  {record.bound_samples_per_sec:>16,.0f}  "
                       f"{record.bound_bytes_per_sample:>12,.0f}  {record.bound_gb_per_sec:>6.2f}  "
                       f"{len(rates)} ({min(rates):,.0f}-{max(rates):,.0f})")
    click.echo(f"records in {folder / 'results.jsonl'}; {summary.line()}")
    return summary.exit_code


@cli.group(short_help="The fused custom op: build it, or say why it is not built.")
def ops():
    """The fused custom op: build it ahead of time, or say whether it is built."""


@ops.command("build", short_help="Compile the fused custom op into the per-user cache.")
@click.option("--target", type=click.Choice(["native", "portable"]), default=None,
              help="native: -march=native (the default); portable: -mavx2 -mfma, for a library copied to other "
                   "x86-64 machines. Runs use the target SPARSEBENCH_OPS_TARGET names; this option sets it for "
                   "this build only.")
@click.option("--force", is_flag=True, help="Compile again even if the cache holds a library (after a compiler change).")
def ops_build(target, force):
    """Compile the fused custom op into the per-user cache (once per TensorFlow build, target and CPU)."""
    from .execute.custom_op import custom_op

    if target is not None:
        os.environ["SPARSEBENCH_OPS_TARGET"] = target
    info = custom_op("build", force=force)
    if not info.get("ok"):
        log = f" (compiler log: {info['log']})" if info.get("log") else ""
        raise UserError(f"custom op unavailable: {info.get('reason')}{log}")
    how = "already built" if info.get("cached") else f"compiled in {info.get('compile_seconds') or 0:.1f} s"
    if info.get("replaced"):
        how += f"; replaced a damaged cached library: {info['replaced']}"
    flags = " ".join(info.get("flags") or [])
    click.echo(f"{info['library']} ({how}, compiler {info.get('compiler')}, target {info.get('target')}: {flags})")
    return 0


@ops.command("status", short_help="Say whether the fused custom op is built here, or why not.")
def ops_status():
    """Say whether the fused custom op is built for this machine, and why not."""
    from .execute.custom_op import custom_op

    info = custom_op("status")
    if info.get("ok"):
        click.echo(f"built: {info['library']} (compiler {info.get('compiler')})")
        return 0
    click.echo(f"not built: {info.get('reason')}")
    return 1


def main(argv: list[str] | None = None) -> None:
    try:
        code = cli.main(args=argv, prog_name="sparsebench", standalone_mode=False)
    except UserError as exc:
        click.echo(f"sparsebench: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:  # `sparsebench data`: the group's help is the answer
        exc.show()
        sys.exit(2)
    except click.UsageError as exc:
        # click's usage line, then the error in the form every other error has (one line)
        if exc.ctx is not None:
            click.echo(exc.ctx.get_usage().splitlines()[0], err=True)
        click.echo(f"sparsebench: error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"sparsebench: error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
