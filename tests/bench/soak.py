"""Soak run (run by `make bench`): 2,000 greedy tokens from the demo model under small memory budgets.

Each configuration runs in its own process: no budget (experts straight from the memory map), the smallest
workable budget, and twice that. Every 100 tokens the process's resident set is sampled; after warm-up it
should only grow by the KV cache's pages (committed as positions fill), and the tokens must be the same
under every budget. EOS does not stop the run, so every configuration produces exactly --tokens tokens.

    python tests/bench/soak.py [--tokens 2000] [--prompt "def fibonacci(n):"]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

EVERY = 100
WARM_UP = 200  # tokens after which the resident set should be steady


def rss() -> int:
    """This process's resident set now, in bytes (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def worker(budget: int | None, tokens: int, prompt: str) -> dict:
    from moe.convert.demo import demo_model
    from moe.runtime.generate import generate_tokens
    from moe.runtime.model import load_model

    model = load_model(demo_model(), memory_budget=budget)
    ids = model.tokenizer.encode(prompt)
    series, out = [(0, rss())], []
    started = time.perf_counter()
    for token in generate_tokens(model, ids, max_tokens=tokens, stop_ids=()):
        out.append(token)
        if len(out) % EVERY == 0:
            series.append((len(out), rss()))
    seconds = time.perf_counter() - started
    cfg = model.config
    return {"tokens": out, "text": model.tokenizer.decode(out), "rss": series, "seconds": seconds,
            "kv_bytes_per_token": 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4,
            "stats": {k: v for k, v in model.stats.items() if isinstance(v, (int, float))}}


def run(budget: int | None, tokens: int, prompt: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--tokens", str(tokens), "--prompt", prompt]
    if budget is not None:
        command += ["--budget", str(budget)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--prompt", default="def fibonacci(n):")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.budget, args.tokens, args.prompt)))
        return

    from moe.convert.demo import demo_model
    from moe.runtime.layout import open_layout
    from moe.runtime.paging import min_budget

    layout = open_layout(demo_model())
    smallest = min_budget(layout)
    layout.close()
    runs = {label: run(budget, args.tokens, args.prompt)
            for label, budget in (("no budget", None), (f"minimum {smallest} B", smallest),
                                  (f"2x minimum {2 * smallest} B", 2 * smallest))}
    reference = runs["no budget"]
    print(f"{args.tokens} greedy tokens of the demo model after {args.prompt!r}; resident set (MB) every {EVERY} tokens")
    for label, r in runs.items():
        series = dict(r["rss"])
        steady = {n: b for n, b in series.items() if n >= WARM_UP}
        growth = max(steady.values()) - steady[WARM_UP]
        kv = (max(steady) - WARM_UP) * r["kv_bytes_per_token"]
        same = r["tokens"] == reference["tokens"]
        print(f"\n{label}: {len(r['tokens'])} tokens in {r['seconds']:.1f} s, same tokens as without a budget: {same}")
        print("  " + " ".join(f"{b / 1e6:.1f}" for _, b in r["rss"]))
        print(f"  after {WARM_UP} tokens: grew {growth / 1e6:.2f} MB, of which the KV cache accounts for {kv / 1e6:.2f} MB;"
              f" misses {r['stats'].get('misses')}, hits {r['stats'].get('hits')}")
    identical = all(r["text"] == reference["text"] for r in runs.values())
    print(f"\ntexts identical under every budget: {identical}")


if __name__ == "__main__":
    main()
