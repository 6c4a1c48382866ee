#!/usr/bin/env bash
# The CUDA path, checked in one run (issue 20): under 8 minutes on one GPU.
#
#   scripts/gpu_check.sh                       # on a machine with a GPU, after `make setup`
#   GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh  # dry run on the CPU, tiny sizes: every step, no GPU
#   GPU_CHECK_STEPS="env bench" scripts/gpu_check.sh   # only these steps (the others are recorded as skipped)
#
# Steps, each under its own time limit, each recorded even when an earlier one failed:
#   env     python, torch, CUDA, the GPU's name (nvidia-smi)
#   tests   pytest -m gpu tests/test_gpu.py, without the end-to-end ones: the pooling op on the GPU
#           equals the CPU op (fp32/fp16/bf16, values and gradients), SPPNet features equal the CPU
#           ones within TF32 rounding, detections equal, no big tensor computed on the CPU
#   bench   spp-det bench on the GPU: ZF-5 full width, 5 VOC images x 2,000 windows, one scale (688)
#           and five, R-CNN mode on the same 2,000 windows, torch.profiler summary (bench.json,
#           profile_1scale.txt, profile_5scale.txt)
#   e2e     the test file's end-to-end tests: a tiny synth -> train -> eval on the CPU and on the GPU,
#           the CPU model evaluated on the GPU too, detect on the GPU (mAPs -> train_eval.json);
#           last, with what is left of the budget
# Everything lands in $OUT (the device tool's folder) or ./gpu_check_out: gpu_check.json (every
# step's status and seconds, the key figures, the targets), gpu_check.log, and the files above.
#
# Python: $GPU_CHECK_PYTHON if set; else, when .gpu_check/wheels exists (scripts/gpu_check_prepare.sh,
# for a machine that reaches no package registry, like the device tool's), that machine's python3
# with those wheels installed into a temporary folder; else .venv (created by `make setup`).
# Exit status: 0 when every step passed, 1 otherwise (gpu_check.json says which).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEVICE=${GPU_CHECK_DEVICE:-cuda}
OUT_DIR=${OUT:-$REPO/gpu_check_out}
BUDGET=${GPU_CHECK_BUDGET:-460}   # seconds for all steps together (the issue: under 8 minutes)
STEP_NAMES=" ${GPU_CHECK_STEPS:-env tests bench_images bench e2e} "
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spp_det_gpu_check.XXXXXX")
STEPS=$WORK/steps.jsonl
LOG=$OUT_DIR/gpu_check.log
: > "$STEPS"
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
echo "gpu_check: device $DEVICE, out $OUT_DIR, work $WORK, budget ${BUDGET}s"

# ---- Python with the project's dependencies ------------------------------------------------------
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [[ -n ${GPU_CHECK_PYTHON:-} ]]; then
    PY=$GPU_CHECK_PYTHON
elif [[ -d .gpu_check/wheels ]]; then
    PY=python3
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .gpu_check/wheels/*.whl
    export PYTHONPATH=$REPO:$WORK/site${PYTHONPATH:+:$PYTHONPATH}
else
    make setup
    PY=$REPO/.venv/bin/python
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}   # the checkout itself, installed or not
echo "gpu_check: python $PY"

# ---- sizes ---------------------------------------------------------------------------------------
if [[ $DEVICE == cpu ]]; then   # dry run: the GPU tests with the CPU standing in, tiny sizes
    export SPP_DET_GPU_TEST_DEVICE=cpu SPP_DET_GPU_TINY=1
    BENCH_SIZES=(bench.num_images=1 bench.windows=200 bench.rcnn_windows=8 bench.rcnn_batch=8
                 "bench.scales_one=[224]" "bench.scales_five=[160,192,224,256,320]")
else
    BENCH_SIZES=(bench.num_images=5 bench.windows=2000 bench.rcnn_windows=2000 bench.rcnn_batch=256)
fi
# bench images: a VOC-layout root holding VOC2012 (5 images are enough)
VOC=${GPU_CHECK_VOC:-}
for candidate in .gpu_check/voc_sample ../shared/data/voc2012_sample shared/data/voc2012_sample; do
    [[ -z $VOC && -f $candidate/VOC2012/ImageSets/Main/all.txt ]] && VOC=$(cd "$candidate" && pwd)
done
# selective search is timed only where OpenCV has its contrib module (it runs on the CPU anyway)
HAS_XIMGPROC=$("$PY" -c 'import cv2; print(str(hasattr(cv2, "ximgproc")).lower())' 2>/dev/null || echo false)

# ---- steps ---------------------------------------------------------------------------------------
# step NAME LIMIT_S COMMAND...: runs within min(LIMIT_S, what is left of BUDGET), records the result
step() {
    local name=$1 limit=$2 rc=0 t0 left
    shift 2
    left=$(( BUDGET - ($(date +%s) - START) ))
    (( left < limit )) && limit=$left
    echo; echo "==== $name (limit ${limit}s) ==== $*"
    t0=$(date +%s)
    if [[ $STEP_NAMES != *" $name "* ]]; then
        rc=125; echo "gpu_check: $name skipped (not in GPU_CHECK_STEPS)"
    elif (( limit < 10 )); then
        rc=125; echo "gpu_check: $name not started: the budget is spent"
    else
        timeout --kill-after=15 "$limit" "$@" || rc=$?
    fi
    printf '{"step": "%s", "rc": %d, "seconds": %d, "limit_s": %d}\n' "$name" "$rc" $(( $(date +%s) - t0 )) "$limit" >> "$STEPS"
    echo "==== $name: rc $rc in $(( $(date +%s) - t0 ))s"
    return 0
}

cat > "$WORK/env.py" <<'PY'
import json, platform, shutil, subprocess, sys
import torch, torchvision
info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_precision": torch.get_float32_matmul_precision()}
if shutil.which("nvidia-smi"):
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
open(sys.argv[1], "w").write(json.dumps(info) + "\n")
PY
step env 60 "$PY" "$WORK/env.py" "$WORK/env.json"
cat "$WORK/env.json" || true

PYTEST=("$PY" -m pytest -q -rA -p no:cacheprovider -m gpu tests/test_gpu.py)
step tests 150 "${PYTEST[@]}" -k "not e2e"

BENCH=("$PY" -m spp_det.cli bench "device=$DEVICE" model=zf5 "${BENCH_SIZES[@]}" bench.profile=true "++bench.precisions=[]"
       "bench.proposals=$HAS_XIMGPROC" "hydra.run.dir=$WORK/bench")
if [[ -n $VOC ]]; then
    step bench 180 "${BENCH[@]}" "bench.root=$VOC" bench.year=2012 bench.split=all
else  # no VOC images here: synthetic ones (other sizes than VOC's, said in gpu_check.json)
    step bench_images 60 "$PY" -m spp_det.cli synth "data.root=$WORK/bench_images" synth.num_images=10 \
        synth.pretrain_images=0 "hydra.run.dir=$WORK/synth_log"
    step bench 180 "${BENCH[@]}" "bench.root=$WORK/bench_images" bench.year=null bench.split=train
fi
for f in bench.json profile_1scale.txt profile_5scale.txt; do
    [[ -f $WORK/bench/$f ]] && cp "$WORK/bench/$f" "$OUT_DIR/"
done
step e2e 330 env SPP_DET_GPU_FIGURES="$OUT_DIR/train_eval.json" "${PYTEST[@]}" -k e2e

# ---- gpu_check.json --------------------------------------------------------------------------------
"$PY" - "$WORK" "$OUT_DIR" "$DEVICE" "${VOC:-synthetic}" <<'PY'
import json, re, sys
from pathlib import Path

work, out, device, bench_images = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
def read(path):
    try:
        return json.loads(Path(path).read_text())
    except Exception:
        return None
steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines() if line.strip()]
log = (out / "gpu_check.log").read_text(errors="replace")
tests = {}
for name, block in re.findall(r"==== (tests|e2e) \(limit.*?\n(.*?)==== \1: rc", log, re.S):
    counts = re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", block)
    tests[name] = {"counts": {k: int(v) for v, k in counts}, "failed": re.findall(r"^FAILED (\S+)", block, re.M)}
summary = {"device": device, "ok": all(s["rc"] == 0 for s in steps), "steps": steps,  # rc 125: not run

           "environment": read(work / "env.json"), "tests": tests, "train_eval": read(out / "train_eval.json"),
           "bench_images": bench_images}
bench = read(out / "bench.json")
if bench:
    sec = bench["seconds_per_image"]
    summary["bench"] = {
        "device_name": bench.get("device_name"), "windows_per_image": bench["windows_per_image"],
        "images": len(bench["images"]), "note": bench["note"],
        "spp_1scale_s": sec["spp_1scale"], "spp_5scale_s": sec["spp_5scale"], "rcnn_s": sec["rcnn"],
        "speedup_1scale": bench["speedup_1scale"], "speedup_5scale": bench["speedup_5scale"],
        "detection_steps_1scale": bench.get("detection_steps_1scale"),
        "profile_top3": {k: v["top"][:3] for k, v in (bench.get("profile") or {}).items()},
    }
    # paper (ZF-5, a 2014 GPU): 0.142 s per image at one scale, 102x over R-CNN; 0.382 s and 38x at five
    summary["targets"] = {"speedup_1scale_>=_102": bench["speedup_1scale"] >= 102,
                          "paper_seconds": {"spp_1scale": 0.142, "spp_5scale": 0.382, "rcnn": 14.46}}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: summary[k] for k in ("ok", "steps", "tests")}, indent=1))
print("speedups:", summary.get("bench", {}).get("speedup_1scale"), summary.get("bench", {}).get("speedup_5scale"))
PY
echo "gpu_check: done in $(( $(date +%s) - START ))s; results in $OUT_DIR"
rm -rf "$WORK"
"$PY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' "$OUT_DIR/gpu_check.json"
