"""Where each weight comes from on a CPU: used in place from the page cache, copied, or read with
``O_DIRECT``.

On a CPU the compute device's memory *is* host memory, so a weight whose file is in the page
cache needs no copy at all: a view over a mapping of its file is the weight. The three ways to
get a weight's bytes to a CPU kernel cost:

- **in place** (a view over the mapped file): no copy, no budget bytes — the pages are the
  kernel's page cache, counted in ``RssFile`` and reclaimable, not in ``RssAnon`` (what a CPU
  budget measures). The first touch of each page costs a minor fault while the file is cached;
  a page the kernel reclaimed is read again synchronously, inside a kernel, on a compute core.
- **buffered copy** (``pread`` into the arena): ``nbytes / link`` on the reader thread, a core
  taken from the kernels (``copy_interference``), and arena bytes in the budget.
- **O_DIRECT** (``bypass_page_cache=True``): the disk controller moves the bytes, no page cache;
  the choice for a model larger than RAM, whose pages would otherwise be read inside kernels.

A weight can be used in place when it is read straight from a DiskMap file with its data 64-byte
aligned in the file, like torch's own allocations, so kernels take eager's paths and outputs stay
bit-identical. Whether it is, and whether copies go through the page cache or ``O_DIRECT``, is
priced by :mod:`vramfx.plan.reads`: while the page cache holds the weights, in place beats a copy
at every budget (it costs neither the copy's seconds nor its bytes).

Pure data in and out; the runtime finds the mappings (:func:`vramfx.runtime.sources.mapped_bytes`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from vramfx.plan.plan import Plan
from vramfx.plan.types import Liveness


def choose_in_place(
    liveness: Liveness, mappable: Collection[str], *, device_type: str, bypass_page_cache: bool
) -> frozenset[str]:
    """The weights to use in place: the ``mappable`` ones (stored in a mapped file, aligned), on a
    CPU, unless the page cache is bypassed.

    Examples
    --------
    >>> from vramfx.plan.types import WeightLife
    >>> lv = Liveness(num_positions=1, weights=(WeightLife("a", 64, (0,), ((0, 1),)),),
    ...               activation_bytes=(0,), flops=(0.0,), memory_bytes=(0,))
    >>> sorted(choose_in_place(lv, {"a"}, device_type="cpu", bypass_page_cache=False))
    ['a']
    >>> sorted(choose_in_place(lv, {"a"}, device_type="cpu", bypass_page_cache=True))
    []
    """
    if device_type != "cpu" or bypass_page_cache:
        return frozenset()
    return frozenset(w.name for w in liveness.weights if w.name in mappable and w.nbytes > 0)


def without_in_place(liveness: Liveness, names: Collection[str]) -> Liveness:
    """``liveness`` with the in-place weights at 0 bytes: the schedule keeps them resident (a
    weight of no bytes is never streamed) and counts nothing for them in the budget."""
    if not names:
        return liveness
    weights = tuple(dataclasses.replace(w, nbytes=0) if w.name in names else w for w in liveness.weights)
    return dataclasses.replace(liveness, weights=weights)


def with_in_place(plan: Plan, liveness: Liveness, names: Collection[str]) -> Plan:
    """The plan made from :func:`without_in_place`'s liveness, saying which residents are in place
    and their bytes in the file (from the original ``liveness``), which ``weight_bytes`` counts
    again."""
    if not names:
        return plan
    assert set(names) <= set(plan.resident), "an in-place weight was not made resident"
    sizes = {w.name: w.nbytes for w in liveness.weights}
    ordered = tuple(n for n in plan.resident if n in names)
    in_place_bytes = sum(sizes[n] for n in ordered)
    return dataclasses.replace(plan, in_place=ordered, in_place_bytes=in_place_bytes,
                               weight_bytes=plan.weight_bytes + in_place_bytes)
