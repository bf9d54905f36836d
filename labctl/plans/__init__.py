"""Bluesky plans that make and test electrolytes and cells (see docs/plans.md).

* :mod:`labctl.plans.electrolyte`: ``prepare_electrolyte``, ``measure_conductivity``,
  ``move_vial``, ``prepare_and_measure``;
* :mod:`labctl.plans.cycling`: ``cycle_cell``, ``hppc`` and cycling protocols;
* :mod:`labctl.plans.ecm`: equivalent-circuit parameters from pulse data;
* :mod:`labctl.plans.dosing`: gravimetric dosing stubs;
* :mod:`labctl.plans.common`: parameters, metadata, records and the run wrapper;
* :mod:`labctl.plans.registry`: the plans by name with their parameter models;
* :mod:`labctl.plans.session`: the lab to run against (simulated, or from records).
"""
