#!/bin/sh
# Runs a command as if the machine had just rebooted, for the clock scenario
# (tests/it/clock.rs): inside a private mount namespace, the kernel's boot id and uptime are
# replaced by the contents of two files, then COMMAND runs. Nothing outside the namespace is
# touched. Needs root (CAP_SYS_ADMIN) and util-linux's unshare:
#
#   unshare --mount sh as-rebooted.sh BOOT_ID_FILE UPTIME_FILE COMMAND [ARGS...]
#
# BOOT_ID_FILE holds a UUID like /proc/sys/kernel/random/boot_id; UPTIME_FILE holds
# "SECONDS IDLE_SECONDS" like /proc/uptime.
set -eu

if [ "$#" -lt 3 ]; then
    echo "usage: unshare --mount sh $0 BOOT_ID_FILE UPTIME_FILE COMMAND [ARGS...]" >&2
    exit 2
fi
boot_id=$1
uptime=$2
shift 2
mount --bind "$boot_id" /proc/sys/kernel/random/boot_id
mount --bind "$uptime" /proc/uptime
exec "$@"
