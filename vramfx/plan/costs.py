"""The cost model: how many seconds a graph node and a weight transfer take.

The scheduler only compares plans, so the model needs the right proportions more than the
right absolute numbers: compute throughput, device memory bandwidth (elementwise nodes are
bound by it), link bandwidth (weights moving from disk or host to the device) and two fixed
costs, one per transfer and one per node.

Importing this module does not import torch; only :meth:`CostModel.calibrate` runs it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from vramfx.plan.types import Liveness

logger = logging.getLogger(__name__)

# Defaults per device type, chosen to be reproducible, not measured: plans made with them are
# the same on every machine. ``calibrate`` measures instead.
_DEFAULTS: dict[str, dict[str, float]] = {
    # A 2-core-class CPU; the link is a read from the page cache into the arena.
    "cpu": {
        "compute_flops_per_s": 50e9,
        "memory_bytes_per_s": 10e9,
        "link_bytes_per_s": 4e9,
        "link_latency_s": 10e-6,
        "node_overhead_s": 5e-6,
        # The reader's copy takes a core from kernels that use them all; their threads wait
        # for the slowest one, so compute loses about the whole copy time (measured ~1.0 on
        # 2 cores: 660 MB streamed added 184 ms to a 397 ms call, copying alone took 178 ms).
        "copy_interference": 1.0,
        # Reads the page cache does not hold: an assumed SSD-class 1 GB/s, not measured
        # (vramfx.measure.link_bytes_per_s(..., bypass_page_cache=True) measures one).
        "disk_bytes_per_s": 1e9,
    },
    # A datacenter GPU in bf16; the link is PCIe from pinned host memory.
    "cuda": {
        "compute_flops_per_s": 100e12,
        "memory_bytes_per_s": 2e12,
        "link_bytes_per_s": 20e9,
        "link_latency_s": 10e-6,
        "node_overhead_s": 10e-6,
        # Copy engines do not take SMs; only memory bandwidth is shared.
        "copy_interference": 0.02,
        "disk_bytes_per_s": 2e9,
    },
    # Apple silicon: unified memory, so the "link" is a memory copy.
    "mps": {
        "compute_flops_per_s": 10e12,
        "memory_bytes_per_s": 200e9,
        "link_bytes_per_s": 50e9,
        "link_latency_s": 20e-6,
        "node_overhead_s": 20e-6,
    },
}


@dataclass(frozen=True)
class CostModel:
    """Throughputs and fixed costs the scheduler turns FLOPs and bytes into seconds with.

    Attributes
    ----------
    compute_flops_per_s:
        Dense matmul / convolution throughput.
    memory_bytes_per_s:
        Device memory bandwidth; nodes that do little arithmetic per byte are bound by it.
    link_bytes_per_s:
        Weight transfer bandwidth, from disk or host memory into the device arena.
    link_latency_s:
        Fixed cost of one transfer, however small.
    node_overhead_s:
        Fixed cost of dispatching one graph node.
    copy_interference:
        Seconds of compute lost per second of transfer running beside it: about 1 on a CPU
        whose cores all compute, near 0 for a GPU's copy engine. It is what makes keeping a
        weight resident beat streaming it under compute that hides the copy.
    copy_slowdown:
        How much longer a copy takes beside the kernels than alone (``link_bytes_per_s`` is
        measured alone): on a CPU the copy's core shares memory bandwidth and cache with them,
        and its thread is descheduled while theirs run. 1 by default; ``calibrate`` measures it
        on a CPU.
    rates:
        FLOP/s by kind of kernel and dtype (``(("matmul:bfloat16", 2e10), ...)``), as
        :meth:`calibrate` measures them: a CPU may run bf16 matmuls several times slower than
        fp32 ones, and convolutions and attention at other rates again. ``"memory:<dtype>"``
        keys are bytes/s of memory-bound nodes in that dtype. A node whose kind is
        not listed runs at ``compute_flops_per_s``. Empty by default.
    time_nodes:
        Whether compile times each node of a graph at its own shapes before planning
        (:mod:`vramfx.plan.timing`) and prices with those times: predictions that hold within
        the machine's own drift, for a second or two per compile. Set by
        ``calibrate(..., time_nodes=True)``; off by default, so plans stay reproducible.

    Examples
    --------
    >>> cm = CostModel(compute_flops_per_s=1e9, memory_bytes_per_s=1e9, link_bytes_per_s=1e9,
    ...                link_latency_s=0.0, node_overhead_s=0.0)
    >>> cm.node_seconds(2e9, 10**9)
    2.0
    >>> cm.transfer_seconds(5 * 10**8)
    0.5
    """

    compute_flops_per_s: float
    memory_bytes_per_s: float
    link_bytes_per_s: float
    link_latency_s: float = 10e-6
    node_overhead_s: float = 5e-6
    copy_interference: float = 0.0
    rates: tuple[tuple[str, float], ...] = ()
    disk_bytes_per_s: float = 1e9
    copy_slowdown: float = 1.0
    time_nodes: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rates, dict):
            object.__setattr__(self, "rates", tuple(sorted((str(k), float(v)) for k, v in self.rates.items())))
        for key, value in self.rates:
            if not value > 0:
                raise ValueError(f"CostModel: rate {key!r} must be > 0, got {value!r}")
        object.__setattr__(self, "_rate_of", dict(self.rates))  # not a field: out of eq and asdict
        for name in ("compute_flops_per_s", "memory_bytes_per_s", "link_bytes_per_s", "disk_bytes_per_s",
                     "copy_slowdown"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"CostModel: {name} must be > 0, got {value!r}")
        for name in ("link_latency_s", "node_overhead_s", "copy_interference"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"CostModel: {name} must be >= 0, got {value!r}")

    def node_seconds(self, flops: float, memory_bytes: int, op_class: str = "") -> float:
        """Seconds one node takes: bound by compute or by memory traffic, plus dispatch.

        Parameters
        ----------
        flops:
            Floating-point operations of the node.
        memory_bytes:
            Bytes the node reads plus writes.
        op_class:
            The node's kind and dtype (``"matmul:bfloat16"``); its rate from ``rates`` when
            listed, else ``compute_flops_per_s``. ``"memory:<dtype>"`` names a memory-bound
            node's dtype: its bandwidth from ``rates`` when listed, else ``memory_bytes_per_s``.

        Returns
        -------
        float
            ``max(flops / compute, memory_bytes / memory_bandwidth) + node_overhead_s``.
        """
        compute, memory = self.compute_flops_per_s, self.memory_bytes_per_s
        if op_class.startswith("memory:"):
            memory = self._rate_of.get(op_class, memory)
        elif op_class:
            compute = self._rate_of.get(op_class, compute)
        return max(flops / compute, memory_bytes / memory) + self.node_overhead_s

    def transfer_seconds(self, nbytes: int) -> float:
        """Seconds one transfer of ``nbytes`` takes on the link beside the kernels:
        ``nbytes * copy_slowdown / bw + latency``."""
        return nbytes * self.copy_slowdown / self.link_bytes_per_s + self.link_latency_s

    def to_dict(self) -> dict[str, Any]:
        """The model as plain floats (``rates`` as a dict of them, when any), for the Plan
        record and JSON."""
        data: dict[str, Any] = {k: float(v) for k, v in asdict(self).items() if k not in ("rates", "time_nodes")}
        if self.rates:
            data["rates"] = dict(self.rates)
        if self.time_nodes:
            data["time_nodes"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CostModel":
        """Inverse of :meth:`to_dict`."""
        rates = data.get("rates") or {}
        numbers = {k: float(v) for k, v in data.items() if k not in ("rates", "time_nodes")}
        return cls(**numbers, rates=rates, time_nodes=bool(data.get("time_nodes", False)))

    @classmethod
    def for_device(
        cls, device: "str | torch.device", *, link_bytes_per_s: float | None = None
    ) -> "CostModel":
        """Fixed, reproducible defaults for a device type.

        Parameters
        ----------
        device:
            ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device``; only the type
            matters.
        link_bytes_per_s:
            Override of the transfer bandwidth (e.g. a slow disk), bytes per second.

        Returns
        -------
        CostModel

        Raises
        ------
        ValueError
            If the device type has no defaults.

        Examples
        --------
        >>> CostModel.for_device("cuda:0").link_bytes_per_s
        20000000000.0
        """
        kind = _device_type(device)
        if kind not in _DEFAULTS:
            raise ValueError(
                f"CostModel.for_device: no defaults for device {str(device)!r}; "
                f"use one of {sorted(_DEFAULTS)} or build a CostModel(...) by hand"
            )
        values = dict(_DEFAULTS[kind])
        if link_bytes_per_s is not None:
            if isinstance(link_bytes_per_s, bool) or not isinstance(link_bytes_per_s, (int, float)) or not (
                0 < link_bytes_per_s < float("inf")
            ):
                raise ValueError(f"link_bytes_per_s must be a positive, finite number of bytes per second, got {link_bytes_per_s!r}")
            values["link_bytes_per_s"] = float(link_bytes_per_s)
        return cls(**values)

    @classmethod
    def calibrate(
        cls,
        device: "str | torch.device",
        *,
        link_bytes_per_s: float | None = None,
        dtypes: "tuple[torch.dtype, ...] | None" = None,
        repeats: int = 5,
        time_nodes: bool = False,
    ) -> "CostModel":
        """Measure compute throughput per kind of kernel and dtype, memory bandwidth and node
        overhead on ``device``.

        Each figure is the fastest of ``3 * repeats`` samples taken after warm-up runs (a
        process's first kernels pay for thread pools and kernel selection; another process's load
        only slows a sample, by several times where a kernel's threads wait for a descheduled one),
        each sample looping the kernel for at least 2 ms: matmuls (as a Linear runs them), convolutions and attention in every dtype of ``dtypes``
        (``rates``; on a CPU bf16 matmuls may run several times slower than fp32), memory-bound
        ops (additions, activations, a norm's steps, softmax) per dtype for memory bandwidth, a loop of tiny additions for dispatch cost. Takes a second or two on a
        CPU. The link keeps :meth:`for_device`'s default unless ``link_bytes_per_s`` is given
        (:func:`vramfx.measure.link_bytes_per_s` measures one). Plans made with a calibrated model
        depend on the machine and its load; use :meth:`for_device` where plans must be
        reproducible.

        Parameters
        ----------
        device:
            Device to measure on.
        link_bytes_per_s:
            Transfer bandwidth to use instead of the default, bytes per second.
        dtypes:
            The dtypes to measure kernels in; by default float32, bfloat16 and float16.
        repeats:
            A third of the samples per figure (the fastest is kept).
        time_nodes:
            Also time each graph node at its own shapes when compiling with this model
            (see the ``time_nodes`` attribute).

        Returns
        -------
        CostModel
            ``compute_flops_per_s`` is the matmul rate in float32 on a CPU, bfloat16 on CUDA.
        """
        import math

        import torch

        base = cls.for_device(device, link_bytes_per_s=link_bytes_per_s)  # checks both arguments first
        dev = torch.device(device)
        dtypes = dtypes or (torch.float32, torch.bfloat16, torch.float16)

        def sync() -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        def fastest(fn: Any, min_seconds: float = 0.002) -> float:
            """Seconds of one ``fn()``: the fastest of up to ``3 * repeats`` short samples, each looping
            long enough to time. Other processes' load only ever slows a sample (a kernel whose
            threads wait for a descheduled one runs many times slower), so the fastest is the
            machine's own; short samples find the gaps in a load that long ones would not."""
            for _ in range(2):  # the first calls pay for allocation, threads and kernel choice
                fn()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            loops = max(1, min(1000, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-7))))
            samples: list[float] = []
            began = time.perf_counter()
            # Slow kernels (bf16 convolutions on a CPU without bf16) stop at a quarter second.
            while len(samples) < 3 * repeats and (len(samples) < 3 or time.perf_counter() - began < 0.25):
                start = time.perf_counter()
                for _ in range(loops):
                    fn()
                sync()
                samples.append((time.perf_counter() - start) / loops)
            return max(min(samples), 1e-9)

        cpu = dev.type == "cpu"
        interference, slowdown = base.copy_interference, base.copy_slowdown
        rows, n, out = (128, 1024, 512) if cpu else (4096, 4096, 4096)
        rates: dict[str, float] = {}
        for dtype in dtypes:
            name = str(dtype).removeprefix("torch.")
            a = torch.randn(rows, n, device=dev).to(dtype)
            # As a Linear runs in a model: against weights stored (out, in), i.e. transposed, each
            # a different one whose bytes are not in the core's cache. On a CPU, fp32 weights
            # total twice the last-level cache, up to 64 MiB (freed before any plan): a product
            # over weights that fit in cache ran ~25% faster than a model's Linears. Without
            # native bf16 a CPU computes bf16 products far slower than it reads their weights
            # (and untransposed ones ~8x slower again), so four of them suffice.
            count = 1
            if cpu:
                weight_bytes = out * n * dtype.itemsize
                out_of_cache = min(2 * last_level_cache_bytes(), 64 << 20) // weight_bytes
                count = max(4, out_of_cache) if dtype == torch.float32 else 4
            weights = [torch.randn(out, n, device=dev).to(dtype) for _ in range(count)]

            def products() -> None:
                for weight in weights:
                    torch.nn.functional.linear(a, weight)

            rates[f"matmul:{name}"] = 2.0 * rows * n * out * count / fastest(products)
            channels, side = (64, 32) if cpu else (256, 64)
            x = torch.randn(1, channels, side, side, device=dev).to(dtype)
            w = torch.randn(channels, channels, 3, 3, device=dev).to(dtype)
            conv_flops = 2.0 * channels * side * side * channels * 9
            rates[f"conv:{name}"] = conv_flops / fastest(lambda: torch.nn.functional.conv2d(x, w, padding=1))
            heads, tokens, dim = (4, 256, 64) if cpu else (16, 2048, 128)
            q = torch.randn(1, heads, tokens, dim, device=dev).to(dtype)
            attention_flops = 4.0 * heads * tokens * tokens * dim
            rates[f"attention:{name}"] = attention_flops / fastest(
                lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
            rates[f"memory:{name}"] = _elementwise_bytes_per_s(torch, dev, dtype, fastest, cpu)
            if cpu and dtype == torch.float32:
                interference, slowdown = _copy_beside(products, fastest(products))
            del a, weights, x, w, q
        compute = rates.get("matmul:float32" if cpu else "matmul:bfloat16") or max(rates.values())
        memory = rates.get("memory:float32" if cpu else "memory:bfloat16") or base.memory_bytes_per_s

        tiny = torch.ones(8, device=dev)
        loops = 200
        add = torch.ops.aten.add.Tensor

        def dispatch() -> None:
            # As a graph node runs: an aten op called from Python, allocating its output.
            for _ in range(loops):
                add(tiny, tiny)

        overhead = fastest(dispatch) / loops
        model = cls(
            compute_flops_per_s=compute,
            memory_bytes_per_s=memory,
            link_bytes_per_s=base.link_bytes_per_s,
            link_latency_s=base.link_latency_s,
            node_overhead_s=overhead,
            copy_interference=interference,
            rates=rates,
            disk_bytes_per_s=base.disk_bytes_per_s,
            copy_slowdown=slowdown,
            time_nodes=time_nodes,
        )
        logger.info("calibrated cost model on %s: %s", dev, model.to_dict())
        return model


def priced_node_seconds(liveness: "Liveness", cost_model: CostModel) -> list[float]:
    """Seconds of each node of ``liveness``, as the scheduler and reports price them.

    A node timed at its own shapes (``liveness.timed_seconds``) takes its measured time; one left
    untimed is priced by ``cost_model``, scaled by how timing found the priced ones of its kind
    (``op_class``) to run: measured over priced, summed over the timed nodes of that kind.
    """
    priced = [
        cost_model.node_seconds(f, m, liveness.op_class(t))
        for t, (f, m) in enumerate(zip(liveness.flops, liveness.memory_bytes))
    ]
    timed = liveness.timed_seconds
    if not timed:
        return priced
    measured: dict[str, float] = {}
    estimated: dict[str, float] = {}
    for t, seconds in enumerate(timed):
        if seconds is not None:
            kind = liveness.op_class(t)
            measured[kind] = measured.get(kind, 0.0) + seconds
            estimated[kind] = estimated.get(kind, 0.0) + priced[t]
    scale = {kind: measured[kind] / estimated[kind] for kind in measured if estimated[kind] > 0}
    return [
        seconds if seconds is not None else priced[t] * scale.get(liveness.op_class(t), 1.0)
        for t, seconds in enumerate(timed)
    ]


@functools.cache
def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest CPU cache the kernel reports for cpu0 (``/sys``), else ``default``."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        digits, unit = (text[:-1], text[-1]) if text[-1:] in "KMG" else (text, "")
        if digits.isdigit():
            best = max(best, int(digits) << {"K": 10, "M": 20, "G": 30, "": 0}[unit])
    return best or default


def _copy_beside(products: Any, alone_s: float, trials: int = 5, copy_bytes: int = 8 << 20,
                 seconds: float = 0.05) -> tuple[float, float]:
    """``(copy_interference, copy_slowdown)`` on a CPU: a thread copies memory, as the reader's
    ``pread`` from the page cache does (one core, no torch threads), while ``products`` (matmuls
    taking ``alone_s`` alone) run beside it for ``seconds``. Interference is the share of the
    products' time lost while the copy runs; slowdown, a copy's time beside them over its time
    alone. Medians of ``trials``, capped at 4 and 8 (a load that stalls one side is not the
    machine's figure)."""
    source, target = bytearray(copy_bytes), bytearray(copy_bytes)
    src = (ctypes.c_char * copy_bytes).from_buffer(source)
    dst = (ctypes.c_char * copy_bytes).from_buffer(target)

    def copy() -> None:
        ctypes.memmove(dst, src, copy_bytes)  # a foreign call: the GIL is released as in pread

    copy()
    copy_alone = min(_timed(copy) for _ in range(5))
    lost, slow = [], []
    for _ in range(trials):
        stop, copies = threading.Event(), [0]

        def copying() -> None:
            while not stop.is_set():
                copy()
                copies[0] += 1

        thread = threading.Thread(target=copying, daemon=True)
        began = time.perf_counter()
        thread.start()
        products_run = 0
        while time.perf_counter() - began < seconds:
            products()
            products_run += 1
        stop.set()
        elapsed = time.perf_counter() - began
        thread.join()
        lost.append(max(0.0, 1.0 - products_run * alone_s / elapsed))
        slow.append(elapsed / max(copies[0], 1) / copy_alone)
    return min(4.0, statistics.median(lost)), max(1.0, min(8.0, statistics.median(slow)))


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _elementwise_bytes_per_s(torch: Any, dev: Any, dtype: Any, fastest: Any, cpu: bool) -> float:
    """Bytes read plus written per second by the memory-bound ops of a model's graph (additions,
    products, activations, a norm's steps, softmax) in ``dtype``: a CPU without native bf16 converts
    each element, so bf16 ops move half the bytes of fp32 ones in about the same time."""
    rows, cols = (256, 1024) if cpu else (4096, 4096)
    x = torch.randn(rows, cols, device=dev).to(dtype)
    y = torch.randn(rows, cols, device=dev).to(dtype)
    size = x.numel() * x.element_size()
    ops = (
        (lambda: torch.add(x, y), 3 * size),
        (lambda: torch.mul(x, y), 3 * size),
        (lambda: torch.nn.functional.silu(x), 2 * size),
        (lambda: torch.pow(x, 2), 2 * size),
        (lambda: torch.rsqrt(x), 2 * size),
        (lambda: torch.softmax(x, -1), 2 * size),
        (lambda: x.float().mean(-1, keepdim=True), size + x.numel() * 4),
    )
    seconds = sum(fastest(op) for op, _ in ops)
    return sum(nbytes for _, nbytes in ops) / seconds


def _device_type(device: Any) -> str:
    """The device type (``"cuda"`` of ``"cuda:1"``) of a string or ``torch.device``."""
    kind = getattr(device, "type", None)
    if kind is None:
        kind = str(device).split(":", 1)[0]
    return str(kind).strip().lower()
