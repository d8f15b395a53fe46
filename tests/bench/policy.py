"""Expert cache policies on real routing (run by `make bench`): hit rates of LRU, `freq`, `next` and Belady's optimum.

For each trained model of ../shared/models, converted to 4 bits: the experts each token of the evaluation
text chose (its first --tokens tokens, teacher-forced, in windows of --ctx tokens each run as a fresh
prompt), replayed in decode order (layers 0..L-1 of a token, then the next token) through the real
PagedExperts (its policy code and reads; prefetch off) with a pool of 12.5, 25 and 50 % of all the
experts, and through Belady's optimum (evict the expert whose next use is farthest) under the runtime's
constraint: a layer's chosen experts are all resident at once. Prints the table and the share of the
gap between `freq` and Belady each policy closes; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from moe.runtime.model import load_model
from moe.runtime.paging import POLICIES, PagedExperts, slot_bytes
from moe.runtime.routing_stats import routed

sys.path.insert(0, str(Path(__file__).parent / "lib"))
from trained import TRAINED, converted, eval_text  # noqa: E402  (a folder of these scripts', not a package)

SHARES = (0.125, 0.25, 0.5)
PARTS = ("whole", "first half", "second half")  # the cache policy's constants were chosen on the first


def routing(model, ids: list[int], ctx: int) -> tuple[list[int], np.ndarray]:
    """The MoE layers and the experts (T, layers, k) each token chose, window by window."""
    windows = [routed(model, ids[start: start + ctx]) for start in range(0, len(ids), ctx)]
    layers = sorted(windows[0])
    return layers, np.concatenate([np.stack([w[layer][0] for layer in layers], axis=1) for w in windows])


def rates(hits: np.ndarray, lookups: np.ndarray) -> list[float]:
    """Hit rates of the whole text, its first half and its second half from hits and lookups per token."""
    half = len(hits) // 2
    return [round(float(h.sum() / n.sum()), 4) for h, n in
            ((hits, lookups), (hits[:half], lookups[:half]), (hits[half:], lookups[half:]))]


def replay(store: PagedExperts, layers: list[int], chosen: np.ndarray) -> list[float]:
    """Hit rates (whole, first half, second half) of the store fed `chosen` (T, layers, k) as decode asks."""
    hits, lookups = np.zeros(len(chosen)), np.zeros(len(chosen))
    for t, token in enumerate(chosen):
        before = store.hits.sum(), store.misses.sum()
        for layer, experts in zip(layers, token, strict=True):
            experts = sorted(set(experts.tolist()))
            store.begin_layer(layer, experts)
            for e in experts:
                store.get(layer, e)
        store.end_token()
        hits[t] = store.hits.sum() - before[0]
        lookups[t] = hits[t] + store.misses.sum() - before[1]
    return rates(hits, lookups)


def belady(layers: list[int], chosen: np.ndarray, capacity: int) -> list[float]:
    """Hit rates (whole, first half, second half) of Belady's optimum: on a miss, evict the resident expert whose next use is farthest away,
    never one the layer being computed chose."""
    steps = [(layer, sorted(set(experts.tolist())))
             for token in chosen for layer, experts in zip(layers, token, strict=True)]
    following: dict[tuple[int, int], float] = {}
    next_use = [[]] * len(steps)  # per step, per chosen expert: the step of its next use
    for i in range(len(steps) - 1, -1, -1):
        layer, experts = steps[i]
        next_use[i] = [following.get((layer, e), np.inf) for e in experts]
        following.update({(layer, e): i for e in experts})
    resident: dict[tuple[int, int], float] = {}  # (layer, expert) -> step of its next use
    hits, lookups = np.zeros(len(chosen)), np.zeros(len(chosen))
    for i, ((layer, experts), uses) in enumerate(zip(steps, next_use, strict=True)):
        needed = {(layer, e) for e in experts}
        t = i // len(layers)
        lookups[t] += len(experts)
        for e, use in zip(experts, uses, strict=True):
            if (layer, e) in resident:
                hits[t] += 1
            elif len(resident) >= capacity:
                del resident[max(resident.keys() - needed, key=resident.__getitem__)]
            resident[(layer, e)] = use
    return rates(hits, lookups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512, help="tokens per window (a fresh prompt each)")
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache/moe/bench/policy.json")
    args = ap.parse_args()
    text = eval_text()
    rows = []
    for name in TRAINED:
        model = load_model(converted(name, args.out.parent))
        layers, chosen = routing(model, model.tokenizer.encode(text)[: args.tokens], args.ctx)
        n_experts = len(layers) * model.config.num_experts
        for share in SHARES:
            capacity = max(model.config.top_k, round(share * n_experts))
            row = {"model": name, "budget": f"{share:.1%}", "slots": capacity, "experts": n_experts,
                   "tokens": len(chosen)}
            measured = {}  # policy -> hit rates (whole, first half, second half)
            for policy in POLICIES:
                store = PagedExperts(model.layout, capacity * slot_bytes(model.layout), policy, prefetch=False)
                measured[policy] = replay(store, layers, chosen)
                store.close()
            measured["belady"] = belady(layers, chosen, capacity)
            for i, part in enumerate(PARTS):
                rate = {p: r[i] for p, r in measured.items()}
                gap = rate["belady"] - rate["freq"]
                closed = {p: round((rate[p] - rate["freq"]) / gap, 3) if gap > 0 else None for p in POLICIES}
                row[part] = {**rate, "gap_closed": closed}
            rows.append(row)
            print(json.dumps(row), flush=True)
        model.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"{'model':14}{'budget':>8}{'slots':>7}" + "".join(f"{p:>8}" for p in (*POLICIES, "belady"))
          + "   next: gap closed (whole, 1st half, 2nd half)")
    for r in rows:
        closed = [r[part]["gap_closed"]["next"] for part in PARTS]
        print(f"{r['model']:14}{r['budget']:>8}{r['slots']:>7}"
              + "".join(f"{r['whole'][p]:8.3f}" for p in (*POLICIES, "belady"))
              + "   " + "  ".join("-" if c is None else f"{c:.2f}" for c in closed))


if __name__ == "__main__":
    main()
