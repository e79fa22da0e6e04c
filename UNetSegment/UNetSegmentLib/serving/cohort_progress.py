"""Progress of a cohort on the terminal: a tqdm bar, or one line per case when not on a terminal."""
from __future__ import annotations

import sys
import time
from typing import Callable

from .cohort_tables import STATUS_FAILED, STATUS_OK, STATUS_RESUMED

#: called after each case: (row, done, failed, total)
CohortProgressFn = Callable[[dict, int, int, int], None]


class CohortProgress:
    """A tqdm bar (cases, done/failed, ETA) on a terminal; one line per case otherwise.

    Cases known before running (failed at discovery, resumed) are counted but not timed, so the
    ETA is the rate of the cases run now times the cases left.
    """

    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        self.t0: float | None = None
        self.known = 0

    def __call__(self, row: dict, done: int, failed: int, total: int) -> None:
        if not self.enabled:
            return
        n = done + failed
        pre = row["status"] == STATUS_RESUMED or (row["status"] == STATUS_FAILED and row["time_s"] == 0.0 and self.t0 is None)
        if self.t0 is None and pre:
            self.known = n
        elif self.t0 is None:
            self.t0 = time.perf_counter() - float(row.get("time_s") or 0.0)
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="cases", unit="case", file=self.stream, dynamic_ncols=True)
            self.bar.set_postfix_str(f"done {done}, failed {failed}", refresh=False)
            self.bar.update(1)
            return
        ran = n - self.known
        eta = (time.perf_counter() - self.t0) / ran * (total - n) if self.t0 is not None and ran > 0 else None
        msg = f"[{n}/{total}] {row['case_id']}: {row['status']}"
        if row["status"] == STATUS_FAILED:
            msg += f" — {row['error']}"
        elif row["status"] == STATUS_OK:
            msg += f", {row['n_lesions']} lesion(s), {row['time_s']:.1f} s"
        print(f"{msg}  (done {done}, failed {failed}, ETA {_hms(eta) if eta is not None else '?'})", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"

