#!/usr/bin/env bash
# Cross-builds libtern_ffi.so for Android ABIs into tern/src/main/jniLibs/<abi>/.
# Needs an Android NDK (ANDROID_NDK_HOME) and cargo-ndk; neither exists on tern's CI machine,
# so CI does not run this script (the Kotlin bindings are tested on the JVM instead).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ -z "${ANDROID_NDK_HOME:-}" ] || [ ! -d "$ANDROID_NDK_HOME" ]; then
  echo "ANDROID_NDK_HOME is not set to an Android NDK: install one (Android Studio > SDK Manager > NDK)" >&2
  exit 1
fi
command -v cargo-ndk >/dev/null || cargo install cargo-ndk
rustup target add aarch64-linux-android armv7-linux-androideabi x86_64-linux-android
cd "$here/../.."
cargo ndk -t arm64-v8a -t armeabi-v7a -t x86_64 -o "$here/tern/src/main/jniLibs" build --release -p tern-ffi ${TERN_FEATURES:+--features "$TERN_FEATURES"}
echo "built: $(find "$here/tern/src/main/jniLibs" -name '*.so' | tr '\n' ' ')"
