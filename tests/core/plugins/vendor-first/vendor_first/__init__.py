"""A third-party mediator that claims devices of vendor 0x1af4 ahead of everyone (tryfirst)."""

import pluggy

hookimpl = pluggy.HookimplMarker("vfio_mediate")


@hookimpl(tryfirst=True)
def mediator_open(device):
    if device.vendor_id != 0x1AF4:
        return None
    return {"device": device.name}


@hookimpl
def mediator_regions(handle):
    return [0]


@hookimpl
def mediator_rw(handle, index, offset, count, data, is_write):
    if not is_write and offset == 0:
        return b"\xee" * count
    return None
