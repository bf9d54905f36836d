"""PyBaMM ground truth for the edge BMS benchmark (a dev/bench part: ``edge_bms`` never
imports it; pybamm and fastsim are imported inside the functions that use them).

* :mod:`.truth`: the DFN (Chen2020, lumped thermal, IDAKLU) under one input-driven
  control law; segments, SOP truth by root finding, true capacity and R0, aging.
* :mod:`.profiles`: vehicle model, EPA cycles (fastsim), synthetic urban cycle, pulses.
* :mod:`.sensors`: BMS measurement errors (noise, ADC, gain/offset, dropouts).
* :mod:`.characterize`: pseudo-OCV and HPPC tests as lab CSV plus a protocol sidecar.
* :mod:`.dataset`: the fixed plan and split, ``generate(out, quick, jobs)``, manifest.

``labctl models bms-data`` runs :func:`labctl.models.bms.dataset.generate`.
"""
