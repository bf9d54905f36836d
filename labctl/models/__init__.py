"""Models trained in torch, exported to ONNX, stored by content and served with onnxruntime.

* :mod:`labctl.models.registry`: content-addressed store (``<root>/<name>/<sha256>.onnx``
  and its metadata), versions, promote-if-not-worse, rollback; hashes verified at load.
* :mod:`labctl.models.runtime`: onnxruntime sessions (CUDA only when it really runs,
  else CPU), input validation against the recorded ranges, batched inference.
* :mod:`labctl.models.property`: electrolyte formulation -> conductivity ensemble
  (``PropertyPredictor``).
* :mod:`labctl.models.cell`: early-cycle features (Severson et al. 2019) -> capacity
  retention (``CellPredictor``).
* :mod:`labctl.models.training_data`: conductivity measurements from Tiled as a table.
* :mod:`labctl.models.update`: retrain (property or cell model), validate on held-out
  data, promote if not worse.

Importing this package is cheap: torch, onnx, onnxruntime and rdkit are imported by the
functions that use them. See docs/models.md.
"""

from __future__ import annotations

__all__: list[str] = []
