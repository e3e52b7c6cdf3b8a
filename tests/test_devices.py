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
    with pytest.raises(ValueError, match=r"non-empty list.*Received: devices=\[\]") as raised:
        validate_devices([])
    # What None means, with the devices it would take here (simulated CPUs on this machine).
    assert "Pass None to use every tower device: the GPUs, else the simulated CPU" in str(
        raised.value
    )
    assert "'/cpu:0'" in str(raised.value)


def test_duplicate_devices():
    with pytest.raises(ValueError, match=r"twice.*'CPU:1' repeats"):
        validate_devices(["/cpu:1", "CPU:1"])


def test_devices_must_be_a_list():
    with pytest.raises(TypeError, match=r"Received: devices='/cpu:0'"):
        validate_devices("/cpu:0")


def test_garbage_device_name():
    with pytest.raises(ValueError, match=r"devices='tpu please'"):
        validate_devices(["tpu please"])


GPUS = [f"/gpu:{i}" for i in range(8)]


@pytest.mark.parametrize(
    "local_rank, local_size, expected",
    [
        (0, 1, GPUS),
        (1, 4, ["/gpu:2", "/gpu:3"]),
        (3, 4, ["/gpu:6", "/gpu:7"]),
        (0, 3, ["/gpu:0", "/gpu:1", "/gpu:2"]),  # 8 = 3 + 3 + 2: the remainder goes first
        (2, 3, ["/gpu:6", "/gpu:7"]),
        (7, 8, ["/gpu:7"]),
    ],
)
def test_process_devices_share_a_hosts_gpus_by_local_rank(local_rank, local_size, expected):
    assert replicate.process_devices(local_rank, local_size, GPUS) == expected


def test_every_gpu_goes_to_exactly_one_process():
    shares = [replicate.process_devices(r, 3, GPUS[:7]) for r in range(3)]
    assert sum(shares, []) == GPUS[:7]


def test_too_few_gpus_for_the_processes():
    with pytest.raises(ValueError, match=r"runs 4 processes of the job but has only 2 GPU"):
        replicate.process_devices(0, 4, GPUS[:2])


def test_cpu_devices_are_not_shared():
    cpus = ["/cpu:0", "/cpu:1"]
    assert replicate.process_devices(1, 2, cpus) == cpus


def test_process_devices_reads_the_launchers_environment(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert replicate.process_devices(devices=GPUS[:4]) == ["/gpu:2", "/gpu:3"]
    with pytest.raises(ValueError, match=r"local_rank=2, local_size=2"):
        replicate.process_devices(2, 2, GPUS[:4])
