"""Benchmark workloads of chat requests, for any target with a chat template.

A workload is a JSONL file of ``{"category": ..., "turns": ["...", ...]}`` (the
format of public speculative-decoding benchmarks such as MT-Bench / Spec-Bench)
or, by default, SmolLM2's held-out prompts per domain. Each request's first
turn is rendered with the target's chat template (later turns would need the
model's own answer to the first, so they are not used); a target without a
chat template gets the turn's text as is.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def select(target: str):
    """The model set named ``target``: ``zoo`` (the bundled 21M target) or
    ``smollm2`` (SmolLM2-135M-Instruct and its distilled drafters)."""
    from vllm_metasd import smollm2, zoo

    if target not in ("zoo", "smollm2"):
        raise ValueError(f"unknown target {target!r}; valid: zoo, smollm2")
    return smollm2 if target == "smollm2" else zoo


def chat_rows(models, path: Path | None, per_domain: int | None) -> list[dict]:
    """Requests from ``path`` (file order, at most ``per_domain`` per category),
    or the model set's held-out prompts interleaved domain by domain."""
    from vllm_metasd.smollm2 import read_jsonl

    if path is None:
        per_domain = per_domain or len(models.load_prompts(models.DOMAINS[0]))
        return [models.load_prompts(d)[i] for i in range(per_domain) for d in models.DOMAINS]
    rows, seen = [], defaultdict(int)
    for r in read_jsonl(path):
        cat = str(r.get("category", "all"))
        if per_domain is None or seen[cat] < per_domain:
            seen[cat] += 1
            rows.append({**r, "category": cat})
    return rows


def render(target_path: str, rows: list[dict]) -> list[str]:
    """First turn of each request, in the target's chat template."""
    from transformers import AutoTokenizer

    from vllm_metasd.smollm2 import chat_prompt

    tok = AutoTokenizer.from_pretrained(target_path)
    if not tok.chat_template:
        return [r["turns"][0] for r in rows]
    return [chat_prompt(tok, r["turns"][0]) for r in rows]


def chat_workload(models, path: Path | None = None,
                  per_domain: int | None = None) -> tuple[list[str], list[str]]:
    """(prompt strings, category of each) for benchmarks/run.py."""
    rows = chat_rows(models, path, per_domain)
    return render(models.target_path(), rows), [r["category"] for r in rows]
