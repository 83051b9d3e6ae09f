"""Selection: MetaSD against plain decoding, every single drafter of a pool,
vLLM's n-gram and the per-request oracle, at batch 1, 16 and 64.

    python benchmarks/selection.py --out benchmarks/results/selection.json
    python benchmarks/selection.py --pools default --rounds 1 --prompts 12   # quick
    python benchmarks/selection.py --target smollm2    # SmolLM2-135M-Instruct
    python benchmarks/selection.py --report benchmarks/results/selection.json  # table + plot

Pools (issue 13): ``default`` = the zoo's five specialists + ``general`` +
n-gram; ``paper`` = five specialists + ``general-equal`` (a general drafter
trained with one specialist's budget, as in the paper's comparison) + n-gram.
MetaSD runs as ``metasd:<objective>:<reward>[+probe][+cold][+nogate]`` (objectives
``alignment`` and ``throughput``, rewards ``bd`` and ``match``, ``+probe``: prompt-informed
start, which the warm start's prior then leaves alone, ``+cold``: without the warm
start, ``+nogate``: without the speculation gate) on
one engine per pool,
reconfigured between variants (bandit states, cost fits and the gate
restart). Greedy, the zoo's mixed prompts. Each round starts every engine in
turn (the order reversed every other round, so slow drift of the shared
machine cancels), runs batch 1 (prompts one at a time) twice, then batch 16
twice and batch 64 twice, and closes it; figures are medians over rounds.
Every run of a method takes prompts it has not served before, in the
workload's order (the warm start looks for finished requests with prompts like
a new one's: a prompt served before would be its own best neighbour), every
method the same ones; a workload too short for that (SmolLM2's 160 prompts)
starts over from its first prompt. The
second run of a batch size is the one reported (``tokens_per_s_bs16``: an
engine already serving that load, MetaSD's online state learnt), the first
is kept as ``tokens_per_s_bs16_cold`` (every method runs both alike). The
oracle is, per prompt, the single method (drafter or n-gram) with the most
tokens per step at batch 1 in hindsight: its batch-1 tokens/s adds up those
picks (no single engine can run it at batch 16/64).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import targets  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from targets import models  # noqa: E402

K = 4
SPECIALISTS = ("code", "prose", "math", "data", "german")
POOLS = {"default": "general", "paper": "general-equal"}
VARIANTS = ("metasd:alignment:bd", "metasd:throughput:bd", "metasd:throughput:match",
            "metasd:throughput:match+nogate", "metasd:throughput:match+probe",
            "metasd:alignment:match+probe")


def pool_config(general: str) -> dict:
    zoo = models()
    cfg = zoo.default_metasd_config()
    cfg["drafters"] = ([{"name": d, "kind": "draft_model", "path": zoo.drafter_path(d)}
                        for d in (*SPECIALISTS, general)]
                       + [d for d in cfg["drafters"] if d["kind"] == "ngram"])
    cfg.update(num_speculative_tokens=K, log_stats_interval_s=0)
    return cfg


def spec_for(method: str, general: str):
    zoo = models()
    if method == "none":
        return None
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": K,
                "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    if method.startswith("draft:"):
        return {"method": "draft_model", "model": zoo.drafter_path(method[6:]),
                "num_speculative_tokens": K}
    return {"method": "metasd", "config": pool_config(general)}


def unseen(prompts: list[str]):
    """``take(n)``: the next n prompts of the workload (from its start again
    when it runs out)."""
    at = [0]

    def take(n: int) -> list[str]:
        out = [prompts[(at[0] + i) % len(prompts)] for i in range(n)]
        at[0] += n
        return out

    return take


def run_engine(method_group: list[str], general: str, prompts: list[str], bs1: int,
               max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    zoo = models()
    llm = LLM(model=zoo.target_path(), enforce_eager=True, max_model_len=1024, seed=0,
              max_num_seqs=64, speculative_config=spec_for(method_group[0], general))
    steps = [0]
    step = llm.llm_engine.step

    def counted(*a, **kw):
        steps[0] += 1
        return step(*a, **kw)

    llm.llm_engine.step = counted
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    out = {}
    try:
        llm.generate(prompts[-2:], params, use_tqdm=False)  # warm-up
        for m in method_group:
            if m.startswith("metasd:"):
                _, objective, reward = m.split(":")
                reward, *flags = reward.split("+")
                llm.collective_rpc("metasd_reconfigure", kwargs={
                    "objective": objective, "reward": reward, "prompt_probe": "probe" in flags,
                    "warm_start": "cold" not in flags, "speculation_gate": "nogate" not in flags})
            entry = {}
            fresh = unseen(prompts)
            for run in ("_cold", ""):  # the prompts one at a time, twice
                entry[f"bs1{run}"] = per_prompt = []
                for p in fresh(bs1):
                    s0, t0 = steps[0], time.perf_counter()
                    o = llm.generate([p], params, use_tqdm=False)[0]
                    per_prompt.append({"tokens": len(o.outputs[0].token_ids),
                                       "seconds": time.perf_counter() - t0,
                                       "steps": steps[0] - s0,
                                       "ids": list(o.outputs[0].token_ids)})
            for batch in (16, 64):
                for run in ("_cold", ""):  # twice: first and warmed-up
                    sub = fresh(batch)
                    t0 = time.perf_counter()
                    outs = llm.generate(sub, params, use_tqdm=False)
                    entry[f"bs{batch}{run}"] = (sum(len(o.outputs[0].token_ids) for o in outs)
                                                / (time.perf_counter() - t0))
            if m.startswith("metasd:"):
                s = llm.collective_rpc("metasd_stats")[0]
                total = sum(d["chosen"] for d in s["drafters"].values()) or 1
                entry["arm_share"] = {n: d["chosen"] / total for n, d in s["drafters"].items()}
                entry["gate"] = s.get("gate")  # per batch size: measured plain vs spec tokens/s
            out[m] = entry
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return out


def _tps(prompts: list[dict]) -> float:
    return sum(r["tokens"] for r in prompts) / sum(r["seconds"] for r in prompts)


def figures(rounds: list[dict], m: str) -> dict:
    tps1 = [_tps(x[m]["bs1"]) for x in rounds]
    first = rounds[0][m]["bs1"]
    return {"tokens_per_s_bs1": statistics.median(tps1),
            "tokens_per_s_bs16": statistics.median(x[m]["bs16"] for x in rounds),
            "tokens_per_s_bs64": statistics.median(x[m]["bs64"] for x in rounds),
            "tokens_per_s_bs1_cold": statistics.median(_tps(x[m]["bs1_cold"]) for x in rounds),
            **{f"tokens_per_s_bs{b}_cold": statistics.median(x[m][f"bs{b}_cold"] for x in rounds)
               for b in (16, 64)},
            "mean_accepted_len": sum(r["tokens"] for r in first)
            / sum(r["steps"] for r in first) - 1,
            "spread_bs1": [min(tps1), max(tps1)]}


def oracle(rounds: list[dict], singles: list[str]) -> dict:
    n = len(rounds[0][singles[0]]["bs1"])
    pick = [max(singles, key=lambda m: rounds[0][m]["bs1"][i]["tokens"]
                / rounds[0][m]["bs1"][i]["steps"]) for i in range(n)]
    tps = [sum(x[m]["bs1"][i]["tokens"] for i, m in enumerate(pick))
           / sum(x[m]["bs1"][i]["seconds"] for i, m in enumerate(pick)) for x in rounds]
    r0 = rounds[0]
    return {"tokens_per_s_bs1": statistics.median(tps), "tokens_per_s_bs16": None,
            "tokens_per_s_bs64": None, "tokens_per_s_bs1_cold": None,
            "tokens_per_s_bs16_cold": None, "tokens_per_s_bs64_cold": None,
            "mean_accepted_len": sum(r0[m]["bs1"][i]["tokens"] for i, m in enumerate(pick))
            / sum(r0[m]["bs1"][i]["steps"] for i, m in enumerate(pick)) - 1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="default: results/selection.json (zoo), results/smollm2/selection.json")
    ap.add_argument("--target", choices=("zoo", "smollm2"), default="zoo",
                    help="smollm2: SmolLM2-135M-Instruct (python -m vllm_metasd.smollm2.fetch) "
                         "with its distilled drafters and held-out chat prompts")
    ap.add_argument("--pools", default="default,paper")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="MetaSD variants, comma-separated (default: all)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=24, help="mixed prompts at batch 1")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--report", type=Path, default=None,
                    help="print the table and write the plot of an existing JSON; run nothing")
    args = ap.parse_args()
    if args.report is not None:
        out = json.loads(args.report.read_text())
        out.setdefault("target", "zoo")
        print(table(out))
        plot(out, args.report.with_suffix(".png"))
        return 0

    zoo = targets.use(args.target)
    if args.out is None:
        args.out = targets.results_path("selection.json")
    if args.target == "smollm2":  # chat requests, domains interleaved
        from vllm_metasd.smollm2.workload import chat_workload

        prompts = chat_workload(zoo)[0]
    else:
        prompts = [p["prompt"] for p in zoo.load_prompts()]
    variants = args.variants.split(",")
    pools = [p for p in args.pools.split(",")
             if p != "paper" or "general-equal" in zoo.DRAFTERS]
    groups: list[tuple[str, list[str]]] = []  # (general drafter, methods on one engine)
    groups += [("general", [m]) for m in ["none", "ngram"] + [f"draft:{d}" for d in SPECIALISTS]]
    for pool in pools:
        groups.append((POOLS[pool], [f"draft:{POOLS[pool]}"]))
        groups.append((POOLS[pool], [f"{v}@{pool}" for v in variants]))
    rounds = []
    for r in range(args.rounds):
        res = {}
        for general, methods in (groups if r % 2 == 0 else groups[::-1]):
            names = [m.split("@")[0] for m in methods]
            got = run_engine(names, general, prompts, args.prompts, args.max_tokens)
            for m, name in zip(methods, names):
                res[m] = got[name]
                print(json.dumps({"round": r, "method": m, **{
                    k: v for k, v in figures([{m: got[name]}], m).items()}}), flush=True)
        rounds.append(res)
    reference = [x["ids"] for x in rounds[0]["none"]["bs1"]]
    entries = []
    for pool in pools:
        singles = ["ngram"] + [f"draft:{d}" for d in (*SPECIALISTS, POOLS[pool])]
        for m in ["none"] + singles:
            entries.append({"pool": pool, "method": m, **figures(rounds, m)})
        entries.append({"pool": pool, "method": "oracle", **oracle(rounds, singles)})
        for v in variants:
            key = f"{v}@{pool}"
            e = {"pool": pool, "method": v, **figures(rounds, key),
                 "arm_share": rounds[-1][key].get("arm_share"),
                 "gate": rounds[-1][key].get("gate"),
                 "identical_to_plain_bs1": [x["ids"] for x in rounds[0][key]["bs1"]] == reference}
            entries.append(e)
    out = {"target": args.target, "k": K, "max_tokens": args.max_tokens, "rounds": args.rounds,
           "prompts_bs1": args.prompts, "methods": entries}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(table(out))
    plot(out, args.out.with_suffix(".png"))
    return 0


def table(out: dict) -> str:
    """Markdown: per pool and method, tokens/s at each batch size as a ratio to
    the pool's best single method (drafter or n-gram) and to plain decoding,
    and the mean accepted length as a ratio to the oracle's."""
    lines = []
    for pool in dict.fromkeys(e["pool"] for e in out["methods"]):
        rows = [e for e in out["methods"] if e["pool"] == pool]
        by = {e["method"]: e for e in rows}
        singles = [e for e in rows if e["method"].startswith("draft:") or e["method"] == "ngram"]
        # first runs: older results have none, or none at batch 1
        cold = [b for b in (1, 16, 64) if f"tokens_per_s_bs{b}_cold" in by["none"]]
        lines += [f"**{pool} pool**", "",
                  "| method | bs1 / best single | bs16 / best single | bs64 / best single "
                  "| bs1 / plain | bs16 / plain | bs64 / plain "
                  + "".join(f"| bs{b} / plain, first run " for b in cold)
                  + "| accepted len (/ oracle) |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(cold) + "---|"]
        for e in rows:
            cells = []
            for plain, suffix in [(False, ""), (True, "")] + [(True, "_cold")] * bool(cold):
                for b in (cold if suffix else (1, 16, 64)):
                    key = f"tokens_per_s_bs{b}{suffix}"
                    ref = (by["none"][key] if plain
                           else max(x[key] for x in singles if x[key] is not None))
                    cells.append("-" if e.get(key) is None else f"{e[key] / ref:.2f}")
            mal = e["mean_accepted_len"] / max(by["oracle"]["mean_accepted_len"], 1e-9)
            lines.append(f"| {e['method']} | " + " | ".join(cells)
                         + f" | {e['mean_accepted_len']:.2f} ({mal:.2f}) |")
        lines.append("")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pools = list(dict.fromkeys(e["pool"] for e in out["methods"]))
    fig, axes = plt.subplots(1, len(pools), figsize=(7 * len(pools), 4), squeeze=False)
    for ax, pool in zip(axes[0], pools):
        rows = [e for e in out["methods"] if e["pool"] == pool]
        plain = next(e for e in rows if e["method"] == "none")
        x = np.arange(len(rows))
        for i, b in enumerate((1, 16, 64)):
            key = f"tokens_per_s_bs{b}"
            ax.bar(x + (i - 1) * 0.27, [(e[key] or 0) / plain[key] for e in rows], 0.27,
                   label=f"batch {b}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(x, [e["method"] for e in rows], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("tokens/s / plain decoding")
        ax.set_title(f"{out['target']}: {pool} pool (medians of {out['rounds']} rounds)")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
