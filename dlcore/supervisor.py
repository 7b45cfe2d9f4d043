"""The process that outlives a sweep's driver, and one that stops a server with all its workers.

A sweep that joins a Ray cluster (``dlsweep run --address``, or RAY_ADDRESS) cannot report that
cluster going away from inside its own driver. The driver's object-store client is built with
``exit_on_connection_failure`` hard-wired to true (ray-project/ray,
src/ray/core_worker/core_worker_process.cc), so the first failed read or write on its socket to
the plasma store, which lives in the node's raylet, calls ``ray::QuickExit()``, that is
``_Exit(1)`` (src/ray/object_manager/plasma/connection.cc, ``StoreConn::ExitIfErrorStatus``;
src/ray/util/util.cc). Tune's driver touches its object store as soon as it hears its trials'
actors die, so about a second after a cluster shutdown the process is gone: no Python exception,
no ``finally``, no ``atexit``, and no RAY_* variable or ``_system_config`` key that turns it off.
The only related setting, ``gcs_rpc_server_reconnect_timeout_s`` (60 s), is how long a driver
whose GCS alone went away lives on before its GCS client calls ``std::_Exit`` too;
``runner.RayWatch`` ends it after 1.5 s instead. A thread
in the driver cannot win the race with the raylet's death, so the words and the bookkeeping have
to come from another process.

So ``dlsweep run`` starts such a sweep's driver as a child process (``dlsweep drive``) and stays
behind, never starting or joining Ray itself: it passes Ctrl-C, SIGTERM and SIGHUP on, returns
the child's exit code, and when the child died with its sweep still marked ``running``, records
the sweep as interrupted, says why in one line and ends the MLflow runs the driver left open
(``reap``). Any death the driver could not report (Ray's exit, SIGKILL, the OOM killer) is covered
the same way. Only on that path does it import ``tracking``, which brings Ray's Python package
along for its Tune callbacks (a library import: nothing connects). A sweep on its private local
Ray runs in the ``dlsweep run`` process itself: that Ray lives and dies with it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .store import write_state

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def supervise(cmd: list[str], grace: float = 10.0, env: dict | None = None,
              forward_as: dict[int, int] | None = None) -> tuple[subprocess.Popen, bool]:
    """Run ``cmd`` in a session of its own, pass SIGINT, SIGTERM and SIGHUP on to its whole process
    group (as ``forward_as`` maps them, if it does), and return only once no process of that group
    is left (whatever the leader left behind gets SIGTERM, then SIGKILL after ``grace`` seconds).
    Returns the ended process and whether a signal was passed on.

    A session of its own, because a terminal's Ctrl-C goes to its whole foreground group: the child
    gets each signal once, from here, and here never dies of it."""
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)  # its pid is its group id
    stopped = []

    def forward(signum, _frame):
        stopped.append(signum)
        try:
            os.killpg(proc.pid, (forward_as or {}).get(signum, signum))
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                time.sleep(0.1)
                os.killpg(proc.pid, 0)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for s, handler in previous.items():
            signal.signal(s, handler)
    return proc, bool(stopped)


def reachable(where: str, timeout: float = 0.5) -> bool:
    """Whether ``host:port`` (a Ray GCS) accepts a connection."""
    host, port = where.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except OSError:
        return False


def gone(where: str, within_s: float = 5.0) -> bool:
    """Whether the GCS at ``where`` stops answering within ``within_s`` seconds: a cluster that shuts
    down stops its raylets first, and the driver dies with its raylet, a moment before the GCS goes."""
    deadline = time.monotonic() + within_s
    while reachable(where):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def reap(proc: subprocess.Popen, state_path: Path, again: str, err: Console) -> int:
    """The exit code for a sweep driver ``proc`` that has ended. If it left its sweep ``running``
    (Ray's core worker, or a signal, ended it before it could record how the sweep ended), record
    the sweep as interrupted, say why in one line on ``err`` and end the MLflow runs the driver left
    open. Returns the driver's exit code, 128 + N after signal N as a shell has it, and at least 1
    when the driver left its sweep running. ``again`` is the command that resumes the sweep."""
    code = proc.returncode
    exit_code = 128 - code if code < 0 else code
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return exit_code  # it never got as far as writing a state
    if state.get("status") != "running" or state.get("driver", {}).get("pid") != proc.pid:
        return exit_code  # it recorded how the sweep ended and said so (or the state is not its own)
    where = state["driver"].get("ray")
    if code < 0:
        line = f"the sweep driver was killed by {signal.Signals(-code).name} mid-sweep; state saved; continue with: {again}"
    elif where and gone(where):
        line = f"the Ray cluster at {where} went away mid-sweep; state saved; once Ray is back, continue with: {again}"
    else:
        line = f"the sweep driver died (exit code {code}) mid-sweep; state saved; continue with: {again}"
    state["status"] = "interrupted"
    write_state(state_path, state)
    err.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    from . import tracking  # brings Ray's Python package along; this process still never starts or joins Ray

    # Trials the driver saw die just before it did went down with it (or with the cluster): interrupted.
    tracking.finish_sweep(state["tracking_uri"], state, err, cluster_lost=True)
    return max(exit_code, 1)
