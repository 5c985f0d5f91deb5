"""A vendor's mediator with a typo in a hook name: it must not load, and its devices must not
be served unmediated as if nothing were wrong."""

import pluggy

hookimpl = pluggy.HookimplMarker("vfio_mediate")


@hookimpl(tryfirst=True)
def mediator_open(device):
    if (device.vendor_id, device.device_id) != (0x1AF4, 0x1041):
        return None
    return object()


@hookimpl
def mediator_get_region_inof(handle, info):
    info["sparse_mmap"] = []
    return info
