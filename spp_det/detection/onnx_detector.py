"""The exported detector (``spp-det export``) run by onnxruntime: ``detect.runtime=onnxruntime``.

    image ─► resize per scale (OpenCV) ─► normalise, pad ─► conv5.onnx ─► conv5 map per scale
    window ─► best scale ─► project onto conv5 ─► pyramid pooling (numpy) ─► pool5
    pool5 ─► head.onnx ─► SVM scores [N, K] (softmax [N, K]) and box deltas [N, K, 4]
          ─► boxes moved and clipped ─► threshold, per-class NMS, top 100      (WindowDetector)

Only the two graphs run in onnxruntime; between them the steps are this package's own functions
(``scaled_sizes``, ``resize_image``, ``best_scale``, ``scale_windows``, ``project_windows``,
``bin_edges`` through ``spatial_pyramid_pool_numpy``, ``bboxreg.apply_in_image``, ``postprocess``),
the ones the PyTorch path calls, so the two runtimes cannot drift apart; the geometry functions run
on CPU tensors viewing the numpy arrays. ``spp_det_onnx.json`` names every constant they need, for
a port to another language.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spp_det import artifact
from spp_det.detection.detector import SCORERS, WindowDetector
from spp_det.errors import UserError
from spp_det.features.projection import project_windows
from spp_det.features.scales import best_scale, resize_image, scale_windows, scaled_sizes
from spp_det.heads import bboxreg
from spp_det.ops.spp_numpy import spatial_pyramid_pool_numpy


def import_onnxruntime():
    """``onnxruntime``, or a clear error saying how to install it (the optional ``onnx`` extra)."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install -e '.[onnx]' (the optional onnx, "
                        "onnxruntime and onnxscript packages; README \"Use the model elsewhere\")") from None
    return onnxruntime


@dataclass(frozen=True)
class ExportedModel:
    """What ``spp_det_onnx.json`` says about the network around the graphs (its ``model`` part), at
    the test scales: every constant of the steps between the graphs."""

    scales: tuple[int, ...]
    max_size: int | None
    best_scale_area: float
    projection: str
    stride: int
    centre0: float
    release_shrink: float
    pyramid_levels: tuple[int, ...]
    pixel_mean: tuple[float, float, float]   # per RGB channel, 0..255 pixel scale
    pixel_std: tuple[float, float, float]
    min_input: int                           # inputs smaller than this are zero-padded (bottom/right) first

    @classmethod
    def of(cls, manifest: dict, scales=None, max_size=None) -> "ExportedModel":
        model = dict(manifest["model"])
        model["scales"] = tuple(int(s) for s in (scales or model["scales"]))
        model["max_size"] = max_size or model["max_size"]
        model["pyramid_levels"] = tuple(model["pyramid_levels"])
        model["pixel_mean"], model["pixel_std"] = tuple(model["pixel_mean"]), tuple(model["pixel_std"])
        return cls(**model)

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """RGB ``uint8 [h, w, 3]`` -> ``float32 [1, 3, h', w']``: ``(x - mean) / std`` in float32 (the
        same arithmetic as ``Backbone.normalize``), zero-padded to ``min_input`` as ``Backbone.pad_to_minimum``."""
        x = image.transpose(2, 0, 1)[None].astype(np.float32)
        x = (x - np.float32(self.pixel_mean).reshape(1, 3, 1, 1)) / np.float32(self.pixel_std).reshape(1, 3, 1, 1)
        h, w = x.shape[-2:]
        return np.pad(x, ((0, 0), (0, 0), (0, max(0, self.min_input - h)), (0, max(0, self.min_input - w))))


class OnnxDetector(WindowDetector):
    """An exported detector folder run by onnxruntime, with ``Detector``'s interface (``classes``,
    ``detect``, ``detect_pair``, ``score_windows``; ``model`` holds the scales)."""

    def __init__(self, folder: str | Path, test_scales=None, test_max_size=None, scorer: str = "svm",
                 window_batch: int = 1000, threads: int | None = None):
        ort = import_onnxruntime()
        folder = Path(folder)
        manifest = artifact.load_export(folder)
        if scorer not in SCORERS:
            raise UserError(f"scorer must be one of {', '.join(SCORERS)}, not {scorer!r}")
        self.outputs = manifest["head"]["outputs"]  # scorer / "deltas" -> output name
        if scorer not in self.outputs:
            raise UserError(f"{folder}: scorer={scorer} needs the fine-tuned fc8, which this export does not hold")
        self.classes = list(manifest["classes"])
        self.model = ExportedModel.of(manifest, test_scales, test_max_size)
        self.scorer, self.window_batch = scorer, int(window_batch)
        options = ort.SessionOptions()
        # as many threads as torch uses, so bench compares like with like (onnxruntime: all physical cores)
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        # threads that wait by sleeping, not spinning: detect/eval search proposals in worker processes
        # on the same cores, and spinning threads then wait on each other (as torch's OpenMP threads did)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        self.conv5, self.head = (ort.InferenceSession(str(folder / manifest["graphs"][name]), options, providers=providers)
                                 for name in ("conv5", "head"))

    @property
    def has_bbox_reg(self) -> bool:
        return "deltas" in self.outputs

    @classmethod
    def load(cls, folder: str | Path, test_scales=None, test_max_size=None, **kwargs) -> "OnnxDetector":
        return cls(folder, test_scales, test_max_size, **kwargs)

    def conv5_maps(self, image: np.ndarray) -> list[np.ndarray]:
        """One ``float32 [1, C, h_s, w_s]`` conv5 map per scale (sizes ``max_size`` caps alike share one)."""
        sizes = scaled_sizes(image.shape[0], image.shape[1], self.model.scales, self.model.max_size)
        maps: dict[tuple[int, int], np.ndarray] = {}
        for size in sizes:
            if (size.height, size.width) not in maps:
                x = self.model.normalize(resize_image(image, size))
                maps[size.height, size.width] = self.conv5.run(None, {"image": x})[0]
        return [maps[size.height, size.width] for size in sizes]

    def pool5(self, maps: list[np.ndarray], image_hw: tuple[int, int], windows: np.ndarray) -> np.ndarray:
        """``float32 [N, pool5_dim]``: each window pooled at its best scale (``SPPNet.pool5``'s rule)."""
        m = self.model
        sizes = scaled_sizes(int(image_hw[0]), int(image_hw[1]), m.scales, m.max_size)
        boxes = torch.from_numpy(windows)
        scale_of = best_scale(boxes, sizes, m.best_scale_area).numpy()
        out = None
        for s, (size, fmap) in enumerate(zip(sizes, maps)):
            chosen = np.flatnonzero(scale_of == s)
            if chosen.size == 0:
                continue
            cells = project_windows(scale_windows(boxes[chosen], size), fmap.shape[-2:], m.stride, m.centre0,
                                    m.projection, m.release_shrink).numpy()
            pooled = spatial_pyramid_pool_numpy(fmap, cells, m.pyramid_levels)
            if out is None:
                out = np.empty((len(windows), pooled.shape[1]), np.float32)
            out[chosen] = pooled
        return out

    def _score_on_device(self, image: np.ndarray, proposals, bbox_reg: bool,
                         timings: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        windows = np.ascontiguousarray(np.asarray(proposals, np.float32).reshape(-1, 4))
        height, width = image.shape[:2]
        use_reg = bool(bbox_reg) and self.has_bbox_reg
        if not len(windows):
            k, boxes = len(self.classes), torch.from_numpy(windows)
            return boxes.new_zeros(0, k), boxes.new_zeros(0, k, 4) if use_reg else boxes
        with self._timed(timings, "conv5"):
            maps = self.conv5_maps(image)
        with self._timed(timings, "pool"):
            pool5 = self.pool5(maps, (height, width), windows)
        names = [self.outputs[self.scorer]] + ([self.outputs["deltas"]] if use_reg else [])
        scores, boxes = [], []
        for start in range(0, len(windows), self.window_batch):
            with self._timed(timings, "fc"):  # fc6, fc7, the SVMs (or fc8) and the regressors: one graph
                out = self.head.run(names, {"pool5": pool5[start: start + self.window_batch]})
            scores.append(torch.from_numpy(out[0]))
            if use_reg:
                with self._timed(timings, "bboxreg"):
                    chunk = torch.from_numpy(windows[start: start + self.window_batch])
                    boxes.append(bboxreg.apply_in_image(chunk, torch.from_numpy(out[1]), height, width))
        return torch.cat(scores), (torch.cat(boxes) if use_reg else torch.from_numpy(windows))
