"""Multi-turn SFT: which tokens are trained (`data.loss_on`), masks derived by hand on a small chat, and the
count of trained assistant messages on the shared OASST sample against Open-Assistant's own thread rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.data import DataError, SFTRecord, load_records, tokenize_records

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]
OASST = Path("/work/shared/data/oasst/oasst_en_trees_sample.jsonl")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def segments(tok, texts):
    """Token ids of each text segment, and their concatenation."""
    segs = [ids(tok, t) for t in texts]
    return segs, [i for s in segs for i in s]


@pytest.mark.parametrize("formatter", ["chat-template", "oasst"])
def test_masks_by_hand(tokenizer, tmp_path, formatter):
    eos = tokenizer.eos_token
    if formatter == "chat-template":  # the fixture tokenizer's ChatML template, written out by hand
        texts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello<|im_end|>\n",
                 "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", "Ciao<|im_end|>\n"]
    else:
        texts = [f"<|prompter|>Hi{eos}<|assistant|>", f"Hello{eos}", f"<|prompter|>Bye{eos}<|assistant|>",
                 f"Ciao{eos}"]
    segs, full = segments(tokenizer, texts)
    n = [len(s) for s in segs]
    expected = {"all_assistant": [0] * n[0] + [1] * n[1] + [0] * n[2] + [1] * n[3],
                "last_assistant": [0] * (n[0] + n[1] + n[2]) + [1] * n[3],
                "all": [1] * sum(n)}
    # a TRL user's `messages` file goes through the messages reader unchanged
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    records = load_records(str(path), "sft")
    for loss_on, mask in expected.items():
        (f,), _ = tokenize_records(records, tokenizer, formatter=formatter, loss_on=loss_on)
        assert f["input_ids"] == full
        assert f["completion_mask"] == mask, loss_on
        assert f["prompt_length"] == n[0] + n[1] + n[2]  # the prompt before the final turn, whatever is trained


def test_default_is_every_assistant_turn(tokenizer):
    (f,), _ = tokenize_records([SFTRecord(CHAT[:3], [CHAT[3]])], tokenizer)
    (g,), _ = tokenize_records([SFTRecord(CHAT[:3], [CHAT[3]])], tokenizer, loss_on="all_assistant")
    assert f["completion_mask"] == g["completion_mask"] and sum(f["completion_mask"][:f["prompt_length"]]) > 0


def test_prompt_truncation_cuts_the_mask_too(tokenizer):
    (f,), _ = tokenize_records([SFTRecord(CHAT[:3], [CHAT[3]])], tokenizer)
    (g,), _ = tokenize_records([SFTRecord(CHAT[:3], [CHAT[3]])], tokenizer, max_prompt_length=5)
    assert g["prompt_length"] == 5
    assert g["completion_mask"] == f["completion_mask"][f["prompt_length"] - 5:]


def test_plain_text_all_trains_the_prompt(tokenizer):
    (f,), _ = tokenize_records([SFTRecord("2+2=", " 4")], tokenizer, loss_on="all")
    assert f["completion_mask"] == [1] * len(f["input_ids"])
    (g,), _ = tokenize_records([SFTRecord("2+2=", " 4")], tokenizer)  # no earlier turns: completion only
    assert sum(g["completion_mask"]) == len(g["input_ids"]) - g["prompt_length"]


def test_unknown_loss_on_names_the_key(tokenizer):
    with pytest.raises(DataError, match=r"data\.loss_on .*'every'.*all_assistant, last_assistant, all"):
        tokenize_records([SFTRecord("a", " b")], tokenizer, loss_on="every")


def test_template_that_rewrites_earlier_turns_is_an_error(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    # drops earlier assistant turns from the rendered history (as reasoning templates do with thoughts)
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'user' or loop.last %}<|im_start|>{{ m.role }}\n"
                         "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError, match=r"r7: the conversation through assistant turn 1 .*data\.loss_on=last_assistant"):
        tokenize_records([SFTRecord(CHAT[:3], [CHAT[3]], id="r7")], tok)


def _oa_threads(tree: dict) -> list[list[dict]]:
    """Open-Assistant's SFT threads (model_training/custom_datasets/oasst_dataset.py, load_oasst_export, lang
    "en"), re-implemented here from its rules: the tree must be ready_for_export with a positively reviewed
    English root; every leaf thread with no deleted or synthetic message; a prompter leaf only when it is the
    FIRST reply of its parent, and then cut off."""
    root = tree["prompt"]
    if tree.get("tree_state") != "ready_for_export" or not root.get("review_result") or root.get("lang") != "en":
        return []
    out = []

    def visit(node, parents):
        thread = parents + [node]
        replies = node.get("replies") or []
        if (len(thread) > 1 and not replies
                and (node["role"] == "assistant" or thread[-2]["replies"][0] is node)
                and not any(m.get("deleted") or m.get("synthetic") for m in thread)):
            out.append(thread[:-1] if node["role"] == "prompter" else thread)
        for r in replies:
            visit(r, thread)

    visit(root, [])
    return out


@pytest.mark.skipif(not OASST.exists(), reason="shared OASST sample not present")
def test_oasst_sample_trains_what_open_assistant_trains():
    trees = [json.loads(line) for line in OASST.read_text().splitlines()]
    oa = {m["message_id"] for t in trees for th in _oa_threads(t) for m in th if m["role"] == "assistant"}
    records = load_records(str(OASST), "sft")
    role = {}
    for t in trees:
        stack = [t["prompt"]]
        while stack:
            m = stack.pop()
            role[m["message_id"]] = m["role"]
            stack += m.get("replies") or []
    every = {i for r in records for i in r.meta["thread"] if role[i] == "assistant"}  # loss_on=all_assistant
    last = {r.meta["message_id"] for r in records}  # loss_on=last_assistant (the old default)
    assert (len(oa), len(every), len(last)) == (247, 247, 202)
    assert every == oa


@pytest.mark.parametrize("packed", [False, True])
def test_reft_positions_stay_in_the_prompt_before_the_final_turn(tiny_dir, packed):
    # training earlier assistant turns must not move ReFT's "f1+l1" positions: they are the same as with
    # last-turn-only masks (the prompt is everything before the final assistant turn)
    from alignkit.data import PackedSFTCollator, SFTCollator
    from alignkit.interventions import ReftConfig
    from alignkit.adapters import AdapterConfig, ReftSettings, apply_adapter
    from alignkit.models.loading import load_model, load_tokenizer
    from alignkit.trainers.logps import batch_locations

    path = tiny_dir("llama")
    tok = load_tokenizer(path)
    reft = ReftConfig.uniform([0], "loreft", low_rank_dimension=2)
    model = apply_adapter(load_model(path), AdapterConfig(kind="reft", reft=ReftSettings(config=reft.to_dict(),
                                                                                         positions="f1+l1")))
    recs = [SFTRecord(CHAT[:3], [CHAT[3]]), SFTRecord(CHAT[:1], [CHAT[1]])]
    collate = PackedSFTCollator() if packed else SFTCollator(tok.pad_token_id)
    every, _ = tokenize_records(recs, tok)
    last, _ = tokenize_records(recs, tok, loss_on="last_assistant")
    plain = collate(last)
    plain.pop("prompt_length")  # the old way: the prompt ends at the first trained token
    got, want = batch_locations(model, collate(every)), batch_locations(model, plain)
    assert torch.equal(got, want)
    p = every[0]["prompt_length"]  # l1 of the multi-turn row is the prompt's last token (the generation prompt)
    assert (p - 1) in got[0].flatten().tolist() or packed


def test_a_prompt_column_is_context_as_in_trl(tokenizer, tmp_path):
    """TRL's prompt-completion rows: SFTTrainer trains the completion only (completion_only_loss), never an assistant
    turn inside the prompt. Read from such a row, alignkit's default (all_assistant) trained the prompt's 'Hello' too,
    so the same file trained other tokens than in TRL. Now a row with a prompt column keeps its prompt as context by
    default; the same conversation as `messages` still trains every assistant turn, and loss_on=all trains all."""
    texts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello<|im_end|>\n",
             "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", "Ciao<|im_end|>\n"]  # ChatML, by hand
    segs, full = segments(tokenizer, texts)
    n = [len(s) for s in segs]
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": CHAT[:3], "completion": [CHAT[3]]}) + "\n")
    (f,), _ = tokenize_records(load_records(str(path), "sft"), tokenizer)
    assert f["input_ids"] == full and f["completion_mask"] == [0] * (n[0] + n[1] + n[2]) + [1] * n[3]
    (g,), _ = tokenize_records(load_records(str(path), "sft"), tokenizer, loss_on="all")
    assert g["completion_mask"] == [1] * sum(n)
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    (h,), _ = tokenize_records(load_records(str(path), "sft"), tokenizer)
    assert h["completion_mask"] == [0] * n[0] + [1] * n[1] + [0] * n[2] + [1] * n[3]


def test_per_turn_weights_leave_weight_0_assistant_turns_untrained(tokenizer, tmp_path, caplog):
    """ShareGPT's / axolotl's per-turn `weight` (1 train the turn, 0 do not) was dropped with the "message key(s)
    ['weight'] dropped" warning, and every assistant turn trained, those the data said not to train included. Now a
    weight-0 assistant turn is context; a conversation whose last assistant turn has weight 0 ends at its last trained
    turn. Masks derived by hand from the fixture's ChatML template."""
    import logging

    texts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello<|im_end|>\n",
             "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", "Ciao<|im_end|>\n"]
    segs, full = segments(tokenizer, texts)
    n = [len(s) for s in segs]
    speakers = {"user": "human", "assistant": "gpt"}

    def share(weights):  # CHAT in ShareGPT's form, SlimOrca-style weights (0.0 / 1.0 floats, null)
        return {"conversations": [{"from": speakers[m["role"]], "value": m["content"], "weight": w}
                                  for m, w in zip(CHAT, weights)]}

    rows = [share([0.0, 0.0, 0.0, 1.0]), share([None, 1.0, None, 0.0]), share([0.0, 1.0, 0.0, 1.0])]
    path = tmp_path / "share.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        records = load_records(str(path), "sft")
    assert "message key" not in caplog.text  # the weights are read, not dropped
    feats, _ = tokenize_records(records, tokenizer)
    assert [f["input_ids"] for f in feats] == [full, segs[0] + segs[1], full]
    assert feats[0]["completion_mask"] == [0] * (n[0] + n[1] + n[2]) + [1] * n[3]  # "Hello" has weight 0
    assert feats[1]["completion_mask"] == [0] * n[0] + [1] * n[1]  # "Ciao" has weight 0: the row ends at "Hello"
    assert feats[2]["completion_mask"] == [0] * n[0] + [1] * n[1] + [0] * n[2] + [1] * n[3]  # both trained
    (f,), _ = tokenize_records(records[:1], tokenizer, loss_on="last_assistant")
    assert f["completion_mask"] == feats[0]["completion_mask"]
    with pytest.raises(DataError, match=r"share\.jsonl:1: the conversation gives assistant turn\(s\) \[1\] 'weight' 0, "
                                        r"and data\.loss_on=all .* set data\.loss_on=all_assistant"):
        tokenize_records(records[:1], tokenizer, loss_on="all")


def test_a_weighted_conversation_read_as_prompts_is_the_conversation_before_its_final_turn(tmp_path):
    """Read as prompts (online commands, sample, generate), a conversation whose last assistant turn has weight 0 was
    cut at its last trained turn, as SFT reads it: the prompt lost the turns after it, the last question included
    ("Bye"), and the policy answered "Hi" instead, without a word. A prompt trains no reply, so now every row's
    prompt is the conversation before its final assistant turn, as for rows without weights; SFT reading unchanged."""
    from alignkit.cli.data import load_data
    from alignkit.settings import DataSettings

    rows = [{"messages": [{**m, "weight": w} for m, w in zip(CHAT, ws)]}
            for ws in ([None, 1, None, 0], [0, 0, 0, 1], [None, 0, None, 0])]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"messages": CHAT}]))
    prompts = load_records(str(path), "prompt")
    assert [p.prompt for p in prompts] == [CHAT[:3]] * 4 and [p.id for p in prompts] == [f"{path}:{i}" for i in (1, 2, 3, 4)]
    assert [r.prompt for r in load_records(str(path), "sft", on_invalid="skip")] == [CHAT[:1], CHAT[:3], CHAT[:3]]
    train, _ = load_data(DataSettings(path=str(path)), "prompt")  # what the online commands read
    assert [p.prompt for p in train] == [CHAT[:3]] * 4


@pytest.mark.parametrize("weights, message", [
    ([0, 0.5, 0, 1], r"d\.jsonl:1: messages\[1\] has 'weight' 0\.5; a turn's weight is 0 \(not trained\) or 1"),
    ([0, 1, "1", 1], r"d\.jsonl:1: messages\[2\] has 'weight' '1'"),
    ([1, 1, 0, 1], r"d\.jsonl:1: messages\[0\] is a 'user' turn with 'weight' 1, and alignkit trains assistant turns"),
    ([0, 0, 0, 0], r"d\.jsonl:1: every assistant turn of 'messages' has 'weight' 0, so nothing would be trained"),
])
def test_a_per_turn_weight_alignkit_cannot_honour_is_refused_at_its_row(tmp_path, weights, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{**m, "weight": w} for m, w in zip(CHAT, weights)]}) + "\n")
    with pytest.raises(DataError, match=message):
        load_records(str(path), "sft")
