"""Build hook: compile protos/ into targetd_repl/v1/ at build time (generated code is never committed).

`protos/targetd_repl/v1/*.proto` compiled with `-I protos` lands in `targetd_repl/v1/`, so the
generated cross-file imports (`from targetd_repl.v1 import x_pb2`) resolve inside our package.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def compile_protos() -> None:
    from grpc_tools import protoc  # build-system requirement
    import grpc_tools

    protos = sorted((ROOT / "protos").rglob("*.proto"))
    if not protos:
        return
    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out = ROOT / "targetd_repl" / "v1"
    out.mkdir(exist_ok=True)
    (out / "__init__.py").write_text('"""Generated from protos/targetd_repl/v1 at build time."""\n')
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'protos'}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + ", ".join(p.name for p in protos))


# Compile before setup(): egg_info (run first by pip, even for editable installs) must already
# find the targetd_repl.v1 package that pyproject.toml lists.
compile_protos()
setup()
