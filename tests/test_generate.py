"""Generation: greedy equals transformers' generate, batched equals unbatched, stop rules, seeds."""

from dataclasses import replace

import pytest
import torch
from reference import hf_twin, random_model, tiny_config

from qwenkit.config import PRESETS
from qwenkit.generate import SamplingParams, generate, sample


def hf_greedy(hf, ids, n, attention_mask=None):
    out = hf.generate(
        ids,
        attention_mask=attention_mask if attention_mask is not None else torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize(
    "config",
    [tiny_config(), replace(PRESETS["qwen2.5-0.5b"], num_hidden_layers=2, vocab_size=2048)],
    ids=["tiny", "0.5b-shapes"],
)
def test_greedy_equals_transformers(config):
    model = random_model(config)
    hf = hf_twin(model)
    ids = torch.randint(0, config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    ours = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=[])
    assert torch.equal(ours[:, 10:], hf_greedy(hf, ids, 12))
    assert torch.equal(ours[:, :10], ids)


def test_batched_greedy_equals_unbatched():
    model = random_model(tiny_config())
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 512, (n,), generator=gen) for n in (7, 3, 5)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :], mask[i, T - len(r) :] = r, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=[])
    for i, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=8, do_sample=False, eos_token_id=[])
        assert torch.equal(batched[i, T:], alone[0, len(r) :])


def test_stops_on_every_eos_id_and_pads_finished_rows():
    model = random_model(tiny_config())
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(2))
    free = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=[])[:, 6:].tolist()
    eos = [free[0][2], free[1][4]]  # two stop ids, as Qwen2.5 has (151645 and 151643)
    # Each row must end at its first stop id; finished rows are padded until every row is done.
    ends = [next(i for i, t in enumerate(row) if t in eos) + 1 for row in free]
    out = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)[:, 6:]
    assert out.shape[1] == max(ends)
    for row, end, got in zip(free, ends, out.tolist()):
        assert got == row[:end] + [0] * (max(ends) - end)


def test_max_length_counts_the_prompt():
    model = random_model(tiny_config())
    ids = torch.randint(0, 512, (1, 5))
    assert model.generate(ids, max_length=9, do_sample=False).shape == (1, 9)


def test_seed_reproduces_sampling():
    model = random_model(tiny_config())
    ids = torch.randint(0, 512, (1, 4), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, top_p=1.0, eos_token_id=[])
    a = model.generate(ids, seed=7, **kw)
    b = model.generate(ids, seed=7, **kw)
    c = model.generate(ids, seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    p = SamplingParams(do_sample=True, temperature=1.0)
    draws = lambda **kw: {int(sample(logits, replace(p, **kw), torch.Generator().manual_seed(i))) for i in range(200)}
    assert draws(top_k=2) == {0, 1}
    probs = logits.softmax(-1)[0]
    assert draws(top_p=float(probs[0] + probs[1]) - 1e-3) == {0, 1}
    assert draws(min_p=float(probs[2] / probs[0]) + 1e-3) == {0, 1}
    assert int(sample(logits, replace(p, do_sample=False))) == 0


def test_generation_config_supplies_defaults():
    model = random_model(tiny_config())
    model.generation_config = {"do_sample": False, "eos_token_id": [5, 6], "max_new_tokens": 3, "top_k": 20}
    params = SamplingParams.from_model(model, temperature=None)
    assert params.eos_token_id == (5, 6) and params.top_k == 20 and params.max_new_tokens == 3
    with pytest.raises(TypeError, match="unknown generation argument"):
        SamplingParams.from_model(model, temprature=0.5)


def test_one_temperature_rule_for_every_caller():
    from qwenkit.errors import UserError

    model = random_model(tiny_config())
    model.generation_config = {"do_sample": False, "temperature": 0.7}
    assert not SamplingParams.from_model(model).do_sample  # the checkpoint's own choice stands
    assert SamplingParams.from_model(model, temperature=0.9).do_sample  # a temperature asks for sampling
    assert not SamplingParams.from_model(model, temperature=0).do_sample  # 0 is greedy
    assert not SamplingParams.from_model(model, temperature=0.9, do_sample=False).do_sample  # explicit wins
    model.generation_config = {"do_sample": True, "temperature": 0.0}
    assert not SamplingParams.from_model(model).do_sample  # a checkpoint's temperature 0 is greedy too
    with pytest.raises(UserError, match="temperature must be >= 0"):
        SamplingParams.from_model(model, temperature=-0.5)


def test_yields_one_token_per_row_per_step():
    model = random_model(tiny_config())
    ids = torch.randint(0, 512, (3, 4))
    steps = list(generate(model, ids, params=SamplingParams(max_new_tokens=4)))
    assert len(steps) == 4 and all(s.shape == (3,) for s in steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [151936, 1000, 7])  # 64 blocks or not; 7: under one vector
def test_greedy_picks_what_argmax_picks(dtype, vocab):
    from qwenkit.generate import greedy

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=g).to(dtype)
    logits[1, [1, vocab - 3]] = 50.0  # a tie across blocks: the first wins
    logits[2, [vocab // 2, vocab // 2 + 1]] = 50.0  # a tie within a block
    logits[3] = -1.0  # all equal
    logits[4, vocab // 3] = float("nan")  # a NaN is the maximum, as for argmax
    logits[4, vocab - 1] = float("nan")
    assert torch.equal(greedy(logits), logits.float().argmax(-1))
    for row in range(5):  # one row alone, and a row of -inf
        assert torch.equal(greedy(logits[row : row + 1]), logits[row : row + 1].float().argmax(-1))
    assert greedy(torch.full((1, vocab), float("-inf"), dtype=dtype)).tolist() == [0]
