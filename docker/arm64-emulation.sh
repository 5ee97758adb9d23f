#!/usr/bin/env bash
# Let this x86 machine build and run arm64 code (as root, on Debian or Ubuntu): a cross
# compiler for the AArch64 kernel tests, qemu-user with its binfmt handler for the
# emulated ARM worker and for linux/arm64 containers, debootstrap for an arm64 root.
#   docker/arm64-emulation.sh     exit 0 once arm64 binaries run here, 1 with the reason
set -euo pipefail
source "$(dirname "$0")/common.sh"

LOG=/var/log/tpi-arm64-emulation.log
missing=""
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing="$missing gcc-aarch64-linux-gnu"
command -v qemu-aarch64-static >/dev/null 2>&1 || missing="$missing qemu-user-static"
command -v update-binfmts >/dev/null 2>&1 || missing="$missing binfmt-support"
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
if [ -n "$missing" ]; then
    [ "$(id -u)" = 0 ] || die "install$missing (needs root)"
    command -v apt-get >/dev/null 2>&1 || die "install$missing (no apt-get here)"
    say "installing$missing"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; } >"$LOG" 2>&1 ||
        die "apt-get install$missing failed (see $LOG)"
fi
# The kernel runs foreign binaries through binfmt_misc: mounted, and qemu's handler on.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>>"$LOG" ||
        die "binfmt_misc cannot be mounted here (a container without the privilege?)"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 >>"$LOG" 2>&1 ||
        die "qemu's aarch64 handler could not be registered (see $LOG)"
fi
# The proof: an arm64 program runs.
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
echo 'int main(void) { return 42; }' >"$probe/p.c"
aarch64-linux-gnu-gcc -static "$probe/p.c" -o "$probe/p" 2>>"$LOG" || die "the cross compiler failed (see $LOG)"
set +e
"$probe/p"
rc=$?
set -e
[ "$rc" = 42 ] || die "an arm64 program does not run here (exit $rc)"
say "arm64 binaries run here (qemu-user $(qemu-aarch64-static --version | head -1 | grep -o 'version [0-9.]*'))"
