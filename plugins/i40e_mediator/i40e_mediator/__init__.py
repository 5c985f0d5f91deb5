"""vfio-mediate support for the Intel X710/XL710 virtual function (8086:154c).

- ``i40e_mediator.model``: the device model (entry point ``i40e-vf`` of ``vfio_mediate.devices``);
- ``i40e_mediator.mediator``: the mediator (entry point ``i40e`` of ``vfio_mediate.mediators``):
  dirty page tracking through trapped tail pages, migration v2 with a versioned state stream;
- ``i40e_mediator.guest``: a guest driver that runs looping traffic (entry point ``i40e-vf`` of
  ``vfio_mediate.workloads``);
- ``i40e_mediator.registers``: the register map and descriptor layouts all of them share;
- ``i40e_mediator.state``: the VF's saved state and its stream format.

The package imports nothing of vfio-mediate: the core hands it what it needs.
"""
