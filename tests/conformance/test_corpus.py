"""The corpus itself: its size, its coverage and the table it writes."""

import re

from conformance import harness, registry, table


def test_the_corpus_has_at_least_32_examples_with_unique_names():
    names = [example.name for example in registry.examples()]
    assert len(names) >= 32, len(names)
    assert len(set(names)) == len(names), sorted(n for n in names if names.count(n) > 1)


def test_every_family_is_covered_and_every_source_is_a_keras_io_path():
    examples = registry.examples()
    assert {e.family for e in examples} == set(harness.FAMILIES)
    for example in examples:
        assert re.fullmatch(r"(examples/[a-z_]+|guides)/[A-Za-z0-9_]+\.py", example.source), (
            example.name,
            example.source,
        )


def test_every_known_fault_names_its_kind():
    kinds = {
        int(reason[5]) for example in registry.examples() for reason in example.faults.values()
    }
    assert kinds == set(range(1, 10)) - {1}, kinds  # kind 1 is not seen on this corpus today


def test_the_table_has_a_row_per_example_before_any_run():
    text = table.render([], seconds=0.0)
    for example in registry.examples():
        assert f"| {example.name} | [{example.source}]" in text
    assert text.count("| not run | - | - |") == len(registry.examples())  # the first of 2


def test_a_pipe_in_a_criterion_does_not_break_the_table():
    text = table.render([], seconds=0.0)
    switch = next(line for line in text.splitlines() if line.startswith("| switch_transformer |"))
    assert r"split\|slice of the batch" in switch
    assert switch.replace(r"\|", "").count("|") == 12  # 11 cells
