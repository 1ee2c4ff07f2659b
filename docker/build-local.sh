#!/usr/bin/env bash
# Build the CPU image with no registry and no Docker daemon, then smoke-test it.
#
#   docker/build-local.sh                 # build localhost/flowgen:cpu, then smoke-test it
#   docker/build-local.sh --smoke-only    # smoke-test the image already built
#   docker/build-local.sh --cuda          # also build the CUDA image's build stage (the binary)
#   docker/build-local.sh --prepare       # only make the base and builder images
#
# debootstrap makes the Debian bookworm base from Debian's own packages; a builder image gets this
# machine's Rust toolchain on top of it; buildah (chroot isolation, rootless-capable) builds
# docker/Dockerfile on those two instead of the registry images. The smoke test starts the image,
# waits for /ready (what its HEALTHCHECK asks), runs one generation and checks the PNG.
set -euo pipefail
cd "$(dirname "$0")/.."

work=${FLOWGEN_IMAGE_WORK:-/var/tmp/flowgen-image}
tag=${FLOWGEN_IMAGE_TAG:-localhost/flowgen:cpu}
base=localhost/flowgen-base:bookworm
builder=localhost/flowgen-rust:local
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
smoke_only=0
cuda=0
prepare=0
for arg in "$@"; do
  case "$arg" in
    --smoke-only) smoke_only=1 ;;
    --cuda) cuda=1 ;;
    --prepare) prepare=1 ;;
    *) echo "unknown argument $arg (see the top of $0)" >&2; exit 2 ;;
  esac
done

sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}"
fi
export BUILDAH_ISOLATION=chroot
# vfs works everywhere (no overlay mounts inside containers or unprivileged user namespaces).
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
mkdir -p "$work"
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }
exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

if [ "$smoke_only" -eq 0 ]; then
  if ! exists "$base"; then
    step "debootstrap: Debian bookworm (minbase) from $mirror"
    rootfs="$work/rootfs"
    $sudo rm -rf "$rootfs"
    $sudo debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
      || { tail -20 "$work/debootstrap.log"; exit 1; }
    $sudo rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    ctr=$(buildah from scratch)
    buildah copy --quiet "$ctr" "$rootfs" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
    buildah commit --quiet "$ctr" "$base" >/dev/null
    buildah rm "$ctr" >/dev/null
    $sudo rm -rf "$rootfs"
  fi

  if ! exists "$builder"; then
    sysroot=$(rustc --print sysroot)
    step "builder: $base + gcc + $(rustc --version) from $sysroot"
    ctr=$(buildah from "$base")
    buildah run "$ctr" -- sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev ca-certificates >/dev/null && rm -rf /var/lib/apt/lists/*'
    buildah copy --quiet "$ctr" "$sysroot" /usr/local/rust >/dev/null
    # This machine's extra certificate authorities (a TLS-inspecting egress proxy), so cargo can
    # reach crates.io from the builder; only the builder gets them, never the runtime image.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
      buildah copy --quiet "$ctr" /usr/local/share/ca-certificates/ /usr/local/share/ca-certificates/ >/dev/null
      buildah run "$ctr" -- update-ca-certificates >/dev/null
      # pip trusts its own bundle unless told otherwise (the CUDA image's wheels come from PyPI).
      buildah config --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt "$ctr"
    fi
    buildah config --env PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env CARGO_HOME=/usr/local/cargo "$ctr"
    buildah run "$ctr" -- sh -c 'mkdir -p /usr/local/cargo && cargo --version && rustc --version'
    buildah commit --quiet "$ctr" "$builder" >/dev/null
    buildah rm "$ctr" >/dev/null
  fi

  [ "$prepare" -eq 1 ] && { echo "base and builder images ready"; exit 0; }

  step "buildah bud -f docker/Dockerfile -> $tag"
  start=$(date +%s)
  buildah bud --isolation chroot --format docker --layers \
    --ignorefile docker/Dockerfile.dockerignore \
    --build-arg RUST_IMAGE="$builder" --build-arg RUNTIME_IMAGE="$base" \
    -f docker/Dockerfile -t "$tag" .
  echo "built $tag in $(( $(date +%s) - start )) s"

  if [ "$cuda" -eq 1 ]; then
    step "buildah bud -f docker/Dockerfile.cuda --target build (the CUDA binary)"
    start=$(date +%s)
    buildah bud --isolation chroot --format docker --layers --target build \
      --ignorefile docker/Dockerfile.cuda.dockerignore \
      --build-arg RUST_IMAGE="$builder" --build-arg RUNTIME_IMAGE="$base" \
      -f docker/Dockerfile.cuda -t localhost/flowgen:cuda-build .
    echo "built the CUDA build stage in $(( $(date +%s) - start )) s"
  fi
fi

step "image"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$tag"
buildah inspect --type image --format 'user={{.Docker.Config.User}} healthcheck={{.Docker.Config.Healthcheck.Test}} volumes={{.Docker.Config.Volumes}} entrypoint={{.Docker.Config.Entrypoint}} cmd={{.Docker.Config.Cmd}}' "$tag"

step "smoke test: serve, /ready, one generation, the PNG"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ctr=$(buildah from "$tag")
log="$work/smoke.log"
# chroot isolation shares this machine's network: the server listens on a free local port.
buildah run --env FLOWGEN_SERVER__LISTEN="127.0.0.1:$port" "$ctr" -- flowgen serve >"$log" 2>&1 &
server=$!
cleanup() { kill "$server" 2>/dev/null || true; buildah rm "$ctr" >/dev/null 2>&1 || true; }
trap cleanup EXIT
t0=$(date +%s)
# The image's HEALTHCHECK command, on this port.
until buildah run "$ctr" -- curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1; do
  if [ $(( $(date +%s) - t0 )) -gt 120 ]; then echo "not ready after 120 s"; cat "$log"; exit 1; fi
  sleep 0.5
done
echo "ready after $(( $(date +%s) - t0 )) s: $(curl -fsS "http://127.0.0.1:$port/ready")"
buildah run "$ctr" -- sh -c 'echo "running as $(id -un) (uid $(id -u)) in $(pwd)"; ls -ld /var/lib/flowgen/data'
id=$(curl -fsS -XPOST "http://127.0.0.1:$port/v1/generations" -H 'content-type: application/json' \
  -d '{"labels": ["seven"], "seed": 1, "sampler": "euler", "steps": 8}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
for _ in $(seq 600); do
  status=$(curl -fsS "http://127.0.0.1:$port/v1/generations/$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  [ "$status" = succeeded ] || [ "$status" = failed ] && break
  sleep 0.1
done
echo "job $id: $status"
curl -fsS "http://127.0.0.1:$port/v1/generations/$id/images/0" -o "$work/smoke.png"
python3 - "$work/smoke.png" <<'EOF'
import struct, sys
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
width, height = struct.unpack(">II", data[16:24])
print(f"PNG {sys.argv[1]}: {len(data)} bytes, {width}x{height}")
EOF
[ "$status" = succeeded ] || { echo "the generation did not succeed"; exit 1; }
echo "smoke test passed"
cleanup
trap - EXIT

step "smoke test, scale-out: redis-server here, one API and two workers from the image"
command -v redis-server >/dev/null || $sudo apt-get install -y -qq redis-server
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
rport=$(free); aport=$(free)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync always --dir "$work" >"$work/redis.log" 2>&1 &
redis=$!
ctrs=(); pids=()
run_role() {  # role port
  local c; c=$(buildah from "$tag"); ctrs+=("$c")
  buildah run --env FLOWGEN_SERVER__LISTEN="127.0.0.1:$2" --env FLOWGEN_QUEUE__URL="redis://127.0.0.1:$rport/0" \
    "$c" -- flowgen serve --role "$1" >"$work/$1-$2.log" 2>&1 &
  pids+=($!)
}
cleanup_scale() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  kill "$redis" 2>/dev/null || true
  for c in "${ctrs[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
}
trap cleanup_scale EXIT
wports=("$(free)" "$(free)")
run_role api "$aport"
for p in "${wports[@]}"; do run_role worker "$p"; done
t0=$(date +%s)
for p in "$aport" "${wports[@]}"; do
  until curl -fsS "http://127.0.0.1:$p/ready" >/dev/null 2>&1; do
    if [ $(( $(date +%s) - t0 )) -gt 120 ]; then echo "port $p not ready after 120 s"; tail -5 "$work"/*-"$p".log; exit 1; fi
    sleep 0.5
  done
done
echo "api and 2 workers ready after $(( $(date +%s) - t0 )) s; a worker answers jobs routes with: $(curl -s "http://127.0.0.1:${wports[0]}/v1/generations" | head -c 90)"
ids=()
for seed in 1 2 3 4 5 6; do
  ids+=("$(curl -fsS -XPOST "http://127.0.0.1:$aport/v1/generations" -H 'content-type: application/json' \
    -d "{\"label\": $seed, \"seed\": $seed, \"n\": 4, \"steps\": 16}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')")
done
for id in "${ids[@]}"; do
  for _ in $(seq 600); do
    status=$(curl -fsS "http://127.0.0.1:$aport/v1/generations/$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
    [ "$status" = succeeded ] || [ "$status" = failed ] && break
    sleep 0.1
  done
  [ "$status" = succeeded ] || { echo "job $id: $status"; exit 1; }
  curl -fsS "http://127.0.0.1:$aport/v1/generations/$id/images/3" | head -c 8 | od -An -c | grep -q 'P   N   G' || { echo "no PNG for $id"; exit 1; }
done
echo "6 jobs through the API, run by the workers: all succeeded, PNGs served"
for p in "${wports[@]}"; do
  echo "worker :$p ran $(grep -c 'job succeeded' "$work/worker-$p.log") jobs"
done
echo "scale-out smoke test passed"
