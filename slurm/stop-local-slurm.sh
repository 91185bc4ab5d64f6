#!/usr/bin/env bash
# Stop the single-node cluster started by start-local-slurm.sh: cancel its jobs, then stop the daemons
# it started (found through the pid files in $SLURM_LOCAL_DIR/run; a munged it found already running is
# left alone). Safe to run when nothing is up. `--purge` also deletes the state directory (job ids,
# accounting database) and the config files the start script wrote.
set -uo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
RUN=$DIR/run
PURGE=0
for arg in "$@"; do
    case $arg in
        --purge) PURGE=1 ;;
        -h | --help) sed -n '2,5p' "$0"; exit 0 ;;
        *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
    esac
done
export PATH=$PATH:/usr/sbin:/sbin
log() { printf '[stop-local-slurm] %s\n' "$*" >&2; }

alive() { # alive PID NAME (not a zombie, expected command name)
    local pid=$1 name=$2 stat state comm
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    state=${stat##*) }; state=${state%% *}
    [[ $state != Z && $state != X ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name"* ]]
}
pid_of() { [ -s "$1" ] && tr -dc '0-9' <"$1" || true; }
stop_pid() { # stop_pid PIDFILE NAME: TERM, wait up to 10 s, KILL
    local pid; pid=$(pid_of "$1")
    if alive "$pid" "$2"; then
        log "stopping $2 ($pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do alive "$pid" "$2" || break; sleep 0.1; done
        if alive "$pid" "$2"; then
            log "$2 ($pid) ignored TERM: killing"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$1"
}

if alive "$(pid_of "$RUN/slurmctld.pid")" slurmctld; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        for _ in $(seq 50); do [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
    fi
fi

# Independent daemons stop in parallel groups; accounting goes last so final job records reach it.
stop_pid "$RUN/slurmd.pid" slurmd & stop_pid "$RUN/slurmctld.pid" slurmctld & wait
# Job steps outlive slurmd. Ours run in our log directory with our slurmd's log open; a step of any
# other SLURM on this host is left alone.
for pid in $(pgrep -x slurmstepd 2>/dev/null); do
    cwd=$(readlink "/proc/$pid/cwd" 2>/dev/null) || continue
    if [[ $cwd == "$DIR"/* ]] || ls -l "/proc/$pid/fd" 2>/dev/null | grep -qF -- "-> $DIR/"; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
done
stop_pid "$RUN/slurmdbd.pid" slurmdbd
pids=()
stop_pid "$RUN/mariadbd.pid" mariadbd & pids+=($!)
if [ -s "$RUN/munged.owned" ]; then
    owned=$(pid_of "$RUN/munged.owned")
    current=$(pid_of /run/munge/munged.pid)
    if [ -n "$owned" ] && [ "$owned" = "$current" ]; then
        stop_pid /run/munge/munged.pid munged & pids+=($!)
    fi
    rm -f "$RUN/munged.owned"
fi
wait "${pids[@]}"

if [ $PURGE = 1 ]; then
    log "purging $DIR and the /etc/slurm configs start-local-slurm.sh wrote"
    rm -rf "$DIR"
    for conf in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf /etc/slurm/gres.conf; do
        if [ -f "$conf" ] && grep -qF "# Written by slurm/start-local-slurm.sh" "$conf"; then rm -f "$conf"; fi
        if [ -e "$conf.orig-local-slurm" ] && [ ! -e "$conf" ]; then
            mv "$conf.orig-local-slurm" "$conf"; log "restored $conf"
        fi
    done
fi
log "stopped"
exit 0
