//! `uniffi-bindgen`: generates tern-ffi's foreign bindings from the built library
//! (`uniffi-bindgen generate --library target/…/libtern_ffi.so --language python|kotlin|swift`).
//! scripts/update-bindings, scripts/test-bindings and maturin (the Python wheel) run it.

fn main() {
    uniffi::uniffi_bindgen_main()
}
