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
#   - the test suite with CUDA visible ($PYTEST_ARGS added; SKIP_TESTS=1 leaves it out).
# Try it on a CPU first with tiny sizes: DEVICE=cpu SKIP_TESTS=1 bash benchmarks/gpu_check.sh 64 2
# Backbones other than efficientnet_lite0 need their weights in the local torch/timm cache (no network there).
set -u
N=${1:-6144}
WORKERS=${2:-14}
DEVICE=${DEVICE:-auto}
BACKBONES=${BACKBONES:-efficientnet_lite0}
PHOTOS=${PHOTOS:-/tmp/transfer-pipeline-photos-$N}
PYTHON=${PYTHON:-python}

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
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    echo "== pytest"
    $PYTHON -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tail -30
fi
