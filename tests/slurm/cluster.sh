#!/usr/bin/env bash
# A throw-away single-node SLURM cluster on this machine, for the tests and for trying
# job_script.sh by hand. Needs root; no systemd needed. Everything it writes (config, munge
# key and socket, spool, logs, pid files) lives under one state directory, so it touches
# nothing of a real SLURM or munge installation and several can coexist on other ports.
#
#   sudo tests/slurm/cluster.sh up   [STATE_DIR]   # install if needed, start munged, slurmctld, slurmd
#   export SLURM_CONF=STATE_DIR/etc/slurm.conf      # (printed by `up`) then sbatch/squeue/scontrol work
#   sudo tests/slurm/cluster.sh status [STATE_DIR]
#   sudo tests/slurm/cluster.sh down [STATE_DIR]   # cancel jobs, stop the daemons by their pid files
#
# STATE_DIR defaults to $DATAGEN_SLURM_STATE, else ${TMPDIR:-/tmp}/datagen-slurm.
# Environment: SLURM_CTLD_PORT / SLURM_D_PORT (default 16817 / 16818, away from a real
# SLURM's 6817 / 6818), SLURM_FAKE_GPUS (default 2: `gpu` gres backed by /dev/null so
# `#SBATCH --gres=gpu:1` is accepted on a machine without GPUs; 0 declares none),
# SLURM_CRED_EXPIRE (default 10: seconds a requeued job waits before it starts again;
# a real cluster's default is 120).
# Packages: when slurmctld/slurmd/munged are missing and we are root, `up` runs
# `apt-get install -y slurm-wlm munge` (Debian/Ubuntu, about 15 s).
#
# Exit status of `up`: 0 the node is idle and takes jobs; 3 this machine cannot run SLURM
# (not root, no apt, install failed; the reason is on stderr, tests skip on it);
# 1 anything else (a broken bring-up: see the logs under STATE_DIR/log).
set -euo pipefail

usage() {
    sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

action=${1:-}
[[ $action == up || $action == down || $action == status ]] || usage
state=${2:-${DATAGEN_SLURM_STATE:-${TMPDIR:-/tmp}/datagen-slurm}}
ctld_port=${SLURM_CTLD_PORT:-16817}
slurmd_port=${SLURM_D_PORT:-16818}
fake_gpus=${SLURM_FAKE_GPUS:-2}
cred_expire=${SLURM_CRED_EXPIRE:-10}

conf=$state/etc/slurm.conf
munge_dir=$state/munge
munge_socket=$munge_dir/munge.socket
export SLURM_CONF=$conf

log() { echo "cluster.sh: $*" >&2; }
cannot() { log "cannot run SLURM here: $*"; exit 3; }

# --- processes, by the pid files we asked the daemons to write --------------------------

# The pid in FILE if that process is alive (not a zombie) and runs the program NAME.
live_pid() {
    local file=$1 name=$2 pid
    [[ -s $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    local stat
    stat=$(<"/proc/$pid/stat") 2>/dev/null || return 1
    [[ $stat == "$pid ($name) "* ]] || return 1     # the pid was not reused by another program
    echo "$pid"
}

# True while process PID exists and is not a zombie.
alive() {
    local stat
    stat=$(<"/proc/$1/stat") 2>/dev/null || return 1
    [[ ${stat#*) } != Z* ]]
}

stop_daemon() {
    local file=$1 name=$2 pid i
    # Read the pid first: a daemon may remove its own pid file as soon as it starts to stop.
    pid=$(live_pid "$file" "$name") || { rm -f "$file"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do               # up to 15 s, then SIGKILL
        alive "$pid" || { rm -f "$file"; return 0; }
        sleep 0.1
    done
    log "$name ($pid) ignored SIGTERM for 15 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive "$pid" || { rm -f "$file"; return 0; }
        sleep 0.1
    done
    log "$name ($pid) is still running"
    return 1
}

# --- up -----------------------------------------------------------------------------------

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && return 0
    [[ $(id -u) == 0 ]] || cannot "slurmctld/slurmd/munged are not installed and we are not root to install them"
    command -v apt-get >/dev/null || cannot "slurmctld/slurmd/munged are not installed and there is no apt-get"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -o DPkg::Lock::Timeout=120 -y -qq)    # wait for another apt to finish
    if ! "${apt[@]}" install slurm-wlm munge >"$state/log/apt.log" 2>&1; then
        "${apt[@]}" update >>"$state/log/apt.log" 2>&1 || true   # a fresh machine has no package lists
        "${apt[@]}" install slurm-wlm munge >>"$state/log/apt.log" 2>&1 \
            || cannot "apt-get install slurm-wlm munge failed: $(tail -n 1 "$state/log/apt.log") (log: $state/log/apt.log)"
    fi
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        || cannot "slurm-wlm and munge are installed but slurmctld/slurmd/munged are not on PATH"
}

write_config() {
    local node cpus mem_mb gres_line=""
    node=$(hostname -s)
    # At least 4 CPUs, even on a smaller machine, so that a few 1-CPU test tasks run side by
    # side (config_overrides below lets slurmd accept more CPUs than it finds).
    cpus=$(nproc)
    ((cpus >= 4)) || cpus=4
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    if ((fake_gpus > 0)); then
        gres_line="Gres=gpu:$fake_gpus"
        # A GPU gres needs a File= (without one the node is drained), one distinct device per
        # GPU: copies of /dev/null (char 1:3) stand in for /dev/nvidiaN.
        install -d -m 755 "$state/dev"
        local i
        for ((i = 0; i < fake_gpus; i++)); do
            [[ -c $state/dev/fakegpu$i ]] || mknod -m 666 "$state/dev/fakegpu$i" c 1 3 \
                || touch "$state/dev/fakegpu$i"      # a plain file works too (slurmd logs an error)
        done
        echo "NodeName=$node Name=gpu File=$state/dev/fakegpu[0-$((fake_gpus - 1))]" >"$state/etc/gres.conf"
    fi
    cat >"$conf" <<CONF
# Written by tests/slurm/cluster.sh: one node (this machine), no accounting, no cgroups.
ClusterName=datagen-test
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$munge_socket,cred_expire=$cred_expire
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=10
MinJobAge=300
# Start a requeued job as soon as it may run again: the main scheduling loop looks at
# pending jobs every sched_interval seconds (default 60); backfill skips quiet cycles.
SchedulerParameters=sched_interval=1,bf_interval=1
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/d
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
${fake_gpus:+GresTypes=gpu}
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb $gres_line State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
    install -d -m 755 -o munge -g munge "$munge_dir"   # others need x to reach the socket
    if [[ ! -s $munge_dir/munge.key ]]; then
        dd if=/dev/urandom of="$munge_dir/munge.key" bs=1024 count=1 status=none
        chown munge:munge "$munge_dir/munge.key"
        chmod 400 "$munge_dir/munge.key"
    fi
    # --force: the state directory may sit under a world-writable /tmp.
    runuser -u munge -- munged --force --socket="$munge_socket" --key-file="$munge_dir/munge.key" \
        --pid-file="$munge_dir/munged.pid" --log-file="$munge_dir/munged.log" \
        --seed-file="$munge_dir/munged.seed" 2>>"$state/log/munged.err" \
        || { log "munged did not start: $(tail -3 "$state/log/munged.err" "$munge_dir/munged.log" 2>/dev/null)"; return 1; }
}

up() {
    [[ $(id -u) == 0 ]] || cannot "bringing up slurmctld/slurmd/munged as plain daemons needs root (uid is $(id -u))"
    if live_pid "$state/run/slurmctld.pid" slurmctld >/dev/null; then
        log "already up (state $state)"; echo "export SLURM_CONF=$conf"; return 0
    fi
    install -d -m 755 "$state" "$state/etc" "$state/log" "$state/run" "$state/spool" \
        "$state/spool/ctld" "$state/spool/d"
    install_packages
    write_config
    live_pid "$munge_dir/munged.pid" munged >/dev/null || start_munge
    slurmctld -f "$conf" 2>>"$state/log/slurmctld.err" \
        || { log "slurmctld did not start: $(tail -5 "$state/log/slurmctld.err" "$state/log/slurmctld.log" 2>/dev/null)"; exit 1; }
    slurmd -f "$conf" 2>>"$state/log/slurmd.err" \
        || { log "slurmd did not start: $(tail -5 "$state/log/slurmd.err" "$state/log/slurmd.log" 2>/dev/null)"; exit 1; }
    local i node_state=""
    for ((i = 0; i < 300; i++)); do               # up to 30 s for the node to report idle
        node_state=$(sinfo -h -N -o %t 2>/dev/null | head -1) || true
        [[ $node_state == idle ]] && break
        sleep 0.1
    done
    if [[ $node_state != idle ]]; then
        log "node not idle after 30 s (state '${node_state:-none}'); logs in $state/log"
        tail -5 "$state/log/slurmctld.log" "$state/log/slurmd.log" >&2 || true
        exit 1
    fi
    # An idle node could also be another cluster answering on these ports: check ours run.
    local name
    for name in slurmctld slurmd; do
        live_pid "$state/run/$name.pid" "$name" >/dev/null \
            || { log "$name exited after start (port $ctld_port/$slurmd_port taken?): $(tail -n 3 "$state/log/$name.log")"; exit 1; }
    done
    log "up: node $(hostname -s) idle, state in $state"
    echo "export SLURM_CONF=$conf"
}

# --- down / status -------------------------------------------------------------------------

down() {
    [[ -d $state ]] || { log "nothing to stop: no $state"; return 0; }
    local ok=0 i
    if live_pid "$state/run/slurmctld.pid" slurmctld >/dev/null; then
        scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do            # up to 15 s for running jobs to end
            [[ -z $(squeue -h -t R,CG -o %i 2>/dev/null) ]] && break
            sleep 0.1
        done
    fi
    stop_daemon "$state/run/slurmd.pid" slurmd || ok=1
    stop_daemon "$state/run/slurmctld.pid" slurmctld || ok=1
    stop_daemon "$munge_dir/munged.pid" munged || ok=1
    ((ok == 0)) && log "down: daemons stopped (state kept in $state)"
    return $ok
}

status() {
    local name file pid rc=0
    for name in munged slurmctld slurmd; do
        case $name in
            munged) file=$munge_dir/munged.pid ;;
            *) file=$state/run/$name.pid ;;
        esac
        if pid=$(live_pid "$file" "$name"); then echo "$name running (pid $pid)"
        else echo "$name not running"; rc=1; fi
    done
    if ((rc == 0)); then sinfo -N -o '%N %t %c %m %G'; squeue; fi
    return $rc
}

"$action"
