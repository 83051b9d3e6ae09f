"""Acceptance matrix of the bundled zoo: every (drafter, domain) pair through vLLM.

    python benchmarks/acceptance_matrix.py [--prompts 16] [--max-tokens 64] [--out DIR]
    python benchmarks/acceptance_matrix.py --target smollm2   # -> results/smollm2/
    python benchmarks/acceptance_matrix.py --drafters general,general-equal --out /tmp/m

For each zoo drafter, one vLLM CPU engine with vLLM's own ``draft_model``
speculative decoding (k = 4) generates the held-out prompts of every domain at
temperature 0 and 1. From vLLM's spec-decode counters it records, per cell,

    mean_accepted_len = accepted draft tokens / verification steps   (0..k)

(tokens emitted per step are 1 + that). Then, at batch 1 and temperature 0, it
times each domain's best drafter against no speculation (same prompts, same
run), and every drafter's batch-1 speedup over no speculation per domain
(``speedup_bs1``). Writes ``acceptance_matrix.json`` and ``acceptance_matrix.png``.
With ``--target smollm2`` the held-out chat requests are rendered with
SmolLM2's chat template.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

K = 4
HERE = Path(__file__).resolve().parent


def make_llm(target: str, drafter: str | None):
    from vllm import LLM

    spec = None if drafter is None else {
        "method": "draft_model", "model": drafter, "num_speculative_tokens": K}
    return LLM(model=target, enforce_eager=True, max_model_len=1024, max_num_seqs=16,
               seed=0, speculative_config=spec, disable_log_stats=False)


def spec_counters(llm) -> tuple[int, int]:
    """(verification steps, accepted draft tokens) so far."""
    values = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    return (int(values.get("vllm:spec_decode_num_drafts", 0)),
            int(values.get("vllm:spec_decode_num_accepted_tokens", 0)))


def mean_accepted_len(llm, prompts: list[str], params) -> float:
    steps0, acc0 = spec_counters(llm)
    llm.generate(prompts, params, use_tqdm=False)
    steps1, acc1 = spec_counters(llm)
    return (acc1 - acc0) / max(steps1 - steps0, 1)


def decode_seconds(llm, prompts: list[str], params) -> float:
    """Wall time to generate every prompt alone (batch 1)."""
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    for p in prompts:
        llm.generate([p], params, use_tqdm=False)
    return time.perf_counter() - t0


def plot(matrix: dict, drafters: list[str], domains: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, temp in zip(axes, ("0", "1")):
        grid = [[matrix[temp][d][dom] for dom in domains] for d in drafters]
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=K)
        ax.set_xticks(range(len(domains)), domains)
        ax.set_yticks(range(len(drafters)), drafters)
        ax.set_xlabel("domain (held-out prompts)")
        ax.set_ylabel("drafter")
        ax.set_title(f"mean accepted length, k={K}, T={temp}")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center",
                        color="white" if v < K / 2 else "black", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> None:
    from vllm import SamplingParams

    from vllm_metasd import zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16, help="prompts per domain")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--speed-prompts", type=int, default=4,
                    help="prompts per domain for the batch-1 timing")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: results/ (zoo), results/smollm2/ (smollm2)")
    ap.add_argument("--target", choices=("zoo", "smollm2"), default="zoo",
                    help="smollm2: SmolLM2-135M-Instruct and its distilled drafters")
    ap.add_argument("--drafters", default=None,
                    help="comma-separated subset of the zoo's drafters (default: all but random)")
    args = ap.parse_args(argv)
    from vllm_metasd.smollm2.workload import render, select

    zoo = select(args.target)
    if args.out is None:
        args.out = HERE / "results" / ("smollm2" if args.target == "smollm2" else "")
    if not zoo.available():
        raise SystemExit(f"the {args.target} weights are missing; build them with "
                         f"`python -m vllm_metasd.{args.target}.build`")

    domains = list(zoo.DOMAINS)
    drafters = [d for d in zoo.DRAFTERS if d != "random"]
    if args.drafters:
        drafters = args.drafters.split(",")
        for name in drafters:
            zoo.drafter_path(name)  # an unknown name fails here, naming the valid ones
    if args.target == "smollm2":     # chat requests in the target's chat template
        prompts = {d: render(zoo.target_path(), zoo.load_prompts(d)[: args.prompts])
                   for d in domains}
    else:
        prompts = {d: [p["prompt"] for p in zoo.load_prompts(d)[: args.prompts]]
                   for d in domains}
    temps = {"0": SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True),
             "1": SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=0,
                                 ignore_eos=True)}
    greedy = temps["0"]

    matrix = {t: {} for t in temps}
    seconds: dict[str, dict[str, float]] = {}
    llm = make_llm(zoo.target_path(), None)
    seconds["none"] = {d: decode_seconds(llm, prompts[d][: args.speed_prompts], greedy)
                       for d in domains}
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    for name in drafters:
        llm = make_llm(zoo.target_path(), zoo.drafter_path(name))
        for t, params in temps.items():
            matrix[t][name] = {d: mean_accepted_len(llm, prompts[d], params) for d in domains}
        seconds[name] = {d: decode_seconds(llm, prompts[d][: args.speed_prompts], greedy)
                         for d in domains}
        print(name, json.dumps(matrix["0"][name]), flush=True)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

    specialists = [d for d in domains if d in drafters]
    summary = {}
    for dom in domains:
        best = max(drafters, key=lambda n: matrix["0"][n][dom])
        others = [matrix["0"][s][dom] for s in specialists if s != dom]
        summary[dom] = {"best_drafter": best}
        if dom in specialists and others:  # (not with a --drafters subset lacking them)
            summary[dom]["specialist_vs_best_other_specialist"] = \
                matrix["0"][dom][dom] / max(max(others), 1e-9)
        summary[dom]["speedup_bs1_best_drafter"] = seconds["none"][dom] / seconds[best][dom]
    # Every drafter's batch-1 speedup over no speculation, per domain and overall.
    speedup = {n: {**{d: seconds["none"][d] / seconds[n][d] for d in domains},
                   "all": sum(seconds["none"].values()) / sum(seconds[n].values())}
               for n in drafters}
    result = {"target": args.target, "k": K, "max_tokens": args.max_tokens,
              "prompts_per_domain": args.prompts, "speed_prompts_per_domain": args.speed_prompts,
              "mean_accepted_len": matrix, "decode_seconds_bs1": seconds,
              "speedup_bs1": speedup, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "acceptance_matrix.json").write_text(json.dumps(result, indent=1))
    plot(matrix, drafters, domains, args.out / "acceptance_matrix.png")
    print(json.dumps(summary, indent=1))
    print(json.dumps({n: round(v["all"], 3) for n, v in speedup.items()}))


if __name__ == "__main__":
    main()
