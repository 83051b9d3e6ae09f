"""Drafters must share the target's vocabulary (check_drafters_against_target).
Pure files: hand-written config.json / tokenizer files, no model weights."""
import json

import pytest

from vllm_metasd.config import MetaSDConfigError, check_drafters_against_target, load_config

TOKENIZER = {"version": "1.0", "truncation": None,
             "added_tokens": [{"id": 0, "content": "<s>"}, {"id": 1, "content": "</s>"}],
             "model": {"type": "BPE", "vocab": {"<s>": 0, "</s>": 1, "a": 2, "b": 3},
                       "merges": []}}


def model_dir(path, vocab_size=4, tokenizer=TOKENIZER, **files):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"vocab_size": vocab_size}))
    if tokenizer is not None:
        (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    for name, text in files.items():
        (path / name.replace("_", ".")).write_text(text)
    return path


def check(tmp_path, drafter_dir, target_dir, vocab=4):
    cfg = load_config({"num_speculative_tokens": 2, "drafters": [
        {"name": "lookup", "kind": "ngram"},
        {"name": "code", "kind": "draft_model", "path": str(drafter_dir)}]})
    check_drafters_against_target(cfg, vocab, str(target_dir))


def test_same_vocabulary_passes_even_if_other_tokenizer_settings_differ(tmp_path):
    target = model_dir(tmp_path / "target")
    drafter = model_dir(tmp_path / "drafter", tokenizer={**TOKENIZER, "truncation": {"x": 1}})
    check(tmp_path, drafter, target)
    check(tmp_path, drafter, "org/hub-id")  # not a local directory: size check only


def test_vocab_size_mismatch_names_the_drafter_and_the_fix(tmp_path):
    target = model_dir(tmp_path / "target")
    drafter = model_dir(tmp_path / "drafter", vocab_size=8)
    with pytest.raises(MetaSDConfigError) as e:
        check(tmp_path, drafter, target)
    assert str(e.value).startswith(
        "drafters[1].path: drafter 'code' has vocab_size 8 (config.json), the target has 4; "
        "use a drafter trained with the target's tokenizer")


@pytest.mark.parametrize("change", [
    lambda t: t["model"]["vocab"].update({"a": 3, "b": 2}),  # same size, other ids
    lambda t: t["added_tokens"].append({"id": 4, "content": "<pad>"}),
])
def test_tokenizer_mismatch(tmp_path, change):
    other = json.loads(json.dumps(TOKENIZER))
    change(other)
    target = model_dir(tmp_path / "target")
    drafter = model_dir(tmp_path / "drafter", tokenizer=other)
    with pytest.raises(MetaSDConfigError, match=r"drafters\[1\]\.path: drafter 'code' has a "
                       r"different tokenizer than the target \(tokenizer\.json differs"):
        check(tmp_path, drafter, target)


def test_other_tokenizer_files_compared_byte_for_byte(tmp_path):
    target = model_dir(tmp_path / "target", tokenizer=None, vocab_json='{"a": 0}')
    check(tmp_path, model_dir(tmp_path / "same", tokenizer=None, vocab_json='{"a": 0}'), target)
    check(tmp_path, model_dir(tmp_path / "none", tokenizer=None), target)  # nothing to compare
    with pytest.raises(MetaSDConfigError, match=r"vocab\.json differs"):
        check(tmp_path, model_dir(tmp_path / "diff", tokenizer=None, vocab_json='{"b": 0}'),
              target)


def test_drafter_without_config_json(tmp_path):
    target = model_dir(tmp_path / "target")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetaSDConfigError, match=r"drafters\[1\]\.path: cannot read .*config\.json"
                       r".*point it at a Hugging Face model directory"):
        check(tmp_path, tmp_path / "empty", target)
