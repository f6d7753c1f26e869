"""The sensitivity loop: each layer quantized alone at each candidate bit, scored on every batch.

Sums are accumulated in float64 in a fixed order (per bit, batches in order),
so neither chunking for memory nor a kill-and-resume changes a single digit.
``fast`` reuses the FP computation preceding the quantized layer
(:class:`~mpq.sensitivity.prefix_cache.PrefixCache`); ``share`` runs all
candidate bits of a layer in one tiled pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mpq.quant.model import PREFIX, QuantModel
from mpq.sensitivity.prefix_cache import PrefixCache
from mpq.sensitivity.scorers import Scorer


@dataclass(frozen=True)
class LoopOptions:
    fast: bool = True  # the FP prefix cache (exact)
    share: bool = False  # all bits of a layer in one tiled pass (fast only)
    cache_budget_bytes: float = float("inf")  # FP activations recorded at once


def new_state(n_bits: int) -> dict[str, Any]:
    """A layer's resumable state: the batches done and the float64 sums (a, b) per bit."""
    return {"batches": [], "sums": [[0.0, 0.0] for _ in range(n_bits)]}


def score_layers(
    qm: QuantModel,
    scorer: Scorer,
    names: list[str],
    bits: list[int],
    kind: str,
    opts: LoopOptions = LoopOptions(),
    state: dict[str, dict[str, Any]] | None = None,
    after_layer: Callable[[str, int], None] | None = None,
) -> dict[str, list[float]]:
    """{layer: [metric at each of ``bits``]} with each layer of ``names`` quantized alone (``kind``: its weights or its
    input activations). ``state`` (:func:`new_state` per layer) is continued and updated in place: a resumed loop ends
    with the same numbers; ``after_layer(name, n_batches)`` is called after each layer's batches (the caller's
    progress and saving: nothing here writes or prints)."""
    state = {} if state is None else state
    cache = PrefixCache(qm.denoiser) if opts.fast else None
    # one pass per bit, or (share) every bit in one pass: batch copy j at bits[j]
    passes = [list(bits)] if cache is not None and opts.share else [[b] for b in bits]
    try:
        qm.set_fp()
        for chunk in _chunks(scorer, cache, opts.cache_budget_bytes, state, names):
            for name in names:
                st = state.setdefault(name, new_state(len(bits)))
                todo = [k for k in chunk if k not in st["batches"]]
                if not todo:
                    continue
                score_layer(qm, scorer, cache, name, bits, kind, passes, todo, st["sums"])
                st["batches"] = sorted(st["batches"] + todo)
                if after_layer is not None:
                    after_layer(name, len(todo))
    finally:
        qm.set_fp()
        for layer in qm.layers.values():
            layer.set_multi(None)
        if cache is not None:
            cache.close()
    return layer_values(scorer, state, names, len(bits))


def score_layer(
    qm: QuantModel,
    scorer: Scorer,
    cache: PrefixCache | None,
    name: str,
    bits: list[int],
    kind: str,
    passes: list[list[int]],
    batches: list[int],
    sums: list[list[float]],
) -> None:
    """One layer: ``name`` quantized alone (``kind``) in each of ``passes`` (bits run together), scored on
    ``batches`` (their FP references already run; ``cache``: replayed from the recorded FP prefix); the float64 sums
    (a, b) of each bit added to ``sums[bits.index(b)]`` in place, batches in order."""
    layer = qm.layers[name]
    for pass_bits in passes:
        if len(pass_bits) > 1:
            layer.set_multi(kind, pass_bits)
        else:
            layer.set_bits(pass_bits[0] if kind == "weight" else None, pass_bits[0] if kind == "act" else None)
        if cache is not None:
            cache.replay(name[len(PREFIX) :], tile=len(pass_bits))
        for k in batches:
            for b, (a, c) in zip(pass_bits, scorer.scores(k, len(pass_bits))):
                acc = sums[bits.index(b)]
                acc[0] += a
                acc[1] += c
        if cache is not None:
            cache.off()
        layer.set_multi(None)
        layer.set_bits(None, None)


def layer_values(
    scorer: Scorer, state: dict[str, dict[str, Any]], names: list[str], n_bits: int
) -> dict[str, list[float]]:
    """{layer: [the metric at each bit]} from the sums of the layers of ``names`` in ``state``."""
    return {name: [scorer.value(*state[name]["sums"][i]) for i in range(n_bits)] for name in names if name in state}


def _chunks(
    scorer: Scorer, cache: PrefixCache | None, budget: float, state: dict[str, dict[str, Any]], names: list[str]
) -> Iterator[list[int]]:
    """Batch indices still to do, in order, grouped so that the FP activations recorded for a group fit the budget."""
    pending = [
        k
        for k in range(len(scorer.batches))
        if any(name not in state or k not in state[name]["batches"] for name in names)
    ]
    if cache is None:
        for k in pending:
            scorer.run_fp(k)
        yield pending
        return
    cache.max_bytes = budget  # within one batch too: a generation's later calls are not recorded past the budget
    i = 0
    while i < len(pending):
        cache.clear()
        chunk: list[int] = []
        while i < len(pending):
            cache.record()
            scorer.run_fp(pending[i])
            cache.off()
            chunk.append(pending[i])
            i += 1
            if cache.nbytes() >= budget:
                break
        yield chunk
        cache.clear()
