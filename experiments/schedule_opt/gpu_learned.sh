#!/usr/bin/env bash
# Issue 24 on a GPU: learned solver coefficients (solver=learned, method=learned) from the study's grids, VP and flow,
# NFE 5, 6, 8, on 128 held-out and 96 calibration samples, with the stock samplers on the same references.
#
#   [PLAN=19|20|21] bash experiments/schedule_opt/gpu_learned.sh OUT [seconds]     # on a machine with CUDA; ~15 min on one H200
#
# Stages run in order of priority until the deadline (default 540 s); each writes its probe record (OUT/flow.json,
# OUT/vp.json: experiments.schedule_opt.probe's format) and its log as it goes, and the schedule files (the grids and
# coefficients) are packed into OUT/schedules.tgz after every stage, so a run cut short keeps what it finished.
# A rerun with the same RUNS folder resumes (fits, references and runs are read back), so the stages after the
# deadline can follow in a second call. 2026-12-04, one H200: the first 540-s call finished flow_base (58 s), vp_base
# (43 s) and learned_gle; the older caps (100 / 190 s) cut the other fits (30 s per budget each) before their
# evaluation; two short calls on the warm machine evaluated them and ran the quality stages; vp_ld3 was not reached
# (records: experiments/schedule_opt/learned_fits/). The caps below are sized from that run.
set -u
out=${1:?usage: gpu_learned.sh OUT [seconds]}
deadline=$((SECONDS + ${2:-540}))
runs=${RUNS:-/tmp/gpu_learned_runs}
read -r -a extra <<< "${EXTRA:-}"   # more probe overrides for every stage (a CPU smoke run: EXTRA="device=cpu …")
mkdir -p "$out" "$runs"
export PYTHONUNBUFFERED=1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/log.txt"
flow=(model=bundled_flow heldout.num_samples.bundled_flow=128 calibration.num_samples.bundled_flow=96 nfe=5,6,8 out="$out/flow.json")
vp=(model=bundled nfe=5,6,8 out="$out/vp.json")

stage() {  # name, cap in seconds, probe arguments
    local name=$1 cap=$2 left=$((deadline - SECONDS)); shift 2
    ((left < cap)) && cap=$left
    ((cap < 20)) && { echo "== $name: skipped (deadline)" | tee -a "$out/log.txt"; return; }
    echo "== $name (cap $cap s, at $SECONDS s)" | tee -a "$out/log.txt"
    timeout "$cap" python -m experiments.schedule_opt.probe device=cuda runs="$runs" "$@" "${extra[@]}" 2>&1 \
        | grep --line-buffered -v "it/s]" | tee -a "$out/log.txt"
    tar czf "$out/schedules.tgz" --exclude='*.pt' --exclude='*.safetensors' --exclude='*.png' -C "$runs" . 2>/dev/null
}

# 2026-12-04, second H200 session: consistent coefficients (each step exact on a constant denoiser) from σ_max / ∞
# grids, the free fit beside them (one 555-s call: vp_grids 80 s, vp_consistent 183 s, flow_consistent 200 s; vp_free
# fitted NFE 5 and was cut; a short call on the warm machine ran it at NFE 6); PLAN=19 reruns the first session's stages
if [[ ${PLAN:-21} == 19 ]]; then
    stage flow_base 150 "${flow[@]}" stock=euler,unipc,dpmpp_2m pairs=oss/euler,oss/unipc
    stage flow_learned_euler 140 "${flow[@]}" pairs=learned_oe/learned
    stage vp_base 90 "${vp[@]}" stock=euler,unipc,dpmpp_2m stock_schedules=karras,leading pairs=gitsh_lead/unipc,gitsh_lead/euler
    stage vp_learned 260 "${vp[@]}" pairs=learned_gle/learned,learned_glu/learned
    stage flow_learned_unipc 140 "${flow[@]}" pairs=learned_ou/learned
    stage vp_quality 60 "${vp[@]}" pairs=learned_gle/learned,learned_glu/learned quality=true
    stage flow_quality 60 "${flow[@]}" pairs=learned_oe/learned,learned_ou/learned quality=true
    stage vp_ld3 200 "${vp[@]}" pairs=oss_lead/unipc,ld3_lead/unipc,learned_lu/learned quality=true
elif [[ ${PLAN:-21} == 20 ]]; then
    stage vp_grids 150 "${vp[@]}" stock=euler stock_schedules=karras pairs=oss/euler,ld3/euler
    stage vp_consistent 200 "${vp[@]}" pairs=learned_ld3e_c/learned quality=true
    stage flow_consistent 220 "${flow[@]}" stock=euler pairs=oss/euler,learned_oe_c/learned quality=true
    stage vp_free 200 "${vp[@]}" pairs=learned_ld3e_f/learned quality=true
else
    # planned after the CPU's session 21 (2026-12-04; greedy coefficients, coef_init=greedy): the flow model on 512
    # held-out samples (its DOP853 reference from ∞, 975 NFE, ran at ~11 NFE a minute for 128 samples on two CPU cores:
    # hours for 512; 16 s for 128 on the H200) — the stock set, OSS's Euler grids,
    # greedy and Adam (consistent) coefficients on them, NFE 5, 6, 8, 10 — then the pictures of the greedy fits
    flow512=(model=bundled_flow heldout.num_samples.bundled_flow=512 calibration.num_samples.bundled_flow=96 nfe=5,6,8,10 out="$out/flow512.json")
    stage flow512 360 "${flow512[@]}" stock=euler,unipc,dpmpp_2m pairs=oss/euler,learned_oe_g/learned,learned_oe_c/learned
    stage flow512_quality 90 "${flow512[@]}" pairs=oss/euler,learned_oe_g/learned,learned_oe_c/learned quality=true
fi
echo "== done at $SECONDS s" | tee -a "$out/log.txt"
