"""Round trips for saved states: a State through its JSON form and back."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

from pyvmm.persist import State

S = TypeVar("S", bound=State)


def through_json(state: S) -> S:
    """The state as another process would read it back: to_dict -> JSON text -> from_dict."""
    return type(state).from_dict(json.loads(json.dumps(state.to_dict())))


def changed(state: S, **fields: Any) -> S:
    """A copy with some fields replaced (constructing it runs the state's checks)."""
    return dataclasses.replace(state, **fields)


def tampered(state: State, **fields: Any) -> dict:
    """The serialised form with some fields replaced, bypassing construction (as a file could)."""
    data = json.loads(json.dumps(state.to_dict()))
    data["fields"].update(fields)
    return data
