# The stage runner of speedrun.sh (sourced; tests/test_faults_speedrun.py drives it with dummy commands).
#
#   stage NAME [--out PATH]... [--dep FILE]... -- COMMAND...
#
# Runs COMMAND once and leaves the marker $stage_markers/NAME.done. A later call skips the stage only when the
# marker is honest: it records the same settings (COMMAND's full argv after expansion, plus the sha256 of every
# config file the argv names with --config and of every --dep FILE) and every --out PATH (file or folder) still
# exists. Otherwise it says why and reruns (training stages run with --resume, so a rerun continues, not restarts).
# The marker is plain text: its first line is the settings hash, the rest is what was hashed, for a human to diff.
# SKIP=a,b skips the named stages; FORCE=1 reruns every stage. With $stage_times set, each run's wall time is
# appended there as one JSON line. `stage_lock DIR WHAT` takes the speedrun's lock (a second speedrun is refused).
stage_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

stage_lock() {  # stage_lock DIR WHAT: one speedrun per base dir, or refuse in one line naming the holder's PID
    # The lock of every writer in the repo (nanochat/locks.py: flock on DIR/.lock, the holder's PID inside). This
    # shell opens the file on descriptor 9 and Python locks that open file for this shell's PID; the lock then lasts
    # until the shell and every stage it started (they inherit the descriptor) have ended, kill -9 included.
    mkdir -p "$1"
    exec 9<>"$1/.lock"
    python -m nanochat.locks 9 "$1/.lock" $$ "$2" \
        "wait for it to finish or stop it, or choose another NANOCHAT_BASE_DIR"
}

stage_sha256() {  # sha256 of stdin (coreutils on Linux, shasum on macOS)
    if command -v sha256sum >/dev/null 2>&1; then sha256sum | cut -d' ' -f1; else shasum -a 256 | cut -d' ' -f1; fi
}

stage_config_path() {  # as nanochat/config.py resolves --config: a name is configs/NAME.toml, else a path
    case "$1" in
        */*|*.toml) echo "$1" ;;
        *) echo "$stage_repo/configs/$1.toml" ;;
    esac
}

stage_settings() {  # stage_settings DEP... -- COMMAND...: the text whose hash the marker records
    local deps=() arg prev=
    while [ "$1" != -- ]; do deps+=("$1"); shift; done
    shift
    printf 'cmd'; printf ' %q' "$@"; printf '\n'
    for arg in "$@"; do  # the config files the command reads: their content is a setting too
        case "$arg" in --config=*) deps+=("$(stage_config_path "${arg#--config=}")") ;; esac
        [ "$prev" = --config ] && deps+=("$(stage_config_path "$arg")")
        prev="$arg"
    done
    for arg in ${deps[@]+"${deps[@]}"}; do
        if [ -f "$arg" ]; then echo "dep $arg $(stage_sha256 < "$arg")"; else echo "dep $arg missing"; fi
    done
}

stage() {
    local name="$1" outs=() deps=() out
    shift
    while [ $# -gt 0 ] && [ "$1" != -- ]; do
        case "$1" in
            --out|--dep)
                [ $# -ge 2 ] || { echo "[speedrun] stage $name: $1 needs a value" >&2; return 2; }
                if [ "$1" = --out ]; then outs+=("$2"); else deps+=("$2"); fi
                shift 2 ;;
            *) echo "[speedrun] stage $name: unknown option $1 (want --out PATH, --dep FILE, then -- COMMAND)" >&2
               return 2 ;;
        esac
    done
    [ "${1:-}" = -- ] || { echo "[speedrun] stage $name: no -- COMMAND" >&2; return 2; }
    shift
    if [[ ",${SKIP:-}," == *",$name,"* ]]; then echo "[speedrun] $name: skipped (SKIP)"; return; fi
    local marker="$stage_markers/$name.done" settings hash why=
    settings="$(stage_settings ${deps[@]+"${deps[@]}"} -- "$@")"
    hash="$(printf '%s\n' "$settings" | stage_sha256)"
    if [ -n "${FORCE:-}" ]; then
        why="FORCE=1"
    elif [ ! -f "$marker" ]; then
        why=  # never finished here: nothing to explain
    elif [ "$(head -n 1 "$marker")" != "$hash" ]; then
        why="settings changed (the command line or a config file it reads; the old ones are in $marker)"
    else
        for out in ${outs[@]+"${outs[@]}"}; do
            if [ ! -e "$out" ]; then why="${out#"$stage_repo"/} is missing"; break; fi
        done
        if [ -z "$why" ]; then echo "[speedrun] $name: already done"; return; fi
    fi
    [ -n "$why" ] && echo "[speedrun] $name: rerunning: $why"
    echo "[speedrun] $name: $*"
    rm -f "$marker"  # a run that fails must not leave the old marker standing
    local t0=$SECONDS
    "$@"
    echo "[speedrun] $name: done in $((SECONDS - t0)) s"
    if [ -n "${stage_times:-}" ]; then  # the wall time of every stage, for analysis.report
        mkdir -p "$(dirname "$stage_times")"
        printf '{"stage": "%s", "seconds": %d, "finished": "%s"}\n' "$name" "$((SECONDS - t0))" \
            "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$stage_times"
    fi
    for out in ${outs[@]+"${outs[@]}"}; do  # a command that "succeeds" without its outputs is a bug to show now
        [ -e "$out" ] || echo "[speedrun] $name: warning: finished but ${out#"$stage_repo"/} does not exist" >&2
    done
    mkdir -p "$stage_markers"
    printf '%s\n%s\n' "$hash" "$settings" > "$marker.tmp" && mv "$marker.tmp" "$marker"
}
