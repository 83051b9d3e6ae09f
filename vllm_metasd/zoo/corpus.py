"""Five clearly different text domains, all offline and licence-clean.

- code:   Python standard-library source on this machine (PSF licence)
- prose:  English package descriptions (dpkg status) and licence texts
          (/usr/share/common-licenses), package long descriptions (METADATA)
- math:   generated arithmetic word problems with worked steps
- data:   generated JSON records, log lines and SQL
- german: German sentences generated with Faker's de_DE locale and templates

Every domain yields documents; ``split`` keeps a seeded held-out share for
evaluation prompts.
"""
from __future__ import annotations

import email
import json
import random
import sysconfig
from pathlib import Path

DOMAINS = ("code", "prose", "math", "data", "german")


def code_docs(rng: random.Random) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(errors="ignore")
        # Functions/classes as documents: short, self-contained units.
        docs.extend(chunk for chunk in text.split("\n\n\n") if 200 < len(chunk) < 4000)
    return docs


def _is_prose(text: str) -> bool:
    """Mostly words and punctuation: drops code, tables and markup."""
    plain = sum(c.isalpha() or c.isspace() or c in ".,;:'\"()-!?" for c in text)
    return plain / len(text) > 0.95


def prose_docs(rng: random.Random) -> list[str]:
    docs = []
    status = Path("/var/lib/dpkg/status")
    if status.exists():
        for para in status.read_text(errors="ignore").split("\n\n"):
            lines = para.splitlines()
            for i, line in enumerate(lines):
                if line.startswith("Description:"):
                    body = [line.removeprefix("Description:").strip()]
                    body += [x.strip() for x in lines[i + 1:] if x.startswith(" ") and x.strip() != "."]
                    text = " ".join(body)
                    if len(text) > 120:
                        docs.append(text)
    for lic in sorted(Path("/usr/share/common-licenses").glob("*")):
        if lic.is_file():
            text = lic.read_text(errors="ignore")
            docs.extend(p.strip() for p in text.split("\n\n") if len(p.strip()) > 200)
    purelib = Path(sysconfig.get_paths()["purelib"])
    for meta in sorted(purelib.glob("*.dist-info/METADATA"))[:400]:
        msg = email.message_from_string(meta.read_text(errors="ignore"))
        body = msg.get_payload()
        if isinstance(body, str):
            docs.extend(p.strip() for p in body.split("\n\n")
                        if len(p.strip()) > 200 and not p.lstrip().startswith(("```", "    ", "|", "<")))
    return [d for d in docs if _is_prose(d)]


def math_docs(rng: random.Random, n: int = 6000) -> list[str]:
    names = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo"]
    items = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cards"]
    docs = []
    for _ in range(n):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 12)
        who, other, item = rng.choice(names), rng.choice(names), rng.choice(items)
        kind = rng.randrange(4)
        if kind == 0:
            docs.append(f"Question: {who} has {a} {item} and buys {b} more. How many {item} "
                        f"does {who} have now?\nAnswer: {who} starts with {a} {item}. "
                        f"{a} + {b} = {a + b}. {who} has {a + b} {item}.")
        elif kind == 1:
            x, y = max(a, b), min(a, b)
            docs.append(f"Question: {who} had {x} {item} and gave {y} to {other}. How many "
                        f"{item} are left?\nAnswer: {x} - {y} = {x - y}. "
                        f"{who} has {x - y} {item} left.")
        elif kind == 2:
            docs.append(f"Question: There are {c} boxes with {a} {item} each. How many "
                        f"{item} are there in total?\nAnswer: {c} * {a} = {c * a}. "
                        f"There are {c * a} {item}.")
        else:
            total = a * c
            docs.append(f"Question: {who} shares {total} {item} equally among {c} friends. "
                        f"How many does each friend get?\nAnswer: {total} / {c} = {a}. "
                        f"Each friend gets {a} {item}.")
    return docs


def data_docs(rng: random.Random, n: int = 6000) -> list[str]:
    users = ["alice", "bob", "carol", "dave", "erin", "frank"]
    levels = ["INFO", "WARN", "ERROR", "DEBUG"]
    services = ["api", "auth", "billing", "search", "worker"]
    tables = ["users", "orders", "products", "events"]
    docs = []
    for i in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            rec = {"id": rng.randint(1, 9999), "user": rng.choice(users),
                   "active": rng.random() < 0.7, "score": round(rng.random() * 100, 2),
                   "tags": rng.sample(["new", "vip", "beta", "trial", "admin"], 2)}
            docs.append(json.dumps(rec))
        elif kind == 1:
            lines = []
            for _ in range(rng.randint(2, 5)):
                lines.append(f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
                             f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                             f"{rng.randint(0, 59):02d} {rng.choice(levels)} "
                             f"[{rng.choice(services)}] request_id={rng.randint(1000, 9999)} "
                             f"user={rng.choice(users)} status={rng.choice([200, 201, 404, 500])}")
            docs.append("\n".join(lines))
        else:
            t = rng.choice(tables)
            docs.append(f"SELECT id, name, created_at FROM {t} WHERE id = {rng.randint(1, 999)} "
                        f"AND status = '{rng.choice(['open', 'closed', 'pending'])}' "
                        f"ORDER BY created_at DESC LIMIT {rng.choice([10, 20, 50])};")
    return docs


def german_docs(rng: random.Random, n: int = 5000) -> list[str]:
    from faker import Faker

    fake = Faker("de_DE")
    fake.seed_instance(rng.randint(0, 2**31))
    templates = [
        "{name} wohnt in {city} und arbeitet als {job}.",
        "Am Montag fährt {name} mit dem Zug nach {city}.",
        "Die Firma {company} sucht einen neuen Mitarbeiter in {city}.",
        "{name} hat heute einen Brief an {other} geschrieben.",
    ]
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(2, 4)):
            if rng.random() < 0.6:
                parts.append(rng.choice(templates).format(
                    name=fake.name(), other=fake.name(), city=fake.city(), job=fake.job(),
                    company=fake.company()))
            else:
                parts.append(fake.sentence(nb_words=rng.randint(6, 12)))
        docs.append(" ".join(parts))
    return docs


BUILDERS = {"code": code_docs, "prose": prose_docs, "math": math_docs,
            "data": data_docs, "german": german_docs}


def build(seed: int = 0, heldout_frac: float = 0.05) -> dict[str, dict[str, list[str]]]:
    """{domain: {"train": docs, "heldout": docs}}, shuffled with ``seed``."""
    out = {}
    for i, domain in enumerate(DOMAINS):
        rng = random.Random(seed * 100 + i)
        docs = BUILDERS[domain](rng)
        rng.shuffle(docs)
        n_held = max(64, int(len(docs) * heldout_frac))
        out[domain] = {"train": docs[n_held:], "heldout": docs[:n_held]}
    return out
