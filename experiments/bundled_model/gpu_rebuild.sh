#!/usr/bin/env bash
# Rebuild every file of the bundled model on one GPU with the recipe in gpu.yaml, in about
# 8 minutes on an H100: clip, judge and vae train at once (three processes sharing the GPU, scenes
# planned by worker processes and drawn on the GPU), then the UNet's cache, then two UNets at once:
# `unet` (the v0 layout) and `unet_b` (larger); each is exported (out/weights, out/weights_unet_b).
#   bash experiments/bundled_model/gpu_rebuild.sh [OUT_DIR [overrides for every stage, e.g. fast=true]]
# Then, on any machine: python -m experiments.bundled_model stages=[evaluate] out_dir=OUT_DIR
# (and stages=[export,evaluate] install=true [unet.name=unet_b] to ship one).
set -u
out=${1:-outputs/bundled_model_gpu}
shift || true
extra=("$@")
mkdir -p "$out"
run() { python -m experiments.bundled_model --config-name gpu out_dir="$out" "$@" "${extra[@]}"; }
t0=$(date +%s)
run 'stages=[tokenizer]'
run 'stages=[clip]' workers=6 >"$out/clip.out" 2>&1 &
run 'stages=[judge]' workers=3 >"$out/judge.out" 2>&1 &
run 'stages=[vae]' workers=3 >"$out/vae.out" 2>&1 &
wait
echo "clip/judge/vae done after $(( $(date +%s) - t0 )) s"; tail -n 2 "$out"/{clip,judge,vae}.out
run 'stages=[unet_cache]' workers=12
run 'stages=[unet,export]' >"$out/unet.out" 2>&1 &
run 'stages=[unet,export]' unet.name=unet_b 'unet.channels=[96,192]' unet.layers_per_block=2 \
    >"$out/unet_b.out" 2>&1 &
wait
echo "all done after $(( $(date +%s) - t0 )) s"; tail -n 3 "$out"/unet*.out
