//! Bundles and update metadata on any bytes: a `.tern` archive (tar, manifest, paths, file
//! lengths and hashes, `.npy` goldens) and TUF envelopes (root, timestamp/snapshot, targets)
//! give a value or a typed error, never a crash, before any signature is trusted. A bundle
//! that reads writes back to bytes that read again to the same manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_bundle::repo::{MetaList, Role, Root, Targets};
use tern_bundle::signed::Envelope;
use tern_bundle::{Bundle, Limits, VerifyOptions};

fuzz_target!(|data: &[u8]| {
    // Small limits, so a length field cannot ask for gigabytes.
    let options = VerifyOptions::unchecked().limits(Limits::default().with_bundle_bytes(1 << 20));
    if let Ok(bundle) = Bundle::from_reader(data, &options) {
        for sample in &bundle.manifest().golden {
            let _ = bundle.golden_inputs(sample);
        }
        let bytes = bundle.to_bytes().expect("a bundle that read writes back");
        let again = Bundle::from_reader(bytes.as_slice(), &options).expect("and reads again");
        assert_eq!(again.manifest(), bundle.manifest());
    }
    if let Ok(envelope) = Envelope::parse(data) {
        if let Ok(root) = envelope.read::<Root>() {
            for role in [Role::Root, Role::Targets, Role::Snapshot, Role::Timestamp] {
                if let Ok(trust) = root.trust(role) {
                    let _ = envelope.verify::<Root>(&trust);
                }
            }
        }
        let _ = envelope.read::<MetaList>();
        let _ = envelope.read::<Targets>();
    }
});
