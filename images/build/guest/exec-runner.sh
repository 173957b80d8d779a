# The `serial` exec method, guest side.  One virtio-serial port per guest (name in /etc/dynvm/exec-port)
# whose host end is a unix socket only that guest's QEMU holds.  Line protocol, base64 so that no job
# output can break the framing (provisioner/execchan/client.py and frames.py are the host side):
#
# one-shot (probes, short commands; output capped at 1 MiB per stream):
#   host  -> guest: DYNVM-EXEC <id> <timeout_s> <base64 script>
#   guest -> host : DYNVM-RESULT <id> <exit_code> <base64 stdout> <base64 stderr>
# streaming (payloads that run for days; no cap, bounded memory):
#   host  -> guest: DYNVM-RUN <id> <timeout_s> <base64 script> [merge]  start (one run at a time);
#                                                   merge: stderr joins stdout (one stream, print order)
#                   DYNVM-ACK <id> <o|e> <seq>                     host holds that stream up to seq
#                   DYNVM-ATTACH <id> <next_o> <next_e>            (re)send from these seqs (reconnect, gap)
#                   DYNVM-DONE <id>                                exit received: forget the run
#   guest -> host : DYNVM-OUT <id> <o|e> <seq> <base64 chunk>      seq counts from 0 per stream
#                   DYNVM-EXIT <id> <exit_code> <n_o> <n_e>        after every chunk; n = chunks per stream
#                   DYNVM-BUSY <id> <running_id> | DYNVM-NORUN <id> | DYNVM-LOST <id> <o|e> <seq>
# A run keeps at most WINDOW unacknowledged chunks of CHUNK bytes per stream (base64, in tmpfs); when the
# host stops acknowledging (slow reader, wrapper gone) the pump stops reading (asleep on a FIFO until an
# ACK) and the payload blocks on its full pipe: backpressure, never growing memory, no CPU.  Chunks stay until acknowledged, so a host that reconnects
# resumes with ATTACH and loses nothing.  One process, the sender, writes to the port (frames from two
# writers would interleave); the others tell it what to send through the note FIFO (lines < PIPE_BUF are
# written atomically).  A port with no host connected reads EOF at once, so the reading loop sleeps between
# reads instead of spinning.
NAME=$(cat /etc/dynvm/exec-port 2>/dev/null)
MAXOUT=1048576
CHUNK=65536
WINDOW=8
R=${DYNVM_EXEC_STATE:-/tmp}/.dynvm-run
NOTE=${DYNVM_EXEC_STATE:-/tmp}/.dynvm-note
find_port() {
    for d in /sys/class/virtio-ports/*; do
        [ "$(cat "$d/name" 2>/dev/null)" = "$NAME" ] && { echo "/dev/${d##*/}"; return 0; }
    done
    return 1
}
run_one() {  # $1 id, $2 timeout, $3 base64 script; answer on fd 3
    echo "$3" | base64 -d > /tmp/.job.sh 2>/dev/null || { printf 'DYNVM-RESULT %s 126  \n' "$1" >&3; return; }
    (cd /tmp && exec timeout "$2" sh /tmp/.job.sh </dev/null >/tmp/.job.out 2>/tmp/.job.err 3>&- 4>&-)
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
num() {  # v = the number in file $1, or -1 (a file being rewritten may read empty); no fork
    v=-1
    read -r v 2>/dev/null < "$1"
    case "$v" in ''|*[!0-9-]*) v=-1 ;; esac
}
pump() {  # $1 stream (o|e), $2 run id; stdin is the stream's FIFO.  Chunks it into $R/$1.<seq> frames.
    n=0
    exec 5<>"$R/$1.wake"
    while :; do
        num "$R/$1.ack"
        while [ $((n - v)) -gt $WINDOW ]; do
            # Window full: sleep on the wake FIFO (no polling, no CPU while a reader is gone for days)
            # until ack() sees "waiting" and writes to it.  Re-check after raising the flag: an ACK that
            # came just before it would otherwise be missed.
            echo 1 > "$R/$1.waiting"
            num "$R/$1.ack"
            [ $((n - v)) -gt $WINDOW ] && read -r wk <&5
            echo 0 > "$R/$1.waiting"
            num "$R/$1.ack"
        done
        dd bs=$CHUNK count=1 of="$R/$1.raw" 2>/dev/null
        [ -s "$R/$1.raw" ] || break
        { printf 'DYNVM-OUT %s %s %s ' "$2" "$1" "$n"; base64 -w 0 "$R/$1.raw"; echo; } > "$R/$1.$n"
        echo "$1 $n" >&4
        n=$((n + 1))
    done
    echo "$n" > "$R/$1.n"
}
start_run() {  # $1 id, $2 timeout, $3 base64 script, $4 "merge": stderr into stdout (one stream, print order)
    mkdir -p "$R"
    echo -1 > "$R/o.ack"
    echo -1 > "$R/e.ack"
    echo "$1" > "$R/id"
    echo "new $1" >&4
    if ! echo "$3" | base64 -d > "$R/job.sh" 2>/dev/null; then
        echo 0 > "$R/o.n"; echo 0 > "$R/e.n"
        echo "DYNVM-EXIT $1 126 0 0" > "$R/x"
        echo x >&4
        return
    fi
    mkfifo "$R/o.fifo" "$R/e.fifo" "$R/o.wake" "$R/e.wake"
    (
        pump o "$1" < "$R/o.fifo" &
        po=$!
        if [ "$4" = merge ]; then
            echo 0 > "$R/e.n"
            (cd /tmp && exec timeout "$2" sh "$R/job.sh" </dev/null >"$R/o.fifo" 2>&1 4>&-)
            rc=$?
        else
            pump e "$1" < "$R/e.fifo" &
            pe=$!
            (cd /tmp && exec timeout "$2" sh "$R/job.sh" </dev/null >"$R/o.fifo" 2>"$R/e.fifo" 4>&-)
            rc=$?
            wait $pe
        fi
        wait $po
        num "$R/o.n"
        nout=$v
        num "$R/e.n"
        echo "DYNVM-EXIT $1 $rc $nout $v" > "$R/x"
        echo x >&4
    ) </dev/null 3>&- &
}
send() {  # $1 stream, frames $2..$3 to the port with one cat (a fork per frame is what costs under TCG)
    sf='' sk=$2
    while [ "$sk" -le "$3" ]; do
        # Gone: acknowledged (the host has it; the marker is harmless) or never kept (the host must know).
        [ -f "$R/$1.$sk" ] && sf="$sf $R/$1.$sk" || echo "DYNVM-LOST $id $1 $sk" >&3
        sk=$((sk + 1))
    done
    [ -z "$sf" ] || cat $sf >&3 2>/dev/null
}
sender() {  # the only writer of the port while runs stream; its orders come from the note FIFO on stdin
    id='' no=0 ne=0 ro=-1 re=-1 x=0
    while read -r what a b; do
        case "$what" in
            new) id=$a no=0 ne=0 ro=-1 re=-1 x=0 ;;
            o) ro=$a ;;
            e) re=$a ;;
            x) x=1 ;;
            attach) no=$a ne=$b; [ $x = 2 ] && x=1 ;;
            gone) id='' ;;
            say) echo "$a $b" >&3; continue ;;
        esac
        [ -n "$id" ] || continue
        if [ "$no" -le "$ro" ]; then send o "$no" "$ro"; no=$((ro + 1)); fi
        if [ "$ne" -le "$re" ]; then send e "$ne" "$re"; ne=$((re + 1)); fi
        if [ $x = 1 ] && [ "$no" -gt "$ro" ] && [ "$ne" -gt "$re" ]; then
            cat "$R/x" >&3
            x=2
        fi
    done
}
ack() {  # $1 stream, $2 seq: the host holds the stream up to seq; drop those frames
    num "$R/$1.ack"
    old=$v
    [ "$2" -gt "$old" ] || return 0
    files=''
    k=$((old + 1))
    while [ $k -le "$2" ]; do files="$files $R/$1.$k"; k=$((k + 1)); done
    echo "$2" > "$R/$1.ack"
    wt=0
    read -r wt 2>/dev/null < "$R/$1.waiting"
    [ "$wt" = 1 ] && echo w 1<>"$R/$1.wake"
    rm -f $files
}
running() { [ -f "$R/id" ] && [ ! -f "$R/x" ]; }
current() { cur=''; read -r cur 2>/dev/null < "$R/id"; [ -n "$cur" ] && [ "$cur" = "$1" ]; }
# Open the port once and keep it open: while the guest side is closed QEMU drops what the host sends,
# so a close/reopen cycle loses any request that arrives in between (seen: a job sent right after the
# readiness marker vanished).  EOF only means "no host connected now"; keep reading.
if [ -z "$DYNVM_EXEC_STATE" ]; then  # host-side tests of this script set it and hand over fd 3 themselves
    until PORT=$(find_port); do sleep 0.1; done
    exec 3<>"$PORT" || exit 1
fi
rm -rf "$R" "$NOTE"
mkfifo "$NOTE" || exit 1
exec 4<>"$NOTE"
sender < "$NOTE" &
touch "${DYNVM_EXEC_STATE:-/run}/dynvm-exec-ready"
while true; do
    while read -r tag id a b <&3; do
        case "$tag $id" in
            "DYNVM-"*" "[A-Za-z0-9]*) ;;
            *) continue ;;
        esac
        case "$id" in *[!A-Za-z0-9]*) continue ;; esac
        case "$tag" in
            DYNVM-EXEC)
                case "$a" in ''|*[!0-9]*) continue ;; esac
                run_one "$id" "$a" "$b" ;;
            DYNVM-RUN)
                case "$a" in ''|*[!0-9]*) continue ;; esac
                if running; then
                    read -r cur < "$R/id"
                    echo "say DYNVM-BUSY $id $cur" >&4
                else
                    echo "gone" >&4
                    rm -rf "$R"
                    case "$b" in
                        *" merge") start_run "$id" "$a" "${b% merge}" merge ;;
                        *) start_run "$id" "$a" "$b" ;;
                    esac
                fi ;;
            DYNVM-ACK)
                case "$a" in o|e) ;; *) continue ;; esac
                case "$b" in ''|*[!0-9]*) continue ;; esac
                current "$id" && ack "$a" "$b" ;;
            DYNVM-ATTACH)
                case "$a" in ''|*[!0-9]*) continue ;; esac
                case "$b" in ''|*[!0-9]*) continue ;; esac
                if current "$id"; then echo "attach $a $b" >&4; else echo "say DYNVM-NORUN $id" >&4; fi ;;
            DYNVM-DONE)
                if current "$id" && [ -f "$R/x" ]; then echo "gone" >&4; rm -rf "$R"; fi ;;
        esac
    done
    sleep 0.1
done
