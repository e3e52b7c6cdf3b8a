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


def test_the_distribution_has_its_own_name_and_a_plain_install_brings_no_scikit_learn():
    from importlib import metadata

    assert replicate.__distribution__ == "keras-replicate"
    assert metadata.version("keras-replicate") == replicate.__version__
    requirements = metadata.requires("keras-replicate")
    plain = sorted(r.split(";")[0].strip() for r in requirements if "extra ==" not in r)
    assert plain == ["keras<4,>=3.2", "numpy", "nvidia-ml-py", "tensorflow<2.22,>=2.16"]
    demo = [r.split(";")[0].strip() for r in requirements if 'extra == "demo"' in r]
    assert demo == ["scikit-learn"]
    files = {str(f) for f in metadata.files("keras-replicate")}
    assert "replicate/__init__.py" in files


def _site_with_replicate(tmp_path):
    """A copy of the installed package in a folder of its own, first on the path."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(Path(replicate.__file__).parent, site / "replicate")
    return site


def test_import_fails_early_beside_the_api_client_of_the_same_name(tmp_path):
    site = _site_with_replicate(tmp_path)
    foreign = site / "replicate-1.0.7.dist-info"
    foreign.mkdir()
    (foreign / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: replicate\nVersion: 1.0.7\n"
        "Summary: Python client for Replicate\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", "import replicate"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,  # not the checkout, whose replicate/ would come first
    )
    assert result.returncode == 1
    assert "ImportError: `import replicate` found keras-replicate" in result.stderr
    assert "the distribution `replicate` 1.0.7, an unrelated API client" in result.stderr
    assert "cannot share one environment" in result.stderr
    # This project's own metadata under its former name is not a conflict.
    (foreign / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: replicate\nVersion: 0.1.0\n"
        "Summary: Data-parallel training of Keras models on TensorFlow\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", "import replicate; print(replicate.__distribution__)"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,  # not the checkout, whose replicate/ would come first
    )
    assert result.stdout.strip() == "keras-replicate", result.stderr


def test_commands_refuse_a_replicate_package_that_is_not_this_project(tmp_path):
    # The API client installed over this project: its __init__.py, our cli.py.
    site = _site_with_replicate(tmp_path)
    (site / "replicate" / "__init__.py").write_text('"""Python client for Replicate."""\n')
    result = subprocess.run(
        [sys.executable, "-c", "from replicate.cli import main; main(['--help'])"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,  # not the checkout, whose replicate/ would come first
    )
    assert result.returncode == 1
    assert "replicate: error: the package `replicate` in this environment" in result.stderr
    assert "is not keras-replicate's" in result.stderr
