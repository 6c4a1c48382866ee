"""The exported detector (``spp-det export``) run by onnxruntime: ``detect.runtime=onnxruntime``.

The onnxruntime engine of the one test procedure (``spp_det.detection.detector.WindowDetector``):
``conv5.onnx`` once per scale and ``head.onnx`` (fc6, fc7, SVM / softmax scores, box deltas) run in
onnxruntime, the pyramid pooling in numpy. Every rule around them is the PyTorch engine's own code
with the constants of ``spp_det_onnx.json`` (its ``model``, a ``Geometry``): sizes, best scale,
projection, ``normalize_image``, ``pad_to_minimum``, the pyramid's ``bin_edges``
(``spatial_pyramid_pool_numpy``), so the two engines cannot drift apart. The manifest names every
constant, for a port to another language.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spp_det import artifact
from spp_det.detection.detector import Step, WindowDetector
from spp_det.errors import UserError
from spp_det.features.backbones import normalize_image, pad_to_minimum
from spp_det.features.scales import ScaledSize, resize_image
from spp_det.model.sppnet import Geometry
from spp_det.ops import pyramid_dim
from spp_det.ops.spp_numpy import spatial_pyramid_pool_numpy
from spp_det.settings import SCORERS


def import_onnxruntime():
    """``onnxruntime``, or a clear error saying how to install it (the optional ``onnx`` extra)."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install -e '.[onnx]' (the optional onnx, "
                        "onnxruntime and onnxscript packages; README \"Use the model elsewhere\")") from None
    return onnxruntime


class OnnxDetector(WindowDetector):
    """An exported detector folder run by onnxruntime, with ``Detector``'s interface (``classes``,
    ``geometry``, ``detect``, ``detect_pair``, ``score_windows``), at ``test_scales`` /
    ``test_max_size`` when given, else the exported ones; ``threads``: onnxruntime's (default: torch's)."""

    def __init__(self, folder: str | Path, *, test_scales=None, test_max_size=None, scorer: str = "svm",
                 window_batch: int = 1000, threads: int | None = None):
        ort = import_onnxruntime()
        folder = Path(folder)
        manifest = artifact.load_export(folder)
        self.outputs = manifest["head"]["outputs"]  # scorer / "deltas" -> output name
        self.has_bbox_reg = "deltas" in self.outputs
        super().__init__(classes=manifest["classes"], scorer=scorer, window_batch=window_batch,
                         scorers=[s for s in SCORERS if s in self.outputs], holder=f"the export in {folder}")
        self.geometry = Geometry.of(manifest["model"], test_scales, test_max_size)
        self.pixel_mean, self.pixel_std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)
                                           for v in (self.geometry.pixel_mean, self.geometry.pixel_std))
        options = ort.SessionOptions()
        # as many threads as torch uses, so bench compares like with like (onnxruntime: all physical cores)
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        # threads that wait by sleeping, not spinning: detect/eval search proposals in worker processes
        # on the same cores, and spinning threads then wait on each other (as torch's OpenMP threads did)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        self.conv5_graph, self.head_graph = (
            ort.InferenceSession(str(folder / manifest["graphs"][name]), options, providers=providers)
            for name in ("conv5", "head"))

    def conv5_at(self, image: np.ndarray, size: ScaledSize) -> np.ndarray:
        """conv5.onnx of ``image`` resized to ``size``, normalised and padded as ``Backbone`` does:
        ``float32 [1, C, h, w]``."""
        x = normalize_image(resize_image(image, size), self.pixel_mean, self.pixel_std)
        x = pad_to_minimum(x, self.geometry.min_input).contiguous()
        return self.conv5_graph.run(None, {"image": x.numpy()})[0]

    def pool5(self, maps: list[np.ndarray], image_hw: tuple[int, int], windows: torch.Tensor) -> torch.Tensor:
        """``float32 [N, pool5_dim]``: each window pooled at its best scale (``Geometry.pool5_per_scale``), in numpy."""
        g = self.geometry
        out = torch.empty((len(windows), pyramid_dim(maps[0].shape[1], g.pyramid_levels)))

        def pool_at(fmap: np.ndarray, chosen: torch.Tensor, size: ScaledSize) -> torch.Tensor:
            cells = g.cells(chosen, size, fmap.shape[-2:]).numpy()
            return torch.from_numpy(spatial_pyramid_pool_numpy(fmap, cells, g.pyramid_levels))
        return g.pool5_per_scale(maps, image_hw, windows, out, pool_at)

    def head(self, pool5: torch.Tensor, deltas: bool, step: Step) -> tuple[torch.Tensor, torch.Tensor | None]:
        names = [self.outputs[self.scorer]] + ([self.outputs["deltas"]] if deltas else [])
        with step("fc"):  # fc6, fc7, the SVMs (or fc8) and the regressors: one graph
            out = self.head_graph.run(names, {"pool5": pool5.numpy()})
        return torch.from_numpy(out[0]), (torch.from_numpy(out[1]) if deltas else None)
