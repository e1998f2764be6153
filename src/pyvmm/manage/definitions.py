"""VM definitions: human-editable files in $XDG_CONFIG_HOME/pyvmm/vms/NAME.toml (or .json).

A definition is Firecracker's full configuration (the --config-file layout: "machine-config",
"boot-source", "drives", "network-interfaces", "vsock", "entropy", ...) with pyvmm's
options in a "pyvmm" table, checked by the same schema as the API (api/schema.py): a field
means the same in a definition, an API request and a Firecracker config file.

TOML is the format pyvmm writes: people edit these files, and TOML has comments and needs
no quoting of keys; Python 3.11 reads it (tomllib), and the small writer below covers the
shapes a definition has (tables, arrays of tables, strings, numbers, booleans, string
lists). A .json definition (e.g. a Firecracker config file dropped in) is read as well.
A file that pyvmm did not write is kept as it is, comments included.

    # ~/.config/pyvmm/vms/web.toml
    [machine-config]
    vcpu_count = 2
    mem_size_mib = 512

    [[drives]]                     # no [boot-source]: pyvmm's default guest boots
    drive_id = "data"
    path_on_host = "/var/lib/pyvmm/web-data.img"
    is_root_device = false
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api.schema import VmSpec
from ..errors import ConfigError, UserError
from .records import UnknownVm, VmExists, check_name, config_dir

SUFFIXES = (".toml", ".json")


class DefinitionError(UserError):
    """A definition file that cannot be read or does not validate; names the file and field."""


@dataclass(frozen=True)
class Definition:
    name: str
    path: Path | None
    document: dict[str, Any]     # as written, "name" removed
    spec: VmSpec


def parse(text: str, suffix: str, origin: str) -> dict[str, Any]:
    try:
        return json.loads(text) if suffix == ".json" else tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DefinitionError(f"{origin}: not valid TOML: {exc}") from None
    except ValueError as exc:
        raise DefinitionError(f"{origin}: not valid JSON: {exc}") from None


def from_document(document: Any, origin: str, name: str | None = None, path: Path | None = None) -> Definition:
    """Validate `document`; errors say '<origin>: <field> <problem>'."""
    if not isinstance(document, dict):
        raise DefinitionError(f"{origin}: a definition is a table of sections")
    document = dict(document)
    named = document.pop("name", None)
    if named is not None and not isinstance(named, str):
        raise DefinitionError(f"{origin}: name must be a string")
    try:
        spec = VmSpec.from_document(document)
    except ConfigError as exc:
        raise DefinitionError(f"{origin}: {exc}") from None
    final = name or named
    if final is None:
        raise DefinitionError(f"{origin}: the definition has no name: give one")
    return Definition(check_name(final), path, document, spec)


def find(name: str, directory: Path | None = None) -> Path | None:
    directory = directory or config_dir()
    for suffix in SUFFIXES:
        candidate = directory / f"{name}{suffix}"
        if candidate.exists():
            return candidate
    return None


def load(name: str, directory: Path | None = None) -> Definition:
    path = find(check_name(name), directory)
    if path is None:
        raise UnknownVm(f"no VM named {name!r} is defined")
    return load_file(path, name)


def load_file(path: Path, name: str | None = None) -> Definition:
    try:
        text = path.read_text()
    except OSError as exc:
        raise DefinitionError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise DefinitionError(f"{path}: not a text file") from None
    return from_document(parse(text, path.suffix, str(path)), str(path), name, path)


def names(directory: Path | None = None) -> list[str]:
    directory = directory or config_dir()
    if not directory.is_dir():
        return []
    return sorted({p.stem for p in directory.iterdir() if p.suffix in SUFFIXES and not p.name.startswith(".")})


def store(definition: Definition, *, text: str | None = None, suffix: str = ".toml",
          directory: Path | None = None, replace: bool = False) -> Path:
    """Write `definition` as NAME.SUFFIX: `text` as given (a user's file, comments kept) or,
    without it, TOML written from the document."""
    directory = directory or config_dir()
    existing = find(definition.name, directory)
    if existing is not None and not replace:
        raise VmExists(f"a VM named {definition.name!r} is defined already ({existing})")
    directory.mkdir(parents=True, exist_ok=True)
    if text is None:
        text = dump_toml({"name": definition.name, **definition.document})
        suffix = ".toml"
    path = directory / f"{definition.name}{suffix}"
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)
    if existing is not None and existing != path:
        existing.unlink()
    return path


def remove(name: str, directory: Path | None = None) -> None:
    path = find(check_name(name), directory)
    if path is None:
        raise UnknownVm(f"no VM named {name!r} is defined")
    os.unlink(path)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list) and all(isinstance(item, (str, int, bool)) for item in value):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise ValueError(f"cannot write {value!r} as a TOML value")


def _toml_table(table: dict[str, Any]) -> list[str]:
    return [f"{key} = {_toml_value(value)}" for key, value in table.items() if value is not None]


def dump_toml(document: dict[str, Any]) -> str:
    """The TOML for a definition document (scalars first, then tables and arrays of tables)."""
    lines = ["# pyvmm VM definition: Firecracker's configuration fields; see `pyvmm define --help`"]
    lines += _toml_table({k: v for k, v in document.items() if not isinstance(v, (dict, list))})
    for key, value in document.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]", *_toml_table(value)]
        elif isinstance(value, list):
            for item in value:
                lines += ["", f"[[{key}]]", *_toml_table(item)]
    return "\n".join(lines) + "\n"
