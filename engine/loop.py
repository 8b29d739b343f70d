"""EngineLoop: the engine steps on its own thread; other threads talk to it through commands.

All engine state is touched only by the loop thread, so no locks guard it. `submit`
runs a function on that thread between steps and returns a Future of its result.

Expert parallelism: the loops of an EP group's ranks step in lockstep (`Lockstep`). Each
iteration every rank says whether it has work and whether it is stopping (one all-reduce
MAX); if anyone has work, every rank makes exactly one model call: a forward when its
engine step runs the model, else `idle_step()` (only the MoE collectives). When nobody
has work they wait for commands between agreements instead of spinning; a stop on any
rank stops the whole group together, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from engine.llm import LLMEngine
from engine.request import RequestOutput

log = logging.getLogger(__name__)


class Lockstep:
    """The collective side of an EP rank's loop: agreeing on work, counting model calls."""

    def __init__(self, ep, model: torch.nn.Module) -> None:
        import torch.distributed as dist

        self.ep, self.model, self._dist = ep, model, dist
        self.device = next(model.parameters()).device  # NCCL reduces device tensors
        self.forwards = 0
        self.idle_steps = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.forwards += 1

    def agree(self, has_work: bool, stopping: bool) -> tuple[bool, bool]:
        """-> (does any rank have work, is any rank stopping)."""
        flags = torch.tensor([int(has_work), int(stopping)], device=self.device)  # [2]
        self._dist.all_reduce(flags, op=self._dist.ReduceOp.MAX, group=self.ep.group)
        work, stop = flags.tolist()
        return bool(work), bool(stop)

    def step(self, engine: LLMEngine) -> list[RequestOutput]:
        """One model call on this rank: the engine's step, or an idle step if it ran nothing
        (no requests, or a waiting request that cannot get pages yet)."""
        before = self.forwards
        outputs = engine.step() if engine.has_unfinished() else []
        if self.forwards == before:
            with torch.inference_mode():
                self.model.idle_step()
            self.idle_steps += 1
        elif self.forwards != before + 1:  # a second forward would desynchronize the group
            raise RuntimeError(f"an EP rank ran {self.forwards - before} forwards in one step")
        return outputs


class EngineLoop:
    def __init__(self, engine: LLMEngine, on_outputs: Callable[[list[RequestOutput]], None],
                 idle_wait_s: float = 0.05, ep=None) -> None:
        """ep: an engine.moe.EPContext when this engine is one rank of an expert-parallel group."""
        self.engine = engine
        self.lockstep = Lockstep(ep, engine.runner.model) if ep is not None and ep.size > 1 else None
        self.on_outputs = on_outputs
        self.idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False  # set (under _submit_lock) once pending commands have been failed
        self._submit_lock = threading.Lock()
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
                "step_seconds": self.step_seconds, "ahead_steps": self.engine.ahead_steps,
                **self.engine.spec_stats(), **self._expert_stats()}

    def _expert_stats(self) -> dict:
        """MoE only: tokens this rank routed to each expert per layer since start, the worst
        layer's max/mean imbalance, and (EP) the steps this rank ran idle for its group."""
        load_of = getattr(self.engine.runner.model, "expert_load", None)
        load = load_of() if load_of is not None else []
        if not load:
            return {}
        from engine.moe import imbalance

        out = {"expert_load": load, "expert_imbalance": max(imbalance(torch.tensor(row)) for row in load)}
        if self.lockstep is not None:
            block = next(m for m in self.lockstep.model.modules() if hasattr(m, "local_experts"))
            out.update(ep_rank=self.lockstep.ep.rank, ep_size=self.lockstep.ep.size,
                       idle_steps=self.lockstep.idle_steps, local_experts=list(block.local_experts))
        return out

    def submit(self, fn: Callable, *args) -> Future:
        fut: Future = Future()
        with self._submit_lock:  # never queued after _fail_pending's last look: no future left hanging
            if self._closed or self._stop.is_set() or self.error is not None:
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
            if self.lockstep is not None:
                self._run_lockstep()
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_unfinished())
                if self._stop.is_set():
                    break
                if self.engine.has_unfinished():
                    self._timed_step(LLMEngine.step)
        except BaseException as e:  # noqa: BLE001 - recorded, reported through status
            log.exception("engine loop crashed")
            self.error = e
        finally:
            self._fail_pending()

    def _run_lockstep(self) -> None:
        busy = False  # did any rank have work last time: then never block before agreeing
        while True:
            self._drain(block=not busy and not self.engine.has_unfinished())
            busy, stopping = self.lockstep.agree(self.engine.has_unfinished(), self._stop.is_set())
            if stopping:
                self._stop.set()
                return
            if busy:
                self._timed_step(self.lockstep.step)

    def _timed_step(self, step) -> None:
        t0 = time.perf_counter()
        outputs = step(self.engine)
        self.step_seconds += time.perf_counter() - t0
        self.steps += 1
        if outputs:
            self.on_outputs(outputs)

    def _fail_pending(self) -> None:
        with self._submit_lock:
            self._closed = True
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not None and not item[2].done():
                item[2].set_exception(RuntimeError("engine loop stopped"))
