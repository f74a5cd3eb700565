"""Data augmentation: new SFT / preference records from existing data (`alignkit augment`).

- `strategies.py`: the registry (`STRATEGIES`): code_bugs, paraphrase, instructions, summarize, entities
  (`llm_strategies.py`: the four that prompt a model); `sources.py`: what they share (`Source`, `Candidate`,
  `Context`: `Context.map` sends a strategy's independent requests concurrently (`llm.concurrency`), results in
  input order; reading a row's column; option checks)
- `code_bugs.py`: deterministic AST mutations of Python snippets
- `llm.py`: the model a strategy prompts: an OpenAI-compatible endpoint (`OpenAIChat`: retries, rate limit)
  or a local model (`LocalChat`), behind an on-disk cache (`Cached`)
- `pipeline.py`: sources -> strategy -> filters (format, length, de-duplication) -> JSONL with provenance
"""

from alignkit.augment.code_bugs import MUTATIONS, Mutant, mutants, split_functions
from alignkit.augment.llm import Cached, LLMError, LocalChat, OpenAIChat, RateLimiter
from alignkit.augment.pipeline import AugmentResult, Filters, augment, read_sources
from alignkit.augment.strategies import STRATEGIES, Candidate, Context, Source, Strategy, register_strategy

__all__ = ["AugmentResult", "Cached", "Candidate", "Context", "Filters", "LLMError", "LocalChat", "MUTATIONS", "Mutant",
           "OpenAIChat", "RateLimiter", "STRATEGIES", "Source", "Strategy", "augment", "mutants", "read_sources",
           "register_strategy", "split_functions"]
