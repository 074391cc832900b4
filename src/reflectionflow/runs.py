"""The run folder: GenEval layout plus the trace, the ledger, the resolved config and done-markers.

    OUT/config.json               resolved config, components, prompt-set fingerprint
    OUT/ledger.json               images, NFE, VLM calls, tokens, wall seconds per stage
    OUT/report.html               the trace viewer
    OUT/<NNNNN>/metadata.jsonl    the prompt's GenEval line
    OUT/<NNNNN>/trace.jsonl       every candidate, in generation order
    OUT/<NNNNN>/images/<id>.png   every image
    OUT/<NNNNN>/samples/0000.png  the final selection (what `reflectionflow evaluate` scores)
    OUT/<NNNNN>/done.json         the done-marker: selection, notes, wall seconds

Crash safety. Whole files are written atomically (temporary file + rename). The trace is
appended a step at a time: first the step's lines (one write, fsync), then its images, so
after a kill at any moment the trace may end in a partial line, or in lines whose image is not
on disk yet. `load_trace` cuts the trace back to its last complete record with an image, and the
resumed run makes exactly those candidates again (byte-identical, as every seed is derived).
An image on disk always has its trace line, so nothing on disk is ever regenerated.
Images are renamed into place without an fsync each (a kill cannot tear them; the fsync per
image doubled a world run's time): after a power cut, an empty image file counts as missing.

Several processes, one folder (engine/distributed.py). Every file has one writer: config.json
rank 0 (before the others write anything), a prompt's files the process that owns the prompt,
ledger.json and report.html rank 0 after all have finished. A process killed mid-run is the case
above for the prompts it owned; whoever owns them after `--resume` repairs their traces.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .config import config_differences
from .io import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
    png_bytes,
    prompt_dir,
    sample_name,
)

FORMAT = 1  # run folder layout version


class RunFolderError(ValueError):
    """An output folder that cannot take this run (another run's config, not a folder, ...)."""


def prompts_fingerprint(metas: list[dict]) -> str:
    h = hashlib.sha256()
    for m in metas:
        h.update(json.dumps(m, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class RunFolder:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    # Paths ------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.json"

    @property
    def report_path(self) -> Path:
        return self.root / "report.html"

    def prompt_dir(self, i: int) -> Path:
        return prompt_dir(self.root, i)

    def trace_path(self, i: int) -> Path:
        return self.prompt_dir(i) / "trace.jsonl"

    def done_path(self, i: int) -> Path:
        return self.prompt_dir(i) / "done.json"

    def sample_path(self, i: int) -> Path:
        return self.prompt_dir(i) / "samples" / sample_name(0)

    def prompt_indices(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name) for p in self.root.iterdir() if p.is_dir() and p.name.isdigit())

    # The run's identity -----------------------------------------------------------------------
    def read_config(self) -> dict | None:
        if not self.config_path.is_file():
            return None
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunFolderError(f"{self.config_path}: not valid JSON ({e}); not a run folder of this tool") from None

    def check(self, identity: dict, resume: bool) -> bool:
        """Can this run use the folder? Returns True when it continues an existing run.

        `identity` holds what decides the outputs (search settings, component names and options,
        the prompt set's fingerprint). Nothing is written or removed here.
        """
        if self.root.exists() and not self.root.is_dir():
            raise RunFolderError(f"--out {self.root}: exists and is not a folder")
        if resume and not self.root.is_dir():
            raise RunFolderError(f"--resume: {self.root}: no such run folder; drop --resume to start a new run there")
        try:
            check_writable_dir(self.root, "--out")
        except ValueError as e:
            raise RunFolderError(str(e)) from None
        old = self.read_config()
        if old is None:
            if self.prompt_indices():
                raise RunFolderError(f"--out {self.root}: holds prompt folders but no config.json; not a run "
                                     f"of this tool (choose another --out)")
            return False  # a fresh folder (or one killed before config.json was written)
        old_identity = old.get("identity", {})
        diffs = config_differences(_flatten(old_identity), _flatten(identity))
        if not resume:
            what = (f"a different run ({'; '.join(diffs[:6])}{'; ...' if len(diffs) > 6 else ''})"
                    if diffs else "a run with the same config")
            raise RunFolderError(f"--out {self.root}: already holds {what}; pass --resume to continue it"
                                 f"{'' if not diffs else ' (with its own settings)'}, or choose another --out")
        if diffs:
            raise RunFolderError(f"--resume: {self.root} holds a run with other settings: "
                                 f"{'; '.join(diffs[:8])}{'; ...' if len(diffs) > 8 else ''}")
        return True

    def remove_stale_temporaries(self) -> int:
        """Delete the temporary files of writers that died mid-write (io.atomic_write_bytes names them
        .<name>.<pid>.tmp); a live writer's file is left alone. Returns how many were removed."""
        removed = 0
        for p in self.root.rglob(".*.tmp") if self.root.is_dir() else ():
            parts = p.name.rsplit(".", 2)
            pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
            if pid is not None and pid != os.getpid() and _alive(pid):
                continue
            p.unlink(missing_ok=True)
            removed += 1
        return removed

    def write_config(self, identity: dict, extra: dict) -> None:
        atomic_write_json(self.config_path, {"format": FORMAT, "identity": identity} | extra)

    # Per prompt ---------------------------------------------------------------------------------
    def write_metadata(self, i: int, meta: dict) -> None:
        path = self.prompt_dir(i) / "metadata.jsonl"
        text = json.dumps(meta) + "\n"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)

    def load_trace(self, i: int) -> list[dict]:
        """Complete records whose image is on disk; repairs the file after a kill (see module doc).

        What a kill leaves (a partial last line, lines whose image is missing or empty) is cut; a
        complete line that is not a trace record was not written by a kill: RunFolderError naming
        the file and line, and the file is left as it is."""
        path = self.trace_path(i)
        if not path.is_file():
            return []
        raw = path.read_bytes()
        records, good_bytes = [], 0
        pos = 0
        lines = raw.splitlines(keepends=True)
        for n, line in enumerate(lines, 1):
            pos += len(line)
            if not line.endswith(b"\n"):
                break  # a partial last line: the kill came mid-append
            try:
                rec = json.loads(line)
                problem = trace_record_problem(rec)
            except (ValueError, RecursionError) as e:  # JSON or UTF-8
                problem = f"not JSON ({str(e)[:80]})"
            if problem:
                if not any(rest.strip() for rest in lines[n:]) and not line.strip(b"\x00 \t\r\n"):
                    break  # a torn tail of zeros (a power cut), the last thing in the file
                raise RunFolderError(f"{path}: line {n} is not a trace record ({problem}); the file was not "
                                     f"written by this tool as it is: restore it, or remove {self.prompt_dir(i)} "
                                     "to redo that prompt")
            img = self.prompt_dir(i) / rec["file"]
            if not img.is_file() or img.stat().st_size == 0:
                break  # killed between the trace lines and the images: redo from here
            records.append(rec)
            good_bytes = pos
        if good_bytes != len(raw):
            atomic_write_bytes(path, raw[:good_bytes])
        return records

    def append_trace(self, i: int, records: list[dict]) -> None:
        if not records:
            return
        path = self.trace_path(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(path, records, fsync=True)  # secrets scrubbed (an endpoint's error may echo its key)

    def image_path(self, i: int, file: str) -> Path:
        return self.prompt_dir(i) / file

    def write_image(self, i: int, file: str, image) -> None:
        write_replacing(self.image_path(i, file), png_bytes(image))

    def read_done(self, i: int) -> dict | None:
        path = self.done_path(i)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a done-marker that is not JSON was not written by us: redo the prompt

    def write_done(self, i: int, selected_file: str, done: dict) -> None:
        """The final selection to samples/0000.png (the selected image's bytes), then the marker."""
        src = self.prompt_dir(i) / selected_file
        atomic_write_bytes(self.sample_path(i), src.read_bytes())
        atomic_write_json(self.done_path(i), done)


# A trace record's fields that readers index, with the types they need (None allowed where noted).
_TRACE_FIELDS = {"id": str, "order": int, "kind": str, "chain": int, "round": int, "seed": int, "prompt": str,
                 "nfe": int, "file": str}
_TRACE_OPTIONAL = {"score": (int, float), "parent": str, "reflection": str, "verdict_error": str, "yes": bool,
                   "cost": dict, "errors": list, "verdict": dict}
_TRACE_PRESENT = ("score", "parent", "reflection", "yes")  # may be null, but are there


def trace_record_problem(rec) -> str | None:
    """What makes a parsed trace line unusable, or None when it is a record readers can use."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    for key, typ in _TRACE_FIELDS.items():
        if key not in rec:
            return f"no {key!r}"
        if not isinstance(rec[key], typ) or isinstance(rec[key], bool):
            return f"{key!r} is not a {typ.__name__}"
    for key, typ in _TRACE_OPTIONAL.items():
        if key in _TRACE_PRESENT and key not in rec:
            return f"no {key!r}"
        v = rec.get(key)
        if v is not None and (not isinstance(v, typ) or (typ is not bool and isinstance(v, bool))):
            return f"{key!r} has the wrong type"
    f = rec["file"]
    if not f or f.startswith(("/", "\\")) or ".." in Path(f).parts:
        return f"'file' {f[:80]!r} is not a path inside the prompt folder"
    return None


def write_replacing(path: Path, data: bytes) -> None:
    """Atomic against kills (temporary file + rename, named as io.atomic_write_bytes names it), but
    without io's fsync: for the many images of a run, whose trace lines are already durable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if prefix == "" and k == "search" and isinstance(v, dict):
            out.update(_flatten(v, ""))  # the search settings read best under their own names
            continue
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
