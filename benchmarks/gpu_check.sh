#!/usr/bin/env bash
# Everything this project needs checked on a GPU, in one run of under 8 minutes on one H100/H200:
#   1. install what is missing (torch is kept if it imports; a wheel folder works offline),
#   2. the real-shape random-weight stack (pixcell_ext.stacks.full_random, built on the GPU),
#   3. bench_train.py --preset full --find_max_batch: bf16 MFU of the cached step, largest micro-batch,
#   4. generation at full shapes (bench_generate.py's full preset if it has one; else generate_synthetic.py, timed),
#   5. 2 updates + a resume under the DDP, FSDP2 and DeepSpeed ZeRO-2 configs of accelerate_configs/ with
#      --num_processes 1 (all the GPU needs to run each code path).
# Every step has its own timeout (their sum is under 8 minutes), so the script cannot overrun; a failed or timed-out
# step is recorded and the next one runs. Logs and summary.txt go to $OUT if set, else ./gpu_check_out (8 files at
# most); models and runs to $WORK_DIR (default /tmp/gpu_check_work).
#
#   bash benchmarks/gpu_check.sh                       # from the repository root, on the GPU machine
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # print the commands, run nothing (works anywhere)
#   WHEEL_DIR=.whl bash benchmarks/gpu_check.sh        # offline: install missing packages from a wheel folder
#
# Env: PYTHON (default python3), OUT, WORK_DIR, WHEEL_DIR, PEAK_TFLOPS (default 989, H100/H200 SXM dense bf16).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
WORK_DIR="${WORK_DIR:-/tmp/gpu_check_work}"
WHEEL_DIR="${WHEEL_DIR:-}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
ASSETS="$WORK_DIR/full_random"
LAUNCH=("$PYTHON" -m accelerate.commands.launch)
PIP=("$PYTHON" -m pip install --quiet --disable-pip-version-check)
if [[ -n "$WHEEL_DIR" ]]; then PIP+=(--no-index --find-links "$WHEEL_DIR"); fi

# Seconds per step; with KILL_AFTER each, the worst case is 40+40+120+40+6*35 + 10*2 = 470 s, under 8 minutes.
T_INSTALL=40
T_ASSETS=40
T_BENCH_TRAIN=120
T_GENERATE=40
T_CONFIG=35 # per launch: 2 launches (train, resume) per config, 3 configs
KILL_AFTER=2

if [[ "$DRY_RUN" != 1 && "${1:-}" != install ]]; then
    mkdir -p "$OUT_DIR" "$WORK_DIR"
    : >"$OUT_DIR/summary.txt"
fi

# step NAME SECONDS CMD...: run CMD under `timeout`, its output appended to $OUT_DIR/NAME.log; record the outcome.
step() {
    local name=$1 seconds=$2
    shift 2
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '[%s] timeout --kill-after=%s %s' "$name" "$KILL_AFTER" "$seconds"
        printf ' %q' "$@"
        printf '\n'
        return 0
    fi
    local start=$SECONDS rc
    {
        printf '$'
        printf ' %q' "$@"
        printf '\n'
    } >>"$OUT_DIR/$name.log"
    timeout --kill-after="$KILL_AFTER" "$seconds" "$@" >>"$OUT_DIR/$name.log" 2>&1
    rc=$?
    local verdict=ok
    if ((rc == 124 || rc == 137)); then verdict="TIMEOUT after ${seconds}s"; elif ((rc != 0)); then verdict="FAILED rc=$rc"; fi
    echo "$name: $verdict ($((SECONDS - start)) s)" | tee -a "$OUT_DIR/summary.txt"
    return $rc
}

# ---------------------------------------------------------------------------------------------------- 1. install
if [[ "${1:-}" == install ]]; then  # the install step re-enters here, so that `timeout` can bound it
    # torch is kept when it imports (a GPU image's CUDA build must not be replaced by PyPI's default build);
    # every other requirement is installed only if missing or too old, as pip decides.
    "$PYTHON" -c "import torch" 2>/dev/null || "${PIP[@]}" torch torchvision || exit 1
    # If pip cannot satisfy them all (an offline wheel folder without, say, lpips), one at a time, so that the rest
    # (diffusers above all) still gets installed.
    "${PIP[@]}" -r requirements.txt || grep -Ev '^\s*(#|$)' requirements.txt | while read -r requirement; do
        "${PIP[@]}" "$requirement" || echo "could not install $requirement"
    done
    # DeepSpeed is published as a source archive that builds against the installed torch: no build isolation.
    "$PYTHON" -c "import deepspeed" 2>/dev/null || "${PIP[@]}" --no-build-isolation deepspeed ||
        echo "no deepspeed: the ZeRO-2 step will fail"
    "$PYTHON" -c "import torch, diffusers, accelerate; print(torch.__version__, torch.cuda.is_available(), diffusers.__version__, accelerate.__version__)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    exit 0
fi
step install "$T_INSTALL" bash "${BASH_SOURCE[0]}" install

# ---------------------------------------------------------------------------------------------------- 2. assets
step write_assets "$T_ASSETS" "$PYTHON" -m pixcell_ext.stacks.full_random --output_dir "$ASSETS" --device cuda

MODELS=(
    --pretrained_model_name_or_path "$ASSETS/pixcell-256" --vae_name_or_path "$ASSETS/sd35-vae"
    --uni_model_name_or_path "$ASSETS/uni2-h"
)

# ---------------------------------------------------------------------------------------------------- 3. training speed
step bench_train "$T_BENCH_TRAIN" "$PYTHON" benchmarks/bench_train.py --preset full --find_max_batch \
    --mixed_precision bf16 --repeats 5 --warmup 1 --peak_tflops "$PEAK_TFLOPS"

# ---------------------------------------------------------------------------------------------------- 4. generation
# argparse lists --presets' choices as {tiny,small,...}: use bench_generate.py only if 'full' is one of them.
FULL_CHOICE='\{[a-z,]*\bfull\b[a-z,]*\}'
if [[ "$DRY_RUN" != 1 ]] && "$PYTHON" benchmarks/bench_generate.py --help 2>/dev/null | grep -qE "$FULL_CHOICE"; then
    step generate "$T_GENERATE" "$PYTHON" benchmarks/bench_generate.py --presets full
else
    # No full preset in bench_generate.py: time the real script at full shapes (base PixCell, no LoRA needed).
    step generate "$T_GENERATE" "${LAUNCH[@]}" --num_processes 1 --num_machines 1 --mixed_precision bf16 \
        --dynamo_backend no generate_synthetic.py "${MODELS[@]}" --reference_data_dir "$ASSETS/tiles" \
        --classes ADI BACK --num_images_per_class 32 --num_inference_steps 20 --batch_size 32 \
        --output_dir "$WORK_DIR/synthetic" --overwrite
fi

# ---------------------------------------------------------------------------------------------------- 5. configs
TRAIN=(
    "${MODELS[@]}" --train_data_dir "$ASSETS/tiles" --classes ADI BACK --train_batch_size 2
    --gradient_checkpointing --lr_warmup_steps 0 --checkpointing_steps 1 --validation_steps 1000
    --num_validation_inference_steps 2 --dataloader_num_workers 2 --report_to none
)
for config in multi_gpu fsdp deepspeed_zero2; do
    run_dir="$WORK_DIR/train-$config"
    [[ "$DRY_RUN" == 1 ]] || rm -rf "$run_dir"
    launch=("${LAUNCH[@]}" --config_file "accelerate_configs/$config.yaml" --num_processes 1 --dynamo_backend no)
    # 2 updates with a checkpoint after each, then a resume from checkpoint-2 for a third.
    step "$config" "$T_CONFIG" "${launch[@]}" train_adapter_lora.py "${TRAIN[@]}" --output_dir "$run_dir" \
        --max_train_steps 2 &&
        step "$config" "$T_CONFIG" "${launch[@]}" train_adapter_lora.py "${TRAIN[@]}" --output_dir "$run_dir" \
            --max_train_steps 3 --resume_from_checkpoint latest
done

if [[ "$DRY_RUN" != 1 ]]; then
    {
        echo
        echo "bench_train:"
        grep -E "cached|largest|MFU|machine" "$OUT_DIR/bench_train.log" || true
        echo "generate:"
        grep -iE "images/s|it/s|wrote|generated" "$OUT_DIR/generate.log" | tail -5 || true
        for config in multi_gpu fsdp deepspeed_zero2; do
            echo "$config: resumed: $(grep -c 'Resumed from' "$OUT_DIR/$config.log" 2>/dev/null || echo 0)"
        done
    } >>"$OUT_DIR/summary.txt"
    cat "$OUT_DIR/summary.txt"
fi
