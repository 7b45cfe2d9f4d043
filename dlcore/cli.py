"""The ``dlsweep`` command line: thin commands over importable functions."""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .store import Paths, RunError, default_uri, resume_command
from .supervisor import reap, supervise

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Data-efficiency sweeps: how many labels and steps does a model need, and what does pretraining buy?")
SHIPPED = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml"))


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            console.print(f"dlsweep {version('dlsweep')}", highlight=False)
        except PackageNotFoundError:  # run from a checkout that was never installed
            console.print("dlsweep (not installed)", highlight=False)
        raise typer.Exit()


@app.callback()
def root(_version_flag: bool = typer.Option(False, "--version", metavar="", callback=_version, is_eager=True,
                                            help="Print the version and exit.")) -> None:
    """Data-efficiency sweeps: how many labels and steps does a model need, and what does pretraining buy?"""
console = Console()
err = Console(stderr=True)

ROOT_OPTION = typer.Option(Path("mlflow_runs"), "--store", help="Folder for the MLflow store, Ray state and the pretrain cache.")


def fail(message: str, code: int = 2):
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _data_dir_default(sweep) -> None:
    """The one place the environment feeds configuration: DLSWEEP_DATA_DIR, else ~/.cache/dlsweep/data."""
    from .data import default_data_dir

    if sweep.data.data_dir is None:
        sweep.data.data_dir = str(default_data_dir())


@app.command(epilog="Shipped sweep files (in sweeps/): " + ", ".join(SHIPPED) if SHIPPED else None)
def run(
    sweep_file: Path = typer.Argument(..., help="Sweep YAML file."),
    set_: List[str] = typer.Option([], "--set", help="Override a key: --set finetune.seeds=[0,1] (value is YAML)."),
    smoke: bool = typer.Option(False, "--smoke", metavar="", help="Shrink to a CPU-sized run: few steps, 1 seed, 2 budgets, 1 sample."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Apply the file's named profile (e.g. cpu); runs as <name>-<profile>."),
    dry_run: bool = typer.Option(False, "--dry-run", metavar="", help="Validate and print the plan; run nothing."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="With --dry-run: print the plan as JSON."),
    estimate: Optional[bool] = typer.Option(None, "--estimate/--no-estimate", help="With --dry-run: time a few steps of each "
                                            "stage and arm here and estimate the wall time on this machine (default: on, "
                                            "off with --json)."),
    resume: bool = typer.Option(False, "--resume", metavar="", help="Continue the last interrupted run of this sweep."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking server (default: sqlite under --store)."),
    store: Path = ROOT_OPTION,
    storage: Optional[str] = typer.Option(None, "--storage", help="Object store (s3://bucket/prefix, gs://...) for Tune's "
                                          "state, checkpoints and the pretrain cache, on a cluster without a shared disk."),
):
    """Run a sweep: pretraining stages once each, then the fine-tune grid on Ray Tune, logged to MLflow."""
    try:
        from .spec import SpecError, check_all, load_sweep, plan  # torch comes with them: not for --help

        sweep = load_sweep(sweep_file, set_, smoke=smoke, profile=profile)
        _data_dir_default(sweep)
        if dry_run:  # the checks a real run makes before it writes anything (run_sweep's, for a real run)
            check_all(sweep, str(sweep_file))
    except SpecError as e:
        fail(str(e))
    if storage and dry_run:  # a real run's check is run_sweep's, before it writes anything
        from .store import store_problem

        trouble = store_problem(storage, create=False)
        if trouble:
            fail(trouble)
    if dry_run:
        p = plan(sweep)
        if estimate or (estimate is None and not as_json):
            from .estimate import estimate as measure

            from .estimate import EstimateError
            from .store import Paths

            try:
                with console.status("timing a few steps of each stage and arm on this machine", spinner="dots"):
                    p["estimate"] = measure(sweep, cache_dir=Paths(store, storage).cache)
            except EstimateError as e:
                p["estimate"] = {"error": str(e)}
        if as_json:
            print(json.dumps(p, indent=1))
        else:
            _print_plan(p)
        return
    # What names this sweep and places its store, for the line that says how to continue it.
    flags = (*(["--smoke"] if smoke else []), *(["--profile", profile] if profile else []),
             *(x for text in set_ for x in ("--set", text)), *([] if store == ROOT_OPTION.default else ["--store", str(store)]))
    if address or os.environ.get("RAY_ADDRESS"):  # a cluster that can go away under its driver: outlive it
        raise typer.Exit(_drive_apart(sweep, sweep_file, store, tracking_uri, address, resume, storage, flags))
    _drive(sweep, sweep_file, store, tracking_uri, address, resume, storage=storage, flags=flags)


@app.command(hidden=True)
def drive(job: str = typer.Argument(..., help="The run as JSON: spec, source, store, tracking_uri, address, resume, storage, flags.")):
    """The driver of a `dlsweep run` that joins a Ray cluster, started by that run as its child."""
    j = json.loads(job)
    from .spec import Sweep

    _drive(Sweep.model_validate(j["spec"]), Path(j["source"]), Path(j["store"]), j["tracking_uri"], j["address"],
           j["resume"], supervised=True, storage=j.get("storage"), flags=tuple(j.get("flags", ())))


def _drive(sweep: Sweep, sweep_file: Path, store: Path, tracking_uri: str | None, address: str | None, resume: bool,
           supervised: bool = False, storage: str | None = None, flags: tuple[str, ...] = ()) -> None:
    """Run the sweep in this process and say how it ended; a sweep not done ends in typer.Exit."""
    from .data import DataError
    from .spec import SpecError

    try:
        if supervised:
            from .runner import run_sweep  # Ray is imported only when something runs

            state = run_sweep(sweep, str(sweep_file), store, tracking_uri=tracking_uri, address=address, resume=resume,
                              console=console, supervised=True, storage=storage, flags=flags)
        else:
            state = _run_private(sweep, sweep_file, store, tracking_uri, resume, storage, flags)
    except (SpecError, DataError, RunError) as e:
        fail(str(e), getattr(e, "code", 2))
    again = resume_command(str(sweep_file), flags, state.get("storage"))
    s = state["summary"]
    counts = ", ".join(f"{s[k]} {k.replace('_', ' ')}" for k in ("completed", "stopped_early", "diverged", "failed", "blocked") if s[k])
    if state["status"] == "interrupted":
        err.print(f"interrupted ({counts or 'no trial finished'}); continue with: {again}", highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    if state["status"] == "failed":
        held = ([f"arms {', '.join(s['blocked_arms'])} (stage {', '.join(s['blocked_stages'])} failed or diverged)"]
                if s["blocked_arms"] else [])
        held += [f"the other seeds of {cell} (its search completed no trial)" for cell in s["blocked_searches"]]
        blocked = "; blocked: " + "; ".join(held) if held else ""
        err.print(f"[bold red]not done[/]: {counts}{blocked}; rerun failed trials with: {again}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"[bold green]done[/] ({counts}): experiment '{sweep.tracking.experiment or sweep.name}', parent run "
                  f"{state['parent_run_id']}; see it with: dlsweep ui", highlight=False, soft_wrap=True)


def _run_private(sweep: Sweep, sweep_file: Path, store: Path, tracking_uri: str | None, resume: bool,
                 storage: str | None, flags: tuple[str, ...]) -> dict:
    """run_sweep on a private local Ray, with the runner imported only once Ray is up: the run's
    checks first (a bad run ends here, before Ray starts or anything is written), then Ray's start
    beside the MLflow experiment's (boot.start), both before the runner's imports."""
    from . import boot

    checked = boot.check_run(sweep, str(sweep_file), store, tracking_uri, None, resume, storage, flags)
    own_ray = boot.start(checked, None)
    from .runner import run_checked

    return run_checked(checked, console, own_ray=own_ray)


def _drive_apart(sweep: Sweep, sweep_file: Path, store: Path, tracking_uri: str | None, address: str | None,
                 resume: bool, storage: str | None = None, flags: tuple[str, ...] = ()) -> int:
    """Run the sweep's driver as a child process (``dlsweep drive``) and outlive it, for a Ray cluster
    that goes away ends its driver from C++ before Python can say a word (supervisor.py). The child
    prints as ``_drive`` does; returns the exit code."""
    job = {"spec": sweep.model_dump(mode="json", by_alias=True), "source": str(sweep_file), "store": str(store),
           "tracking_uri": tracking_uri, "address": address, "resume": resume, "storage": storage, "flags": flags}
    proc, _ = supervise([sys.executable, "-m", "dlcore.cli", "drive", json.dumps(job)])
    return reap(proc, Paths(store.resolve()).state(sweep.name), resume_command(str(sweep_file), flags, storage), err)


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{seconds:.0f} s" if seconds < 90 else f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def _print_plan(p: dict) -> None:
    console.print(f"[bold]{p['name']}[/] on {p['dataset']}: {p['total_trials']} trials "
                  f"({p['pretrain_trials']} pretraining, {p['finetune_trials']} fine-tune)", highlight=False)
    if p["stages"]:
        t = Table("stage", "objective", "from", "steps", "seeds", title="pretraining (cached by content hash)")
        for s in p["stages"]:
            t.add_row(s["stage"], s["objective"], s["from"] or "-", str(s["steps"]), str(s["seeds"]))
        console.print(t)
    ft = p["finetune"]
    if ft:
        samples, cell_scope = ft["samples_per_cell"], ft["search_scope"] == "cell"
        t = Table("axis", "values", title=f"fine-tune grid: {p['grid_cells']} cells" + ("" if cell_scope else f" x {samples} samples"))
        t.add_row("arms", ", ".join(f"{k} ({v})" for k, v in ft["arms"].items()))
        t.add_row("labels", str(ft["labels"]))
        one_run = p["steps_read_off_one_run"]
        t.add_row("steps", str(ft["steps"]) + (f" (read off one {max(ft['steps']):,}-step run: {', '.join(one_run)})"
                                               if one_run else ""))
        t.add_row("seeds", str(ft["seeds"]))
        for k, v in ft["search"].items():
            t.add_row(f"search {k}", json.dumps(v))
        if cell_scope:
            t.add_row("search scope", f"cell: {samples} samples on seed {ft['seeds'][0]}; 1 per other seed, with its pick")
        console.print(t)
    r = p["resources_per_trial"]
    import torch  # came with the plan

    here = (os.cpu_count() or 1, torch.cuda.device_count())
    per_trial = f"per trial {r['cpu']:g} CPU, {r['gpu']:g} GPU" + (
        f" (this machine has {here[0]} CPU, {here[1]} GPU: a run here gives each trial at most what it has)"
        if r["cpu"] > here[0] or r["gpu"] > here[1] else "")
    if not ft:  # a pretraining-only sweep: nothing is selected on labels, nothing stopped early
        console.print(f"each stage keeps its best checkpoint by validation loss; {per_trial}", highlight=False)
    else:
        asha = "ASHA " + (f"grace {p['asha']['grace_period']} steps, x{p['asha']['reduction_factor']:g}" if p["asha"]["enabled"] else "off")
        v = p["validation"]
        how = {"realistic": f"realistic: {v['fraction']:.0%} of each budget's labels", "oracle": "oracle: data.val_size held-out labels",
               "none": "none: last checkpoint"}[v["protocol"]]
        console.print(f"select on {p['metric']} ({p['mode']}), validation {how}; {asha}; {per_trial}", highlight=False)
    e = p.get("estimate")
    if e and "error" in e:
        console.print(f"[yellow]no wall-time estimate: {e['error']}[/]", highlight=False)
    elif e:
        ms = {k: c["step_s"] * 1000 for k, c in e["costs"].items()}
        rates = (", ".join(f"{k} {v:.0f} ms/step" for k, v in ms.items()) if len(ms) <= 4 else
                 f"{len(ms)} stages and arms at {min(ms.values()):.0f}-{max(ms.values()):.0f} ms/step")
        console.print(f"estimated wall time on this machine: [bold]~{_duration(e['wall_s'])}[/] ({e['slots']} trial(s) at a time, "
                      f"{e['threads_per_trial']} thread(s) each; measured {rates}; ASHA stops not counted"
                      f"{'; ' + str(e['cached_stages']) + ' cached stage(s) reused' if e['cached_stages'] else ''})", highlight=False)


@app.command()
def report(
    sweep: str = typer.Argument(..., help="Sweep YAML file, or the name of its MLflow experiment."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: reports/<experiment>)."),
    target: Optional[float] = typer.Option(None, "--target", help="Accuracy to count steps to (default: the sweep's 'target')."),
    parent: Optional[str] = typer.Option(None, "--run", help="Parent run id of the sweep invocation (default: the latest)."),
    curves: List[str] = typer.Option([], "--curves", help="Cell to draw loss curves for, e.g. scratch/labels=100 (repeatable)."),
    drawn: List[str] = typer.Option([], "--embeddings", help="Stage whose embeddings the figure draws (repeatable; default: "
                                    "every stage; the table lists every stage)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Report the runs of the file's named profile (<name>-<profile>)."),
    smoke: bool = typer.Option(False, "--smoke", metavar="", help="Report the file's --smoke runs (<name>-smoke)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking server (default: sqlite under --store)."),
    store: Path = ROOT_OPTION,
):
    """Data-efficiency curves, tables and report.md of a sweep, read back from MLflow."""
    if target is not None and not 0 < target <= 1:  # the sweep file's 'target' has the same bounds
        fail(f"--target {target:g}: an accuracy above 0 and at most 1 (0.9 for 90%)")
    from mlflow.tracking import MlflowClient

    from . import report as R

    name = sweep
    if sweep.endswith((".yaml", ".yml")) or Path(sweep).is_file():
        try:
            from .spec import SpecError, load_sweep

            spec = load_sweep(sweep, profile=profile, smoke=smoke)
        except SpecError as e:
            fail(str(e))
        name = spec.tracking.experiment or spec.name
        tracking_uri = tracking_uri or spec.tracking.uri
    else:
        if profile or smoke:
            fail("--profile and --smoke need the sweep file, not an experiment name")
        try:
            from .fields import plain_name

            plain_name(name)  # it becomes a folder under reports/
        except ValueError as e:
            fail(f"experiment name: {e}")
    if not tracking_uri and not (store / "mlflow.db").exists():
        fail(f"no MLflow store at {store / 'mlflow.db'}; run the sweep first or pass --tracking-uri")
    client = MlflowClient(tracking_uri or default_uri(store))
    try:
        result = R.build(client, name, out or Path("reports") / name, parent=parent, target=target, curves=curves or None,
                         drawn=drawn or None)
    except ValueError as e:
        fail(str(e))
    _print_report(result, name)


@app.command()
def compare(
    first: Path = typer.Argument(..., help="A report folder (with summary.csv)."),
    second: Path = typer.Argument(..., help="Another report folder of the same grid."),
    names: str = typer.Option("first,second", "--names", help="Column names for the two, comma-separated."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the table to this markdown file."),
):
    """Two reports of the same grid side by side: test accuracy and labels used per cell, and the difference."""
    from . import report as R

    labels = tuple(n.strip() for n in names.split(","))
    if len(labels) != 2 or not all(labels):
        fail(f"--names takes two comma-separated names, got '{names}'")
    try:
        table = R.compare(first, second, labels)
    except ValueError as e:
        fail(str(e))
    console.print(table, highlight=False, soft_wrap=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")


data_app = typer.Typer(help="The data sets: where they are looked for, what is there, and downloading them.",
                       no_args_is_help=False, invoke_without_command=True)
app.add_typer(data_app, name="data")


@data_app.callback()
def data_list(ctx: typer.Context):
    """List the known data sets in the data folder (DLSWEEP_DATA_DIR, else ~/.cache/dlsweep/data): shape and checksum."""
    if ctx.invoked_subcommand:
        return
    import hashlib

    import numpy as np

    from .data import TORCHVISION, default_data_dir

    folder = default_data_dir()
    console.print(f"data folder: {folder} ({'DLSWEEP_DATA_DIR' if os.environ.get('DLSWEEP_DATA_DIR') else 'default'})",
                  highlight=False)
    t = Table("data set", "file", "train", "test", "sha256")
    for name in sorted(TORCHVISION):
        path = folder / f"{name}.npz"
        if not path.is_file():
            t.add_row(name, "missing", "-", "-", f"dlsweep data fetch {name}")
            continue
        with np.load(path) as z:
            train, test = z["x_train"].shape, z["x_test"].shape
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        t.add_row(name, path.name, " x ".join(map(str, train)), " x ".join(map(str, test)), digest)
    console.print(t)


@data_app.command("fetch")
def data_fetch(name: str = typer.Argument(..., help="mnist or cifar10.")):
    """Download a data set through torchvision into the data folder, as <name>.npz (needs internet)."""
    from .data import DataError, default_data_dir, fetch

    try:
        path = fetch(name, default_data_dir())
    except DataError as e:
        fail(str(e))
    except Exception as e:  # noqa: BLE001 -- no network, a proxy, a full disk: one line, not a traceback
        fail(f"could not download {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    console.print(f"{name}: {path}", highlight=False)


def _print_report(result: dict, name: str) -> None:
    from . import report as R

    from rich import box

    def table(title: str, *cols: str) -> Table:
        t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
        for col in cols:  # numbers never wrap; a long arm name folds
            t.add_column(col, justify="left" if col == "arm" else "right", no_wrap=col != "arm", overflow="fold")
        return t

    rows = result["rows"]
    if rows:
        t = table(f"{name}: test metrics of the validation-selected trials (mean ± 95% CI over seeds)",
                  "arm", "labels (total)", "steps", "seeds", "test acc", "test loss")
        for r in rows:
            total = f" ({r['labels_total']:,})" if r["labels_total"] is not None else ""
            t.add_row(r["arm"], f"{r['labels']:,}{total}", str(r["steps"]), str(r["seeds"]),
                      R.ci_text(r["test_acc_mean"], r["test_acc_ci95"], ".2%"), R.ci_text(r["test_loss_mean"], r["test_loss_ci95"], ".4f"))
        console.print(t)
    elif result["finetuned"]:
        console.print("no completed fine-tune trials yet")
    if rows and result["target"] is not None:
        t = table(f"steps to {result['target']:.0%} validation accuracy: median over seeds", "arm", "labels", "steps",
                  "median (95% CI)", "reached")
        for r in rows:
            ci = f" ({r['steps_to_target_ci95']})" if r["steps_to_target_ci95"] else ""
            t.add_row(r["arm"], f"{r['labels']:,}", str(r["steps"]), (r["steps_to_target"] or "-") + ci, r["reached_target"])
        console.print(t)
    if result["paired"]:
        t = table("pretrained arm minus its baseline, paired by seed (mean ± 95% CI)", "arm", "labels", "steps", "pairs",
                  "Δ test acc", "Δ test loss")
        for p in result["paired"]:
            t.add_row(f"{p['arm']} − {p['baseline']}", f"{p['labels']:,}", str(p["steps"]), str(p["acc"].n), R.diff_text(p["acc"], "acc"),
                      R.diff_text(p["loss"], "loss"))
        console.print(t)
    for stage, loss in sorted(result["stage_losses"].items()):
        if loss is not None:  # each stage's own loss; an autoencoder's L1 and L2 per pixel compare across stages
            error = ", ".join(f"{k.upper()} {v:.4f}" for k, v in result["stage_errors"].get(stage, {}).items())
            console.print(f"pretraining stage {stage}: test loss {loss:.4f}" + (f" (its own; per pixel {error})" if error else ""),
                          highlight=False)
    for e in result["efficiency"]:
        need, ratio = R.efficiency_text(e)
        console.print(f"{e['arm']} with {e['labels']} labels ({e['accuracy']:.2%}, {e['steps']} steps): "
                      f"scratch needs {need} labels: {ratio}", highlight=False, soft_wrap=True)
    for stage, counts in sorted(result["outcomes"].items(), key=lambda kv: (kv[0] != "finetune", kv[0])):
        console.print(f"trials of {stage}: " + ", ".join(f"{counts[o]} {o.replace('_', ' ')}" for o in R.OUTCOMES if counts[o]),
                      highlight=False, soft_wrap=True)
    for reason in sorted(set(result["blocked"].values())):
        n = sum(r == reason for r in result["blocked"].values())
        console.print(f"{n} cell(s) {reason}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    if result["missing"]:
        console.print(f"[yellow]partial sweep: {len(result['missing'])} grid cell(s) not finished yet[/]")
    console.print(f"report: {result['out'] / 'report.md'} ({len(result['figures'])} figures); "
                  f"logged to parent run {result['parent']}", highlight=False, soft_wrap=True)


@app.command()
def ui(
    store: Path = ROOT_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(5000, "--port", help="Port to listen on."),
):
    """Open the MLflow UI for the local store; Ctrl-C or SIGTERM stops the server with all its workers."""
    db = store / "mlflow.db"
    if not db.exists():
        fail(f"no MLflow store at {db}; run a sweep first")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", default_uri(store), "--host", host,
           "--port", str(port), "--workers", "1"]
    console.print(f"MLflow UI on http://{host}:{port} (Ctrl-C stops it)", highlight=False)
    # Without MLflow's job runner (GenAI evaluation jobs, which dlsweep never submits): 2 processes
    # instead of 10 on a small machine. A Ctrl-C reaches the server as SIGTERM, which uvicorn ends on
    # quietly (on SIGINT each process printed its KeyboardInterrupt traceback, for seconds).
    import signal

    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}  # the user's setting wins
    proc, stopped = supervise(cmd, env=env, forward_as={signal.SIGINT: signal.SIGTERM})
    raise typer.Exit(0 if stopped else proc.returncode)


def main():
    """The ``dlsweep`` program. Once a command has returned and the exit handlers have run, the
    process ends without the interpreter's teardown: freeing torch's and Ray's modules and objects
    one by one took ~2 s after every sweep, and nothing is left to write by then. The interpreter's
    own exit stops the threads and runs the handlers (Ray's, MLflow's: imported by the commands, so
    registered later and run earlier); the one registered here, first, runs last and ends the
    process (a handler registered before it, by an import of this module's or a sitecustomize,
    would be skipped: none is today)."""
    status = [1]  # an exception out of app() ends the process with 1, after its traceback

    def end_now() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a reader that went away (| head), a stream closed
                pass
        os._exit(status[0])

    atexit.register(end_now)
    try:
        app()
        status[0] = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        status[0] = e.code if isinstance(e.code, int) else int(e.code is not None)
    sys.exit(status[0])


if __name__ == "__main__":
    main()
