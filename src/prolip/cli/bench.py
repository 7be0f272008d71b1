"""`prolip bench EXPERIMENT.yaml` and `prolip report RECORDS`."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import click
import yaml

from prolip.bench.experiment import load_yaml
from prolip.cli.options import path_option


def _overrides(pairs: tuple[str, ...]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r}: expected key=value", param_hint="--set")
        key, value = pair.split("=", 1)
        try:
            out[key] = load_yaml(value)
        except yaml.YAMLError as e:
            raise click.BadParameter(
                f"{pair!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); quote "
                "it, e.g. --set 'shots=[1, 4]'",
                param_hint="--set",
            ) from None
    return out


def _reserve_results(out, data_paths, lock: bool = True) -> None:
    """Pre-flight for a results folder, before any work: new, empty or a bench results folder (never inside the
    data), held by this process until the command ends (``lock``; under torchrun rank 0 holds it for them all)."""
    from prolip.outputs import reserve

    click.get_current_context().with_resource(reserve(out, False, data_paths, kind="bench", update=True, lock=lock))


def _experiment_data(exp) -> list:
    from prolip.data import paths_read

    root = None if exp.data_root is None else Path(exp.data_root).expanduser()
    names = [*exp.datasets, *(exp.targets or []), *([exp.tta.train_on] if exp.tta.train_on else [])]
    return [p for name in names for p in paths_read(name, root=root)]


@click.command("bench")
@click.argument("experiment", type=click.Path(path_type=Path))
@click.option("--set", "sets", multiple=True, help="override a key of the experiment file, e.g. --set shots=[1,4]")
@click.option("--out", default=None, help="results directory (records.jsonl is appended there)")
@click.option("--report/--no-report", default=False, help="also write the report to OUT/report when done")
@click.option(
    "--plan",
    is_flag=True,
    help="only say what the run needs (images, forward passes after sharing and "
    "the cache, disk, an estimated time from one timed batch); extract nothing, write nothing",
)
@click.option(
    "--ranks",
    type=click.IntRange(min=1),
    default=None,
    help="with --plan: how N torchrun ranks would split the run (each rank's groups and cells, the estimated "
    "time) [default: WORLD_SIZE, else 1]",
)
def bench_cmd(experiment, sets, out, report, plan, ranks):
    """Run a paper protocol over datasets × shots × seeds × methods; finished cells are skipped on re-runs.

    Protocols: fewshot, fewshot-val, sensitivity, base2new, cross-dataset, domain-generalisation, tta (see the
    files in experiments/). --set takes YAML values; a dotted key sets a section key, e.g. --set tta.views=8.
    Under torchrun (e.g. torchrun --nproc_per_node 2 --no-python prolip bench ...) the ranks split the extraction,
    then the groups of cells; each rank writes its own records file, which rank 0 merges into records.jsonl.
    """
    import warnings

    from prolip.backbones import BackboneLoadError, RandomWeightsWarning
    from prolip.bench.experiment import ExperimentError, load_experiment
    from prolip.bench.protocols import run_experiment

    if ranks is not None and not plan:
        raise click.UsageError("--ranks applies to --plan only (a run takes its ranks from torchrun)")
    overrides = _overrides(sets)
    if out is not None:
        overrides["out"] = out
    try:
        exp = load_experiment(experiment, overrides)
        if plan:
            return _print_plan(exp, experiment, ranks)
        rank = _start_ranks(exp, Path(exp.out).expanduser(), _experiment_data(exp))
        with warnings.catch_warnings():  # the bench prints its own RANDOM-weights line
            warnings.simplefilter("ignore", RandomWeightsWarning)
            records = run_experiment(exp, echo=click.echo)
    except (ExperimentError, BackboneLoadError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    if report and rank == 0:
        from prolip.bench.records import read_records
        from prolip.bench.report import write_report

        paths = write_report(read_records(records), records.parent / "report", data_paths=[records])
        click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


# A rank that finishes its groups waits at a barrier for the slowest one: longer than torch's 30-minute default
# in a paper-scale sweep. A rank that dies is torchrun's to notice (it stops the others), not the barrier's.
RANK_WAIT = timedelta(days=7)


def _start_ranks(exp, out: Path, data_paths) -> int:
    """Reserve the results folder (rank 0 holds its lock for every rank) and join torchrun's process group, if
    any; this process's rank."""
    import os

    from prolip.distributed import init_from_env

    _reserve_results(out, data_paths, lock=int(os.environ.get("RANK", "0")) == 0)
    return init_from_env(exp.device, timeout=RANK_WAIT)[0]


def _print_plan(exp, experiment: Path, ranks: int | None) -> None:
    import os
    import warnings

    from prolip.backbones import RandomWeightsWarning
    from prolip.bench.plan import format_plan, plan_sites

    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, one plan is enough
    if ranks is None:
        try:
            ranks = max(1, int(os.environ.get("WORLD_SIZE", "1")))
        except ValueError:
            raise click.BadParameter("WORLD_SIZE is not an integer: give --ranks N", param_hint="--ranks") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        for plan in plan_sites(exp, name=str(experiment), ranks=ranks):  # one per site the experiment runs at
            click.echo(format_plan(plan))


@click.command("report")
@click.argument("records", type=click.Path(path_type=Path), required=False)
@path_option("--out", help="folder for tables and plots")
@click.option(
    "--compare",
    nargs=2,
    type=click.Path(path_type=Path),
    default=None,
    metavar="A B",
    help="match two results folders (or records files) cell by cell: same images? same weights? numbers that "
    "differ beyond --tolerance; exits 1 unless every cell agrees",
)
@click.option(
    "--tolerance",
    type=click.FloatRange(min=0),
    default=None,
    help="with --compare: the largest difference (in points) that still agrees [default: 1e-6, bitwise in practice]",
)
def report_cmd(records, out, compare, tolerance):
    """Aggregate bench records: mean ± std over seeds, per dataset and averaged; markdown, CSV, JSON, PNG.

    With --compare A B: say which cells of two results folders used the same images and weights, and where their
    numbers differ."""
    from prolip.bench.records import read_records
    from prolip.bench.report import write_report
    from prolip.outputs import OutputError

    if compare is not None:
        if records is not None or out is not None:
            raise click.UsageError("--compare A B takes the two folders itself: give no RECORDS or --out with it")
        return _compare(compare[0], compare[1], tolerance)
    if tolerance is not None:
        raise click.UsageError("--tolerance applies to --compare A B only")
    if records is None:
        raise click.UsageError("give the RECORDS to report (a results folder or records.jsonl), or --compare A B")
    rows = read_records(records)
    if not rows:
        raise click.ClickException(f"no records found in {records}")
    out = out or (records if records.is_dir() else records.parent) / "report"
    try:
        _reserve_results(out, [records / "records.jsonl" if records.is_dir() else records])
    except OutputError as e:
        raise click.ClickException(str(e)) from None
    paths = write_report(rows, out, data_paths=[records / "records.jsonl" if records.is_dir() else records])
    click.echo(paths["markdown"].read_text())
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def _compare(a: Path, b: Path, tolerance: float | None) -> None:
    from prolip.bench.compare import DEFAULT_TOLERANCE, compare_records, format_comparison
    from prolip.bench.protocols import metrics
    from prolip.bench.records import read_records

    found = []
    for path in (a, b):
        rows = read_records(path)
        if not rows:
            raise click.ClickException(f"no records found in {path}")
        found.append(rows)
    result = compare_records(found[0], found[1], metrics(), DEFAULT_TOLERANCE if tolerance is None else tolerance)
    click.echo(format_comparison(result, str(a), str(b)))
    if not result.agrees:
        click.get_current_context().exit(1)
