"""Loader for the golden wire vectors in ``tests/golden`` (see its README).

The vectors were recorded from the real Go libraries (storj.io/drpc,
hashicorp/yamux), so tests compare our bytes against them rather than against
our own encoders.  Each load re-checks the recorded sha256 of the canonical
streams, so a damaged or hand-edited file fails loudly instead of silently
weakening every test that uses it.

Set ``CODERAGENT_VECTORS`` to use a different directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VECTORS_DIR = Path(os.environ.get("CODERAGENT_VECTORS", ROOT / "tests" / "golden"))


@functools.cache
def load(name: str) -> dict[str, Any]:
    """The parsed JSON of ``name`` (with or without ``.json``), sha256 checked."""
    if not name.endswith(".json"):
        name += ".json"
    with open(VECTORS_DIR / name, encoding="utf-8") as f:
        vector: dict[str, Any] = json.load(f)
    for direction in ("client_to_server", "server_to_client"):
        hexKey = f"{direction}_hex"
        if hexKey not in vector:
            continue
        data = bytes.fromhex(vector[hexKey])
        expected = vector.get(f"{direction}_sha256")
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(f"{name}: {hexKey} does not match its recorded sha256")
        if f"{direction}_len" in vector and len(data) != vector[f"{direction}_len"]:
            raise ValueError(f"{name}: {hexKey} does not match its recorded length")
    return vector


def canonicalStreams(name: str) -> tuple[bytes, bytes]:
    """The canonical ``(client_to_server, server_to_client)`` byte streams of ``name``."""
    vector = load(name)
    return (
        bytes.fromhex(vector["client_to_server_hex"]),
        bytes.fromhex(vector["server_to_client_hex"]),
    )


def variants(name: str) -> list[dict[str, Any]]:
    """``observed_variants`` of ``name``: every pair Go produced, canonical one included."""
    return list(load(name)["observed_variants"])
