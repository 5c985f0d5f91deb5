"""The sample mediator targeting only its plain device: it keeps every rule and logs dirty
pages, but a plain device does no DMA and has no guest workload, so the suite has nothing to
compare its log with."""

from typing import Any

from sample_mediator import SampleMediator, hookimpl
from sample_mediator.model import PLAIN_DEVICE_ID, VENDOR_ID, spec


class PlainOnly(SampleMediator):
    targets = ((VENDOR_ID, PLAIN_DEVICE_ID),)

    @hookimpl
    def mediator_targets(self) -> list[Any]:
        return [{**spec(PLAIN_DEVICE_ID), "name": "sample-plain"}]


plugin = PlainOnly()
