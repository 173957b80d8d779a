# The `serial` exec method, guest side.  One virtio-serial port per guest (name in /etc/dynvm/exec-port)
# whose host end is a unix socket only that guest's QEMU holds.  Protocol, one line each way:
#   host  -> guest: DYNVM-EXEC <id> <timeout_s> <base64 script>
#   guest -> host : DYNVM-RESULT <id> <exit_code> <base64 stdout> <base64 stderr>
# Base64 keeps the framing line-based whatever the job prints.  A port with no host connected reads EOF at
# once, so the loop sleeps between reopenings instead of spinning.
NAME=$(cat /etc/dynvm/exec-port)
MAXOUT=1048576
find_port() {
    for d in /sys/class/virtio-ports/*; do
        [ "$(cat "$d/name" 2>/dev/null)" = "$NAME" ] && { echo "/dev/${d##*/}"; return 0; }
    done
    return 1
}
run_one() {  # $1 id, $2 timeout, $3 base64 script; answer on fd 3
    echo "$3" | base64 -d > /tmp/.job.sh 2>/dev/null || { printf 'DYNVM-RESULT %s 126  \n' "$1" >&3; return; }
    (cd /tmp && exec timeout "$2" sh /tmp/.job.sh </dev/null >/tmp/.job.out 2>/tmp/.job.err)
    rc=$?
    {
        printf 'DYNVM-RESULT %s %s ' "$1" "$rc"
        head -c $MAXOUT /tmp/.job.out | base64 -w 0
        printf ' '
        head -c $MAXOUT /tmp/.job.err | base64 -w 0
        printf '\n'
    } >&3
    rm -f /tmp/.job.sh /tmp/.job.out /tmp/.job.err
}
# Open the port once and keep it open: while the guest side is closed QEMU drops what the host sends,
# so a close/reopen cycle loses any request that arrives in between (seen: a job sent right after the
# readiness marker vanished).  EOF only means "no host connected now"; keep reading.
until PORT=$(find_port); do sleep 0.1; done
exec 3<>"$PORT" || exit 1
touch /run/dynvm-exec-ready
while true; do
    while read -r tag id tmo payload <&3; do
        case "$tag $id $tmo" in
            "DYNVM-EXEC "[A-Za-z0-9]*" "[0-9]*) run_one "$id" "$tmo" "$payload" ;;
        esac
    done
    sleep 0.1
done
