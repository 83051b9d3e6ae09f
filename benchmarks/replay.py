"""Offline replay: record every drafter's per-step outcome once, then replay any
bandit policy over the trace in seconds (tune beta, windows, learning rates
without rerunning vLLM).

    python benchmarks/replay.py record --out benchmarks/results/trace.npz
    python benchmarks/replay.py tune --trace benchmarks/results/trace.npz \
        --out benchmarks/results/replay.json
    python benchmarks/replay.py record --target smollm2 --prompts-per-domain 8 \
        --out benchmarks/results/smollm2/trace.npz     # SmolLM2-135M-Instruct's chat prompts

``record``: the target's greedy continuation ``y`` of each held-out prompt
(through vLLM, no speculation), then, for every drafter and every output
position ``t``, what drafting there would give at temperature 0:

- draft LMs, by teacher forcing (one Hugging Face forward per prompt): while a
  greedy draft matches ``y`` the drafter's inputs *are* ``y``, so the accepted
  length is exact; the BD reward (share of the k drafted positions that agree
  with the target) is exact up to the first mismatch and teacher-forced after it;
- prompt lookup (n-gram): vLLM's own numba matcher on the history (the one
  the engine's n-gram arm calls); an empty draft earns 0.

Two more signals per draft LM: ``bd_full``, the paper's block divergence from
the full distributions (mean over the k drafted positions of 1 - TV between the
target's softmax and the drafter's, teacher-forced on ``y``), and ``probe``,
the drafted tokens its drafts would have had accepted over the prompt's last
32 positions (the engine's prompt-informed start, ``prompt_probe``, by its own
functions: ``probe_accepted``, and for the lookup ``lookup_probe``, NaN where
it proposes nothing). The prompts' token ids are kept too: the warm start
finds each prompt's neighbours among the finished ones, as in the engine.

``replay``: the decode as MetaSD runs it: position 1 (prefill emitted token 0),
each step the request's bandit picks an arm, the step emits accepted + 1 tokens,
the bandit is updated with the arm's reward. The oracle is the best single
drafter per prompt in hindsight (fewest steps); regret counts the extra steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import targets  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from selection import POOLS, SPECIALISTS  # noqa: E402  (the drafter pools the engine runs)

HERE = Path(__file__).resolve().parent
K = 4
PROBE_WINDOW = 32  # as vllm_metasd.evidence.PROBE_WINDOW
PROMPT_TOKENS = 64  # a prompt's length in the replay (any > k + 1: its first draft catches up)


# ---- trace --------------------------------------------------------------------

def lm_outcomes(match: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output position t: (accepted length, BD reward) of a greedy k-token
    draft, from ``match[t]`` = the drafter's teacher-forced argmax equals y[t]
    (the accepted length by the engine's prompt-probe rule, ``draft_runs``)."""
    from vllm_metasd.core.objective import draft_runs

    L = len(match)
    acc = draft_runs(match, np.zeros(L, dtype=np.int64), k).astype(np.int8)
    bd = np.array([match[t:t + k].mean() for t in range(L)], dtype=np.float32)
    return acc, bd


def ngram_outcomes(prompt: np.ndarray, y: np.ndarray, k: int, min_n: int, max_n: int):
    """Per output position t: (accepted length, BD reward, drafted tokens) of
    the n-gram arm's draft after prompt + y[:t] (vLLM's matcher, as the
    engine's arm; ``arms.lookup_drafts``, as its prompt probe), its drafted
    tokens cut at the end of y; an empty draft scores 0."""
    from vllm_metasd.arms import lookup_drafts

    seq = np.concatenate([prompt, y])
    ends = len(prompt) + np.arange(len(y))
    _, drafted, hits, accepted = lookup_drafts(seq, ends, k, min_n, max_n, len(seq) + k)
    bd = np.where(drafted > 0, hits.sum(axis=1) / np.maximum(drafted, 1), 0.0)
    return accepted.astype(np.int8), bd.astype(np.float32), drafted.astype(np.int8)


def record(args) -> None:
    import gc

    import torch
    from transformers import LlamaForCausalLM
    from vllm import LLM, SamplingParams

    from vllm_metasd.arms import lookup_probe
    from vllm_metasd.core.objective import probe_accepted

    zoo = targets.use(args.target)
    if args.target == "smollm2":  # chat requests, domains interleaved
        from vllm_metasd.smollm2.workload import chat_workload

        rows = [{"domain": c, "prompt": text}
                for text, c in zip(*chat_workload(zoo, None, args.prompts_per_domain))]
    else:
        rows = [p for d in zoo.DOMAINS for p in zoo.load_prompts(d)[: args.prompts_per_domain]]
    llm = LLM(model=zoo.target_path(), enforce_eager=True, max_model_len=1024, seed=0)
    outs = llm.generate([r["prompt"] for r in rows],
                        SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                       ignore_eos=True), use_tqdm=False)
    prompts = [np.array(o.prompt_token_ids) for o in outs]
    ys = [np.array(o.outputs[0].token_ids) for o in outs]
    del llm
    gc.collect()

    arms = [d for d in zoo.DRAFTERS if d != "random"] + ["lookup"]
    lens = [len(y) for y in ys]
    total = sum(lens)
    acc = np.zeros((len(arms), total), dtype=np.int8)
    bd = np.zeros((len(arms), total), dtype=np.float32)
    drafted = np.full((len(arms), total), K, dtype=np.int8)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    bd_full = np.zeros((len(arms), total), dtype=np.float32)
    probe = np.zeros((len(arms), len(rows)), dtype=np.float32)
    seqs = [torch.from_numpy(np.concatenate([p, y])).long()[None] for p, y in zip(prompts, ys)]

    def answer_probs(model, i):  # softmax at the positions predicting y, and all argmaxes
        p, y = prompts[i], ys[i]
        logits = model(seqs[i]).logits[0].float()
        return logits[len(p) - 1:len(p) - 1 + len(y)].softmax(-1), logits.argmax(-1).numpy()

    with torch.no_grad():
        target = LlamaForCausalLM.from_pretrained(zoo.target_path(), dtype=torch.bfloat16)
        target_p = [answer_probs(target, i)[0] for i in range(len(rows))]
        del target
        for a, name in enumerate(arms[:-1]):
            model = LlamaForCausalLM.from_pretrained(zoo.drafter_path(name), dtype=torch.bfloat16)
            for i, (p, y) in enumerate(zip(prompts, ys)):
                q, pred = answer_probs(model, i)
                match = pred[len(p) - 1:len(p) - 1 + len(y)] == y  # predicts y[t]
                sl = slice(offsets[i], offsets[i + 1])
                acc[a, sl], bd[a, sl] = lm_outcomes(match, K)
                align = (1 - 0.5 * (target_p[i] - q).abs().sum(-1)).numpy()
                bd_full[a, sl] = [align[t:t + K].mean() for t in range(len(y))]
                first = max(len(p) - 1 - PROBE_WINDOW, 0)
                hits = pred[first:len(p) - 1] == p[first + 1:]
                probe[a, i] = probe_accepted(hits, np.zeros(len(hits), dtype=np.int64), 1, K)[0]
                # The last positions cannot draft k tokens inside max_tokens.
                drafted[a, sl] = np.minimum(K, len(y) - np.arange(len(y)))
            print(f"recorded {name}", flush=True)
    for i, (p, y) in enumerate(zip(prompts, ys)):
        sl = slice(offsets[i], offsets[i + 1])
        acc[-1, sl], bd[-1, sl], drafted[-1, sl] = ngram_outcomes(p, y, K, 2, 4)
        probe[-1, i] = lookup_probe(p, PROBE_WINDOW, K, 2, 4, len(p) + K)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    bd_full[-1] = bd[-1]  # n-gram: q is one-hot at a drafted token, p's mass there
    np.savez_compressed(args.out, acc=acc, bd=bd, bd_full=bd_full, probe=probe,
                        drafted=drafted, offsets=offsets, prompt_ids=np.concatenate(prompts),
                        prompt_offsets=np.concatenate([[0], np.cumsum([len(p) for p in prompts])]),
                        arms=np.array(arms), domains=np.array([r["domain"] for r in rows]))
    print(f"wrote {args.out}: {len(rows)} prompts x {len(arms)} arms")


def load_trace(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# ---- replay -------------------------------------------------------------------

@dataclasses.dataclass
class StepTimes:
    """A batch-1 step's modelled seconds, for the throughput objective's replay:
    the target's step with nothing drafted (``plain_s``) and the extra for
    verifying k drafted tokens (``verify_s``), a draft LM's k forwards
    (``lm_s``; a catch-up on tokens it missed is one more forward, ``lm_s / k``)
    and the free arm's lookup (``free_s``)."""

    plain_s: float
    verify_s: float
    lm_s: float
    free_s: float = 0.0

    @classmethod
    def from_results(cls, path: Path, general: str = "general") -> "StepTimes":
        """From a benchmark's batch-1 figures (``batch1.json``, or the default
        pool of ``selection.json``): plain decoding's seconds per token;
        n-gram's step minus that is verification (its lookup is microseconds);
        the general drafter's step minus both is its k forwards."""
        by = {e["method"]: (e.get("tokens_per_s", e.get("tokens_per_s_bs1")),
                            e["mean_accepted_len"])
              for e in json.loads(Path(path).read_text())["methods"]
              if e.get("pool", "default") == "default"}
        step = lambda m: (1 + by[m][1]) / by[m][0]  # noqa: E731
        plain = 1 / by["none"][0]
        verify = max(step("ngram") - plain, 0.0)
        return cls(plain, verify, max(step(f"draft:{general}") - plain - verify, 0.0))


def pool(trace: dict, arms: list[str]) -> dict:
    """The trace restricted to ``arms`` (a drafter pool), in that order."""
    idx = [list(trace["arms"]).index(a) for a in arms]
    return {k: (v[idx] if k in ("acc", "bd", "bd_full", "probe", "drafted", "arms") else v)
            for k, v in trace.items()}


def replay(trace: dict, policy: dict, reward: str = "bd", seed: int = 0,
           warm_start: bool = False, keep_choices: bool = False, probe: bool = False,
           objective: str = "alignment", times: StepTimes | None = None) -> dict:
    """Run ``policy`` (a metasd.json policy object) over the trace's prompts in
    order, through the engine's own step controller: one bandit per prompt, as
    MetaSD keeps one per request (and, with ``warm_start``, a prior learned
    over the prompts finished before); an empty draft earns 0 as in the engine.
    ``reward``: "bd" (match-based: share of drafted positions that agree),
    "bd_full" (from the full distributions) or "acceptance"; ``probe``: the
    prompt-informed start (each probed arm's estimate from the trace, for the
    arms the controller's ``to_probe`` names: all, or with ``warm_start`` those
    no similar finished prompt tried; via the controller's own ``probed``).

    ``objective`` "throughput" (needs ``times``): the controller chooses by
    expected tokens per second from the step times it is fed, as the engine
    measures them at batch 1 (a step may draft nothing); the lookup arm's
    proposal is known before the choice and it learns from every step (full
    information: its would-be draft scored on the verified tokens), as the
    engine's ``FreeDrafts``. ``seconds``: each
    prompt's modelled time (with ``times``)."""
    from vllm_metasd.core import RequestStateStore, StepController, make_policy

    acc, drafted, offsets = trace["acc"], trace["drafted"], trace["offsets"]
    if "prompt_ids" in trace:  # the warm start's neighbours by prompt (older traces: none)
        ids, starts = trace["prompt_ids"], trace["prompt_offsets"]
        prompt = lambda i: ids[starts[i]:starts[i + 1]]  # noqa: E731
    else:
        prompt = lambda i: None  # noqa: E731
    bd = trace["bd_full"] if reward == "bd_full" else trace["bd"]
    n_arms = acc.shape[0]
    free = np.array([str(a) == "lookup" for a in trace["arms"]])
    params = {k: v for k, v in policy.items() if k != "name"}
    ctl = StepController(RequestStateStore(
        make_policy(policy["name"], n_arms, seed=seed, **params), warm_start=warm_start,
        prompt_probe=probe),
        k=K, objective=objective, free_arms=free, beta=float(params.get("beta", 0.1)))
    one, row = np.array([True]), np.array([0])
    steps, accepted, seconds, choices = [], [], [], []
    for i in range(len(offsets) - 1):
        base, L, rid = offsets[i], offsets[i + 1] - offsets[i], str(i)
        t, n, a_sum, secs, picks = 1, 0, 0, 0.0, []
        ctl.begin([rid], one, lambda _row: prompt(i))
        wanted = ctl.to_probe(row)[0]  # the prompt-informed start's arms (probe: any)
        for arm in np.flatnonzero(wanted).tolist():
            ctl.probed(arm, row, np.array([PROMPT_TOKENS]), trace["probe"][arm, i:i + 1])
        if times is not None:  # each draft LM's pass over the prompt (one forward)
            secs += int((~free & wanted).sum()) * times.lm_s / K
        while t < L:
            seq = PROMPT_TOKENS + t  # tokens known (a catch-up's length does not matter)
            # what the free arms propose (the engine's FreeDrafts, before the choice)
            proposed = np.where(free, drafted[:, base + t], 0)[None]
            arm = int(ctl.choose([rid], one, np.array([seq]), proposed)[0])
            a = d = 0
            if arm >= 0:
                behind = seq - ctl.caught_up(arm, row)[0] > K + 1
                a, d = int(acc[arm, base + t]), int(drafted[arm, base + t])
                ctl.drafted(arm, row, np.array([d]))
                ctl.mark_caught_up(arm, row, np.array([seq]))
                if times is not None:
                    arm_s = times.free_s if free[arm] else times.lm_s
                    if not behind:  # the engine prices a catch-up per row, not here
                        ctl.observe_group_time(arm, 1, arm_s)
                    secs += arm_s + (times.lm_s / K if behind and not free[arm] else 0.0)
            if times is not None:
                step_s = times.plain_s + (times.verify_s if d else 0.0)
                ctl.observe_step_time(1 + (K if d else 0), step_s)
                secs += step_s
            if d:
                r = a / d if reward == "acceptance" else float(bd[arm, base + t])
                ctl.observe([rid], [d], [a], [r])
            if objective == "throughput":
                for f in np.flatnonzero(free).tolist():  # would-be drafts, scored in full
                    fd = int(drafted[f, base + t])  # (the engine waits for their tokens)
                    m = int(acc[f, base + t])
                    ctl.full_information(f, [rid], [m / fd if fd else 0.0], [m], [fd])
            picks.append(arm)
            t, n, a_sum = t + a + 1, n + 1, a_sum + a
        ctl.finished(rid)
        steps.append(n)
        accepted.append(a_sum)
        seconds.append(secs)
        choices.append(picks)
    out = {"steps": np.array(steps), "accepted": np.array(accepted),
           "seconds": np.array(seconds)}
    if keep_choices:
        out["choices"] = choices
    return out


def fixed_arm_steps(trace: dict) -> np.ndarray:
    """[arms, prompts] steps when one drafter drafts every step."""
    n_arms = trace["acc"].shape[0]
    return np.stack([replay(trace, {"name": "fixed", "arm": a})["steps"]
                     for a in range(n_arms)])


def summarize(trace: dict, result: dict, fixed: np.ndarray) -> dict:
    oracle = fixed.min(axis=0)
    tokens = np.diff(trace["offsets"]) - 1  # tokens emitted by spec-decode steps
    mal = lambda steps: float((tokens - steps).sum() / steps.sum())  # noqa: E731
    best_single = int(np.argmin(fixed.sum(axis=1)))
    return {
        "mean_accepted_len": mal(result["steps"]),
        "oracle_mean_accepted_len": mal(oracle),
        "best_single": str(trace["arms"][best_single]),
        "best_single_mean_accepted_len": mal(fixed[best_single]),
        "regret_steps": int((result["steps"] - oracle).sum()),
        "regret_share": float((result["steps"] - oracle).sum() / oracle.sum()),
    }


GRID = {
    "ucb": [{"beta": b} for b in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)],
    "exp3": [{"gamma": g} for g in (0.05, 0.1, 0.2, 0.5)]
    + [{"gamma": g, "eta": e} for g, e in itertools.product((0.05, 0.1, 0.2), (0.1, 0.3, 1.0))],
    "discounted_ucb": [{"beta": b, "gamma": g} for b, g in
                       itertools.product((0.1, 0.3, 1.0), (0.9, 0.95, 0.99))],
    "sliding_window_ucb": [{"beta": b, "window": w} for b, w in
                           itertools.product((0.1, 0.3, 1.0), (8, 16, 32, 64))],
    "epsilon_greedy": [{"epsilon": e} for e in (0.02, 0.05, 0.1, 0.2)],
}
RANDOMISED = {"exp3", "epsilon_greedy"}
REWARDS = ("bd", "bd_full", "acceptance")


def tune(args) -> None:
    trace = load_trace(args.trace)
    fixed = fixed_arm_steps(trace)
    rows = []
    for name, grid in GRID.items():
        for params, reward, warm, probe in itertools.product(grid, REWARDS, (False, True),
                                                             (False, True)):
            seeds = range(args.seeds) if name in RANDOMISED else range(1)
            runs = [summarize(trace, replay(trace, {"name": name, **params}, reward, s, warm,
                                            probe=probe), fixed) for s in seeds]
            row = {"policy": {"name": name, **params}, "reward": reward, "warm_start": warm,
                   "probe": probe,
                   **{k: (float(np.mean([r[k] for r in runs])) if k != "best_single"
                          else runs[0][k]) for k in runs[0]}}
            rows.append(row)
    best = {}
    for name, reward, warm, probe in itertools.product(GRID, REWARDS, (False, True),
                                                       (False, True)):
        cands = [r for r in rows if r["policy"]["name"] == name and r["reward"] == reward
                 and r["warm_start"] == warm and r["probe"] == probe]
        best[f"{name}/{reward}" + ("/warm" if warm else "") + ("/probe" if probe else "")] = min(
            cands, key=lambda r: r["regret_steps"])
    result = {"trace": str(args.trace), "prompts": int(len(trace["offsets"]) - 1),
              "arms": [str(a) for a in trace["arms"]], "best": best, "all": rows,
              "by_speed": by_speed(trace, StepTimes.from_results(args.times))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'policy/reward':38s} {'params':34s} {'MAL':>6s} {'/oracle':>8s} {'/best':>6s}")
    for key, r in best.items():
        params = {k: v for k, v in r["policy"].items() if k != "name"}
        print(f"{key:38s} {json.dumps(params):34s} {r['mean_accepted_len']:6.3f} "
              f"{r['mean_accepted_len'] / r['oracle_mean_accepted_len']:8.3f} "
              f"{r['mean_accepted_len'] / r['best_single_mean_accepted_len']:6.3f}")
    print(f"\nmodelled batch-1 tokens/s ({result['by_speed']['times']}):")
    for pool_name, rows in result["by_speed"]["pools"].items():
        for r in rows:
            print(f"{pool_name:8s} {r['method']:44s} {r['vs_best_single']:6.3f}x best single "
                  f"{r['vs_oracle']:6.3f}x oracle  accepted {r['mean_accepted_len']:.3f} "
                  f"({r['accepted_vs_oracle']:.3f})")
    if args.plot:
        plot_regret(trace, best, fixed, args.plot)


def by_speed(trace: dict, times: StepTimes, betas=(0.05, 0.1, 0.3)) -> dict:
    """Per drafter pool: modelled batch-1 tokens/s of each objective (UCB,
    the match-based reward; with and without warm start and prompt probe, the
    best beta of each) against the pool's best single method and the per-prompt
    oracle (the single method with the least modelled time per prompt); mean
    accepted length against the accepted-length oracle (fewest steps)."""
    tokens = np.diff(trace["offsets"]) - 1
    mal = lambda steps: float((tokens - steps).sum() / steps.sum())  # noqa: E731
    out = {"times": {k: round(v * 1e3, 3) for k, v in dataclasses.asdict(times).items()},
           "pools": {}}
    for name, general in POOLS.items():
        if general not in list(trace["arms"]):
            continue
        tr = pool(trace, [*SPECIALISTS, general, "lookup"])
        singles = [replay(tr, {"name": "fixed", "arm": a}, times=times)
                   for a in range(len(tr["arms"]))]
        best = max(tokens.sum() / r["seconds"].sum() for r in singles)
        oracle_s = np.stack([r["seconds"] for r in singles]).min(0).sum()
        oracle_steps = np.stack([r["steps"] for r in singles]).min(0)
        rows = []
        for objective, warm, probe in itertools.product(("alignment", "throughput"),
                                                        (True, False), (False, True)):
            runs = [(beta, replay(tr, {"name": "ucb", "beta": beta}, "bd", warm_start=warm,
                                  probe=probe, objective=objective, times=times))
                    for beta in betas]
            beta, r = max(runs, key=lambda x: tokens.sum() / x[1]["seconds"].sum())
            tps = tokens.sum() / r["seconds"].sum()
            rows.append({"method": f"{objective} ucb/bd" + ("/warm" if warm else "")
                         + ("/probe" if probe else "") + f" beta {beta}",
                         "vs_best_single": tps / best,
                         "vs_oracle": tps * oracle_s / tokens.sum(),
                         "mean_accepted_len": mal(r["steps"]),
                         "accepted_vs_oracle": mal(r["steps"]) / mal(oracle_steps)})
        out["pools"][name] = rows
    return out


def plot_regret(trace: dict, best: dict, fixed: np.ndarray, path: Path) -> None:
    """Cumulative regret (extra steps vs the per-prompt oracle) over the prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    oracle = fixed.min(axis=0)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, r in best.items():
        if r["reward"] != "bd":
            continue
        steps = replay(trace, r["policy"], "bd", warm_start=r["warm_start"],
                       probe=r["probe"])["steps"]
        ax.plot(np.cumsum(steps - oracle), label=f"{key} {json.dumps(r['policy'])}")
    b = int(np.argmin(fixed.sum(axis=1)))
    ax.plot(np.cumsum(fixed[b] - oracle), "k--", label=f"best single ({trace['arms'][b]})")
    ax.set_xlabel("prompt (mixed workload order)")
    ax.set_ylabel("cumulative extra steps vs oracle")
    ax.set_title("Regret vs the per-prompt oracle (offline replay)")
    ax.legend(fontsize=6)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="record a trace through vLLM + HF (needs the zoo)")
    rec.add_argument("--out", type=Path, default=HERE / "results" / "trace.npz")
    rec.add_argument("--target", choices=("zoo", "smollm2"), default="zoo",
                     help="smollm2: SmolLM2-135M-Instruct, its drafters and chat prompts")
    rec.add_argument("--prompts-per-domain", type=int, default=16)
    rec.add_argument("--max-tokens", type=int, default=128)
    tun = sub.add_parser("tune", help="replay every policy/parameter over a trace")
    tun.add_argument("--trace", type=Path, default=HERE / "results" / "trace.npz")
    tun.add_argument("--out", type=Path, default=HERE / "results" / "replay.json")
    tun.add_argument("--plot", type=Path, default=HERE / "results" / "regret.png")
    tun.add_argument("--seeds", type=int, default=3)
    tun.add_argument("--times", type=Path, default=HERE / "results" / "batch1.json",
                     help="batch-1 figures the modelled step times come from (StepTimes): "
                          "batch1.json or selection.json")
    args = ap.parse_args(argv)
    record(args) if args.cmd == "record" else tune(args)


if __name__ == "__main__":
    main()
