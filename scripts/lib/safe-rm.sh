# Sourced by scripts: `safe_rm PATH...` deletes trees the calling script
# made, and nothing else. For each PATH it refuses (exit 1, with a message)
# when the path resolves to / or a top-level directory, or when anything is
# mounted at or under it (a killed debootstrap or chroot leaves proc, sys or
# dev mounted inside its target: a plain rm -rf would walk into the host's
# /proc, /sys or /dev). rm runs with --one-file-system as a second guard.
# A missing PATH is fine. Globs are the caller's: quote what must not expand.
safe_rm() {
    local p real
    for p in "$@"; do
        [[ -e $p || -L $p ]] || continue
        if [[ -L $p ]]; then
            # A symlink itself is removed, never what it points to.
            rm -f -- "$p"
            continue
        fi
        real=$(realpath -e -- "$p") || { echo "safe_rm: cannot resolve $p" >&2; exit 1; }
        case $real in
            / | /[!/]* ) [[ $real == */*/* ]] || { echo "safe_rm: refusing to delete $real (too close to /)" >&2; exit 1; } ;;
        esac
        if awk -v p="$real" '{ m = $5; gsub(/\\040/, " ", m) } m == p || index(m, p "/") == 1 { found = m; exit } END { if (found != "") { print found; exit 0 } exit 1 }' /proc/self/mountinfo >/dev/null; then
            echo "safe_rm: refusing to delete $real: $(awk -v p="$real" '{ m = $5 } m == p || index(m, p "/") == 1 { print m }' /proc/self/mountinfo | head -n 3 | tr '\n' ' ')is mounted under it" >&2
            exit 1
        fi
        rm -rf --one-file-system -- "$real"
    done
}
