#!/bin/sh
# Regenerates envd.fds, the descriptor set build.rs compiles, after a .proto edit.
# Needs protoc (Debian: apt-get install -y protobuf-compiler); building the crate does not.
set -eu
cd "$(dirname "$0")"
protoc --include_imports --include_source_info -I. -o envd.fds \
  process/process.proto filesystem/filesystem.proto
