#!/usr/bin/env bash
# Build a Gestalt image from deploy/Dockerfile: with docker where its daemon answers, with buildah otherwise.
#
#   deploy/build-image.sh [--target cpu|gpu] [--tag NAME] [--engine docker|buildah] [--ca-bundle FILE]
#                         [--host-pip] [--wheelhouse DIR [--offline]] [--wheels-out DIR] [--no-standin]
#                         [-- MORE BUILD OPTIONS]
#
#   --ca-bundle FILE  an extra CA bundle (a TLS-intercepting proxy's CA) for pip inside the build
#   --host-pip        hand this machine's pip settings (`pip config list`: index, extra index, find-links,
#                     constraints; its cert becomes the CA bundle) to the build (deploy/host_pip.py)
#   --wheelhouse DIR  a folder of wheels pip searches first; with --offline, the only place it looks
#   --wheels-out DIR  no image: download every wheel the target's image installs into DIR, with the image's
#                     own Python (a wheelhouse to carry to a site with no internet)
#   --no-standin      fail where the base image cannot be pulled, rather than build the stand-in base
#   DEBIAN_MIRROR, HTTP_PROXY, HTTPS_PROXY, NO_PROXY (environment): handed to the build
#
# Where the Python base image cannot be pulled (no registry reachable), a stand-in is built with
# debootstrap (root): Debian bookworm's own Python 3.11, tagged localhost/gestalt-standin-python:3.11-slim-bookworm.
# buildah runs with chroot isolation (no OCI runtime needed), with default_ulimits no higher than this
# process's own. It prints the build's wall time and the image's size; build caches stay outside the repo.
set -euo pipefail
cd "$(dirname "$0")/.."

target=cpu tag="" engine="" ca_bundle="" host_pip=0 wheelhouse="" offline=0 standin=1 wheels_out=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --engine) engine=$2; shift 2 ;;
    --ca-bundle) ca_bundle=$2; shift 2 ;;
    --host-pip) host_pip=1; shift ;;
    --wheelhouse) wheelhouse=$2; shift 2 ;;
    --offline) offline=1; shift ;;
    --wheels-out) wheels_out=$2; shift 2 ;;
    --no-standin) standin=0; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$target" in cpu|gpu) ;; *) echo "--target is cpu or gpu" >&2; exit 2 ;; esac
tag=${tag:-gestalt:$target}
STANDIN=localhost/gestalt-standin-python:3.11-slim-bookworm
DEBIAN_MIRROR_URL=${DEBIAN_MIRROR:-http://deb.debian.org}
work=$(mktemp -d /tmp/gestalt-build.XXXXXX)
server=""
trap '[ -z "$server" ] || kill "$server"; rm -rf "$work"' EXIT

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'build-image: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- the engine
if [ -z "$engine" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then engine=docker
  elif command -v buildah >/dev/null 2>&1; then engine=buildah
  else die "neither a docker daemon nor buildah is here (Debian, as root: apt-get install buildah debootstrap)"
  fi
fi
if [ "$engine" = buildah ] && [ -z "${CONTAINERS_CONF:-}" ]; then
  # buildah sets each RUN's limits; without CAP_SYS_RESOURCE they may not exceed this process's own.
  nproc=$(ulimit -Hu); pid_max=$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo "$nproc")
  [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ] && nproc=$pid_max
  nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
  printf '[containers]\ndefault_ulimits = ["nproc=%s:%s", "nofile=%s:%s"]\n' "$nproc" "$nproc" "$nofile" "$nofile" \
    > "$work/containers.conf"
  export CONTAINERS_CONF="$work/containers.conf"
fi

image_exists() {
  if [ "$engine" = docker ]; then docker image inspect "$1" >/dev/null 2>&1
  else buildah inspect --type image "$1" >/dev/null 2>&1; fi
}
pull() { if [ "$engine" = docker ]; then docker pull -q "$1"; else buildah pull -q "$1"; fi; }
build() {  # build ARGS... (a context last)
  if [ "$engine" = docker ]; then DOCKER_BUILDKIT=1 docker build "$@"
  else buildah bud --isolation chroot --layers "$@"; fi
}

# ---------------------------------------------------------------- the base image, or its stand-in
# given_arg NAME: whether the build options after -- set the build argument NAME (its value on stdout)
given_arg() {
  local arg
  for arg in "${extra[@]}"; do
    arg=${arg#--build-arg=}
    case "$arg" in "$1"=*) echo "${arg#*=}"; return 0 ;; esac
  done
  return 1
}
base=$(given_arg PYTHON_IMAGE || sed -n 's/^ARG PYTHON_IMAGE=//p' deploy/Dockerfile)
build_args=()
if image_exists "$base" || pull "$base" >/dev/null 2>&1; then
  say "base image: $base"
elif [ "$standin" = 1 ]; then
  say "$base cannot be pulled: building on the stand-in base $STANDIN (Debian bookworm's Python 3.11)"
  if ! image_exists "$STANDIN"; then
    [ "$(id -u)" = 0 ] || die "the stand-in base needs root (debootstrap)"
    command -v debootstrap >/dev/null || die "the stand-in base needs debootstrap (apt-get install debootstrap)"
    rootfs="$work/rootfs"
    debootstrap --variant=minbase --include=ca-certificates,netbase,tzdata,python3,python3-venv \
      bookworm "$rootfs" "$DEBIAN_MIRROR_URL/debian" >"$work/debootstrap.log" 2>&1 \
      || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
    # As in the python image: python and pip on /usr/local/bin, installing into /usr/local.
    chroot "$rootfs" python3 -m venv /usr/local
    rm -f "$rootfs"/usr/local/bin/[Aa]ctivate*
    printf '%s\n' 'deb http://deb.debian.org/debian bookworm main' \
      'deb http://deb.debian.org/debian bookworm-updates main' \
      'deb http://deb.debian.org/debian-security bookworm-security main' > "$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    mkdir "$work/standin"
    tar -C "$rootfs" -cf "$work/standin/rootfs.tar" .
    rm -rf "$rootfs"
    printf '%s\n' 'FROM scratch' 'ADD rootfs.tar /' \
      'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
      'LABEL org.opencontainers.image.description="stand-in for python:3.11-slim-bookworm (debootstrap)"' \
      'CMD ["python3"]' > "$work/standin/Containerfile"
    build -q -f "$work/standin/Containerfile" -t "$STANDIN" "$work/standin" >/dev/null
  fi
  build_args+=(--build-arg "PYTHON_IMAGE=$STANDIN")
else
  die "$base cannot be pulled (and --no-standin)"
fi

# ---------------------------------------------------------------- the site's settings
[ -n "${DEBIAN_MIRROR:-}" ] && build_args+=(--build-arg "DEBIAN_MIRROR=$DEBIAN_MIRROR")
for name in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
  [ -n "${!name:-}" ] && build_args+=(--build-arg "$name=${!name}")
done
if [ "$host_pip" = 1 ]; then
  # This machine's pip settings; its local folders are served on 127.0.0.1 for the build's length (the
  # build shares the host's network), so that nothing of this machine's layout is mounted into the image.
  settings=$("${PYTHON:-python3}" deploy/host_pip.py "$work")
  port=""
  while read -r kind value; do
    case "$kind" in cert) [ -n "$ca_bundle" ] || ca_bundle=$value ;; serve) port=$value ;; esac
  done <<< "$settings"
  "${PYTHON:-python3}" -m http.server "$port" --bind 127.0.0.1 --directory "$work/serve" >"$work/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 50); do curl -fs -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
  build_args+=(--secret "id=pip_conf,src=$work/pip.conf")
  [ "$engine" = docker ] && build_args+=(--network host)
fi
if [ -n "$ca_bundle" ]; then
  [ -r "$ca_bundle" ] || die "cannot read the CA bundle $ca_bundle"
  build_args+=(--secret "id=ca,src=$ca_bundle")
fi
[ -z "$wheelhouse" ] || build_args+=(--build-context "wheelhouse=$(cd "$wheelhouse" && pwd)")
# The build argument that names torch's index: the CPU build's by default, which may be out of reach.
torch_arg=CPU_TORCH_INDEX_URL
[ -z "$wheels_out" ] || torch_arg=TORCH_INDEX_URL
if [ "$offline" = 1 ]; then
  [ -n "$wheelhouse" ] || die "--offline needs --wheelhouse DIR"
  build_args+=(--build-arg PIP_NO_INDEX=1 --build-arg CPU_TORCH_INDEX_URL= --build-arg GPU_TORCH_INDEX_URL=)
elif [ "$target" = gpu ] && [ -n "$wheels_out" ]; then
  build_args+=(--build-arg TORCH_INDEX_URL=)  # the gpu image's torch: pip's own index
elif [ "$target" = cpu ] && ! given_arg "$torch_arg" >/dev/null; then
  torch_index=$(sed -n "s/^ARG $torch_arg=//p" deploy/Dockerfile)
  if ! curl -fsS --max-time 20 ${ca_bundle:+--cacert "$ca_bundle"} -o /dev/null "$torch_index/torch/" 2>/dev/null; then
    say "$torch_index cannot be reached: torch comes from pip's own index (PyPI's torch is the CUDA build: a larger image)"
    build_args+=(--build-arg "$torch_arg=")
  fi
fi

# ---------------------------------------------------------------- the build
started=$(date +%s%N)
if [ -n "$wheels_out" ]; then
  mkdir -p "$wheels_out"
  say "$engine downloads the wheels of the $target image into $wheels_out"
  build -f deploy/Dockerfile --target wheels --output "type=local,dest=$wheels_out" "${build_args[@]}" "${extra[@]}" .
  echo "wheelhouse $wheels_out: $(find "$wheels_out" -type f | wc -l) files, $(du -sh "$wheels_out" | cut -f1)," \
    "in $(( ($(date +%s%N) - started) / 1000000000 )) s"
  exit 0
fi
say "$engine builds --target $target -t $tag"
build -f deploy/Dockerfile --target "$target" -t "$tag" "${build_args[@]}" "${extra[@]}" .
seconds=$(( ($(date +%s%N) - started) / 1000000000 ))
if [ "$engine" = docker ]; then
  size=$(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1 / 1e9}')
else
  size=$(buildah images --noheading --format '{{.Size}}' "$tag" | head -1)
fi
echo "built $tag with $engine in $seconds s; image size $size"
