"""Parity with transformers' Qwen2 (and Llama) on the same random weights, fp32 on CPU."""

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from reference import hf_twin, random_model, tiny_config

from qwenkit.cache import KVCache
from qwenkit.config import PRESETS, YarnScaling
from qwenkit.model import QwenForCausalLM

TOL = 1e-4


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers_tiny(tied):
    model = random_model(tiny_config(tie_word_embeddings=tied))
    hf = hf_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert max_diff(ours, theirs) <= TOL
    assert ("lm_head.weight" in dict(model.named_parameters())) == (not tied)


def test_logits_match_transformers_at_7b_layer_shapes():
    config = replace(PRESETS["qwen2.5-7b"], num_hidden_layers=2, vocab_size=1024)
    model = random_model(config)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (18944, 3584)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (4 * 128, 3584)
    hf = hf_twin(model)
    ids = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_diff(model(ids).logits, hf(ids).logits) <= TOL


def test_left_padded_batch_is_exact():
    model = random_model(tiny_config())
    hf = hf_twin(model)
    gen = torch.Generator().manual_seed(3)
    lengths = [9, 4, 7]
    rows = [torch.randint(0, 512, (n,), generator=gen) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, T - len(row) :], mask[i, T - len(row) :] = row, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate passes
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
        for i, row in enumerate(rows):
            real = slice(T - len(row), T)
            alone = model(row[None]).logits[0]
            assert max_diff(ours[i, real], alone) <= TOL
            assert max_diff(ours[i, real], theirs[i, real]) <= TOL
    assert torch.isfinite(ours).all()


def test_right_padded_batch_is_exact():
    model = random_model(tiny_config())
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, :5]).logits
    assert max_diff(batched[1, :5], alone[0]) <= TOL


def test_yarn_rope_scaling_matches_transformers():
    config = tiny_config(
        rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=32768), max_position_embeddings=131072
    )
    model = random_model(config)
    hf = hf_twin(model)
    assert model.model.rotary_emb.mscale == pytest.approx(hf.model.rotary_emb.attention_scaling)
    assert torch.allclose(model.model.rotary_emb.inv_freq, hf.model.rotary_emb.inv_freq)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(5))
    # Far positions, where YaRN's interpolation matters.
    positions = torch.arange(70_000, 70_016)[None]
    with torch.no_grad():
        ours = model(ids, position_ids=positions).logits
        theirs = hf(ids, position_ids=positions).logits
        plain = random_model(tiny_config())(ids, position_ids=positions).logits
    assert max_diff(ours, theirs) <= TOL
    assert max_diff(ours, plain) > 1e-3  # the scaling really changes the network


def test_loss_matches_transformers_with_ignored_labels():
    model = random_model(tiny_config(tie_word_embeddings=False))
    hf = hf_twin(model)
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(6))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt that is not trained on
    labels[1, -2:] = -100
    with torch.no_grad():
        ours = model(ids, labels=labels).loss
        theirs = hf(ids, labels=labels).loss
    assert abs(ours.item() - theirs.item()) <= 1e-5


def test_llama_architecture_matches_transformers():
    config = tiny_config(
        model_type="llama", attention_bias=False, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5
    )
    model = random_model(config)
    assert model.model.layers[0].self_attn.q_proj.bias is None
    hf = hf_twin(model)
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert max_diff(model(ids).logits, hf(ids).logits) <= TOL


def test_packed_samples_do_not_attend_across():
    model = random_model(tiny_config())
    gen = torch.Generator().manual_seed(8)
    a, b = torch.randint(0, 512, (5,), generator=gen), torch.randint(0, 512, (7,), generator=gen)
    packed = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=positions).logits[0]
        assert max_diff(out[:5], model(a[None]).logits[0]) <= TOL
        assert max_diff(out[5:], model(b[None]).logits[0]) <= TOL


def test_cached_decoding_equals_full_forward():
    model = random_model(tiny_config())
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(9))
    cache = KVCache(model.config, batch_size=2, max_len=16)
    with torch.no_grad():
        full = model(ids).logits
        steps = [model(ids[:, :8], cache=cache).logits]
        for t in range(8, 12):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert max_diff(torch.cat(steps, dim=1), full) <= TOL
    assert cache.lengths.tolist() == [12, 12]


def test_meta_construction_allocates_nothing():
    with torch.device("meta"):
        model = QwenForCausalLM(PRESETS["qwen2.5-72b"])
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters() > 70e9


def test_building_on_the_meta_device_imports_no_compiler():
    # nn.Embedding's default init on the meta device runs in Python and imports torch._dynamo,
    # torch._inductor and sympy (~830 modules, 73 MiB of a load's memory); the model skips it.
    code = (
        "import sys, torch, qwenkit\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "with torch.device('meta'):\n"
        "    qwenkit.QwenForCausalLM(qwenkit.PRESETS['qwen2.5-0.5b'])\n"
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_init_weights_is_seeded_and_scaled():
    a = random_model(tiny_config(), seed=3)
    b = random_model(tiny_config(), seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    with torch.device("meta"):
        fresh = QwenForCausalLM(tiny_config())
    fresh.to_empty(device="cpu").init_weights(seed=0)
    w = fresh.model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - fresh.config.initializer_range) < 0.002
    assert torch.equal(fresh.model.norm.weight, torch.ones_like(fresh.model.norm.weight))
    assert torch.count_nonzero(fresh.model.layers[0].self_attn.q_proj.bias) == 0


def test_bf16_forward_close_to_transformers_bf16():
    model = random_model(tiny_config()).to(torch.bfloat16)
    hf = hf_twin(model)
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.dtype == torch.bfloat16
    assert max_diff(ours, theirs) <= 2e-2


def test_cache_rows_join_and_leave_independently():
    """Continuous batching: a request prefilled into a free row while another row decodes, and a
    row that sits out steps; each row's logits equal running its tokens alone."""
    model = random_model(tiny_config())
    gen = torch.Generator().manual_seed(11)
    a = torch.randint(0, 512, (1, 9), generator=gen)  # row 0: prompt of 6, then 3 decoded tokens
    b = torch.randint(0, 512, (1, 6), generator=gen)  # row 1: joins later, prompt of 4, then 2 tokens
    cache = KVCache(model.config, batch_size=2, max_len=16)
    with torch.no_grad():
        full_a, full_b = model(a).logits[0], model(b).logits[0]
        got_a = [model(a[:, :6], cache=cache.rows(0, 1)).logits[0, -1]]
        idle = torch.tensor([[1], [0]])  # row 1 is free: it must not move
        step = torch.stack([a[0, 6:7], torch.zeros(1, dtype=torch.long)])
        got_a.append(model(step, attention_mask=idle, cache=cache).logits[0, -1])
        assert cache.lengths.tolist() == [7, 0]
        got_b = [model(b[:, :4], cache=cache.rows(1, 2)).logits[0, -1]]  # joins while row 0 is mid-way
        for t in range(2):
            out = model(torch.stack([a[0, 7 + t : 8 + t], b[0, 4 + t : 5 + t]]), cache=cache).logits
            got_a.append(out[0, -1])
            got_b.append(out[1, -1])
        assert cache.lengths.tolist() == [9, 6]
    assert max_diff(torch.stack(got_a), full_a[5:9]) <= TOL
    assert max_diff(torch.stack(got_b), full_b[3:6]) <= TOL
