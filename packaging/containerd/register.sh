#!/usr/bin/env bash
# Register pyshim with this host's containerd (1.6, 1.7, 2.x), or undo that. docs/registration.md explains the modes.
#
#   register.sh [register] [--mode cri|override|name] [options]   # idempotent: a second run changes nothing
#   register.sh undo [options]                                    # puts back exactly what register changed
#   register.sh print --mode M --containerd-version V             # the standalone snippet for a mode, on stdout
#
# Modes:
#   cri       (default on 1.7 and 2.x) a CRI runtime handler `pyshim` of runtime type io.containerd.runc.v2 whose
#             runtime_path is pyshim: containerd treats it exactly as the Go runc shim (checkpoint options, no
#             stray images, CRI archives with a top-level stats-dump). ctr and nerdctl keep the Go shim.
#             Refused on 1.6, which ignores runtime_path for CRI pods (they would run the Go shim).
#   override  containerd-shim-runc-v2 -> pyshim in a directory ahead of the Go shim on containerd's PATH: EVERY
#             io.containerd.runc.v2 container (ctr, nerdctl, CRI's runc handler) runs under pyshim, with the full
#             treatment. Takes effect when containerd restarts (it caches where it found each shim binary).
#   name      runtime io.containerd.pyshim.v2 (ctr/nerdctl --runtime io.containerd.pyshim.v2, CRI handler `pyshim`):
#             moves nothing, but containerd treats that name as a foreign runtime (see the docs). 1.6's default.
#
# Options:
#   --config PATH              containerd's config (default /etc/containerd/config.toml; need not exist)
#   --containerd PATH          the containerd binary: its version, and `config dump` to check the result
#                              (default: containerd on PATH)
#   --containerd-version V     1.6, 1.7 or 2.x, instead of asking the binary
#   --shim PATH                pyshim's binary (default /usr/bin/containerd-shim-pyshim-v2)
#   --handler NAME             the CRI runtime handler name (default pyshim)
#   --runc-root DIR            runc's state root for the handler's containers (default: runc's own)
#   --systemd-cgroup           the handler's containers use systemd cgroups (as your runc handler does, if it does)
#   --override-dir DIR         where override mode links containerd-shim-runc-v2 (default /usr/local/sbin)
#   --search-path PATH         containerd's PATH, for override mode's check (default systemd's default PATH)
#   --etc-dir DIR              pyshim's config dir, for name mode's runc options file (default /etc/pyshim)
#   --state-dir DIR            where the record of what was changed is kept (default /var/lib/pyshim/registration)
#   --restart                  `systemctl restart containerd` after a change (never done otherwise)
#
# Nothing is changed when the result does not load: the new config is checked with `containerd config dump`
# and the old one put back if it fails.
set -euo pipefail

readonly MARK_BEGIN="# >>> pyshim registration (packaging/containerd/register.sh): remove with 'register.sh undo' >>>"
readonly MARK_END="# <<< pyshim registration <<<"
readonly IMPORTS_MARK="# added by pyshim register.sh"
readonly SYSTEMD_DEFAULT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
readonly GO_SHIM_NAME=containerd-shim-runc-v2

ACTION=register
MODE=""
CONFIG=/etc/containerd/config.toml
CONTAINERD_BIN=
CONTAINERD_VERSION=
SHIM=/usr/bin/containerd-shim-pyshim-v2
HANDLER=pyshim
RUNC_ROOT=
SYSTEMD_CGROUP=0
OVERRIDE_DIR=/usr/local/sbin
SEARCH_PATH=$SYSTEMD_DEFAULT_PATH
ETC_DIR=/etc/pyshim
STATE_DIR=/var/lib/pyshim/registration
RESTART=0

say() { printf 'register.sh: %s\n' "$*"; }
die() {
    printf 'register.sh: ERROR: %s\n' "$*" >&2
    exit 1
}
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

parse_args() {
    if [[ $# -gt 0 && $1 != -* ]]; then
        ACTION=$1
        shift
    fi
    case $ACTION in register | undo | print) ;; *) die "unknown action '$ACTION' (register, undo or print)" ;; esac
    while [[ $# -gt 0 ]]; do
        case $1 in
            --mode) MODE=${2:?--mode needs a value} && shift ;;
            --config) CONFIG=${2:?--config needs a path} && shift ;;
            --containerd) CONTAINERD_BIN=${2:?--containerd needs a path} && shift ;;
            --containerd-version) CONTAINERD_VERSION=${2:?--containerd-version needs a value} && shift ;;
            --shim) SHIM=${2:?--shim needs a path} && shift ;;
            --handler) HANDLER=${2:?--handler needs a name} && shift ;;
            --runc-root) RUNC_ROOT=${2:?--runc-root needs a path} && shift ;;
            --systemd-cgroup) SYSTEMD_CGROUP=1 ;;
            --override-dir) OVERRIDE_DIR=${2:?--override-dir needs a path} && shift ;;
            --search-path) SEARCH_PATH=${2:?--search-path needs a value} && shift ;;
            --etc-dir) ETC_DIR=${2:?--etc-dir needs a path} && shift ;;
            --state-dir) STATE_DIR=${2:?--state-dir needs a path} && shift ;;
            --restart) RESTART=1 ;;
            -h | --help) usage && exit 0 ;;
            *) die "unknown option '$1' (--help lists them)" ;;
        esac
        shift
    done
    case $MODE in "" | cri | override | name) ;; *) die "unknown mode '$MODE': cri (default), override or name" ;; esac
    [[ $HANDLER =~ ^[A-Za-z0-9_-]+$ ]] || die "handler name '$HANDLER' must be letters, digits, '-' or '_'"
    for path in "$CONFIG" "$SHIM" "$OVERRIDE_DIR" "$ETC_DIR" "$STATE_DIR" ${RUNC_ROOT:+"$RUNC_ROOT"}; do
        [[ $path == /* ]] || die "'$path' is not an absolute path"
        [[ $path != *[\"\\]* ]] || die "'$path' contains a quote or backslash, which the TOML written here cannot hold"
    done
}

# --- containerd's version ------------------------------------------------------------------------------------

find_containerd() {
    if [[ -z $CONTAINERD_BIN ]]; then
        CONTAINERD_BIN=$(command -v containerd || true)
    fi
    if [[ -n $CONTAINERD_BIN && ! -x $CONTAINERD_BIN ]]; then
        die "containerd binary '$CONTAINERD_BIN' is not executable"
    fi
}

# 1.6, 1.7 or 2 (every 2.x reads the same config schema).
version_line() {
    local version=$1 major minor
    version=${version#v}
    major=${version%%.*}
    minor=${version#*.}
    minor=${minor%%[!0-9]*}
    [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] || die "cannot read a containerd version from '$1'"
    if ((major >= 2)); then
        echo 2
    elif ((major == 1 && (minor == 6 || minor == 7))); then
        echo "1.$minor"
    else
        die "containerd $version is not supported (1.6, 1.7 or 2.x)"
    fi
}

detect_version() {
    if [[ -n $CONTAINERD_VERSION ]]; then
        LINE=$(version_line "$CONTAINERD_VERSION")
    else
        detect_version_from_binary
    fi
    choose_mode
}

# containerd 1.6 reads a CRI runtime's runtime_path but does not use it: measured on 1.6.20, a pod of such a handler
# runs under the Go shim. Its CRI has no checkpoint either, so name mode loses nothing there and is its default.
choose_mode() {
    if [[ $LINE == 1.6 ]]; then
        [[ $MODE != cri ]] || die "cri mode does not work on containerd 1.6: it ignores runtime_path for CRI pods," \
            "which then run under the Go shim. Use --mode name (1.6's CRI cannot checkpoint anyway, so it" \
            "loses nothing) or --mode override (docs/registration.md)"
        MODE=${MODE:-name}
    else
        MODE=${MODE:-cri}
    fi
}

detect_version_from_binary() {
    [[ -n $CONTAINERD_BIN ]] || die "no containerd on PATH: name it with --containerd PATH or --containerd-version V"
    local output
    output=$("$CONTAINERD_BIN" --version) || die "'$CONTAINERD_BIN --version' failed"
    # "containerd github.com/containerd/containerd[/v2] 1.7.24~ds1 <revision>"
    LINE=$(version_line "$(awk '{ print $3 }' <<<"$output")")
}

# --- the TOML each mode adds -----------------------------------------------------------------------------------

# The table prefix of CRI's runtimes for a version line.
runtimes_prefix() {
    if [[ $1 == 2 ]]; then
        echo 'plugins."io.containerd.cri.v1.runtime".containerd.runtimes'
    else
        echo 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes'
    fi
}

# How CRI picks the sandbox implementation: 1.7's key, 2.x's key (1.6 has none and ignores 1.7's).
sandbox_line() {
    if [[ $1 == 2 ]]; then echo '  sandboxer = "podsandbox"'; else echo '  sandbox_mode = "podsandbox"'; fi
}

runc_options_file() { echo "$ETC_DIR/pyshim-runc.toml"; }

# The pyshim handler's table. cri mode: runc's runtime type, so CRI sends runc's options and checkpoint options,
# and runtime_path names pyshim's binary. name mode: pyshim's own type, whose options containerd can only pass as
# a file (runtimeoptions.v1.Options ConfigPath).
handler_toml() {
    local line=$1 table
    table="[$(runtimes_prefix "$line").$HANDLER]"
    echo "$table"
    if [[ $MODE == name ]]; then
        echo '  runtime_type = "io.containerd.pyshim.v2"'
    else
        echo '  runtime_type = "io.containerd.runc.v2"'
    fi
    echo "  runtime_path = \"$SHIM\""
    sandbox_line "$line"
    echo "  ${table%]}.options]"
    if [[ $MODE == name ]]; then
        echo "    ConfigPath = \"$(runc_options_file)\""
    else
        [[ -z $RUNC_ROOT ]] || echo "    Root = \"$RUNC_ROOT\""
        ((SYSTEMD_CGROUP == 0)) || echo '    SystemdCgroup = true'
    fi
}

# containerd's default runtime `runc`, spelled out: on 1.6/1.7 a config that names any CRI runtime replaces the
# default runtimes map, and CRI then refuses to load ("no corresponding runtime configured in containerd.runtimes
# for containerd default_runtime_name"). Empty options are what the default's all-zero options mean.
default_runtime_toml() {
    local line=$1 table
    table="[$(runtimes_prefix "$line").runc]"
    echo "$table"
    echo '  runtime_type = "io.containerd.runc.v2"'
    sandbox_line "$line"
    echo "  ${table%]}.options]"
}

# The runc options file name mode's handler names (pyshim reads it at Create).
runc_options_toml() {
    echo "# runc options for pyshim's CRI handler (containerd.runc.v1.Options' names); written by register.sh"
    echo 'BinaryName = "runc"'
    [[ -z $RUNC_ROOT ]] || echo "Root = \"$RUNC_ROOT\""
    ((SYSTEMD_CGROUP == 0)) || echo 'SystemdCgroup = true'
}

# A snippet that loads on its own on a minimal config of that version line.
print_snippet() {
    local line=$1
    if [[ $MODE == override ]]; then
        die "override mode adds no config: it links $GO_SHIM_NAME (see docs/registration.md)"
    fi
    echo "# pyshim as the CRI runtime handler \"$HANDLER\" for containerd $(line_label "$line"):"
    echo "# $(mode_summary)."
    echo "# Kubernetes: a RuntimeClass with handler \"$HANDLER\". packaging/containerd/register.sh registers this"
    echo "# and creates every file it names; docs/registration.md says how, and how to undo it."
    if [[ $MODE == name ]]; then
        echo "# $(runc_options_file) holds the handler's runc options (by hand: copy pyshim-runc.toml there)."
    fi
    if [[ $line != 2 ]]; then
        echo "# $(line_label "$line"): an imported file REPLACES config.toml's whole CRI section; use this as a"
        echo "# drop-in only when config.toml has none, otherwise let register.sh merge it into config.toml."
    fi
    echo "version = $(config_schema "$line")"
    echo
    handler_toml "$line"
    if [[ $line != 2 ]]; then
        echo
        echo "# containerd's default runtime, which any runtimes table above would otherwise drop on 1.6/1.7"
        default_runtime_toml "$line"
    fi
}

config_schema() { if [[ $1 == 2 ]]; then echo 3; else echo 2; fi; }
line_label() {
    if [[ $1 == 2 ]]; then echo "2.x"; elif [[ $MODE == cri ]]; then echo "1.7"; else echo "1.6/1.7"; fi
}
mode_summary() {
    case $MODE in
        cri) echo "runtime type io.containerd.runc.v2, binary $SHIM" ;;
        name) echo "runtime type io.containerd.pyshim.v2, binary $SHIM" ;;
    esac
}

# --- the record of what was changed ----------------------------------------------------------------------------

record_file() { echo "$STATE_DIR/record"; }

sha_of() {
    if [[ -e $1 || -L $1 ]]; then sha256sum <"$1" | awk '{ print $1 }'; else echo absent; fi
}

# The request, as one line: a second register with the same request and untouched files is a no-op.
request_key() {
    printf 'mode=%s config=%s shim=%s handler=%s runc-root=%s systemd-cgroup=%s override-dir=%s etc-dir=%s line=%s' \
        "$MODE" "$CONFIG" "$SHIM" "$HANDLER" "$RUNC_ROOT" "$SYSTEMD_CGROUP" "$OVERRIDE_DIR" "$ETC_DIR" "$LINE"
}

# record KEY VALUE: one line per change, in the order made (undo walks them backwards).
record() { printf '%s\t%s\t%s\n' "$1" "$2" "${3:-}" >>"$(record_file)"; }

# --- writing files -----------------------------------------------------------------------------------------------

# write_file PATH (content on stdin): atomically, keeping an existing file's mode.
write_file() {
    local path=$1 tmp
    tmp=$(mktemp "$path.pyshim-XXXXXX")
    cat >"$tmp"
    if [[ -e $path ]]; then chmod --reference="$path" "$tmp"; else chmod 0644 "$tmp"; fi
    mv -f "$tmp" "$path"
}

# Back up a file we are about to change (once), so that undo restores its exact bytes.
backup_config() {
    mkdir -p "$STATE_DIR/backup"
    if [[ -e $CONFIG ]]; then
        cp -p "$CONFIG" "$STATE_DIR/backup/config.toml"
        record config-backup "$CONFIG" "$STATE_DIR/backup/config.toml"
    else
        record config-created "$CONFIG"
    fi
}

make_dir() {
    local dir=$1 missing=()
    while [[ ! -d $dir ]]; do
        missing+=("$dir")
        dir=$(dirname "$dir")
    done
    local i
    for ((i = ${#missing[@]} - 1; i >= 0; i--)); do
        mkdir "${missing[i]}"
        record dir-created "${missing[i]}"
    done
}

# --- checking the result with containerd itself ------------------------------------------------------------------

# The merged config as the version at hand reads it (imports included), or "" when no binary is there to ask.
dump_config() {
    [[ -n $CONTAINERD_BIN ]] || return 0
    local config=$CONFIG
    if [[ ! -e $config ]]; then
        config=$(mktemp)
        printf 'version = %s\n' "$(config_schema "$LINE")" >"$config"
    fi
    "$CONTAINERD_BIN" --config "$config" config dump 2>&1
    local status=$?
    [[ $config == "$CONFIG" ]] || rm -f "$config"
    return $status
}

# Does the dump (TOML as go-toml writes it: "..." in 1.x, '...' in 2.x) hold CRI runtime table NAME?
dump_has_runtime() {
    local dump=$1 name=$2 plugin
    if [[ $LINE == 2 ]]; then plugin=io.containerd.cri.v1.runtime; else plugin=io.containerd.grpc.v1.cri; fi
    grep -qE "^ *\[plugins\.[\"']${plugin//./\\.}[\"']\.containerd\.runtimes\.${name}\]" <<<"$dump"
}

dump_default_runtime() {
    sed -nE "s/^ *default_runtime_name = [\"']([^\"']*)[\"'].*/\1/p" <<<"$1" | head -n 1
}

# --- registration ----------------------------------------------------------------------------------------------

# config.toml's imports: does any glob in a one-line `imports = [...]` match PATH? Prints "yes", "no" (no imports
# key) or "other" (an imports key that does not cover it, or one this script cannot read).
imports_cover() {
    local path=$1 line pattern
    line=$(grep -E '^[[:space:]]*imports[[:space:]]*=' "$CONFIG" 2>/dev/null | head -n 1 || true)
    if [[ -z $line ]]; then
        echo no
        return
    fi
    if [[ $line != *]* ]]; then
        echo other
        return
    fi
    while read -r pattern; do
        # shellcheck disable=SC2053  # the import is a glob: match it as one
        if [[ -n $pattern && $path == $pattern ]]; then
            echo yes
            return
        fi
    done < <(grep -oE "\"[^\"]*\"|'[^']*'" <<<"${line#*=}" | sed -E "s/^[\"'](.*)[\"']$/\1/")
    echo other
}

# The new config.toml text with an imports line for the drop-in directory, after `version = N` (imports is a
# top-level key, so it must come before the first table).
config_with_imports() {
    local glob=$1
    local imports="imports = [\"$glob\"]  $IMPORTS_MARK"
    if [[ ! -e $CONFIG ]]; then
        printf 'version = %s\n%s\n' "$(config_schema "$LINE")" "$imports"
    elif grep -qE '^version[[:space:]]*=' "$CONFIG"; then
        awk -v add="$imports" '{ print } !done && /^version[[:space:]]*=/ { print add; done = 1 }' "$CONFIG"
    else
        printf '%s\n' "$imports"
        cat "$CONFIG"
    fi
}

# The new config.toml text: SOURCE (the original, or "" when there was none) with the handler appended between
# markers, and containerd's default runtime too when WITH_DEFAULT is 1.
config_with_block() {
    local source=$1 with_default=$2
    if [[ -n $source ]]; then
        cat "$source"
        # a file without a final newline would glue our marker to its last line
        [[ -z $(tail -c 1 "$source") ]] || echo
        echo
    else
        printf 'version = %s\n\n' "$(config_schema "$LINE")"
    fi
    echo "$MARK_BEGIN"
    handler_toml "$LINE"
    if ((with_default)); then
        default_runtime_toml "$LINE"
    fi
    echo "$MARK_END"
}

# 2.x merges imported plugin tables key by key, so a drop-in adds the handler and touches nothing else; 1.6/1.7
# replace a whole plugin section with the imported one, so there the handler goes into config.toml itself.
register_config() {
    local before dropin glob cover default
    before=$(dump_config) || die "containerd cannot load $CONFIG as it is, before any change:"$'\n'"$before"
    if [[ -n $before ]] && dump_has_runtime "$before" "$HANDLER"; then
        die "$CONFIG already defines a CRI runtime '$HANDLER' (not registered by this script): choose another" \
            "name with --handler, or remove it"
    fi
    default=$(dump_default_runtime "$before")
    dropin="$(dirname "$CONFIG")/conf.d/$(dropin_name)"
    glob="$(dirname "$CONFIG")/conf.d/*.toml"
    cover=$(imports_cover "$dropin")
    if [[ $LINE == 2 && $cover != other ]]; then
        [[ ! -e $dropin ]] || die "$dropin exists and was not written by this script: move it away first"
        backup_config
        make_dir "$(dirname "$dropin")"
        print_dropin | write_file "$dropin"
        record file-created "$dropin" "$(sha_of "$dropin")"
        if [[ $cover == no ]]; then
            make_dir "$(dirname "$CONFIG")"
            config_with_imports "$glob" | write_file "$CONFIG"
        fi
        record config-written "$CONFIG" "$(sha_of "$CONFIG")"
        say "added $dropin$([[ $cover == no ]] && echo " and an imports line to $CONFIG")"
    else
        backup_config
        local original=""
        [[ ! -e $STATE_DIR/backup/config.toml ]] || original=$STATE_DIR/backup/config.toml
        make_dir "$(dirname "$CONFIG")"
        config_with_block "$original" 0 | write_file "$CONFIG"
        if [[ -n $default ]] && ! dump_has_runtime "$(dump_config || true)" "$default"; then
            if [[ $default != runc ]]; then
                die "adding the handler drops containerd's default runtime '$default', and this script only" \
                    "knows how to spell out 'runc': add the handler to $CONFIG by hand (docs/registration.md)"
            fi
            config_with_block "$original" 1 | write_file "$CONFIG"
        fi
        record config-written "$CONFIG" "$(sha_of "$CONFIG")"
        say "merged the handler '$HANDLER' into $CONFIG, between the lines '$MARK_BEGIN' and '$MARK_END'"
    fi
    if [[ $MODE == name ]] && [[ ! -e $(runc_options_file) ]]; then
        make_dir "$ETC_DIR"
        runc_options_toml | write_file "$(runc_options_file)"
        record file-created "$(runc_options_file)" "$(sha_of "$(runc_options_file)")"
        say "created $(runc_options_file)"
    fi
    check_result "$default"
}

# conf.d/pyshim.toml for the default handler, conf.d/pyshim-<handler>.toml for another one
dropin_name() { if [[ $HANDLER == pyshim ]]; then echo pyshim.toml; else echo "pyshim-$HANDLER.toml"; fi; }

print_dropin() {
    echo "# pyshim's CRI runtime handler \"$HANDLER\" ($(mode_summary)): written by register.sh; undo with"
    echo "# 'register.sh undo' (docs/registration.md)."
    echo "version = $(config_schema "$LINE")"
    echo
    handler_toml "$LINE"
}

# The result must load, hold the handler with pyshim's binary, and keep the default runtime; otherwise put back
# what was there.
check_result() {
    local default=$1 after
    [[ -n $CONTAINERD_BIN ]] || {
        say "no containerd binary to check the result with (--containerd): not checked"
        return
    }
    if ! after=$(dump_config); then
        die "containerd could not load the registered config, so it was put back as it was:"$'\n'"$after"
    fi
    if ! dump_has_runtime "$after" "$HANDLER" ||
        ! grep -qF -e "runtime_path = \"$SHIM\"" -e "runtime_path = '$SHIM'" <<<"$after" ||
        { [[ -n $default ]] && ! dump_has_runtime "$after" "$default"; }; then
        die "containerd loaded the registered config without the handler '$HANDLER' or without its default" \
            "runtime '$default' (is $CONFIG an old version 1 config?); it was put back as it was"
    fi
}

# override mode: the Go shim's name, ahead of the Go shim on containerd's PATH.
register_override() {
    local link="$OVERRIDE_DIR/$GO_SHIM_NAME" dir found=""
    if [[ -e $link || -L $link ]]; then
        die "$link exists and was not made by this script: containerd may be using it; move it away first"
    fi
    IFS=: read -r -a dirs <<<"$SEARCH_PATH"
    for dir in "${dirs[@]}"; do
        [[ $dir == "$OVERRIDE_DIR" ]] && break
        [[ -x $dir/$GO_SHIM_NAME ]] && found=$dir/$GO_SHIM_NAME && break
    done
    [[ " ${dirs[*]} " == *" $OVERRIDE_DIR "* ]] ||
        die "$OVERRIDE_DIR is not on containerd's PATH ($SEARCH_PATH): choose --override-dir or --search-path"
    [[ -z $found ]] || die "$found comes before $OVERRIDE_DIR on containerd's PATH ($SEARCH_PATH):" \
        "an override there would never be found; choose an --override-dir ahead of it"
    make_dir "$OVERRIDE_DIR"
    ln -s "$SHIM" "$link"
    record link-created "$link" "$SHIM"
    say "linked $link -> $SHIM: every io.containerd.runc.v2 container started after containerd's next restart" \
        "runs under pyshim"
}

do_register() {
    find_containerd
    detect_version
    [[ -x $SHIM ]] || die "pyshim's binary $SHIM is not there or not executable (--shim PATH)"
    if [[ -f $(record_file) ]]; then
        if [[ $(head -n 1 "$(record_file)") == "request"$'\t'"$(request_key)"$'\t' ]] && record_intact; then
            say "already registered ($MODE mode, containerd $(line_label "$LINE")): nothing changed"
            return
        fi
        say "a different or altered registration is in place: undoing it first"
        undo_record
    fi
    # the state dir holds only what this script puts there: never take over (or later empty) someone else's
    if [[ -d $STATE_DIR ]] && [[ -n $(find "$STATE_DIR" -mindepth 1 -maxdepth 1 ! -name record ! -name backup) ]]; then
        die "state directory $STATE_DIR holds files that are not this script's: choose another --state-dir"
    fi
    local missing=() dir=$STATE_DIR
    while [[ ! -d $dir ]]; do
        missing+=("$dir")
        dir=$(dirname "$dir")
    done
    mkdir -p "$STATE_DIR"
    : >"$(record_file)"
    # from here on, a failure takes back whatever was already changed
    trap 'roll_back $?' EXIT
    record request "$(request_key)"
    # the state dir's own parents, deepest first, for undo to remove after the state dir itself
    for dir in "${missing[@]:1}"; do record state-dir-created "$dir"; done
    if [[ $MODE == override ]]; then
        register_override
    else
        register_config
    fi
    trap - EXIT
    restart_note
}

roll_back() {
    ((${1:-0} == 0)) && return
    undo_record
    printf 'register.sh: nothing was changed\n' >&2
}

# Are the files register wrote still as it wrote them?
record_intact() {
    local kind path value
    while IFS=$'\t' read -r kind path value; do
        case $kind in
            file-created | config-written) [[ $(sha_of "$path") == "$value" ]] || return 1 ;;
            link-created) [[ -L $path && $(readlink "$path") == "$value" ]] || return 1 ;;
        esac
    done <"$(record_file)"
}

# --- undo ----------------------------------------------------------------------------------------------------------

# Walk the record backwards, undoing each change whose result is still what register left. A file changed since
# is left in place (what is ours is cut out of config.toml) and said so: nothing the operator wrote is lost.
undo_record() {
    local kind path value config_done=0 lines state_parents=()
    [[ -f $(record_file) ]] || return 0
    mapfile -t lines < <(tac "$(record_file)")
    local entry
    for entry in "${lines[@]}"; do
        IFS=$'\t' read -r kind path value <<<"$entry"
        case $kind in
            file-created)
                if [[ $(sha_of "$path") == "$value" ]]; then
                    rm -f "$path"
                elif [[ -e $path ]]; then
                    say "kept $path: it changed since registration (remove it yourself if pyshim's entry is unwanted)"
                fi
                ;;
            link-created)
                if [[ -L $path && $(readlink "$path") == "$value" ]]; then rm -f "$path"; fi
                ;;
            config-written)
                if [[ $(sha_of "$path") == "$value" ]]; then
                    config_done=1
                else
                    cut_our_lines "$path"
                    config_done=2
                fi
                ;;
            config-backup)
                ((config_done != 1)) || cp -p "$value" "$path"
                ;;
            config-created)
                ((config_done != 1)) || rm -f "$path"
                ;;
            dir-created)
                rmdir "$path" 2>/dev/null || say "kept $path: not empty"
                ;;
            state-dir-created)
                state_parents=("$path" "${state_parents[@]}")
                ;;
        esac
    done
    # only what register put there; the directories go if that leaves them empty
    rm -f "$STATE_DIR/backup/config.toml" "$(record_file)"
    rmdir "$STATE_DIR/backup" "$STATE_DIR" 2>/dev/null || true
    for path in "${state_parents[@]}"; do rmdir "$path" 2>/dev/null || true; done
}

# config.toml changed since registration: remove only the marked block and the marked imports line.
cut_our_lines() {
    local path=$1
    [[ -e $path ]] || return 0
    awk -v begin="$MARK_BEGIN" -v end="$MARK_END" -v imports="$IMPORTS_MARK" '
        $0 == begin { skipping = 1; next }
        skipping && $0 == end { skipping = 0; next }
        skipping { next }
        index($0, imports) && $0 ~ /^imports/ { next }
        { print }' "$path" | write_file "$path"
    say "$path changed since registration: removed only pyshim's marked lines and kept the rest as it is now"
}

do_undo() {
    if [[ ! -f $(record_file) ]]; then
        say "nothing registered (no $(record_file)): nothing changed"
        return
    fi
    local overridden=0
    ! grep -q '^link-created' "$(record_file)" || overridden=1
    undo_record
    say "registration undone"
    if ((overridden && !RESTART)); then
        say "WARNING: a running containerd remembers where it found $GO_SHIM_NAME: until it restarts, new" \
            "io.containerd.runc.v2 containers fail ('fork/exec ...: no such file or directory')"
    fi
    restart_note
}

restart_note() {
    if ((RESTART)); then
        systemctl restart containerd || die "systemctl restart containerd failed: see 'journalctl -u containerd'"
        say "restarted containerd"
    else
        say "containerd was not restarted: it reads this at its next start ('systemctl restart containerd')"
    fi
}

main() {
    parse_args "$@"
    case $ACTION in
        print)
            find_containerd
            detect_version
            print_snippet "$LINE"
            ;;
        register) do_register ;;
        undo) do_undo ;;
    esac
}

main "$@"
