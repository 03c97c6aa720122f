"""Env copies in spawned worker processes: the plumbing shared by every family that steps copies elsewhere.

A worker builds its share of the copies, answers ``("ok", hello)`` (or ``("error", message)``) and then serves
``(command, argument)`` requests from a pipe until ``close``; :class:`WorkerProcs` is the parent's side: the
contiguous slices of the ``E`` copies, the processes, requests to one worker or all of them, errors turned into
exceptions (a worker's :class:`UsageError` stays a UsageError) and an orderly shutdown.
Used by :class:`pamarl.envs.vector.VectorEnv` (PettingZoo/MPE/MaMuJoCo copies) and
:class:`pamarl.envs.magent_workers.MAgentWorkers`.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from pamarl.errors import UsageError

Handlers = dict[str, Callable[[Any], Any]]


def serve(conn: Connection, build: Callable[[], tuple[Any, Handlers, Callable[[], None]]], spin_s: float = 0.0) -> None:
    """The worker's loop: ``build()`` -> (hello, command handlers, close); then answer requests until ``close``.

    ``spin_s > 0``: after each answer, poll for the next request for up to that long before sleeping in the kernel.
    Waking a sleeping process costs tens of microseconds (more in VMs), per step and per worker; a worker that
    is asked again within ``spin_s`` (the next env step) skips it, and one that is not (an update) stops spinning.
    """
    import signal
    import time

    # Ctrl-C reaches the whole process group: the parent decides when to stop (after writing a
    # checkpoint) and closes the workers; a worker dying on its own would only lose that checkpoint.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        hello, handlers, close = build()
    except BaseException as e:  # report construction errors to the parent instead of hanging
        conn.send(("error", f"{type(e).__name__}: {e}"))
        conn.close()
        return
    conn.send(("ok", hello))
    while True:
        if spin_s > 0:
            until = time.perf_counter() + spin_s
            while not conn.poll() and time.perf_counter() < until:
                pass
        try:
            cmd, arg = conn.recv()
        except EOFError:
            break
        try:
            if cmd == "close":
                close()
                conn.send(("ok", None))
                break
            conn.send(("ok", handlers[cmd](arg)))
        except BaseException as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))
    conn.close()


def split(n: int, parts: int) -> list[slice]:
    """``parts`` contiguous, near-equal slices of ``range(n)``."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [slice(int(bounds[w]), int(bounds[w + 1])) for w in range(parts)]


class WorkerProcs:
    """``W`` spawned workers, worker ``w`` holding copies ``slices[w]`` of the ``E`` copies.

    ``target(conn, *args_of(slices[w]))`` runs in worker ``w`` and calls :func:`serve`; ``hellos`` are the
    workers' first answers. ``slices`` (default: ``W`` near-equal ones) may leave copies to the caller.
    """

    def __init__(self, target: Callable[..., None], num_envs: int, workers: int,
                 args_of: Callable[[slice], tuple[Any, ...]], what: str, slices: Sequence[slice] | None = None):
        self.what = what
        self.slices = list(slices) if slices is not None else split(num_envs, workers)
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        self._closed = False
        ctx = mp.get_context("spawn")  # forking a process that has loaded torch is unsafe; spawned workers stay light
        for sl in self.slices:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=target, args=(child, *args_of(sl)), daemon=True)
            p.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(p)
        try:
            self.hellos = [self._recv(c) for c in self._conns]
        except BaseException:
            self.close()
            raise

    def _recv(self, conn: Connection) -> Any:
        try:
            status, payload = conn.recv()
        except EOFError as e:
            raise RuntimeError(f"a {self.what} worker process died; see its traceback above") from e
        if status == "error":
            if payload.startswith("UsageError: "):
                raise UsageError(payload[len("UsageError: "):])
            raise RuntimeError(f"{self.what} worker failed: {payload}")
        return payload

    def post(self, cmd: str, args: Sequence[Any]) -> None:
        """Send ``(cmd, args[w])`` to every worker; they (and the caller) work until :meth:`collect`."""
        for conn, a in zip(self._conns, args):
            conn.send((cmd, a))

    def collect(self, spin: bool = False) -> list[Any]:
        """The answers to the last :meth:`post`, in worker order; ``spin``: poll for them rather than sleep."""
        if spin:
            for c in self._conns:
                while not c.poll():
                    pass
        return [self._recv(c) for c in self._conns]

    def broadcast(self, cmd: str, args: Sequence[Any]) -> list[Any]:
        """:meth:`post` then :meth:`collect`."""
        self.post(cmd, args)
        return self.collect()

    def ask(self, w: int, cmd: str, arg: Any) -> Any:
        """One request to worker ``w``."""
        self._conns[w].send((cmd, arg))
        return self._recv(self._conns[w])

    def ask_copy(self, index: int, cmd: str) -> Any:
        """``cmd`` with the local index of copy ``index`` to the worker holding it."""
        for w, sl in enumerate(self.slices):
            if sl.start <= index < sl.stop:
                return self.ask(w, cmd, index - sl.start)
        raise IndexError(index)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            with contextlib.suppress(BrokenPipeError, EOFError, OSError):
                conn.send(("close", None))
                conn.recv()
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
