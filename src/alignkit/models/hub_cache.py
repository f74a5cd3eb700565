"""Where a Hub model named by its id lies in the local Hugging Face cache (no network): the snapshot folders
`huggingface_hub` keeps per fetched revision. Read by `alignkit.adapters.base.sharded_fingerprint` for a base whose
weights are sharded in this process (DeepSpeed ZeRO-3 / FSDP), whose fingerprint comes from its files; compat rows
A17 / A18 pin the cache layout and what transformers does not record."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import try_to_load_from_cache


def hub_cache_snapshot(name: str) -> str | None:
    """The folder of Hub model `name`'s "main" snapshot in the local Hugging Face cache (HF_HUB_CACHE, the one
    `from_pretrained(name)` reads from; `huggingface_hub.try_to_load_from_cache`: no network), or None: not a Hub
    name, not cached, or cached at several revisions (`cached_snapshots`). transformers records no revision in the
    model it loads (`from_pretrained(name, revision=r)` leaves config.name_or_path = name), so with several snapshots
    main's may not hold the loaded weights: its fingerprint was main's, and an adapter trained on revision r was
    refused on r (or one trained on main accepted on r). tests/compat pins the cache layout and the missing record."""
    snapshots = cached_snapshots(name)
    return str(snapshots[0]) if len(snapshots) == 1 else None


def cached_snapshots(name: str) -> list[Path]:
    """The `snapshots/<commit>/` folders of Hub model `name` in the local Hugging Face cache, main's first (one per
    revision fetched); [] when `name` is not a Hub name or is not cached."""
    if not name or name.startswith((".", "/")) or name.count("/") > 1:
        return []
    try:
        got = try_to_load_from_cache(name, "config.json")
    except ValueError:  # HFValidationError: not a repo id
        return []
    if not isinstance(got, str):
        return []
    main = Path(got).parent
    return [main] + sorted(p for p in main.parent.iterdir() if p.is_dir() and p != main)


__all__ = ["cached_snapshots", "hub_cache_snapshot"]
