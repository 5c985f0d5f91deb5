"""A mediator with a valid hook and one whose arguments do not match the contract."""

import pluggy

hookimpl = pluggy.HookimplMarker("vfio_mediate")


@hookimpl
def mediator_open(device):
    return object()


@hookimpl
def mediator_rw(handle, region, offset, count, data, is_write):
    return None
