"""`moe plan`'s predictions against measurements (run by `make bench`): prints tables and writes JSON.

1. Hit-rate formula: for each trained model of ../shared/models (converted to 4 bits), the evaluation
   text is decoded token by token (teacher-forced) under budgets holding 1/8 .. 3/4 of the experts
   (default frequency policy, no prefetch); the exponent p of hit = 1 - (1 - f)^p is fitted per model
   by least squares on log(1 - hit) = p log(1 - f). moe.runtime.speed.HIT_EXPONENT is their mean.
2. Decode speed: predicted (plan: the checkpoint's headers, this machine's cached measurements, the
   miniature) against measured with `moe bench`'s own function (mean over the decoded tokens) and, beside
   it, the median token time (a shared machine loses whole time slices to other processes; the median
   shows the model's own speed). Experts in RAM and under a budget of 25 % of the expert bytes; the
   synthetic OLMoE-1B-7B checkpoint (--olmoe SRC --olmoe-converted OUT) in RAM and at 1 GiB.
   With --cpu-time (one thread), the plan's measurements and the median token time are taken in CPU
   seconds of this process (time.process_time), which other processes' load leaves out.
3. Pinning: profile on the first half of the evaluation text, then decode the second half at 25 %
   budget with and without `--pin`'s pairs (at most a quarter of the slots): hit rate and tokens/s.

The plan's measurements are made afresh, in a home of their own under --cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
from compare_llamacpp import read_through
from moe.convert import convert, miniature
from moe.convert.plan import figures, read_source
from moe.runtime import speed
from moe.runtime.bench import bench
from moe.runtime.model import load_model
from moe.runtime.paging import available_ram, min_budget, slot_bytes
from moe.runtime.routing_stats import profile

MODELS = Path(os.environ.get("MOE_SHARED_MODELS", Path(__file__).resolve().parents[3] / "shared" / "models"))
NAMES = ("tinymix", "tinyqwen3moe", "tinyllama4", "tinygptoss")
FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.75)
GIB = 1 << 30


def teacher_forced(model, ids: np.ndarray) -> tuple[float, float]:
    """(hit rate, tokens/s) decoding ids one at a time after the first."""
    model.reset()
    model.forward(ids[:1], last_only=True)
    model.experts.reset_counters()
    start = speed.clock()
    for i in range(1, len(ids)):
        model.forward(ids[i: i + 1], last_only=True)
    seconds = speed.clock() - start
    hits, misses = int(model.experts.hits.sum()), int(model.experts.misses.sum())
    return hits / max(1, hits + misses), (len(ids) - 1) / seconds


def fit_exponent(path: Path, ids: np.ndarray, threads: int) -> dict:
    base = load_model(path, threads=threads)
    layers, experts = len(base.config.moe_layers()), base.config.num_experts
    slot = slot_bytes(base.layout)
    base.close()
    points = []
    for f in FRACTIONS:
        slots = round(f * layers * experts)
        m = load_model(path, memory_budget=slots * slot, threads=threads, prefetch=False)
        hit, _ = teacher_forced(m, ids)
        m.close()
        points.append((slots / (layers * experts), hit))
    x = np.array([math.log(1 - f) for f, _ in points])
    y = np.array([math.log(max(1 - h, 1e-6)) for _, h in points])
    p = float((x * y).sum() / (x * x).sum())
    return {"points": [(round(f, 3), round(h, 3), round(speed.hit_rate(f), 3)) for f, h in points], "exponent": p}


def median_decode(path: Path, budget: int | None, threads: int, prompt: int, gen: int) -> float:
    """Tokens/s from the median time of one greedy decode step, after a random prompt as `moe bench` uses."""
    m = load_model(path, memory_budget=budget, threads=threads)
    ids = np.random.default_rng(0).integers(0, m.config.vocab_size, size=prompt, dtype=np.int64)
    token = int(np.argmax(m.forward(ids, last_only=True)[-1]))
    times = []
    for _ in range(gen):
        start = speed.clock()
        token = int(np.argmax(m.forward(np.array([token], np.int64), last_only=True)[-1]))
        times.append(speed.clock() - start)
    m.close()
    return 1.0 / statistics.median(times)


def compare(src: Path, converted: Path, budgets: dict[str, int | None], threads: int, prompt: int, gen: int,
            repeat: int) -> list[dict]:
    hf, headers = read_source(str(src))
    fig = figures(hf, headers, 4)
    rates = speed.machine(remeasure=True, say=print)
    mini = miniature.overhead(hf, 4, remeasure=True, say=print, layout_bytes=fig["layout_bytes"])
    rows = []
    for label, budget in budgets.items():
        predicted = speed.predict(fig, rates, mini, budget, available_ram())
        for f in converted.glob("*.bin"):  # from the page cache, as a model used before (the plan assumes it)
            read_through(f)
        measured = bench(converted, prompt, gen, budget, threads, repeat)
        median = median_decode(converted, budget, threads, prompt, gen)
        rows.append({
            "model": src.name, "budget": label, "budget_bytes": budget,
            "predicted_tok_s": round(predicted["decode_tok_s"], 2), "bench_tok_s": measured["decode_tok_s"],
            "median_tok_s": round(median, 2),
            "bench_vs_predicted": round(measured["decode_tok_s"] / predicted["decode_tok_s"] - 1, 3),
            "median_vs_predicted": round(median / predicted["decode_tok_s"] - 1, 3),
            "predicted_hit_rate": round(predicted["hit_rate"], 3), "bench_hit_rate": measured["expert_cache_hit_rate"],
            "load_average": round(os.getloadavg()[0], 2),
        })
        print(json.dumps(rows[-1]))
    return rows


def pin_effect(path: Path, ids: np.ndarray, threads: int) -> list[dict]:
    base = load_model(path, threads=threads)
    half = len(ids) // 2
    (path / "profile.json").write_text(json.dumps(profile(base, ids[:half].tolist())))
    budget = max(min_budget(base.layout), base.layout.manifest["files"]["experts.bin"]["size"] // 4)
    base.close()
    rows = []
    for pinned in (False, True):
        m = load_model(path, memory_budget=budget, threads=threads, pin=path / "profile.json" if pinned else ())
        hit, tok_s = teacher_forced(m, ids[half:])
        m.close()
        rows.append({"model": path.name, "pin": len(m.memory.pins), "budget_bytes": budget, "hit_rate": round(hit, 3),
                     "tok_s": round(tok_s, 1)})
        print(json.dumps(rows[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/moe/bench")
    ap.add_argument("--threads", type=int, default=None, help="default: numba's (all cores)")
    ap.add_argument("--tokens", type=int, default=1000, help="evaluation tokens for the hit-rate fit and pinning")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--olmoe", type=Path, help="the synthetic OLMoE checkpoint (python -m moe.convert.synthetic)")
    ap.add_argument("--olmoe-converted", type=Path, help="its 4-bit conversion")
    ap.add_argument("--skip-fit", action="store_true")
    ap.add_argument("--cpu-time", action="store_true", help="one thread, timed in CPU seconds (see above)")
    args = ap.parse_args()
    import numba

    if args.cpu_time:
        args.threads = 1
        speed.clock = time.process_time
    if args.threads:
        numba.set_num_threads(args.threads)
    threads = numba.get_num_threads()
    os.environ["MOE_HOME"] = str(args.cache / f"plan-home-{'cpu' if args.cpu_time else 'wall'}")
    text = (MODELS / "eval-python-stdlib.txt").read_text()
    result = {"threads": threads, "clock": speed.clock.__name__, "fits": {}, "speed": [], "pin": []}
    for name in NAMES:
        dst = args.cache / f"{name}-q4"
        if not (dst / "manifest.json").exists():
            convert(str(MODELS / name), dst, bits=4)
        m = load_model(dst, threads=threads)
        ids = np.array(m.tokenizer.encode(text, add_bos=False), np.int64)
        quarter = max(min_budget(m.layout), m.layout.manifest["files"]["experts.bin"]["size"] // 4)
        m.close()
        if not args.skip_fit:
            result["fits"][name] = fit_exponent(dst, ids[5000: 5000 + args.tokens], threads)
            print(name, json.dumps(result["fits"][name]))
        result["speed"] += compare(MODELS / name, dst, {"RAM": None, "25%": quarter}, threads, args.prompt_tokens,
                                   args.gen_tokens, args.repeat)
        result["pin"] += pin_effect(dst, ids[: 2 * args.tokens], threads)
    if args.olmoe and args.olmoe_converted:
        result["speed"] += compare(args.olmoe, args.olmoe_converted, {"RAM": None, "1GiB": GIB}, threads,
                                   min(args.prompt_tokens, 32), min(args.gen_tokens, 32), 1)
    if result["fits"]:
        result["mean_exponent"] = statistics.mean(f["exponent"] for f in result["fits"].values())
    args.cache.mkdir(parents=True, exist_ok=True)
    (args.cache / "plan_vs_measured.json").write_text(json.dumps(result, indent=1))
    print(f"\nthreads {threads}, clock {speed.clock.__name__}; fitted exponents "
          + ", ".join(f"{n} {f['exponent']:.2f}" for n, f in result["fits"].items()))
    print(f"{'model':14}{'budget':>7}{'predicted':>11}{'bench':>9}{'median':>9}{'bench/pred':>12}{'med/pred':>10}"
          f"{'hit pred':>10}{'hit':>7}{'load':>6}")
    for r in result["speed"]:
        print(f"{r['model']:14}{r['budget']:>7}{r['predicted_tok_s']:11.2f}{r['bench_tok_s']:9.2f}{r['median_tok_s']:9.2f}"
              f"{r['bench_vs_predicted']:+12.0%}{r['median_vs_predicted']:+10.0%}{r['predicted_hit_rate']:10.3f}"
              f"{r['bench_hit_rate']:7.3f}{r['load_average']:6.1f}")
    for r in result["pin"]:
        print(f"{r['model']:14} pinned {r['pin']:3} hit {r['hit_rate']:.3f} {r['tok_s']:.1f} tok/s")


if __name__ == "__main__":
    main()
