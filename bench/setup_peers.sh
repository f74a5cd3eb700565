#!/usr/bin/env bash
# Create the peer environments for the side-by-side CPU benchmark (bench/run_cpu.py):
#
#   bench/.envs/trl     TRL 1.16 on transformers 5.23 (same transformers as alignkit), with peft (TRL's optional
#                       dependency, alignkit's own: the adapter registry imports it, so parity_trl.py needs it;
#                       the version constraints.txt pins)
#   bench/.envs/pyreft  pyreft 0.1.0 + pyvene 0.1.8 on transformers 4.45.1 (pyreft pins it)
#
# TRL and pyreft are peers we measure against, never alignkit dependencies: they live only here.
# Idempotent: an env whose marker file records the same install spec is left alone; delete
# bench/.envs/<name> (or pass --force) to rebuild. Prints what each env ends up with.
#
# torch==2.13.0 is installed FIRST in every env: it is a local CPU wheel (pip.conf find-links);
# any other torch spec would pull several GB of CUDA packages. Everything after it resolves
# normally, and 2.13.0 then satisfies their torch ranges.
#
# pyreft 0.1.0 declares heavy or conflicting requirements (transformers==4.45.1 is fine, but also
# jupyter, wandb, ydata-profiling, seaborn==0.12.2, gcsfs, ...), none imported by the training
# path. So pyreft and pyvene go in with --no-deps and their real imports are pinned by hand
# (read from the wheels: transformers, datasets, accelerate, numpy, tqdm, huggingface_hub,
# networkx + matplotlib, which pyvene imports at package import time).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENVS="$HERE/.envs"
PYTHON="${PYTHON:-python3}"
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

TORCH_SPEC="torch==2.13.0"
TRL_SPEC=("trl==1.16.0" "transformers==5.23.0" "peft==0.21.2")  # peft: constraints.txt's pin
PYREFT_DEPS=("transformers==4.45.1" "accelerate==0.34.2" "datasets==3.0.1" "huggingface-hub<1.0"
             "numpy<2.3" "tqdm" "networkx" "matplotlib" "protobuf" "sentencepiece")
PYREFT_NODEPS=("pyvene==0.1.8" "pyreft==0.1.0")

# pip with the local-index "Location ... is ignored" warnings filtered out (pipefail keeps pip's status).
pipq() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
make_env() {  # make_env NAME SPEC_STRING INSTALL_FUNCTION
    local name="$1" spec="$2" installer="$3"
    local env="$ENVS/$name" marker="$ENVS/$name/.alignkit-bench-spec"
    if [[ $FORCE == 0 && -f "$marker" && "$(cat "$marker")" == "$spec" ]]; then
        echo "[setup_peers] $name: up to date ($env)"
    else
        echo "[setup_peers] $name: creating $env"
        rm -rf "$env"
        "$PYTHON" -m venv "$env"
        pipq "$env/bin/pip" install -q --upgrade pip
        pipq "$env/bin/pip" install -q "$TORCH_SPEC"
        "$installer" "$env/bin/pip"
        "$env/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
        echo "$spec" > "$marker"
    fi
    echo "[setup_peers] $name installed:"
    "$env/bin/pip" list --format=freeze 2>/dev/null \
        | grep -iE '^(torch|transformers|tokenizers|trl|pyreft|pyvene|accelerate|datasets|peft|numpy)==' \
        | sed 's/^/    /'
}

install_trl() { pipq "$1" install -q "${TRL_SPEC[@]}"; }
install_pyreft() {
    pipq "$1" install -q "${PYREFT_DEPS[@]}"
    pipq "$1" install -q --no-deps "${PYREFT_NODEPS[@]}"
}

mkdir -p "$ENVS"
start=$(date +%s)
make_env trl "$TORCH_SPEC ${TRL_SPEC[*]}" install_trl
make_env pyreft "$TORCH_SPEC ${PYREFT_DEPS[*]} --no-deps ${PYREFT_NODEPS[*]}" install_pyreft
# Smoke: the trainers the benchmark uses import in their envs.
"$ENVS/trl/bin/python" -c "from trl import SFTTrainer, RewardTrainer, DPOTrainer; import peft; print('    trl imports ok')"
"$ENVS/pyreft/bin/python" -c "import pyreft; from pyreft import ReftTrainerForCausalLM, LoreftIntervention; print('    pyreft imports ok')"
echo "[setup_peers] done in $(( $(date +%s) - start )) s"
