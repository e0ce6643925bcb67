"""The refresh's periods: the evaluation window (the newest complete year or quarter of the store, or one named),
the period before it (the challenger's validation), and the store as it stood at the window's end.

A period is complete once it has ended (before today): a crawl in March finds this year's first rulings, but the
newest complete year is still last year, and this year's rulings wait for a later window (they are left out of the
challenger's data entirely, not tested on: `store_until`).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hsflow.data.store import RawStore, StoreError

WINDOW_HELP = ("refresh.window: year or quarter (the newest complete one in the store), a year (2019), a quarter "
               "(2019-Q4), or a start date (2019-07-01: from it to the newest ruling)")


@dataclass(frozen=True)
class Window:
    label: str        # "2019", "2019-Q4", "since 2019-07-01"
    start: str        # YYYY-MM-DD, first day in the window
    end: str          # YYYY-MM-DD, first day after it
    prev_start: str   # the previous period (validation) is [prev_start, start)
    prev_label: str

    def holds(self, date: str) -> bool:
        return self.start <= date < self.end

    @property
    def last(self) -> str:
        """The window's last day (YYYY-MM-DD)."""
        return (dt.date.fromisoformat(self.end) - dt.timedelta(days=1)).isoformat()


def _quarter(year: int, q: int) -> tuple[dt.date, dt.date]:
    start = dt.date(year, 3 * q - 2, 1)
    return start, (dt.date(year + 1, 1, 1) if q == 4 else dt.date(year, 3 * q + 1, 1))


def _year_window(year: int) -> Window:
    return Window(str(year), f"{year}-01-01", f"{year + 1}-01-01", f"{year - 1}-01-01", str(year - 1))


def _quarter_window(year: int, q: int) -> Window:
    start, end = _quarter(year, q)
    py, pq = (year, q - 1) if q > 1 else (year - 1, 4)
    return Window(f"{year}-Q{q}", start.isoformat(), end.isoformat(), _quarter(py, pq)[0].isoformat(),
                  f"{py}-Q{pq}")


def window(spec: str, dates: list[str], today: dt.date | None = None) -> Window:
    """The window `spec` names, over the store's ruling dates (YYYY-MM-DD). ValueError: one line."""
    spec, today = str(spec).strip(), today or dt.date.today()
    if not dates:
        raise ValueError("the store holds no dated ruling: crawl first (README: Crawl rulings from the portal)")
    newest = dt.date.fromisoformat(max(dates))
    if spec == "year":
        year = newest.year if dt.date(newest.year + 1, 1, 1) <= today else newest.year - 1
        return _year_window(year)
    if spec == "quarter":
        q = (newest.month - 1) // 3 + 1
        year, q = (newest.year, q) if _quarter(newest.year, q)[1] <= today else (
            (newest.year, q - 1) if q > 1 else (newest.year - 1, 4))
        return _quarter_window(year, q)
    if re.fullmatch(r"\d{4}", spec):
        return _year_window(int(spec))
    if m := re.fullmatch(r"(\d{4})-Q([1-4])", spec):
        return _quarter_window(int(m[1]), int(m[2]))
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", spec):
        start, end = dt.date.fromisoformat(spec), newest + dt.timedelta(days=1)
        if end <= start:
            raise ValueError(f"refresh.window={spec}: no ruling on or after it (the newest is {newest}); "
                             "choose an earlier start date")
        prev = start - (end - start)
        return Window(f"since {spec}", spec, end.isoformat(), prev.isoformat(), f"{prev} .. {start}")
    raise ValueError(f"refresh.window={spec!r}: choose {WINDOW_HELP.split(': ', 1)[1]}")


def check(win: Window, dates: list[str], store: Path) -> dict[str, int]:
    """Rulings before the validation period, in it and in the window; a ValueError (one line) when one is empty."""
    counts = {"train": sum(d < win.prev_start for d in dates),
              "validation": sum(win.prev_start <= d < win.start for d in dates),
              "window": sum(win.holds(d) for d in dates)}
    span = f"rulings dated {min(dates)} .. {max(dates)}" if dates else "no dated ruling"
    if not counts["window"]:
        raise ValueError(f"refresh window {win.label} ({win.start} .. {win.last}) holds no ruling of the store {store} "
                         f"({span}): choose a window inside that range with refresh.window=, or crawl first")
    for period, what in (("validation", f"the period before the window ({win.prev_label})"),
                         ("train", f"the time before {win.prev_start}")):
        if not counts[period]:
            raise ValueError(f"refresh window {win.label}: {what} holds no ruling of the store {store} ({span}); "
                             "the challenger needs rulings to train on and one period to validate on: choose a "
                             "later window with refresh.window=")
    return counts


def ruling_dates(store: RawStore) -> dict[str, str]:
    """rrdc_no -> date (YYYY-MM-DD) of every dated ruling in the store."""
    from hsflow.data.store import ruling_date

    return {r["rrdc_no"]: d for r in store.rulings() if (d := ruling_date(r))}


def store_until(store: RawStore, end: str, folder: Path) -> Path:
    """The store as it stood at `end`: the store itself when it holds nothing later, else a view in `folder`
    (STORE.json copied, ruling records dated before `end` linked, photos/ linked): a later, incomplete period's
    rulings must neither train the challenger nor count in its test figures."""
    later = {r for r, d in ruling_dates(store).items() if d >= end}
    if not later:
        return store.root
    view = folder / f"store_before_{end}"
    if view.exists():
        raise StoreError(f"{view} exists already; remove it or choose another output folder")
    (view / "rulings").mkdir(parents=True)
    (view / "STORE.json").write_text((store.root / "STORE.json").read_text())
    os.symlink((store.root / "photos").resolve(), view / "photos", target_is_directory=True)
    for path in (store.root / "rulings").glob("*.json"):
        if path.stem not in later:
            os.symlink(path.resolve(), view / "rulings" / path.name)
    (view / "VIEW.json").write_text(json.dumps({"of": str(store.root.resolve()), "before": end,
                                                "left_out": sorted(later)}))
    return view
