#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine (Debian 12, root, no systemd) for tests and CI:
# munged + a private mariadbd + slurmdbd (sacct is how submitit reads job states) + slurmctld + slurmd.
#
# Idempotent: a daemon that is already up is left alone, so a second run is a quick no-op. Leftovers of
# an abrupt stop (stale pid files, zombies, a stale munge socket, crash-recovering state) are handled.
# Daemons are detached from this script's stdout/stderr so a caller piping our output never hangs.
#
# Knobs (environment):
#   SLURM_LOCAL_DIR         state, logs, pid files, database            (default /tmp/slurm-local)
#   SLURM_LOCAL_CPUS        CPUs the node advertises = concurrent 1-CPU jobs  (default 4)
#   SLURM_LOCAL_MEM_MB      RealMemory of the node                       (default: MemTotal)
#   SLURM_LOCAL_GPUS        fake GPUs (character devices that are never opened)  (default 0)
#   SLURM_LOCAL_PARTITION   partition name                               (default debug)
#   SLURM_LOCAL_CLUSTER     ClusterName                                  (default localcluster)
#   SLURM_LOCAL_ACCOUNTING  1: slurmdbd + mariadbd (sacct works); 0: none (default 1)
#   SLURM_LOCAL_TIMEOUT_S   how long to wait for each daemon             (default 120)
#   SLURM_LOCAL_SMOKE       0 | 1 | auto: run `sbatch --wrap true` and wait for it (auto: after a (re)start)
#   SLURM_LOCAL_INSTALL     0: never call apt-get (fail if packages are missing)  (default 1)
#   SLURM_LOCAL_REPLACE_CONFIG  1: set aside /etc/slurm configs this script did not write (default 0: refuse)
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
CPUS=${SLURM_LOCAL_CPUS:-4}
GPUS=${SLURM_LOCAL_GPUS:-0}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
CLUSTER=${SLURM_LOCAL_CLUSTER:-localcluster}
ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-1}
TIMEOUT_S=${SLURM_LOCAL_TIMEOUT_S:-120}
SMOKE=${SLURM_LOCAL_SMOKE:-auto}
INSTALL=${SLURM_LOCAL_INSTALL:-1}
REPLACE_CONFIG=${SLURM_LOCAL_REPLACE_CONFIG:-0}
MEM_MB=${SLURM_LOCAL_MEM_MB:-$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)}
HOST=$(hostname -s)
RUN=$DIR/run
LOG=$DIR/log
SOCK=$RUN/mysqld/mysqld.sock
export MYSQL_UNIX_PORT=$SOCK   # slurmdbd has no socket option; libmariadb honours this

log() { printf '[start-local-slurm] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (apt, /etc/slurm, /run/munge, daemons)"
for v in CPUS GPUS MEM_MB TIMEOUT_S; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "SLURM_LOCAL_${v}=${!v} is not a non-negative integer"
done
[ "$CPUS" -ge 1 ] || die "SLURM_LOCAL_CPUS must be >= 1"

# -- process helpers -----------------------------------------------------------------------------
# A zombie still answers `kill -0`, and PID 1 here reaps orphans only every second or two, so "alive"
# means: /proc entry exists, state is not Z/X, and the command name is the expected one.
alive() { # alive PID NAME
    local pid=$1 name=$2 stat state comm
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    state=${stat##*) }; state=${state%% *}
    [[ $state != Z && $state != X ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name"* ]]
}
pid_of() { [ -s "$1" ] && tr -dc '0-9' <"$1" || true; }
running() { # running PIDFILE NAME
    local pid; pid=$(pid_of "$1"); alive "$pid" "$2"
}
wait_for() { # wait_for DESCRIPTION COMMAND...  (polls every 0.2 s up to TIMEOUT_S)
    local what=$1; shift
    local deadline=$((SECONDS + TIMEOUT_S))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "timed out after ${TIMEOUT_S}s waiting for $what (logs: $LOG)"
        sleep 0.2
    done
}
stop_pid() { # stop_pid PIDFILE NAME: TERM, wait, KILL
    local pid; pid=$(pid_of "$1")
    if alive "$pid" "$2"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do alive "$pid" "$2" || break; sleep 0.1; done
        alive "$pid" "$2" && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}

# -- packages ------------------------------------------------------------------------------------
PACKAGES=(slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge)
BINARIES=(slurmctld slurmd sbatch munged)
if [ "$ACCOUNTING" = 1 ]; then
    PACKAGES+=(slurmdbd slurm-wlm-mysql-plugin mariadb-server-core mariadb-client-core)
    BINARIES+=(slurmdbd mariadbd mariadb-install-db mariadb)
fi
missing=()
for b in "${BINARIES[@]}"; do
    PATH=$PATH:/usr/sbin:/sbin command -v "$b" >/dev/null || missing+=("$b")
done
if [ "$ACCOUNTING" = 1 ] && ! ls /usr/lib/*/slurm-wlm/accounting_storage_mysql.so >/dev/null 2>&1; then
    missing+=(accounting_storage_mysql.so)
fi
if [ ${#missing[@]} -gt 0 ]; then
    [ "$INSTALL" = 1 ] || die "missing ${missing[*]} and SLURM_LOCAL_INSTALL=0"
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    # Package scripts must not try to start services (there is no systemd); the image usually has a
    # policy-rc.d that forbids it, and if not we add one for the duration of the install.
    policy_added=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy_added=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    ok=0
    for attempt in 1 2 3; do
        if apt-get -o DPkg::Lock::Timeout=600 update -qq </dev/null >/dev/null &&
            apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${PACKAGES[@]}" \
                </dev/null >/dev/null; then
            ok=1; break
        fi
        log "apt-get failed (attempt $attempt), retrying"; sleep $((attempt * 3))
    done
    [ $policy_added = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $ok = 1 ] || die "apt-get install failed"
fi
export PATH=$PATH:/usr/sbin:/sbin

mkdir -p "$DIR/ctld" "$DIR/spool" "$LOG" "$RUN"
chmod 755 "$DIR"

# -- configuration ---------------------------------------------------------------------------------
# Files are rewritten only when their content changes; a change restarts the daemons that read them.
install_if_changed() { # install_if_changed DEST MODE  (content on stdin); prints 1 if changed
    local dest=$1 mode=$2 tmp
    tmp=$(mktemp "$dest.XXXXXX")
    cat >"$tmp"
    if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"; echo 0
    else
        chmod "$mode" "$tmp"; mv -f "$tmp" "$dest"; echo 1
    fi
}
mkdir -p /etc/slurm
# A config this script did not write may belong to a real cluster on this host: refuse to replace it
# unless asked, and then keep it aside (stop-local-slurm.sh --purge puts it back).
MARKER="# Written by slurm/start-local-slurm.sh"
for conf in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf /etc/slurm/gres.conf; do
    [ -f "$conf" ] || continue
    grep -qF "$MARKER" "$conf" && continue
    [ "$REPLACE_CONFIG" = 1 ] || die "$conf exists and was not written by this script (another cluster's?); move it away or set SLURM_LOCAL_REPLACE_CONFIG=1 (it is then kept as $conf.orig-local-slurm and restored by stop-local-slurm.sh --purge)"
    [ -e "$conf.orig-local-slurm" ] || mv "$conf" "$conf.orig-local-slurm"
    log "kept $conf as $conf.orig-local-slurm"
done
DEF_MEM=$((MEM_MB / CPUS))
gres_line="" gres_types="" tres_line=""
if [ "$GPUS" -gt 0 ]; then
    gres_line=" Gres=gpu:$GPUS"; gres_types="GresTypes=gpu"; tres_line="AccountingStorageTRES=gres/gpu"
    # A gres.conf GPU needs File= naming a character device; these are never opened.
    mkdir -p "$DIR/fakedev"
    for ((i = 0; i < GPUS; i++)); do
        [ -c "$DIR/fakedev/nvidia$i" ] || { rm -f "$DIR/fakedev/nvidia$i"; mknod "$DIR/fakedev/nvidia$i" c 195 "$i"; }
    done
fi
if [ "$ACCOUNTING" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
$tres_line"
else
    acct="AccountingStorageType=accounting_storage/none"
fi

slurm_conf_changed=$(install_if_changed /etc/slurm/slurm.conf 644 <<EOF
# Written by slurm/start-local-slurm.sh (single-node test cluster); rewritten on every start.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM
SchedulerParameters=batch_sched_delay=0
DependencyParameters=kill_invalid_depend
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
$acct
$gres_types
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB$gres_line State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
gres_changed=0
if [ "$GPUS" -gt 0 ]; then
    gres_changed=$(install_if_changed /etc/slurm/gres.conf 644 <<EOF
$MARKER
NodeName=$HOST Name=gpu File=$DIR/fakedev/nvidia[0-$((GPUS - 1))]
EOF
    )
elif [ -f /etc/slurm/gres.conf ]; then
    rm -f /etc/slurm/gres.conf; gres_changed=1
fi
dbd_conf_changed=0
if [ "$ACCOUNTING" = 1 ]; then
    dbd_conf_changed=$(install_if_changed /etc/slurm/slurmdbd.conf 600 <<EOF
# Written by slurm/start-local-slurm.sh
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    )
fi

restarted=0

# -- munged ----------------------------------------------------------------------------------------
MUNGE_PIDFILE=/run/munge/munged.pid
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
if running "$MUNGE_PIDFILE" munged; then
    :
elif timeout 1 munge -n </dev/null 2>/dev/null | timeout 1 unmunge >/dev/null 2>&1; then
    # A munged we did not start (and cannot find by pid file) answers; use it, never stop it.
    log "using a munged that is already running"
else
    log "starting munged"
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    rm -f "$MUNGE_PIDFILE" /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- munged </dev/null >/dev/null 2>&1
    wait_for "munged" bash -c 'munge -n </dev/null | unmunge'
    cp "$MUNGE_PIDFILE" "$RUN/munged.owned"   # stop-local-slurm.sh stops munged only if we started it
    restarted=1
fi

# -- mariadbd + slurmdbd ---------------------------------------------------------------------------
if [ "$ACCOUNTING" = 1 ]; then
    if ! running "$RUN/mariadbd.pid" mariadbd; then
        if [ ! -d "$DIR/mysql/mysql" ]; then
            log "initialising the accounting database in $DIR/mysql"
            rm -rf "$DIR/mysql"
            mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql" \
                --auth-root-authentication-method=socket --skip-test-db </dev/null >"$LOG/mariadb-install-db.log" 2>&1 ||
                die "mariadb-install-db failed (see $LOG/mariadb-install-db.log)"
        fi
        log "starting mariadbd"
        mkdir -p "$RUN/mysqld"
        rm -f "$RUN/mariadbd.pid" "$SOCK" "$SOCK.lock"
        setsid mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$SOCK" \
            --pid-file="$RUN/mariadbd.pid" --skip-networking --log-error="$LOG/mariadbd.log" \
            --innodb-buffer-pool-size=512M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
        wait_for "mariadbd" mariadb --no-defaults --socket="$SOCK" -u root -e 'SELECT 1'
        restarted=1
    fi
    if running "$RUN/slurmdbd.pid" slurmdbd && [ "$dbd_conf_changed" = 1 ]; then
        log "slurmdbd.conf changed: restarting slurmdbd"
        stop_pid "$RUN/slurmdbd.pid" slurmdbd
    fi
    if ! running "$RUN/slurmdbd.pid" slurmdbd; then
        log "starting slurmdbd"
        rm -f "$RUN/slurmdbd.pid"
        slurmdbd </dev/null >/dev/null 2>&1
        wait_for "slurmdbd" bash -c "exec 3<>/dev/tcp/127.0.0.1/6819"
        restarted=1
    fi
fi

# -- slurmctld + slurmd ----------------------------------------------------------------------------
if [ "$slurm_conf_changed" = 1 ] || [ "$gres_changed" = 1 ]; then
    if running "$RUN/slurmctld.pid" slurmctld || running "$RUN/slurmd.pid" slurmd; then
        log "slurm.conf changed: restarting slurmctld and slurmd"
        stop_pid "$RUN/slurmd.pid" slurmd & stop_pid "$RUN/slurmctld.pid" slurmctld & wait
    fi
fi
if ! running "$RUN/slurmctld.pid" slurmctld; then
    log "starting slurmctld"
    rm -f "$RUN/slurmctld.pid"
    slurmctld </dev/null >/dev/null 2>&1
    wait_for "slurmctld" bash -c 'scontrol ping | grep -q UP'
    restarted=1
fi
if ! running "$RUN/slurmd.pid" slurmd; then
    log "starting slurmd"
    rm -f "$RUN/slurmd.pid"
    slurmd </dev/null >/dev/null 2>&1
    restarted=1
fi
node_ready() {
    local st; st=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1)
    case $st in
        idle* | mixed* | allocated* | completing*) return 0 ;;
        down* | drain* | fail* | inval*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true; return 1 ;;
        *) return 1 ;;
    esac
}
wait_for "node $HOST to be ready" node_ready

# -- smoke job ------------------------------------------------------------------------------------
if [ "$SMOKE" = 1 ] || { [ "$SMOKE" = auto ] && [ $restarted = 1 ]; }; then
    job=$(sbatch --parsable -J slurm-local-smoke -o /dev/null -e /dev/null -t 1 --wrap true) ||
        die "smoke job submission failed"
    job=${job%%;*}
    if [ "$ACCOUNTING" = 1 ]; then
        smoke_done() { [ "$(sacct -n -X -P -j "$job" -o State 2>/dev/null | head -n1)" = COMPLETED ]; }
    else
        smoke_done() { [ -z "$(squeue -h -j "$job" -t PD,R,CG 2>/dev/null)" ]; }
    fi
    wait_for "smoke job $job" smoke_done
    log "smoke job $job completed"
fi
log "up: cluster $CLUSTER, node $HOST ($CPUS CPUs, ${MEM_MB} MB, $GPUS GPUs), partition $PARTITION, state in $DIR"
