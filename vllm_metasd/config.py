"""metasd.json: the drafters, k, the bandit policy and the reward (pydantic v2).

    {
      "num_speculative_tokens": 4,
      "drafters": [
        {"name": "code", "kind": "draft_model", "path": "zoo/drafter-code"},
        {"name": "lookup", "kind": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 4}
      ],
      "policy": {"name": "ucb", "beta": 1.0},
      "reward": "bd",
      "seed": 0,
      "warm_start": false,
      "log_stats_interval_s": 10.0
    }

Unknown keys are errors. Relative drafter paths resolve against the config
file's directory (against the working directory for inline JSON / dicts).
Every problem raises ``MetaSDConfigError`` naming the field and the fix.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from vllm_metasd.core.policies import POLICIES, Policy, make_policy


class MetaSDConfigError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DraftModelDrafter(_Strict):
    name: str = Field(min_length=1)
    kind: Literal["draft_model"]
    path: str = Field(min_length=1)


class NgramDrafter(_Strict):
    name: str = Field(min_length=1)
    kind: Literal["ngram"]
    prompt_lookup_min: int = Field(default=2, ge=1)
    prompt_lookup_max: int = Field(default=4, ge=1)

    @pydantic.model_validator(mode="after")
    def _min_le_max(self) -> "NgramDrafter":
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )
        return self


Drafter = Annotated[Union[DraftModelDrafter, NgramDrafter], Field(discriminator="kind")]

# Allowed parameters per policy, with their valid ranges (checked below).
POLICY_PARAMS: dict[str, dict[str, tuple[float, float, bool]]] = {
    # name: (low, high, low_inclusive)
    "ucb": {"beta": (0.0, float("inf"), False)},
    "exp3": {"gamma": (0.0, 1.0, False), "eta": (0.0, float("inf"), False),
             "alpha": (0.0, 1.0, True)},
    "discounted_ucb": {"beta": (0.0, float("inf"), False), "gamma": (0.0, 1.0, False)},
    "sliding_window_ucb": {"beta": (0.0, float("inf"), False), "window": (1, float("inf"), True)},
    "epsilon_greedy": {"epsilon": (0.0, 1.0, True)},
    "fixed": {"arm": (0, float("inf"), True)},
}
assert set(POLICY_PARAMS) == set(POLICIES)


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = "ucb"

    @pydantic.model_validator(mode="after")
    def _check_params(self) -> "PolicyConfig":
        if self.name not in POLICY_PARAMS:
            raise ValueError(
                f"unknown policy {self.name!r}; use one of: {', '.join(POLICY_PARAMS)}"
            )
        allowed = POLICY_PARAMS[self.name]
        for key, value in self.params.items():
            if key not in allowed:
                raise ValueError(
                    f"policy {self.name!r} has no parameter {key!r}; "
                    f"its parameters are: {', '.join(allowed) or 'none'}"
                )
            low, high, low_incl = allowed[key]
            is_int = key in ("window", "arm")
            ok_type = isinstance(value, int) if is_int else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok_type:
                kind = "an integer" if is_int else "a number"
                raise ValueError(f"policy.{key} must be {kind}, got {value!r}")
            if not ((value >= low if low_incl else value > low) and value <= high):
                lo = "[" if low_incl else "("
                raise ValueError(f"policy.{key} must be in {lo}{low}, {high}], got {value}")
        return self

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class MetaSDConfig(_Strict):
    num_speculative_tokens: int = Field(ge=1, le=32)
    drafters: list[Drafter] = Field(min_length=1)
    policy: PolicyConfig = PolicyConfig()
    reward: Literal["bd", "acceptance"] = "bd"
    seed: int = 0
    warm_start: bool = False
    log_stats_interval_s: float = Field(default=10.0, ge=0)

    @pydantic.model_validator(mode="after")
    def _check(self) -> "MetaSDConfig":
        names = [d.name for d in self.drafters]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"duplicate drafter names {dups}: every drafter needs a unique name")
        if not any(d.kind == "draft_model" for d in self.drafters):
            raise ValueError(
                "at least one drafter must be a draft LM (kind 'draft_model'); "
                "for n-gram only, use vLLM's own method 'ngram'"
            )
        arm = self.policy.params.get("arm")
        if self.policy.name == "fixed" and arm is not None and arm >= len(self.drafters):
            raise ValueError(
                f"policy.arm = {arm} but there are only {len(self.drafters)} drafters "
                f"(valid: 0..{len(self.drafters) - 1})"
            )
        return self

    @property
    def draft_models(self) -> list[DraftModelDrafter]:
        return [d for d in self.drafters if isinstance(d, DraftModelDrafter)]

    def make_policy(self) -> Policy:
        return make_policy(self.policy.name, len(self.drafters), self.seed, **self.policy.params)

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def vllm_speculative_kwargs(self) -> dict[str, Any]:
        """vLLM's own draft-model method on the first draft LM: vLLM then sets up
        draft-model KV, vocabulary checks and probabilistic draft sampling (q)."""
        return {
            "method": "draft_model",
            "model": self.draft_models[0].path,
            "num_speculative_tokens": self.num_speculative_tokens,
            "draft_sample_method": "probabilistic",
        }


def _format_error(err: pydantic.ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            if isinstance(part, int):
                loc += f"[{part}]"
            elif part in ("draft_model", "ngram"):  # discriminated-union tag
                continue
            else:
                loc += f".{part}" if loc else str(part)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it (check the spelling against the documented schema)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "union_tag_invalid":
            msg = "unknown drafter kind; use 'draft_model' (with a path) or 'ngram'"
        elif e["type"] == "union_tag_not_found":
            msg = "missing 'kind'; use 'draft_model' (with a path) or 'ngram'"
        lines.append(f"{loc or 'metasd config'}: {msg}")
    return "; ".join(lines)


def _resolve_paths(cfg: MetaSDConfig, base: Path) -> MetaSDConfig:
    drafters = []
    for i, d in enumerate(cfg.drafters):
        if isinstance(d, DraftModelDrafter):
            path = Path(os.path.expanduser(d.path))
            path = path if path.is_absolute() else (base / path)
            if not path.exists():
                raise MetaSDConfigError(
                    f"drafters[{i}].path: {str(path)!r} does not exist; point it at a "
                    "Hugging Face model directory (config.json + weights)"
                )
            d = d.model_copy(update={"path": str(path.resolve())})
        drafters.append(d)
    return cfg.model_copy(update={"drafters": drafters})


def load_config(source: str | os.PathLike | dict) -> MetaSDConfig:
    """Parse and validate a metasd config: a file path, inline JSON or a dict."""
    if isinstance(source, MetaSDConfig):
        return source
    base = Path.cwd()
    if isinstance(source, dict):
        data = source
    else:
        text = str(source)
        if text.lstrip().startswith("{"):
            origin = "inline metasd config"
        else:
            path = Path(os.path.expanduser(text))
            try:
                text = path.read_text()
            except FileNotFoundError:
                raise MetaSDConfigError(
                    f"config: file {str(path)!r} not found; pass the path of a metasd.json"
                ) from None
            except OSError as e:
                raise MetaSDConfigError(f"config: cannot read {str(path)!r}: {e}") from None
            origin, base = str(path), path.resolve().parent
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MetaSDConfigError(
                f"config: {origin} is not valid JSON: {e.msg} at line {e.lineno}, "
                f"column {e.colno}"
            ) from None
    if not isinstance(data, dict):
        raise MetaSDConfigError("config: a metasd config must be a JSON object")
    try:
        cfg = MetaSDConfig.model_validate(data)
    except pydantic.ValidationError as e:
        raise MetaSDConfigError(_format_error(e)) from None
    return _resolve_paths(cfg, base)


def from_speculative_config(spec: dict[str, Any]) -> MetaSDConfig:
    """The MetaSD config named by ``{"method": "metasd", "config": ...}``."""
    unknown = sorted(set(spec) - {"method", "config"})
    if unknown:
        raise MetaSDConfigError(
            f"speculative_config: unknown keys {unknown} for method 'metasd'; "
            "it takes only 'config' (a metasd.json path, inline JSON or a dict)"
        )
    if "config" not in spec:
        raise MetaSDConfigError(
            "speculative_config.config: missing; give the metasd.json path, e.g. "
            '{"method": "metasd", "config": "metasd.json"}'
        )
    return load_config(spec["config"])
