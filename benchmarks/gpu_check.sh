#!/usr/bin/env bash
# The GPU checks of the extraction stage in one run, for a machine with CUDA; from the repository root:
#
#   bash benchmarks/gpu_check.sh [N_PHOTOS] [WORKERS]          # defaults: 6144 photos, 14 workers
#
# Prints, on N photo-like JPEGs made from ../shared/datasets/hymenoptera (benchmarks/photos.py):
#   - extract_throughput.py at batch 256, precision auto (bf16 on CUDA), for each backbone in $BACKBONES,
#     with Pillow (decode cpu) and with nvJPEG (decode device): end to end against pure forward, and the
#     loader alone against the Pillow ceiling with WORKERS processes;
#   - prepare_speed.py on the same photos: one process against one per core;
#   - the heads and the audit on a synthetic store of HEAD_ROWS x 1,280 features x HEAD_CLASSES classes (default
#     1,280,000 x 1,000: ImageNet's size), each stage as DVC runs it with params.yaml's device: auto (logreg,
#     linear_svm, knn and the audit's search on CUDA): benchmarks/scale.py's `scale:` lines (SKIP_HEADS=1 leaves
#     it out; the store takes 6.5 GB in $SCALE_WORK);
#   - the test suite with CUDA visible ($PYTEST_ARGS added; SKIP_TESTS=1 leaves it out).
# Try it on a CPU first with tiny sizes: DEVICE=cpu SKIP_TESTS=1 HEAD_ROWS=3000 HEAD_CLASSES=10 bash benchmarks/gpu_check.sh 64 2
# Backbones other than efficientnet_lite0 need their weights in the local torch/timm cache (no network there).
set -u
N=${1:-6144}
WORKERS=${2:-14}
DEVICE=${DEVICE:-auto}
BACKBONES=${BACKBONES:-efficientnet_lite0}
PHOTOS=${PHOTOS:-/tmp/transfer-pipeline-photos-$N}
PYTHON=${PYTHON:-python}
HEAD_ROWS=${HEAD_ROWS:-1280000}
HEAD_CLASSES=${HEAD_CLASSES:-1000}
SCALE_WORK=${SCALE_WORK:-/tmp/transfer-pipeline-scale}

$PYTHON benchmarks/photos.py "$N" "$PHOTOS" || exit 1
for backbone in $BACKBONES; do
    for decode in cpu device; do
        echo "== $backbone, decode $decode"
        $PYTHON benchmarks/extract_throughput.py --data "$PHOTOS" --backbone "$backbone" --batch-size 256 \
            --num-workers "$WORKERS" --decode "$decode" --device "$DEVICE" --slice-batches 6 --repeats 1 \
            --decode-repeats 1 2>&1 | grep -v "img/s]$"
    done
done
echo "== prepare"
$PYTHON benchmarks/prepare_speed.py --data "$PHOTOS" --repeats 1 2>&1 | grep -v "img/s]$"
if [ "${SKIP_HEADS:-0}" != 1 ]; then
    echo "== heads and audit at $HEAD_ROWS x 1280 x $HEAD_CLASSES classes"
    mkdir -p "$SCALE_WORK"
    $PYTHON benchmarks/scale.py --rows "$HEAD_ROWS" --classes "$HEAD_CLASSES" --stages heads,audit \
        --max-seconds 900 --work "$SCALE_WORK" --keep 2>&1 | grep "^scale:"
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    echo "== pytest"
    $PYTHON -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tail -30
fi
