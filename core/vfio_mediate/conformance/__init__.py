"""The plugin conformance suite: a pytest plugin that checks an installed mediator against
every rule of the hook contract.

It is registered through the ``pytest11`` entry point, so in any environment with vfio-mediate
installed::

    pytest --mediator NAME          # the suite, next to the project's own tests
    vfio-mediate check NAME         # the suite alone (pytest -p vfio_mediate.conformance
                                    #   --mediator NAME --conformance-only)

NAME is the mediator's entry point in ``vfio_mediate.mediators``. The suite opens the devices
the mediator's ``mediator_targets`` names (and look-alikes it must decline), drives every hook
through the real core, and fails each broken rule once, in one line that starts with its id
and names the plugin (``[rw-result] 'name' (distribution version): what, where``), the detail
on the lines after; a mediator that cannot be loaded fails the run at once, in one message.
Capabilities (migration v2, dirty logging, device-specific regions) are learnt from the hooks
(see ``MediatorCapabilities``); their tests skip, with the reason, when absent.
Dirty logging is checked against the writes the device really made, under the suite's accesses
and, for a target device model that ships a guest workload (``vfio_mediate.workloads``), under
that workload's traffic; the terminal summary shows the over-report ratio measured.
Without ``--mediator`` the plugin does nothing.
"""

from ._capabilities import MediatorCapabilities
from ._plugin import (
    DIRTY_LOGGING_PROPERTY,
    pytest_addoption,
    pytest_collection_finish,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_ignore_collect,
    pytest_report_header,
    pytest_runtest_makereport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)

__all__ = [
    "DIRTY_LOGGING_PROPERTY",
    "MediatorCapabilities",
    "pytest_addoption",
    "pytest_collection_finish",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_ignore_collect",
    "pytest_report_header",
    "pytest_runtest_makereport",
    "pytest_sessionfinish",
    "pytest_terminal_summary",
]
