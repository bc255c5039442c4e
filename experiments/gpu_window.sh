#!/usr/bin/env bash
# One short GPU window (~9 minutes): the published code (run unchanged) and dcff-jax on the same
# GPU, the same data (the lossy JPEG copy of CIFAR-10) and the paper's recipe, one after the other.
#
#   experiments/gpu_window.sh KIT
#
# KIT holds what the GPU machine lacks (it has jax, flax, optax, orbax and torch, no internet):
#   KIT/make_cifar10.py, KIT/cifar10-jpeg.npz   (../shared/data)
#   KIT/torchvision_stub                         (../shared/tools: the published loader's CIFAR10
#                                                 class without torchvision's md5 check, which the
#                                                 JPEG copy cannot pass)
#   KIT/DCFF                                     (a checkout of lmbxmu/DCFF, never committed here)
#   KIT/wheels/*.whl                             (ml-collections, tensorboardX, thop)
# Logs go to $OUT (or /tmp/gpu_window): the throughput lines of both, our epoch lines.
set -u
kit=$(realpath "$1")
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/gpu_window}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/dcff-site \
  "$kit"/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/dcff-site PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nproc
  python3 -c "import jax, flax, optax, orbax.checkpoint as o, torch; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
} > "$out/machine.txt" 2>&1
python3 "$kit/make_cifar10.py" /tmp/cifar/cifar-10-batches-py --jpeg > "$out/data.txt" 2>&1 || exit 1

published() {  # ARCH RATES SECONDS
  (cd "$kit/DCFF" && PYTHONPATH="$kit/torchvision_stub:/tmp/dcff-site" timeout "$3" python3 \
    main_cifar.py --data_set cifar10 --data_path /tmp/cifar --train_batch_size 256 \
    --test_batch_size 256 --num_epochs 300 --lr_decay_step 150 225 --lr 0.1 --weight_decay 5e-4 \
    --lr_type step --momentum 0.9 --arch "$1" --cprate "$2" --job_dir "/tmp/published_$1" \
    --gpus 0) > "$out/published_$1.log" 2>&1
}
ours() {  # ARCH SECONDS: SIGTERM at the limit, which checkpoints the step in flight
  CIFAR_DIR=/tmp/cifar timeout -s TERM -k 60 "$2" "$repo/experiments/reproduce.sh" "$1" \
    "/tmp/ours_$1" --config.log_every_steps=49 > "$out/ours_$1.log" 2>&1
  echo "exit status $?" >> "$out/ours_$1.log"
}
r56=$(python3 -c "import sys; sys.path.insert(0, '$repo'); import configs.resnet56_cifar as c; \
print(c.get_config().cprate)")
vgg=$(python3 -c "import sys; sys.path.insert(0, '$repo'); import configs.vgg16_cifar as c; \
print(c.get_config().cprate)")
published resnet56 "$r56" 120
ours resnet56 250
ours vgg16 70
published vgg16 "$vgg" 70
