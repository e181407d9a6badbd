"""GPU utilization sampled while a benchmark runs, through NVML (the `pynvml` module of the
`nvidia-ml-py` package), when it is importable and finds a GPU.

Two sources, best first:
- GPM (GPU Performance Monitoring, Hopper and later): SM activity (`NVML_GPM_METRIC_SM_UTIL`, the
  share of SMs busy over the interval) and SM occupancy, computed between two GPM samples: the
  counters the paper's utilization figures approximate (section 5.4).
- `nvmlDeviceGetUtilizationRates().gpu`: the share of time any kernel ran (one busy SM counts
  as busy), for GPUs without GPM.
Without NVML (CPU machines) the monitor reports None: no error.
"""

from __future__ import annotations

import contextlib
import threading
from types import ModuleType
from typing import Any, NamedTuple


class GpuUtil(NamedTuple):
    util_pct: float | None       # mean over the run: SM activity (GPM) or NVML utilization
    source: str | None           # "nvml-gpm-sm-util", "nvml-utilization" or None (no NVML)
    sm_occupancy_pct: float | None  # GPM only
    samples: int


NO_GPU = GpuUtil(None, None, None, 0)


def _nvml_errors(nv: ModuleType) -> tuple[type[BaseException], ...]:
    # NVMLError covers a missing library or driver and unsupported calls; AttributeError an
    # older binding without a function.
    return (getattr(nv, "NVMLError", OSError), AttributeError, OSError)


def _import_nvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


class GpuMonitor:
    """Samples one GPU every `interval_s` on a background thread between start() and stop().

    NOTE: NVML is initialized once in open() and shut down in close(); a sampler thread lives only
    between start() and stop(), so one monitor serves a whole sweep.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.2, nvml: ModuleType | None = None) -> None:
        self.device_index = device_index
        self.interval_s = interval_s
        self._nvml = nvml
        self._handle: Any = None
        self._gpm = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._util: list[float] = []
        self._occ: list[float] = []

    def open(self) -> bool:
        """True if a GPU can be sampled."""
        nv = self._nvml if self._nvml is not None else _import_nvml()
        if nv is None:
            return False
        try:
            nv.nvmlInit()
            self._handle = nv.nvmlDeviceGetHandleByIndex(self.device_index)
        except _nvml_errors(nv):  # no driver, no GPU: a CPU machine
            return False
        self._nvml = nv
        try:
            self._gpm = bool(nv.nvmlGpmQueryDeviceSupport(self._handle).isSupportedDevice)
        except _nvml_errors(nv):  # an older driver or binding without GPM
            self._gpm = False
        return True

    def close(self) -> None:
        if self._handle is not None and self._nvml is not None:
            with contextlib.suppress(*_nvml_errors(self._nvml)):
                self._nvml.nvmlShutdown()
        self._handle = None

    def start(self) -> None:
        if self._handle is None:
            return
        self._util, self._occ = [], []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> GpuUtil:
        if self._thread is None:
            return NO_GPU
        self._stop.set()
        self._thread.join(10 * self.interval_s + 5)
        self._thread = None
        if not self._util:
            return NO_GPU
        source = "nvml-gpm-sm-util" if self._gpm else "nvml-utilization"
        occ = sum(self._occ) / len(self._occ) if self._occ else None
        return GpuUtil(sum(self._util) / len(self._util), source, occ, len(self._util))

    def _run(self) -> None:
        if self._gpm:
            try:
                self._run_gpm()
                return
            except _nvml_errors(self._nvml):  # GPM refused at run time (e.g. not permitted): fall back
                self._gpm = False
                self._util, self._occ = [], []
        nv = self._nvml
        while not self._stop.wait(self.interval_s):
            try:
                self._util.append(float(nv.nvmlDeviceGetUtilizationRates(self._handle).gpu))
            except _nvml_errors(nv):
                return

    def _run_gpm(self) -> None:
        nv = self._nvml
        prev, cur = nv.nvmlGpmSampleAlloc(), nv.nvmlGpmSampleAlloc()
        try:
            nv.nvmlGpmSampleGet(self._handle, prev)
            while not self._stop.wait(self.interval_s):
                nv.nvmlGpmSampleGet(self._handle, cur)
                get = nv.c_nvmlGpmMetricsGet_t()
                get.version = nv.NVML_GPM_METRICS_GET_VERSION
                get.numMetrics = 2
                get.sample1, get.sample2 = prev, cur
                get.metrics[0].metricId = nv.NVML_GPM_METRIC_SM_UTIL
                get.metrics[1].metricId = nv.NVML_GPM_METRIC_SM_OCCUPANCY
                nv.nvmlGpmMetricsGet(get)
                self._util.append(float(get.metrics[0].value))
                self._occ.append(float(get.metrics[1].value))
                prev, cur = cur, prev
        finally:
            nv.nvmlGpmSampleFree(prev)
            nv.nvmlGpmSampleFree(cur)
