"""The benchmark entry point's quick mode, on the shipped zoo, through vLLM."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_metasd import zoo

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not zoo.available(), reason="zoo weights not built")
def test_quick_benchmark_writes_every_method_with_tokens(tmp_path):
    out = tmp_path / "results.json"
    methods = "none,draft:code,metasd:ucb:bd,metasd:exp3:acceptance"
    proc = subprocess.run(
        # float32: greedy outputs are then identical to plain decoding at every batch
        # shape (bf16 rounding differs between shapes and can flip near-ties).
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--methods", methods,
         "--prompts-per-domain", "1", "--max-tokens", "16", "--dtype", "float32",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    entries = {r["method"]: r for r in result["methods"]}
    assert set(entries) == {*methods.split(","), "oracle"}
    for name, r in entries.items():
        for key in ("tokens_per_s_bs1", "tokens_per_s_bs16", "mean_accepted_len", "per_domain"):
            assert key in r, (name, key)
        assert r["tokens_per_s_bs1"] > 0
        assert set(r["per_domain"]) == set(zoo.DOMAINS)
        if name != "oracle":
            assert r["tokens_per_s_bs16"] > 0 and r["lossless"] is not False, name
    assert entries["none"]["mean_accepted_len"] == pytest.approx(0.0, abs=0.1)
    for name in ("metasd:ucb:bd", "metasd:exp3:acceptance"):
        r = entries[name]
        assert r["lossless"] is True
        assert 0 < r["overhead_ms_per_step"] and 0 < r["overhead_share"] < 1
        assert sum(r["arm_share"]["all"].values()) == pytest.approx(1.0)
    assert (tmp_path / "tokens_per_s.png").exists() and (tmp_path / "arm_share.png").exists()
