"""Where preparation work runs: threads on this machine, or Ray tasks spread over a Ray
cluster's CPUs (and a GPU for CREPE where the cluster has one).

    Executor(workers=4)                       threads here (the default)
    Executor(ray_address="auto")              Ray tasks on the cluster at that address
    Executor(ray_address="local")             Ray tasks on a local Ray started here (--ray)

`map(fn, items)` calls fn(item) for every item and returns the results in the items' order;
the first error is raised as it is (the rest are cancelled). Ray tasks need `fn` and its items
picklable (module-level functions or closures over plain values), and every path they read or
write must be reachable from every node (an s3:// output, a shared folder).
"""
from __future__ import annotations

import concurrent.futures
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Executor:
    """Runs preparation work on threads (`workers`) or as Ray tasks (`ray_address`; "local"
    starts a local Ray). `gpu_share`: the GPU fraction of a task marked `gpu=True` when the
    cluster has GPUs (CREPE)."""

    def __init__(self, workers: int = 2, ray_address: str | None = None,
                 gpu_share: float = 0.25):
        self.workers = max(1, int(workers))
        self.ray_address = ray_address
        self.gpu_share = gpu_share
        self._started_ray = False

    @property
    def on_ray(self) -> bool:
        return self.ray_address is not None

    def __enter__(self) -> "Executor":
        if self.on_ray:
            import ray

            from tsdsae.ray_train import init_ray

            if not ray.is_initialized():
                init_ray(None if self.ray_address == "local" else self.ray_address,
                         worker_logs=False)
                self._started_ray = True
        return self

    def __exit__(self, *exc) -> None:
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def describe(self) -> str:
        if not self.on_ray:
            return f"{self.workers} threads"
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 0))
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
        return f"Ray: {cpus} CPUs on {nodes} node{'s' * (nodes != 1)}"

    def map(self, fn: Callable[[T], R], items: Sequence[T], gpu: bool = False,
            done: Callable[[T], None] | None = None) -> list[R]:
        """[fn(item) for item in items], run in parallel; `done(item)` after each one
        finishes (progress). Raises the first error."""
        items = list(items)
        if not items:
            return []
        if self.on_ray:
            return self._map_ray(fn, items, gpu, done)
        out: list = [None] * len(items)
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
            try:
                for future in concurrent.futures.as_completed(futures):
                    i = futures[future]
                    out[i] = future.result()
                    if done is not None:
                        done(items[i])
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return out

    def _map_ray(self, fn, items, gpu: bool, done) -> list:
        import ray

        options = {"num_cpus": 1, "max_retries": 2}
        if gpu and ray.cluster_resources().get("GPU", 0) > 0:
            options["num_gpus"] = self.gpu_share
        task = ray.remote(_call).options(**options)
        fn_ref = ray.put(fn)
        refs = [task.remote(fn_ref, item) for item in items]
        index = {ref: i for i, ref in enumerate(refs)}
        out: list = [None] * len(items)
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    i = index[ref]
                    out[i] = _unwrap(ray.get(ref))
                    if done is not None:
                        done(items[i])
        except BaseException:
            for ref in pending:
                ray.cancel(ref)
            raise
        return out


def _call(fn, item):
    """A Ray task: fn(item), with an error returned (not raised) so that it reaches the
    driver as the error it is, not as Ray's RayTaskError wrapper."""
    try:
        return ("ok", fn(item))
    except Exception as exc:  # noqa: BLE001 - re-raised on the driver by _unwrap
        return ("error", exc)


def _unwrap(result):
    kind, value = result
    if kind == "error":
        raise value
    return value


def add_ray_options(p) -> None:
    """--ray / --address: run the preparation as Ray tasks (a local Ray, or a cluster)."""
    group = p.add_argument_group("Ray (spread the work over a cluster's CPUs)")
    group.add_argument("--ray", action="store_true",
                       help="run the work as Ray tasks on a local Ray started here")
    group.add_argument("--address", help="run the work as Ray tasks on the Ray cluster at this "
                                         "address ('auto' = the one this machine belongs to)")


def executor_from_args(args) -> Executor:
    address = args.address or ("local" if args.ray else None)
    return Executor(workers=getattr(args, "workers", 2), ray_address=address)


__all__ = ["Executor", "add_ray_options", "executor_from_args"]
