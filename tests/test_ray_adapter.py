"""Guards for what remem_ray relies on inside Ray core (remem_ray/sweep/ray_adapter.py): each fails
loudly when a new Ray moves it."""

from __future__ import annotations

import inspect

from remem_ray.sweep.ray_adapter import (
    AUTOSCALER_EVENT,
    AUTOSCALER_PID,
    OUR_HANDLER,
    STOCK_PRINTER,
    driver_notices_to,
    kept_lines,
    trial_stopping_event,
    worker_output_to,
)


def test_ray_init_registers_its_log_printer_on_the_dispatcher_under_the_name_we_take_away():
    import ray._private.worker as worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    source = inspect.getsource(worker.connect)
    assert f'"{STOCK_PRINTER}"' in source and "global_worker_stdstream_dispatcher.add_handler(" in source
    assert callable(dispatcher.add_handler) and callable(dispatcher.remove_handler) and callable(dispatcher.emit)
    assert isinstance(dispatcher.handlers, list)


def test_worker_output_goes_to_our_handler_instead_of_rays_printer_and_back_after():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    stock, ours = [], []
    others = [pair for pair in dispatcher.handlers if pair[0] != STOCK_PRINTER]
    dispatcher.handlers = [(STOCK_PRINTER, stock.append)]
    try:
        batch = {"lines": ["[remem] trial 1 student: epoch 1/3"], "is_err": False, "pid": 7, "actor_name": "W"}
        with worker_output_to(ours.append):
            dispatcher.emit(batch)
            assert [name for name, _ in dispatcher.handlers].count(OUR_HANDLER) == 1
        dispatcher.emit(batch)
        assert ours == [batch] and stock == [batch]  # ours inside, Ray's printer after
        with worker_output_to(ours.append, keep_ray_printer=True):  # --verbose: both
            dispatcher.emit(batch)
        assert len(ours) == 2 and len(stock) == 2
        assert [name for name, _ in dispatcher.handlers] == [STOCK_PRINTER]
    finally:
        dispatcher.handlers = others  # as it was, less our stand-in for Ray's printer


def test_the_autoscaler_keeps_its_pid_and_event_token_and_only_its_events_are_kept():
    import ray._private.worker as worker

    assert f'"{AUTOSCALER_PID}"' in inspect.getsource(worker.print_to_stdstream)
    assert AUTOSCALER_EVENT in inspect.getsource(worker.filter_autoscaler_events)
    status = ["======== Autoscaler status ========", "Active:", f"{AUTOSCALER_EVENT}Adding 1 node(s) of type gpu."]
    assert kept_lines({"pid": AUTOSCALER_PID, "lines": status}) == ["Adding 1 node(s) of type gpu."]
    assert kept_lines({"pid": 7, "lines": status}) == status


def test_tune_stopping_a_function_trial_sets_the_event_we_watch():
    """Trainable.stop -> FunctionTrainable.cleanup -> session.finish sets session.stop_event (the
    real stop of a trial by ASHA is covered by the smoke sweep's released student leases)."""
    from ray.train._internal.session import _TrainSession
    from ray.tune.trainable.function_trainable import FunctionTrainable

    assert "session.finish(" in inspect.getsource(FunctionTrainable.cleanup)
    assert "self.stop_event.set()" in inspect.getsource(_TrainSession.finish)
    assert "self.stop_event = threading.Event()" in inspect.getsource(_TrainSession)
    assert trial_stopping_event() is None  # outside a Tune trial


def test_the_drivers_notices_are_printed_through_the_name_we_swap_and_come_back_after():
    import ray._private.worker as worker

    listener = inspect.getsource(worker.listen_error_messages)
    assert "print_to_stdstream(" in listener and '"pid": "raylet"' in listener
    stock, seen = worker.print_to_stdstream, []
    notice = {"lines": ["WARNING: 8 PYTHON worker processes have been started on node: ..."], "pid": "raylet"}
    with driver_notices_to(seen.append):
        worker.print_to_stdstream({**notice, "is_err": False}, ignore_prefix=False)  # as the listener calls it
    assert seen == [{**notice, "is_err": False}] and worker.print_to_stdstream is stock


def test_a_trial_thread_ending_with_system_exit_0_ends_without_error():
    """end_stopped_trial relies on Tune's runner thread taking SystemExit(0) as a clean end, as
    Train's own report does for a stopped trial."""
    import queue

    from ray.air._internal.util import RunnerThread

    from remem_ray.sweep.ray_adapter import end_stopped_trial

    errors: queue.Queue = queue.Queue()
    thread = RunnerThread(target=end_stopped_trial, daemon=True, error_queue=errors)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and errors.empty()
    failing = RunnerThread(target=lambda: (_ for _ in ()).throw(SystemExit(3)), daemon=True, error_queue=errors)
    failing.start()
    failing.join(10)
    assert isinstance(errors.get(timeout=5), SystemExit)  # any other code is an error: the test can fail


def test_tunes_first_ctrl_c_warning_starts_with_the_text_our_console_turns_into_a_line(tmp_path):
    """Tune's SIGINT handler logs a warning and stops the run gracefully; the quiet console shows
    Ray's errors only, so it shows its own line when it sees that warning."""
    import io
    import logging

    import ray.tune.tune as tune_module

    from remem_ray.storage import Storage
    from remem_ray.sweep.progress import TUNE_STOP_SIGNAL, StopSignalNotice, SweepConsole, SweepLog

    source = inspect.getsource(tune_module._setup_signal_catching)
    assert f'"{TUNE_STOP_SIGNAL}' in source and "logger.warning(" in source
    out = io.StringIO()
    console = SweepConsole(SweepLog(Storage(str(tmp_path))), out=out)
    notice = StopSignalNotice(console)
    logger = logging.getLogger("ray.tune.tune")
    logger.addHandler(notice)
    try:
        logger.warning("Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run. ...")
        logger.warning("another warning")
    finally:
        logger.removeHandler(notice)
    shown = out.getvalue()
    assert "interrupted: saving the sweep's state and stopping its trials" in shown and "another" not in shown


def test_train_calls_a_runs_user_callbacks_on_worker_errors_as_it_polls_before_its_failure_policy_logs():
    """remem_ray/sweep/train_callbacks.NamesItsTrial relies on this order: the worker group's poll
    runs the callbacks (UserCallbackHandler -> after_exception), then the controller's failure
    policy decides and logs on the same stream."""
    from ray.train.v2._internal.callbacks.user_callback import UserCallbackHandler
    from ray.train.v2._internal.execution.controller.controller import TrainController
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

    assert "after_exception" in inspect.getsource(UserCallbackHandler.after_worker_group_poll_status)
    assert "after_worker_group_poll_status" in inspect.getsource(WorkerGroup.poll_status)
    step = inspect.getsource(TrainController._step)
    assert "_poll_workers()" in step and step.index("_poll_workers()") < step.index("make_decision")
    assert "poll_status" in inspect.getsource(TrainController._poll_workers)
