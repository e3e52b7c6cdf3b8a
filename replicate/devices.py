"""Find, simulate and validate the devices that towers run on."""

from __future__ import annotations

import tensorflow as tf


def _short_name(device_type: str, index: int) -> str:
    return f"/{device_type.lower()}:{index}"


def _logical_devices() -> list[str]:
    return [_short_name(*_parse(d.name)) for d in tf.config.list_logical_devices()]


def _parse(name: str) -> tuple[str, int]:
    spec = tf.DeviceSpec.from_string(name)
    if spec.device_type is None:
        raise ValueError(f"Device names look like '/gpu:0' or '/cpu:1'. Received: {name!r}")
    return spec.device_type.upper(), 0 if spec.device_index is None else spec.device_index


def simulate_devices(n: int) -> list[str]:
    """Splits the CPU into `n` logical devices that stand in for GPUs.

    TensorFlow fixes its devices the first time it runs anything, so call this
    at program start, before building a model or running an op. Calling it
    again with the same `n` is harmless.

    Args:
        n: The number of logical CPU devices to create (at least 1).

    Returns:
        Their names, `["/cpu:0", ..., f"/cpu:{n - 1}"]`.

    Raises:
        ValueError: If `n` is not a positive integer.
        RuntimeError: If TensorFlow has already set up a different number of
            CPU devices.

    Example:

    ```python
    import replicate
    devices = replicate.simulate_devices(2)   # ["/cpu:0", "/cpu:1"]
    ```
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive integer number of devices. Received: n={n!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != n:
            raise RuntimeError(
                f"simulate_devices({n}) was called after TensorFlow had already "
                f"set up its devices ({have} CPU device(s)). Call "
                "`replicate.simulate_devices(n)` at program start, before "
                "building a model or running any TensorFlow op."
            ) from None
    return [_short_name("CPU", i) for i in range(n)]


def list_devices() -> list[str]:
    """Returns the devices that towers go on by default.

    Returns:
        The GPUs (`"/gpu:0"`, ...) if TensorFlow sees any, else the CPU
        devices (`"/cpu:0"`, ...; several after `simulate_devices`).
    """
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return [_short_name(*_parse(d.name)) for d in gpus]
    return [_short_name(*_parse(d.name)) for d in tf.config.list_logical_devices("CPU")]


def canonical_device(name: str, *, argument: str = "device") -> str:
    """Returns `name` as `/type:index` after checking that the device exists.

    Raises:
        TypeError: If `name` is not a string.
        ValueError: If no such device exists; the message lists those that do.
    """
    if not isinstance(name, str):
        raise TypeError(
            f"`{argument}` must be a device name string such as '/gpu:0'. "
            f"Received: {argument}={name!r} of type {type(name).__name__}"
        )
    try:
        short = _short_name(*_parse(name))
    except ValueError:
        short = None
    available = _logical_devices()
    if short not in available:
        raise ValueError(
            f"`{argument}` names a device that does not exist. Received: "
            f"{argument}={name!r}. Available devices: {available}. On a machine "
            "without GPUs, call `replicate.simulate_devices(n)` at program start."
        )
    return short


def validate_devices(devices: list[str] | tuple[str, ...] | None) -> list[str]:
    """Checks a list of tower devices; `None` means `list_devices()`.

    Raises:
        TypeError: If `devices` is not a list or tuple of strings.
        ValueError: If it is empty, repeats a device or names a missing one.
    """
    if devices is None:
        return list_devices()
    if isinstance(devices, str) or not isinstance(devices, (list, tuple)):
        raise TypeError(
            "`devices` must be a list of device names such as ['/gpu:0', '/gpu:1']. "
            f"Received: devices={devices!r}"
        )
    if not devices:
        raise ValueError(
            "`devices` must be a non-empty list of device names. Received: "
            f"devices={list(devices)!r}. Pass None to use every tower device: the GPUs, "
            f"else the simulated CPU devices ({list_devices()} here)."
        )
    names = [canonical_device(d, argument="devices") for d in devices]
    seen = set()
    for original, name in zip(devices, names):
        if name in seen:
            raise ValueError(
                "`devices` must not name a device twice; each tower needs its own "
                f"device. Received: devices={list(devices)!r} ({original!r} "
                "repeats an earlier entry)."
            )
        seen.add(name)
    return names


def process_devices(
    local_rank: int | None = None,
    local_size: int | None = None,
    devices: list[str] | None = None,
) -> list[str]:
    """This process's share of its machine's GPUs, by local rank.

    With several processes on one machine (`horovodrun -np 4 -H host:4`,
    `replicate launch --nproc 4`), each takes a contiguous block of the
    machine's GPUs: 8 GPUs and 4 processes give local rank 1 `/gpu:2` and
    `/gpu:3`; a remainder goes to the first ranks. CPU devices (a machine
    without GPUs, or simulated ones) are not shared: every process has its own.

    Args:
        local_rank: This process's index on its machine. Defaults to the
            launcher's environment (0 outside a launcher).
        local_size: The number of processes on this machine. Defaults to
            the launcher's environment (1 outside a launcher).
        devices: The machine's devices. Defaults to `list_devices()`.

    Returns:
        The device names for this process's towers.

    Raises:
        ValueError: If the machine has fewer GPUs than processes, or
            `local_rank` is outside `[0, local_size)`.

    Example:

    ```python
    devices = replicate.process_devices()   # under horovodrun: this rank's GPUs
    parallel = replicate.replicate(model, devices, backend="horovod")
    ```
    """
    from replicate import cluster

    local_rank = cluster.local_rank() if local_rank is None else local_rank
    local_size = cluster.local_size() if local_size is None else local_size
    if not 0 <= local_rank < local_size:
        raise ValueError(
            "`local_rank` must be in [0, local_size). Received: "
            f"local_rank={local_rank}, local_size={local_size}."
        )
    devices = list_devices() if devices is None else list(devices)
    gpus = [d for d in devices if d.startswith("/gpu:")]
    if local_size == 1 or not gpus:
        return devices
    if len(gpus) < local_size:
        raise ValueError(
            f"This machine runs {local_size} processes of the job but has only "
            f"{len(gpus)} GPU(s) ({gpus}); each process needs at least one. Start at "
            f"most {len(gpus)} processes per machine (horovodrun -H host:{len(gpus)}, "
            f"replicate launch --nproc {len(gpus)}), or pass `devices` yourself."
        )
    base, extra = divmod(len(gpus), local_size)
    start = local_rank * base + min(local_rank, extra)
    return gpus[start : start + base + (1 if local_rank < extra else 0)]
