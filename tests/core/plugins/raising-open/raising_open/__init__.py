"""A mediator that raises in mediator_open (and is asked before the others)."""

import pluggy

hookimpl = pluggy.HookimplMarker("vfio_mediate")


@hookimpl(tryfirst=True)
def mediator_open(device):
    raise RuntimeError("firmware handshake failed")
