# Service role: keep state on the per-instance data disk /dev/vda (format it on first boot when it
# carries no ext superblock magic 0xEF53 at byte 1080), mount it, serve it with busybox httpd on :80.
IMAGE=$1
DISK=/dev/vda
fail() { echo "DYNVM_FAILED $IMAGE $*"; exec sleep 2147483647; }

# Up to 30 s: TCG guests on a host whose two cores are busy can be that slow (the host's readiness
# deadline is the real limit; this only keeps a late disk from being reported as a missing one).
i=0
while [ ! -b "$DISK" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
[ -b "$DISK" ] || fail "no data disk $DISK"
magic=$(dd if="$DISK" bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')
if [ "$magic" != "53ef" ]; then
    echo "DYNVM_FORMAT $DISK (magic '$magic')"
    mke2fs -F -q -L "$IMAGE-data" "$DISK" >/dev/null || fail "mke2fs $DISK"
fi
mount -t ext4 "$DISK" /data || fail "mount $DISK"
mkdir -p /data/www
if [ ! -f /data/www/index.html ]; then
    echo "$IMAGE data disk created on $(hostname) at uptime $(cut -d' ' -f1 /proc/uptime)" > /data/www/index.html
    sync
fi
echo "$IMAGE $(hostname)" > /data/www/whoami.txt
httpd -p 80 -h /data/www || fail "httpd"
i=0
until netstat -ltn 2>/dev/null | grep -q ':80 '; do
    [ $i -lt 300 ] || fail "httpd not listening"
    sleep 0.1; i=$((i + 1))
done
echo "DYNVM_READY $IMAGE ip=$(ip -4 -o addr show eth0 2>/dev/null | awk '{print $4}') data=/data"

# Witness of "never two copies" (issue 10, tests/ha_qemu/test_witness.py); idle until a test creates
# /data/witness, a zeroed file of 512-byte slots whose slot 0 holds the number of the next free slot.
# Every 0.2 s: read slot 0 from the disk itself (direct I/O, no page cache), write
# "W <boot id> <seq> <uptime>" into that slot and the next number into slot 0 (direct I/O, in place, so the
# file's blocks never move and the host can read them; fsync too: a record was seen missing on the disk
# below a later header, a sub-block direct write apparently left in the page cache).  Two copies of this VM
# sharing the disk would interleave their records in the one file.  Stops writing when the file is full.  Few forks per record
# (builtins, heredocs, conv=sync pads to the slot): a TCG guest on a loaded machine has little CPU.
witness() {
    read -r boot < /proc/sys/kernel/random/boot_id
    seq=0
    slots=0
    while true; do
        if [ "$slots" -eq 0 ]; then
            if [ ! -f /data/witness ]; then sleep 1; continue; fi
            slots=$(($(stat -c %s /data/witness) / 512))
        fi
        set -- $(dd if=/data/witness bs=512 count=1 iflag=direct 2>/dev/null)
        next=${1:-1}
        case "$next" in *[!0-9]*) next=1 ;; esac
        if [ "$next" -lt "$slots" ]; then
            read -r up _ < /proc/uptime
            # The header moves on only once the record is written (a failed write is retried, same seq).
            if dd of=/data/witness bs=512 seek="$next" count=1 conv=notrunc,sync,fsync oflag=direct 2>/tmp/.witness <<EOF
W $boot $((seq + 1)) $up
EOF
            then
                seq=$((seq + 1))
                dd of=/data/witness bs=512 count=1 conv=notrunc,sync,fsync oflag=direct 2>/tmp/.witness <<EOF
$((next + 1))
EOF
            else
                echo "DYNVM_WITNESS slot $next: $(cat /tmp/.witness)" >/dev/console
            fi
        fi
        sleep 0.2
    done
}
witness </dev/null >/dev/null 2>&1 &
