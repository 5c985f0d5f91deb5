"""vfio-mediate support for the Intel X710/XL710 virtual function (8086:154c).

- ``i40e_mediator.model``: the device model (entry point ``i40e-vf`` of ``vfio_mediate.devices``),
  a port of the process's switch;
- ``i40e_mediator.adminq``: its admin queue engine (ATQ/ARQ);
- ``i40e_mediator.pf``: the PF's side of virtchnl, which the model plays;
- ``i40e_mediator.virtchnl``: virtchnl opcodes, status codes and message layouts;
- ``i40e_mediator.switch``: the emulated switch of every VF of one process;
- ``i40e_mediator.offload``: the TX offloads (checksums, TSO);
- ``i40e_mediator.ports``: switch ports of objects that may be collected;
- ``i40e_mediator.mediator``: the mediator (entry point ``i40e`` of ``vfio_mediate.mediators``):
  dirty page tracking through trapped tail pages, migration v2 with a versioned state stream;
- ``i40e_mediator.guest``: a small virtchnl driver that runs traffic through the switch and
  back (entry point ``i40e-vf`` of ``vfio_mediate.workloads``);
- ``i40e_mediator.registers``: the register map and descriptor layouts all of them share;
- ``i40e_mediator.state``: the VF's saved state and its stream format.

The package imports nothing of vfio-mediate: the core hands it what it needs.
"""
