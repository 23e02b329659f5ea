"""Shared test helpers (imported by test modules; conftest.py holds only fixtures and setup)."""
from pathlib import Path

from epi.models.shapes import small_llama  # the one small-Llama builder (the distributed runs use it too)

__all__ = ["ROOT", "SHARED_REAL", "small_llama"]

ROOT = Path(__file__).resolve().parents[1]
SHARED_REAL = ROOT.parent / "shared" / "data" / "real"
