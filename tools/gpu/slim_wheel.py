"""`python -m tools.gpu.slim_wheel <wheel> <prefix>...`: rewrite a wheel in place without the files under the
given prefixes (e.g. Ray's Java jars and its RLlib, Serve and dashboard front end, which a single-machine job never
loads), their lines dropped from its RECORD so pip still installs it. Used by `gpu_wheels.sh`: what travels to a GPU
machine is size-limited."""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path


def record_name(names: list[str]) -> str:
    """The wheel's own RECORD (at the top: vendored packages inside may carry theirs)."""
    records = [n for n in names if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
    if len(records) != 1:
        raise ValueError(f"a wheel has one <name>.dist-info/RECORD at its top, found {records}")
    return records[0]


def slim(wheel: str, prefixes: list[str]) -> tuple[int, int]:
    """Drop every member under `prefixes` and its RECORD line; returns the file's bytes (before, after)."""
    path = Path(wheel)
    before = path.stat().st_size
    with zipfile.ZipFile(path) as source:
        members = source.infolist()
        record = record_name([m.filename for m in members])
        dropped = {m.filename for m in members if m.filename.startswith(tuple(prefixes))}
        if not dropped:
            raise ValueError(f"{path.name}: nothing under {prefixes}")
        # RECORD is CSV (path,hash,size); the paths here have no commas or quotes
        lines = [line for line in source.read(record).decode().splitlines() if line.split(",")[0] not in dropped]
        partial = path.with_suffix(".partial")
        with zipfile.ZipFile(partial, "w") as target:
            for member in members:
                if member.filename in dropped:
                    continue
                data = "\n".join(lines).encode() + b"\n" if member.filename == record else source.read(member)
                # the member's own name, date and permission bits; deflated harder than most wheels are
                target.writestr(member, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    os.replace(partial, path)
    return before, path.stat().st_size


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: python -m tools.gpu.slim_wheel <wheel> <prefix>...")
    before, after = slim(sys.argv[1], sys.argv[2:])
    print(f"{Path(sys.argv[1]).name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
