# syntax=docker/dockerfile:1
# microvpc: the daemons' images. A container runs `microvpcd <service>`
# (ipam, netagent, firewall, gateway, vmm) — the same entry point the
# integration tests start (bin/microvpcd.js) — with flags as MICROVPC_* env,
# under tini as PID 1 (signals forwarded, zombies reaped: the daemons exec
# ip, nft, wg, … all day).
#
# Two targets from the same layers:
#   control-plane  ipam and the --api-only firewall and gateway: no QEMU
#   hypervisor     (the default, last stage) netagent, firewall, gateway, vmm:
#                  control-plane plus qemu-system-x86 for kind=qemu guests
#
#   docker build --build-arg MICROVPC_COMMIT=$(git rev-parse HEAD) -t microvpc:dev .
#   docker build --target control-plane --build-arg MICROVPC_COMMIT=$(git rev-parse HEAD) -t microvpc-control-plane:dev .
#   docker run --rm microvpc:dev ipam --help
#
# Base: node:24-bookworm-slim. Node 24 LTS is what package.json's devEngines,
# .nvmrc and CI use; bookworm is the Debian release CI installs
# deploy/packages.txt on, so the image gets the same nftables/iproute2/
# wireguard versions the tests ran against.
ARG NODE_IMAGE=node:24-bookworm-slim
# The commit the image is built from (the build context has no .git): baked
# into dist/ (services/common/version.ts: build_info, logs, --version) and
# the revision label. The version label is package.json's (the test checks).
ARG MICROVPC_COMMIT=unknown
ARG MICROVPC_VERSION=0.1.0
ARG MICROVPC_SOURCE=https://example.invalid/microvpc
# Debian packages: every line of deploy/packages.txt — the file .ci/run
# installs, read here, never copied — except what a container does not need:
#   redis-server redis-tools  Redis runs from its own image (deploy/k8s)
#   iperf3 busybox-static     tools the tests drive (busybox is also the
#                             guest's userland, which deploy/guest/build.sh packs)
#   nghttp2-client            h2load, the load generator of bench:rpc
#   cpio kmod                 deploy/guest/build.sh's tools for building guests
#   containernetworking-plugins  the CNI reference bench/netagent.ts measures
#   zsh fish systemd          the tests' checks of completion scripts and units
# A package added to the list later is installed unless it is named here.
# The control plane also leaves out HYPERVISOR_ONLY:
#   qemu-system-x86           kind=qemu guests, booted by a hypervisor's vmm
# tini is the image's PID 1 (not in the list: CI and the quickstart do not need it).
ARG LEAVE_OUT="redis-server redis-tools iperf3 nghttp2-client containernetworking-plugins busybox-static cpio kmod zsh fish systemd"
ARG HYPERVISOR_ONLY="qemu-system-x86"

# --- stage 1: build. Every dependency (esbuild is a dev dependency), then
# `npm run build` compiles cli/ and services/ into dist/.
FROM ${NODE_IMAGE} AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY build.mjs tsconfig.json ./
COPY cli ./cli
COPY services ./services
COPY gen ./gen
COPY deploy/demo.ts ./deploy/demo.ts
ARG MICROVPC_COMMIT
RUN MICROVPC_COMMIT="$MICROVPC_COMMIT" npm run build

# --- stage 2: production node_modules only (no dev dependencies).
FROM ${NODE_IMAGE} AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund && npm cache clean --force

# --- stage 3: the control plane's image (ipam, firewall --api-only, gateway
# --api-only): dist/, bin/, production node_modules, tini, and the Debian
# packages below less QEMU, which only a hypervisor's vmm runs.
FROM ${NODE_IMAGE} AS control-plane
ENV DEBIAN_FRONTEND=noninteractive NODE_ENV=production
ARG LEAVE_OUT
ARG HYPERVISOR_ONLY
COPY deploy/packages.txt /tmp/packages.txt
RUN printf '%s\n' $LEAVE_OUT $HYPERVISOR_ONLY > /tmp/leave-out \
 && apt-get update \
 && grep -v '^#' /tmp/packages.txt | grep -vxF -f /tmp/leave-out \
    | xargs apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* /tmp/packages.txt /tmp/leave-out
WORKDIR /app
COPY --from=deps /app/node_modules ./node_modules
COPY package.json ./
COPY bin ./bin
COPY --from=build /app/dist ./dist
# `microvpcd` on PATH is bin/microvpcd.js (package.json "bin"), which runs
# dist/microvpcd.js: no TypeScript loader at run time. The smoke check
# proves the compiled entry point loads with production dependencies only.
RUN ln -s /app/bin/microvpcd.js /usr/local/bin/microvpcd \
 && ln -s /app/bin/microvpc.js /usr/local/bin/microvpc \
 && microvpcd --help >/dev/null
ARG MICROVPC_COMMIT
ARG MICROVPC_VERSION
ARG MICROVPC_SOURCE
LABEL org.opencontainers.image.title="microvpc control plane" \
      org.opencontainers.image.description="microvpc ipam and the cluster-wide firewall and gateway APIs" \
      org.opencontainers.image.source="$MICROVPC_SOURCE" \
      org.opencontainers.image.revision="$MICROVPC_COMMIT" \
      org.opencontainers.image.version="$MICROVPC_VERSION" \
      org.opencontainers.image.licenses="Apache-2.0"
# Non-root by default (ipam, vmm). The manifests run netagent, firewall and
# gateway as root with the capabilities they need (deploy/k8s/README.md).
USER 1000:1000
ENTRYPOINT ["tini", "--", "microvpcd"]
CMD ["--help"]

# --- stage 4 (the default target): a hypervisor's image, the control
# plane's plus what it left out as HYPERVISOR_ONLY, installed from the same
# list by the same commands.
FROM control-plane AS hypervisor
USER 0:0
ARG LEAVE_OUT
COPY deploy/packages.txt /tmp/packages.txt
RUN printf '%s\n' $LEAVE_OUT > /tmp/leave-out \
 && apt-get update \
 && grep -v '^#' /tmp/packages.txt | grep -vxF -f /tmp/leave-out \
    | xargs apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* /tmp/packages.txt /tmp/leave-out
ARG MICROVPC_COMMIT
ARG MICROVPC_VERSION
ARG MICROVPC_SOURCE
LABEL org.opencontainers.image.title="microvpc" \
      org.opencontainers.image.description="microvpc hypervisor agents: netagent, firewall, gateway, vmm" \
      org.opencontainers.image.source="$MICROVPC_SOURCE" \
      org.opencontainers.image.revision="$MICROVPC_COMMIT" \
      org.opencontainers.image.version="$MICROVPC_VERSION" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 1000:1000
ENTRYPOINT ["tini", "--", "microvpcd"]
CMD ["--help"]
