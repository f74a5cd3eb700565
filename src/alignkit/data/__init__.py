"""Data for every objective: records, readers, chat formatting, tokenization, collators, splits.

    records = load_records("trees.jsonl", kind="ranked")          # reader picked from the columns
    features, stats = tokenize_records(records, tokenizer, max_length=512, max_prompt_length=256)
    batch = RankedCollator(tokenizer.pad_token_id)(features[:8])

Importing this package registers every reader (TRL columns, Open-Assistant trees, HH-RLHF text).
"""

from __future__ import annotations

from alignkit.data import hh, oasst, oasst_messages  # noqa: F401  (register their readers)
from alignkit.data.chat import FORMATTERS, Formatted, format_record, register_formatter
from alignkit.data.collators import (IGNORE_INDEX, PackedSFTCollator, PreferenceCollator, PromptCollator,
                                     RankedCollator, SFTCollator, pad)
from alignkit.data.hh import read_hh
from alignkit.data.oasst import read_oasst
from alignkit.data.oasst_messages import read_oasst_messages
from alignkit.data.readers import READERS, load_records, register_reader
from alignkit.data.records import (KINDS, RECORD_CLASSES, DataError, Message, PreferenceRecord, PromptRecord,
                                   RankedRecord, Record, SFTRecord, UnpairedRecord, convert, preference_to_sft,
                                   preference_to_unpaired, ranked_to_pairs, to_conversational, to_prompt)
from alignkit.data.splits import parse_fractions, split_indices, split_records
from alignkit.data.tokenize import TokenizeConfig, TokenizeStats, tokenize_record, tokenize_records

__all__ = [
    "read_oasst_messages",
    "DataError", "Message", "Record", "KINDS", "RECORD_CLASSES",
    "SFTRecord", "PreferenceRecord", "RankedRecord", "UnpairedRecord", "PromptRecord",
    "convert", "ranked_to_pairs", "preference_to_sft", "preference_to_unpaired", "to_prompt", "to_conversational",
    "READERS", "register_reader", "load_records", "read_oasst", "read_hh",
    "FORMATTERS", "Formatted", "format_record", "register_formatter",
    "TokenizeConfig", "TokenizeStats", "tokenize_record", "tokenize_records",
    "IGNORE_INDEX", "pad", "SFTCollator", "PreferenceCollator", "RankedCollator", "PackedSFTCollator",
    "PromptCollator",
    "parse_fractions", "split_indices", "split_records",
]
