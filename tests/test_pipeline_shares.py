"""Sharing one budget among a pipeline's units: reserves, the keep decision, the minimum."""

from __future__ import annotations

from vramfx.pipelines.shares import UnitCost, choose_kept, pipeline_minimum, reserve_bytes

UNITS = [
    UnitCost("text_encoder", calls=1, graph_bytes=10, kept_bytes=400, reload_seconds=0.4),
    UnitCost("transformer", calls=20, graph_bytes=30, kept_bytes=None),
    UnitCost("vae.decode", calls=1, graph_bytes=20, kept_bytes=100, reload_seconds=0.1),
]


def test_a_unit_leaves_the_others_graphs_kept_weights_and_the_pipeline_tensors():
    assert reserve_bytes("transformer", UNITS, frozenset(), 5) == 10 + 20 + 5
    assert reserve_bytes("transformer", UNITS, frozenset({"text_encoder"}), 5) == 10 + 400 + 20 + 5
    assert reserve_bytes("text_encoder", UNITS, frozenset({"text_encoder"}), 5) == 30 + 20 + 5  # not its own


def test_keeping_is_chosen_by_the_time_it_costs_the_other_calls():
    # The transformer streams one more second per call for every 1000 bytes it leaves: keeping the
    # encoder (400 bytes) costs 20 calls x 0.4 s = 8 s for 0.4 s saved; the VAE's 100 bytes 2 s for 0.1 s.
    def streaming(name, reserve):
        return reserve / 1000 if name == "transformer" else 0.0

    assert choose_kept(UNITS, streaming) == frozenset()

    def roomy(name, reserve):  # the transformer holds everything whatever the others keep
        return 1.0

    assert choose_kept(UNITS, roomy) == frozenset({"text_encoder", "vae.decode"})


def test_a_unit_that_would_not_fit_is_never_made_to_by_keeping():
    def tight(name, reserve):
        return None if name == "transformer" and reserve > 150 else 1.0

    assert choose_kept(UNITS, tight) == frozenset({"vae.decode"})  # 10 + 20 + 100 fits in 150; the encoder's 400 does not


def test_the_pipeline_minimum_is_the_largest_unit_minimum():
    assert pipeline_minimum({"a": 3, "b": 7}) == 7
    assert pipeline_minimum({}) == 0
