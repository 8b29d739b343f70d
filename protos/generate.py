"""Regenerate the Python stubs of the MiniInfer protos, or check they are fresh.

    python protos/generate.py           # rewrite protos/miniinfer/v1/*_pb2*.py(i)
    python protos/generate.py --check   # exit 1 and list stale files if out of date

Every ``*.proto`` under ``protos/miniinfer/`` is compiled with
``python -m grpc_tools.protoc`` (``-I protos``, so descriptors are registered as
``miniinfer/v1/<name>.proto``) into ``*_pb2.py``, ``*_pb2.pyi`` and
``*_pb2_grpc.py`` next to it. protoc writes imports between generated modules as
``from miniinfer.v1 import x_pb2``; they are rewritten to
``from protos.miniinfer.v1 import x_pb2`` so the stubs work as part of the
installed ``protos`` package.

The output depends only on the .proto files and the grpcio-tools version (the
stubs record it: ``GRPC_GENERATED_VERSION`` and ``Protobuf Python Version``), so
the same inputs and tools give byte-identical files. ``--check`` compiles into a
temporary directory and compares bytes with the committed files; it also reports
generated files that are missing and ones whose .proto no longer exists.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PROTOS_ROOT = Path(__file__).resolve().parent
# Proto sources live under this folder of the protos root (the proto import root).
SOURCE_TOP = "miniinfer"
# The Python package that the protos root is importable as.
PYTHON_PACKAGE = "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

_IMPORT_RE = re.compile(rf"^(\s*)(from|import)(\s+){SOURCE_TOP}(?=[.\s])", re.MULTILINE)
_GRPC_VERSION_RE = re.compile(r"^GRPC_GENERATED_VERSION = '([^']+)'", re.MULTILINE)


class GenerateError(RuntimeError):
    """protoc failed, or the protos root is malformed."""


def proto_files(root: Path) -> list[str]:
    """The .proto files under ``root/miniinfer``, relative to ``root``, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in (root / SOURCE_TOP).rglob("*.proto"))


def generated_files(root: Path) -> list[str]:
    """The generated stub files present under ``root/miniinfer``, relative, sorted."""
    out = []
    for path in (root / SOURCE_TOP).rglob("*"):
        if path.is_file() and path.name.endswith(GENERATED_SUFFIXES):
            out.append(path.relative_to(root).as_posix())
    return sorted(out)


def fix_imports(source: str) -> str:
    """Make imports of other generated modules absolute under the ``protos`` package."""
    return _IMPORT_RE.sub(rf"\1\2\3{PYTHON_PACKAGE}.{SOURCE_TOP}", source)


def _well_known_protos() -> Path:
    import grpc_tools

    return Path(grpc_tools.__file__).resolve().parent / "_proto"


def compile_protos(root: Path, out_dir: Path) -> dict[str, bytes]:
    """Compile every proto under ``root`` into ``out_dir``; return {relpath: fixed bytes}.

    The returned content has its imports fixed; the files in ``out_dir`` are
    protoc's raw output.
    """
    protos = proto_files(root)
    if not protos:
        raise GenerateError(f"no .proto files under {root / SOURCE_TOP}")
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{_well_known_protos()}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    # cwd=root: protoc resolves the relative proto names against the -I path.
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GenerateError(f"protoc failed ({proc.returncode}):\n{proc.stderr.strip()}")
    result: dict[str, bytes] = {}
    for rel in generated_files(out_dir):
        text = (out_dir / rel).read_bytes().decode("utf-8")
        result[rel] = fix_imports(text).encode("utf-8")
    expected = {p[: -len(".proto")] + s for p in protos for s in GENERATED_SUFFIXES}
    if set(result) != expected:
        missing = sorted(expected - set(result))
        extra = sorted(set(result) - expected)
        raise GenerateError(f"unexpected protoc output: missing {missing}, extra {extra}")
    return result


def render(root: Path = PROTOS_ROOT) -> dict[str, bytes]:
    """What the generated files under ``root`` should contain: {relpath: bytes}."""
    with tempfile.TemporaryDirectory(prefix="miniinfer-protos-") as tmp:
        return compile_protos(root, Path(tmp))


def generate(root: Path = PROTOS_ROOT) -> list[str]:
    """Write the stubs under ``root``; remove orphaned ones. Returns the files changed."""
    wanted = render(root)
    changed = []
    for rel, content in sorted(wanted.items()):
        path = root / rel
        if not path.is_file() or path.read_bytes() != content:
            path.write_bytes(content)
            changed.append(rel)
    for rel in generated_files(root):
        if rel not in wanted:
            (root / rel).unlink()
            changed.append(rel)
    for init in _package_inits(wanted):
        path = root / init
        if not path.exists():
            name = ".".join([PYTHON_PACKAGE, *Path(init).parent.parts])
            path.write_text(f'"""{name}: generated protobuf modules."""\n', encoding="utf-8")
            changed.append(init)
    return sorted(changed)


def _package_inits(generated: dict[str, bytes]) -> list[str]:
    """The __init__.py files that make every folder holding stubs a package."""
    inits = set()
    for rel in generated:
        folder = Path(rel).parent
        # Every folder below the protos root (which is the package itself).
        for part in [folder, *folder.parents][:-1]:
            inits.add((part / "__init__.py").as_posix())
    return sorted(inits)


def check(root: Path = PROTOS_ROOT) -> list[str]:
    """Stale generated files under ``root``, as ``"relpath (why)"``; empty if fresh."""
    wanted = render(root)
    stale = []
    for rel, content in sorted(wanted.items()):
        path = root / rel
        if not path.is_file():
            stale.append(f"{rel} (missing)")
        elif path.read_bytes() != content:
            stale.append(f"{rel} (differs)")
    for rel in generated_files(root):
        if rel not in wanted:
            stale.append(f"{rel} (no .proto generates it)")
    for init in _package_inits(wanted):
        if not (root / init).is_file():
            stale.append(f"{init} (missing)")
    return stale


def _tools_hint(root: Path) -> str:
    """Name the grpcio-tools versions when the committed stubs came from another one."""
    from grpc_tools import grpc_version

    recorded = set()
    for rel in generated_files(root):
        if rel.endswith("_pb2_grpc.py"):
            m = _GRPC_VERSION_RE.search((root / rel).read_text(encoding="utf-8"))
            if m:
                recorded.add(m.group(1))
    installed = grpc_version.VERSION
    others = sorted(recorded - {installed})
    if not others:
        return ""
    return (
        f"\nnote: the committed stubs were generated with grpcio-tools {', '.join(others)}; "
        f"installed is {installed}. Regenerate, or install that version to compare."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the committed stubs differ from a fresh generation",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=PROTOS_ROOT,
        help="protos root holding miniinfer/ (default: this script's folder)",
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    try:
        if args.check:
            stale = check(root)
            if stale:
                print(
                    "stale generated protobuf files (run `python protos/generate.py`):\n  "
                    + "\n  ".join(stale)
                    + _tools_hint(root),
                    file=sys.stderr,
                )
                return 1
            print(f"protobuf stubs are fresh ({len(proto_files(root))} protos)")
            return 0
        changed = generate(root)
    except GenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if changed:
        print("wrote:\n  " + "\n  ".join(changed))
    else:
        print("protobuf stubs already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
