"""Expert cache on real routing (run by `make bench`): hit rate and decode speed per budget and policy.

For each trained model of ../shared/models: convert to 4 bits, then decode the evaluation text
token by token (teacher-forced, so routing is what real text gives) with experts straight from
the memory map, and under budgets of 25 %, 50 % and 100 % of the expert bytes, with each cache
policy (LRU, decayed frequency, expected next use), with and without prefetch. Prints one table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from moe.runtime.model import load_model
from moe.runtime.paging import POLICIES, min_budget

sys.path.insert(0, str(Path(__file__).parent / "lib"))
from trained import TRAINED, converted, eval_text  # noqa: E402  (a folder of these scripts', not a package)


def decode(model, ids: np.ndarray) -> float:
    """Tokens per second decoding ids one at a time after a one-token prompt."""
    model.reset()
    model.forward(ids[:1], last_only=True)
    t0 = time.perf_counter()
    for i in range(1, len(ids)):
        model.forward(ids[i: i + 1], last_only=True)
    return (len(ids) - 1) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache/moe/bench/paging.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    text = eval_text()
    rows = []
    for name in TRAINED:
        dst = converted(name, args.out.parent)
        base = load_model(dst, threads=args.threads)
        ids = np.array(base.tokenizer.encode(text)[: args.tokens], np.int64)
        decode(base, ids[:8])  # warm
        unlimited = decode(base, ids)
        expert_bytes = base.layout.manifest["files"]["experts.bin"]["size"]
        rows.append({"model": name, "budget": "mapped", "decode_tok_s": round(unlimited, 1), "hit_rate": 1.0})
        for share in (0.25, 0.5, 1.0):
            budget = max(int(expert_bytes * share), min_budget(base.layout))
            for policy in POLICIES:
                for prefetch in (False, True):
                    m = load_model(dst, memory_budget=budget, threads=args.threads, cache_policy=policy,
                                   prefetch=prefetch)
                    speed = decode(m, ids)
                    st = m.experts
                    hits, misses = int(st.hits.sum()), int(st.misses.sum())
                    rows.append({
                        "model": name, "budget": f"{int(share * 100)}%", "budget_bytes": budget, "policy": policy,
                        "prefetch": prefetch, "decode_tok_s": round(speed, 1),
                        "speed_vs_mapped": round(speed / unlimited, 3),
                        "hit_rate": round(hits / max(1, hits + misses), 3),
                        "prefetch_hits": int(st.prefetch_hits.sum()),
                        "prediction_accuracy": round(int(st.predicted_right.sum()) / max(1, int(st.predicted.sum())), 3),
                        "bytes_read_per_token": int(st.bytes_read.sum()) // len(ids),
                    })
                    m.close()
            print(json.dumps(rows[-2 * len(POLICIES):]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"{'model':14}{'budget':>8}{'policy':>7}{'prefetch':>9}{'tok/s':>8}{'vs map':>8}{'hit':>7}{'pred':>7}")
    for r in rows:
        print(f"{r['model']:14}{r['budget']:>8}{r.get('policy', '-'):>7}{str(r.get('prefetch', '-')):>9}"
              f"{r['decode_tok_s']:8.1f}{r.get('speed_vs_mapped', 1.0):8.3f}{r['hit_rate']:7.3f}"
              f"{r.get('prediction_accuracy', 0):7.3f}")


if __name__ == "__main__":
    main()
