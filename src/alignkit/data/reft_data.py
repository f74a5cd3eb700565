"""Supervised data for ReFT: (prompt, response) pairs -> tokens, labels and intervention locations.

Each record is tokenized ONCE as the full sequence `prompt + response` (+ EOS); the prompt/response
boundary is found in token space from the fast tokenizer's offsets (the first token that ends past the
prompt's last character starts the response). Tokenizing the prompt alone and counting its tokens is
what goes wrong in pyreft: BPE may merge across the boundary, and the "last prompt token" is then off by
one. A token that straddles the boundary (starts inside the prompt, ends inside the response) makes the
record an error naming its index: move the shared whitespace to the start of the response.
Slow tokenizers (no offsets) fall back to a prefix check: the prompt's own tokens must be a prefix of
the full sequence's tokens.

The collator pads (left or right), sets labels to -100 on prompt and pad tokens, and builds
`intervention_locations` (B, K, P) from each row's prompt span with `positions.locations_from_spans`,
so positions are absolute indices into the padded tensor. The batches are pyreft's (input_ids,
attention_mask, labels, intervention_locations); `alignkit.interventions.ReftTrainer` (the pyreft-style name
of `alignkit.trainers.SFTTrainer`) reads them as SFT batches (completion_mask = labels != -100) and records
the collator's `positions` on the model, so the adapter it saves carries them.

`make_last_position_supervised_data_module` / `make_multiple_position_supervised_data_module` mirror
pyreft's helpers and return {"train_dataset", "eval_dataset", "data_collator"}; the classification
variant takes (text, class id) pairs, where the whole text is the prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from alignkit.data.chat import added_suffix, without_added_suffix
from alignkit.data.positions import Positions, locations_from_mask, locations_from_spans

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def format_prompt_response(tokenizer: Any, prompt: str, response: str, *, use_chat_template: bool = False,
                           system: str | None = None) -> tuple[str, str]:
    """(prompt_text, full_text). With a chat template: a user turn (+ optional system turn) and the
    generation prompt, then the assistant turn; the prompt text must be a string prefix of the full text."""
    if not use_chat_template:
        return prompt, prompt + response
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("use_chat_template=True but the tokenizer has no chat_template; set one or pass "
                         "use_chat_template=False")
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template renders the prompt with a generation prompt that is not a prefix of "
                         "the rendered conversation; use a template whose add_generation_prompt opens the "
                         "assistant turn exactly as the conversation does")
    return prompt_text, full_text


def encode_prompt_response(tokenizer: Any, prompt: str, response: str, *, index: int = 0,
                           use_chat_template: bool = False, system: str | None = None, add_eos: bool = True,
                           max_length: int | None = None) -> tuple[list[int], int]:
    """Tokenize `prompt + response` once. Returns (input_ids, prompt_length); EOS appended if `add_eos`, and only
    then (the EOS a tokenizer appends to every text itself is left out first: `without_added_suffix`, as
    `tokenize_records` does).

    `index` names the record in errors. Truncation (max_length) cuts the response end, never the prompt.
    """
    if not response:
        raise ValueError(f"record {index}: empty response; a supervised ReFT record needs a response to learn")
    prompt_text, full_text = format_prompt_response(tokenizer, prompt, response, use_chat_template=use_chat_template,
                                                    system=system)
    add_special = not use_chat_template  # a chat template already writes its special tokens
    cut = len(prompt_text)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full_text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids = without_added_suffix(list(enc["input_ids"]), tokenizer) if add_special else list(enc["input_ids"])
        offsets = enc["offset_mapping"][:len(ids)]
        # first token that ends past the prompt's last character starts the response
        prompt_length = next((i for i, (_, end) in enumerate(offsets) if end > cut), len(ids))
        if prompt_length < len(ids) and offsets[prompt_length][0] < cut:
            tok = tokenizer.convert_ids_to_tokens(ids[prompt_length])
            raise ValueError(f"record {index}: token {prompt_length} ({tok!r}, chars {tuple(offsets[prompt_length])}) "
                             f"straddles the prompt/response boundary at char {cut}; the prompt tokens are not a "
                             f"prefix of the full tokens. Move the whitespace between them to the start of the "
                             f"response (e.g. prompt 'Q: hi\\nA:' + response ' Paris')")
    else:
        ids = list(tokenizer(full_text, add_special_tokens=add_special)["input_ids"])
        p_ids = list(tokenizer(prompt_text, add_special_tokens=add_special)["input_ids"])
        # the prompt without what is appended to every text (it follows the response): ANY suffix there, so that the
        #   prompt is a prefix of the full sequence; the full sequence without an appended EOS alone (add_eos adds
        #   it back), keeping any other suffix ([CLS] $A [SEP]'s [SEP]) where the tokenizer puts it. The two rules
        #   agree when the suffix is EOS alone (Llama's add_eos_token) and otherwise differ only after the response,
        #   so the prompt length, the intervention positions and the ids equal the offsets path's (tests/data/
        #   test_tokenize_suffix.py: add_eos_token and [SEP], both paths)
        if add_special:
            ids = without_added_suffix(ids, tokenizer)
            p_ids = without_added_suffix(p_ids, tokenizer, added_suffix(tokenizer))
        if ids[:len(p_ids)] != p_ids:
            raise ValueError(f"record {index}: the prompt's tokens are not a prefix of the full sequence's tokens "
                             f"(a token merges across the boundary); move the whitespace between prompt and "
                             f"response to the start of the response")
        prompt_length = len(p_ids)
    if prompt_length == len(ids):
        raise ValueError(f"record {index}: the response produced no tokens after the prompt")
    eos = tokenizer.eos_token_id
    if add_eos:
        if eos is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token; set tokenizer.eos_token")
        if ids[-1] != eos:
            ids.append(eos)
    if max_length is not None and len(ids) > max_length:
        if prompt_length >= max_length:
            raise ValueError(f"record {index}: the prompt alone is {prompt_length} tokens, max_length is "
                             f"{max_length}; raise max_length or shorten the prompt")
        ids = ids[:max_length]
    return ids, prompt_length


class SupervisedReftDataset(Dataset):
    """(prompt, response) pairs, tokenized up front. Items: input_ids (T,), labels (T,), prompt_length."""

    def __init__(self, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *,
                 use_chat_template: bool = False, system: str | None = None, add_eos: bool = True,
                 max_length: int | None = None) -> None:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; they must pair up")
        self.items: list[dict[str, Any]] = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids, n = encode_prompt_response(tokenizer, p, r, index=i, use_chat_template=use_chat_template,
                                            system=system, add_eos=add_eos, max_length=max_length)
            ids_t = torch.tensor(ids, dtype=torch.long)  # (T,)
            labels = ids_t.clone()
            labels[:n] = IGNORE_INDEX
            self.items.append({"input_ids": ids_t, "labels": labels, "prompt_length": n})
        logger.info("tokenized %d ReFT records (max length %d)", len(self.items),
                    max((len(x["input_ids"]) for x in self.items), default=0))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class TruncationAsTokenizer:
    """`cut(text, ids, max_length)`: what `tokenizer(text, truncation=True, max_length=max_length)["input_ids"]`
    gives, from `ids`, the text's whole encoding `tokenizer(text)["input_ids"]`, without encoding it again.

    A tokenizer's truncation cuts the text's own tokens to `max_length` less the special tokens it adds, on its
    `truncation_side`, then adds those tokens around them (`tokenizers`' post-processing; the slow tokenizers'
    `truncate_sequences` then `build_inputs_with_special_tokens`). Which ids are added before and after the text's
    own is read once, from a probe text encoded with and without them; where that cannot be read (the probe's own
    ids are not one run inside its full encoding) or no text token would be left, the tokenizer cuts the text
    itself (one more call)."""

    PROBE = "a b"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._ends: tuple[list[int], list[int]] | None | bool = False  # (head, tail), None unreadable, False unread

    def ends(self) -> tuple[list[int], list[int]] | None:
        """(ids added before the text's own, ids added after), or None when the probe cannot say."""
        if self._ends is False:
            full = list(self.tokenizer(self.PROBE)["input_ids"])
            own = list(self.tokenizer(self.PROBE, add_special_tokens=False)["input_ids"])
            at = next((k for k in range(len(full) - len(own) + 1) if own and full[k:k + len(own)] == own), None)
            self._ends = None if at is None else (full[:at], full[at + len(own):])
        return self._ends

    def __call__(self, text: str, ids: list[int], max_length: int) -> list[int]:
        head, tail = self.ends() or (None, None)
        room = max_length - len(head) - len(tail) if head is not None else 0
        if room < 1 or ids[:len(head)] != head or ids[len(ids) - len(tail):] != tail:
            return list(self.tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
        own = ids[len(head):len(ids) - len(tail)]
        kept = own[len(own) - room:] if getattr(self.tokenizer, "truncation_side", "right") == "left" else own[:room]
        return head + kept + tail


class ClassificationReftDataset(Dataset):
    """(text, class id) pairs for a sequence classifier: the whole text is the prompt."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], labels: Sequence[int], *,
                 max_length: int | None = None) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels; they must pair up")
        self.items = []
        self.truncated: list[int] = []  # records cut to max_length (on the tokenizer's truncation_side)
        cut = TruncationAsTokenizer(tokenizer)
        for i, (t, y) in enumerate(zip(texts, labels)):
            ids = list(tokenizer(t)["input_ids"])  # once, whole: cut below as the tokenizer's truncation cuts
            if max_length is not None and len(ids) > max_length:
                ids = cut(t, ids, max_length)
                self.truncated.append(i)
            if not ids:
                raise ValueError(f"record {i}: text produced no tokens")
            self.items.append({"input_ids": torch.tensor(ids, dtype=torch.long), "labels": int(y),
                               "prompt_length": len(ids)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


@dataclass
class ReftDataCollator:
    """Pads a list of items and adds `intervention_locations` (B, K, P), -1 = none.

    Item labels that are sequences are padded with -100; scalar labels (class ids) are stacked.
    """

    pad_token_id: int
    num_interventions: int
    positions: str | Positions = "l1"
    share_weights: bool = True
    padding_side: str = "right"

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        self.positions = Positions.parse(self.positions)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        n_real = torch.tensor([len(x) for x in ids])  # (B,)
        prompt_length = torch.tensor([int(f["prompt_length"]) for f in features])  # (B,)
        pad = lambda xs, v: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True, padding_value=v,  # noqa: E731
                                                            padding_side=self.padding_side)
        input_ids = pad(ids, self.pad_token_id)  # (B, T)
        T = input_ids.shape[1]
        attention_mask = pad([torch.ones(len(x), dtype=torch.long) for x in ids], 0)  # (B, T)
        start = T - n_real if self.padding_side == "left" else torch.zeros_like(n_real)  # (B,)
        locations = locations_from_spans(self.positions, start, prompt_length, self.num_interventions,
                                         self.share_weights)  # (B, K, P)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "intervention_locations": locations}
        if "labels" in features[0]:
            if torch.as_tensor(features[0]["labels"]).dim() == 0:
                batch["labels"] = torch.tensor([int(f["labels"]) for f in features])  # (B,)
            else:
                batch["labels"] = pad([torch.as_tensor(f["labels"], dtype=torch.long) for f in features],
                                      IGNORE_INDEX)  # (B, T)
        return batch


def _module(dataset: Dataset, tokenizer: Any, positions: str | Positions, num_interventions: int,
            share_weights: bool, padding_side: str) -> dict[str, Any]:
    collator = ReftDataCollator(pad_token_id=tokenizer.pad_token_id, num_interventions=num_interventions,
                                positions=positions, share_weights=share_weights, padding_side=padding_side)
    return {"train_dataset": dataset, "eval_dataset": None, "data_collator": collator}


def make_last_position_supervised_data_module(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *,
                                              num_interventions: int = 1, padding_side: str = "right",
                                              use_chat_template: bool = False, add_eos: bool = True,
                                              max_length: int | None = None) -> dict[str, Any]:
    """Every intervention on the last prompt token ("l1"), as in pyreft's helper of the same name."""
    ds = SupervisedReftDataset(tokenizer, prompts, responses, use_chat_template=use_chat_template, add_eos=add_eos,
                               max_length=max_length)
    return _module(ds, tokenizer, "l1", num_interventions, True, padding_side)


def make_multiple_position_supervised_data_module(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str],
                                                  *, positions: str | Positions = "f1+l1", num_interventions: int = 1,
                                                  share_weights: bool = True, padding_side: str = "right",
                                                  use_chat_template: bool = False, add_eos: bool = True,
                                                  max_length: int | None = None) -> dict[str, Any]:
    """Interventions on `positions` ("f3+l3", ...) of each prompt; layout in `alignkit.data.positions`."""
    ds = SupervisedReftDataset(tokenizer, prompts, responses, use_chat_template=use_chat_template, add_eos=add_eos,
                               max_length=max_length)
    return _module(ds, tokenizer, positions, num_interventions, share_weights, padding_side)


def make_classification_data_module(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], *,
                                    positions: str | Positions = "l1", num_interventions: int = 1,
                                    share_weights: bool = True, padding_side: str = "right",
                                    max_length: int | None = None) -> dict[str, Any]:
    """(text, class id) pairs for a ReFT on a sequence classifier; positions taken from the text."""
    ds = ClassificationReftDataset(tokenizer, texts, labels, max_length=max_length)
    warn_truncated_texts(positions, ds.truncated, len(ds), getattr(tokenizer, "truncation_side", "right"), max_length)
    return _module(ds, tokenizer, positions, num_interventions, share_weights, padding_side)


def warn_truncated_texts(positions: str | Positions, truncated: Sequence[int], total: int, side: str,
                         max_length: int | None) -> None:
    """One warning when texts cut to `max_length` on `side` (the tokenizer's truncation_side) lose the tokens that
    `positions` name: their positions are counted on the tokens kept (as pyreft does), so 'left' makes the first
    positions land mid-text and 'right' makes the last positions land before the text's real end."""
    pos = Positions.parse(positions)
    group = "first" if side == "left" else "last"
    if not truncated or not (pos.first_n if side == "left" else pos.last_n):
        return
    logger.warning("%d of %d text(s) are longer than max_length=%s tokens (e.g. record %d) and lose their %s tokens "
                   "(tokenizer.truncation_side=%r), so ReFT positions %r edit their %s KEPT tokens, not the text's %s "
                   "ones; raise max_length to keep whole texts", len(truncated), total, max_length, truncated[0],
                   group, side, str(pos), group, group)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], *, positions: str | Positions = "l1",
                   num_interventions: int = 1, share_weights: bool = True, use_chat_template: bool = False,
                   system: str | None = None) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for generation: input_ids, attention_mask (B, T), intervention_locations (B, K, P).

    Prompts are rendered exactly as the training prompts are (same chat template use), so the trained
    positions line up; without what a tokenizer appends to every text itself (`added_suffix`: EOS, a BERT-style
    [SEP]), which in training follows the response: the prompt is training's `ids[:prompt_length]`.
    """
    texts = [format_prompt_response(tokenizer, p, "x", use_chat_template=use_chat_template, system=system)[0]
             for p in prompts]
    special = not use_chat_template
    ids = [list(tokenizer(t, add_special_tokens=special)["input_ids"]) for t in texts]
    suffix = added_suffix(tokenizer) if special else ()
    ids = [torch.tensor(without_added_suffix(x, tokenizer, suffix) if special else x, dtype=torch.long) for x in ids]
    input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=tokenizer.pad_token_id,
                                                padding_side="left")  # (B, T)
    attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.long) for x in ids],
                                                     batch_first=True, padding_value=0, padding_side="left")
    locations = locations_from_mask(positions, attention_mask, num_interventions, share_weights)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "intervention_locations": locations}


__all__ = ["IGNORE_INDEX", "format_prompt_response", "encode_prompt_response", "SupervisedReftDataset",
           "ClassificationReftDataset", "ReftDataCollator", "TruncationAsTokenizer",
           "make_last_position_supervised_data_module", "make_multiple_position_supervised_data_module",
           "make_classification_data_module", "encode_prompts", "warn_truncated_texts"]
