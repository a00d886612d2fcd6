"""The oracle's reconstruction of what each query could see."""

from __future__ import annotations

import pytest
import torch

from vllm_evict.core.oracle import allowed_positions, load_reference_model, reference_logprobs


def test_before_any_compaction_it_is_causal():
    allowed = allowed_positions(6, [], layers=1, kv_heads=1)[0, 0]
    assert torch.equal(allowed, torch.ones(6, 6, dtype=torch.bool).tril())


def test_after_a_compaction_queries_see_kept_plus_new_tokens():
    records = [{"logical_len": 5, "kept": [[[0, 3, 4]], [[1, 2, 4]]]}]
    allowed = allowed_positions(8, records, layers=2, kv_heads=1)
    assert allowed[0, 0, 4].tolist() == [True] * 5 + [False] * 3  # before: causal
    assert allowed[0, 0, 5].nonzero().flatten().tolist() == [0, 3, 4, 5]
    assert allowed[0, 0, 7].nonzero().flatten().tolist() == [0, 3, 4, 5, 6, 7]
    assert allowed[1, 0, 6].nonzero().flatten().tolist() == [1, 2, 4, 5, 6]


@pytest.mark.parametrize("model", ["tiny_model", "tiny_gemma3"])
def test_oracle_is_hf_eager_attention_for_any_model(model, request):
    """Through transformers' AttentionInterface, not a model patch: with nothing evicted it
    gives exactly HF eager's logprobs (Llama and Gemma-3 here, within Gemma's window); a
    compaction record changes them."""
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(model)
    oracle = load_reference_model(path)
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    prompt, generated = list(range(10, 40)), list(range(100, 120))
    ours, _ = reference_logprobs(oracle, prompt, generated, [])
    with torch.no_grad():
        logits = eager(input_ids=torch.tensor([prompt + generated[:-1]])).logits[0].float()
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(generated) - 1)
    want = torch.log_softmax(logits, dim=-1)[rows, torch.tensor(generated)]
    assert torch.equal(ours, want)
    layers = oracle.config.num_hidden_layers
    heads = oracle.config.num_key_value_heads
    kept = [[list(range(4)) + list(range(20, 35))] * heads] * layers
    evicted, _ = reference_logprobs(oracle, prompt, generated, [{"logical_len": 35, "kept": kept}])
    assert (evicted - want).abs().max() > 1e-3
