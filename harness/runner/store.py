"""The result store of one run directory: `run.json` (what was run, where, with what) and `results.jsonl`.

Rows are appended, flushed and fsync'ed as each cell finishes, so a killed run loses nothing finished; a line
cut short by the kill is dropped when the store is reopened (said on stderr), and rerunning the same command skips
every cell whose row is already there. Any other line that is no row is damage kvbench did not write: a run refuses
the store until it is repaired, or moves those lines aside with --force. One run at a time writes a store: it holds
an flock on `.kvbench.lock` in the directory while it runs.

A store kept in git may hold its rows gzip-compressed as `results.jsonl.gz` instead (large result stores; the
`results/` directory does so above a few MB): reading takes either, and reopening the store to write unpacks it
into `results.jsonl` first.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kvbench.harness.errors import KVBenchError
from kvbench.harness.files import ensure_writable_dir, file_stamp

RESULTS = "results.jsonl"
PACKED_RESULTS = RESULTS + ".gz"
RUN_META = "run.json"
LOCK = ".kvbench.lock"
SHOWN_LINE_NUMBERS = 10  # a message names this many line numbers at most, then how many there are in all
ROW_FIELDS = ("task", "length", "sample_id", "method", "budget", "score", "metric")  # in every row kvbench writes
# (task, length, sample id, budget, metric, identity hash): a row is done only for its whole identity.
CellKey = tuple[str, int, int, float, str, str | None, int | None]
# Fields of the run identity that stores written before identities existed kept at the top of run.json.
LEGACY_IDENTITY = ("model", "dtype", "device", "seed", "query_aware", "runner")


def read_results(results_path: Path) -> bytes | None:
    """The bytes of `results.jsonl`, or of `results.jsonl.gz` beside it when only that exists; None if neither."""
    if results_path.exists():
        return results_path.read_bytes()
    packed = results_path.with_name(PACKED_RESULTS)
    if packed.exists():
        return gzip.decompress(packed.read_bytes())
    return None


def parse_row(line: bytes) -> dict[str, Any] | None:
    """The row a line holds, or None: a JSON object with the fields of every row (a cell's key needs them). Lines
    are split at newlines only: a row's text may hold any other line separator (U+2028, NEL), which json.dumps
    leaves unescaped."""
    try:
        row = json.loads(line)
    except ValueError:  # not JSON, or not UTF-8
        return None
    return row if isinstance(row, dict) and all(name in row for name in ROW_FIELDS) else None


def line_numbers(numbers: list[int]) -> str:
    """`line 7`, `lines 3, 7`, or the first few and how many in all: a one-line message stays one line."""
    shown = ", ".join(map(str, numbers[:SHOWN_LINE_NUMBERS]))
    more = f", ... ({len(numbers)} in all)" if len(numbers) > SHOWN_LINE_NUMBERS else ""
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{more}"


def _say(message: str) -> None:
    print(f"kvbench: note: {message}", file=sys.stderr)


def cell_key(row: dict[str, Any]) -> CellKey:
    return (
        row["task"],
        int(row["length"]),
        int(row["sample_id"]),
        round(float(row["budget"]), 6),
        row["metric"],
        row.get("identity_hash"),
        row.get("budget_tokens"),  # token budgets (`256t`); None in fractional rows, and in every older store
    )


class ResultStore:
    """Append-only rows plus run metadata in one directory."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self.results_path = self.directory / RESULTS
        self.meta_path = self.directory / RUN_META

    @contextmanager
    def writing(self) -> Iterator[None]:
        """This run alone writes the store while the block runs: two runs into one store would each compute and append
        every cell. The lock is an flock, which the kernel drops when the process ends, crashed or killed included. A
        run that fails before its first row takes back the run.json it wrote into a store that had nothing."""
        ensure_writable_dir(self.directory)
        lock = self._lock()
        fresh = not any(path.exists() for path in (self.meta_path, self.results_path, self.directory / PACKED_RESULTS))
        try:
            yield
        except BaseException:
            if fresh and not self.results_path.exists():
                self.meta_path.unlink(missing_ok=True)
            raise
        finally:
            (self.directory / LOCK).unlink(missing_ok=True)  # before the lock goes: see _lock
            os.close(lock)

    def _lock(self) -> int:
        """An exclusive flock on the lock file, which names the holder's pid for a refused run to say. The holder
        removes the file as it lets go, so a lock won on a file just removed is taken again on the one there now."""
        path = self.directory / LOCK
        while True:
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(handle, 32).decode(errors="replace").strip() or "unknown"
                os.close(handle)
                raise KVBenchError(
                    f"{self.directory} is in use by another kvbench run (pid {holder}); wait for it or use another --out"
                ) from None
            except OSError as error:
                os.close(handle)
                raise KVBenchError(f"cannot lock {path}: {error.strerror}; use an --out on a local disk") from None
            if _same_file(handle, path):
                break
            os.close(handle)
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        return handle

    def open(self, identity: dict[str, Any], force: bool = False) -> dict[str, Any] | None:
        """Make the directory writable and ours. A store whose run identity differs in any field both know (model
        fingerprint, dtype, device, seed, ...) is refused in one line unless `force`, which clears its rows (its
        run.json keeps the invocations that wrote them); so is a store with damaged lines (see `_set_aside_damaged`).
        Returns the metadata of the run being resumed (or of the replaced one, with `replaced` set), if any."""
        ensure_writable_dir(self.directory)
        self._unpack()
        previous = self.read_meta()
        if previous is None and self.results_path.exists() and not force:
            raise KVBenchError(f"{self.directory} has {RESULTS} but no {RUN_META}; use another --out or --force")
        earlier = previous or {}
        known = earlier.get("identity") or {k: earlier[k] for k in LEGACY_IDENTITY if k in earlier}
        clashes = [name for name in identity if name in known and known[name] != identity[name]]
        if clashes and not force:
            described = ", ".join(f"{f} {known[f]!r} (now {identity[f]!r})" for f in clashes)
            raise KVBenchError(
                f"{self.directory} holds results of another run: {described}; use another --out or --force to replace them"
            )
        self._set_aside_damaged(force)  # before any clearing: damaged lines are moved, never deleted
        if force and (previous is None or clashes):
            self.clear(keep_meta=True)
        if previous is None:
            return None
        if clashes:
            return {**previous, "replaced": clashes}
        self._repair_tail()
        return previous

    def _set_aside_damaged(self, force: bool) -> None:
        """Lines that hold no row, the last excepted (see `_repair_tail`): kvbench never writes them, so something
        else damaged the store, and appending to it would hide that. Refused in one line unless `force`, which moves
        them, never deletes them, into results.damaged-<UTC time>.jsonl beside the store, and says so."""
        if not self.results_path.exists():
            return
        *lines, tail = self.results_path.read_bytes().split(b"\n")
        damaged = [number for number, line in enumerate(lines, 1) if line.strip() and parse_row(line) is None]
        if not damaged:
            return
        plural = "s" if len(damaged) > 1 else ""
        found = f"{self.results_path} has {len(damaged)} unreadable line{plural} ({line_numbers(damaged)})"
        if not force:
            raise KVBenchError(f"{found}; repair or remove them, or pass --force to move them aside and go on")
        aside = self.directory / f"results.damaged-{file_stamp()}.jsonl"
        with open(aside, "ab") as handle:
            handle.writelines(lines[number - 1] + b"\n" for number in damaged)
            handle.flush()
            os.fsync(handle.fileno())
        unwanted = set(damaged)
        kept = (line + b"\n" for number, line in enumerate(lines, 1) if number not in unwanted)
        self._replace([*kept, tail])
        _say(f"{found}; moved them to {aside}")

    def drop_rows(self, unwanted) -> int:
        """Rewrite the store without the rows `unwanted(row)` picks (atomically); returns how many went."""
        self._unpack()
        rows = self.rows()
        kept = [row for row in rows if not unwanted(row)]
        self._replace([(json.dumps(row, ensure_ascii=False) + "\n").encode() for row in kept])
        return len(rows) - len(kept)

    def _replace(self, lines: list[bytes]) -> None:
        """results.jsonl rewritten whole, synced, then renamed into place: a kill leaves the old or the new one."""
        temporary = self.results_path.with_suffix(".jsonl.tmp")
        with open(temporary, "wb") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.results_path)

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
        """A last line without its newline, so that the next row starts on a line of its own: a whole row gets its
        newline; a row cut short by a kill is dropped and its cell computed again, said on stderr."""
        if not self.results_path.exists():
            return
        data = self.results_path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        if parse_row(data[start:]) is not None:
            with open(self.results_path, "ab") as handle:
                handle.write(b"\n")
            return
        with open(self.results_path, "r+b") as handle:
            handle.truncate(start)
        if data[start:].strip():
            number = data.count(b"\n") + 1
            _say(
                f"the last line of {self.results_path} (line {number}) was incomplete, as a killed run leaves it; "
                "dropped, its cell will be computed again"
            )

    def rows(self) -> list[dict[str, Any]]:
        data = read_results(self.results_path)
        if data is None:
            return []
        return [row for row in map(parse_row, data.split(b"\n")) if row is not None]

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


def _same_file(handle: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle), os.stat(path))
    except FileNotFoundError:
        return False
