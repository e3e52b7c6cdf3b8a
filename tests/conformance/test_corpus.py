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


def test_no_known_fault_is_left():
    # The nine kinds of fault the corpus found (issue 18) are fixed; a new one is marked
    # `faults={towers: "kind N: ..."}` on its example until it is.
    assert [e.name for e in registry.examples() if e.faults] == []


def test_every_documented_limit_and_batch_normalization_is_named_by_the_check():
    # The check at the first fit names each documented cause (issue 19): the limits,
    # per-tower BatchNormalization, and a tolerance whose reason says "the check names it";
    # exact and random-draw examples raise no alarm (`alarm=None`).
    for example in registry.examples():
        names_a_cause = (
            example.status == "limit"
            or "BatchNormalization" in example.reason
            or "the check names it" in example.reason
        )
        assert (example.alarm is not None) == names_a_cause or example.name in SILENT_LIMITS, (
            example.name
        )


# Limits the check cannot measure, said in the example's reason: the model's own step
# draws random numbers, so only its forward pass is compared.
SILENT_LIMITS = {"simclr_contrastive"}


def test_the_table_has_a_row_per_example_before_any_run():
    text = table.render([], seconds=0.0)
    for example in registry.examples():
        assert f"| {example.name} | [{example.source}]" in text
    assert text.count("| not run | - | - |") == len(registry.examples())  # the first of 2


def test_a_pipe_in_a_criterion_does_not_break_the_table():
    line = table.row(["switch", r"raised in tower (0|1)", "not run"])
    assert line == r"| switch | raised in tower (0\|1) | not run |"
    assert line.replace(r"\|", "").count("|") == 4  # 3 cells
