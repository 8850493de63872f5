"""The cost model: how many seconds a graph node and a weight transfer take.

The scheduler only compares plans, so the model needs the right proportions more than the
right absolute numbers: compute throughput, device memory bandwidth (elementwise nodes are
bound by it), link bandwidth (weights moving from disk or host to the device) and two fixed
costs, one per transfer and one per node.

Importing this module does not import torch; only :meth:`CostModel.calibrate` runs it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

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

    def __post_init__(self) -> None:
        for name in ("compute_flops_per_s", "memory_bytes_per_s", "link_bytes_per_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"CostModel: {name} must be > 0, got {value!r}")
        for name in ("link_latency_s", "node_overhead_s", "copy_interference"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"CostModel: {name} must be >= 0, got {value!r}")

    def node_seconds(self, flops: float, memory_bytes: int) -> float:
        """Seconds one node takes: bound by compute or by memory traffic, plus dispatch.

        Parameters
        ----------
        flops:
            Floating-point operations of the node.
        memory_bytes:
            Bytes the node reads plus writes.

        Returns
        -------
        float
            ``max(flops / compute, memory_bytes / memory_bandwidth) + node_overhead_s``.
        """
        return (
            max(flops / self.compute_flops_per_s, memory_bytes / self.memory_bytes_per_s)
            + self.node_overhead_s
        )

    def transfer_seconds(self, nbytes: int) -> float:
        """Seconds one transfer of ``nbytes`` takes on the link: ``nbytes / bw + latency``."""
        return nbytes / self.link_bytes_per_s + self.link_latency_s

    def to_dict(self) -> dict[str, float]:
        """The model as plain floats, for the Plan record and JSON."""
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CostModel":
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: float(v) for k, v in data.items()})

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
        cls, device: "str | torch.device", *, link_bytes_per_s: float | None = None
    ) -> "CostModel":
        """Measure compute throughput, memory bandwidth and node overhead on ``device``.

        Takes well under half a second: one matmul size for FLOP/s, one large copy for memory
        bandwidth, a loop of tiny additions for dispatch cost. The link bandwidth and latency
        keep :meth:`for_device`'s defaults unless ``link_bytes_per_s`` is given. Plans made
        with a calibrated model depend on the machine's load; use :meth:`for_device` where
        plans must be reproducible.

        Parameters
        ----------
        device:
            Device to measure on.
        link_bytes_per_s:
            Transfer bandwidth to use instead of the default, bytes per second.

        Returns
        -------
        CostModel
        """
        import torch

        base = cls.for_device(device, link_bytes_per_s=link_bytes_per_s)  # checks both arguments first
        dev = torch.device(device)

        def sync() -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        def best_of(fn: Any, reps: int) -> float:
            fn()  # warm-up: first calls pay for allocation and kernel selection
            sync()
            best = float("inf")
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                sync()
                best = min(best, time.perf_counter() - start)
            return max(best, 1e-9)

        if dev.type == "cpu":
            # 2 x 4 MB: within the budget margin, so calibrating never pushes a CPU budget over.
            n, dtype, copy_numel = 512, torch.float32, 2**20
        else:
            n, dtype, copy_numel = 4096, torch.bfloat16, 64 * 2**20
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        out = torch.empty(n, n, device=dev, dtype=dtype)
        matmul_s = best_of(lambda: torch.mm(a, b, out=out), 3)
        compute = 2.0 * n**3 / matmul_s

        src = torch.empty(copy_numel, device=dev, dtype=torch.float32)
        dst = torch.empty_like(src)
        src.fill_(1.0)
        copy_s = best_of(lambda: dst.copy_(src), 3)
        memory = 2.0 * src.numel() * src.element_size() / copy_s

        tiny = torch.ones(8, device=dev)
        loops = 200

        def dispatch() -> None:
            for _ in range(loops):
                torch.add(tiny, tiny, out=tiny)

        overhead = best_of(dispatch, 2) / loops
        model = cls(
            compute_flops_per_s=compute,
            memory_bytes_per_s=memory,
            link_bytes_per_s=base.link_bytes_per_s,
            link_latency_s=base.link_latency_s,
            node_overhead_s=overhead,
            copy_interference=base.copy_interference,
        )
        logger.info("calibrated cost model on %s: %s", dev, model.to_dict())
        return model


def _device_type(device: Any) -> str:
    """The device type (``"cuda"`` of ``"cuda:1"``) of a string or ``torch.device``."""
    kind = getattr(device, "type", None)
    if kind is None:
        kind = str(device).split(":", 1)[0]
    return str(kind).strip().lower()
