"""A third-party mediator at default priority whose name sorts first; claims vendor 0x1af4."""

import pluggy

hookimpl = pluggy.HookimplMarker("vfio_mediate")


@hookimpl
def mediator_open(device):
    return 0 if device.vendor_id == 0x1AF4 else None
