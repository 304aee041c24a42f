"""Parameter sweeps of the durability model on Dask distributed.

Nouns:

* **grid** — every combination of the values given for K/N, repair
  threshold r (or none: no repair), grace period and node lifetime
  (:func:`grid`); a threshold that does not fit a code (k < r <= n) is left
  out for that code.
* **point** — one :class:`~p2pbackup.sim.durability.DurabilityParams` of the
  grid, run once with the sweep's seed: every point sees the same random
  streams, so their differences come from their parameters (common random
  numbers), not from luck.
* **cluster** — where points run: a local cluster of worker processes
  (one thread each; the model is pure Python) by default, or an existing
  Dask scheduler named by its address. Dask sends the parameters and
  results between processes with its own serialisation (pickle): use a
  scheduler only on machines you trust, as with any Dask cluster.

A **sweep request** (:class:`SweepRequest`) is the grid and where to run
it. The command line runs it in a child process (:func:`run_in_child`,
``python -m p2pbackup.sim.sweep``, the request as JSON on its stdin and the
results as JSON on its stdout): trio-asyncio, which the DHT adapter
imports, patches asyncio for the whole process, and Dask's client runs on
asyncio; the child imports only the model.

This module alone imports ``distributed`` (an optional extra, ``[sim]``).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from p2pbackup.errors import UsageError
from p2pbackup.sim import durability


def grid(
    codes: Sequence[tuple[int, int]],
    thresholds: Sequence[int | None],
    grace_days: Sequence[float],
    mttf_days: Sequence[float],
    *,
    repair_days: float,
    years: float,
    nodes: int,
    packs: int,
    availability: float = 1.0,
) -> list[durability.DurabilityParams]:
    """The points of the grid (module docstring), in the order given."""
    points: list[durability.DurabilityParams] = []
    for (k, n), r, grace, mttf in itertools.product(codes, thresholds, grace_days, mttf_days):
        if r is not None and not k < r <= n:
            continue
        if r is None and grace != grace_days[0]:
            continue  # without repair the grace period changes nothing
        repair = (
            None
            if r is None
            else durability.RepairModel.with_threshold(
                k, n, r, grace_days=grace, repair_days=repair_days
            )
        )
        points.append(
            durability.DurabilityParams(
                k=k,
                n=n,
                nodes=nodes,
                packs=packs,
                node_mttf_days=mttf,
                years=years,
                repair=repair,
                availability=availability,
            )
        )
    if not points:
        raise UsageError("the sweep has no point: no repair threshold fits any of the codes")
    return points


def run_point(params: durability.DurabilityParams, seed: int) -> dict[str, Any]:
    """One point's summary (runs on a worker)."""
    return durability.summary(durability.simulate(params, random.Random(seed)))


def run_sweep(
    points: Iterable[durability.DurabilityParams],
    seed: int,
    *,
    scheduler: str | None = None,
    workers: int = 2,
) -> list[dict[str, Any]]:
    """Every point's summary, in order, run on a new local cluster of
    ``workers`` processes, or on the Dask scheduler at ``scheduler``."""
    try:
        import distributed
    except ImportError:
        raise UsageError("sweeps need Dask distributed: pip install 'p2pbackup[sim]'") from None
    points = list(points)
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout="10s")  # type: ignore[no-untyped-call]
        except OSError as exc:
            raise UsageError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
        with client:
            return _gather(client, points, seed)
    if workers < 1:
        raise UsageError(f"a local cluster needs at least 1 worker, not {workers}")
    with (
        distributed.LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster) as client,  # type: ignore[no-untyped-call]
    ):
        return _gather(client, points, seed)


def _gather(
    client: object, points: list[durability.DurabilityParams], seed: int
) -> list[dict[str, Any]]:
    futures = client.map(run_point, points, seed=seed, pure=False)  # type: ignore[attr-defined]
    results: list[dict[str, Any]] = client.gather(futures)  # type: ignore[attr-defined]
    return results


#: The version of the JSON a sweep request travels to its child process in.
REQUEST_VERSION = 1


@attrs.frozen
class SweepRequest:
    """A grid (:func:`grid`'s arguments) and where to run it (:func:`run_sweep`)."""

    codes: tuple[tuple[int, int], ...]
    thresholds: tuple[int | None, ...]
    grace_days: tuple[float, ...]
    mttf_days: tuple[float, ...]
    repair_days: float
    years: float
    nodes: int
    packs: int
    availability: float = 1.0
    seed: int = 1
    scheduler: str | None = None
    workers: int = 2


def request_to_json(request: SweepRequest) -> str:
    return json.dumps({"version": REQUEST_VERSION, **attrs.asdict(request)})


def request_from_json(text: str) -> SweepRequest:
    fields = json.loads(text)
    if fields.pop("version", None) != REQUEST_VERSION:
        raise UsageError(f"a sweep request must be of version {REQUEST_VERSION}")
    fields["codes"] = tuple((int(k), int(n)) for k, n in fields["codes"])
    for name in ("thresholds", "grace_days", "mttf_days"):
        fields[name] = tuple(fields[name])
    return SweepRequest(**fields)


def run_request(request: SweepRequest) -> list[dict[str, Any]]:
    """The summaries of every point of the request's grid, in order."""
    points = grid(
        request.codes,
        request.thresholds,
        request.grace_days,
        request.mttf_days,
        repair_days=request.repair_days,
        years=request.years,
        nodes=request.nodes,
        packs=request.packs,
        availability=request.availability,
    )
    return run_sweep(points, request.seed, scheduler=request.scheduler, workers=request.workers)


def run_in_child(request: SweepRequest) -> list[dict[str, Any]]:
    """:func:`run_request` in a child process (module docstring); its one
    error line, if it fails, as a :class:`UsageError`."""
    child = subprocess.run(
        [sys.executable, "-m", __name__],
        input=request_to_json(request).encode(),
        capture_output=True,
        check=False,
    )
    if child.returncode != 0:
        lines = child.stderr.decode(errors="replace").strip().splitlines()
        raise UsageError(lines[-1] if lines else f"the sweep failed (exit {child.returncode})")
    results: list[dict[str, Any]] = json.loads(child.stdout)
    return results


def main() -> int:
    """The child's side of :func:`run_in_child`."""
    try:
        results = run_request(request_from_json(sys.stdin.read()))
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 1
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
