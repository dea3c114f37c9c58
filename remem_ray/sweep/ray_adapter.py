"""What remem_ray relies on inside Ray core, in one place (checked against ray 2.60.0;
tests/test_ray_adapter.py guards it).

- `ray._private.ray_logging.global_worker_stdstream_dispatcher`: the driver hands every batch of
  output lines from the cluster's processes to its handlers; `ray.init(log_to_driver=True)`
  registers the stock printer as "ray_print_logs". Ray has no public hook for this: the only
  public switch is all (`log_to_driver=True`) or nothing. A batch is a dict with at least
  "lines" (list of str), "is_err" (stderr or stdout), "pid" and "actor_name".
- `ray.train._internal.session.get_session().stop_event`: in a Tune function trial, the
  threading.Event that Tune sets (FunctionTrainable.cleanup -> session.finish) when it stops the
  trial, a scheduler's stop included, before it ends the trial's actor. Nothing else tells a
  trial blocked in a Train run's fit() that it is being stopped. A trial's thread that finds it
  set ends with `SystemExit(0)`, as Train's own `report` does: Tune's runner thread
  (`ray.air._internal.util.RunnerThread`) takes that as an end without error.
- `ray._private.worker.print_to_stdstream`: `listen_error_messages`, the driver's thread for the
  notices the cluster pushes to drivers (the raylet's "N PYTHON worker processes have been
  started" size warning, tasks killed for memory), prints each one with it, straight to stdout,
  past the dispatcher; it looks the name up at each call, so `driver_notices_to` can swap it.
  A notice is a batch with "lines" (one notice), pid "raylet", "is_err" False.
- The autoscaler's batches come with pid "autoscaler": its whole status report every few
  seconds, in which its events (nodes added, removed) carry ":event_summary:". Ray's printer
  keeps the events only; so does `kept_lines`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

STOCK_PRINTER = "ray_print_logs"
OUR_HANDLER = "remem_worker_output"
AUTOSCALER_PID, AUTOSCALER_EVENT = "autoscaler", ":event_summary:"


def kept_lines(batch: dict[str, Any]) -> list[str]:
    """A batch's lines worth keeping: all of a process's, the autoscaler's events only."""
    lines = list(batch.get("lines") or [])
    if batch.get("pid") != AUTOSCALER_PID:
        return lines
    return [line.split(AUTOSCALER_EVENT, 1)[1].strip() for line in lines if AUTOSCALER_EVENT in line]


@contextlib.contextmanager
def worker_output_to(handler: Callable[[dict[str, Any]], None], keep_ray_printer: bool = False) -> Iterator[None]:
    """Send the cluster's output batches to `handler`, instead of Ray's printer or beside it.

    Call after ray.init; Ray's printer is put back on the way out.
    """
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    stock = [] if keep_ray_printer else [h for name, h in dispatcher.handlers if name == STOCK_PRINTER]
    if stock:
        dispatcher.remove_handler(STOCK_PRINTER)
    dispatcher.add_handler(OUR_HANDLER, handler)
    try:
        yield
    finally:
        dispatcher.remove_handler(OUR_HANDLER)
        for printer in stock:
            dispatcher.add_handler(STOCK_PRINTER, printer)


def trial_stopping_event():
    """The threading.Event Tune sets when it stops this trial (see the module's docstring), or
    None outside a Tune trial."""
    from ray.train._internal.session import get_session

    session = get_session()
    return getattr(session, "stop_event", None) if session is not None else None


@contextlib.contextmanager
def driver_notices_to(handler: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """Send the notices the cluster pushes to this driver to `handler` instead of stdout.
    Call after ray.init; Ray's printer is put back on the way out."""
    import ray._private.worker as worker

    stock = worker.print_to_stdstream

    def to_handler(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        handler(data)

    worker.print_to_stdstream = to_handler
    try:
        yield
    finally:
        worker.print_to_stdstream = stock


def end_stopped_trial() -> None:
    """End this trial's thread quietly: Tune is stopping it (its stop event is set)."""
    raise SystemExit(0)
