"""MetaSD against no speculation, every single drafter, vLLM's n-gram and the
per-request oracle, on the zoo's mixed-domain workload, through vLLM on CPU.

    python benchmarks/run.py --out benchmarks/results/results.json     # full run
    python benchmarks/run.py --quick                                    # < 10 min

Every method generates the same held-out prompts greedily (temperature 0):
at batch 1 (one prompt at a time) and at batch 16 (all prompts, 16 running).
For each method it reports output tokens/s at both batch sizes, the mean
accepted length per step (engine steps counted at batch 1, so prefill and
empty drafts count as steps for every method alike: tokens per step - 1), the
same per domain, and whether the outputs equal plain decoding. MetaSD entries
add the selection + reward overhead per step and the share of steps each
drafter was chosen, per domain. The oracle is, per prompt, the single drafter
with the most tokens per step in hindsight (its bs16 figure does not exist:
no single engine runs a different fixed drafter per request). Ratios are
within one run; absolute numbers vary with the machine's load.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import targets  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from targets import models  # noqa: E402

K = 4

# Defaults picked with benchmarks/replay.py (see benchmarks/README.md).
METASD_POLICIES = {
    "ucb": {"name": "ucb", "beta": 0.1},
    "exp3": {"name": "exp3", "gamma": 0.2, "eta": 0.3},
    "sliding_window_ucb": {"name": "sliding_window_ucb", "beta": 0.1, "window": 64},
}
REWARDS = ("bd", "acceptance")


def all_methods() -> list[str]:
    zoo = models()
    drafters = [d for d in zoo.DRAFTERS if d != "random"]
    return (["none"] + [f"draft:{d}" for d in drafters] + ["ngram"]
            + [f"metasd:{p}:{r}" for p in METASD_POLICIES for r in REWARDS])


def speculative_config(engine: str):
    zoo = models()
    if engine == "none":
        return None
    if engine == "ngram":
        return {"method": "ngram", "num_speculative_tokens": K,
                "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    if engine.startswith("draft:"):
        return {"method": "draft_model", "model": zoo.drafter_path(engine[6:]),
                "num_speculative_tokens": K}
    cfg = zoo.default_metasd_config()  # warm start on, as replay tuning chose
    cfg.update(num_speculative_tokens=K, log_stats_interval_s=0)
    return {"method": "metasd", "config": cfg}


class Engine:
    """One vLLM engine; counts engine steps (for tokens per step at batch 1)."""

    def __init__(self, target: str, spec, max_model_len: int, dtype: str):
        from vllm import LLM

        self.llm = LLM(model=target, enforce_eager=True, max_model_len=max_model_len,
                       max_num_seqs=16, seed=0, speculative_config=spec, dtype=dtype)
        self.steps = 0
        engine = self.llm.llm_engine
        step = engine.step

        def counted_step(*a, **kw):
            self.steps += 1
            return step(*a, **kw)

        engine.step = counted_step

    def close(self) -> None:
        del self.llm
        gc.collect()


def run_bs1(engine: Engine, prompts: list[str], params, metasd: bool) -> list[dict]:
    rows = []
    for p in prompts:
        s0 = engine.steps
        t0 = time.perf_counter()
        out = engine.llm.generate([p], params, use_tqdm=False)[0]
        dt = time.perf_counter() - t0
        row = {"tokens": list(out.outputs[0].token_ids), "seconds": dt,
               "steps": engine.steps - s0}
        if metasd:
            # vLLM's internal id is "<request_id>-<8 random chars>".
            row["choices"] = [a for rid, a in engine.llm.collective_rpc("metasd_choices")[0]
                              if rid.rsplit("-", 1)[0] == out.request_id]
        rows.append(row)
    return rows


def run_bs16(engine: Engine, prompts: list[str], params) -> tuple[list[list[int]], float]:
    t0 = time.perf_counter()
    outs = engine.llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - t0


def figures(rows: list[dict]) -> dict:
    tokens = sum(len(r["tokens"]) for r in rows)
    return {"tokens_per_s_bs1": tokens / sum(r["seconds"] for r in rows),
            "mean_accepted_len": tokens / sum(r["steps"] for r in rows) - 1}


def method_entry(method: str, rows: list[dict], domains: list[str], bs16=None) -> dict:
    entry = {"method": method, **figures(rows),
             "tokens_per_s_bs16": None if bs16 is None else bs16[1],
             "per_domain": {}}
    for dom in sorted(set(domains)):
        sub = [r for r, d in zip(rows, domains) if d == dom]
        entry["per_domain"][dom] = {**figures(sub), "tokens_per_s_bs16": None}
    return entry


def main(argv: list[str] | None = None) -> int:
    from vllm import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="default: results/results.json (zoo), results/smollm2/results.json")
    ap.add_argument("--target", choices=("zoo", "smollm2"), default="zoo",
                    help="smollm2: SmolLM2-135M-Instruct (python -m vllm_metasd.smollm2.fetch)"
                         " with its distilled drafters")
    ap.add_argument("--prompts", type=Path, default=None,
                    help='JSONL of chat requests {"category": ..., "turns": [...]}: the first '
                         "turn of each, in the target's chat template; categories = domains")
    ap.add_argument("--quick", action="store_true",
                    help="2 prompts per domain, 32 tokens (< 10 minutes)")
    ap.add_argument("--prompts-per-domain", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--methods", default=None,
                    help="comma-separated subset of: " + ",".join(all_methods()))
    ap.add_argument("--dtype", default="bfloat16", help="vLLM dtype (the zoo is bf16)")
    ap.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)
    zoo = targets.use(args.target)
    if args.out is None:
        args.out = targets.results_path("results.json")
    if not zoo.available():
        raise SystemExit(f"{args.target}: weights missing: python -m vllm_metasd.{args.target}.build"
                         + (" (target: python -m vllm_metasd.smollm2.fetch)"
                            if args.target == "smollm2" else ""))
    per_domain = args.prompts_per_domain or (2 if args.quick else 8)
    max_tokens = args.max_tokens or (32 if args.quick else 96)
    methods = args.methods.split(",") if args.methods else all_methods()
    unknown = set(methods) - set(all_methods())
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; valid: {all_methods()}")

    # The mixed workload: held-out prompts of every domain, interleaved.
    if args.prompts is not None or args.target == "smollm2":   # chat requests
        from vllm_metasd.smollm2.workload import chat_workload

        prompts, domains = chat_workload(zoo, args.prompts, per_domain)
    else:
        rows = [p for i in range(per_domain) for d in zoo.DOMAINS
                for p in [zoo.load_prompts(d)[i]]]
        prompts, domains = [r["prompt"] for r in rows], [r["domain"] for r in rows]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    warm = SamplingParams(max_tokens=4, temperature=0.0)

    engines = []  # each engine serves one or more methods (MetaSD variants share one)
    for m in methods:
        engine = m.split(":")[0] if m.startswith("metasd") else m
        if engine not in engines:
            engines.append(engine)

    results, reference, bs1_rows = [], None, {}
    for name in engines:
        print(f"== engine {name}", flush=True)
        eng = Engine(zoo.target_path(), speculative_config(name), max_model_len=1024,
                     dtype=args.dtype)
        eng.llm.generate(prompts[:2], warm, use_tqdm=False)  # warm-up
        variants = [m for m in methods if m == name or m.startswith(name + ":")]
        for m in variants:
            if name == "metasd":
                _, policy, reward = m.split(":")
                eng.llm.collective_rpc("metasd_reconfigure", kwargs={
                    "policy": METASD_POLICIES[policy], "reward": reward})
                eng.llm.collective_rpc("metasd_reset_stats")
            rows_m = run_bs1(eng, prompts, params, metasd=name == "metasd")
            stats = eng.llm.collective_rpc("metasd_stats")[0] if name == "metasd" else None
            bs16_tokens, bs16_s = run_bs16(eng, prompts, params)
            tokens = [r["tokens"] for r in rows_m]
            if reference is None and m == "none":
                reference = (tokens, bs16_tokens)
            entry = method_entry(m, rows_m, domains,
                                 (bs16_tokens, sum(map(len, bs16_tokens)) / bs16_s))
            if reference is not None:
                # Same batch size as the reference: bf16 matmuls round differently
                # for other batch shapes, which alone can flip a near-tie argmax.
                entry["identical_share_bs1"] = identical_share(tokens, reference[0])
                entry["identical_share_bs16"] = identical_share(bs16_tokens, reference[1])
                entry["lossless"] = (entry["identical_share_bs1"] == 1.0
                                     and entry["identical_share_bs16"] == 1.0)
            else:
                entry["lossless"] = None
            if stats is not None:
                bs1_seconds = sum(r["seconds"] for r in rows_m)
                entry["overhead_ms_per_step"] = 1e3 * stats["overhead_s"] / max(stats["steps"], 1)
                entry["overhead_share"] = stats["overhead_s"] / bs1_seconds
                entry["arm_share"] = arm_shares(rows_m, domains)
                entry["choices_first_prompt_per_domain"] = {
                    d: rows_m[domains.index(d)]["choices"] for d in sorted(set(domains))}
            bs1_rows[m] = rows_m
            results.append(entry)
            print(json.dumps({k: v for k, v in entry.items()
                              if k not in ("per_domain", "choices_first_prompt_per_domain")}),
                  flush=True)
        eng.close()

    singles = [m for m in bs1_rows if m.startswith("draft:") or m == "ngram"]
    if singles:
        results.append(oracle_entry(bs1_rows, singles, domains))
    out = {"machine": machine(), "target": args.target,
           "prompts_file": None if args.prompts is None else str(args.prompts),
           "k": K, "max_tokens": max_tokens, "dtype": args.dtype,
           "prompts_per_domain": per_domain, "num_prompts": len(prompts),
           "methods": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    if args.plots:
        plot(out, args.out.parent)
    print(table(results))
    return 0


def identical_share(outputs: list[list[int]], reference: list[list[int]]) -> float:
    return sum(a == b for a, b in zip(outputs, reference)) / len(reference)


def arm_shares(rows: list[dict], domains: list[str]) -> dict:
    """Share of steps each drafter was chosen, per domain and overall."""
    per = defaultdict(Counter)
    for r, d in zip(rows, domains):
        per[d].update(r["choices"])
        per["all"].update(r["choices"])
    return {d: {a: n / max(sum(c.values()), 1) for a, n in sorted(c.items())}
            for d, c in per.items()}


def oracle_entry(bs1_rows: dict, singles: list[str], domains: list[str]) -> dict:
    """Per prompt, the single drafter with the most tokens per step (hindsight)."""
    best_rows, picks = [], []
    for i in range(len(domains)):
        best = max(singles, key=lambda m: len(bs1_rows[m][i]["tokens"]) / bs1_rows[m][i]["steps"])
        best_rows.append(bs1_rows[best][i])
        picks.append(best)
    entry = method_entry("oracle", best_rows, domains)
    entry["picks"] = dict(Counter(picks))
    entry["lossless"] = None
    return entry


def machine() -> dict:
    import platform

    import torch
    import vllm

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "vllm": vllm.__version__, "python": platform.python_version()}


def table(results: list[dict]) -> str:
    lines = [f"| {'method':28s} | tok/s bs1 | tok/s bs16 | mean acc len | identical bs1/bs16 "
             "| overhead |", "|---|---|---|---|---|---|"]
    for r in results:
        bs16 = "-" if r["tokens_per_s_bs16"] is None else f"{r['tokens_per_s_bs16']:.1f}"
        same = ("-" if "identical_share_bs1" not in r else
                f"{r['identical_share_bs1']:.2f} / {r['identical_share_bs16']:.2f}")
        ovh = (f"{r['overhead_ms_per_step']:.2f} ms ({100 * r['overhead_share']:.1f}%)"
               if "overhead_ms_per_step" in r else "")
        lines.append(f"| {r['method']:28s} | {r['tokens_per_s_bs1']:.1f} | {bs16} | "
                     f"{r['mean_accepted_len']:.2f} | {same} | {ovh} |")
    return "\n".join(lines)


def plot(out: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results = out["methods"]
    names = [r["method"] for r in results]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(names)), 4))
    ax.bar(x - 0.2, [r["tokens_per_s_bs1"] for r in results], 0.4, label="batch 1")
    ax.bar(x + 0.2, [r["tokens_per_s_bs16"] or 0 for r in results], 0.4, label="batch 16")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput per method (greedy, mixed workload)")
    ax.legend()
    fig.savefig(folder / "tokens_per_s.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    metasd = next((r for r in results if r["method"].startswith("metasd:ucb:")), None) \
        or next((r for r in results if r["method"].startswith("metasd")), None)
    if metasd is None:
        return
    curves = metasd["choices_first_prompt_per_domain"]
    arms = sorted({a for c in curves.values() for a in c})
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3), sharey=True)
    for ax, (dom, seq) in zip(np.atleast_1d(axes), curves.items()):
        steps = np.arange(1, len(seq) + 1)
        for a in arms:
            ax.plot(steps, np.cumsum([c == a for c in seq]) / steps, label=a)
        ax.set_title(f"{dom} prompt")
        ax.set_xlabel("step")
    np.atleast_1d(axes)[0].set_ylabel("cumulative share chosen")
    np.atleast_1d(axes)[-1].legend(fontsize=6)
    fig.suptitle(f"{metasd['method']}: arm choice over one request's steps")
    fig.savefig(folder / "arm_share.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
