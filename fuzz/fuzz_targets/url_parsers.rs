//! Every viewer-controlled string parsed before a fetch: native proxy paths (signature check
//! first, then base64 and URL parsing) and source URLs with their destination checks.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use parasol::signing::Signer;

fn signer() -> &'static Signer {
    static SIGNER: OnceLock<Signer> = OnceLock::new();
    SIGNER.get_or_init(|| Signer::new(["fuzz-key-0123456789abcdef0123456789"]))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Arbitrary path: must never panic, whatever it holds.
    let _ = parasol::api::native::parse(text, signer());
    // A correctly signed path around arbitrary source text reaches the URL parser.
    let base = url::Url::parse("http://p.test/").unwrap();
    let signed = parasol::api::native::sign_url(&base, signer(), text, None);
    let path = signed.trim_start_matches("http://p.test");
    if let Ok(req) = parasol::api::native::parse(path, signer()) {
        assert!(matches!(req.source.scheme(), "http" | "https"));
        assert!(req.source.username().is_empty() && req.source.password().is_none());
        let _ = req.key();
    }
    if let Ok(url) = parasol::api::parse_source(text) {
        let host = url.host_str().unwrap_or_default().to_string();
        let _ = parasol::fetch::guard::is_local_name(&host);
        let _ = parasol::policy::normalize_domain(&host);
    }
});
