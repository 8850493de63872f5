"""One compiled graph's adapter values, kept current before every call.

A graph is captured and planned for one adapter structure (:mod:`vramfx.adapters.state`); the
values it reads are brought up to date before each call, at the cost of a copy at most:

- LoRA scales: the graph's scale attributes are filled with the layers' current ``scaling``;
- adapter tensors in host memory: where the model now holds another tensor under a name (an
  adapter replaced, unloaded and loaded again, ``swap_tensors``), the graph's source serves the
  new one and a resident copy of the old one is dropped, so it is loaded again (so is one another
  graph of the same model left under the same name). On a CPU, host tensors are read where they
  lie, so values written in place are seen as they are; on another
  device a resident copy cannot tell values written in place through ``.data`` (as PEFT's
  hot swap writes them), so resident copies of adapter tensors are made again on every call;
- fused adapters: the base weight's decoder (:class:`~vramfx.adapters.fused.FusedLora`) adds
  the merges recorded with the weight (:mod:`vramfx.adapters.fusions`), as they are now.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vramfx.adapters.fused import FusedLora
from vramfx.adapters.scales import ScaleSlot
from vramfx.adapters.state import AdapterState, refuse_unrecorded_merge
from vramfx.errors import VramfxError
from vramfx.storage.host import HostSource
from vramfx.storage.ref import WeightRef


@dataclass
class _Watched:
    """A graph weight the model holds as a host tensor of an adapter layer."""

    weight: str
    tensor_name: str
    source: HostSource
    key: str
    fingerprint: tuple


def _fingerprint(t: torch.Tensor) -> tuple:
    """Which tensor, where its data lies, and its in-place write count (inference tensors keep none)."""
    try:
        version = t._version
    except RuntimeError:
        version = None
    return id(t), t.data_ptr(), version


class AdapterBinding:
    """Refreshes one graph's adapter values from the model's current :class:`AdapterState`."""

    def __init__(self, state: AdapterState, slots: tuple[ScaleSlot, ...], device: torch.device) -> None:
        self.state = state
        self.slots = slots
        self.copies_each_call = device.type != "cpu"
        self.watched: list[_Watched] = []

    def fused_into(self, weight: str):
        """The ``(A, B, scale, fan_in_fan_out, widen)`` of each adapter fused into ``weight`` (as recorded
        when it was merged), read at decode time from the state of the latest refresh."""

        def merged() -> list[tuple[torch.Tensor, torch.Tensor, float, bool, bool]]:
            return [f.terms for f in self.state.fused.get(weight, ())]

        return merged

    def refresh(self, state: AdapterState, engine: object) -> None:
        """Bring the graph's adapter values up to ``state`` (same structure): drop stale residents
        from the engine's store (shared by the compiled model's graphs) so activation loads them
        again, and, off the CPU, stop an engine whose copy workers hold a replaced tensor's memory."""
        self.state = state
        store = engine.store
        replaced = False
        for slot in self.slots:
            slot.value.fill_(state.scales[(slot.layer, slot.adapter)])
        for w in self.watched:
            current = state.tensors.get(w.tensor_name)
            if current is None:
                raise VramfxError(f"adapter tensor {w.tensor_name} disappeared without a change of adapter structure")
            fingerprint = _fingerprint(current)
            if fingerprint != w.fingerprint:
                w.source.replace(w.key, current.detach())
                w.fingerprint = fingerprint
                store.drop(w.weight)
                replaced = True
            elif self.copies_each_call or fingerprint[2] is None:
                store.drop(w.weight)
            elif w.weight in store and store[w.weight].data_ptr() != current.data_ptr():
                # The store is shared by the compiled model's graphs: another structure's graph
                # (another rank under the same name) may have left its tensor there.
                store.drop(w.weight)
        if replaced and self.copies_each_call:
            # A CUDA engine maps (and pins) streamed host tensors when it starts: start it again.
            engine.deactivate()


def bind_adapters(
    state: AdapterState | None,
    captured: object,
    refs: Mapping[str, WeightRef],
    device: torch.device,
) -> tuple[dict[str, WeightRef], AdapterBinding | None]:
    """The graph's weight refs with fused adapters applied, and the binding that keeps its adapter
    values current; ``(refs, None)`` for a model without adapters.

    Raises
    ------
    VramfxError
        An adapter merged into a streamed weight without a record of the merge.
    """
    if state is None:
        return dict(refs), None
    by_alias = {a: spec for spec in captured.weights for a in spec.aliases}
    refuse_unrecorded_merge(state, lambda name: name in by_alias and by_alias[name].value is None)
    binding = AdapterBinding(state, captured.adapter_scales, device)
    out = dict(refs)
    specs = captured.name_to_weight
    for name, ref in refs.items():
        tensor_name = next((a for a in specs[name].aliases if a in state.tensors), None)
        if tensor_name is None or specs[name].value is None:
            continue
        held = state.tensors[tensor_name]
        tensor = held.detach()
        if not isinstance(ref.source, HostSource):
            # Converted once into another dtype (a compute dtype): read the model's own tensor
            # instead, cast where it is read, so a new value is never missed.
            ref = out[name] = dataclasses.replace(
                ref, source=HostSource({name: tensor}), key=name, dtype=tensor.dtype,
                nbytes=tensor.numel() * tensor.element_size(), compute_dtype=specs[name].dtype,
            )
        ref.source.replace(ref.key, tensor)  # a replan keeps an older capture's tensor
        binding.watched.append(_Watched(name, tensor_name, ref.source, ref.key, _fingerprint(held)))
    for weight, fusions in state.fused.items():
        spec = by_alias.get(weight)
        if spec is None or spec.value is not None:  # a weight the model holds: PEFT merged into it
            continue
        ref = out[spec.name]
        rank = sum(f.a.shape[0] for f in fusions)
        fused = FusedLora(spec.shape, ref.dtype, ref.nbytes, binding.fused_into(weight), rank, inner=ref.decoder)
        out[spec.name] = dataclasses.replace(ref, decoder=fused, compute_dtype=ref.compute_dtype or spec.dtype)
    return out, binding
