# syntax=docker/dockerfile:1
# microvpc: one image for every daemon. A container runs `microvpcd <service>`
# (ipam, netagent, firewall, gateway, vmm) — the same entry point the
# integration tests start (bin/microvpcd.js) — with flags as MICROVPC_* env.
#
#   docker build -t microvpc:dev .
#   docker run --rm microvpc:dev ipam --help
#
# Base: node:24-bookworm-slim. Node 24 LTS is what package.json's engines,
# .nvmrc and CI use; bookworm is the Debian release CI installs
# deploy/packages.txt on, so the image gets the same nftables/iproute2/
# wireguard versions the tests ran against.
ARG NODE_IMAGE=node:24-bookworm-slim

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
RUN npm run build

# --- stage 2: production node_modules only (no dev dependencies).
FROM ${NODE_IMAGE} AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund && npm cache clean --force

# --- stage 3: the runtime image: dist/, bin/ and production node_modules.
FROM ${NODE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive NODE_ENV=production
# Debian packages: every line of deploy/packages.txt — the file .ci/run
# installs, read here, never copied — except what a container does not need:
#   redis-server redis-tools  Redis runs from its own image (deploy/k8s)
#   iperf3 busybox-static     tools the tests drive (busybox is also the
#                             guest's userland, which deploy/guest/build.sh packs)
#   nghttp2-client            h2load, the load generator of bench:rpc
#   cpio kmod                 deploy/guest/build.sh's tools for building guests
#   containernetworking-plugins  the CNI reference bench/netagent.ts measures
# A package added to the list later is installed unless it is named here.
ARG LEAVE_OUT="redis-server redis-tools iperf3 nghttp2-client containernetworking-plugins busybox-static cpio kmod"
COPY deploy/packages.txt /tmp/packages.txt
RUN printf '%s\n' $LEAVE_OUT > /tmp/leave-out \
 && apt-get update \
 && grep -v '^#' /tmp/packages.txt | grep -vxF -f /tmp/leave-out \
    | xargs --no-run-if-empty apt-get install -y --no-install-recommends \
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
# Non-root by default (ipam, vmm). The manifests run netagent, firewall and
# gateway as root with the capabilities they need (deploy/k8s/README.md).
USER 1000:1000
ENTRYPOINT ["microvpcd"]
CMD ["--help"]
