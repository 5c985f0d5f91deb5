"""A plain device model (registers are memory) with no guest workload."""


def create() -> tuple[dict[str, object], None]:
    """The ``vfio_mediate.devices`` factory: a spec and no behaviour object."""
    spec = {
        "name": "aa-first",
        "vendor_id": 0x1AF4,
        "device_id": 0x10FF,
        "class_code": 0xFF0000,
        "bars": [{"index": 0, "size": 0x1000}],
    }
    return spec, None
