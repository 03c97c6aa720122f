"""A pool of stateful workers with one interface and two backends: in this process, or Ray actors.

An algorithm or an env drives ``n`` workers by method name (``submit(i, "method", *args)`` returns a
future; ``result(future)`` its value) and never imports Ray, so its logic is tested with
:class:`LocalPool`. :class:`RayPool` runs each worker as a Ray actor with ``cpus`` CPUs, restarted by Ray up
to ``max_restarts`` times when its process or node dies; a call on a dead worker raises
:class:`WorkerDied`, and the caller reloads the worker's state (the worker's ``__init__`` has already run
again with its original arguments). A call that reaches the restarted worker before its state was reloaded
must raise :class:`WorkerRestarted` (the worker knows it has not been loaded); that too is a
:class:`WorkerDied` for the caller.
"""

from __future__ import annotations

import contextlib
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from pamarl.errors import UsageError


class WorkerDied(RuntimeError):
    """A worker's process or node died during a call; ``index`` is the worker."""

    def __init__(self, index: int, why: str):
        super().__init__(f"worker {index} died: {why}")
        self.index = index


class WorkerRestarted(RuntimeError):
    """Raised by a worker asked to work before its state was loaded: Ray restarted it after a death."""


class _Done:
    """A local call's outcome (the call ran when it was submitted)."""

    def __init__(self, index: int, value: Any = None, error: BaseException | None = None):
        self.index, self.value, self.error = index, value, error


class WorkerPool(ABC):
    """``n`` workers, each an instance of one class, called by method name."""

    n: int

    @abstractmethod
    def submit(self, i: int, method: str, *args: Any) -> Any:
        """Start ``worker[i].method(*args)``; returns a future for :meth:`result`."""

    @abstractmethod
    def ready(self, futures: Sequence[Any], timeout: float | None = 0.0) -> list[Any]:
        """The futures of ``futures`` that have finished (waiting up to ``timeout`` s for at least one)."""

    @abstractmethod
    def result(self, future: Any) -> Any:
        """The call's return value; :class:`WorkerDied` if the worker died during it."""

    def put(self, value: Any) -> Any:
        """``value`` as an argument to send to many workers: the value itself here; a Ray object ref (stored once,
        read by every actor that gets it) in :class:`RayPool`."""
        return value

    def call_all(self, method: str, args: Sequence[tuple[Any, ...]] | None = None,
                 workers: Sequence[int] | None = None) -> list[Any]:
        """Call ``method`` on every worker (or ``workers``) in parallel and return their results in order."""
        idx = list(range(self.n)) if workers is None else list(workers)
        futs = [self.submit(i, method, *(args[k] if args is not None else ())) for k, i in enumerate(idx)]
        return [self.result(f) for f in futs]

    def close(self) -> None:  # noqa: B027 - optional
        """Release the workers."""


class LocalPool(WorkerPool):
    """Workers in this process: a call runs to completion when it is submitted (deterministic order)."""

    def __init__(self, cls: Callable[..., Any], args: Sequence[tuple[Any, ...]]):
        self.workers = [cls(*a) for a in args]
        self.n = len(self.workers)

    def submit(self, i: int, method: str, *args: Any) -> _Done:
        try:
            return _Done(i, getattr(self.workers[i], method)(*args))
        except Exception as e:  # raised when the result is asked for, as with a remote call
            return _Done(i, error=e)

    def ready(self, futures: Sequence[Any], timeout: float | None = 0.0) -> list[Any]:
        return list(futures)

    def result(self, future: Any) -> Any:
        if future.error is not None:
            raise future.error
        return future.value

    def close(self) -> None:
        for w in self.workers:
            if hasattr(w, "close"):
                w.close()


def init_ray(address: str | None = None) -> Any:
    """Import Ray and connect to (``address``: ``auto`` or ``HOST:PORT``) or start a cluster, once."""
    try:
        import ray
    except ImportError:
        raise UsageError("this needs Ray, which is not installed: pip install 'pamarl[ray]'") from None
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            ray.init(address=address, **kw)
        else:
            # A local cluster: its workers must import this same pamarl (a source checkout on PYTHONPATH too).
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}}, **kw)
    return ray


class RayPool(WorkerPool):
    """Workers as Ray actors (``cpus`` CPUs each), restarted by Ray up to ``max_restarts`` times."""

    def __init__(self, cls: Callable[..., Any], args: Sequence[tuple[Any, ...]], cpus: float = 1.0,
                 max_restarts: int = 3, address: str | None = None, name: str | None = None):
        ray = init_ray(address)
        self._ray = ray
        have = float(ray.cluster_resources().get("CPU", 0))
        if have < cpus * len(args):
            # Ray would wait for CPUs that never come: say so instead of hanging.
            raise UsageError(f"{len(args)} Ray workers of {cpus:g} CPU need {cpus * len(args):g} CPUs, but the "
                             f"cluster has {have:g}; lower the CPUs per worker (e.g. cpus_per_learner=0.5) or add "
                             "nodes")
        actor_cls = ray.remote(cls)
        self.name = name
        self.actors = [actor_cls.options(num_cpus=cpus, max_restarts=max_restarts, max_task_retries=0,
                                         name=f"{name}-{i}" if name else None).remote(*a) for i, a in enumerate(args)]
        self.n = len(self.actors)
        self._index: dict[Any, int] = {}

    def put(self, value: Any) -> Any:
        return self._ray.put(value)

    def submit(self, i: int, method: str, *args: Any) -> Any:
        ref = getattr(self.actors[i], method).remote(*args)
        self._index[ref] = i
        return ref

    def ready(self, futures: Sequence[Any], timeout: float | None = 0.0) -> list[Any]:
        if not futures:
            return []
        done, _ = self._ray.wait(list(futures), num_returns=len(futures), timeout=timeout)
        if not done and timeout is None:
            done, _ = self._ray.wait(list(futures), num_returns=1)
        return list(done)

    def result(self, future: Any) -> Any:
        from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

        i = self._index.pop(future, -1)
        try:
            return self._ray.get(future)
        except (RayActorError, ObjectLostError) as e:  # lost: the result was on a node that died since
            raise WorkerDied(i, type(e).__name__) from e
        except RayTaskError as e:
            if isinstance(getattr(e, "cause", None), WorkerRestarted):
                raise WorkerDied(i, "restarted with a fresh state") from e
            raise

    def wait_alive(self, i: int, timeout: float = 180.0) -> None:
        """Block until worker ``i`` answers again (Ray is restarting it: a new process that imports torch, which
        takes a minute or more on a loaded machine)."""
        from ray.exceptions import GetTimeoutError, RayActorError

        deadline = time.time() + timeout
        while True:
            try:
                self._ray.get(self.actors[i].__ray_ready__.remote(), timeout=max(1.0, deadline - time.time()))
                return
            except (RayActorError, GetTimeoutError) as e:
                if time.time() > deadline:
                    raise WorkerDied(i, f"not restarted within {timeout:.0f} s") from e
                time.sleep(0.2)

    def close(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):  # already gone
                self._ray.kill(a)


def make_pool(backend: str, cls: Callable[..., Any], args: Sequence[tuple[Any, ...]], cpus: float = 1.0,
              max_restarts: int = 3, address: str | None = None, name: str | None = None) -> WorkerPool:
    """``local``: :class:`LocalPool`; ``ray``: :class:`RayPool`; ``auto``: Ray when it is installed."""
    if backend == "auto":
        import importlib.util

        backend = "ray" if importlib.util.find_spec("ray") is not None else "local"
    if backend == "local":
        return LocalPool(cls, args)
    if backend == "ray":
        return RayPool(cls, args, cpus=cpus, max_restarts=max_restarts, address=address, name=name)
    raise UsageError(f"unknown backend {backend!r}: use local, ray or auto")
