"""Durable storage of the transparency log: a small protocol, a reference backend, and SQLite."""

from valise.store.base import MAX_ENTRY_SIZE, LogBackend, LogStorage
from valise.store.memory import MemoryLog

__all__ = ["MAX_ENTRY_SIZE", "LogBackend", "LogStorage", "MemoryLog"]
