#!/usr/bin/env bash
# Train medssl_jax on a Cloud TPU VM slice (one host or a multi-host pod slice).
#
#   launch/tpu_vm.sh [options] NAME ZONE ACCELERATOR_TYPE CONFIG GS_WORKDIR [-- MAIN_PY_ARGS...]
#
#   launch/tpu_vm.sh medssl-v4 us-central2-b v4-32 configs/micle.py:r50_1x,chexpert \
#       gs://my-bucket/runs/micle_cxr -- --config.data.data_dir=gs://my-bucket/tfds
#
# Steps: (1) the TPU VM: reuse it when READY, delete and create it again when PREEMPTED or
# TERMINATED, wait while it is CREATING, STARTING, DELETING etc., create it when missing;
# (2) the repository on every worker (git clone --repo URL, or copy this checkout);
# (3) Python >= 3.11 (apt python3.11 python3.11-venv unless present) and a venv ~/medssl_venv
# with `pip install -e . "jax[tpu]"` on every worker; (4) `MEDSSL_MULTIHOST=tpu
# ~/medssl_venv/bin/python main.py --config=CONFIG --workdir=GS_WORKDIR` on all workers at once.
# main.py then calls jax.distributed.initialize(), which configures itself on TPU VMs (harmless
# on a single-host slice). Checkpoints go to the shared gs:// workdir, so rerunning the same
# command after a preemption resumes from the last checkpoint.
#
# Options:
#   --dry-run             print the commands that would run, one per line; run nothing
#   --project ID          GCP project (default: gcloud's configured project)
#   --version VERSION     TPU software version for create (default: tpu-ubuntu2204-base;
#                         v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e)
#   --python X.Y          Python for the workers' venv, >= 3.11 (default: 3.11)
#   --spot                create a Spot TPU VM (cheaper, preemptible)
#   --repo URL            git clone URL on every worker instead of copying this checkout
#   --branch NAME         branch or tag to check out with --repo (default: the default branch)
#   --detach              start training under nohup and return (log: ~/medssl_train.log)
#   --skip-setup          do not copy/install again (ignored when the VM is (re)created)
# Environment: MEDSSL_TPU_POLL_S (default 30), MEDSSL_TPU_WAIT_S (default 1800): how often and
# how long to wait for a TPU VM in a transitional state.
set -euo pipefail

usage() {
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p;}' "$0"
  exit "${1:-2}"
}

die() {
  echo "tpu_vm.sh: error: $*" >&2
  exit 2
}

DRY_RUN=0
PROJECT=""
VERSION="tpu-ubuntu2204-base"
PY_VERSION="3.11"
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
    --python) PY_VERSION="${2:?--python needs a value}"; shift ;;
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
[[ "$PY_VERSION" =~ ^3\.(1[1-9]|[2-9][0-9])$ ]] || die "--python '$PY_VERSION': expected 3.11 or newer (jax >= 0.7 needs Python >= 3.11)"
POLL_S="${MEDSSL_TPU_POLL_S:-30}"
WAIT_S="${MEDSSL_TPU_WAIT_S:-1800}"
[[ "$POLL_S" =~ ^[0-9]+$ && "$WAIT_S" =~ ^[0-9]+$ ]] || die "MEDSSL_TPU_POLL_S and MEDSSL_TPU_WAIT_S must be whole seconds"

GCLOUD=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")
REMOTE_DIR="medssl_jax"  # relative to the home directory on every worker
PY="python$PY_VERSION"   # the interpreter the venv is made from, e.g. python3.11
VENV="~/medssl_venv"     # expanded by the remote shell; one venv per worker
VENV_PY="$VENV/bin/python"

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

# 1. The TPU VM. States: READY -> reuse; PREEMPTED/TERMINATED (a Spot VM after preemption, or
# a VM past its maintenance) -> delete and create again: such a VM cannot run anything and its
# disks are gone; CREATING/STARTING/RESTARTING/REPAIRING/REIMAGING/DELETING -> wait (poll) and
# look again; not found -> create; anything else (e.g. STOPPED) -> stop with an error.
DESCRIBE=("${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)')
DELETE=("${GCLOUD[@]}" delete "$NAME" "${LOC[@]}" --quiet)
CREATE=("${GCLOUD[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
[[ $SPOT -eq 1 ]] && CREATE+=(--spot)
CREATED=0

# Prints the VM's state, or NOT_FOUND; stops the script on any other gcloud error.
vm_state() {
  local out err rc=0
  err="$(mktemp)"
  out="$("${DESCRIBE[@]}" 2>"$err")" || rc=$?
  if [[ $rc -eq 0 ]]; then
    echo "${out:-UNKNOWN}"
  elif grep -qi "not.found" "$err"; then
    echo NOT_FOUND
  else
    cat "$err" >&2
    rm -f "$err"
    die "'$(quote "${DESCRIBE[@]}")' failed (exit $rc)"
  fi
  rm -f "$err"
}

if [[ $DRY_RUN -eq 1 ]]; then
  quote "${DESCRIBE[@]}"
  echo "# READY: reuse the TPU VM. PREEMPTED or TERMINATED: delete it and create it again:"
  echo "#   $(quote "${DELETE[@]}")"
  echo "# CREATING, STARTING, RESTARTING, REPAIRING, REIMAGING, DELETING: poll every ${POLL_S} s (up to ${WAIT_S} s)."
  echo "# Any other state (e.g. STOPPED): stop with an error. Not found (or recreated): create it:"
  run "${CREATE[@]}"
else
  waited=0
  while true; do
    state="$(vm_state)"
    case "$state" in
      READY)
        echo "Using existing TPU VM $NAME in $ZONE (READY)"
        break ;;
      PREEMPTED|TERMINATED)
        echo "TPU VM $NAME in $ZONE is $state: it cannot run again; deleting and creating it anew"
        run "${DELETE[@]}"
        run "${CREATE[@]}"
        CREATED=1
        break ;;
      NOT_FOUND)
        echo "Creating TPU VM $NAME in $ZONE ($ACCEL, $VERSION)"
        run "${CREATE[@]}"
        CREATED=1
        break ;;
      CREATING|STARTING|RESTARTING|REPAIRING|REIMAGING|DELETING)
        [[ $waited -lt $WAIT_S ]] || die "TPU VM $NAME is still $state after ${WAIT_S} s; try again later"
        echo "TPU VM $NAME is $state; checking again in ${POLL_S} s"
        sleep "$POLL_S"
        waited=$((waited + POLL_S))
        [[ $POLL_S -gt 0 ]] || waited=$((waited + 1)) ;;
      *)
        die "TPU VM $NAME is in state $state; start it ('${GCLOUD[*]} start $NAME ${LOC[*]}') or delete it ('$(quote "${DELETE[@]}")'), then run this again" ;;
    esac
  done
fi

# 2. The code on every worker, 3. installed with TPU jax into a Python >= 3.11 venv.
if [[ $SKIP_SETUP -eq 1 && $CREATED -eq 1 ]]; then
  echo "TPU VM $NAME was just created: setting it up despite --skip-setup"
  SKIP_SETUP=0
fi
if [[ $SKIP_SETUP -eq 1 && $DRY_RUN -eq 1 ]]; then
  echo "# --skip-setup: no copy or install (unless the TPU VM is created above, then as without it)"
fi
if [[ $SKIP_SETUP -eq 0 ]]; then
  if [[ -n "$REPO_URL" ]]; then
    CHECKOUT=""
    [[ -n "$BRANCH" ]] && CHECKOUT=" && git -C $REMOTE_DIR checkout $(quote "$BRANCH")"
    on_all_workers "rm -rf $REMOTE_DIR && git clone $(quote "$REPO_URL") $REMOTE_DIR$CHECKOUT"
  else
    ARCHIVE="${TMPDIR:-/tmp}/medssl_jax_src_$$.tar.gz"
    [[ $DRY_RUN -eq 1 ]] || trap 'rm -f "$ARCHIVE"' EXIT
    run tar -czf "$ARCHIVE" -C "$REPO_ROOT" --exclude=.git --exclude=.venv \
      --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache .
    run "${GCLOUD[@]}" scp "$ARCHIVE" "$NAME:medssl_jax_src.tar.gz" "${LOC[@]}" --worker=all
    on_all_workers "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf medssl_jax_src.tar.gz -C $REMOTE_DIR"
    run rm -f "$ARCHIVE"
  fi
  # The image's python3 is 3.10 on tpu-ubuntu2204-base (too old for jax >= 0.7): install
  # pythonX.Y from the Ubuntu archive unless the image already has it with venv/ensurepip.
  # A fresh VM's unattended upgrades may hold the dpkg lock for a while: wait for it.
  APT="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
  on_all_workers "$PY -c 'import ensurepip, venv' 2>/dev/null || { $APT update -qq && $APT install -y -qq $PY $PY-venv; }"
  on_all_workers "$PY -m venv $VENV && $VENV_PY -m pip install -q -U pip && cd $REMOTE_DIR && $VENV_PY -m pip install -q -e . 'jax[tpu]'"
fi

# 4. Train on all workers at once. MEDSSL_MULTIHOST=tpu: main.py is one process of many and
# calls jax.distributed.initialize(), which finds the other workers by itself on TPU VMs.
TRAIN="$VENV_PY main.py $(quote --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})"
TRAIN="cd $REMOTE_DIR && export TF_CPP_MIN_LOG_LEVEL=2 MEDSSL_MULTIHOST=tpu && $TRAIN"
if [[ $DETACH -eq 1 ]]; then
  TRAIN="nohup bash -c $(quote "$TRAIN") > ~/medssl_train.log 2>&1 < /dev/null &"
fi
on_all_workers "$TRAIN"
if [[ $DETACH -eq 1 ]]; then
  echo "# follow worker 0: ${GCLOUD[*]} ssh $NAME ${LOC[*]} --worker=0 --command='tail -f ~/medssl_train.log'"
fi
