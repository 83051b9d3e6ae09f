"""The bundled model zoo: a target LM and domain-specialist drafters.

Built by ``python -m vllm_metasd.zoo.build`` and shipped in the package
(``models/`` bf16 safetensors, ``prompts/`` held-out prompts per domain).
Importing this module is cheap: no torch, no vLLM.
"""
from __future__ import annotations

import json
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent
DOMAINS = ("code", "prose", "math", "data", "german")
# general: distilled on all five domains with 5x a specialist's data and 2x its
# steps; general-equal: on an even mix of the five with exactly one specialist's
# budget (tokens and steps); random: random weights, a deliberately bad arm.
DRAFTERS = (*DOMAINS, "general", "general-equal", "random")

# The target's chat template (models/target/chat_template.jinja, written by the
# builder): the zoo LMs are base LMs, so this is plain "role: content" lines
# ending in "assistant:"; it lets /v1/chat/completions and LLM.chat work.
CHAT_TEMPLATE = """\
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{{ message['content'] }}{{ '\\n\\n' }}
{%- else -%}
{{ message['role'] }}: {{ message['content'] }}{{ '\\n' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
assistant:
{%- endif -%}
"""


def available() -> bool:
    return (ZOO_DIR / "models" / "target" / "model.safetensors").exists() and all(
        (ZOO_DIR / "models" / f"drafter-{d}" / "model.safetensors").exists() for d in DRAFTERS
    )


def target_path() -> str:
    return str(ZOO_DIR / "models" / "target")


def drafter_path(name: str) -> str:
    if name not in DRAFTERS:
        raise ValueError(f"unknown zoo drafter {name!r}; valid: {', '.join(DRAFTERS)}")
    return str(ZOO_DIR / "models" / f"drafter-{name}")


def load_prompts(domain: str | None = None, split: str = "mixed") -> list[dict]:
    """Held-out prompts ({"domain", "prompt"}) of one domain, or the mixed set."""
    name = domain if domain is not None else split
    path = ZOO_DIR / "prompts" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def shipped_metasd_config(draft_models: dict[str, str]) -> dict:
    """The shipped MetaSD settings over these draft models (name -> path) and
    prompt lookup: the zoo's and SmolLM2's default setups."""
    drafters = [{"name": d, "kind": "draft_model", "path": path}
                for d, path in draft_models.items()]
    drafters.append({"name": "lookup", "kind": "ngram", "prompt_lookup_min": 2,
                     "prompt_lookup_max": 4})
    return {"num_speculative_tokens": 4, "drafters": drafters,
            "policy": {"name": "ucb", "beta": 0.1}, "reward": "match", "warm_start": True,
            "prompt_probe": True}


def _metasd_config(draft_models: tuple[str, ...]) -> dict:
    return shipped_metasd_config({d: drafter_path(d) for d in draft_models})


def default_metasd_config() -> dict:
    """The default MetaSD setup on the zoo: the five specialists, the general
    drafter and prompt lookup; UCB (beta 0.1) with the match reward, warm-started
    from the finished requests with prompts like each new one's, which is probed
    by the drafters none of those tried (the best settings in the offline replay
    and the selection benchmark, benchmarks/README.md)."""
    return _metasd_config((*DOMAINS, "general"))


def paper_pool_config() -> dict:
    """The paper's pool: the five specialists, the general drafter trained with
    one specialist's budget (general-equal) and prompt lookup; the same policy
    and reward settings as default_metasd_config()."""
    return _metasd_config((*DOMAINS, "general-equal"))
