#!/usr/bin/env python
"""Compare two runs' detections (`spp-det detect`'s detections.jsonl or `spp-det eval`'s eval_data.json):
the same detections within a tolerance?

    python scripts/compare_detections.py TORCH_OUT/detections.jsonl ONNX_OUT/detections.jsonl
    python scripts/compare_detections.py TORCH_EVAL/eval_data.json ONNX_EVAL/eval_data.json

Per file, the detections of both runs are matched in order of score (both are sorted by score, as
`detect` writes them; equal class required); prints the files, detections, unmatched counts and the
largest box and score differences of the matched pairs; exit code 1 when any detection is unmatched
or a difference exceeds --box-tol (pixels) / --score-tol. README "Use the model elsewhere" reports
its output for the PyTorch and onnxruntime runtimes.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def by_file(path: str) -> dict[str, list[dict]]:
    """File (or image id) -> its detections ``{"class", "score", "box"}``, highest score first."""
    out: dict[str, list[dict]] = defaultdict(list)
    if path.endswith(".json"):  # eval_data.json: "det" rows [x1, y1, x2, y2, score, label] per image
        for image in json.load(open(path, encoding="utf-8"))["images"]:
            out[image["id"]] = [{"class": int(d[5]), "score": d[4], "box": d[:4]} for d in image["det"]]
    else:
        with open(path, encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                out[d["file"]].append(d)
    return {name: sorted(dets, key=lambda d: -d["score"]) for name, dets in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--box-tol", type=float, default=1.0)
    parser.add_argument("--score-tol", type=float, default=1e-3)
    args = parser.parse_args()
    a, b = by_file(args.a), by_file(args.b)
    unmatched, pairs, box_diff, score_diff = 0, 0, 0.0, 0.0
    for name in sorted(set(a) | set(b)):
        left, right = a.get(name, []), b.get(name, [])
        unmatched += abs(len(left) - len(right))
        for x, y in zip(left, right):
            if x["class"] != y["class"]:
                unmatched += 1
                continue
            pairs += 1
            box_diff = max(box_diff, max(abs(p - q) for p, q in zip(x["box"], y["box"])))
            score_diff = max(score_diff, abs(x["score"] - y["score"]))
    print(f"{len(set(a) | set(b))} files with detections; {sum(map(len, a.values()))} vs "
          f"{sum(map(len, b.values()))} detections; {pairs} matched, {unmatched} unmatched; "
          f"max |box difference| {box_diff:.4f} px, max |score difference| {score_diff:.2e}")
    return int(unmatched > 0 or box_diff > args.box_tol or score_diff > args.score_tol)


if __name__ == "__main__":
    sys.exit(main())
