#!/usr/bin/env bash
# One GPU check of real-size throughput, for the device tool's machine (a bare H100/H200 with
# torch, timm, transformers, click, tqdm, fsspec, pyyaml, huggingface_hub, but no network).
# Uses the random-full preset: full-size random-initialised copies of the default models
# (sd-vae-ft-ema, dinov2-base, sam2.1-hiera-base-plus, videomae-base) - real architectures and
# costs, meaningless features. Writes JSON into "${OUT:-bench/results}". Budget: under 9 minutes
# on an H100 including installs and model creation; every step has its own `timeout`
# (45 + 120 + 170 + 90 + 85 = 510 s at most, plus the wheel install and the import checks) and a
# failed step does not stop the next one.
#
# Prepare once, on a machine where pip can download (not the device), in the repo root:
#   echo /.whl/ >> .git/info/exclude; echo /.gpu_videos/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 -d .whl \
#     diffusers==0.42.1 importlib_metadata==10.2.0 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 \
#     google-crc32c==1.9.0 webdataset==1.0.2 braceexpand==0.1.7 dask==2026.8.0 partd==1.4.2 \
#     locket==1.0.0 toolz==1.2.0 cloudpickle==3.1.3 decord==0.6.0
#   (the versions this project resolves to on the CPU machine; decord's wheel is manylinux2010, hence that
#   platform. toolz and cloudpickle are dask's own dependencies: bench/cache.py packs with run_pack, i.e. dask.)
# PyAV (av==18.1.0, ~40 MB) would push the carried tree past its 64 MiB limit, so instead of
# carrying it, write the synthetic videos here (48 videos, 46 = (16-1)*3+1 frames, 256 px):
#   python -c "from stages.common.synth import make_synthetic as m; m('.gpu_videos', videos=48, classes=4, frames=46, size=256, seed=0)"
# Then run with the device tool: command `bash bench/gpu_check.sh`, carry [".whl", ".gpu_videos"],
# timeout_s 590. Without .gpu_videos, bench/extract.py writes the videos itself (needs av).
set -u
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD; fi
export PYTHONPATH="${PYTHONPATH:-$PWD}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export ALIGN4GEN_HOME=/tmp/align4gen  # the random-full models are built once and shared by the steps
RESULTS="${OUT:-bench/results}"
mkdir -p "$RESULTS"
PY=python3
start=$(date +%s)
step() { echo "=== $1 ($(($(date +%s) - start)) s in)"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
for m in diffusers zarr numcodecs webdataset dask toolz cloudpickle decord av; do
  $PY -c "import $m" 2>/dev/null && echo "ok $m" || echo "MISSING $m"
done

step "build the random-full models (~1.3 GB fp32)"
timeout -k 5 45 $PY -c "
import time; t = time.time()
from stages.common.presets import full_size_random_models
print(full_size_random_models()); print(f'built in {time.time() - t:.1f} s')
"

step "extract: random-full, 16x256x256 stride 3, dino+sam2+videomae"
DATA=()
if [ -d .gpu_videos ]; then DATA=(--data .gpu_videos); fi
timeout -k 10 120 $PY bench/extract.py --preset random-full --videos 48 --frames 16 --stride 3 --size 256 \
  --batch-size 4 --num-workers 6 ${DATA[@]+"${DATA[@]}"} --out "$RESULTS/extract-gpu-random-full.json" \
  || echo "extract bench FAILED or timed out (rc $?)"

step "train_step: B/2, 16x256x256, bf16; no_align, resident, cached float16/int8/int4, online, after_switch"
# 7 B/2 states side by side (weights, EMA, AdamW, grads: a few GB each); a pool of 8 distinct samples written 64 times per format
# (float16 11.6 MB, int8 ~5.9 MB, int4 ~3.4 MB per sample); a small shuffle buffer keeps worker start-up short
timeout -k 10 170 $PY bench/train_step.py --preset random-full --model B/2 --frames 16 --size 256 \
  --batch-size 8 --warmup 3 --steps 10 --repeats 3 --num-workers 6 --shuffle-buffer 16 --samples 64 \
  --loader-batches 12 --out "$RESULTS/train_step-gpu-random-full.json" \
  || echo "train_step bench FAILED or timed out (rc $?)"

step "cache: formats at 16x256 (bytes/clip, write, pack, loader per worker, CUDA dequant ms, fidelity)"
timeout -k 10 90 $PY bench/cache.py --clips 24 --workers 1,4 --out "$RESULTS/cache-gpu.json" \
  || echo "cache bench FAILED or timed out (rc $?)"

step "evaluate: full-size detectors (random VideoMAE-v2 ViT-g/14 in the original layout)"
timeout -k 10 85 $PY bench/evaluate.py --videos 16 --batch-size 8 --cpu-videos 4 \
  --out "$RESULTS/evaluate-gpu.json" \
  || echo "evaluate bench FAILED or timed out (rc $?)"

step "done"
ls -l "$RESULTS"
