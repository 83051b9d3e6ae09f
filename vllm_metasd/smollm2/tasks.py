"""Chat-style instruction prompts per domain, phrased from the zoo's offline corpora.

Each document of ``vllm_metasd.zoo.corpus`` (Python standard library code,
English prose, math word problems, structured data, German sentences) becomes
one user request through a seeded choice of task templates. The same function
makes the distillation prompts (from the corpus' train split) and the
held-out benchmark prompts (from its held-out split).
"""
from __future__ import annotations

import json
import random
import re

MAX_DOC_CHARS = 700


def _cut(text: str, limit: int = MAX_DOC_CHARS) -> str:
    """At most ``limit`` characters, cut at a line (or word) boundary."""
    text = text.strip()
    if len(text) <= limit:
        return text
    head = text[:limit]
    cut = head.rfind("\n")
    if cut < limit // 2:
        cut = head.rfind(" ")
    return head[:cut].rstrip()


def _code(doc: str, rng: random.Random) -> str:
    code = _cut(doc)
    fence = f"```python\n{code}\n```"
    sig = re.match(r"\s*def (\w+)\((.*?)\)\s*(->[^:]*)?:", doc, re.S)
    doc_line = re.search(r'"""\s*(.+?)\s*(?:\n|""")', doc)
    options = [
        f"Explain what the following Python code does.\n\n{fence}",
        f"Rewrite this Python code to make it easier to read.\n\n{fence}",
        f"Add comments to this Python code.\n\n{fence}",
        f"Write unit tests with pytest for this Python code.\n\n{fence}",
    ]
    lines = code.splitlines()
    if len(lines) >= 6:
        half = "\n".join(lines[: len(lines) // 2])
        options.append(f"Complete this Python code.\n\n```python\n{half}\n```")
    if sig and doc_line:
        options.append(f"Write a Python function `{sig.group(1)}({' '.join(sig.group(2).split())})`"
                       f": {doc_line.group(1)}")
    return rng.choice(options)


def _prose(doc: str, rng: random.Random) -> str:
    text = " ".join(_cut(doc).split())
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return rng.choice([
        f"Summarize the following text in two or three sentences.\n\n{text}",
        f"Rewrite the following paragraph in plain, simple English.\n\n{text}",
        f"Write a short paragraph that continues this text.\n\n{text}",
        f"Write a short essay about the following statement: {first}",
        f"Explain the following text to a beginner.\n\n{text}",
    ])


def _math(doc: str, rng: random.Random) -> str:
    question = doc.split("\nAnswer:")[0].removeprefix("Question: ").strip()
    return rng.choice([
        question,
        f"Solve this problem step by step: {question}",
        f"{question} Show your work.",
        f"Math word problem: {question}\nExplain how you get the answer.",
    ])


def _data(doc: str, rng: random.Random) -> str:
    doc = doc.strip()
    if doc.startswith("{"):
        options = [
            f"Write three more JSON records in the same format as this one:\n{doc}",
            f"Convert this JSON record to YAML:\n{doc}",
            f"Describe each field of this JSON record:\n{doc}",
            f"Write a JSON schema for records like this one:\n{doc}",
        ]
    elif doc.startswith("SELECT"):
        options = [
            f"Explain what this SQL query does:\n{doc}",
            f"Rewrite this SQL query so that it also returns the status column:\n{doc}",
            f"Write the CREATE TABLE statement for the table used in this query:\n{doc}",
            f"Write three similar SQL queries for other tables:\n{doc}",
        ]
    else:
        options = [
            f"Explain these log lines:\n{doc}",
            f"Which of these requests failed? Answer with a table.\n{doc}",
            f"Convert these log lines to JSON objects:\n{doc}",
            f"Write five more log lines in the same format:\n{doc}",
        ]
    return rng.choice(options)


def _german(doc: str, rng: random.Random) -> str:
    text = " ".join(doc.split())
    return rng.choice([
        f"Fasse den folgenden Text auf Deutsch zusammen:\n\n{text}",
        f"Schreibe eine kurze Geschichte auf Deutsch, die so beginnt:\n\n{text}",
        f"Schreibe einen kurzen Brief auf Deutsch über Folgendes:\n\n{text}",
        f"Setze den folgenden Text auf Deutsch fort:\n\n{text}",
        f"Beantworte auf Deutsch: Worum geht es in diesem Text?\n\n{text}",
    ])


PHRASERS = {"code": _code, "prose": _prose, "math": _math, "data": _data, "german": _german}


def make_tasks(domain: str, docs: list[str], n: int, seed: int) -> list[dict]:
    """Up to ``n`` requests ``{"category": domain, "turns": [text]}`` from ``docs``
    (in order), templates chosen with ``seed``."""
    rng = random.Random(f"{domain}-{seed}")
    out, seen = [], set()
    for doc in docs:
        turn = PHRASERS[domain](doc, rng)
        if len(turn) < 20 or turn in seen:
            continue
        seen.add(turn)
        out.append({"category": domain, "turns": [turn]})
        if len(out) == n:
            break
    return out


def write_jsonl(rows: list[dict], path) -> None:
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
