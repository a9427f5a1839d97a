#!/usr/bin/env bash
# Train medssl_jax on a Cloud TPU VM slice (one host or a multi-host pod slice).
#
#   launch/tpu_vm.sh [options] NAME ZONE ACCELERATOR_TYPE CONFIG GS_WORKDIR [-- MAIN_PY_ARGS...]
#
#   launch/tpu_vm.sh medssl-v4 us-central2-b v4-32 configs/micle.py:r50_1x,chexpert \
#       gs://my-bucket/runs/micle_cxr -- --config.data.data_dir=gs://my-bucket/tfds
#
# Steps: create the TPU VM if it does not exist (gcloud compute tpus tpu-vm create), put the
# repository on every worker (git clone --repo URL, or copy this checkout), install it with
# `pip install -e . "jax[tpu]"`, then run `python3 main.py --config=CONFIG --workdir=GS_WORKDIR`
# on all workers at once (--worker=all). main.py calls jax.distributed.initialize(), which
# configures itself on TPU VMs; checkpoints go to the shared gs:// workdir, so rerunning the
# same command after a preemption resumes from the last checkpoint.
#
# Options:
#   --dry-run             print the commands instead of running them
#   --project ID          GCP project (default: gcloud's configured project)
#   --version VERSION     TPU software version for create (default: tpu-ubuntu2204-base;
#                         v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e)
#   --spot                create a Spot TPU VM (cheaper, preemptible)
#   --repo URL            git clone URL on every worker instead of copying this checkout
#   --branch NAME         branch or tag to check out with --repo (default: the default branch)
#   --detach              start training under nohup and return (log: ~/medssl_train.log)
#   --skip-setup          do not copy/install again (the repo is already on the workers)
set -euo pipefail

usage() {
  sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

die() {
  echo "tpu_vm.sh: error: $*" >&2
  exit 2
}

DRY_RUN=0
PROJECT=""
VERSION="tpu-ubuntu2204-base"
SPOT=0
REPO_URL=""
BRANCH=""
DETACH=0
SKIP_SETUP=0
POSITIONAL=()
EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift ;;
    --version) VERSION="${2:?--version needs a value}"; shift ;;
    --spot) SPOT=1 ;;
    --repo) REPO_URL="${2:?--repo needs a value}"; shift ;;
    --branch) BRANCH="${2:?--branch needs a value}"; shift ;;
    --detach) DETACH=1 ;;
    --skip-setup) SKIP_SETUP=1 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) POSITIONAL+=("$1") ;;
  esac
  shift
done

[[ ${#POSITIONAL[@]} -eq 5 ]] || die "expected NAME ZONE ACCELERATOR_TYPE CONFIG GS_WORKDIR, got ${#POSITIONAL[@]} argument(s): ${POSITIONAL[*]:-none} (see --help)"
NAME="${POSITIONAL[0]}"
ZONE="${POSITIONAL[1]}"
ACCEL="${POSITIONAL[2]}"
CONFIG="${POSITIONAL[3]}"
WORKDIR="${POSITIONAL[4]}"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "NAME '$NAME': lower-case letters, digits and '-', starting with a letter"
[[ "$ACCEL" =~ ^v[0-9]+[a-z0-9]*-[0-9]+$ ]] || die "ACCELERATOR_TYPE '$ACCEL': expected e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8"
[[ "$WORKDIR" == gs://?* ]] || die "GS_WORKDIR '$WORKDIR' must be a gs:// path: every worker writes checkpoints there"
CONFIG_FILE="${CONFIG%%:*}"
[[ -f "$REPO_ROOT/$CONFIG_FILE" ]] || die "CONFIG '$CONFIG': no file $CONFIG_FILE in $REPO_ROOT"

GCLOUD=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")
REMOTE_DIR="medssl_jax"  # relative to the home directory on every worker

# Shell-quotes each argument for reading and for the remote shell: bare when safe, else '...'.
quote() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Prints a command in dry-run mode, runs it otherwise.
run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    quote "$@"
  else
    "$@"
  fi
}

on_all_workers() {
  run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"
}

# 1. The TPU VM: reuse it if it exists, else create it.
CREATE=("${GCLOUD[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
[[ $SPOT -eq 1 ]] && CREATE+=(--spot)
if [[ $DRY_RUN -eq 1 ]]; then
  echo "# create the TPU VM unless '${GCLOUD[*]} describe $NAME ${LOC[*]}' finds it:"
  run "${CREATE[@]}"
elif "${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" >/dev/null 2>&1; then
  echo "Using existing TPU VM $NAME in $ZONE"
else
  run "${CREATE[@]}"
fi

# 2. The code on every worker, 3. installed with TPU jax.
if [[ $SKIP_SETUP -eq 0 ]]; then
  if [[ -n "$REPO_URL" ]]; then
    CHECKOUT=""
    [[ -n "$BRANCH" ]] && CHECKOUT=" && git -C $REMOTE_DIR checkout $(quote "$BRANCH")"
    on_all_workers "rm -rf $REMOTE_DIR && git clone $(quote "$REPO_URL") $REMOTE_DIR$CHECKOUT"
  else
    ARCHIVE="/tmp/medssl_jax_src_$$.tar.gz"
    run tar -czf "$ARCHIVE" -C "$REPO_ROOT" --exclude=.git --exclude=.venv \
      --exclude=__pycache__ --exclude='*.egg-info' .
    run "${GCLOUD[@]}" scp "$ARCHIVE" "$NAME:medssl_jax_src.tar.gz" "${LOC[@]}" --worker=all
    on_all_workers "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf medssl_jax_src.tar.gz -C $REMOTE_DIR"
    [[ $DRY_RUN -eq 1 ]] || rm -f "$ARCHIVE"
  fi
  on_all_workers "cd $REMOTE_DIR && python3 -m pip install -q -U pip && python3 -m pip install -q -e . 'jax[tpu]'"
fi

# 4. Train on all workers at once; jax.distributed initialises itself on TPU VMs.
TRAIN="python3 main.py $(quote --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})"
TRAIN="cd $REMOTE_DIR && export TF_CPP_MIN_LOG_LEVEL=2 && $TRAIN"
if [[ $DETACH -eq 1 ]]; then
  TRAIN="nohup bash -c $(quote "$TRAIN") > ~/medssl_train.log 2>&1 < /dev/null &"
fi
on_all_workers "$TRAIN"
if [[ $DETACH -eq 1 ]]; then
  echo "# follow worker 0: ${GCLOUD[*]} ssh $NAME ${LOC[*]} --worker=0 --command='tail -f ~/medssl_train.log'"
fi
