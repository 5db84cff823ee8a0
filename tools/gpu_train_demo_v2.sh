#!/usr/bin/env bash
# Train demo model v2 (issue 26) on a lent GPU machine in ONE call, from the repository root:
#
#   bash tools/gpu_train_demo_v2.sh
#
# Needs, carried with the working tree (both are git-excluded, not ignored: see .git/info/exclude):
#   .gpu_data/crops/  the face crops of `python -m iddm_core.demo.model prepare --faces ../shared/faces/congress
#                     --out .gpu_data/crops` (made here, where dlib is; training itself never imports dlib)
#   .whl/             diffusers' pure-python wheel (the device has none); .whl/extra/ (requests and its deps) and
#                     .whl/hub/ (huggingface_hub 1.x) are installed only if the device lacks them / has too old a one
# Optional: .gpu_data/work/work.tar.NN, the parts a previous call returned: unpacked into the work folder, and every
# stage already there is kept (train --resume; refine phases found there are always kept).
#
# What it does: the stages vae, unet, refine (`train --recipe gpu --budget-min ...`, one process each, so a crash
# in a late stage keeps the earlier ones), each given a share of the time left (vae 0.3, unet 0.35, refine 0.35 of
# TOTAL_MIN minus RESERVE_S), each phase inside stopping when its share is spent; then export. Into $OUT:
#   train.log                      everything the stages printed (throughput per phase), plus this script's lines
#   demo_v2/demo.safetensors       v2, fp16 single file (train.export)
#   demo_v2/README.md              its README (data sources, licences, held-out identities)
#   demo_v2/tokenizer.tar          the tokenizer folder of the export, tarred (the device returns at most 8 files)
#   work/work.tar.00, .01          vae/ + the newest UNet part + data.json of the work folder (fp32, for a resume);
#                                  rebuilt after every stage: join with `cat work.tar.* | tar -x -C WORKDIR`
#
# Settings (environment): TOTAL_MIN (7.0: minutes from start to the end of export), RESERVE_S (50: seconds kept
# for export and packing), DEVICE (cuda), PYTHON (python3), DATA (.gpu_data/crops), OUT ($OUT, else ./gpu_out),
# WORK (/tmp/demo_v2_work), SITE (/tmp/site: where wheels install), TRAIN_ARGS (extra arguments of every train
# call; the CPU dry run passes smaller batches and pools), CONTINUE (1: keep the carried vae / UNet and run only
# `train --stage refine --refine-continue` with the whole budget: the last refine phase (v-prediction) continued
# from the newest carried UNet part; needs the carried work parts), REFINE_LR (with CONTINUE: its learning rate,
# default the recipe's).
set -u
set -o pipefail

PY=${PYTHON:-python3}
START=$("$PY" -c "import time; print(time.time())")
TOTAL_MIN=${TOTAL_MIN:-7.0}
RESERVE_S=${RESERVE_S:-50}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-.gpu_data/crops}
OUT=${OUT:-$PWD/gpu_out}
WORK=${WORK:-/tmp/demo_v2_work}
SITE=${SITE:-/tmp/site}
TRAIN_ARGS=${TRAIN_ARGS:-}
CONTINUE=${CONTINUE:-0}
REFINE_LR=${REFINE_LR:-}
mkdir -p "$OUT/demo_v2" "$OUT/work" "$WORK" "$SITE"
LOG="$OUT/train.log"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

calc() { "$PY" -c "print(f'{($1):.1f}')"; }          # arithmetic without awk/bc
elapsed() { "$PY" -c "import time; print(f'{time.time() - $START:.1f}')"; }
say() { echo "[gpu_train_demo_v2 +$(elapsed)s] $*" | tee -a "$LOG"; }

# --------------------------------------------------------------------------------------------- wheels
install() { "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$@" 2>&1 | tee -a "$LOG"; }
if ! "$PY" -c "import requests" >/dev/null 2>&1; then
    say "requests missing: installing .whl/extra"
    install .whl/extra/*.whl
fi
if ! "$PY" -c "import huggingface_hub as h, sys; v = tuple(int(x) for x in h.__version__.split('.')[:2]); sys.exit(v < (1, 32))" >/dev/null 2>&1; then
    say "huggingface_hub older than 1.32 (diffusers needs it): installing .whl/hub"
    install .whl/hub/*.whl
fi
if ! "$PY" -c "import diffusers" >/dev/null 2>&1; then
    say "installing diffusers from .whl"
    install .whl/*.whl
fi
if ! "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"; then
import sys, torch, diffusers, transformers, peft, safetensors
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from transformers import CLIPTextModel
import iddm_core.demo.model.train, iddm_core.demo.model.data, iddm_core.training.finetune
assert "dlib" not in sys.modules, "training imported dlib"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}; {gpu}")
EOF
    say "FAILED: the training imports do not work here (see above)"
    exit 3
fi

# ------------------------------------------------------------------------------------------ resume
if ls .gpu_data/work/work.tar.* >/dev/null 2>&1; then
    say "unpacking the carried work parts into $WORK"
    cat .gpu_data/work/work.tar.* | tar -x -C "$WORK" || say "WARNING: could not unpack .gpu_data/work"
    # carried parts may be stored fp16 (to fit the 64 MiB the device call carries): train on fp32 weights
    "$PY" - "$WORK" <<'EOF' 2>&1 | tee -a "$LOG"
import glob, sys, torch
from safetensors.torch import load_file, save_file
for f in glob.glob(sys.argv[1] + "/*/diffusion_pytorch_model.safetensors"):
    sd = load_file(f)
    if any(v.dtype == torch.float16 for v in sd.values()):
        save_file({k: v.float() if v.dtype == torch.float16 else v for k, v in sd.items()}, f)
        print(f"upcast to fp32: {f}")
EOF
fi

pack() {   # vae + the newest UNet part + data.json, in parts of <= 15 MiB, replacing the previous parts
    local latest="" items=""
    for d in unet unet_refined1 unet_refined2 unet_refined3; do [ -d "$WORK/$d" ] && latest=$d; done
    [ -d "$WORK/vae" ] && items="vae"
    [ -n "$latest" ] && items="$items $latest"
    [ -f "$WORK/data.json" ] && items="$items data.json"
    [ -z "$items" ] && return 0
    local tmp="$WORK/.pack"
    rm -rf "$tmp" && mkdir -p "$tmp"
    if tar -C "$WORK" -cf - $items | split -b 15M -d -a 2 - "$tmp/work.tar."; then
        rm -f "$OUT/work/work.tar."*
        mv "$tmp"/work.tar.* "$OUT/work/"
        say "packed work parts: $items -> $(ls "$OUT/work" | tr '\n' ' ')"
    else
        say "WARNING: packing the work folder failed"
    fi
}

stage() {   # name, share of the time left (before the reserve), extra train arguments
    local name=$1 share=$2
    shift 2
    local left budget limit rc t0
    left=$(calc "$TOTAL_MIN * 60 - $(elapsed) - $RESERVE_S")
    budget=$(calc "max(15, ($left) * $share)")
    limit=$("$PY" -c "print(int($budget + 120))")
    say "stage $name: budget ${budget}s (hard limit ${limit}s)"
    t0=$(elapsed)
    timeout --kill-after=15 "$limit" "$PY" -m iddm_core.demo.model train --stage "$name" --recipe gpu \
        --device "$DEVICE" --data "$DATA" --work "$WORK" --budget-min "$("$PY" -c "print(round($budget / 60, 3))")" --resume \
        "$@" $TRAIN_ARGS 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    say "stage $name: exit $rc after $(calc "$(elapsed) - $t0")s"
    pack
    return "$rc"
}

status=0
run_stages() {
    if [ "$CONTINUE" = 1 ]; then
        if [ ! -d "$WORK/vae" ]; then say "FAILED: CONTINUE=1 needs the carried work parts (no $WORK/vae)"; return 1; fi
        stage refine 1.0 --refine-continue ${REFINE_LR:+--refine-lr "$REFINE_LR"}
    else
        stage vae 0.3 && stage unet 0.5 && stage refine 1.0
    fi
}
if run_stages; then
    say "export to $OUT/demo_v2"
    if "$PY" -m iddm_core.demo.model train --stage export --work "$WORK" --out "$OUT/demo_v2" 2>&1 | tee -a "$LOG"; then
        if [ -d "$OUT/demo_v2/tokenizer" ]; then
            tar -C "$OUT/demo_v2" -cf "$OUT/demo_v2/tokenizer.tar" tokenizer && rm -rf "$OUT/demo_v2/tokenizer"
        fi
    else
        status=2
        say "FAILED: export"
    fi
else
    status=1
    say "FAILED: a training stage (the parts that finished are in $OUT/work)"
fi
say "done, status $status; files in OUT:"
(cd "$OUT" && find . -type f -printf '%p %s\n' | sort | tee -a "$LOG")
grep -h "phase done\|saved to\|written:\|stage .*: exit" "$LOG" | tail -n 20
exit "$status"
