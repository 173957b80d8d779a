# Service role: keep state on the per-instance data disk /dev/vda (format it on first boot when it
# carries no ext superblock magic 0xEF53 at byte 1080), mount it, serve it with busybox httpd on :80.
IMAGE=$1
DISK=/dev/vda
fail() { echo "DYNVM_FAILED $IMAGE $*"; exec sleep 2147483647; }

i=0
while [ ! -b "$DISK" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
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
    [ $i -lt 100 ] || fail "httpd not listening"
    sleep 0.1; i=$((i + 1))
done
echo "DYNVM_READY $IMAGE ip=$(ip -4 -o addr show eth0 2>/dev/null | awk '{print $4}') data=/data"
