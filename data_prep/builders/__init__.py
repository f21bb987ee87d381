"""Builders of the fine-tuning corpora (TUAB, TUEV, EEGMAT) as ArrayRecord shards, split as the original splits them.

Each reads a local copy of its corpus and writes `OUT/<split>/` (shards + manifest.json) and `OUT/report.json`.
"""
from data_prep.builders.eegmat import build_eegmat
from data_prep.builders.tuab import build_tuab
from data_prep.builders.tuev import build_tuev

__all__ = ["build_eegmat", "build_tuab", "build_tuev"]
