"""``spp-det export export.checkpoint=MODEL.pt export.output=DIR``: the detector for onnxruntime.

Writes into ``DIR`` (``spp_det.artifact``'s names, each file atomically):

- ``conv5.onnx``: the conv layers, ``image`` ``float32 [1, 3, h, w]`` (resized, normalised, padded to
  ``min_input``; h and w dynamic) -> ``conv5`` ``float32 [1, C, h / 16, w / 16]``;
- ``head.onnx``: ``pool5`` ``float32 [N, D]`` (N dynamic) -> ``svm_scores`` ``[N, K]`` (the SVMs on fc7
  scaled to norm 20), ``softmax_scores`` ``[N, K]`` (the fine-tuned fc8, background dropped; when the
  model holds fc8) and ``box_deltas`` ``[N, K, 4]`` (box regression of pool5; when it holds regressors);
- ``spp_det_onnx.json``: classes, scales, ``max_size``, best-scale area, projection rule and its
  constants, pyramid levels, normalisation, the test thresholds, the source checkpoint.

Why two graphs with the pyramid pooling between them (``spp_det.detection.onnx_detector``, numpy)
rather than one graph: the windows' best scale and projection are data-dependent integer geometry
the exporter would trace into shape-specialised guards; torchvision's ``roi_pool`` does not translate
under torch 2.14.1's default (dynamo) exporter (it stops with a ``ConversionError``, a ``TypeError`` in
translating ``torchvision::roi_pool``; tried with the pinned versions); and a hand-built ONNX
``MaxRoiPool`` + ``ReduceMax`` graph would define the pyramid's bins a second time (in float
arithmetic), where the numpy pooling takes them from the same ``bin_edges`` as the torch op, so the
two runtimes cannot drift. The two graphs hold only convolutions and matrix products:
``torch.onnx.export(..., dynamo=True)`` exports them for any backbone, and onnxruntime reproduces
PyTorch to float rounding.

``export.verify=true`` then runs the PyTorch detector and the exported one on a random image and
windows and refuses the export when their scores differ by more than 1e-3 or their boxes by more
than 1 px (the parity tolerances of docs/export.md, "Use the model elsewhere").
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from spp_det import artifact
from spp_det.boxes import random_windows
from spp_det.detection.detector import Detector
from spp_det.detection.onnx_detector import OnnxDetector, import_onnxruntime
from spp_det.errors import UserError
from spp_det.heads import bboxreg
from spp_det.io import hash_file, write_json
from spp_det.settings import RunSettings

log = logging.getLogger(__name__)

SCORE_TOLERANCE = 1e-3   # export.verify and tests/test_onnx.py: scores (SVM margins) within this
BOX_TOLERANCE = 1.0      # and boxes within this many pixels


class HeadGraph(nn.Module):
    """pool5 ``[N, D]`` -> ``svm_scores [N, K]`` (+ ``softmax_scores [N, K]``, ``box_deltas [N, K, 4]``): the
    detector's fc6 -> fc7 -> SVMs (and fc8, box regression), the steps of ``Detector.head``."""

    def __init__(self, detector: Detector):
        super().__init__()
        d = detector
        self.head = d.model.head
        self.register_buffer("svm_weight", d.svm_weight.T.contiguous() * d.svm_scale)  # [D7, K]: scale folded in
        self.register_buffer("svm_bias", d.svm_bias)
        self.fc8 = d.fc8 is not None
        if self.fc8:
            self.register_buffer("fc8_weight", d.fc8["weight"].T.contiguous())
            self.register_buffer("fc8_bias", d.fc8["bias"])
        self.bbox = d.bbox_weight is not None
        if self.bbox:
            self.register_buffer("bbox_weight", d.bbox_weight)
            self.bbox_scale = d.bbox_scale

    def output_names(self) -> list[str]:
        # not "softmax" / "scores": the exporter names its own values after their ops, and a graph output of
        # the same name is a duplicate definition onnxruntime refuses
        return ["svm_scores"] + (["softmax_scores"] if self.fc8 else []) + (["box_deltas"] if self.bbox else [])

    def forward(self, pool5: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fc7 = self.head(pool5)
        out = [fc7 @ self.svm_weight + self.svm_bias]
        if self.fc8:
            out.append(torch.softmax(fc7 @ self.fc8_weight + self.fc8_bias, dim=1)[:, 1:])
        if self.bbox:
            out.append(bboxreg.predict(pool5 * self.bbox_scale, self.bbox_weight))
        return tuple(out)


def _export(module: nn.Module, example: torch.Tensor, dynamic: dict, names: tuple[list[str], list[str]],
            path: Path, opset: int) -> None:
    """``torch.onnx.export`` (the dynamo exporter) of ``module`` to ``path``, weights inside the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals; its errors still raise
        torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=names[0], output_names=names[1],
                          dynamic_shapes=(dynamic,), opset_version=int(opset), external_data=False,
                          verbose=False)


def _require_dynamic(path: Path, axes: tuple[int, ...], what: str) -> None:
    """A clear error when the exporter fixed an input axis that must stay free (a graph for one size)."""
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    if any(not dims[a].dim_param for a in axes):
        raise UserError(f"{path.name}: the exporter fixed the {what} ({[d.dim_param or d.dim_value for d in dims]}): "
                        "this backbone cannot be exported for any input size; please report it")


def manifest(detector: Detector, opset: int, test: dict, source: dict) -> dict:
    """The ``spp_det_onnx.json`` of ``detector`` (module docstring; ``model`` is its ``Geometry``)."""
    m, backbone = detector.model, detector.model.backbone
    outputs = {"svm": "svm_scores", **({"softmax": "softmax_scores"} if detector.fc8 is not None else {}),
               **({"deltas": "box_deltas"} if detector.bbox_weight is not None else {})}
    return {
        "format": artifact.EXPORT_FORMAT, "version": artifact.EXPORT_VERSION,
        "classes": list(detector.classes),
        "graphs": {"conv5": artifact.EXPORT_CONV5, "head": artifact.EXPORT_HEAD},
        "model": dataclasses.asdict(m.geometry),
        "conv5": {"input": "image", "output": "conv5", "channels": int(backbone.out_channels)},
        "head": {"input": "pool5", "pool5_dim": int(m.pool5_dim), "fc_dim": int(m.head.out_dim), "outputs": outputs},
        "steps": ["resize: shorter side to each scale (longer side at most max_size), OpenCV bilinear",
                  "normalise: (RGB - pixel_mean) / pixel_std, float32, NCHW; zero-pad bottom/right to min_input",
                  "conv5.onnx once per scale",
                  "best scale per window: scaled area closest to best_scale_area",
                  "project onto that scale's conv5 (rule `projection`, spp_det/features/projection.py)",
                  "pyramid max-pooling, pyramid_levels, channel-major per level (spp_det/ops/spp.py)",
                  "head.onnx: scores, deltas; boxes = deltas applied to the windows (R-CNN), clipped to the image",
                  "per class: scores > score_thresh, NMS at nms_iou; top max_per_image"],
        "test": test,
        "opset": int(opset),
        "source": source,
    }


def require_onnx() -> None:
    """A clear error, before any work, when the optional onnx extra is not installed."""
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it, and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("exporting to ONNX needs the onnx extra: pip install -e '.[onnx]' (onnx, onnxscript, "
                        "onnxruntime)") from None
    import_onnxruntime()


def export_detector(detector: Detector, output: Path, opset: int, test: dict, source: dict,
                    check: Callable[[Path], None] | None = None) -> list[Path]:
    """Write ``detector`` (fp32, as trained) into ``output``: both graphs and the manifest. They are
    written into a private folder inside ``output`` first, ``check(folder)`` (when given) may refuse them
    there, and they are moved into place with the manifest last (an earlier manifest removed first): a
    folder is an export only once its manifest is there, so a crash or a refusal leaves none that a
    later run would trust."""
    m = detector.model
    # AUTO, not named Dims: ZF-5's ceil-mode max-pooling makes torch.export record guards on the sizes'
    # parity, which named Dims refuse; AUTO keeps them as runtime checks and the sizes symbolic (checked
    # below; onnxruntime then equals PyTorch at every size tried, 40..71 x 40..89)
    height = width = windows = torch.export.Dim.AUTO
    side = max(int(m.backbone.min_input), 64)
    head = HeadGraph(detector).eval()
    names = [artifact.EXPORT_CONV5, artifact.EXPORT_HEAD, artifact.EXPORT_MANIFEST]
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=output))
    try:
        with torch.no_grad():
            _export(m.backbone.eval(), torch.zeros(1, 3, side, side + 16), {2: height, 3: width},
                    (["image"], ["conv5"]), staging / names[0], opset)
            _export(head, torch.zeros(4, m.pool5_dim), {0: windows}, (["pool5"], head.output_names()),
                    staging / names[1], opset)
        _require_dynamic(staging / names[0], (2, 3), "image height and width")
        _require_dynamic(staging / names[1], (0,), "number of windows")
        write_json(manifest(detector, opset, test, source), staging / names[2])
        if check is not None:
            check(staging)
        (output / names[2]).unlink(missing_ok=True)
        for name in names:  # the manifest last
            os.replace(staging / name, output / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [output / name for name in names]


def verify(detector: Detector, folder: Path, seed: int = 0) -> dict:
    """Max differences between the PyTorch ``detector`` and its export in ``folder`` on a random
    image (240 x 320) and 300 random windows: ``{"scores": ..., "boxes": ...}`` (every scorer output)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    windows = random_windows(240, 320, 300, rng)
    exported = OnnxDetector(folder, scorer=detector.scorer)
    s_torch, b_torch = detector.score_windows(image, windows)
    s_onnx, b_onnx = exported.score_windows(image, windows)
    return {"scores": float((s_torch - s_onnx).abs().max()), "boxes": float((b_torch - b_onnx).abs().max())}


def run(cfg) -> int:
    from omegaconf import OmegaConf

    from spp_det.stages.detect import checkpoint_path

    rs = RunSettings.of(cfg)
    if OmegaConf.is_missing(rs.cfg.export, "output"):
        raise UserError("spp-det export needs export.output=DIR (the folder to write the graphs into)")
    e, d = rs.export, rs.detect
    require_onnx()
    output = Path(e.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"export.output={output}: a file is there, not a folder; choose another export.output")
    checkpoint = checkpoint_path(rs, "export")
    detector = Detector.load(checkpoint, "cpu", fc_rank=e.fc_rank)  # the SVD (if asked) is what gets exported and verified
    start = time.perf_counter()
    test = {"score_thresh": d.score_thresh, "nms_iou": d.nms_iou, "max_per_image": d.max_per_image,
            "bbox_reg": d.bbox_reg}
    source = {"checkpoint": str(checkpoint), "sha1": hash_file(checkpoint), "torch": torch.__version__,
              "fc_rank": list(e.fc_rank) if e.fc_rank else None}

    def check(folder: Path) -> None:
        diff = verify(detector, folder)
        log.info("export: onnxruntime against PyTorch on a random image, max |difference|: scores %.2e, "
                 "boxes %.2e px", diff["scores"], diff["boxes"])
        if diff["scores"] > SCORE_TOLERANCE or diff["boxes"] > BOX_TOLERANCE:
            raise UserError(f"{output}: the exported graphs do not reproduce {checkpoint} (max score difference "
                            f"{diff['scores']:.3g} > {SCORE_TOLERANCE} or box difference {diff['boxes']:.3g} > "
                            f"{BOX_TOLERANCE} px); nothing was written; please report it with the model's backbone")

    paths = export_detector(detector, output, e.opset, test, source, check if e.verify else None)
    log.info("export: wrote %s in %.1f s", ", ".join(map(str, paths)), time.perf_counter() - start)
    print(f"export: {checkpoint} -> {output}/ ({', '.join(p.name for p in paths)}); run it with "
          f"spp-det detect detect.runtime=onnxruntime detect.checkpoint={output} detect.source=PATH")
    return 0
