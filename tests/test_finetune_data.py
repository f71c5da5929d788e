"""Fine-tuning data: the three formats in JSONL/JSON/CSV (and `datasets` folders) give the same
conversations; labels are exactly the assistant tokens with their `<|im_end|>`; truncation and bad
rows are counted or reported with file, line and what; packing keeps samples apart; batches split
the same way over any number of processes."""

import csv
import json

import pytest
import torch

from qwenkit.errors import DataError
from qwenkit.finetune.batches import Sample, StepBatches, collate, eval_batches, pack, tokenize
from qwenkit.finetune.data import load_conversations, split_validation
from qwenkit.model import IGNORE_INDEX

ALPACA = [
    {"instruction": "Capital of France?", "output": "Paris."},
    {"instruction": "Add these.", "input": "2 and 3", "output": "5", "system": "Be terse."},
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}]},
    {
        "system": "Be terse.",
        "conversations": [{"from": "human", "value": "Add these.\n\n2 and 3"}, {"from": "gpt", "value": "5"}],
    },
]
OPENAI = [
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Add these.\n\n2 and 3"},
            {"role": "assistant", "content": "5"},
        ]
    },
]
MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Germany?"},
        {"role": "assistant", "content": "Berlin, since 1990."},
    ]
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows):
    fields = sorted({k for r in rows for k in r})
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return path


@pytest.mark.parametrize("rows,fmt", [(ALPACA, "alpaca"), (SHAREGPT, "sharegpt"), (OPENAI, "openai")])
@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv"])
def test_every_format_and_file_type_gives_the_same_conversations(tmp_path, rows, fmt, suffix):
    path = tmp_path / f"data.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, rows)
    elif suffix == "json":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    else:
        write_csv(path, rows)
    convs, stats = load_conversations(path)
    assert stats.format == fmt and stats.rows == 2
    expected = [[{"role": m["role"], "content": m["content"]} for m in r["messages"]] for r in OPENAI]
    assert [[{"role": m["role"], "content": m["content"]} for m in c.messages] for c in convs] == expected
    named, _ = load_conversations(path, fmt=fmt)
    assert [c.messages for c in named] == [c.messages for c in convs]


def test_datasets_folder_is_read(tmp_path):
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(OPENAI), "validation": datasets.Dataset.from_list(OPENAI[:1])}
    ).save_to_disk(str(tmp_path / "ds"))
    train, stats = load_conversations(tmp_path / "ds")
    val, _ = load_conversations(tmp_path / "ds", split=("validation", "test"))
    assert stats.format == "openai" and len(train) == 2 and len(val) == 1
    assert train[1].messages[-1] == {"role": "assistant", "content": "5"}


def test_labels_are_exactly_the_assistant_turns_with_im_end(tmp_path, tok_qwen):
    convs, _ = load_conversations(write_jsonl(tmp_path / "d.jsonl", [MULTI_TURN]))
    (sample,) = tokenize(tok_qwen, convs, max_seq_len=4096)
    im_end = tok_qwen.convert_tokens_to_ids("<|im_end|>")
    # The learned spans, read off the labels, must be each answer's own tokens then <|im_end|>.
    spans, current = [], []
    for i, label in enumerate(sample.labels):
        if label != IGNORE_INDEX:
            assert label == sample.input_ids[i]
            current.append(label)
        elif current:
            spans.append(current)
            current = []
    answers = [m["content"] for m in MULTI_TURN["messages"] if m["role"] == "assistant"]
    assert spans == [tok_qwen.encode(a) + [im_end] for a in answers]
    # Nothing else is learned: every other position is -100, the header and the newline after <|im_end|> too.
    assert sum(label != IGNORE_INDEX for label in sample.labels) == sum(len(s) for s in spans)
    assert sample.input_ids == tok_qwen.apply_chat_template(MULTI_TURN["messages"])


def test_padding_is_not_learned_and_is_not_im_end(tmp_path, tok_qwen):
    convs, _ = load_conversations(write_jsonl(tmp_path / "d.jsonl", OPENAI))
    samples = tokenize(tok_qwen, convs, max_seq_len=4096)
    batch = collate(samples, tok_qwen.pad_token_id)
    im_end = tok_qwen.convert_tokens_to_ids("<|im_end|>")
    assert tok_qwen.pad_token_id != im_end
    short = min(range(2), key=lambda b: len(samples[b]))
    n = len(samples[short])
    assert (batch["input_ids"][short, n:] == tok_qwen.pad_token_id).all()
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, n:] == 0).all() and (batch["attention_mask"][short, :n] == 1).all()
    # Each row still learns to stop.
    assert all((batch["labels"][b] == im_end).sum() == 1 for b in range(2))


def test_truncation_and_rows_without_target_are_counted(tmp_path, tok_qwen):
    long_answer = {
        "messages": [{"role": "user", "content": "Count."}, {"role": "assistant", "content": " ".join(["one"] * 200)}]
    }
    long_prompt = {
        "messages": [{"role": "user", "content": " ".join(["word"] * 200)}, {"role": "assistant", "content": "ok"}]
    }
    convs, stats = load_conversations(write_jsonl(tmp_path / "d.jsonl", [long_answer, long_prompt, OPENAI[0]]))
    samples = tokenize(tok_qwen, convs, max_seq_len=64, stats=stats)
    assert stats.truncated == 2 and stats.dropped_no_target == 1
    assert len(samples) == 2 and all(len(s) <= 64 for s in samples)
    assert "truncated 2 rows" in stats.summary("train") and "dropped 1 rows" in stats.summary("train")


BAD_ROWS = [
    ('{"instruction": "hi"}', "missing field 'output'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "wrong role order"),
    ('{"messages": [{"role": "assistant", "content": "first"}]}', "wrong role order"),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}',
        "empty assistant turn",
    ),
    ('{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}', "missing field 'role'"),
    ('{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]}', "missing field 'value'"),
    ('{"instruction": "hi", "output": "x"', "not JSON"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant turn"),
]


@pytest.mark.parametrize("line,what", BAD_ROWS)
def test_each_bad_row_is_reported_with_file_line_and_what(tmp_path, line, what):
    path = tmp_path / "train.jsonl"
    # The good rows around it share its format (detected from the first row).
    good = json.dumps(ALPACA[0] if "instruction" in line else SHAREGPT[0] if "conversations" in line else OPENAI[0])
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")  # the bad row is on line 3
    with pytest.raises(DataError) as err:
        load_conversations(path)
    assert str(err.value).startswith(f"{path}:3: ") and what in str(err.value)


def test_bad_rows_in_json_and_csv_files_name_their_line(tmp_path):
    rows = [ALPACA[0], {"instruction": "no output"}]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    lines = path.read_text().splitlines()
    start = lines.index("  {", lines.index("  {") + 1) + 1  # the second object's line, 1-based
    with pytest.raises(DataError, match=rf"train.json:{start}: missing field 'output'"):
        load_conversations(path)
    path = write_csv(tmp_path / "train.csv", [ALPACA[0], ALPACA[0], {"instruction": "x", "output": ""}])
    with pytest.raises(DataError, match=r"train.csv:4: .*empty assistant turn"):
        load_conversations(path)


def test_a_bad_row_error_carries_its_file_and_line(tmp_path):
    # Rows side by side on one line of a JSON array, then a bad one on the next line.
    path = tmp_path / "train.json"
    path.write_text(f"[{json.dumps(ALPACA[0])}, {json.dumps(ALPACA[1])},\n {json.dumps({'instruction': 'x'})}]")
    with pytest.raises(DataError) as err:
        load_conversations(path)
    assert (err.value.file, err.value.line) == (path, 2) and "missing field 'output'" in err.value.message
    # Rows listed inside one object have no line of their own: the error names the row's index.
    path.write_text(json.dumps({"data": [ALPACA[0], {"instruction": "x"}]}))
    with pytest.raises(DataError) as err:
        load_conversations(path)
    assert err.value.line is None and str(err.value).startswith(f"{path}: row 1: missing field 'output'")
    # A whole-file problem names the file alone.
    with pytest.raises(DataError) as err:
        load_conversations(tmp_path / "absent.jsonl")
    assert (err.value.file, err.value.line) == (tmp_path / "absent.jsonl", None)


def test_skip_bad_rows_skips_and_counts(tmp_path):
    lines = [
        json.dumps(OPENAI[0]),
        BAD_ROWS[1][0],
        BAD_ROWS[3][0],
        BAD_ROWS[6][0],
        json.dumps(OPENAI[1]),
        BAD_ROWS[2][0],
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    convs, stats = load_conversations(path, skip_bad_rows=True)
    assert len(convs) == 2
    assert dict(stats.skipped) == {"wrong role order": 2, "empty assistant turn": 1, "not JSON": 1}
    assert "skipped 4 bad rows" in stats.summary("train")


def test_packing_restarts_positions_and_keeps_samples_apart(tmp_path, tok_qwen):
    from reference import random_model, tiny_config

    from qwenkit.finetune.loss import CausalLMLoss

    convs, _ = load_conversations(write_jsonl(tmp_path / "d.jsonl", OPENAI + [MULTI_TURN]))
    samples = tokenize(tok_qwen, convs, max_seq_len=4096)
    (packed,) = pack(samples, max_seq_len=4096, seed=0)
    assert len(packed) == sum(len(s) for s in samples)
    starts = [i for i, p in enumerate(packed.position_ids) if p == 0]
    assert len(starts) == 3 and sorted(b - a for a, b in zip(starts, starts[1:] + [len(packed)])) == sorted(
        len(s) for s in samples
    )
    # The loss of the packed sequence is the sum of the samples' own losses: no attention, no label,
    # crosses a boundary.
    head = CausalLMLoss(random_model(tiny_config(vocab_size=151936), seed=3))
    with torch.no_grad():
        loss_packed, n_packed = head(**collate([packed], tok_qwen.pad_token_id))
        alone = [head(**collate([s], tok_qwen.pad_token_id)) for s in samples]
    assert n_packed == sum(n for _, n in alone)
    torch.testing.assert_close(loss_packed, sum(loss for loss, _ in alone), rtol=1e-5, atol=1e-4)


def test_validation_split_is_seeded_and_disjoint():
    items = list(range(50))
    train, val = split_validation(items, 0.2, seed=1)
    assert len(val) == 10 and sorted(train + val) == items
    assert split_validation(items, 0.2, seed=1) == (train, val)
    assert split_validation(items, 0.2, seed=2)[1] != val
    with pytest.raises(DataError, match="nothing to train"):
        split_validation([1], 0.5, seed=0)


def _rows(batch):
    return [tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"])]


def test_global_batch_is_the_same_for_any_number_of_processes():
    samples = [Sample([i] * (1 + i % 5), [i] * (1 + i % 5)) for i in range(40)]
    single = StepBatches(samples, batch_size=4, grad_accum=2, world_size=1, rank=0, seed=7, pad_id=0)
    ranks = [StepBatches(samples, batch_size=2, grad_accum=2, world_size=2, rank=r, seed=7, pad_id=0) for r in range(2)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == 5
    seen = []
    for step in range(single.steps_per_epoch + 1):
        one = [row for mb in single.micro_batches(step) for row in _rows(mb)]
        split = [row for r in ranks for mb in r.micro_batches(step) for row in _rows(mb)]
        assert sorted(one) == sorted(split) and len(one) == 8
        seen += one if step < single.steps_per_epoch else []
    assert sorted(seen) == sorted(tuple(s.input_ids) for s in samples)  # an epoch covers every sample once
    # Evaluation shares: every sample once over all ranks, the same number of batches on each.
    shares = [list(eval_batches(samples[:9], 2, 2, r, pad_id=0)) for r in range(2)]
    assert len(shares[0]) == len(shares[1])
    counted = [
        row for share in shares for b in share for row, lab in zip(_rows(b), b["labels"]) if (lab != IGNORE_INDEX).any()
    ]
    assert sorted(counted) == sorted(tuple(s.input_ids) for s in samples[:9])
