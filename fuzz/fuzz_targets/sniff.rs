//! Origin bytes: the content sniffer and type allowlist run on whatever an origin sends.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use parasol::media::TypePolicy;

fn policy() -> &'static TypePolicy {
    static POLICY: OnceLock<TypePolicy> = OnceLock::new();
    POLICY.get_or_init(|| TypePolicy::new(&["image/*".into(), "video/*".into(), "audio/*".into()]))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(mime) = policy().sniff(data) {
        assert!(!mime.contains("svg") && !mime.contains("html") && !mime.contains("xml"), "{mime}");
        let major = mime.split('/').next().unwrap_or_default();
        assert!(matches!(major, "image" | "video" | "audio"), "{mime}");
    }
});
