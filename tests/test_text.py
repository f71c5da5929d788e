"""The text layer: streaming deltas, stop strings across tokens, batches, context limits, penalties,
and `RowText`, the token-to-text state machine that `TextStream` and the server's engine share."""

from dataclasses import replace

import pytest
import torch
from reference import hf_twin, random_model, tiny_config

from qwenkit.errors import ContextLengthError
from qwenkit.generate import SamplingParams, apply_output_penalties, generate
from qwenkit.text import RowText, StopMatcher, TextStream, complete, encode_prompt, stream_text

GREEDY = SamplingParams(max_new_tokens=24, eos_token_id=(151645, 151643), pad_token_id=151643)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(vocab_size=151936))


def no_eos(p=GREEDY, **kw):
    return replace(p, eos_token_id=(), **kw)


def test_stream_deltas_join_to_the_full_decode(model, tok_qwen):
    ids = encode_prompt(tok_qwen, "Write something in Chinese: 你好")
    run = TextStream(model, tok_qwen, [ids], no_eos())
    deltas = [d[0] for d in run]
    c = run.completions[0]
    assert "".join(deltas) == c.text == tok_qwen.decode(c.token_ids, skip_special_tokens=True)
    assert c.finish_reason == "length" and c.completion_tokens == 24
    assert "".join(stream_text(model, tok_qwen, ids, no_eos())) == c.text


def test_stop_string_spanning_two_tokens(model, tok_qwen):
    ids = encode_prompt(tok_qwen, "Say anything.")
    free = complete(model, tok_qwen, ["Say anything."], no_eos())[0]
    pieces = [tok_qwen.decode([t]) for t in free.token_ids]
    # A stop string made of the end of one token and the start of the next.
    j = next(
        j
        for j in range(len(pieces) - 1)
        if len(pieces[j]) >= 2 and len(pieces[j + 1]) >= 2 and "\ufffd" not in pieces[j] + pieces[j + 1]
    )
    stop = pieces[j][-1] + pieces[j + 1][0]
    # The run must end on the first token whose text completes the first occurrence of `stop`.
    needed = next(k for k in range(1, len(free.token_ids) + 1) if stop in tok_qwen.decode(free.token_ids[:k]))
    run = TextStream(model, tok_qwen, [ids], no_eos(), stop=[stop])
    deltas = [d[0] for d in run]
    c = run.completions[0]
    assert c.finish_reason == "stop"
    assert c.token_ids == free.token_ids[:needed]
    assert c.text == free.text[: free.text.index(stop)]
    assert "".join(deltas) == c.text  # the stop string was never streamed, not even its first half


def test_stop_matcher_holds_back_only_possible_starts():
    m = StopMatcher(["</answer>", "STOP"])
    assert m.feed("The answer is 4") == ("The answer is 4", False)
    assert m.feed(" </ans") == (" ", False)  # "</ans" could still become "</answer>"
    assert m.feed("wer> tail") == ("", True)
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("AND") == ("STAND", False)
    assert m.flush() == ""


def test_row_text_ends_a_row_on_eos_stop_string_or_budget(tok_qwen):
    eos = tok_qwen.convert_tokens_to_ids("<|im_end|>")
    hi_st = tok_qwen.encode("Hi ST")  # "ST" could still become "STOP": held back
    row = RowText(tok_qwen, stop=["STOP"], eos=[eos])
    assert "".join(row.push(t)[0] for t in hi_st) == "Hi " and not row.finished
    # The end-of-turn token releases the held text, ends the row, and is not one of its ids.
    assert row.push(eos) == ("ST", True)
    assert (row.finish_reason, row.token_ids) == ("stop", hi_st)
    assert row.push(hi_st[0]) == ("", True) and row.token_ids == hi_st  # a finished row takes no more

    row = RowText(tok_qwen, stop=["STOP"], eos=[eos])
    pushed = [row.push(t) for t in tok_qwen.encode("Hi STOP there")]
    assert pushed == [("Hi", False), (" ", True), ("", True)]  # the stop string is cut, never shown
    assert row.finish_reason == "stop"

    # The budget's last token ends the row with "length" and releases all it holds: a possible
    # stop string, and a character whose bytes were cut short.
    parrot = tok_qwen.encode("🦜")  # two tokens, each half of the emoji's bytes
    row = RowText(tok_qwen, stop=["STOP"], budget=len(hi_st))
    assert [row.push(t) for t in hi_st] == [("Hi", False), (" ST", True)] and row.finish_reason == "length"
    row = RowText(tok_qwen, budget=3)
    assert [row.push(t) for t in [*hi_st, parrot[0]]] == [("Hi", False), (" ST", False), ("\ufffd", True)]
    # With no budget the caller ends the row, and gets what is held.
    row = RowText(tok_qwen)
    assert row.push(parrot[0]) == ("", False) and row.push(parrot[1]) == ("🦜", False)
    assert row.push(parrot[0]) == ("", False) and row.finish("length") == "\ufffd"


def test_eos_ends_a_row_with_reason_stop(model, tok_qwen):
    free = complete(model, tok_qwen, ["Hi"], no_eos())[0]
    eos_id = free.token_ids[5]
    c = complete(model, tok_qwen, ["Hi"], replace(GREEDY, eos_token_id=(eos_id,)))[0]
    first = free.token_ids.index(eos_id)
    assert c.finish_reason == "stop" and c.token_ids == free.token_ids[:first]


def test_batched_text_equals_unbatched(model, tok_qwen):
    prompts = ["Hello", "Translate to French: The house is wonderful.", [{"role": "user", "content": "你好"}]]
    batched = complete(model, tok_qwen, prompts, no_eos(max_new_tokens=10), stop=["ing"])
    for prompt, got in zip(prompts, batched):
        alone = complete(model, tok_qwen, [prompt], no_eos(max_new_tokens=10), stop=["ing"])[0]
        assert (got.text, got.token_ids, got.finish_reason) == (alone.text, alone.token_ids, alone.finish_reason)


def test_prompt_longer_than_the_context_is_a_clear_error():
    small = random_model(tiny_config(max_position_embeddings=16))
    with pytest.raises(ContextLengthError, match="the prompt has 16 tokens; the model's context holds 16"):
        next(generate(small, torch.zeros(1, 16, dtype=torch.long), params=GREEDY))
    # A prompt that fits stops at the context length, whatever max_new_tokens asks.
    out = list(generate(small, torch.zeros(1, 10, dtype=torch.long), params=no_eos(max_new_tokens=50)))
    assert len(out) == 6


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    expected = logits - 0.25 * counts - 0.5 * (counts > 0).float()
    assert torch.equal(apply_output_penalties(logits, counts, p), expected)


def test_penalties_change_greedy_output(model):
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    plain = torch.stack(list(generate(model, ids, params=no_eos(max_new_tokens=16))), 1)
    penalized = torch.stack(list(generate(model, ids, params=no_eos(max_new_tokens=16, frequency_penalty=50.0))), 1)
    assert len(set(plain[0].tolist())) < 16  # this random model repeats itself...
    assert len(set(penalized[0].tolist())) == 16  # ...which a huge frequency penalty forbids


def test_repetition_penalty_equals_transformers():
    small = random_model(tiny_config())
    hf = hf_twin(small)
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(1))
    ours = small.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.8, eos_token_id=[])
    theirs = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=12,
        do_sample=False,
        repetition_penalty=1.8,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(ours, theirs)
