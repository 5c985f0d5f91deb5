"""vfio-mediate support for the Intel X710/XL710 virtual function (8086:154c).

``i40e_mediator.model`` is the device model (entry point ``i40e-vf`` in ``vfio_mediate.devices``).
The package imports nothing of vfio-mediate: the core hands the model what it needs.
"""
