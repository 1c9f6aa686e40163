#!/usr/bin/env bash
# Fail if a run used a system package that deploy/install-deps.sh does not bring.
#
#   deploy/check-deps.sh TRACE [INSTALLER] [IMAGE_PACKAGES]
#
# TRACE is what `fatrace -f O` recorded while the build and the tests ran (deploy/test.sh
# records it). Every file opened under /usr, /etc, /lib or /bin is mapped to the package that
# owns it (from dpkg's own file lists), and that package must be one a fresh machine has:
# Essential or Priority required (what even a minimal Debian holds), one the machine image
# ships (deploy/image-packages.txt: a new machine of our image has them before any install),
# or in the dependency
# closure of the installer's list, Depends and Pre-Depends only, since the installer passes
# --no-install-recommends. A package installed by hand, or one that came in as a Recommends,
# is on this machine but not on a fresh one; this is how such a package gets caught.
#
# Why a trace rather than a list of things to probe: it sees what the build really reads
# (protoc's imports, a linker's crt files, a Python module a worker imports) without anyone
# having to think of it first, and fanotify watches without slowing or changing what runs.
set -euo pipefail
cd "$(dirname "$0")/.."

trace=${1:?usage: deploy/check-deps.sh TRACE [INSTALLER]}
installer=${2:-deploy/install-deps.sh}
image_list=${3:-deploy/image-packages.txt}
if [ ! -s "$trace" ]; then
  echo "check-deps: $trace is missing or empty: fatrace recorded nothing, so nothing was checked" >&2
  exit 1
fi

# The package names between `packages=(` and `)`, comments dropped.
listed=$(sed -n '/^packages=(/,/^)/p' "$installer" | sed 's/#.*//; s/packages=(//; s/)//' |
  tr -s ' \t' '\n' | grep -v '^$')

# What a fresh machine has whatever the installer says: the Essential and required packages.
base=$(dpkg-query -W -f='${Package} ${Essential} ${Priority}\n' | awk '$2 == "yes" || $3 == "required" { print $1 }')
# What the machine image ships before anything is installed.
image=$(grep -v '^#' "$image_list")
# Those and the installer's packages, with everything they depend on.
# shellcheck disable=SC2086
closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
  --no-replaces --no-enhances $listed $base 2>/dev/null | grep -v '^ ' | sed 's/:.*//')
allowed=$(printf '%s\n%s\n%s\n%s\n' "$listed" "$base" "$image" "$closure" | sort -u)
if [ -z "$closure" ]; then
  echo "check-deps: apt-cache knows none of the installer's packages; run apt-get update" >&2
  exit 1
fi

# file → package, from dpkg's lists. Merged /usr: a file recorded as /lib/x is opened as
# /usr/lib/x, so both sides are put in the /usr form.
usr_form='{ p = $0; sub(/^\/(lib|lib32|lib64|libx32|bin|sbin)\//, "/usr/&", p); sub(/^\/usr\/\//, "/usr/", p) }'
owners=$(mktemp)
trap 'rm -f "$owners"' EXIT
for list in /var/lib/dpkg/info/*.list; do
  pkg=$(basename "$list" .list)
  awk -v pkg="${pkg%%:*}" "$usr_form"' { print p "\t" pkg }' "$list"
done >"$owners"

# The opened files: a line reads `comm(pid): FLAGS /path`, and the path may hold spaces.
report=$(awk -v allowed="$allowed" -v owners="$owners" "
  BEGIN {
    n = split(allowed, a, \"\n\"); for (i = 1; i <= n; i++) ok[a[i]] = 1
    FS = \"\t\"; while ((getline line < owners) > 0) { split(line, f, \"\t\"); owner[f[1]] = f[2] }
    FS = \" \"
  }
  {
    i = index(\$0, \"): \"); if (!i) next
    comm = substr(\$0, 1, i - 1); sub(/\([0-9]+$/, \"\", comm)
    rest = substr(\$0, i + 3); j = index(rest, \" \"); path = substr(rest, j); sub(/^ +/, \"\", path)
    if (path !~ /^\/(usr|etc|lib|lib64|bin|sbin)\//) next
    # glibc reads locale data and message catalogs, and backtraces read /usr/lib/debug, when
    # they are there, and do fine without.
    if (path ~ /^\/etc\/locale\.alias$|^\/usr\/lib\/locale\/|^\/usr\/share\/locale\/|^\/usr\/lib\/debug\//) next
    # Enumerations, not needs: Python's importlib.metadata reads every installed distribution's
    # metadata, apt every file in its conf directories, binutils every linker plugin.
    if (path ~ /\.(egg|dist)-info\/|^\/etc\/apt\/|^\/usr\/lib\/bfd-plugins\//) next
    \$0 = path; $usr_form; path = p
    if (!(path in owner)) next
    # A directory (/etc/apt/apt.conf.d) belongs to many packages; only files say who is needed.
    if (system(\"test -d '\" path \"'\") == 0) next
    pkg = owner[path]
    if (pkg in ok || pkg in seen) next
    seen[pkg] = 1
    printf \"  %-24s %s (opened by %s)\n\", pkg, path, comm
  }" "$trace")

if [ -n "$report" ]; then
  echo "check-deps: this run used packages that $installer does not install (a fresh machine lacks them):" >&2
  echo "$report" >&2
  echo "check-deps: add each to the packages list in $installer, with a comment saying who needs it" >&2
  exit 1
fi
echo "check-deps: every system file the run opened comes from a package $installer brings"
