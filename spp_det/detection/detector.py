"""The trained SPP-net detector: image + proposals -> detections (docs/ARCHITECTURE.md "Where each step of the paper lives").

    image ─► conv5 per scale (once) ─► pool5 of every window (best scale, pyramid) ─► fc7
          ─► x feature_scale ─► per-class SVM scores [N, K]
          └─ pool5 x bbox scale ─► per-class box deltas [N, K, 4] ─► boxes (clipped)
          ─► scores > thresh, per-class NMS 0.3, top 100            (postprocess)

One test procedure (``WindowDetector``) over two engines that differ only in how they compute conv5
maps, pooled vectors and head outputs: ``Detector`` (PyTorch, model.pt) and ``OnnxDetector``
(``spp_det.detection.onnx_detector``: onnxruntime, an export folder), both ruled by one ``Geometry``.

``Detector.load(model.pt)`` rebuilds the network from the stored model config with
``weights=None`` (nothing is downloaded) and loads every weight from the file.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch

from spp_det import artifact as model_artifact
from spp_det.boxes import apply_deltas_in_image
from spp_det.errors import UserError
from spp_det.features.scales import ScaledSize
from spp_det.heads import bboxreg
from spp_det.inference import compress_fc, set_precision
from spp_det.model import build_model
from spp_det.model.sppnet import Geometry
from spp_det.model.weights import load_state
from spp_det.settings import SCORERS
from spp_det.detection.postprocess import postprocess
from spp_det.structures import Detections
from spp_det.timing import timed

Step = Callable[[str], ContextManager]  # step("fc"): a context adding its seconds to that step's timing


class WindowDetector:
    """The test procedure, shared by both engines: windows -> conv5 at the test scales -> pooled at
    each window's best scale -> head (scores, box deltas) per ``window_batch`` windows -> boxes moved
    and clipped -> threshold, per-class NMS, top-k; timed by step. An engine (a subclass) sets
    ``geometry`` and ``has_bbox_reg`` and computes the network's steps ``conv5_at``, ``pool5``, ``head``."""

    geometry: Geometry
    has_bbox_reg: bool  # whether it holds box regressors (detect_pair then scores both)
    device = torch.device("cpu")  # where the windows, scores and boxes are

    def __init__(self, *, classes: Sequence[str], scorer: str, window_batch: int, scorers: Sequence[str],
                 holder: str):  # scorers: those the engine holds; holder names it in the error
        if scorer not in SCORERS:
            raise UserError(f"scorer must be one of {', '.join(SCORERS)}, not {scorer!r}")
        if scorer not in scorers:
            raise UserError(f"scorer={scorer} needs the fine-tuned fc8, which {holder} does not hold")
        self.classes, self.scorer, self.window_batch = list(classes), scorer, int(window_batch)

    def conv5_at(self, image: np.ndarray, size: ScaledSize):
        """RGB ``uint8 [H, W, 3]`` resized to ``size`` -> its conv5 map ``[1, C, h, w]``."""
        raise NotImplementedError

    def pool5(self, maps: list, image_hw: tuple[int, int], windows: torch.Tensor) -> torch.Tensor:
        """Pyramid vectors ``float32 [N, D]`` of the image-pixel ``windows`` ``[N, 4]``, each at its best scale."""
        raise NotImplementedError

    def head(self, pool5: torch.Tensor, deltas: bool, step: Step) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``float32 [B, K]`` scores of ``scorer`` and (``deltas``) box deltas ``[B, K, 4]`` of ``pool5`` ``[B, D]``."""
        raise NotImplementedError

    def _timed(self, timings: dict | None, step: str):
        cuda = self.device.type == "cuda"
        return timed(timings, step, (lambda: torch.cuda.synchronize(self.device)) if cuda else None)

    # no_grad here, not only on score_windows: detect / detect_pair call this directly, and an autograd
    # graph per image grew eval by about 1 GB per image (OOM on the raccoon photos)
    @torch.no_grad()
    def _score_on_device(self, image: np.ndarray, proposals, bbox_reg: bool,
                         timings: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``score_windows`` leaving the results on the engine's device: on a GPU the windows go up
        once and the results stay there for NMS (no copy to the host and back per chunk)."""
        windows = torch.as_tensor(np.asarray(proposals, np.float32).reshape(-1, 4)).to(self.device)
        height, width = image.shape[:2]
        k, use_reg = len(self.classes), bool(bbox_reg) and self.has_bbox_reg
        if not len(windows):
            return windows.new_zeros(0, k), windows.new_zeros(0, k, 4) if use_reg else windows
        step = functools.partial(self._timed, timings)
        with step("conv5"):
            maps = self.geometry.conv5_per_scale(image, self.conv5_at)  # [1, C, h_s, w_s] per scale
        with step("pool"):
            pool5 = self.pool5(maps, (height, width), windows)
        scores, boxes = [], []
        for chunk, vectors in zip(windows.split(self.window_batch), pool5.split(self.window_batch)):
            chunk_scores, deltas = self.head(vectors, use_reg, step)
            scores.append(chunk_scores)
            if use_reg:
                with step("bboxreg"):
                    boxes.append(apply_deltas_in_image(chunk, deltas, height, width))  # [B, K, 4]
        return torch.cat(scores), (torch.cat(boxes) if use_reg else windows)

    def score_windows(self, image: np.ndarray, proposals, bbox_reg: bool = True,
                      timings: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class scores ``[N, K]`` and boxes ``[N, K, 4]`` (or the windows ``[N, 4]`` without box
        regression) of the windows ``proposals`` ``[N, 4]`` of ``image`` ``uint8 [H, W, 3]``, on the CPU."""
        scores, boxes = self._score_on_device(image, proposals, bbox_reg, timings)
        return scores.cpu(), boxes.cpu()

    def detect(self, image: np.ndarray, proposals, score_thresh: float, nms_iou: float = 0.3,
               max_per_image: int = 100, bbox_reg: bool = True, timings: dict | None = None) -> Detections:
        """Detections of ``image`` ``uint8 [H, W, 3]`` from its windows ``proposals`` ``float32 [N, 4]``
        (internal boxes): scores above ``score_thresh``, per-class NMS at ``nms_iou``, at most
        ``max_per_image``. ``timings`` (when given) accumulates seconds by step: conv5, pool, fc,
        svm, bboxreg, nms."""
        scores, boxes = self._score_on_device(image, proposals, bbox_reg, timings)
        with self._timed(timings, "nms"):  # on the model's device, where the scores are
            return postprocess(boxes, scores, score_thresh, nms_iou, max_per_image)

    def detect_pair(self, image: np.ndarray, proposals, score_thresh: float, nms_iou: float = 0.3,
                    max_per_image: int = 100, timings: dict | None = None) -> tuple[Detections, Detections]:
        """``detect`` with and without box regression from one pass over the windows (the scores do
        not depend on it), so an evaluation reports both mAPs at the cost of one."""
        scores, boxes = self._score_on_device(image, proposals, True, timings)
        windows = torch.as_tensor(np.asarray(proposals, np.float32).reshape(-1, 4)).to(scores.device)
        with self._timed(timings, "nms"):
            return (postprocess(boxes, scores, score_thresh, nms_iou, max_per_image),
                    postprocess(windows, scores, score_thresh, nms_iou, max_per_image))


class Detector(WindowDetector):
    """The PyTorch engine: an ``SPPNet`` (``model``) with its per-class SVMs and box regressors.

    ``svm_weight`` ``[K, fc_dim]``, ``svm_bias`` ``[K]``, ``svm_scale`` (fc7 factor to mean norm 20);
    ``bbox_weight`` ``[K, pool5_dim + 1, 4]`` or None, ``bbox_scale`` (pool5 factor);
    ``fc8`` ``{"weight" [K+1, fc_dim], "bias" [K+1]}`` or None (the fine-tuned softmax, for ``scorer="softmax"``);
    ``precision`` and ``fc_rank``: test-time speed (``spp_det.inference``), model.pt unchanged.
    """

    def __init__(self, *, model, classes: Sequence[str], svm_weight: torch.Tensor, svm_bias: torch.Tensor,
                 svm_scale: float, bbox_weight: torch.Tensor | None = None, bbox_scale: float = 1.0,
                 fc8: dict | None = None, window_batch: int = 1000, scorer: str = "svm", precision: str = "fp32",
                 fc_rank=None):
        super().__init__(classes=classes, scorer=scorer, window_batch=window_batch,
                         scorers=SCORERS if fc8 is not None else ("svm",), holder="this model")
        self.model = compress_fc(model.eval(), fc_rank)
        self.autocast = set_precision(self.model, precision)
        self.device = device = model.device
        self.svm_weight = svm_weight.float().to(device)
        self.svm_bias = svm_bias.float().to(device)
        self.svm_scale = float(svm_scale)
        self.bbox_weight = None if bbox_weight is None else bbox_weight.float().to(device)
        self.geometry, self.has_bbox_reg = self.model.geometry, bbox_weight is not None
        self.bbox_scale = float(bbox_scale)
        self.fc8 = None if fc8 is None else {k: v.float().to(device) for k, v in fc8.items()}
        if self.svm_weight.shape != (len(self.classes), model.head.out_dim):
            raise UserError(f"SVM weights {tuple(self.svm_weight.shape)} do not fit {len(self.classes)} classes x "
                            f"{model.head.out_dim}-d fc7")

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", *, test_scales=None, test_max_size=None,
             **kwargs) -> "Detector":
        """Rebuild the detector from a model artifact (``spp_det.artifact``) on ``device``, at
        ``test_scales`` / ``test_max_size`` when given (``eval.scales`` / ``eval.max_size``), else the
        artifact's ``test_scales`` / ``test_max_size`` (model.pt files written while those were model
        keys), else the scales it was trained at. ``kwargs``: ``window_batch``, ``scorer``,
        ``precision``, ``fc_rank``."""
        art = model_artifact.load(path)
        legacy = dict(art["config"])  # model.pt files written while test_scales / test_max_size were model keys
        model_cfg = model_artifact.model_config(art)
        model_cfg["scales"] = list(test_scales or legacy.get("test_scales") or model_cfg["scales"])
        model_cfg["max_size"] = test_max_size or legacy.get("test_max_size") or model_cfg["max_size"]
        model = build_model(model_cfg, pretrained=False)  # never download: the file holds every weight
        load_state(model, art["state_dict"], path, "damaged model artifact: weights do not fit its own config")
        model = model.to(device).eval()
        svm, reg = art["svm"], art.get("bboxreg")
        return cls(model=model, classes=art["classes"], svm_weight=svm["weight"], svm_bias=svm["bias"],
                   svm_scale=svm["feature_scale"], bbox_weight=None if reg is None else reg["weight"],
                   bbox_scale=1.0 if reg is None else reg["feature_scale"], fc8=art.get("fc8"), **kwargs)

    def conv5_at(self, image: np.ndarray, size: ScaledSize) -> torch.Tensor:
        with self.autocast():
            return self.model.conv5_at(image, size)

    def pool5(self, maps: list, image_hw: tuple[int, int], windows: torch.Tensor) -> torch.Tensor:
        return self.model.pool5(maps, image_hw, windows)

    def head(self, pool5: torch.Tensor, deltas: bool, step: Step) -> tuple[torch.Tensor, torch.Tensor | None]:
        with step("fc"), self.autocast():
            fc7 = self.model.fc7(pool5).float()
        with step("svm"):
            if self.scorer == "svm":
                scores = (fc7 * self.svm_scale) @ self.svm_weight.T + self.svm_bias  # [B, K]
            else:  # fine-tuned softmax, background column dropped
                scores = torch.softmax(fc7 @ self.fc8["weight"].T + self.fc8["bias"], dim=1)[:, 1:]
        if not deltas:
            return scores.float(), None
        with step("bboxreg"):
            return scores.float(), bboxreg.predict(pool5.float() * self.bbox_scale, self.bbox_weight)  # [B, K, 4]
