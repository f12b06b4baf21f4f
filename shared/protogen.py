"""Generates the Python stubs (and mypy type stubs) from protos/ into shared/gen.

`python -m shared.protogen shared/gen` writes them; `--check` regenerates into a
temporary directory and fails when the committed stubs differ (stale stubs).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *proto_files(),
    ]
    cwd = os.getcwd()
    os.chdir(PROTOS)
    try:
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    finally:
        os.chdir(cwd)
    # Mark every generated directory as a regular package so tools resolve them alike.
    for directory in [out_dir / "najimi", *(p for p in (out_dir / "najimi").rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()


def differences(left: Path, right: Path) -> list[str]:
    found: list[str] = []
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__"])
    stack = [(comparison, Path())]
    while stack:
        cmp, rel = stack.pop()
        found += [str(rel / n) for n in cmp.left_only + cmp.right_only]
        _, mismatch, errors = filecmp.cmpfiles(cmp.left, cmp.right, cmp.common_files, shallow=False)
        found += [str(rel / n) for n in mismatch + errors]
        stack += [(sub, rel / name) for name, sub in cmp.subdirs.items()]
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--check", action="store_true", help="fail when the stubs in out_dir are stale")
    args = parser.parse_args()
    if not args.check:
        generate(args.out_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = differences(Path(tmp) / "najimi", args.out_dir / "najimi")
    if stale:
        print("Generated stubs are stale; run `make protos` and commit. Differences:", *stale, sep="\n  ")
        raise SystemExit(1)
    print("Generated stubs are up to date.")


if __name__ == "__main__":
    main()
