"""The process metrics (memory, CPU, open file descriptors), in multiprocess mode too (private).

prometheus_client's :class:`~prometheus_client.ProcessCollector` reads
``/proc/<pid>`` of one process. With one process that is all there is. In
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, ``uvicorn --workers N``) a
scrape reaches one worker, so reporting that worker's own figures would show a
different process at every scrape. :class:`ProcessMetrics` then reports the
workers together instead: every process that wrote samples into the directory
(its pid is in the file names, ``counter_<pid>.db``) and is still running,
summed (memory, CPU seconds, open descriptors), with the earliest start time
and the smallest descriptor limit. CPU seconds of a worker that exited leave
the sum, which ``rate()`` reads as a counter reset.

Linux only (``/proc``); elsewhere the families are simply absent.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prometheus_client import ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["ProcessMetrics", "worker_pids"]

#: the pid at the end of a multiprocess file name (``gauge_livesum_1234.db``)
_PID = re.compile(r"_(\d+)\.db$")

#: how each family of several processes combines: summed, or the smallest value
_COMBINE: dict[str, Callable[[list[float]], float]] = {
    "process_virtual_memory_bytes": sum,
    "process_resident_memory_bytes": sum,
    "process_cpu_seconds": sum,
    "process_open_fds": sum,
    "process_max_fds": min,
    "process_start_time_seconds": min,
}


def worker_pids(directory: str | os.PathLike[str], proc: str = "/proc") -> list[int]:
    """The pids named in a multiprocess directory's files that are still running."""
    pids: set[int] = set()
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        m = _PID.search(name)
        if m is not None:
            pids.add(int(m.group(1)))
    return sorted(p for p in pids if Path(proc, str(p)).is_dir())


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


class ProcessMetrics(Collector):
    """``process_*`` of this process, or of every live worker in multiprocess mode."""

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
        self._own = ProcessCollector(proc=proc, registry=None)

    def collect(self) -> Iterable[Metric]:
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not directory:
            return self._own.collect()
        pids = worker_pids(directory, self._proc) or [os.getpid()]
        return list(self._combined(pids))

    def _combined(self, pids: list[int]) -> Iterator[Metric]:
        values: dict[str, list[float]] = {}
        docs: dict[str, tuple[str, str]] = {}
        for pid in pids:
            collector = ProcessCollector(pid=_constant(pid), proc=self._proc, registry=None)
            for family in collector.collect():
                for s in family.samples:
                    if s.name.endswith("_created"):
                        continue
                    values.setdefault(family.name, []).append(s.value)
                docs[family.name] = (family.documentation, family.type)
        for name, found in values.items():
            combine = _COMBINE.get(name, sum)
            doc, kind = docs[name]
            doc = f"{doc} Summed over the live workers." if combine is sum else doc
            value = float(combine(found))
            if kind == "counter":
                yield CounterMetricFamily(name, doc, value=value)
            else:
                yield GaugeMetricFamily(name, doc, value=value)
