#!/usr/bin/env bash
# Builds TernFFI.xcframework (device + simulator static libraries with the generated C
# header and module map). Needs macOS with Xcode; tern's CI machine is Linux, so CI only
# checks that Sources/TernFFI matches what the current Rust API generates.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ "$(uname)" != "Darwin" ] || ! command -v xcodebuild >/dev/null; then
  echo "build-xcframework.sh needs macOS with Xcode (xcodebuild)" >&2
  exit 1
fi
cd "$here/../.."
targets="aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios"
rustup target add $targets
for t in $targets; do cargo build --release -p tern-ffi --target "$t" ${TERN_FEATURES:+--features "$TERN_FEATURES"}; done
mkdir -p target/ios-sim
lipo -create target/aarch64-apple-ios-sim/release/libtern_ffi.a target/x86_64-apple-ios/release/libtern_ffi.a \
  -output target/ios-sim/libtern_ffi.a
headers="$here/Sources/TernFFIHeaders"
cp "$headers/tern_ffiFFI.modulemap" "$headers/module.modulemap"
rm -rf "$here/TernFFI.xcframework"
xcodebuild -create-xcframework \
  -library target/aarch64-apple-ios/release/libtern_ffi.a -headers "$headers" \
  -library target/ios-sim/libtern_ffi.a -headers "$headers" \
  -output "$here/TernFFI.xcframework"
rm "$headers/module.modulemap"
echo "built $here/TernFFI.xcframework"
