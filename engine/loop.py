"""EngineLoop: the engine steps on its own thread; other threads talk to it through commands.

All engine state is touched only by the loop thread, so no locks guard it. `submit`
runs a function on that thread between steps and returns a Future of its result.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from engine.llm import LLMEngine
from engine.request import RequestOutput

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: LLMEngine, on_outputs: Callable[[list[RequestOutput]], None],
                 idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self.on_outputs = on_outputs
        self.idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.steps = 0
        self.step_seconds = 0.0  # time inside engine.step(), for status and benchmarks
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict:
        """Pool and batch figures; call on the loop thread (through `submit`)."""
        pool, sched = self.engine.pool, self.engine.scheduler
        return {"pages_total": pool.num_pages, "pages_free": pool.num_free, "pages_used": pool.num_used,
                "running": len(sched.running), "waiting": len(sched.waiting), "steps": self.steps,
                "step_seconds": self.step_seconds}

    def submit(self, fn: Callable, *args) -> Future:
        fut: Future = Future()
        if self._stop.is_set() or self.error is not None:
            fut.set_exception(RuntimeError("engine loop is not running"))
            return fut
        self._commands.put((fn, args, fut))
        return fut

    def _drain(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=self.idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, args, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_unfinished())
                if self._stop.is_set():
                    break
                if self.engine.has_unfinished():
                    t0 = time.perf_counter()
                    outputs = self.engine.step()
                    self.step_seconds += time.perf_counter() - t0
                    self.steps += 1
                    if outputs:
                        self.on_outputs(outputs)
        except BaseException as e:  # noqa: BLE001 - recorded, reported through status
            log.exception("engine loop crashed")
            self.error = e
        finally:
            self._fail_pending()

    def _fail_pending(self) -> None:
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not None and not item[2].done():
                item[2].set_exception(RuntimeError("engine loop stopped"))
