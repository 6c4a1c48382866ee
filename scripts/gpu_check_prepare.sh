#!/usr/bin/env bash
# Prepares .gpu_check/ (git-ignored) for scripts/gpu_check.sh on a GPU machine that reaches no
# package registry (the device tool's machines: their python3 holds torch, torchvision, numpy,
# OpenCV without contrib, scikit-learn, scikit-image, matplotlib... but not the packages below).
# Run it HERE, where PyPI is reachable; then carry `.gpu_check` to the GPU machine:
#
#   scripts/gpu_check_prepare.sh
#   device run: command "scripts/gpu_check.sh", carry [".gpu_check"], timeout_s 540
#
# It writes:
#   .gpu_check/wheels/      hydra-core, omegaconf, antlr4 (hydra's parser), pycocotools, selectivesearch:
#                           the project's dependencies missing there, for GPU_CHECK_PYVER (default 3.12)
#   .gpu_check/voc_sample/  5 images of the VOC 2012 sample in VOC layout (../shared does not travel),
#                           for `spp-det bench`
# opencv-contrib-python-headless (cv2.ximgproc, OpenCV's selective search) is left out: its wheel
# alone is larger than what may travel (64 MiB); the GPU check uses the `selectivesearch` package.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${GPU_CHECK_PYVER:-3.12}
PY=${PYTHON:-.venv/bin/python}
VOC=${SPP_DET_VOC_SAMPLE:-../shared/data/voc2012_sample}
DEST=.gpu_check
rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp/wheels" "$DEST.tmp/voc_sample/VOC2012/ImageSets/Main"
pin() { grep -i "^$1==" constraints.txt; }  # the tested versions
# binary wheels for the GPU machine's Python (manylinux, x86-64)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST.tmp/wheels" "$(pin hydra-core)" "$(pin omegaconf)" "$(pin pycocotools)"
# antlr4-python3-runtime and selectivesearch are published as source only: build their (pure Python) wheels
"$PY" -m pip wheel --quiet --no-deps -w "$DEST.tmp/wheels" "$(pin antlr4-python3-runtime)" "$(pin selectivesearch)"
# five VOC images with their annotations
ids=$(head -n 5 "$VOC/VOC2012/ImageSets/Main/all.txt")
mkdir -p "$DEST.tmp/voc_sample/VOC2012/JPEGImages" "$DEST.tmp/voc_sample/VOC2012/Annotations"
for id in $ids; do
    cp "$VOC/VOC2012/JPEGImages/$id.jpg" "$DEST.tmp/voc_sample/VOC2012/JPEGImages/"
    cp "$VOC/VOC2012/Annotations/$id.xml" "$DEST.tmp/voc_sample/VOC2012/Annotations/"
done
printf '%s\n' $ids > "$DEST.tmp/voc_sample/VOC2012/ImageSets/Main/all.txt"
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
ls -l "$DEST/wheels"
du -sh "$DEST"
