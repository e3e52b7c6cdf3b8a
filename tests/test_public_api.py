"""The public surface and the installed artifact."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import replicate


def test_public_names():
    assert sorted(replicate.__all__) == sorted(
        [
            "Backend",
            "is_chief",
            "shard",
            "ReplicaBuilder",
            "ReplicatedModel",
            "__version__",
            "check",
            "get_backend",
            "list_devices",
            "process_devices",
            "replicate",
            "simulate_devices",
        ]
    )
    for name in replicate.__all__:
        assert hasattr(replicate, name), name


def test_tests_run_against_the_installed_package():
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(replicate.__file__).resolve().is_relative_to(site)


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("replicate")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    assert "demo" in result.stdout and "devices" in result.stdout
    bad = subprocess.run([script, "demo", "--devices", "0"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "--devices: must be a positive integer, got '0'" in bad.stderr
