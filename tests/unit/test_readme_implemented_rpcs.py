"""The README's "What each service implements today" table matches the servicers: an RPC
is implemented when its servicer class overrides the generated base class's method
(which answers UNIMPLEMENTED) with one that does not raise NotImplementedError (which
the interceptors answer with UNIMPLEMENTED, e.g. after checking who may call)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import services
from shared.settings import SERVICE_NAMES

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| (\w+) \| `([\w.]+)` \| ([^|]+) \| ([^|]+) \|$")


def raises_not_implemented(method: Callable[..., object]) -> bool:
    tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(raised, ast.Name) and raised.id == "NotImplementedError":
                return True
    return False


def servicers() -> dict[tuple[str, str], tuple[list[str], list[str]]]:
    """(process, gRPC service full name) -> (implemented RPCs, unimplemented RPCs), found
    by importing every module of services/ and comparing each servicer with its base."""
    for module in pkgutil.walk_packages(services.__path__, "services."):
        if ".migrations" not in module.name and not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    for name, module in list(sys.modules.items()):
        process = name.split(".")[1] if name.startswith("services.") and name.count(".") >= 2 else ""
        if process not in SERVICE_NAMES:
            continue
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != name:
                continue
            for base in cls.__mro__[1:]:
                if base.__module__.startswith("najimi.") and base.__name__.endswith("Servicer"):
                    descriptor = sys.modules[base.__module__.replace("_pb2_grpc", "_pb2")].DESCRIPTOR
                    service = descriptor.services_by_name[base.__name__.removesuffix("Servicer")]
                    rpcs = [method.name for method in service.methods]
                    done = [
                        rpc
                        for rpc in rpcs
                        if getattr(cls, rpc) is not getattr(base, rpc)
                        and not raises_not_implemented(getattr(cls, rpc))
                    ]
                    found[(process, service.full_name)] = (done, [rpc for rpc in rpcs if rpc not in done])
    return found


def readme_table() -> dict[tuple[str, str], tuple[str, str]]:
    text = README.read_text()
    section = text[text.index("## What each service implements today") :]
    section = section[: section.index("\n## ", 5)]
    return {(m[1], m[2]): (m[3].strip(), m[4].strip()) for m in map(ROW.match, section.splitlines()) if m}


def test_the_readme_says_which_rpcs_each_service_implements():
    actual = servicers()
    assert len(actual) >= 9 and {process for process, _ in actual} == set(SERVICE_NAMES)
    # A whole service reads "all N RPCs"; an empty list reads "—".
    expected = {
        key: (f"all {len(done)} RPCs" if not missing else ", ".join(done) or "—", ", ".join(missing) or "—")
        for key, (done, missing) in actual.items()
    }
    assert readme_table() == expected
