"""The result store of one run directory: `run.json` (what was run, where, with what) and `results.jsonl`.

Rows are appended, flushed and fsync'ed as each cell finishes, so a killed run loses nothing finished; a line
cut short by the kill is dropped when the store is reopened, and rerunning the same command skips every cell
whose row is already there.

A store kept in git may hold its rows gzip-compressed as `results.jsonl.gz` instead (large result stores; the
`results/` directory does so above a few MB): reading takes either, and reopening the store to write unpacks it
into `results.jsonl` first.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path
from typing import Any

from kvbench.harness.errors import KVBenchError
from kvbench.harness.files import ensure_writable_dir

RESULTS = "results.jsonl"
PACKED_RESULTS = RESULTS + ".gz"
RUN_META = "run.json"
# (task, length, sample id, budget, metric, identity hash): a row is done only for its whole identity.
CellKey = tuple[str, int, int, float, str, str | None]
# Fields of the run identity that stores written before identities existed kept at the top of run.json.
LEGACY_IDENTITY = ("model", "dtype", "device", "seed", "query_aware", "runner")


def read_results_text(results_path: Path) -> str | None:
    """The text of `results.jsonl`, or of `results.jsonl.gz` beside it when only that exists; None if neither."""
    if results_path.exists():
        return results_path.read_text(encoding="utf-8")
    packed = results_path.with_name(PACKED_RESULTS)
    if packed.exists():
        return gzip.decompress(packed.read_bytes()).decode("utf-8")
    return None


def cell_key(row: dict[str, Any]) -> CellKey:
    return (
        row["task"],
        int(row["length"]),
        int(row["sample_id"]),
        round(float(row["budget"]), 6),
        row["metric"],
        row.get("identity_hash"),
    )


class ResultStore:
    """Append-only rows plus run metadata in one directory."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self.results_path = self.directory / RESULTS
        self.meta_path = self.directory / RUN_META

    def open(self, identity: dict[str, Any], force: bool = False) -> dict[str, Any] | None:
        """Make the directory writable and ours. A store whose run identity differs in any field both know (model
        fingerprint, dtype, device, seed, ...) is refused in one line unless `force`, which clears its rows (its
        run.json keeps the invocations that wrote them). Returns the metadata of the run being resumed (or of the
        replaced one, with `replaced` set), if any."""
        ensure_writable_dir(self.directory)
        self._unpack()
        previous = self.read_meta()
        if previous is None:
            if self.results_path.exists() and not force:
                raise KVBenchError(f"{self.directory} has {RESULTS} but no {RUN_META}; use another --out or --force")
            if force:
                self.clear()
            return None
        known = previous.get("identity") or {k: previous[k] for k in LEGACY_IDENTITY if k in previous}
        clashes = [name for name in identity if name in known and known[name] != identity[name]]
        if clashes and not force:
            described = ", ".join(f"{f} {known[f]!r} (now {identity[f]!r})" for f in clashes)
            raise KVBenchError(
                f"{self.directory} holds results of another run: {described}; use another --out or --force to replace them"
            )
        if clashes:
            self.clear(keep_meta=True)
            return {**previous, "replaced": clashes}
        self._repair_tail()
        return previous

    def drop_rows(self, unwanted) -> int:
        """Rewrite the store without the rows `unwanted(row)` picks (atomically); returns how many went."""
        self._unpack()
        rows = self.rows()
        kept = [row for row in rows if not unwanted(row)]
        temporary = self.results_path.with_suffix(".jsonl.tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            for row in kept:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.results_path)
        return len(rows) - len(kept)

    def clear(self, keep_meta: bool = False) -> None:
        rows = (self.results_path, self.directory / PACKED_RESULTS)
        for path in rows if keep_meta else (*rows, self.meta_path):
            path.unlink(missing_ok=True)
        for derived in ("report.md", "report.html"):
            (self.directory / derived).unlink(missing_ok=True)
        shutil.rmtree(self.directory / "plots", ignore_errors=True)

    def read_meta(self) -> dict[str, Any] | None:
        if not self.meta_path.exists():
            return None
        try:
            return json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise KVBenchError(f"{self.meta_path} is unreadable; remove it or use another --out") from None

    def write_meta(self, meta: dict[str, Any]) -> None:
        temporary = self.meta_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(temporary, self.meta_path)

    def _unpack(self) -> None:
        """A packed store (`results.jsonl.gz` alone) becomes a plain one, which appends and rewrites need."""
        packed = self.directory / PACKED_RESULTS
        if self.results_path.exists() or not packed.exists():
            return
        temporary = self.results_path.with_suffix(".jsonl.tmp")
        temporary.write_bytes(gzip.decompress(packed.read_bytes()))
        os.replace(temporary, self.results_path)
        packed.unlink()

    def _repair_tail(self) -> None:
        """Drop a last line cut short by a kill, so the next row starts on a line of its own."""
        if not self.results_path.exists():
            return
        data = self.results_path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.results_path, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)

    def rows(self) -> list[dict[str, Any]]:
        text = read_results_text(self.results_path)
        if text is None:
            return []
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def add_invocation(self, meta: dict[str, Any], previous: dict[str, Any] | None, invocation: dict[str, Any]) -> None:
        """`meta["invocations"]`: every invocation that wrote into the store, oldest first, this one last."""
        history = list((previous or {}).get("invocations") or [])
        if previous is not None and not history and previous.get("command"):
            # A store from before invocations were kept: its one recorded command stands for what wrote it.
            history.append({k: previous.get(k) for k in ("command", "git_commit", "started_at", "finished_at")})
        if previous is not None and previous.get("replaced"):
            history = [{**entry, "rows_replaced": True} for entry in history]
        meta["invocations"] = [*history, invocation]

    def append(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with open(self.results_path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
