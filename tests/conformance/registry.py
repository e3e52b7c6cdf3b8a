"""Every example of the corpus, family by family, in the order of the results table."""

from __future__ import annotations

import importlib

from conformance import harness

MODULES = {
    "structured": "conformance.test_structured",
    "text": "conformance.test_text",
    "vision": "conformance.test_vision",
    "sequence": "conformance.test_sequence",
    "generative": "conformance.test_generative",
    "own_step": "conformance.test_own_step",
    "settings": "conformance.test_settings",
}


def examples() -> list[harness.Example]:
    """The examples each family module lists in its `EXAMPLES`."""
    found = []
    for family, module in MODULES.items():
        for example in importlib.import_module(module).EXAMPLES:
            assert example.family == family, (example.name, example.family, family)
            found.append(example)
    return found
