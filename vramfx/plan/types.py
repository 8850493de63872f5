"""Plain data handed between the planning stages: liveness → schedule → Plan.

Nothing here knows about torch.fx or runs torch: tests build these records by hand or with
hypothesis and plan them without executing a model.

Positions ``t = 0 .. num_positions - 1`` are the compute nodes of the captured graph in
execution order. Every interval is half-open: ``[begin, end)`` — begin inclusive, end exclusive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vramfx.util import dtype_name  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class WeightLife:
    """One weight (parameter, buffer or lifted constant) and where the graph reads it.

    Attributes
    ----------
    name:
        State-dict name. Tied weights appear once, under the name the graph uses.
    nbytes:
        Bytes of the tensor as it is held on the compute device.
    uses:
        Sorted positions of every node that reads the weight, directly or through a view of it.
    spans:
        Sorted, disjoint half-open ``[begin, end)`` ranges covering ``uses``. A weight may be
        dropped and fetched again only *between* spans: inside a span a view of the weight is
        still alive, so its memory must stay put.
    shape, dtype:
        For the runtime and for humans; the planner only reads ``nbytes``. ``dtype`` is the
        name torch prints without the ``torch.`` prefix (``"float32"``): the dtype the weight
        is stored and moved in.
    compute_dtype, compute_nbytes:
        When the graph reads the weight in another dtype than it is stored in (low-precision
        storage), that dtype and the bytes of the weight in it: each span then starts with a
        cast into a buffer of ``compute_nbytes`` that lives over the span. ``None`` and 0
        otherwise.
    format:
        When the stored bytes must be decoded, not only cast (GGML blocks from a GGUF file,
        fp8 with a scale), the stored format (``"Q4_K"``, ``"float8_e4m3fn*scale"``); ``dtype``
        is then the element dtype of the stored bytes (``"uint8"`` for blocks), moved and held
        as a flat run of ``nbytes``, and each span's cast decodes. ``None`` otherwise.
    """

    name: str
    nbytes: int
    uses: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    compute_dtype: str | None = None
    compute_nbytes: int = 0
    format: str | None = None

    @property
    def first_use(self) -> int:
        return self.uses[0]

    @property
    def last_use(self) -> int:
        return self.uses[-1]


@dataclass(frozen=True)
class StoredFormat:
    """How a weight is stored when its bytes must be decoded before the graph reads them.

    Attributes
    ----------
    format:
        The stored format's name: a GGML type (``"Q4_K"``), ``"float8_e4m3fn*scale"``.
    dtype:
        The element dtype of the stored bytes, as they move (``"uint8"`` for GGML blocks).
    nbytes:
        Stored bytes: what is moved and held resident.
    workspace_bytes:
        Transient memory one decode takes on the compute device beyond its output.
    traffic_bytes:
        Memory one decode reads and writes, for the cost model.
    """

    format: str
    dtype: str
    nbytes: int
    workspace_bytes: int = 0
    traffic_bytes: int = 0


@dataclass(frozen=True)
class Liveness:
    """Everything the scheduler needs to know about one captured graph.

    Attributes
    ----------
    num_positions:
        Number of compute positions ``T``.
    weights:
        One record per weight, ordered by first use.
    activation_bytes:
        ``A(t)`` for every position: bytes of activations alive while node ``t`` runs (its inputs
        that are still needed, its output, and everything else live across it). Length ``T``.
    flops, memory_bytes:
        Per position, the floating-point operations and the bytes read plus written by node
        ``t``; the cost model turns them into seconds. Length ``T``.
    workspace_bytes:
        Transient memory kernels may take beyond their outputs (attention scores, im2col),
        the largest over all positions.
    position_names:
        The graph node at each position, for humans (plan summaries, traces). Length ``T``.
    op_classes:
        Per position, the kind of kernel and its dtype where throughput depends on them
        (``"matmul:bfloat16"``, ``"conv:float32"``, ``"attention:float32"``), else ``""``: a
        calibrated cost model prices each kind at its own rate. Empty, or length ``T``.
    timed_seconds:
        Per position, the seconds the node took when timed alone at its own shapes
        (:mod:`vramfx.plan.timing`), None where it was not; the scheduler prices with them
        (:func:`vramfx.plan.costs.priced_node_seconds`). Empty when nothing was timed.
    """

    num_positions: int
    weights: tuple[WeightLife, ...]
    activation_bytes: tuple[int, ...]
    flops: tuple[float, ...]
    memory_bytes: tuple[int, ...]
    workspace_bytes: int = 0
    position_names: tuple[str, ...] = field(default=())
    op_classes: tuple[str, ...] = field(default=())
    timed_seconds: tuple[float | None, ...] = field(default=())

    def op_class(self, position: int) -> str:
        """``op_classes[position]``, or ``""`` when they were not recorded."""
        return self.op_classes[position] if self.op_classes else ""

    @property
    def activation_peak_bytes(self) -> int:
        return max(self.activation_bytes, default=0)

    @property
    def weight_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights)

    @property
    def name_to_weight(self) -> dict[str, WeightLife]:
        return {w.name: w for w in self.weights}
