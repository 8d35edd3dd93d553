"""Serving: many adapters over one base model, each request at its own adapter and rank, in one batch."""

from hybrid_lora.serve.bank import AdapterBank

__all__ = ["AdapterBank"]
