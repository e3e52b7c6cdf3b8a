"""The corpus' session: one runner (one-device runs done once) and the results table."""

import os
import time

import pytest

import replicate
from conformance import harness, table

MEASURED = pytest.StashKey[dict]()
STARTED = pytest.StashKey[tuple[float, float]]()
OPTION = "--conformance-table"


def pytest_addoption(parser):
    parser.addoption(
        OPTION,
        default=None,
        metavar="PATH",
        help="after the run, write the conformance results table (Markdown) to PATH",
    )


def pytest_configure(config):
    config.stash[MEASURED] = {}
    config.stash[STARTED] = (time.perf_counter(), os.getloadavg()[0])


@pytest.fixture(scope="session")
def runner():
    """Trains each example once on one device, then over 2 and 3 of the simulated devices."""
    return harness.Runner(replicate.list_devices())


@pytest.fixture
def record(request):
    """Keeps a test's `Measurement` for the results table."""
    measured = request.config.stash[MEASURED]
    return lambda measurement: measured.__setitem__(request.node.nodeid, measurement)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    measurement = item.config.stash[MEASURED].get(item.nodeid)
    if measurement is not None and report.when == "call":
        measurement.outcome = "xfailed" if hasattr(report, "wasxfail") else report.outcome


def pytest_sessionfinish(session):
    path = session.config.getoption(OPTION, default=None)
    if path:
        started, load = session.config.stash[STARTED]
        measured = list(session.config.stash[MEASURED].values())
        seconds = time.perf_counter() - started
        table.write(path, measured, seconds=seconds, load=(load, os.getloadavg()[0]))
