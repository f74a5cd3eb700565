"""A scripted judge for tests: an nn.Module whose `generate` answers with known text.

It honestly stands in for a judge LM whose output format we know: it decodes each (unpadded) prompt row,
asks `script(text) -> reply`, and returns the prompt ids followed by the reply's token ids and EOS, right-
padded with the pad token, exactly the shape Hugging Face `generate` returns for decoder-only models.
"""

from __future__ import annotations

from typing import Callable

import torch

from alignkit.data.collators import pad


class ScriptedJudge(torch.nn.Module):
    def __init__(self, tokenizer, script: Callable[[str], str], cut: bool = False):
        super().__init__()
        self.tok, self.script, self.cut = tokenizer, script, cut  # cut: replies end at max_new_tokens, as generate's
        self.register_buffer("anchor", torch.zeros(1))  # gives the module a device
        self.seen: list[str] = []

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = self.tok.decode(ids[mask.bool()].tolist())
            self.seen.append(text)
            row = self.tok(self.script(text), add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            limit = kwargs.get("max_new_tokens", getattr(kwargs.get("generation_config"), "max_new_tokens", None))
            rows.append(row[:limit] if self.cut and limit is not None else row)
        new = pad(rows, self.tok.pad_token_id, side="right")  # (B, R)
        return torch.cat([input_ids, new], dim=1)
