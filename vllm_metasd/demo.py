"""The main job: MetaSD on the bundled model zoo, checked against plain decoding.

    python -m vllm_metasd.demo [--config metasd.json] [--target DIR|smollm2]
                               [--num-prompts N] [--png FILE] [--verbose]

Runs the mixed-domain prompt set twice through vLLM on this machine, one request
at a time and in float32: once without speculation, once with MetaSD. Greedy
outputs must be identical token for token (exit 1 otherwise). Prints one compact
table: tokens/s of both, the speedup, identical yes/no, and per drafter its share
of the engine steps, its acceptance rate and mean reward; writes a PNG of each
drafter's share per prompt domain (``--png``). vLLM's own logs (engine, workers)
go to a log file unless ``--verbose``. ``--target smollm2``: SmolLM2-135M-Instruct
with its distilled drafters and held-out chat prompts
(``python -m vllm_metasd.smollm2.fetch`` first).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def default_setup(workdir: Path) -> tuple[str, dict, list[dict]]:
    """(target, metasd config, prompts as {"domain", "prompt"}): the bundled zoo,
    else a tiny random-weight zoo generated on the fly."""
    from vllm_metasd import zoo

    if zoo.available():
        return zoo.target_path(), zoo.default_metasd_config(), zoo.load_prompts(split="mixed")
    from vllm_metasd.testing import make_tiny_zoo

    paths = make_tiny_zoo(workdir)
    config = {
        "num_speculative_tokens": 4,
        "drafters": [
            {"name": "good", "kind": "draft_model", "path": paths["good"]},
            {"name": "bad", "kind": "draft_model", "path": paths["bad1"]},
            {"name": "lookup", "kind": "ngram", "prompt_lookup_min": 2,
             "prompt_lookup_max": 4},
        ],
        "policy": {"name": "ucb", "beta": 1.0},
        "reward": "bd",
    }
    prompts = [("code", "def add(a, b):"), ("prose", "The quick brown fox"),
               ("data", "SELECT name FROM"), ("german", "Der schnelle braune"),
               ("math", "12 + 30 =")] * 4
    return paths["target"], config, [{"domain": d, "prompt": p} for d, p in prompts]


@contextlib.contextmanager
def quiet(log_path: Path | None):
    """Send everything written to the process's stdout/stderr file descriptors
    (vLLM's loggers, and the engine-core and worker processes started meanwhile,
    which inherit them) to ``log_path``. None: leave them alone."""
    if log_path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _counts(stats: dict | None) -> dict[str, int]:
    """Steps each drafter was chosen (``drafters.<name>.chosen``), read defensively."""
    drafters = (stats or {}).get("drafters") or {}
    return {name: int((d or {}).get("chosen") or 0) for name, d in drafters.items()}


def run(target: str, prompts: list[dict], max_tokens: int, speculative_config=None):
    """Generate every prompt, one at a time. Returns (token ids per prompt, seconds
    spent generating, final metasd_stats or None, steps chosen per drafter per domain)."""
    from vllm import LLM, SamplingParams

    # float32: the token-for-token check is then exact; in bf16 the target's
    # rounding depends on the batch shape (1 token vs k+1 verified per step),
    # which can flip near-tie argmaxes with or without speculation.
    # Batch 1 (one sequence at a time): on a CPU, where the target's forward is
    # compute-bound, speculation pays at small batches (benchmarks/README.md).
    llm = LLM(model=target, enforce_eager=True, max_model_len=512, max_num_seqs=1,
              seed=0, speculative_config=speculative_config, dtype="float32")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens, elapsed, per_domain = [], 0.0, {}
    before = {}
    for p in prompts:
        t0 = time.perf_counter()
        out = llm.generate([p["prompt"]], params, use_tqdm=False)
        elapsed += time.perf_counter() - t0
        tokens.append(list(out[0].outputs[0].token_ids))
        if speculative_config:  # this prompt's drafter choices, by its domain
            now = _counts(llm.collective_rpc("metasd_stats")[0])
            domain = per_domain.setdefault(p.get("domain", "all"), {})
            for name, n in now.items():
                domain[name] = domain.get(name, 0) + n - before.get(name, 0)
            before = now
    stats = llm.collective_rpc("metasd_stats")[0] if speculative_config else None
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return tokens, elapsed, stats, per_domain


def _num(value, fmt: str, none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def drafter_rows(stats: dict | None) -> list[tuple[str, str, str, str]]:
    """(drafter, share of steps, acceptance rate, mean reward) per drafter."""
    drafters = (stats or {}).get("drafters") or {}
    total = sum(_counts(stats).values())
    rows = []
    for name, d in drafters.items():
        d = d or {}
        chosen, drafted, accepted = d.get("chosen"), d.get("drafted"), d.get("accepted")
        rate = d.get("acceptance_rate")
        if rate is None and drafted:
            rate = (accepted or 0) / drafted
        reward = d.get("mean_reward")
        if reward is None and d.get("reward_count"):
            reward = d.get("reward_sum", 0.0) / d["reward_count"]
        share = (chosen or 0) / total if total else None
        rows.append((name, _num(share, ".0%"), _num(rate, ".2f"), _num(reward, ".3f")))
    return rows


def format_report(n_tokens: int, t_plain: float, t_metasd: float, same: bool,
                  stats: dict | None) -> str:
    plain_tps, metasd_tps = n_tokens / t_plain, n_tokens / t_metasd
    lines = [
        f"{'':<18}{'tokens/s':>10}",
        f"{'plain decoding':<18}{plain_tps:>10.1f}",
        f"{'MetaSD':<18}{metasd_tps:>10.1f}",
        f"{'speedup':<18}{t_plain / t_metasd:>9.2f}x",
        f"{'identical':<18}{'yes' if same else 'NO':>10}",
        "",
        f"{'drafter':<12}{'share':>8}{'accept':>9}{'reward':>9}",
    ]
    lines += [f"{n:<12}{s:>8}{a:>9}{r:>9}" for n, s, a, r in drafter_rows(stats)]
    return "\n".join(lines)


def plot_share_per_domain(per_domain: dict[str, dict[str, int]], path: Path,
                          prompts: dict[str, int] | None = None) -> Path:
    """Stacked horizontal bars: each domain's engine steps split by drafter
    (``prompts``: prompts per domain, shown in the labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted(per_domain)
    arms = list(dict.fromkeys(a for d in domains for a in per_domain[d]))
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(domains) + 1.6))
    left = [0.0] * len(domains)
    colors = plt.get_cmap("tab10")
    for i, arm in enumerate(arms):
        shares = []
        for d in domains:
            total = sum(per_domain[d].values())
            shares.append(per_domain[d].get(arm, 0) / total if total else 0.0)
        labels = [f"{d} ({prompts[d]})" if prompts and d in prompts else d for d in domains]
        ax.barh(labels, shares, left=left, label=arm, color=colors(i % 10))
        left = [a + b for a, b in zip(left, shares)]
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of engine steps the bandit chose the drafter")
    ax.set_title("MetaSD: drafter share per prompt domain (prompts)")
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=min(len(arms), 7),
              frameon=False, fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def smollm2_setup() -> tuple[str, dict, list[dict]]:
    """SmolLM2-135M-Instruct, its drafters and its held-out chat prompts."""
    from vllm_metasd import smollm2
    from vllm_metasd.smollm2.workload import chat_workload

    if not smollm2.available():
        raise SystemExit("smollm2: target not converted; run: python -m vllm_metasd.smollm2.fetch")
    prompts, domains = chat_workload(smollm2, None, 4)
    return (smollm2.target_path(), smollm2.default_metasd_config(),
            [{"domain": d, "prompt": p} for p, d in zip(prompts, domains)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="metasd.json (default: the bundled zoo's)")
    ap.add_argument("--target", help="target model directory (default: the zoo's), or "
                    "'smollm2' for SmolLM2-135M-Instruct with its drafters and chat prompts")
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--png", default="metasd_demo_arm_share.png",
                    help="where to write the per-domain drafter share plot")
    ap.add_argument("--verbose", action="store_true",
                    help="show vLLM's logs (engine, workers) instead of writing them to a file")
    args = ap.parse_args(argv)
    if not args.verbose:
        # before vLLM is imported: its loggers, and those of the processes it starts
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        os.environ.setdefault("TQDM_DISABLE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        log_path = None if args.verbose else Path(tempfile.gettempdir()) / "metasd_demo.log"
        if log_path is not None:
            log_path.write_text("")
        with quiet(log_path):
            target, config, prompts = (smollm2_setup() if args.target == "smollm2"
                                       else default_setup(Path(tmp)))
        if args.config:
            config = args.config
        if args.target and args.target != "smollm2":
            target = args.target
        prompts = prompts[: args.num_prompts]
        print(f"target: {target}\nprompts: {len(prompts)} (one at a time), "
              f"max_tokens: {args.max_tokens}, float32, greedy", flush=True)
        if log_path is not None:
            print(f"vLLM logs: {log_path} (--verbose to show them)", flush=True)

        with quiet(log_path):
            plain, t_plain, _, _ = run(target, prompts, args.max_tokens)
            spec = {"method": "metasd", "config": config}
            metasd, t_metasd, stats, per_domain = run(target, prompts, args.max_tokens, spec)

    n_tokens = sum(len(t) for t in plain)
    same = plain == metasd
    print()
    print(format_report(n_tokens, t_plain, t_metasd, same, stats))
    if per_domain:
        counts: dict[str, int] = {}
        for p in prompts:
            counts[p.get("domain", "all")] = counts.get(p.get("domain", "all"), 0) + 1
        png = plot_share_per_domain(per_domain, Path(args.png), counts)
        print(f"\ndrafter share per domain: {png.resolve()}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
