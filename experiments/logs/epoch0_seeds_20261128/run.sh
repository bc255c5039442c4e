#!/bin/bash
# Ours, ResNet-56 at the paper recipe, the first 100 steps of epoch 0 at seeds 1-3: when does
# the loss leave ln 10?
cd /work/main
for s in 1 2 3; do
  python -m dcff_jax.main --config=configs/resnet56_cifar.py --workdir=/tmp/seeds/s$s \
    --config.dataset=cifar10_folder --config.data_dir=/tmp/cifar --config.seed=$s \
    --config.steps_per_epoch=100 --config.num_epochs=1 --config.log_every_steps=10 \
    > /tmp/seeds/s$s.log 2>&1
done
echo done > /tmp/seeds/done
