"""The HS nomenclature: descriptions of codes along the hierarchy, and roll-up of probabilities to it.

Codes are the project's 10-digit strings ("0808100000"). The HS itself stops at 6 digits (subheading); the last
four digits are national, so a code is described by its subheading, heading (4) and chapter (2). A catch-all
class "XX99999999" (the `dataset.other_code` of a top-N variant) stands for every other code of chapter XX.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CATCH_ALL_SUFFIX = "99999999"
NOMENCLATURE = Path(__file__).resolve().parent / "nomenclature" / "harmonized-system.csv"  # package data


@dataclass(frozen=True)
class CodeInfo:
    hs_code: str
    description: str        # the subheading's official description, or "other codes of chapter XX"
    heading: str | None     # the heading's description; None for a catch-all class (it spans headings)
    chapter: str | None     # the chapter's description; None only for a chapter outside the nomenclature


@lru_cache(maxsize=1)
def nomenclature() -> dict[str, str]:
    """code (2, 4 or 6 digits) -> official English description, read once from the shipped CSV."""
    with NOMENCLATURE.open(encoding="utf-8-sig", newline="") as fh:
        return {row["hscode"]: row["description"] for row in csv.DictReader(fh) if row["hscode"].isdigit()}


def is_catch_all(code: str) -> bool:
    return len(code) == 10 and code.endswith(CATCH_ALL_SUFFIX)


@lru_cache(maxsize=4096)
def describe(code: str) -> CodeInfo:
    names = nomenclature()
    chapter = names.get(code[:2])
    if is_catch_all(code):
        return CodeInfo(code, f"other codes of chapter {code[:2]}", None, chapter)
    heading = names.get(code[:4])
    # A national code whose subheading is missing from HS 2022 (a retired or mistyped code) still gets a line.
    description = names.get(code[:6]) or f"subheading {code[:6]} (not in the HS 2022 nomenclature)"
    return CodeInfo(code, description, heading, chapter)


def display(code: str) -> str:
    """'0808100000' -> '0808.10-0000', the way declarations and rulings write it."""
    return f"{code[:4]}.{code[4:6]}-{code[6:]}" if len(code) == 10 else code


def rollup(probs: dict[str, float], digits: int) -> dict[str, float]:
    """Probabilities summed per code prefix (2 = chapter, 4 = heading), highest first.

    A catch-all class belongs to its chapter but to no heading, so it counts in the chapter sums only: chapters
    add up to the total, headings to the total less the catch-all classes.
    """
    out: dict[str, float] = {}
    for code, p in probs.items():
        if digits > 2 and is_catch_all(code):
            continue
        out[code[:digits]] = out.get(code[:digits], 0.0) + p
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def chapters(probs: dict[str, float]) -> dict[str, float]:
    return rollup(probs, 2)


def headings(probs: dict[str, float]) -> dict[str, float]:
    return rollup(probs, 4)
