"""Device simulation, discovery and validation."""

import pytest
import tensorflow as tf

import replicate
from replicate.devices import canonical_device, validate_devices


def test_simulate_again_with_same_count_is_fine():
    assert replicate.simulate_devices(4) == ["/cpu:0", "/cpu:1", "/cpu:2", "/cpu:3"]


def test_simulate_after_start_with_other_count_says_call_at_program_start():
    tf.constant(1.0)  # TensorFlow has started: its devices are fixed now.
    with pytest.raises(RuntimeError, match=r"simulate_devices\(2\).*at program start"):
        replicate.simulate_devices(2)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_simulate_rejects_non_positive_counts(bad):
    with pytest.raises(ValueError, match=r"Received: n="):
        replicate.simulate_devices(bad)


def test_list_devices_falls_back_to_cpu_devices():
    assert replicate.list_devices() == ["/cpu:0", "/cpu:1", "/cpu:2", "/cpu:3"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("/cpu:1", "/cpu:1"),
        ("CPU:2", "/cpu:2"),
        ("/device:CPU:3", "/cpu:3"),
        ("/job:localhost/replica:0/task:0/device:CPU:0", "/cpu:0"),
    ],
)
def test_device_names_are_canonical(name, expected):
    assert canonical_device(name) == expected


def test_missing_device_lists_available_ones():
    with pytest.raises(ValueError, match=r"devices='/gpu:0'.*Available devices: \['/cpu:0'"):
        validate_devices(["/cpu:0", "/gpu:0"])


def test_empty_device_list():
    with pytest.raises(ValueError, match=r"non-empty list.*Received: devices=\[\]"):
        validate_devices([])


def test_duplicate_devices():
    with pytest.raises(ValueError, match=r"twice.*'CPU:1' repeats"):
        validate_devices(["/cpu:1", "CPU:1"])


def test_devices_must_be_a_list():
    with pytest.raises(TypeError, match=r"Received: devices='/cpu:0'"):
        validate_devices("/cpu:0")


def test_garbage_device_name():
    with pytest.raises(ValueError, match=r"devices='tpu please'"):
        validate_devices(["tpu please"])
