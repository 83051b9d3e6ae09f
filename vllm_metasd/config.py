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

Unknown keys are errors, types are strict (``"4"`` is not a number). Relative
drafter paths resolve against the config file's directory (against the working
directory for inline JSON / dicts). Policy parameters are those of the policy's
constructor in ``vllm_metasd.core.policies`` and are range-checked by it, so
the two cannot drift apart. Every problem raises one ``MetaSDConfigError``
naming the field (dotted path), the problem and the fix.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from vllm_metasd.core.policies import POLICIES, ParamError, Policy, make_policy, policy_params


class MetaSDConfigError(ValueError):
    pass


# vLLM 0.32's rejection sampler verifies at most this many drafts per request and step
# (``vllm.v1.sample.rejection_sampler.MAX_SPEC_LEN``; it asserts it at the first
# speculative step, which kills the engine). tests/test_config.py checks the constant.
MAX_SPEC_LEN = 128


class _FieldError(ValueError):
    """A validator's error about a sub-field its pydantic location does not name."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# Drafter names become part of vLLM layer names (the drafter's KV prefix).
DrafterName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]


class DraftModelDrafter(_Strict):
    name: DrafterName
    kind: Literal["draft_model"]
    path: str = Field(min_length=1)


class NgramDrafter(_Strict):
    name: DrafterName
    kind: Literal["ngram"]
    prompt_lookup_min: int = Field(default=2, ge=1)
    prompt_lookup_max: int = Field(default=4, ge=1)

    @pydantic.model_validator(mode="after")
    def _min_le_max(self) -> "NgramDrafter":
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise _FieldError("prompt_lookup_min", (
                f"{self.prompt_lookup_min} is greater than prompt_lookup_max "
                f"({self.prompt_lookup_max}); lower it or raise prompt_lookup_max"))
        return self


Drafter = Annotated[Union[DraftModelDrafter, NgramDrafter], Field(discriminator="kind")]


class PolicyConfig(BaseModel):
    """``name`` plus that policy's parameters (checked in MetaSDConfig, which
    knows the number of arms a fixed arm index must fit)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)
    name: str = "ucb"

    @pydantic.field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; use one of: {', '.join(POLICIES)}")
        return name

    @pydantic.model_validator(mode="after")
    def _known_params(self) -> "PolicyConfig":
        allowed = policy_params(self.name)
        for key in self.params:
            if key not in allowed:
                raise _FieldError(key, (
                    f"policy {self.name!r} has no parameter {key!r}; remove it or use "
                    f"one of: {', '.join(allowed) or '(none)'}"))
        return self

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class MetaSDConfig(_Strict):
    num_speculative_tokens: int = Field(ge=1, le=MAX_SPEC_LEN)
    drafters: list[Drafter] = Field(min_length=1)
    policy: PolicyConfig = PolicyConfig()
    reward: Literal["bd", "match", "acceptance"] = "bd"
    objective: Literal["alignment", "throughput"] = "throughput"
    seed: int = Field(default=0, ge=0)
    warm_start: bool = False
    prompt_probe: bool = False
    speculation_gate: bool = True
    log_stats_interval_s: float = Field(default=10.0, ge=0, allow_inf_nan=False)

    @pydantic.field_validator("drafters")
    @classmethod
    def _check_drafters(cls, drafters: list) -> list:
        names = [d.name for d in drafters]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"duplicate drafter names {dups}; give every drafter a unique name")
        if not any(d.kind == "draft_model" for d in drafters):
            # The vLLM glue builds on vLLM's draft-model machinery (KV, q).
            raise ValueError("no drafter of kind 'draft_model'; add at least one draft LM "
                             "(for n-gram lookup only, use vLLM's own method 'ngram')")
        return drafters

    @pydantic.model_validator(mode="after")
    def _check_policy_params(self) -> "MetaSDConfig":
        try:
            self.make_policy()
        except ParamError as e:
            fix = (f"it indexes the drafters list (0..{len(self.drafters) - 1})"
                   if e.param == "arm" else "fix the value in the policy object")
            raise _FieldError(f"policy.{e.param}", f"{e}; {fix}") from None
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


_HINTS = {
    "num_speculative_tokens": (f"set it to the tokens each drafter proposes per step, 1 to "
                               f"{MAX_SPEC_LEN} (vLLM verifies at most {MAX_SPEC_LEN}), e.g. 4"),
    "drafters": 'give a non-empty list such as [{"name": "code", "kind": "draft_model", '
                '"path": "zoo/drafter-code"}]',
    "name": "use letters, digits, '_' or '-' only",
    "path": "give the drafter's model directory (config.json + weights)",
    "reward": "use 'bd' (block divergence), 'match' or 'acceptance'",
    "objective": "use 'throughput' (expected tokens per second of the step) or 'alignment'",
    "seed": "use an integer >= 0",
    "warm_start": "use true or false",
    "prompt_probe": "use true or false",
    "speculation_gate": "use true or false",
    "log_stats_interval_s": "use a finite number of seconds >= 0 (0 disables the periodic log)",
}


def _key(key) -> str:
    """A key as it appears in a field path; odd ones (spaces, newlines, ':',
    empty) quoted so the message stays one clear line."""
    key = str(key)
    return key if key.replace("_", "a").replace("-", "a").isalnum() and key.isascii() else repr(key)


def _format_error(err: pydantic.ValidationError) -> str:
    """One readable line per problem: ``field.path: problem; fix``."""
    lines = []
    for e in err.errors():
        parts: list[str] = []
        for part in e["loc"]:
            if isinstance(part, int):
                parts.append(f"[{part}]")
            elif part not in ("draft_model", "ngram"):  # discriminated-union tag
                parts.append(f".{_key(part)}" if parts else _key(part))
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, _FieldError):
            field = ".".join(_key(k) for k in cause.field.split("."))
            parts.append(f".{field}" if parts else field)
        loc = "".join(parts)
        leaf = loc.rsplit(".", 1)[-1]
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling against the documented schema"
        elif kind == "missing":
            msg = "required field is missing; " + _HINTS.get(leaf, "add it")
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            loc += ".kind"
            what = "unknown drafter kind" if kind == "union_tag_invalid" else "missing 'kind'"
            msg = f"{what}; use 'draft_model' (with a path) or 'ngram'"
        elif kind == "value_error":
            msg = e["msg"].removeprefix("Value error, ")
        else:
            msg = f"{e['msg'][0].lower()}{e['msg'][1:]}"
            if isinstance(e.get("input"), (int, float, str, bool)) or e.get("input") is None:
                msg += f", got {e['input']!r}"
            if leaf in _HINTS:
                msg += f"; {_HINTS[leaf]}"
        lines.append(f"{loc or 'config'}: {msg}")
    return "; ".join(lines)


def _resolve_paths(cfg: MetaSDConfig, base: Path) -> MetaSDConfig:
    drafters = []
    for i, d in enumerate(cfg.drafters):
        if isinstance(d, DraftModelDrafter):
            path = Path(os.path.expanduser(d.path))
            path = path if path.is_absolute() else base / path
            try:
                exists = path.exists()
            except (OSError, ValueError):  # NUL byte, name too long
                exists = False
            if not exists:
                raise MetaSDConfigError(
                    f"drafters[{i}].path: {str(path)!r} does not exist; point it at the "
                    f"drafter's model directory (relative paths resolve against {str(base)!r})")
            d = d.model_copy(update={"path": str(path.resolve())})
        drafters.append(d)
    return cfg.model_copy(update={"drafters": drafters})


_TOO_DEEP = ("config: nested too deeply to read; metasd.json is at most a few levels deep, "
             "see the schema in vllm_metasd/config.py")


def load_config(source: str | os.PathLike | dict | MetaSDConfig) -> MetaSDConfig:
    """Parse and validate a metasd config: a file path, inline JSON (a string
    starting with ``{``) or a dict. Raises MetaSDConfigError."""
    if isinstance(source, MetaSDConfig):
        return source
    base = Path.cwd()
    if isinstance(source, dict):
        data = source
    elif not isinstance(source, (str, os.PathLike)):
        raise MetaSDConfigError(
            f"config: got {type(source).__name__} {source!r:.60}; give a metasd.json path, "
            "inline JSON (a string starting with '{') or a dict")
    else:
        text = os.fspath(source)
        if text.lstrip().startswith("{"):
            origin = "inline metasd config"
        else:
            path = Path(os.path.expanduser(text))
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise MetaSDConfigError(
                    f"config: file {str(path)!r} not found; pass the path of an existing "
                    "metasd.json (or inline JSON starting with '{')") from None
            except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: NUL in path
                raise MetaSDConfigError(
                    f"config: cannot read {str(path)!r} ({e}); check that it is a readable "
                    "UTF-8 text file") from None
            origin, base = repr(str(path)), path.resolve().parent
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MetaSDConfigError(
                f"config: {origin} is not valid JSON: {e.msg} at line {e.lineno}, column "
                f"{e.colno}; fix the syntax there (JSON has no comments or trailing commas)"
            ) from None
        except RecursionError:
            raise MetaSDConfigError(_TOO_DEEP) from None
    if not isinstance(data, dict):
        raise MetaSDConfigError(
            f"config: must be a JSON object, got {type(data).__name__}; see the schema in "
            "vllm_metasd/config.py")
    try:
        cfg = MetaSDConfig.model_validate(data)
    except pydantic.ValidationError as e:
        raise MetaSDConfigError(_format_error(e)) from None
    except RecursionError:
        raise MetaSDConfigError(_TOO_DEEP) from None
    return _resolve_paths(cfg, base)


def from_speculative_config(spec: dict[str, Any]) -> MetaSDConfig:
    """The MetaSD config named by ``{"method": "metasd", "config": ...}``."""
    unknown = sorted(set(spec) - {"method", "config"})
    if unknown:
        raise MetaSDConfigError(
            f"speculative_config: unknown keys {unknown} for method 'metasd'; "
            "it takes only 'config' (a metasd.json path, inline JSON or a dict)")
    if "config" not in spec:
        raise MetaSDConfigError(
            "speculative_config.config: missing; give the metasd.json path, e.g. "
            '{"method": "metasd", "config": "metasd.json"}')
    return load_config(spec["config"])


# Tokenizer files compared between a drafter and the target (those present in both).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")


def _tokenizer_fingerprint(directory: Path, name: str) -> Any:
    """What must agree: for tokenizer.json the token<->id model and the added
    tokens (not truncation/padding settings); other files byte for byte."""
    data = (directory / name).read_bytes()
    if name != "tokenizer.json":
        return data
    tok = json.loads(data)
    return tok.get("model"), [(t.get("id"), t.get("content")) for t in tok.get("added_tokens", [])]


def _config_vocab_size(model_dir: Path) -> int | None:
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    size = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) else None


# config.json keys vLLM reads a model's context length from (the smallest one counts).
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                 "model_max_length", "max_sequence_length", "max_seq_length", "seq_len")


def _config_max_len(model_dir: Path) -> tuple[int, str] | None:
    """The positions a checkpoint handles, as vLLM derives them from its config.json;
    None when unknown or when RoPE scaling stretches it (then vLLM's own checks apply)."""
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    for rope in (text.get("rope_scaling"), text.get("rope_parameters")):
        if isinstance(rope, dict) and rope.get("factor") not in (None, 1, 1.0):
            return None
    found = [(v, k) for k in _MAX_LEN_KEYS
             if isinstance(v := text.get(k), int) and not isinstance(v, bool) and v > 0]
    return min(found) if found else None


def check_engine_limits(cfg: MetaSDConfig, max_model_len: int) -> None:
    """Values the engine with this ``max_model_len`` cannot serve (checked before it
    starts, once vLLM has resolved max_model_len). Raises MetaSDConfigError."""
    problems = []
    k = cfg.num_speculative_tokens
    if k + 1 > max_model_len:
        problems.append(
            f"num_speculative_tokens: {k} does not fit max_model_len {max_model_len} (a step "
            f"verifies k + 1 tokens of one sequence, so nothing would ever be drafted); "
            f"lower it to at most {max_model_len - 1} or raise max_model_len")
    for i, d in enumerate(cfg.drafters):
        if isinstance(d, NgramDrafter) and d.prompt_lookup_max > max_model_len:
            # (vLLM's n-gram matcher also allocates prompt_lookup_max ints per request.)
            problems.append(
                f"drafters[{i}].prompt_lookup_max: {d.prompt_lookup_max} exceeds max_model_len "
                f"{max_model_len} (an n-gram longer than the sequence never matches); lower "
                f"it to at most {max_model_len}, e.g. 4")
        elif isinstance(d, DraftModelDrafter):
            try:
                limit = _config_max_len(Path(d.path))
            except (OSError, ValueError):
                continue  # unreadable: check_drafters_against_target reports it
            if limit is not None and limit[0] < max_model_len:
                problems.append(
                    f"drafters[{i}].path: drafter {d.name!r} handles {limit[0]} positions "
                    f"({limit[1]} in its config.json), fewer than the engine's max_model_len "
                    f"{max_model_len} (it would draft garbage past them and be disabled); "
                    f"lower max_model_len to {limit[0]} or use a drafter with a context of "
                    f"at least {max_model_len}")
    if problems:
        raise MetaSDConfigError("; ".join(problems))


def check_drafters_against_target(cfg: MetaSDConfig, target_vocab_size: int | None,
                                  target_tokenizer: str | os.PathLike | None) -> None:
    """Every draft LM must use the target's vocabulary: same ``vocab_size`` in
    its config.json and, where the target's tokenizer is a local directory,
    the same tokenizer files. Raises MetaSDConfigError naming each drafter."""
    tok_dir = Path(target_tokenizer) if target_tokenizer is not None else None
    if tok_dir is not None and not tok_dir.is_dir():
        tok_dir = None  # a hub id: only the vocabulary size is compared
    problems = []
    for i, d in enumerate(cfg.drafters):
        if not isinstance(d, DraftModelDrafter):
            continue
        path, field = Path(d.path), f"drafters[{i}].path"
        fix = ("use a drafter trained with the target's tokenizer (MetaSD verifies drafts "
               "token id by token id)")
        try:
            vocab = _config_vocab_size(path)
        except (OSError, ValueError) as e:
            problems.append(f"{field}: cannot read {str(path / 'config.json')!r} ({e}); point "
                            "it at a Hugging Face model directory (config.json + weights)")
            continue
        if target_vocab_size is not None and vocab is not None and vocab != target_vocab_size:
            problems.append(f"{field}: drafter {d.name!r} has vocab_size {vocab} (config.json), "
                            f"the target has {target_vocab_size}; {fix}")
            continue
        if tok_dir is None:
            continue
        for name in _TOKENIZER_FILES:
            if (path / name).is_file() and (tok_dir / name).is_file():
                try:
                    same = (_tokenizer_fingerprint(path, name)
                            == _tokenizer_fingerprint(tok_dir, name))
                except (OSError, ValueError) as e:
                    problems.append(f"{field}: cannot compare {name} with the target's ({e}); "
                                    f"{fix}")
                    break
                if not same:
                    problems.append(f"{field}: drafter {d.name!r} has a different tokenizer "
                                    f"than the target ({name} differs from "
                                    f"{str(tok_dir / name)!r}); {fix}")
                    break
    if problems:
        raise MetaSDConfigError("; ".join(problems))
