#!/usr/bin/env bash
# Reproduce one CIFAR-10 row of the paper's table with the paper's recipe (configs/ARCH_cifar.py:
# the published rate string, lr 0.1, batch 256, 300 epochs, multistep 150/225).
#
#   experiments/reproduce.sh ARCH WORKDIR [--config.FIELD=VALUE ...]
#
# ARCH: vgg16 | resnet56 | resnet110 | googlenet. Run it again with the same WORKDIR after any
# interruption (preemption, Ctrl-C, a lost machine): it resumes from the newest checkpoint; it
# exits 0 once all 300 epochs are done and WORKDIR/compact holds the exported model.
#
# Data (the first that applies):
#   CIFAR_DIR=DIR       a folder holding cifar-10-batches-py (or that folder itself);
#   SHARED_DATA=DIR     a folder with make_cifar10.py and the exact files or cifar10-jpeg.npz
#                       (../shared/data here): the folder is written to WORKDIR/../cifar10 once;
#                       JPEG=1 takes the 18.8 MB lossy JPEG copy (say so when you report);
#   default             ./data/cifar-10-batches-py.
# Dependencies: the package's, or, on a machine that has jax/flax/optax/orbax but not
# ml-collections or tensorboardX, WHEELS=DIR of their wheels (installed into /tmp/dcff-site; see
# experiments/RESULTS.md, "GPU"). tensorflow-datasets is not needed for CIFAR folders.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
arch=$1 workdir=$(realpath -m "$2")
shift 2
case $arch in
  vgg16 | resnet56 | resnet110 | googlenet) ;;
  *) echo "error: ARCH must be vgg16, resnet56, resnet110 or googlenet, not '$arch'" >&2; exit 2 ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}

if [[ -n ${WHEELS:-} ]]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/dcff-site \
    "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/dcff-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}

if [[ -n ${CIFAR_DIR:-} ]]; then
  data=$(realpath -m "${CIFAR_DIR%/cifar-10-batches-py}")
elif [[ -n ${SHARED_DATA:-} ]]; then
  data=$(dirname "$workdir")/cifar10
  if [[ ! -f $data/cifar-10-batches-py/test_batch ]]; then
    "$python" "$SHARED_DATA/make_cifar10.py" "$data/cifar-10-batches-py" ${JPEG:+--jpeg}
  fi
else
  data=$repo/data
fi
if [[ ! -f $data/cifar-10-batches-py/test_batch ]]; then
  echo "error: no CIFAR-10 in $data/cifar-10-batches-py; set CIFAR_DIR or SHARED_DATA" >&2
  exit 2
fi

cd "$repo"
exec "$python" -m dcff_jax.main --config="configs/${arch}_cifar.py" --workdir="$workdir" \
  --config.dataset=cifar10_folder --config.data_dir="$data" "$@"
