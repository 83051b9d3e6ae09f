"""Build the model zoo: corpus -> tokenizer -> target -> drafters -> prompts.

    python -m vllm_metasd.zoo.build [--out DIR] [--work DIR] [--target-steps N]

Seeded and resumable: each stage is skipped when its output exists, and the
training loops resume from their last checkpoint in ``--work``. The shipped
zoo was built with the defaults below. Only what a missing drafter needs is
generated: e.g. with the target and the specialists shipped, adding
``general-equal`` generates just its share of each domain's distillation data.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np

from vllm_metasd.zoo import CHAT_TEMPLATE, DOMAINS, ZOO_DIR

PROMPTS_PER_DOMAIN = 64
PROMPT_TOKENS = 32
MIN_PROMPT_TOKENS = 12
# Distillation data: the target's continuations of the first --distil-prompts
# training documents of a domain, cut to DISTIL_PROMPT_TOKENS tokens.
DISTIL_PROMPT_TOKENS = 16
DISTIL_NEW_TOKENS = 112


def log_to(path: Path):
    def log(msg: str) -> None:
        print(msg, flush=True)
        with open(path, "a") as f:
            f.write(msg + "\n")
    return log


def heldout_rows(corpus: dict, tokenizer, domain: str) -> list[dict]:
    """Held-out documents cut after PROMPT_TOKENS tokens (at a token boundary)."""
    rows = []
    for doc in corpus[domain]["heldout"]:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        # Short documents (a math problem, a JSON record) are cut halfway,
        # so the continuation is still in-domain text the target knows.
        cut = min(PROMPT_TOKENS, len(ids) // 2)
        if cut < MIN_PROMPT_TOKENS:
            continue
        rows.append({"domain": domain, "prompt": tokenizer.decode(ids[:cut])})
        if len(rows) == PROMPTS_PER_DOMAIN:
            break
    assert len(rows) == PROMPTS_PER_DOMAIN, (domain, len(rows))
    return rows


def write_prompts(corpus: dict, tokenizer, out: Path, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mixed = []
    for domain in DOMAINS:
        rows = heldout_rows(corpus, tokenizer, domain)
        (out / f"{domain}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        mixed.extend(rows)
    random.Random(seed).shuffle(mixed)
    (out / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))


def keep_shipped_prompts_held_out(corpus: dict, tokenizer, out: Path, log) -> None:
    """The code and prose corpora are read from this machine (stdlib, dpkg,
    site-packages), so they can differ from the ones the shipped zoo was built
    from. Where a domain's held-out prompts no longer match the shipped ones,
    drop the training documents that begin with a shipped prompt."""
    for domain in DOMAINS:
        shipped = [json.loads(line)["prompt"]
                   for line in (out / f"{domain}.jsonl").read_text().splitlines() if line]
        if [r["prompt"] for r in heldout_rows(corpus, tokenizer, domain)] == shipped:
            continue
        train = corpus[domain]["train"]
        corpus[domain]["train"] = [d for d in train if not d.startswith(tuple(shipped))]
        log(json.dumps({"stage": "corpus", "domain": domain, "changed_since_shipped": True,
                        "dropped_train_docs": len(train) - len(corpus[domain]["train"])}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ZOO_DIR)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "vllm_metasd_zoo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-steps", type=int, default=1000)
    ap.add_argument("--target-batch", type=int, default=24)
    ap.add_argument("--drafter-steps", type=int, default=300)
    ap.add_argument("--drafter-batch", type=int, default=16)
    ap.add_argument("--distil-prompts", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from vllm_metasd.zoo import corpus as corpus_mod
    from vllm_metasd.zoo import train

    torch.set_num_threads(args.threads)
    models, work = args.out / "models", args.work
    work.mkdir(parents=True, exist_ok=True)
    log = log_to(work / "build.log")

    corpus = corpus_mod.build(args.seed)
    tok_dir = work / "tokenizer"
    target_dir = models / "target"
    if not (tok_dir / "tokenizer.json").exists():
        if (target_dir / "tokenizer.json").exists():
            # A shipped target fixes the vocabulary (the corpus can differ by machine).
            tok_dir.mkdir(parents=True, exist_ok=True)
            for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (target_dir / f).exists():
                    shutil.copy(target_dir / f, tok_dir / f)
        else:
            train.train_tokenizer(corpus, tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    # Prompts first: they only need the tokenizer, and a problem shows at once.
    prompts_dir = args.out / "prompts"
    if all((prompts_dir / f"{n}.jsonl").exists() for n in (*DOMAINS, "mixed")):
        keep_shipped_prompts_held_out(corpus, tokenizer, prompts_dir, log)
    else:
        write_prompts(corpus, tokenizer, prompts_dir, args.seed)

    streams_path = work / "streams.npz"
    if not streams_path.exists():
        np.savez(streams_path, **{d: train.tokenize_domain(tokenizer, corpus[d]["train"])
                                  for d in DOMAINS})
    streams = dict(np.load(streams_path))
    log(json.dumps({"stage": "corpus", "tokens": {d: int(len(s)) for d, s in streams.items()}}))

    if not (target_dir / "model.safetensors").exists():
        train.train_target(streams, tokenizer, tok_dir, target_dir, work / "target",
                           args.target_steps, args.target_batch, args.seed, log)
    if not (target_dir / "chat_template.jinja").exists():
        (target_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    target = LlamaForCausalLM.from_pretrained(str(target_dir), dtype=torch.bfloat16)

    names = [*DOMAINS, "general", "general-equal"]
    todo = [n for n in names if not (models / f"drafter-{n}" / "model.safetensors").exists()]
    # One specialist's distillation budget in tokens: --distil-prompts continuations
    # of full length (<s> + prompt + new tokens + </s>), e.g. drafter-code's.
    budget = args.distil_prompts * (DISTIL_PROMPT_TOKENS + DISTIL_NEW_TOKENS + 2)
    share = budget // len(DOMAINS)

    def distil(i: int, domain: str, min_tokens: int | None = None) -> np.ndarray:
        """The domain's distillation set, or (min_tokens) a prefix of it."""
        full = work / f"distil-{domain}.npy"
        head = work / f"distil-{domain}-head.npy"
        for path in (full, head) if min_tokens else (full,):
            if path.exists() and len(stream := np.load(path)) >= (min_tokens or 0):
                return stream
        stream = train.generate_continuations(
            target, tokenizer, corpus[domain]["train"], args.distil_prompts,
            prompt_tokens=DISTIL_PROMPT_TOKENS, new_tokens=DISTIL_NEW_TOKENS,
            seed=args.seed + i, min_tokens=min_tokens)
        np.save(full if min_tokens is None else head, stream)
        return stream

    for i, name in enumerate(names):
        if name not in todo:
            continue
        if name == "general":
            stream = np.concatenate([distil(j, d) for j, d in enumerate(DOMAINS)])
        elif name == "general-equal":
            # One specialist's budget (tokens and steps), an even mix of the five
            # domains: the first budget/5 tokens of each domain's distillation set.
            stream = np.concatenate([distil(j, d, share)[:share] for j, d in enumerate(DOMAINS)])
            assert len(stream) == share * len(DOMAINS), len(stream)
        else:
            stream = distil(i, name)
        steps = args.drafter_steps * (2 if name == "general" else 1)
        log(json.dumps({"stage": f"drafter-{name}", "distil_tokens": int(len(stream)),
                        "steps": steps, "batch": args.drafter_batch}))
        train.distil_drafter(target, stream, tokenizer, tok_dir, models / f"drafter-{name}",
                             work / f"drafter-{name}", steps, args.drafter_batch,
                             args.seed + 10 + i, log)

    random_dir = models / "drafter-random"
    if not (random_dir / "model.safetensors").exists():
        train._save_hf(train.new_model(train.DRAFTER_SHAPE, tokenizer, args.seed + 99),
                       tok_dir, random_dir)

    log(json.dumps({"stage": "done", "out": str(args.out)}))


if __name__ == "__main__":
    main()
