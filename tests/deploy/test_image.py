"""deploy/Dockerfile and .dockerignore, checked statically (no container engine runs here):
a pinned base, LightFM an ordinary dependency built in the build stage, a lean non-root final stage, and
every command the manifests run is a console script of the package that imports."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.manifests import ROOT, TARGETS, containers, name, render, workloads

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
# Binaries the Dockerfile puts in the image besides the console scripts.
IMAGE_BINARIES = {"grpc_health_probe"}
PINNED_IMAGE = re.compile(r"^[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}$")


def stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), one list per stage."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    build_args = dict(
        line.removeprefix("ARG ").split("=", 1) for line in lines if line.startswith("ARG ") and "=" in line
    )
    result: list[list[str]] = []
    for line in lines:
        line = re.sub(r"\$\{(\w+)\}", lambda m: build_args.get(m.group(1), m.group(0)), line)
        if line.startswith("FROM "):
            result.append([])
        if result:
            result[-1].append(line)
    return result


def test_every_base_image_is_pinned_by_tag_and_digest() -> None:
    names: set[str] = set()
    for stage in stages():
        words = stage[0].split()
        image = words[1]
        assert image in names or PINNED_IMAGE.match(image), f"unpinned base image: {image}"
        if "AS" in words:
            names.add(words[words.index("AS") + 1])
    python = stages()[-1][0].split()[1]
    assert re.match(r"^python:3\.11\.\d+-slim-bookworm@", python), python


def test_lightfm_is_an_ordinary_dependency_built_in_the_build_stage() -> None:
    """rectools-lightfm builds with current pip in an isolated build: no pinned pip, no special step."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(re.match(r"rectools-lightfm\b", dep) for dep in project["dependencies"])
    assert not any(re.match(r"lightfm\b", dep) for dep in project["dependencies"])
    makefile = (ROOT / "Makefile").read_text()
    build = " ".join(next(s for s in stages() if "AS build" in s[0]))
    for text in (makefile, build):
        assert "no-build-isolation" not in text and "pip<" not in text and "lightfm==" not in text
    assert "build-essential" in build and "pip install ." in build


def test_the_final_stage_has_the_openmp_runtime_lightfm_links() -> None:
    import lightfm

    extensions = list(Path(lightfm.__file__).parent.glob("*.so"))
    assert extensions, "LightFM's compiled extension is missing"
    needed = b"".join(path.read_bytes() for path in extensions)
    final = " ".join(stages()[-1])
    # The extension's ELF dynamic section names the shared libraries it needs.
    assert (b"libgomp.so.1" in needed) == ("libgomp1" in final)


def test_the_final_stage_runs_as_a_numeric_non_root_user_without_compilers_or_caches() -> None:
    final = stages()[-1]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        f"USER {users[-1]}: a numeric non-root id (runAsNonRoot checks it)"
    )
    text = " ".join(final)
    assert "PYTHONUNBUFFERED=1" in text
    for compiler in ("build-essential", "gcc", "g++", "cython"):
        assert compiler not in text.lower(), f"{compiler} in the final stage"
    for run in (line for line in final if line.startswith("RUN ") and "apt-get install" in line):
        assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists/*" in run
    assert all("pip install" not in line for line in final), "install in the build stage, copy the venv"


def test_dockerignore_keeps_the_context_to_what_the_image_needs() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "**", "exclude everything, then allow what the Dockerfile copies"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        source.rstrip("/")
        for stage in stages()
        for line in stage
        if line.startswith("COPY ") and "--from" not in line
        for source in line.split()[1:-1]
    }
    assert copied <= allowed, f"COPY sources the context excludes: {copied - allowed}"
    assert all((ROOT / path).exists() for path in allowed)


def scripts() -> dict[str, str]:
    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


@pytest.mark.parametrize("script", sorted(scripts()))
def test_every_console_script_resolves_to_a_function(script: str) -> None:
    module, _, function = scripts()[script].partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def manifest_commands() -> set[str]:
    commands: set[str] = set()
    for target in TARGETS:
        objects: list[dict[str, Any]] = render(target)
        for workload, template in workloads(objects):
            if name(workload) == "postgres":
                continue  # the PostgreSQL image's own entry point
            for container in containers(template):
                command = container.get("command")
                assert command, f"{name(workload)}: the image has no entry point; name the command"
                commands.add(command[0])
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if "exec" in container.get(probe, {}):
                        commands.add(container[probe]["exec"]["command"][0])
    return commands


def test_every_command_the_manifests_run_is_in_the_image() -> None:
    commands = manifest_commands()
    assert {
        "najimi-consent",
        "najimi-profile",
        "najimi-profile-traits",
        "najimi-recommendation",
        "najimi-recommendation-train",
    } <= commands
    missing = commands - set(scripts()) - IMAGE_BINARIES
    assert not missing, f"commands that are neither console scripts nor in the image: {missing}"
    dockerfile = DOCKERFILE.read_text()
    assert all(binary in dockerfile for binary in IMAGE_BINARIES)
